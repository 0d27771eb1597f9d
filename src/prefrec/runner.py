"""The experiment runner: ``prefrec run CONFIG.yaml [key=value ...]``.

One config file describes a whole study; the runner executes its stages in order and
writes a report. Per experiment (a training set and an eval set)::

    data        resolve the files (or split one by user), audit them
    zero-shot   evaluate the base model
    sft         LoRA SFT, then evaluate it
    align       one preference stage per (loss, K), each on top of the SFT adapter; evaluate
    cross       evaluate every trained model on other experiments' eval sets (cross-domain)
    baselines   classical recommenders on the same eval examples

then ``report.md``, ``report.html`` and ``results.json`` (:mod:`prefrec.report`).

Every stage is resumable: training stages are no-ops once their adapter exists (and
refuse a changed config), evaluations return at once when their ``metrics.json`` holds
the same settings, and a killed evaluation continues from its per-example file. So
re-running the same command after a crash continues where it stopped. Stage wall times
are appended to ``stages.jsonl``. Across machines or fresh clones, ``--publish`` /
``--restore`` carry the run's record (:mod:`prefrec.record`): a restored model whose
evaluations are all on disk is neither retrained nor rescored.

Output layout (``out`` in the config)::

    config.yaml                 the resolved config (after overrides)
    stages.jsonl                one row per stage run: name, status, seconds
    <exp>/audit.md|json         data audit
    <exp>/data/                 split files, when the experiment splits one file
    <exp>/sft/, <exp>/<loss>-k<K>/        training stages (adapter/, log.jsonl, loss.png)
    <exp>/eval/<model>/         evaluation of each model on the experiment's eval set
    <exp>/cross/<other>/<model>/  the same models on another experiment's eval set
    <exp>/baselines/<method>/   baseline scores + metrics in the eval layout
    report.md, report.html, results.json, figures/
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from prefrec.config_io import (
    ConfigSource,
    check_keys,
    check_section,
    dataclass_hints,
    read_yaml_mapping,
)
from prefrec.data.prompts import TEMPLATES
from prefrec.errors import PrefrecError
from prefrec.io import append_jsonl, atomic_write_text

log = logging.getLogger(__name__)

# A stage section: its options, or null / false to skip the stage.
Section = dict[str, Any] | None | Literal[False]


@dataclass
class RunSettings:
    """The top level of a run config, with its defaults. The type hints are what
    :func:`load_config` checks every value and override against; the sections' own keys
    are typed by :class:`~prefrec.train.config.SFTConfig`,
    :class:`~prefrec.train.config.AlignConfig`, :class:`EvalSettings`,
    :class:`Experiment`, :class:`SplitSettings` and :class:`BaselinesSection`."""

    name: str = "run"
    out: str | None = None
    model: str = "smollm2-135m"
    template: Literal[TEMPLATES] = "alpaca"  # type: ignore[valid-type]
    dtype: str | None = None
    device: str | None = None
    data_dir: str | None = None
    # `prefrec data build` arguments, checked against its parser; files go to <out>/data
    build: Any = None
    experiments: list[Any] = field(default_factory=list)
    zero_shot: bool = True
    sft: Section = field(default_factory=dict)
    align: Section = field(default_factory=lambda: {"losses": ["dmpo"], "negatives": [3]})
    eval: dict[str, Any] = field(default_factory=dict)
    baselines: dict[str, Any] | None = None
    significance: dict[str, Any] | None = field(default_factory=lambda: {"n_boot": 1000})


@dataclass
class EvalSettings:
    """The ``eval`` section: the options of ``prefrec eval`` that every evaluation shares."""

    limit: int | None = None
    seed: int = 0  # as `prefrec eval --seed`
    batch_size: int = 4
    n_boot: int = 1000
    mode: Literal["likelihood", "generate", "both"] = "likelihood"
    max_new_tokens: int = 32
    orders: Literal["given", "both"] = "given"  # pairwise data: "both" scores both orders


@dataclass
class SplitSettings:
    """An experiment's ``split`` section: one file split by user (see ``prefrec data split``)."""

    source: str = ""
    eval_fraction: float = 0.2
    seed: int = 42
    link_windows: bool = True


