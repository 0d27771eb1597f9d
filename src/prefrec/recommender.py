"""Using a trained recommender: rank a user's candidate items by the model's likelihood.

A :class:`Recommender` holds a frozen model (base + merged adapter chain), its tokenizer
and the prompt template it was trained with. ``rank(history, candidates)`` builds the
prompt exactly as training and evaluation build it (:mod:`prefrec.data.prompts`, wrapped by
``model_input``), scores every candidate's completion with the shared-prefix scorer and
returns the candidates best first.

Two tasks, as in the data:

- ``selection`` (S-DPO): one prompt listing all N candidates; the completion for a
  candidate is its bare title. Score = log pi(title | prompt).
- ``pairwise`` (DMPO): exactly two candidates A, B; one prompt naming them in the given
  order; the two orderings `` <Title:A> ,  <Title:B> `` and `` <Title:B> ,  <Title:A> ``
  are scored, as evaluation scores chosen against rejected. A candidate's score is the
  log-prob of the ordering that puts it first.

Each :class:`RankedItem` carries the summed log-prob, the length-normalised log-prob
(per completion token) and the probability over the candidates, softmax of the summed
log-probs: p_i = exp(l_i) / sum_j exp(l_j). Ranking uses the summed log-prob, as the
evaluation's likelihood metrics do; ties keep the input order.

``domain`` picks the pairwise wording (movies watched, Video Games shopped, artists
listened to) from :data:`prefrec.data.prompts.DOMAINS`. The selection instruction has one
wording (S-DPO's LastFM prompt), which is what selection training used, so ``domain``
does not change it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import threading
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefrec.data.lengths import check_fit, measure
from prefrec.data.prompts import (
    DOMAINS,
    model_input,
    pairwise_completion,
    pairwise_instruction,
    selection_instruction,
)
from prefrec.errors import DataError, PrefrecError

log = logging.getLogger(__name__)

TASKS = ("selection", "pairwise")
DEFAULT_DOMAIN = "movie"
DEFAULT_TEMPLATE = "alpaca"
# A control character (newline, tab, NUL...) inside a title would change the prompt's layout.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Limits:
    """Input limits of one request (the HTTP service exposes them in its schema)."""

    max_history: int = 200
    max_candidates: int = 100
    max_title_chars: int = 300


@dataclass(frozen=True)
class RankRequest:
    """One user's history and the candidates to rank.

    ``domain`` None means the recommender's default domain.
    """

    history: tuple[str, ...]
    candidates: tuple[str, ...]
    task: str = "selection"
    domain: str | None = None


@dataclass(frozen=True)
class RankedItem:
    """One candidate in a ranking.

    Attributes:
        title: the candidate title, as given.
        rank: 1 for the best candidate.
        logp: summed log-prob of its completion (EOS included).
        logp_normalized: logp / n_tokens.
        probability: softmax of ``logp`` over the request's candidates.
        n_tokens: completion tokens scored.
    """

    title: str
    rank: int
    logp: float
    logp_normalized: float
    probability: float
    n_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- validation


def _titles(value: Any, name: str, max_items: int, max_chars: int) -> tuple[str, ...]:
    """A non-empty list of non-empty titles within the limits, as a tuple."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise DataError(None, None, name, f"expected a list of titles, got {type(value).__name__}")
    if not value:
        raise DataError(None, None, name, "empty list; give at least one title")
    if len(value) > max_items:
        raise DataError(None, None, name, f"{len(value)} titles, more than the limit {max_items}")
    for i, title in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(title, str):
            raise DataError(None, None, where, f"expected a string, got {type(title).__name__}")
        if not title.strip():
            raise DataError(None, None, where, "empty title")
        if len(title) > max_chars:
            raise DataError(
                None, None, where, f"title of {len(title)} characters, more than the limit {max_chars}"
            )
        if _CONTROL.search(title):
            raise DataError(None, None, where, "title contains a control character (newline, tab...)")
    return tuple(value)


