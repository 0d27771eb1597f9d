"""User-packed training: fixed-history training data, and losses that equal the unpacked ones.

A training user's SFT pairs and preference groups that share one history are scored in one
packed row (history once, every completion after it under the block attention mask). The
losses must stay per pair / per group and equal the unpacked computation, values and
gradients, to 1e-4.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import Trainer, TrainingArguments

from prefrec.data.dmpo import write_dmpo
from prefrec.data.protocols import DMPOConfig, build_dmpo
from prefrec.data.schema import group_pairs_by_user
from prefrec.model import LoraSettings, attach_lora
from prefrec.train.align import (
    AlignTrainer,
    GroupDataset,
    build_groups,
    collate_groups,
    train_align,
)
from prefrec.train.common import pack_units
from prefrec.train.config import AlignConfig, SFTConfig
from prefrec.train.sft import (
    PackedSFTTrainer,
    collate_packed_sft,
    collate_sft,
    sft_features,
    sft_pairs,
    train_sft,
    user_packed_units,
)
from test_protocols import make_log, user_events

pytestmark = pytest.mark.usefixtures("single_thread")

TEMPLATE = "alpaca"
FIXED = DMPOConfig(n_sft_users=3, n_dpo_users=3, n_valid_users=1, n_eval_users=1,
                   max_negatives=3, min_negatives=3, pairs_per_user=6, groups_per_user=3,
                   eval_pairs_per_user=2, max_history=4, train_history=3)


@pytest.fixture(scope="module")
def fixed_data():
    events = [e for u in "abcde" for e in user_events(u, 8, 6)]
    # Titles of different token lengths: a per-sequence mean would then differ from the
    # token mean the trainers take.
    titles = {e.item: f"Title {e.item}" + " Returns" * (sum(map(ord, e.item)) % 4)
              for e in events}
    log = make_log(events, titles)
    return build_dmpo(log, FIXED), build_dmpo(log, dataclasses.replace(FIXED, train_history=None))


# --------------------------------------------------------------------------- data


def test_train_history_gives_each_training_user_one_history(fixed_data):
    data, _ = fixed_data
    assert len(data.sft) == 3 * 6 and len(data.dpo[3]) == 3 * 3 * 3
    by_user: dict[str, set] = {}
    for ex in [*data.sft, *data.dpo[3]]:
        by_user.setdefault(ex.user, set()).add(ex.history)
    assert len(by_user) == 3
    for histories in by_user.values():
        [history] = histories  # one history per training user, SFT and DPO alike
        assert len(history) == 3
        owner = history[0].removeprefix("Title ").split("-")[0]
        first_liked = tuple(f"Title {owner}-p{i}" for i in range(3))
        assert tuple(t.split(" Returns")[0] for t in history) == first_liked
    # Targets come after the history, never from it.
    for ex in [*data.sft, *data.dpo[3]]:
        assert ex.positive_title not in ex.history
        assert int(ex.positive_title.split(" Returns")[0].rsplit("-p", 1)[1]) >= 3


def test_train_history_leaves_valid_and_eval_users_alone(fixed_data):
    data, per_target = fixed_data
    assert data.valid == per_target.valid and data.eval == per_target.eval
    assert {len(ex.history) for ex in data.eval} <= {1, 2, 3, 4}  # the max_history cap


def test_fixed_history_groups_regroup_by_target_not_by_history(fixed_data):
    """All of a fixed-history user's groups share the history (the readers' user key), so
    regrouping must key on the target too, or the three groups would merge into one."""
    data, _ = fixed_data
    groups = group_pairs_by_user(data.dpo[3])
    assert len(groups) == 9 and {g.k for g in groups} == {3}
    for g in groups:
        target = g.chosen.split(",")[0].strip()  # the chosen completion lists the target first
        assert all(r.split(",")[1].strip() == target for r in g.rejected)


def test_train_history_keeps_short_users_usable():
    """A user with no more liked items than H keeps all but the last as the history."""
    log = make_log(user_events("u", 5, 5))
    data = build_dmpo(log, DMPOConfig(n_sft_users=1, n_dpo_users=1, n_eval_users=0,
                                      pairs_per_user="all", train_history=10))
    assert {ex.history for ex in data.sft} == {tuple(f"Title u-p{i}" for i in range(4))}
    assert {ex.positive_title for ex in data.sft} == {"Title u-p4"}
    with pytest.raises(ValueError, match="train_history"):
        DMPOConfig(train_history=0)


def _liked_index(title: str) -> int:
    return int(title.split(" Returns")[0].rsplit("-p", 1)[1])


def test_train_block_gives_each_block_the_liked_items_just_before_it():
    """train_block B: a target's history is the H liked items before its block of B, and
    the pairs come B per history (so they still pack); valid / eval users unchanged."""
    events = [e for u in "abcde" for e in user_events(u, 8, 6)]
    log = make_log(events)
    blocks = build_dmpo(log, dataclasses.replace(FIXED, train_block=2))
    per_target = build_dmpo(log, dataclasses.replace(FIXED, train_history=None))
    for ex in [*blocks.sft, *blocks.dpo[3]]:
        i = _liked_index(ex.positive_title)
        start = 3 + (i - 3) // 2 * 2  # blocks of 2 targets after the first 3 liked items
        owner = ex.history[0].removeprefix("Title ").split("-")[0]
        assert ex.history == tuple(f"Title {owner}-p{j}" for j in range(start - 3, start))
    pairs_per_history: dict[tuple, int] = {}
    for ex in blocks.sft:
        pairs_per_history[(ex.user, ex.history)] = pairs_per_history.get((ex.user, ex.history), 0) + 1
    # 6 pairs of a user from blocks of >= 6 (target, negative) combinations: 3 histories of 2.
    assert len(blocks.sft) == 18 and sorted(pairs_per_history.values()) == [2] * 9
    assert len(blocks.dpo[3]) == 3 * 3 * 3
    assert blocks.valid == per_target.valid and blocks.eval == per_target.eval
    with pytest.raises(ValueError, match="train_block"):
        DMPOConfig(train_block=4)


def test_blocks_of_one_give_per_target_histories_with_several_pairs_each():
    """train_block 1 + pairs_per_history P: every SFT pair's history is the H liked items
    just before its own target (the eval protocol's), and a target's P pairs (P different
    negatives) share that history, so they pack into one row."""
    events = [e for u in "abcde" for e in user_events(u, 8, 6)]
    log = make_log(events)
    data = build_dmpo(log, dataclasses.replace(FIXED, train_block=1, pairs_per_history=3))
    per_history: dict[tuple, list] = {}
    for ex in data.sft:
        i = _liked_index(ex.positive_title)
        owner = ex.history[0].removeprefix("Title ").split("-")[0]
        assert ex.history == tuple(f"Title {owner}-p{j}" for j in range(i - 3, i))
        per_history.setdefault((ex.user, ex.history), []).append(ex.negative_title)
    # 6 pairs per user, 3 per target: 2 targets per user, each with 3 distinct negatives.
    assert len(data.sft) == 18
    assert [len(set(n)) for n in per_history.values()] == [3] * 6
    with pytest.raises(ValueError, match="pairs_per_history"):
        DMPOConfig(train_history=3, pairs_per_history=2)


def test_pack_units_chunks_each_users_items_in_first_appearance_order():
    assert pack_units(["a", "b", "a", "a", "b", "c"], 2) == [[0, 2], [3], [1, 4], [5]]
    assert pack_units(["a", "a"], 16) == [[0, 1]]
    with pytest.raises(ValueError):
        pack_units(["a"], 0)


# --------------------------------------------------------------------------- equivalence


def _args(tmp_path) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                             remove_unused_columns=False, label_names=[])


def _lora_model(tiny_llama):
    model, tokenizer = tiny_llama
    torch.manual_seed(3)
    peft_model = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-zero B, so the LoRA A matrices get gradients too
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return peft_model.train(), tokenizer


def _loss_and_grads(trainer, model, inputs):
    model.zero_grad()
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-4, atol=1e-4)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("pack_size", "row_sizes"), [(4, [4, 2, 4]), (1, [1] * 10)])
def test_packed_sft_loss_and_gradients_equal_the_unpacked_trainer(
    fixed_data, tiny_llama, tmp_path, pack_size, row_sizes
):
    """Packed rows, and one pair per row (the path unpacked SFT takes), give the loss and
    gradients of Trainer's causal-LM loss on the same pairs."""
    data, _ = fixed_data
    examples = data.sft[:10]  # two users: 6 + 4 pairs
    model, tokenizer = _lora_model(tiny_llama)
    pairs = sft_pairs(examples)
    plain = Trainer(model=model, args=_args(tmp_path / "plain"))
    feats = sft_features(tokenizer, pairs, TEMPLATE, max_length=1024)
    unpacked = _loss_and_grads(plain, model, collate_sft(feats, tokenizer.pad_token_id))

    packed_trainer = PackedSFTTrainer(model=model, args=_args(tmp_path / "packed"),
                                      processing_class=tokenizer, template=TEMPLATE,
                                      max_length=1024)
    units = user_packed_units(examples, pairs, pack_size=pack_size)
    assert [len(u["pairs"]) for u in units] == row_sizes
    batch = collate_packed_sft(units)
    assert batch["rows"] == [row for row, size in enumerate(row_sizes) for _ in range(size)]
    _assert_same(_loss_and_grads(packed_trainer, model, batch), unpacked)


def test_packed_align_loss_and_gradients_equal_one_row_per_group(
    fixed_data, tiny_llama, tmp_path
):
    data, _ = fixed_data
    examples = data.dpo[3][: 2 * 3 * 3]  # two users, 3 groups of K=3 each
    n, make_group, keys = build_groups(examples, None, seed=0, resample=False)
    assert n == 6
    gen = torch.Generator().manual_seed(9)
    ref = {key: (float(torch.randn(1, generator=gen)) * 3 - 20, 5) for key in keys}
    model, tokenizer = _lora_model(tiny_llama)
    cfg = AlignConfig(data="-", out="-", loss="sdpo", beta=0.5, ftx=1.0)
    trainer = AlignTrainer(model=model, args=_args(tmp_path), processing_class=tokenizer,
                           align=cfg, template=TEMPLATE)

    def batch(units):
        dataset = GroupDataset(n, make_group, units)
        return collate_groups([dataset[i] for i in range(len(dataset))], ref)

    users = [make_group(i, 0).user for i in range(n)]
    packed_units = pack_units(users, 3)
    assert packed_units == [[0, 1, 2], [3, 4, 5]]
    packed = batch(packed_units)
    assert packed["rows"] == [0, 0, 0, 1, 1, 1]
    for name in ("dpo", "dmpo", "sdpo"):
        trainer.align = dataclasses.replace(cfg, loss=name)
        _assert_same(_loss_and_grads(trainer, model, packed),
                     _loss_and_grads(trainer, model, batch(None)))


# --------------------------------------------------------------------------- the stages


def test_both_stages_train_user_packed_end_to_end(fixed_data, tiny_dir, tmp_path, monkeypatch):
    """--pack-by-user through train_sft and train_align: one packed row per user, the
    adapters are written and the logs count the rows, not the examples."""
    monkeypatch.setenv("PREFREC_CACHE", str(tmp_path / "cache"))
    data, _ = fixed_data
    write_dmpo(data.sft, tmp_path / "sft.json")
    write_dmpo(data.dpo[3], tmp_path / "dpo3.json")
    sft = SFTConfig(data=str(tmp_path / "sft.json"), out=str(tmp_path / "sft"), epochs=1,
                    batch_size=1, pack_by_user=True, pack_size=16, save_steps=1000)
    adapter = train_sft(sft, str(tiny_dir), TEMPLATE, dtype="float32", device="cpu")
    steps = [json.loads(line) for line in (tmp_path / "sft" / "log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in steps) == 3  # 3 users -> 3 packed rows -> 3 steps of 1 row
    align = AlignConfig(data=str(tmp_path / "dpo3.json"), out=str(tmp_path / "dmpo"),
                        sft=str(adapter), batch_size=1, pack_by_user=True, pack_size=2,
                        save_steps=1000)
    final = train_align(align, str(tiny_dir), TEMPLATE, dtype="float32", device="cpu")
    assert (final / "adapter_model.safetensors").is_file()
    rows = [json.loads(line) for line in (tmp_path / "dmpo" / "log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 6  # 3 users x 3 groups in rows of <= 2 -> 6 rows