@dataclass
class BaselinesSection:
    """The ``baselines`` section: which methods, their config (a file or a mapping)."""

    methods: list[str] = field(default_factory=list)
    config: str | dict[str, Any] | None = None
    limit: int | None = None


@dataclass
class SignificanceSettings:
    """The ``significance`` section: bootstrap resamples of the headline comparisons."""

    n_boot: int = 1000


DEFAULTS: dict[str, Any] = dataclasses.asdict(RunSettings())
EVAL_KEYS: dict[str, Any] = dataclasses.asdict(EvalSettings())


# --------------------------------------------------------------------------- config


@dataclass
class Experiment:
    """One training set + eval set pair; ``preference`` may contain ``{k}``."""

    name: str
    eval: str
    sft: str | None = None
    preference: str | None = None
    audit: list[str] = field(default_factory=list)
    baselines_train: list[str] = field(default_factory=list)
    split: dict[str, Any] | None = None
    cross_eval: list[str] = field(default_factory=list)

    def preference_data(self, k: int) -> str | None:
        return None if self.preference is None else self.preference.replace("{k}", str(k))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML, so 3, [dpo, dmpo], null work)."""
    if "=" not in text:
        raise PrefrecError(f"override {text!r}: expected key=value (e.g. eval.limit=100)")
    key, value = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise PrefrecError(f"override {text!r}: empty key")
    try:
        parsed = yaml.safe_load(value) if value else None
    except yaml.YAMLError as err:
        raise PrefrecError(f"override {text!r}: value is not valid YAML ({err})") from None
    return key.split("."), parsed


def apply_override(config: dict[str, Any], path: list[str], value: Any) -> None:
    node = config
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise PrefrecError(f"override {'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def load_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a run config, apply ``key=value`` overrides, fill defaults, and check every
    key and every value's type (:mod:`prefrec.config_io`) before anything runs."""
    path = Path(path)
    raw = read_yaml_mapping(path, "config")
    applied: dict[str, str] = {}
    for text in overrides or []:
        keys, value = parse_override(text)
        apply_override(raw, keys, value)
        applied[".".join(keys)] = text
    source = ConfigSource(path, applied)
    check_section(source, "", raw, dataclass_hints(RunSettings))
    config = copy.deepcopy(DEFAULTS)
    config.update(raw)
    if config["out"] is None:
        config["out"] = str(Path("runs") / config["name"])
    if config["build"]:
        _check_build(config["build"], str(path))
        if config["data_dir"] is None:
            config["data_dir"] = str(Path(config["out"]) / "data")
    _check_sft(config, source)
    _check_align(config, source)
    check_section(source, "eval", config["eval"], dataclass_hints(EvalSettings))
    config["eval"] = {**EVAL_KEYS, **config["eval"]}
    _check_baselines(config, source)
    if config["significance"] is not None:
        check_section(source, "significance", config["significance"],
                      dataclass_hints(SignificanceSettings))
    _check_experiments(config, source)
    return config


def _check_sft(config: dict[str, Any], source: ConfigSource) -> None:
    from prefrec.train.config import SFTConfig

    if config["sft"] not in (None, False):
        check_section(source, "sft", config["sft"], dataclass_hints(SFTConfig, {"data", "out"}))