def validate_request(
    history: Any, candidates: Any, task: Any = "selection", domain: Any = None,
    limits: Limits | None = None,
) -> RankRequest:
    """Check one request and return it as a :class:`RankRequest`.

    Raises:
        DataError: naming the field (``candidates[2]``) and what is wrong with it.
    """
    limits = limits or Limits()
    if task not in TASKS:
        raise DataError(None, None, "task", f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if domain is not None and domain not in DOMAINS:
        raise DataError(
            None, None, "domain", f"unknown domain {domain!r}; choose from {', '.join(DOMAINS)}"
        )
    hist = _titles(history, "history", limits.max_history, limits.max_title_chars)
    cands = _titles(candidates, "candidates", limits.max_candidates, limits.max_title_chars)
    first_seen: dict[str, int] = {}
    for i, title in enumerate(cands):
        if title in first_seen:
            raise DataError(
                None, None, "candidates",
                f"duplicate candidate {title!r} (positions {first_seen[title]} and {i})",
            )
        first_seen[title] = i
    if task == "pairwise" and len(cands) != 2:
        raise DataError(
            None, None, "candidates", f"the pairwise task ranks exactly 2 candidates, got {len(cands)}"
        )
    return RankRequest(hist, cands, task, domain)


# --------------------------------------------------------------------------- prompts


def scoring_inputs(
    request: RankRequest, template: str, tokenizer, default_domain: str = DEFAULT_DOMAIN
) -> tuple[list[str], list[str]]:
    """The (model input, completion) pairs to score, one per candidate, in candidate order.

    Built exactly as training and evaluation build them: selection scores each bare title
    after the selection instruction; pairwise scores the two orderings after the pairwise
    instruction that lists the candidates in the given order.
    """
    if request.task == "selection":
        text = model_input(selection_instruction(request.history, request.candidates),
                           template, tokenizer)
        return [text] * len(request.candidates), list(request.candidates)
    first, second = request.candidates
    domain = DOMAINS[request.domain or default_domain]
    text = model_input(pairwise_instruction(request.history, first, second, domain),
                       template, tokenizer)
    return [text, text], [pairwise_completion(first, second), pairwise_completion(second, first)]


def rank_scores(
    titles: Sequence[str], logps: Sequence[float], n_tokens: Sequence[int]
) -> list[RankedItem]:
    """Candidates sorted by summed log-prob (stable), with softmax probabilities.

    p_i = exp(l_i - m) / sum_j exp(l_j - m), m = max_j l_j (the shift keeps it finite).
    """
    top = max(logps)
    weights = [math.exp(lp - top) for lp in logps]
    total = sum(weights)
    order = sorted(range(len(titles)), key=lambda i: -logps[i])
    return [
        RankedItem(
            title=titles[i],
            rank=r + 1,
            logp=float(logps[i]),
            logp_normalized=float(logps[i]) / n_tokens[i],
            probability=weights[i] / total,
            n_tokens=int(n_tokens[i]),
        )
        for r, i in enumerate(order)
    ]


# --------------------------------------------------------------------------- the recommender


@dataclass(eq=False)
class Recommender:
    """A frozen model, its tokenizer, and how to prompt it.

    Scoring holds a lock, so one Recommender may be shared by threads (the HTTP service);
    calls run one at a time.

    Attributes:
        model, tokenizer: a transformers causal LM (adapters merged) and its tokenizer.
        template: the prompt template the adapters were trained with.
        domain: default pairwise wording (a key of DOMAINS).
        limits: input limits checked by every call.
        batch_size: requests (packed rows) per forward pass.
        model_name, adapters: what was loaded, for /health and explanations.
    """

    model: Any
    tokenizer: Any
    template: str = DEFAULT_TEMPLATE
    domain: str = DEFAULT_DOMAIN
    limits: Limits = field(default_factory=Limits)
    batch_size: int = 8
    model_name: str = ""
    adapters: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise PrefrecError(f"unknown domain {self.domain!r}; choose from {', '.join(DOMAINS)}")
        model_input("", self.template, self.tokenizer)  # fails early on a bad template

    @classmethod
    def load(
        cls,
        model: str = "smollm2-135m",
        adapters: Sequence[str | Path] = (),
        device: str | None = None,
        dtype: str | None = None,
        template: str | None = None,
        *,
        domain: str = DEFAULT_DOMAIN,
        limits: Limits | None = None,
        batch_size: int = 8,
    ) -> Recommender:
        """Load a base model with its adapter chain merged.

        One adapter folder is enough: its lineage (``prefrec_adapter.json``) names the base
        model, the parent adapters (SFT before alignment) and the template, and these win
        over ``model``. Several folders are taken as the whole chain, oldest first, on
        ``model``. ``template`` None means the adapter's template, else ``alpaca``.
        """
        from prefrec.model import load_for_scoring

        chain = resolve_chain(model, adapters)
        chosen = template or chain.template or DEFAULT_TEMPLATE
        if template and chain.template and template != chain.template:
            log.warning("template %r differs from the adapter's training template %r",
                        template, chain.template)
        paths = [str(a) for a in chain.adapters]
        log.info("loading %s%s", chain.base_model,
                 "".join(f" + {p}" for p in paths))
        loaded, tokenizer = load_for_scoring(chain.base_model, paths, dtype=dtype, device=device)
        return cls(loaded, tokenizer, chosen, domain, limits or Limits(), batch_size,
                   chain.base_model, paths)

    @property
    def context(self) -> int | None:
        """The most tokens the model takes (None: unbounded); longer prompts are cut from
        the start."""
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def device(self) -> str:
        return str(next(self.model.parameters()).device)

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        group_ids: Sequence[Hashable] | None = None,
        per_token: bool = False,
    ):
        """``score_completions`` on this model under the lock (see :mod:`prefrec.scoring`)."""
        from prefrec.scoring import score_completions

        max_length = self.context
        with self._lock:
            return score_completions(
                self.model, self.tokenizer, prompts, completions, group_ids=group_ids,
                batch_size=self.batch_size, per_token=per_token, max_length=max_length,
            )

    def request(
        self, history: Any, candidates: Any, task: Any = "selection", domain: Any = None
    ) -> RankRequest:
        """A validated request under this recommender's limits."""
        return validate_request(history, candidates, task, domain, self.limits)

    def inputs(self, request: RankRequest) -> tuple[list[str], list[str]]:
        """The (model input, completion) pairs of a request, one per candidate."""
        return scoring_inputs(request, self.template, self.tokenizer, self.domain)

    def rank(
        self,
        history: Sequence[str],
        candidates: Sequence[str],
        task: str = "selection",
        domain: str | None = None,
    ) -> list[RankedItem]:
        """The candidates, best first (see the module docstring)."""
        return self.rank_many([self.request(history, candidates, task, domain)])[0]

    def rank_many(self, requests: Sequence[RankRequest]) -> list[list[RankedItem]]:
        """Rank several requests in one scoring call (each request is one packed group)."""
        checked = []
        for i, req in enumerate(requests):
            try:
                checked.append(self.request(req.history, req.candidates, req.task, req.domain))
            except DataError as err:
                record = i if len(requests) > 1 else None
                raise DataError(None, record, err.field, err.message) from None
        prompts: list[str] = []
        completions: list[str] = []
        groups: list[int] = []
        for i, req in enumerate(checked):
            p, c = self.inputs(req)
            prompts += p
            completions += c
            groups += [i] * len(c)
        if not checked:
            return []
        if self.context is not None:
            # A request past the context is cut (and said so); one that cannot fit is refused.
            lengths = measure(self.tokenizer, prompts, completions, groups, self.context)
            try:
                check_fit(lengths, len(checked), "the model's context", None)
            except DataError as err:
                record = err.record if len(checked) > 1 else None
                raise DataError(None, record, "candidates", err.message) from None
        scores = self.score(prompts, completions, group_ids=groups)
        logps, n_tokens = scores.logps.tolist(), scores.n_tokens.tolist()
        rankings, pos = [], 0
        for req in checked:
            n = len(req.candidates)
            rankings.append(rank_scores(req.candidates, logps[pos : pos + n],
                                        n_tokens[pos : pos + n]))
            pos += n
        return rankings

    def info(self) -> dict[str, Any]:
        """What is loaded (the service's /health)."""
        return {
            "model": self.model_name,
            "adapters": list(self.adapters),
            "template": self.template,
            "domain": self.domain,
            "device": self.device,
            "limits": asdict(self.limits),
        }


