"""How much of item-kNN's ranking its spectral item vectors keep (``--item-embeddings
itemknn``): a linear probe with no training, for a pairwise (DMPO) eval file.

Item-kNN is fitted on ``--train`` (default settings, as the item tokens fit it); each eval
pair's candidates are scored by

    exact:   mean_{h in H} sim(c, h)        (item-kNN itself)
    d dims:  v_c . mean_{h in H} v_h         (v: spectral_item_vectors(sim, d))
    count:   number of training users holding c (popularity)
    liked share: (times c was a training pair's liked title + 1) /
             (times liked + times disliked + 2), what item-kNN never sees

and the pairwise accuracy (ties count half) is printed per scorer as one JSON line. If
the d-dimensional probe keeps item-kNN's accuracy, the vectors the LLM reads carry what
item-kNN knows, in a form one dot product recovers.

    python scripts/itemknn_vector_probe.py --train runs/hy/data/ml100k_sft_ranking.json \\
        --eval runs/hy/data/ml100k_eval_ranking.json [--dims 16 64 256]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

from prefrec.baselines.itemknn import ItemKNN, spectral_item_vectors
from prefrec.baselines.items import baskets_from_examples, item_titles, query_from_example
from prefrec.data.dmpo import read_dmpo
from prefrec.data.titles import item_key
from prefrec.metrics import pairwise_accuracy


def pair_accuracy(scores: list[list[float]], positives: list[int]) -> float:
    """:func:`prefrec.metrics.pairwise_accuracy` of the liked candidate's score against
    the other's (a tie counts half)."""
    return pairwise_accuracy([s[p] for s, p in zip(scores, positives, strict=True)],
                             [s[1 - p] for s, p in zip(scores, positives, strict=True)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True, help="training DMPO file (the SFT file)")
    parser.add_argument("--eval", required=True, help="pairwise eval DMPO file")
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 64, 256])
    args = parser.parse_args()

    train = read_dmpo(args.train)
    knn = ItemKNN()
    knn.fit(baskets_from_examples(train), item_titles(train))
    examples = read_dmpo(args.eval)
    queries = [query_from_example(ex) for ex in examples]
    positives = [ex.positive for ex in examples]
    rows = [[knn.index.get(c) for c in q.candidates] for q in queries]
    histories = [[i for i in map(knn.index.get, q.history) if i is not None] for q in queries]

    result = {"eval": args.eval, "n": len(examples),
              "exact": pair_accuracy([list(s) for s in knn.score(queries)], positives)}
    for dim in args.dims:
        vectors = spectral_item_vectors(knn.sim, dim)
        scores = [[0.0 if i is None or not h else float(vectors[i] @ vectors[h].mean(0))
                   for i in row] for row, h in zip(rows, histories, strict=True)]
        result[f"dims_{dim}"] = pair_accuracy(scores, positives)
    counts = [[0.0 if i is None else float(knn.counts[i]) for i in row] for row in rows]
    result["count"] = pair_accuracy(counts, positives)
    liked = Counter(item_key(ex.candidates[ex.positive]) for ex in train)
    disliked = Counter(item_key(ex.candidates[1 - ex.positive]) for ex in train)
    shares = [[(liked[c] + 1) / (liked[c] + disliked[c] + 2) for c in q.candidates]
              for q in queries]
    result["liked_share"] = pair_accuracy(shares, positives)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