def _check_align(config: dict[str, Any], source: ConfigSource) -> None:
    """Types as :class:`AlignConfig`, except that ``losses`` and ``negatives`` may be lists
    (one stage per loss x K); a single value becomes a one-item list."""
    from prefrec.train.config import AlignConfig

    align = config["align"]
    if align in (None, False):
        return
    hints = {**dataclass_hints(AlignConfig, {"data", "out", "sft"}),
             "losses": list[str] | str, "negatives": list[int] | int}
    check_section(source, "align", align, hints)
    align.setdefault("losses", ["dmpo"])
    align.setdefault("negatives", [3])
    for key in ("losses", "negatives"):
        if not isinstance(align[key], list):
            align[key] = [align[key]]
    bad = [x for x in align["losses"] if x not in ("dpo", "dmpo", "sdpo")]
    if bad:
        raise PrefrecError(f"{source.path}: align.losses has {bad}; expected dpo, dmpo or sdpo")
    if not align["negatives"] or min(align["negatives"]) < 1:
        raise PrefrecError(f"{source.where('align.negatives')}: expected K >= 1 negatives, "
                           f"got {align['negatives']}")


def _check_baselines(config: dict[str, Any], source: ConfigSource) -> None:
    """Known methods, and a method config (a file or a mapping) that reads cleanly now
    rather than after the language models have trained."""
    spec = config["baselines"]
    if not spec:
        return
    check_section(source, "baselines", spec, dataclass_hints(BaselinesSection))
    from prefrec.baselines import METHODS
    from prefrec.baselines.config import config_from_dict
    from prefrec.baselines.config import load_config as load_baselines_config

    unknown = [m for m in spec.get("methods") or [] if m not in METHODS]
    if unknown:
        raise PrefrecError(f"{source.path}: baselines.methods has {unknown}; "
                           f"expected some of {', '.join(METHODS)}")
    method_config = spec.get("config")
    if isinstance(method_config, dict):
        try:
            config_from_dict(method_config)
        except PrefrecError as err:
            raise PrefrecError(f"{source.where('baselines.config')}: {err}") from None
    elif method_config is not None:
        load_baselines_config(method_config)


