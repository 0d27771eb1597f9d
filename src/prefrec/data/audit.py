"""Audit a set of data files before training on them: sizes, balance, defects, leaks, drift.

:func:`audit` takes the examples of several files, keyed by file name or role, and
returns an :class:`AuditReport`: statistics per file and a list of findings, each with a
severity (``error``: results would be wrong, ``warning``: results may be biased,
``info``).

Per file: records, users, history length (min / median / mean / max), candidate-order
balance (the share of pairwise records whose prompt names the positive first, with a
two-sided binomial test against 1/2), duplicate records, records whose completion
does not match the prompt's candidates, and titles longer than the server accepts
(:data:`MAX_TITLE_CHARS`). Given a :class:`~prefrec.data.lengths.LengthLimit` (the
model's tokenizer, template and context), also the token length of every record's
longest sequence: records past the limit (training and scoring cut their prompts from the
start) and records whose completion alone fills it (an error: they cannot be scored).
An empty file is an error finding.

Across files, a file whose name contains ``eval`` or ``test`` is an evaluation file and
every other one a training file:

- **leaks**: evaluation histories (compared as tuples of titles) and user keys that also
  occur in a training file. On the released Amazon Video Games files this finds the 15
  eval histories that also appear in the SFT/DPO files.
- **title format drift**: the share of distinct titles with a trailing year ``(YYYY)``
  and with trailing whitespace, compared between training and evaluation files (between
  all files when there is no evaluation file). The released ML-1M files differ
  completely: training titles ``Tarzan `` against eval titles ``Tarzan (1999)``.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from scipy.stats import binomtest

from prefrec.data.lengths import LengthLimit, measure_examples, truncation_note, unfit_message
from prefrec.data.prompts import title_tag
from prefrec.data.schema import PairwiseExample, SelectionExample
from prefrec.recommender import Limits

Example = PairwiseExample | SelectionExample

_TRAILING_YEAR = re.compile(r"\(\d{4}\)\s*$")
_EVAL_MARKERS = ("eval", "test")

DRIFT_THRESHOLD = 0.5  # a title-format share differing by this much between files is drift
BALANCE_ALPHA = 1e-3  # binomial-test level for candidate-order imbalance (many files tested)
MAX_LISTED = 10  # record indices listed per defect
# Titles longer than this are a finding: the server refuses them (`serve --max-title-chars`).
MAX_TITLE_CHARS = Limits().max_title_chars
# What becomes of a record past the audited limit, by stage.
PAST_LIMIT = ("training (at its max_length) and rank/serve cut such prompts from the start, "
              "dropping the oldest history titles; evaluation scores them whole")


def is_eval_name(name: str) -> bool:
    """Whether a dataset key names an evaluation file (contains 'eval' or 'test')."""
    lowered = name.lower()
    return any(marker in lowered for marker in _EVAL_MARKERS)


@dataclass
class DatasetAudit:
    """Statistics of one file. Shares are ``None`` where they do not apply (no pairwise
    records, no titles)."""

    name: str
    role: str  # "train" or "eval"
    kind: str  # "pairwise", "selection", "mixed" or "empty"
    records: int
    users: int
    history_min: int | None
    history_median: float | None
    history_mean: float | None
    history_max: int | None
    positive_first_share: float | None
    positive_first_pvalue: float | None
    duplicates: int
    duplicate_records: list[int]
    mismatched: int
    mismatched_records: list[int]
    mismatch_examples: list[str]
    titles: int
    year_title_share: float | None
    trailing_space_share: float | None
    longest_title_chars: int = 0
    longest_title_record: int | None = None
    long_titles: int = 0  # distinct titles longer than MAX_TITLE_CHARS
    # Token counts, when the audit is given a tokenizer and a limit (LengthLimit):
    longest_title_tokens: int | None = None
    max_tokens: int | None = None
    longest_tokens: int | None = None
    longest_tokens_record: int | None = None
    over_limit: int | None = None
    over_limit_records: list[int] = field(default_factory=list)
    unfit: int | None = None
    unfit_records: list[int] = field(default_factory=list)
    unfit_tokens: int | None = None


@dataclass
class Overlap:
    """Histories and user keys an evaluation file shares with one training file."""

    eval: str
    train: str
    shared_histories: int
    shared_users: int


@dataclass
class Finding:
    severity: str  # "error", "warning" or "info"
    datasets: list[str]
    message: str


@dataclass
class AuditReport:
    """The audit of a set of files: per-file statistics, pairwise overlaps, findings.

    ``leaked_histories[e]`` counts the distinct histories of evaluation file ``e`` found
    in any training file, ``leaked_users[e]`` the same for user keys.
    """

    datasets: dict[str, DatasetAudit]
    overlaps: list[Overlap] = field(default_factory=list)
    leaked_histories: dict[str, int] = field(default_factory=dict)
    leaked_users: dict[str, int] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of everything in the report."""
        return asdict(self)

    def to_markdown(self) -> str:
        """A human-readable report: a table per file, the overlaps, then the findings."""
        lines = [
            "# Data audit",
            "",
            "| dataset | role | kind | records | users | history min / median / mean / max "
            "| positive first | duplicates | mismatched | titles | with year | trailing space "
            "| longest title (chars) | longest sequence (tokens) |",
            "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for d in self.datasets.values():
            history = (
                "-"
                if d.history_min is None
                else f"{d.history_min} / {d.history_median:g} / {d.history_mean:.1f} / {d.history_max}"
            )
            lines.append(
                f"| {d.name} | {d.role} | {d.kind} | {d.records} | {d.users} | {history} "
                f"| {_percent(d.positive_first_share)} | {d.duplicates} | {d.mismatched} "
                f"| {d.titles} | {_percent(d.year_title_share)} | {_percent(d.trailing_space_share)} "
                f"| {d.longest_title_chars} | {_tokens(d)} |"
            )
        if self.overlaps:
            lines += [
                "",
                "## Evaluation data seen in training",
                "",
                "| eval | train | shared histories | shared users |",
                "|---|---|---:|---:|",
            ]
            lines += [
                f"| {o.eval} | {o.train} | {o.shared_histories} | {o.shared_users} |"
                for o in self.overlaps
            ]
        lines += ["", "## Findings", ""]
        lines += [f"- **{f.severity}** {f.message}" for f in self.findings] or ["- none"]
        return "\n".join(lines) + "\n"

    def by_severity(self, severity: str) -> list[Finding]:
        return [f for f in self.findings if f.severity == severity]


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def _tokens(d: DatasetAudit) -> str:
    return "-" if d.longest_tokens is None else f"{d.longest_tokens} / {d.max_tokens}"


# --------------------------------------------------------------------------- per record


def pairwise_mismatch(example: PairwiseExample) -> str | None:
    """Why a pairwise record's completions do not fit its prompt's candidates, or None.

    Checks: the two candidates differ, both appear as ``<Title:...>`` tags in the prompt,
    ``chosen`` names the positive before the negative and ``rejected`` the reverse.
    Tags are located by substring, so titles containing ``>`` cannot confuse a parser.
    """
    positive, negative = title_tag(example.positive_title), title_tag(example.negative_title)
    if positive == negative:
        return "the two candidates are the same title"
    for tag in (positive, negative):
        if tag not in example.prompt:
            return f"candidate {tag} is not in the prompt"
    for name, completion, first, second in (
        ("chosen", example.chosen, positive, negative),
        ("rejected", example.rejected, negative, positive),
    ):
        a, b = completion.find(first), completion.find(second)
        if a < 0 or b < 0:
            missing = first if a < 0 else second
            return f"{name} completion does not name {missing}"
        if a > b:
            return f"{name} completion ranks {second} before {first}"
    return None


def selection_mismatch(example: SelectionExample) -> str | None:
    """Why a selection record is inconsistent, or None: the target must be one of the
    candidates, the candidates distinct, and every candidate named in the prompt."""
    if example.target not in example.candidates:
        return f"target {example.target!r} is not among the candidates"
    if len(set(example.candidates)) != len(example.candidates):
        return "duplicate candidates"
    for candidate in example.candidates:
        if candidate not in example.prompt:
            return f"candidate {candidate!r} is not in the prompt"
    return None


def _record_key(example: Example) -> tuple:
    if isinstance(example, PairwiseExample):
        return ("pairwise", example.prompt, example.chosen, example.rejected)
    return ("selection", example.prompt, example.target)


def _user(example: Example) -> str:
    return example.user or repr(example.history)


def _titles(examples: Sequence[Example]) -> set[str]:
    return {t for ex in examples for t in (*ex.history, *ex.candidates)}


# --------------------------------------------------------------------------- per file


def _longest_title(examples: Sequence[Example]) -> tuple[str, int | None]:
    """The longest title of any record, and the first record holding it."""
    best, where = "", None
    for i, ex in enumerate(examples):
        for title in (*ex.history, *ex.candidates):
            if len(title) > len(best):
                best, where = title, i
    return best, where


def _length_fields(examples: Sequence[Example], limit: LengthLimit | None) -> dict[str, Any]:
    """The title-length fields of a DatasetAudit, and the token fields given a limit."""
    titles = _titles(examples)
    longest, record = _longest_title(examples)
    values: dict[str, Any] = {
        "longest_title_chars": len(longest),
        "longest_title_record": record,
        "long_titles": sum(len(t) > MAX_TITLE_CHARS for t in titles),
    }
    if limit is None or not examples:
        return values
    lengths = measure_examples(examples, limit)
    values.update(
        longest_title_tokens=len(limit.tokenizer(longest, add_special_tokens=False)["input_ids"]),
        max_tokens=limit.max_tokens,
        longest_tokens=lengths.longest,
        longest_tokens_record=lengths.longest_record,
        over_limit=len(lengths.truncated),
        over_limit_records=lengths.truncated[:MAX_LISTED],
        unfit=len(lengths.unfit),
        unfit_records=lengths.unfit[:MAX_LISTED],
        unfit_tokens=lengths.unfit_tokens if lengths.unfit else None,
    )
    return values


def audit_dataset(
    name: str, examples: Sequence[Example], limit: LengthLimit | None = None
) -> DatasetAudit:
    """The statistics of one file; token counts too when ``limit`` gives a tokenizer."""
    kinds = {type(ex) for ex in examples}
    kind = (
        "empty"
        if not kinds
        else "mixed"
        if len(kinds) > 1
        else "pairwise"
        if kinds == {PairwiseExample}
        else "selection"
    )
    lengths = [len(ex.history) for ex in examples]
    pairwise = [ex for ex in examples if isinstance(ex, PairwiseExample)]
    first = sum(ex.positive_listed_first for ex in pairwise)

    seen: set[tuple] = set()
    duplicates: list[int] = []
    mismatched: list[int] = []
    reasons: list[str] = []
    for i, ex in enumerate(examples):
        key = _record_key(ex)
        if key in seen:
            duplicates.append(i)
        seen.add(key)
        reason = (
            pairwise_mismatch(ex) if isinstance(ex, PairwiseExample) else selection_mismatch(ex)
        )
        if reason is not None:
            mismatched.append(i)
            if len(reasons) < 3:
                reasons.append(f"record {i}: {reason}")

    titles = _titles(examples)
    return DatasetAudit(
        name=name,
        role="eval" if is_eval_name(name) else "train",
        kind=kind,
        records=len(examples),
        users=len({_user(ex) for ex in examples}),
        history_min=min(lengths) if lengths else None,
        history_median=float(statistics.median(lengths)) if lengths else None,
        history_mean=statistics.fmean(lengths) if lengths else None,
        history_max=max(lengths) if lengths else None,
        positive_first_share=first / len(pairwise) if pairwise else None,
        positive_first_pvalue=binomtest(first, len(pairwise)).pvalue if pairwise else None,
        duplicates=len(duplicates),
        duplicate_records=duplicates[:MAX_LISTED],
        mismatched=len(mismatched),
        mismatched_records=mismatched[:MAX_LISTED],
        mismatch_examples=reasons,
        titles=len(titles),
        year_title_share=(
            sum(bool(_TRAILING_YEAR.search(t)) for t in titles) / len(titles) if titles else None
        ),
        trailing_space_share=(
            sum(t != t.rstrip() for t in titles) / len(titles) if titles else None
        ),
        **_length_fields(examples, limit),
    )


# --------------------------------------------------------------------------- across files


def _leaks(datasets: dict[str, Sequence[Example]], report: AuditReport) -> None:
    """Fill overlaps, leak counts and leak findings: eval histories/users seen in training."""
    train_names = [n for n in datasets if not is_eval_name(n)]
    for eval_name in (n for n in datasets if is_eval_name(n)):
        eval_rows = datasets[eval_name]
        eval_histories = {ex.history for ex in eval_rows}
        eval_users = {_user(ex) for ex in eval_rows}
        leaked_h: set[tuple[str, ...]] = set()
        leaked_u: set[str] = set()
        for train_name in train_names:
            train_histories = {ex.history for ex in datasets[train_name]}
            train_users = {_user(ex) for ex in datasets[train_name]}
            shared_h, shared_u = eval_histories & train_histories, eval_users & train_users
            report.overlaps.append(Overlap(eval_name, train_name, len(shared_h), len(shared_u)))
            leaked_h |= shared_h
            leaked_u |= shared_u
        report.leaked_histories[eval_name] = len(leaked_h)
        report.leaked_users[eval_name] = len(leaked_u)
        sources = [
            f"{o.train}: {o.shared_histories}"
            for o in report.overlaps
            if o.eval == eval_name and o.shared_histories
        ]
        if leaked_h:
            rows = sum(ex.history in leaked_h for ex in eval_rows)
            report.findings.append(
                Finding(
                    "error",
                    [eval_name]
                    + [
                        o.train
                        for o in report.overlaps
                        if o.eval == eval_name and o.shared_histories
                    ],
                    f"{len(leaked_h)} of {len(eval_histories)} distinct histories of {eval_name} "
                    f"({rows} records) also appear in training files ({'; '.join(sources)})",
                )
            )
        # Readers without user ids key users by history; report user keys only when they
        # add something beyond the shared histories.
        users_of_leaked_histories = {_user(ex) for ex in eval_rows if ex.history in leaked_h}
        extra_users = leaked_u - users_of_leaked_histories
        if extra_users:
            report.findings.append(
                Finding(
                    "error",
                    [eval_name],
                    f"{len(extra_users)} users of {eval_name} also appear in training files "
                    "with other histories (splits are not by user)",
                )
            )


def _drift(audits: dict[str, DatasetAudit], report: AuditReport, threshold: float) -> None:
    """Findings for title-format shares that differ by ``threshold`` or more."""
    evals = [a for a in audits.values() if a.role == "eval" and a.titles]
    trains = [a for a in audits.values() if a.role == "train" and a.titles]
    if evals and trains:
        pairs = [(e, trains) for e in evals]
    else:
        ordered = [a for a in audits.values() if a.titles]
        pairs = [(a, ordered[i + 1 :]) for i, a in enumerate(ordered)]
    for subject, others in pairs:
        for label, attribute in (
            ("a trailing year (YYYY)", "year_title_share"),
            ("trailing whitespace", "trailing_space_share"),
        ):
            mine = getattr(subject, attribute)
            differing = [o for o in others if abs(getattr(o, attribute) - mine) >= threshold]
            if differing:
                theirs = ", ".join(f"{o.name} {_percent(getattr(o, attribute))}" for o in differing)
                report.findings.append(
                    Finding(
                        "warning",
                        [subject.name] + [o.name for o in differing],
                        f"title format drift: {_percent(mine)} of the titles of {subject.name} "
                        f"have {label}, against {theirs}; normalise titles on both sides "
                        "(prefrec.data.titles.normalize_title) or expect the model to see "
                        "differently written items at test time",
                    )
                )


def _length_findings(a: DatasetAudit, what: str) -> list[Finding]:
    """Over-long titles; with token counts, records past the limit or unable to fit."""
    found = []
    if a.long_titles:
        tokens = "" if a.longest_title_tokens is None else f" / {a.longest_title_tokens} tokens"
        found.append(Finding(
            "warning", [a.name],
            f"{a.long_titles} titles of {a.name} are longer than {MAX_TITLE_CHARS} characters "
            f"(the server's limit); the longest has {a.longest_title_chars} characters{tokens} "
            f"(record {a.longest_title_record})",
        ))
    if a.unfit:
        message = unfit_message(a.unfit, a.unfit_tokens or 0, a.max_tokens or 0, what)
        found.append(Finding(
            "error", [a.name],
            f"{a.name}: {a.unfit} records cannot be trained or scored: {message} (first: "
            f"{', '.join(map(str, a.unfit_records))})",
        ))
    if a.over_limit:
        note = truncation_note(a.over_limit, a.records, a.max_tokens or 0, a.longest_tokens or 0,
                               a.longest_tokens_record, what, PAST_LIMIT)
        found.append(Finding("warning", [a.name], f"{a.name}: {note}"))
    return found


def audit(
    datasets: dict[str, Sequence[Example]],
    drift_threshold: float = DRIFT_THRESHOLD,
    limit: LengthLimit | None = None,
) -> AuditReport:
    """Audit several files at once; keys are file names or roles (``eval``/``test`` in a
    key marks an evaluation file). With ``limit`` (a tokenizer, the prompt template and
    a token limit, usually the model's context) records are also measured in tokens."""
    audits = {name: audit_dataset(name, rows, limit) for name, rows in datasets.items()}
    report = AuditReport(datasets=audits)
    _leaks(datasets, report)
    for a in audits.values():
        if a.kind == "empty":
            report.findings.append(Finding("error", [a.name], f"{a.name} holds no records"))
        report.findings += _length_findings(a, limit.what if limit else "")
        if a.mismatched:
            report.findings.append(
                Finding(
                    "error",
                    [a.name],
                    f"{a.mismatched} records of {a.name} have completions that do not match "
                    f"the prompt's candidates ({'; '.join(a.mismatch_examples)})",
                )
            )
        if a.duplicates:
            report.findings.append(
                Finding(
                    "warning",
                    [a.name],
                    f"{a.duplicates} records of {a.name} duplicate an earlier record "
                    f"(first: {', '.join(map(str, a.duplicate_records))})",
                )
            )
        if a.positive_first_pvalue is not None and a.positive_first_pvalue < BALANCE_ALPHA:
            report.findings.append(
                Finding(
                    "warning",
                    [a.name],
                    f"candidate order is unbalanced in {a.name}: the positive is named first "
                    f"in {_percent(a.positive_first_share)} of pairwise records "
                    f"(binomial test p = {a.positive_first_pvalue:.2g}); a model can learn "
                    "the position instead of the preference",
                )
            )
        if a.kind == "mixed":
            report.findings.append(
                Finding("warning", [a.name], f"{a.name} mixes pairwise and selection records")
            )
    _drift(audits, report, drift_threshold)
    severity_order = {"error": 0, "warning": 1, "info": 2}
    report.findings.sort(key=lambda f: severity_order[f.severity])
    return report