def resolve_chain(model: str, adapters: Sequence[str | Path]):
    """Base model, adapter chain and template for ``Recommender.load`` (see there)."""
    from prefrec.adapters import AdapterChain, adapter_chain

    paths = [Path(a) for a in adapters]
    if not paths:
        return AdapterChain(model)
    if len(paths) == 1:
        return adapter_chain(paths[0], model)
    for p in paths:
        adapter_chain(p, model)  # checks that each is an adapter folder
    return AdapterChain(model, paths, adapter_chain(paths[-1], model).template)


# --------------------------------------------------------------------------- CLI


def _add_option(p: argparse.ArgumentParser, *flags: str, **kwargs: Any) -> None:
    """Add an option unless the parser already has it (cli's shared model options)."""
    try:
        p.add_argument(*flags, **kwargs)
    except argparse.ArgumentError:
        pass


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model, --adapter, --dtype, --device, --template, --domain, --batch-size."""
    _add_option(p, "--adapter", default=None,
                help="trained adapter folder (its lineage gives base model, parents, template)")
    _add_option(p, "--model", default="smollm2-135m",
                help="base model when no adapter lineage names one: embedded name, hub id or "
                "local dir (default: %(default)s)")
    _add_option(p, "--dtype", default=None, help="float32 | bfloat16 | float16 (default: auto)")
    _add_option(p, "--device", default=None, help="cpu | cuda (default: auto)")
    _add_option(p, "--template", default=None, choices=["alpaca", "chat", "plain"],
                help="prompt template (default: the adapter's, else alpaca)")
    _add_option(p, "--domain", default=DEFAULT_DOMAIN, choices=sorted(DOMAINS),
                help="pairwise prompt wording (default: %(default)s)")
    _add_option(p, "--batch-size", type=int, default=8, help="requests per forward pass")


def add_request_options(p: argparse.ArgumentParser) -> None:
    """--history, --candidates, --task (one request on the command line)."""
    p.add_argument("--history", nargs="+", metavar="TITLE", help="the user's history titles")
    p.add_argument("--candidates", nargs="+", metavar="TITLE", help="the titles to rank")
    p.add_argument("--task", default="selection", choices=TASKS,
                   help="selection: one prompt listing all candidates; pairwise: the DMPO "
                   "prompt for exactly two (default: %(default)s)")


def add_rank_args(p: argparse.ArgumentParser) -> None:
    """Options of ``prefrec rank``."""
    add_model_options(p)
    add_request_options(p)
    p.add_argument("--input", default=None, metavar="FILE.jsonl",
                   help="many requests, one JSON object a line: {history, candidates, "
                   "task?, domain?}")
    p.add_argument("--json", action="store_true", help="print one JSON line per request")


def recommender_from_args(args: argparse.Namespace, limits: Limits | None = None) -> Recommender:
    """A Recommender from the options of :func:`add_model_options`."""
    return Recommender.load(
        args.model,
        [args.adapter] if args.adapter else [],
        device=args.device,
        dtype=args.dtype,
        template=args.template,
        domain=args.domain,
        limits=limits,
        batch_size=args.batch_size,
    )


def command_line_request(args: argparse.Namespace, limits: Limits) -> RankRequest:
    """The one request given by --history / --candidates / --task."""
    if not args.history or not args.candidates:
        raise PrefrecError("give --history and --candidates (or --input FILE.jsonl)")
    try:
        return validate_request(args.history, args.candidates, args.task, None, limits)
    except DataError as err:
        raise PrefrecError(f"--{err.field.split('[')[0]}: {err.message}") from None


def read_requests(path: str | Path, limits: Limits) -> list[RankRequest]:
    """Requests from a JSON Lines file; a bad one raises DataError(path, record, field, ...).

    Read by :func:`prefrec.data.reading.read_json_lines`: blank lines are skipped and
    records count from 0, as in every other data file; a file with none is an error.
    """
    from prefrec.data.reading import read_json_lines

    requests = []
    for number, record in enumerate(read_json_lines(path)):
        if not isinstance(record, dict):
            raise DataError(path, number, None, "expected a JSON object")
        for name in ("history", "candidates"):
            if name not in record:
                raise DataError(path, number, name, "missing field")
        unknown = sorted(set(record) - {"history", "candidates", "task", "domain"})
        if unknown:
            raise DataError(path, number, unknown[0], "unknown field")
        try:
            requests.append(validate_request(record["history"], record["candidates"],
                                             record.get("task", "selection"),
                                             record.get("domain"), limits))
        except DataError as err:
            raise DataError(path, number, err.field, err.message) from None
    return requests


def format_ranking(ranking: Sequence[RankedItem]) -> str:
    """A plain-text table of one ranking."""
    lines = [f"{'rank':>4}  {'prob':>7}  {'log-prob':>9}  {'per-token':>9}  title"]
    for item in ranking:
        lines.append(f"{item.rank:>4}  {item.probability:>7.4f}  {item.logp:>9.3f}  "
                     f"{item.logp_normalized:>9.3f}  {item.title}")
    return "\n".join(lines)


def rank_command(args: argparse.Namespace) -> None:
    """``prefrec rank``: print the ranking of one request, or of every line of --input."""
    limits = Limits()
    if args.input:
        if args.history or args.candidates:
            raise PrefrecError("give either --input or --history/--candidates, not both")
        requests = read_requests(args.input, limits)
    else:
        requests = [command_line_request(args, limits)]
    recommender = recommender_from_args(args, limits)
    rankings = _rank_in_chunks(recommender, requests, args.input)
    for i, (req, ranking) in enumerate(zip(requests, rankings, strict=True)):
        if args.json:
            print(json.dumps({"index": i, "task": req.task,
                              "ranking": [r.to_dict() for r in ranking]}, ensure_ascii=False))
        else:
            if len(requests) > 1:
                print(f"request {i} ({req.task}, {len(req.candidates)} candidates)")
            print(format_ranking(ranking))
            if len(requests) > 1:
                print()


def _rank_in_chunks(recommender: Recommender, requests: Sequence[RankRequest],
                    path: str | None = None, chunk: int = 64) -> list[list[RankedItem]]:
    """rank_many over chunks of requests, with a progress bar for long files; a request
    the model cannot take is named by its record in ``path``."""
    from tqdm.auto import tqdm

    rankings: list[list[RankedItem]] = []
    with tqdm(total=len(requests), unit="req", desc="ranking",
              disable=len(requests) <= chunk) as bar:
        for start in range(0, len(requests), chunk):
            part = requests[start : start + chunk]
            try:
                rankings += recommender.rank_many(part)
            except DataError as err:
                record = None if err.record is None else start + err.record
                raise DataError(path, record, err.field, err.message) from None
            bar.update(len(part))
    return rankings
