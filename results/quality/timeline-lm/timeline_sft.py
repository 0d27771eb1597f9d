"""Hypothesis test (issue 19): does next-items language modelling on the training users'
liked timelines, mixed into pairwise SFT, teach the model collaborative signal?

SFT data = the study default's 1x pairs (1204) + for every training user, chunks of its
liked timeline: the 10 liked titles before a chunk as history, the next CHUNK liked titles
as the completion (" <Title:a>  <Title:b> ..."). Trains SFT as the study default (rank 16,
lr 2e-4, batch 8, 1 epoch, bf16) via prefrec.train.sft with sft_pairs extended.
"""
import sys
from pathlib import Path

import prefrec.train.sft as sft_mod
from prefrec.data import raw
from prefrec.data.formats import load_examples
from prefrec.data.prompts import DOMAINS, title_tag
from prefrec.data.protocols import DMPOConfig, _events_by_user, _latest_per_item, build_dmpo
from prefrec.train.config import SFTConfig

CHUNK, MAX_CHUNKS, HIST = int(sys.argv[2]), int(sys.argv[3]), 10
out = Path(sys.argv[1])
log = raw.read_movielens_100k("/work/shared/data/ml-100k")
cfg = DMPOConfig(max_interactions=None, n_sft_users=602, n_dpo_users=602, n_valid_users=100,
                 n_eval_users=200, pairs_per_user=2, groups_per_user=1, eval_pairs_per_user=6,
                 max_history=10, seed=0)
data = build_dmpo(log, cfg)
sft_file = "/work/snap/runs/quality-study/data/ml100k_sft_ranking.json"
shipped = load_examples(sft_file)
assert [e.prompt for e in data.sft] == [e.prompt for e in shipped], "not the study's build"
train_users = sorted({e.user for e in data.sft})
held_out = {e.user for e in data.valid} | {e.user for e in data.eval}
assert not set(train_users) & held_out
by_user = _events_by_user(log.events)
d = DOMAINS["movie"]
rows = []
for user in train_users:
    pos = [e.item for e in _latest_per_item(by_user[user]) if e.rating > cfg.positive_threshold]
    starts = list(range(HIST, len(pos), CHUNK))[:MAX_CHUNKS]
    for s in starts:
        hist = "".join(f" {title_tag(log.title(i))} " for i in pos[s - HIST:s])
        instr = (f"You are an assistant working on {d.name} recommendations. "
                 f"Here is the user's history of {d.items} they have {d.did}: {hist}. "
                 f"List the {d.items} the user will enjoy {d.doing} next, in order.")
        comp = "".join(f" {title_tag(log.title(i))} " for i in pos[s:s + CHUNK])
        rows.append((instr, comp))
print(f"{len(rows)} timeline rows from {len(train_users)} users", flush=True)
original = sft_mod.sft_pairs
MODE = sys.argv[4] if len(sys.argv) > 4 else 'mix'  # only | mix | pairs
extra = {'only': rows, 'mix': rows, 'pairs': []}[MODE]
sft_mod.sft_pairs = lambda examples: ([] if MODE == 'only' else original(examples)) + extra
# One pair per row, every pair (the rows are not examples, so pack by position).
sft_mod.user_packed_units = lambda examples, pairs, size: [{"pairs": [p]} for p in pairs]
scfg = SFTConfig(data=sft_file, out=str(out), epochs=1, batch_size=8, lr=2e-4, lora_r=16,
                 lora_alpha=32, seed=42)
sft_mod.train_sft(scfg, "smollm2-135m", "alpaca", dtype="bfloat16", device="cpu")
