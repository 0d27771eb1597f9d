"""Does a model with collaborative item tokens use them? Score it with its item table shuffled.

Evaluates an adapter chain whose newest stage saved an item projector
(``sft.item_embeddings=bpr|sasrec|itemknn``) once more with the rows of the projector's
collaborative vector table permuted (seeded), so every title gets another item's vector,
and compares the calls with the model's own evaluation folder of the same data: paired
accuracy difference, bootstrap and McNemar p, and the share of calls that changed. A model
that ignores its item tokens changes few calls and loses nothing.

    python scripts/item_token_ablation.py --adapter SFT_ADAPTER [DMPO_ADAPTER] \\
        --data VALID.json --reference EVAL_FOLDER --out FOLDER [--limit 200]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from prefrec.data.formats import load_examples
from prefrec.evaluate import EvalSettings, evaluate
from prefrec.io import atomic_write_json
from prefrec.item_tokens import item_projector_of
from prefrec.model import load_for_scoring
from prefrec.report import compare

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decision_agreement import agreement, decisions  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", nargs="+", required=True, help="the adapter chain, oldest first")
    p.add_argument("--data", required=True, help="pairwise eval file")
    p.add_argument("--reference", type=Path, required=True,
                   help="the same model's evaluation folder of --data (scores.jsonl)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--limit", type=int, default=None, help="score a seeded subset")
    p.add_argument("--seed", type=int, default=0, help="subset, bootstrap and permutation seed")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--orders", default="both", choices=("given", "both"))
    args = p.parse_args(argv)

    if not (args.reference / "metrics.json").is_file():
        raise SystemExit(f"{args.reference}: no metrics.json (has that evaluation finished?)")
    model, tokenizer = load_for_scoring(args.model, args.adapter, dtype=args.dtype)
    projector = item_projector_of(model)
    if projector is None:
        raise SystemExit(f"{args.adapter[-1]}: no item projector in this adapter chain")
    gen = torch.Generator().manual_seed(args.seed)
    projector.vectors.copy_(projector.vectors[torch.randperm(len(projector.keys), generator=gen)])
    examples = load_examples(Path(args.data))
    settings = EvalSettings(
        data=str(args.data), model=args.model, adapters=[*args.adapter, "item table shuffled"],
        template="alpaca", limit=args.limit, seed=args.seed, n_examples=len(examples),
        task="pairwise", modes=["likelihood"], max_new_tokens=32, dtype=args.dtype,
        orders=args.orders)
    evaluate(model, tokenizer, examples, args.out, settings, n_boot=1000)
    result = compare(args.out, args.reference, "pairwise", 1000, args.seed)
    same, n = agreement(decisions(args.out), decisions(args.reference))
    result.update({"shuffled": str(args.out), "trained": str(args.reference),
                   "agreement": same, "n_agreement": n})
    atomic_write_json(args.out / "ablation.json", result)
    print(f"shuffled item table {result['a']:.3f} vs trained {result['b']:.3f} on {result['n']} "
          f"pairs (delta {result['delta']:+.3f}, paired bootstrap p {result['p_bootstrap']:.3g}, "
          f"McNemar p {result['p_mcnemar']:.3g}); same call on {same:.3f} of {n} pairs")


if __name__ == "__main__":
    main()
