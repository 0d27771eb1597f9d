"""The ``prefrec`` command line: thin argument parsing over the library.

Every subcommand imports what it needs lazily so that ``prefrec --help`` is instant.
User errors (:class:`prefrec.errors.PrefrecError`) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from prefrec import __version__
from prefrec.errors import PrefrecError

log = logging.getLogger("prefrec")


# --------------------------------------------------------------------------- data


def _cmd_data_build(args: argparse.Namespace) -> None:
    from prefrec.data.build import build_command

    build_command(args)


def _cmd_data_audit(args: argparse.Namespace) -> None:
    from prefrec.data.audit import audit
    from prefrec.data.formats import load_examples
    from prefrec.data.resolve import resolve_dataset
    from prefrec.io import atomic_write_json, atomic_write_text

    datasets = {}
    for name in args.files:
        path = resolve_dataset(name, data_dir=args.data_dir)
        datasets[path.name] = load_examples(path)
    limit = None
    if args.model:
        from prefrec.data.lengths import model_limit

        limit = model_limit(args.model, args.template, args.max_length)
    elif args.max_length is not None:
        raise PrefrecError("--max-length needs --model (its tokenizer counts the tokens)")
    report = audit(datasets, limit=limit)
    print(report.to_markdown())
    if args.json:
        atomic_write_json(args.json, report.to_dict())
    if args.markdown:
        atomic_write_text(args.markdown, report.to_markdown())


def _cmd_data_convert(args: argparse.Namespace) -> None:
    from prefrec.data.formats import load_examples, save_examples
    from prefrec.data.resolve import resolve_dataset

    path = resolve_dataset(args.input, data_dir=args.data_dir)
    examples = load_examples(path)
    if args.normalize_titles:
        from prefrec.data.dmpo import require_pairwise, with_normalized_titles

        fixed = []
        for i, ex in enumerate(require_pairwise(examples, path, "--normalize-titles")):
            try:
                fixed.append(with_normalized_titles(ex))
            except ValueError as err:
                raise PrefrecError(f"{path}: record {i}: instruction: {err}") from None
        examples = fixed
    save_examples(examples, args.output, args.to)
    print(f"wrote {args.output} ({args.to})")


# --------------------------------------------------------------------------- model


def _cmd_model_info(args: argparse.Namespace) -> None:
    from prefrec.model import model_info

    info = model_info(args.name)
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")


# --------------------------------------------------------------------------- eval / train


def _cmd_eval(args: argparse.Namespace) -> None:
    from prefrec.evaluate import eval_command

    eval_command(args)


def _cmd_summarize(args: argparse.Namespace) -> None:
    from prefrec.evaluate import summarize_command

    summarize_command(args)


def _cmd_sft(args: argparse.Namespace) -> None:
    from prefrec.train.sft import sft_command

    sft_command(args)


def _cmd_align(args: argparse.Namespace) -> None:
    from prefrec.train.align import align_command

    align_command(args)


def _cmd_rank(args: argparse.Namespace) -> None:
    from prefrec.recommender import rank_command

    rank_command(args)


def _cmd_explain(args: argparse.Namespace) -> None:
    from prefrec.explain import explain_command

    explain_command(args)


def _cmd_serve(args: argparse.Namespace) -> None:
    from prefrec.serve import serve_command

    serve_command(args)


def _cmd_baselines(args: argparse.Namespace) -> None:
    from prefrec.baselines.run import baselines_command

    baselines_command(args)


def _cmd_data_split(args: argparse.Namespace) -> None:
    from prefrec.data.split import split_command

    split_command(args)


def _cmd_study(args: argparse.Namespace) -> None:
    from prefrec.study import study_command

    study_command(args)


def _cmd_run(args: argparse.Namespace) -> None:
    from prefrec.runner import run_command

    run_command(args)


# --------------------------------------------------------------------------- parser


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="embedded model name (smollm2-135m, gemma3-270m), Hugging Face id or local dir "
        "(default: %(default)s)",
    )
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: auto)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: auto)")
    p.add_argument(
        "--template",
        default="alpaca",
        choices=["alpaca", "chat", "plain"],
        help="how the instruction is wrapped for the model (default: %(default)s)",
    )


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        default=None,
        help="where named datasets live (default: $PREFREC_DATA, then ../shared/data)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefrec",
        description="Fine-tune a causal LM into a personalised recommender "
        "(SFT, then DPO / DMPO / S-DPO) and evaluate it.",
    )
    parser.add_argument("--version", action="version", version=f"prefrec {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # data
    data = sub.add_parser("data", help="build, audit and convert datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    b = data_sub.add_parser(
        "build", help="raw interactions -> few-shot datasets (DMPO or S-DPO protocol)"
    )
    from prefrec.data.build import add_build_args

    add_build_args(b)
    b.set_defaults(func=_cmd_data_build)

    a = data_sub.add_parser("audit", help="counts, balance, leaks, duplicates, title drift")
    a.add_argument("files", nargs="+", help="dataset files or names (e.g. ml1m-eval)")
    a.add_argument("--json", default=None, help="also write the report as JSON here")
    a.add_argument("--markdown", default=None, help="also write the report as markdown here")
    a.add_argument("--model", default=None,
                   help="count tokens with this model's tokenizer and flag records longer than "
                   "its context (or --max-length): embedded name, hub id or local dir")
    a.add_argument("--template", default="alpaca", choices=["alpaca", "chat", "plain"],
                   help="prompt template the tokens are counted with (default: %(default)s)")
    a.add_argument("--max-length", type=int, default=None,
                   help="flag records longer than this many tokens (e.g. training's "
                   "--max-length; default: the model's context)")
    _add_data_dir(a)
    a.set_defaults(func=_cmd_data_audit)

    c = data_sub.add_parser("convert", help="write a dataset in another format")
    c.add_argument("input", help="dataset file or name")
    c.add_argument("--to", required=True, choices=["dmpo", "sdpo", "trl"], help="output format")
    c.add_argument("--output", "-o", required=True, help="output file")
    c.add_argument("--normalize-titles", action="store_true",
                   help="DMPO data: normalise every title (removes the ML-1M train/eval year "
                        "drift; prefrec.data.titles.normalize_title)")
    _add_data_dir(c)
    c.set_defaults(func=_cmd_data_convert)

    from prefrec.data.split import add_split_args

    sp = data_sub.add_parser("split", help="seeded train/test split by user (no user in both)")
    add_split_args(sp)
    sp.set_defaults(func=_cmd_data_split)

    # model
    model = sub.add_parser("model", help="inspect models")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    mi = model_sub.add_parser("info", help="parameters, dtype, vocab size and load time")
    mi.add_argument("name", nargs="?", default="smollm2-135m", help="model (default: %(default)s)")
    mi.set_defaults(func=_cmd_model_info)

    # eval
    from prefrec.evaluate import add_eval_args

    e = sub.add_parser("eval", help="score a dataset and write metrics.json + metrics.md")
    _add_model_args(e)
    _add_data_dir(e)
    add_eval_args(e)
    e.set_defaults(func=_cmd_eval)

    sm = sub.add_parser("summarize", help="one markdown table from several eval folders")
    sm.add_argument("dirs", nargs="+", help="eval output folders (with metrics.json)")
    sm.add_argument("--metrics", default=None, help="comma list of metrics (default: all)")
    sm.add_argument("--output", "-o", default=None, help="also write the table here")
    sm.set_defaults(func=_cmd_summarize)

    # training
    from prefrec.train.config import add_align_args, add_sft_args

    s = sub.add_parser("sft", help="LoRA supervised fine-tuning on the preferred completions")
    _add_model_args(s)
    _add_data_dir(s)
    add_sft_args(s)
    s.set_defaults(func=_cmd_sft)

    al = sub.add_parser("align", help="preference optimisation (dpo, dmpo, sdpo) on top of SFT")
    _add_model_args(al)
    _add_data_dir(al)
    add_align_args(al)
    al.set_defaults(func=_cmd_align)

    # using a trained model (these add their own model flags: the adapter's template wins)
    from prefrec.explain import add_explain_args
    from prefrec.recommender import add_rank_args
    from prefrec.serve import add_serve_args

    rk = sub.add_parser("rank", help="rank candidates for a history with a trained model")
    add_rank_args(rk)
    rk.set_defaults(func=_cmd_rank)
    ex = sub.add_parser("explain", help="per-token log-probs of each candidate (+ vs reference)")
    add_explain_args(ex)
    ex.set_defaults(func=_cmd_explain)
    sv = sub.add_parser("serve", help="HTTP service: POST /rank, GET /health, /docs")
    add_serve_args(sv)
    sv.set_defaults(func=_cmd_serve)

    # classical recommenders
    from prefrec.baselines.run import add_baselines_args

    bl = sub.add_parser("baselines", help="popularity, item-kNN, BPR-MF, content, SASRec "
                        "on the same eval examples and metrics")
    add_baselines_args(bl)
    bl.set_defaults(func=_cmd_baselines)

    # experiments
    from prefrec.runner import add_run_args

    r = sub.add_parser("run", help="run a whole study from a config (stages resume) + report")
    add_run_args(r)
    r.set_defaults(func=_cmd_run)

    from prefrec.study import add_study_args

    st = sub.add_parser("study", help="run a config under several settings variants and "
                        "tabulate their validation metrics")
    add_study_args(st)
    st.set_defaults(func=_cmd_study)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        args.func(args)
    except PrefrecError as err:
        print(f"prefrec: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prefrec: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