def _check_experiments(config: dict[str, Any], source: ConfigSource) -> None:
    """Each experiment typed as :class:`Experiment` (null: an optional key's default),
    named once, with eval data or a split, and cross_eval naming experiments that exist."""
    path = source.path
    if not config["experiments"]:
        raise PrefrecError(f"{path}: no experiments (a list with name, eval, sft, preference)")
    required = {f.name for f in dataclasses.fields(Experiment)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    hints = {key: hint if key in required else hint | None
             for key, hint in dataclass_hints(Experiment).items()}
    names = set()
    for i, exp in enumerate(config["experiments"]):
        where = f"{path}: experiments[{i}]"
        if not isinstance(exp, dict):
            raise PrefrecError(f"{where}: expected a mapping")
        check_section(source, f"experiments[{i}]", exp, hints)
        if exp.get("split") is not None:
            check_section(source, f"experiments[{i}].split", exp["split"],
                          dataclass_hints(SplitSettings))
        if "name" not in exp:
            raise PrefrecError(f"{where}: missing name")
        if "eval" not in exp and "split" not in exp:
            raise PrefrecError(f"{where}: needs eval (or split)")
        if exp["name"] in names:
            raise PrefrecError(f"{where}: duplicate experiment name {exp['name']!r}")
        names.add(exp["name"])
    for exp in config["experiments"]:
        for other in exp.get("cross_eval", []) or []:
            if other not in names:
                raise PrefrecError(
                    f"{path}: experiment {exp['name']!r} cross_eval names {other!r}, "
                    "which is not an experiment"
                )


def _build_parser() -> argparse.ArgumentParser:
    from prefrec.data.build import add_build_args

    parser = argparse.ArgumentParser(prog="build", exit_on_error=False, add_help=False)
    add_build_args(parser)
    return parser


def _check_build(build: Any, source: str) -> None:
    if not isinstance(build, dict):
        raise PrefrecError(f"{source}: build must be a mapping of `prefrec data build` options")
    allowed = {a.dest for a in _build_parser()._actions} - {"out"}
    check_keys("build", build, allowed, source)
    missing = [k for k in ("raw", "format", "protocol") if k not in build]
    if missing:
        raise PrefrecError(f"{source}: build needs {', '.join(missing)}")


def build_arguments(config: dict[str, Any]) -> argparse.Namespace:
    """The config's ``build`` section as parsed ``prefrec data build`` arguments (raw may
    be a dataset alias such as ``ml100k``; the output folder is ``<data_dir>``)."""
    from prefrec.data.resolve import resolve_dataset

    spec = dict(config["build"])
    spec["raw"] = str(resolve_dataset(str(spec["raw"])))
    spec["out"] = config["data_dir"]
    argv: list[str] = []
    for key, value in spec.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv += [flag] if value else []
        else:
            argv += [flag, str(value)]
    try:
        return _build_parser().parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as err:
        raise PrefrecError(f"build: {err}") from None


def _build(config: dict[str, Any]) -> None:
    """Build the data once; ``build_args.json`` (written last) marks a finished build."""
    from prefrec.data.build import build_files
    from prefrec.io import atomic_write_json

    args = build_arguments(config)
    marker = Path(args.out) / "build_args.json"
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == vars(args):
        log.info("%s already holds this build; nothing to do", args.out)
        return
    marker.unlink(missing_ok=True)
    paths, _ = build_files(args)
    log.info("built %d files in %s", len(paths), args.out)
    atomic_write_json(marker, vars(args))


def experiments(config: dict[str, Any]) -> list[Experiment]:
    """The config's experiments; a split experiment's data default to its split files."""
    out = []
    for exp in config["experiments"]:
        out.append(Experiment(
            name=exp["name"],
            eval=exp.get("eval", ""),
            sft=exp.get("sft"),
            preference=exp.get("preference"),
            audit=list(exp.get("audit") or []),
            baselines_train=list(exp.get("baselines_train") or []),
            split=exp.get("split"),
            cross_eval=list(exp.get("cross_eval") or []),
        ))
        if out[-1].split:
            _, train, test = split_paths(config, out[-1])
            out[-1].sft = out[-1].sft or str(train)
            out[-1].preference = out[-1].preference or str(train)
            out[-1].eval = out[-1].eval or str(test)
    return out


# --------------------------------------------------------------------------- stages


class StageLog:
    """Appends one row per stage to ``stages.jsonl`` and logs it; ``after_stage`` (e.g.
    publishing the run's record) is called when each stage has finished."""

    def __init__(self, path: Path, after_stage: Callable[[], Any] | None = None) -> None:
        self.path = path
        self.after_stage = after_stage

    def run(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, timed and logged as stage ``name``."""
        log.info("stage %s: start", name)
        started = time.perf_counter()
        result = fn(*args)
        seconds = time.perf_counter() - started
        with open(self.path, "a", encoding="utf-8") as fh:
            append_jsonl(fh, {"stage": name, "seconds": round(seconds, 2),
                              "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        log.info("stage %s: done in %.1f s", name, seconds)
        if self.after_stage is not None:
            self.after_stage()
        return result


def model_label(loss: str, k: int) -> str:
    return f"{loss}-k{k}"


def split_paths(config: dict[str, Any], exp: Experiment) -> tuple[Path, Path, Path]:
    """(source, train file, test file) of an experiment that splits one file by user."""
    from prefrec.data.resolve import resolve_dataset

    spec = exp.split or {}
    if "source" not in spec:
        raise PrefrecError(f"experiment {exp.name}: split needs source (a dataset)")
    source = resolve_dataset(spec["source"], data_dir=config["data_dir"])
    folder = Path(config["out"]) / exp.name / "data"
    return source, folder / f"{source.stem}-train.json", folder / f"{source.stem}-test.json"


def _split_files(config: dict[str, Any], exp: Experiment) -> None:
    """Write the experiment's train/test files: a seeded split by user (no user in both;
    chained sliding windows count as one user, see :mod:`prefrec.data.split`)."""
    from prefrec.data.split import split_file

    source, train_path, test_path = split_paths(config, exp)
    if train_path.is_file() and test_path.is_file():
        return
    spec = SplitSettings(**(exp.split or {}))
    written = split_file(source, train_path.parent, spec.eval_fraction, spec.seed,
                         spec.link_windows)
    for part, (path, n_examples, n_users) in written.items():
        log.info("%s: %d examples, %d users -> %s", part, n_examples, n_users, path)


def _audit(config: dict[str, Any], exp: Experiment, out: Path) -> None:
    """Audit the experiment's files, token lengths against the model's context included;
    error and warning findings are logged, so a truncation is stated before training."""
    from prefrec.data.audit import audit
    from prefrec.data.formats import load_examples
    from prefrec.data.lengths import model_limit
    from prefrec.data.resolve import resolve_dataset
    from prefrec.io import atomic_write_json

    target = out / exp.name / "audit.json"
    if target.is_file():
        return
    names = exp.audit or [x for x in (exp.sft, exp.preference_data(_first_k(config)), exp.eval)
                          if x]
    datasets = {}
    for name in dict.fromkeys(names):
        path = resolve_dataset(name, data_dir=config["data_dir"])
        datasets[path.name] = load_examples(path)
    report = audit(datasets, limit=model_limit(config["model"], config["template"]))
    for finding in report.findings:
        if finding.severity != "info":
            log.warning("audit %s: %s", finding.severity, finding.message)
    atomic_write_text(out / exp.name / "audit.md", report.to_markdown())
    atomic_write_json(target, report.to_dict())


def _first_k(config: dict[str, Any]) -> int:
    align = config["align"] or {}
    return int((align.get("negatives") or [3])[0])


def _eval(config: dict[str, Any], data: str, out: Path, adapter: Path | None) -> None:
    from prefrec.evaluate import run_eval

    ev = config["eval"]
    run_eval(
        data, out, model=config["model"], adapter=adapter, template=config["template"],
        data_dir=config["data_dir"], limit=ev["limit"], seed=ev["seed"], mode=ev["mode"],
        max_new_tokens=ev["max_new_tokens"], batch_size=ev["batch_size"],
        n_boot=ev["n_boot"], dtype=config["dtype"], device=config["device"],
        orders=ev["orders"],
    )


def evaluation_on_disk(config: dict[str, Any], data: str, folder: Path,
                       adapter: Path | None) -> bool:
    """Whether ``folder`` holds a finished evaluation of ``adapter`` on ``data`` with the
    config's eval settings, judged from its ``metrics.json`` alone, so it also answers for a
    restored record whose adapter is gone (:mod:`prefrec.record`)."""
    from prefrec.data.resolve import resolve_dataset
    from prefrec.evaluate import LEGACY_SETTINGS
    from prefrec.model import resolve_device, resolve_dtype

    path = folder / "metrics.json"
    if not path.is_file():
        return False
    try:
        settings = json.loads(path.read_text(encoding="utf-8")).get("settings") or {}
    except (json.JSONDecodeError, AttributeError):
        return False
    ev = config["eval"]
    modes = ["likelihood", "generate"] if ev["mode"] == "both" else [ev["mode"]]
    dtype = str(resolve_dtype(config["dtype"], resolve_device(config["device"])))
    wanted = {
        "data": str(resolve_dataset(data, data_dir=config["data_dir"])),
        "limit": ev["limit"], "seed": ev["seed"], "modes": modes,
        "orders": ev["orders"], "dtype": dtype.removeprefix("torch."),
    }
    if "generate" in modes:
        wanted["max_new_tokens"] = ev["max_new_tokens"]
    have = {**LEGACY_SETTINGS, **settings}
    tail = [] if adapter is None else [str(adapter)]
    return all(have.get(k) == v for k, v in wanted.items()) and \
        list(have.get("adapters") or [])[-1:] == tail


def _eval_mode_for(config: dict[str, Any], data: str) -> dict[str, Any]:
    """Pairwise data only has the likelihood mode, selection data only the given order."""
    from prefrec.data.formats import detect_format
    from prefrec.data.resolve import resolve_dataset

    path = resolve_dataset(data, data_dir=config["data_dir"])
    if detect_format(path) == "sdpo":
        return {**config, "eval": {**config["eval"], "orders": "given"}}
    return {**config, "eval": {**config["eval"], "mode": "likelihood"}}


def _sft(config: dict[str, Any], exp: Experiment, out: Path) -> Path:
    from prefrec.train.config import SFTConfig
    from prefrec.train.sft import train_sft

    cfg = SFTConfig(data=exp.sft, out=str(out / exp.name / "sft"), **config["sft"])
    return train_sft(cfg, config["model"], config["template"], dtype=config["dtype"],
                     device=config["device"], data_dir=config["data_dir"])


def _align(config: dict[str, Any], exp: Experiment, out: Path, sft: Path | None, loss: str,
           k: int) -> Path:
    from prefrec.train.align import train_align
    from prefrec.train.config import AlignConfig

    fields = {key: v for key, v in config["align"].items() if key not in ("losses", "negatives")}
    cfg = AlignConfig(
        data=exp.preference_data(k), out=str(out / exp.name / model_label(loss, k)),
        sft=None if sft is None else str(sft), loss=loss, negatives=k, **fields,
    )
    return train_align(cfg, config["model"], config["template"], dtype=config["dtype"],
                       device=config["device"], data_dir=config["data_dir"])


def model_aliases(config: dict[str, Any]) -> dict[str, str]:
    """Label -> label of the identical model the config trains first.

    At K = 1 DPO, DMPO and S-DPO are one objective (:data:`prefrec.losses.SAME_AT_ONE_NEGATIVE`)
    on the same data and seed, so only the first of them in ``align.losses`` is trained and
    evaluated; the others are reported as the same model.
    """
    from prefrec.losses import SAME_AT_ONE_NEGATIVE

    align = config["align"]
    if align in (None, False) or 1 not in align["negatives"]:
        return {}
    same = [loss for loss in align["losses"] if loss in SAME_AT_ONE_NEGATIVE]
    return {model_label(loss, 1): model_label(same[0], 1) for loss in same[1:]}


def trained_models(config: dict[str, Any], exp: Experiment, out: Path) -> dict[str, Path | None]:
    """Label -> adapter folder (None = the base model) of every model the config trains; an
    alias (:func:`model_aliases`) maps to the adapter of the model it is."""
    models: dict[str, Path | None] = {}
    if config["zero_shot"]:
        models["zero-shot"] = None
    if config["sft"] not in (None, False) and exp.sft:
        models["sft"] = out / exp.name / "sft" / "adapter"
    if config["align"] not in (None, False) and exp.preference:
        aliases = model_aliases(config)
        for k in config["align"]["negatives"]:
            for loss in config["align"]["losses"]:
                label = model_label(loss, k)
                models[label] = out / exp.name / aliases.get(label, label) / "adapter"
    return models


def restored_models(config: dict[str, Any], exp: Experiment, out: Path,
                    others: Sequence[Experiment] = ()) -> set[str]:
    """Labels of the trained models whose adapter is not on disk but whose every evaluation
    is (on ``exp``'s eval set and on each of ``others``'): models of a restored record
    (:mod:`prefrec.record`), with nothing left to train or score. SFT counts only when every
    preference model does too, since those that still train start from its adapter."""
    aliases = model_aliases(config)
    models = {label: adapter for label, adapter in trained_models(config, exp, out).items()
              if adapter is not None and label not in aliases}
    done = set()
    for label, adapter in models.items():
        if adapter.is_dir():
            continue
        folders = [(exp.eval, out / exp.name / "eval" / label)]
        folders += [(o.eval, out / exp.name / "cross" / o.name / label) for o in others]
        if all(evaluation_on_disk(_eval_mode_for(config, data), data, folder, adapter)
               for data, folder in folders):
            done.add(label)
    if "sft" in done and not set(models) <= done:
        done.discard("sft")
    return done


def run_experiment(config: dict[str, Any], exp: Experiment, out: Path, stages: StageLog,
                   others: Sequence[Experiment] = ()) -> None:
    """Every stage of one experiment; ``others``: the experiments its models are also
    evaluated on (``cross_eval``), which decide whether a restored model is complete."""
    restored = restored_models(config, exp, out, others)
    for label in sorted(restored):
        log.info("%s/%s: every evaluation is in the restored record and its adapter is not "
                 "on disk: not trained or scored again", exp.name, label)
    if exp.split:
        stages.run(f"{exp.name}/split", _split_files, config, exp)
    stages.run(f"{exp.name}/audit", _audit, config, exp, out)
    ev_config = _eval_mode_for(config, exp.eval)
    evals = out / exp.name / "eval"
    if config["zero_shot"]:
        stages.run(f"{exp.name}/eval/zero-shot", _eval, ev_config, exp.eval,
                   evals / "zero-shot", None)
    sft_adapter = None
    if config["sft"] not in (None, False) and exp.sft and "sft" in restored:
        sft_adapter = out / exp.name / "sft" / "adapter"
    elif config["sft"] not in (None, False) and exp.sft:
        if not (out / exp.name / "sft" / "adapter").is_dir() and \
                evaluation_on_disk(ev_config, exp.eval, evals / "sft",
                                   out / exp.name / "sft" / "adapter"):
            log.warning("%s/sft: trained again as the base of the models still to train; its "
                        "restored evaluation is kept (a retrain with other code or hardware can "
                        "differ slightly from the model it scored)", exp.name)
        sft_adapter = stages.run(f"{exp.name}/sft", _sft, config, exp, out)
        stages.run(f"{exp.name}/eval/sft", _eval, ev_config, exp.eval, evals / "sft",
                   sft_adapter)
    if config["align"] not in (None, False) and exp.preference:
        aliases = model_aliases(config)
        for k in config["align"]["negatives"]:
            for loss in config["align"]["losses"]:
                label = model_label(loss, k)
                if label in aliases:
                    log.info("%s is %s (the same loss at K=1): not trained again", label,
                             aliases[label])
                    continue
                if label in restored:
                    continue
                adapter = stages.run(f"{exp.name}/{label}", _align, config, exp, out,
                                     sft_adapter, loss, k)
                stages.run(f"{exp.name}/eval/{label}", _eval, ev_config, exp.eval,
                           evals / label, adapter)
    if config["baselines"] and config["baselines"].get("methods"):
        stages.run(f"{exp.name}/baselines", _baselines, config, exp, out)


def _baselines(config: dict[str, Any], exp: Experiment, out: Path) -> None:
    from prefrec.baselines.run import run_baselines
    from prefrec.data.resolve import resolve_dataset

    spec = config["baselines"]
    train = exp.baselines_train or [x for x in (exp.sft, exp.preference_data(_first_k(config)))
                                     if x]
    if not train:
        raise PrefrecError(f"experiment {exp.name}: baselines need training files")
    run_baselines(
        [resolve_dataset(t, data_dir=config["data_dir"]) for t in train],
        resolve_dataset(exp.eval, data_dir=config["data_dir"]),
        spec["methods"],
        out / exp.name / "baselines",
        config=spec.get("config"),
        seed=config["eval"]["seed"],
        limit=spec.get("limit", config["eval"]["limit"]),
        subset_seed=config["eval"]["seed"],  # the same eval subset as the models'
        n_boot=config["eval"]["n_boot"],
        data_dir=config["data_dir"],
    )


def run_cross(config: dict[str, Any], exps: list[Experiment], out: Path, stages: StageLog) -> None:
    """Evaluate each experiment's trained models on the eval sets named in cross_eval."""
    by_name = {e.name: e for e in exps}
    for exp in exps:
        for other_name in exp.cross_eval:
            other = by_name[other_name]
            ev_config = _eval_mode_for(config, other.eval)
            aliases = model_aliases(config)
            restored = restored_models(config, exp, out, [by_name[n] for n in exp.cross_eval])
            for label, adapter in trained_models(config, exp, out).items():
                if label == "zero-shot" or label in aliases:
                    continue  # the other experiment's zero-shot row / the same model's covers it
                if label in restored:
                    continue
                stages.run(f"{exp.name}/cross/{other_name}/{label}", _eval, ev_config,
                           other.eval, out / exp.name / "cross" / other.name / label, adapter)


def data_folders(config: dict[str, Any], exps: list[Experiment]) -> list[Path]:
    """Folders of data files the run builds or splits (left out of its record)."""
    out = Path(config["out"])
    folders = [out / exp.name / "data" for exp in exps]
    if config["build"] and config["data_dir"] is not None:
        folders.append(Path(config["data_dir"]))
    return [f for f in folders if f.resolve() != out.resolve()]


def publish(config: dict[str, Any], exps: list[Experiment], dest: Path) -> None:
    """Copy the run's record (:mod:`prefrec.record`) to ``dest``."""
    from prefrec.record import publish_record

    n = publish_record(Path(config["out"]), dest, data_folders(config, exps))
    log.info("published the run's record (%d files) to %s", n, dest)


def run(config: dict[str, Any], publish_to: Path | None = None) -> Path:
    """Execute every stage of ``config`` (skipping finished ones) and write the report.

    ``publish_to``: a folder that receives the run's record after every stage and, at the
    end, with the report (:func:`publish`)."""
    from prefrec.report import write_report

    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "config.yaml"
    text = yaml.safe_dump(config, sort_keys=False)
    if saved.is_file() and yaml.safe_load(saved.read_text(encoding="utf-8")) != config:
        log.warning("%s was written by another config; finished stages whose settings "
                    "changed will be refused, unchanged ones reused", saved)
    atomic_write_text(saved, text)
    exps = experiments(config)
    after = None if publish_to is None else (lambda: publish(config, exps, publish_to))
    stages = StageLog(out / "stages.jsonl", after)
    started = time.perf_counter()
    if config["build"]:
        stages.run("build", _build, config)
    by_name = {e.name: e for e in exps}
    for exp in exps:
        run_experiment(config, exp, out, stages, [by_name[n] for n in exp.cross_eval])
    run_cross(config, exps, out, stages)
    elapsed = time.perf_counter() - started
    report = write_report(out, config, exps, run_seconds=elapsed)
    if publish_to is not None:
        publish(config, exps, publish_to)
    log.info("run finished in %.1f s; report: %s", elapsed, report)
    return report


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config (YAML), e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override config values, e.g. eval.limit=100 align.losses=[dpo,dmpo]")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the report from finished stages without running anything")
    p.add_argument("--restore", metavar="DIR", default=None,
                   help="first copy a published record (--publish) into the run folder, "
                        "where files are missing: models whose evaluations are all in it "
                        "are neither trained nor scored again")
    p.add_argument("--publish", metavar="DIR", default=None,
                   help="after every stage, replace DIR with the run's record: evaluations "
                        "with their per-example scores, training logs, audits, stage times, "
                        "the report; no weights or data (a few MB, for committing)")


def run_command(args: argparse.Namespace) -> None:
    from prefrec.record import restore_record
    from prefrec.report import write_report

    config = load_config(args.config, args.overrides)
    started = time.perf_counter()
    if args.restore:
        restore_record(Path(args.restore), Path(config["out"]))
    publish_to = Path(args.publish) if args.publish else None
    if args.report_only:
        report = write_report(Path(config["out"]), config, experiments(config))
        if publish_to is not None:
            publish(config, experiments(config), publish_to)
    else:
        report = run(config, publish_to)
    print(f"report: {report} (also {report.with_suffix('.html').name}, results.json)")
    print(f"took {time.perf_counter() - started:.0f} s")


def stage_rows(out: Path) -> list[dict[str, Any]]:
    path = out / "stages.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
