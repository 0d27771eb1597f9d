"""Training stages: SFT and the preference stage (DPO / DMPO / S-DPO) on transformers.Trainer.

Everything runs on the tiny random Llama of ``conftest.py`` saved as a local checkpoint,
except the ``embedded`` test, which runs the real SmolLM2-135M for two steps per stage.

Torch runs single-threaded here: on the shared 2-core machine, two OpenMP threads per
process fighting other processes for the cores made a tiny-model step ~30x slower
(barrier waits on a descheduled thread), and these models gain nothing from two threads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import random_lora_adapter
from prefrec.cli import main as cli_main
from prefrec.data.formats import load_examples
from prefrec.data.prompts import model_input
from prefrec.data.resolve import resolve_dataset
from prefrec.data.schema import group_pairs_by_user
from prefrec.errors import PrefrecError
from prefrec.model import LoraSettings, attach_lora, load, load_for_scoring
from prefrec.scoring import score_completions
from prefrec.train.align import build_groups, limit_examples, train_align
from prefrec.train.common import checkpoint_state_is_complete
from prefrec.train.config import AlignConfig, SFTConfig
from prefrec.train.sft import IGNORE_INDEX, collate_sft, sft_features, sft_pairs, train_sft

LASTFM = "sdpo-lastfm/lastfm-val.json"
TEMPLATE = "alpaca"


pytestmark = pytest.mark.usefixtures("single_thread")


def _perturbed_sft_adapter(model_dir: Path, folder: Path, seed: int = 1) -> Path:
    """An SFT adapter whose B matrices are random, so base + it differs clearly from the base."""
    return random_lora_adapter(load(str(model_dir))[0], folder, str(model_dir), [], TEMPLATE,
                               seed, scale=0.1, stage="sft")


@pytest.fixture(scope="module")
def sft_adapter(tiny_dir, tmp_path_factory) -> Path:
    return _perturbed_sft_adapter(tiny_dir, tmp_path_factory.mktemp("sft") / "adapter")


def _log_rows(out: Path) -> list[dict]:
    """Per-step rows of log.jsonl (the final summary row carries train_runtime instead)."""
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def _examples(shared_data: Path, name: str):
    return load_examples(resolve_dataset(name, data_dir=str(shared_data)))


# --------------------------------------------------------------------------- SFT: labels


def test_sft_features_mask_the_prompt_and_learn_completion_plus_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    pairs = [("Here is the user's history <Title:Heat (1995)>", " <Title:Toy Story (1995)> ")]
    [feat] = sft_features(tok, pairs, TEMPLATE, max_length=1024)
    prompt_ids = tok(model_input(pairs[0][0], TEMPLATE))["input_ids"]
    completion_ids = tok(pairs[0][1], add_special_tokens=False)["input_ids"]
    assert feat["input_ids"] == prompt_ids + completion_ids + [tok.eos_token_id]
    assert feat["labels"] == (
        [IGNORE_INDEX] * len(prompt_ids) + completion_ids + [tok.eos_token_id]
    )

    # Truncation drops prompt tokens from the start; the completion and EOS stay learned.
    width = len(completion_ids) + 1 + 5
    [short] = sft_features(tok, pairs, TEMPLATE, max_length=width)
    assert short["input_ids"] == prompt_ids[-5:] + completion_ids + [tok.eos_token_id]
    assert short["labels"] == [IGNORE_INDEX] * 5 + completion_ids + [tok.eos_token_id]


def test_collate_sft_keeps_the_eos_label_when_pad_equals_eos(tiny_tokenizer):
    """SmolLM2 pads with its EOS id: masks must come from lengths, never from pad ids."""
    eos = tiny_tokenizer.eos_token_id
    long = {"input_ids": [5, 6, 7, 8, eos], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8, eos]}
    short = {"input_ids": [5, 9, eos], "labels": [IGNORE_INDEX, 9, eos]}
    batch = collate_sft([long, short], pad_id=eos)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, eos], [5, 9, eos, eos, eos]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, IGNORE_INDEX, 7, 8, eos],
        [IGNORE_INDEX, 9, eos, IGNORE_INDEX, IGNORE_INDEX],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


# --------------------------------------------------------------------------- SFT: a run


@pytest.fixture(scope="module")
def sft_run(tiny_dir, tmp_path_factory):
    """Train SFT on 4 examples (16 epochs, high lr) and capture the model the Trainer used,
    with a copy of its LoRA weights right after they were created."""
    import prefrec.model

    out = tmp_path_factory.mktemp("sft_run")
    seen: dict = {}
    original = prefrec.model.attach_lora

    def recording_attach(model, settings, *args, **kwargs):
        peft_model = original(model, settings, *args, **kwargs)
        seen["model"] = peft_model
        seen["init"] = {
            n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n
        }
        return peft_model

    cfg = SFTConfig(data="ml1m-sft", out=str(out), limit=4, batch_size=4, epochs=16, lr=2e-2,
                    lora_dropout=0.0, seed=11, save_steps=1000)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prefrec.model, "attach_lora", recording_attach)
        adapter = train_sft(cfg, str(tiny_dir), TEMPLATE, dtype="float32", device="cpu")
    return cfg, out, adapter, seen


def _mean_sft_loss(model, tokenizer, pairs) -> float:
    feats = sft_features(tokenizer, pairs, TEMPLATE, max_length=1024)
    batch = collate_sft(feats, tokenizer.pad_token_id)
    with torch.no_grad():
        return model(**batch).loss.item()


def test_sft_lowers_the_loss_on_its_training_examples(sft_run, tiny_dir, shared_data):
    from peft import PeftModel

    cfg, _, adapter, _ = sft_run
    pairs = sft_pairs(_examples(shared_data, "ml1m-sft")[: cfg.limit])
    base, tokenizer = load(str(tiny_dir))
    before = _mean_sft_loss(base, tokenizer, pairs)
    tuned = PeftModel.from_pretrained(base, str(adapter)).eval()
    after = _mean_sft_loss(tuned, tokenizer, pairs)
    # A random 2-layer model cannot go far below log(vocab) = 5.95 (the final RMSNorm bounds
    # the logits and the head has no adapter), so the bar is an absolute drop.
    assert after < before - 0.1, (before, after)


def test_sft_trains_only_lora_weights_from_a_seeded_init(sft_run, tiny_dir):
    from peft import get_peft_model_state_dict

    cfg, _, adapter, seen = sft_run
    model, init = seen["model"], seen["init"]
    trained = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    assert trained.keys() == init.keys() and trained
    for name, value in init.items():
        if "lora_B" in name:
            assert torch.count_nonzero(value) == 0  # fresh LoRA starts as a no-op
        assert not torch.equal(trained[name], value), f"{name} did not change"

    # The base weights inside the trained model are the checkpoint's, bit for bit.
    original = load_file(tiny_dir / "model.safetensors")
    base_state = {
        name.replace(".base_layer", ""): value
        for name, value in model.get_base_model().state_dict().items()
        if "lora_" not in name
    }
    assert original.keys() <= base_state.keys()
    for name, value in original.items():
        assert torch.equal(base_state[name], value), f"base weight {name} changed"

    # The saved adapter holds exactly the trained LoRA weights.
    saved = load_file(adapter / "adapter_model.safetensors")
    assert all("lora_" in name for name in saved)
    expected = get_peft_model_state_dict(model)
    assert saved.keys() == expected.keys()
    for name, value in saved.items():
        assert torch.equal(value, expected[name])

    # The LoRA A init is drawn from --seed, so two runs start from the same weights.
    from transformers import set_seed

    set_seed(cfg.seed)
    fresh = attach_lora(load(str(tiny_dir))[0], LoraSettings(dropout=0.0))
    for name, param in fresh.named_parameters():
        if "lora_" in name:
            assert torch.equal(param.detach(), init[name]), name


def test_sft_writes_adapter_config_log_and_curves(sft_run, tiny_dir):
    import yaml

    cfg, out, adapter, _ = sft_run
    assert adapter == out / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "prefrec_adapter.json"):
        assert (adapter / name).is_file(), name
    meta = json.loads((adapter / "prefrec_adapter.json").read_text())
    assert meta["base_model"] == str(tiny_dir) and meta["parents"] == []
    assert meta["template"] == TEMPLATE and meta["stage"] == "sft"
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["stage"] == "sft" and config["lr"] == cfg.lr and config["n_examples"] == 4
    rows = _log_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 17))  # 4 examples, batch 4, 16 epochs
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lora_layers_reach_both_stages_adapters(tiny_dir, tmp_path, monkeypatch):
    """--lora-layers 1 on the 2-layer model: SFT and preference adapters hold LoRA weights
    for the last layer only, and PEFT reloads them as such."""
    from peft import PeftConfig

    monkeypatch.setenv("PREFREC_CACHE", str(tmp_path / "cache"))
    sft = train_sft(SFTConfig(data="ml1m-sft", out=str(tmp_path / "sft"), limit=2, batch_size=2,
                              epochs=3, lr=1e-2, lora_layers=1, save_steps=1000),
                    str(tiny_dir), TEMPLATE, dtype="float32", device="cpu")
    align = tmp_path / "align"
    train_align(_align_cfg(align, sft, lora_layers=1), str(tiny_dir), TEMPLATE,
                dtype="float32", device="cpu")
    for adapter in (sft, align / "adapter"):
        assert PeftConfig.from_pretrained(str(adapter)).layers_to_transform == [1]
        layers = {re.search(r"layers\.(\d+)\.", n).group(1)
                  for n in load_file(adapter / "adapter_model.safetensors")}
        assert layers == {"1"}, adapter
    # The chain merges for scoring: layer 0 keeps the base weights, layer 1 does not (SFT
    # trained 3 steps; the first is at lr 0 in warm-up, so one step would change nothing).
    base = load_for_scoring(str(tiny_dir))[0].state_dict()
    merged = load_for_scoring(str(tiny_dir), [sft, align / "adapter"])[0].state_dict()
    changed = {k.split(".")[2] for k in base if not torch.equal(base[k], merged[k])}
    assert changed == {"1"}


# --------------------------------------------------------------------------- align: losses


@pytest.mark.parametrize("loss", ["dpo", "dmpo", "sdpo"])
def test_align_lowers_the_preference_loss(loss, tiny_dir, sft_adapter, tmp_path, monkeypatch):
    """2 users x 3 negatives, 12 epochs of one step. At step 1 policy == reference (LoRA
    B = 0), so every reward is 0: the loss is log 2 for DPO and DMPO, log(1 + K) for S-DPO."""
    monkeypatch.setenv("PREFREC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    cfg = AlignConfig(data="ml1m-dpo-3", out=str(out), sft=str(sft_adapter), loss=loss,
                      limit=2, batch_size=2, epochs=12, lr=5e-3, ftx=0.0, lora_dropout=0.0,
                      save_steps=1000)
    train_align(cfg, str(tiny_dir), TEMPLATE, dtype="float32", device="cpu")
    rows = _log_rows(out)
    assert len(rows) == 12
    first, last = rows[0], rows[-1]
    expected = math.log(1 + 3) if loss == "sdpo" else math.log(2)
    assert first["loss/preference"] == pytest.approx(expected, abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    # Step 1 trains at lr 0 (warm-up); from then on every step lowers the loss.
    losses = [r["loss/preference"] for r in rows[1:]]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert last["loss/preference"] < first["loss/preference"] - 0.05
    assert last["rewards/margins"] > 0
    assert last["rewards/accuracies"] > 0.5
    assert (out / "loss.png").is_file()
    meta = json.loads((out / "adapter" / "prefrec_adapter.json").read_text())
    assert meta["loss"] == loss and meta["parents"] == [str(sft_adapter.resolve())]


def test_max_length_truncates_policy_and_reference_alike(tiny_dir, sft_adapter, tmp_path,
                                                         monkeypatch):
    """--max-length cuts the prompt's left side in both the cached reference and the
    training forward: at step 1 (policy == reference) every reward is still exactly 0,
    and the log-probs are those of the truncated sequences."""
    monkeypatch.setenv("PREFREC_CACHE", str(tmp_path / "cache"))
    firsts = {}
    for max_length in (96, 1024):
        out = tmp_path / f"len{max_length}"
        cfg = AlignConfig(data="ml1m-dpo-3", out=str(out), sft=str(sft_adapter), loss="dmpo",
                          limit=2, batch_size=2, max_steps=1, ftx=0.0, lora_dropout=0.0,
                          max_length=max_length, save_steps=1000)
        train_align(cfg, str(tiny_dir), TEMPLATE, dtype="float32", device="cpu")
        firsts[max_length] = _log_rows(out)[0]
        assert firsts[max_length]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert firsts[96]["logps/chosen"] != pytest.approx(firsts[1024]["logps/chosen"], abs=1e-3)
    # two reference caches: the truncation is part of the key
    assert len(list((tmp_path / "cache" / "ref_logps").glob("*.safetensors"))) == 2


# --------------------------------------------------------------------------- align: reference


def _align_cfg(out: Path, sft_adapter: Path, **kw) -> AlignConfig:
    base = dict(data="ml1m-dpo-3", out=str(out), sft=str(sft_adapter), limit=2, batch_size=2,
                max_steps=1, save_steps=1000)
    return AlignConfig(**{**base, **kw})


def _cached_reference(out: Path) -> torch.Tensor:
    import yaml

    cache_file = Path(yaml.safe_load((out / "config.yaml").read_text())["reference_cache"])
    return load_file(cache_file)["logps"]


def test_reference_logps_come_from_the_sft_model_not_the_base(
    tiny_dir, sft_adapter, shared_data, tmp_path, monkeypatch
):
    """The preference stage's reference is base + SFT adapter (merged), never the base.

    The cached reference log-probs must equal naive (unshared, per-sequence) scores of
    ``load_for_scoring(base, [sft])`` for every (prompt, completion) of the run, and
    differ from the base model's scores: the SFT adapter's B matrices are random, so the
    two models disagree clearly.
    """
    monkeypatch.setenv("PREFREC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    cfg = _align_cfg(out, sft_adapter)
    train_align(cfg, str(tiny_dir), TEMPLATE, dtype="float32", device="cpu")
    cached = _cached_reference(out)

    examples = limit_examples(_examples(shared_data, "ml1m-dpo-3"), 2)
    _, _, keys = build_groups(examples, None, cfg.seed, cfg.resample_negatives)
    assert cached.shape == (len(keys),) == (2 * (1 + 3),)

    def naive(model, tokenizer):
        prompts = [model_input(p, TEMPLATE) for p, _ in keys]
        return score_completions(model, tokenizer, prompts, [c for _, c in keys],
                                 shared_prefix=False).logps

    sft_scores = naive(*load_for_scoring(str(tiny_dir), [sft_adapter]))
    base_scores = naive(*load_for_scoring(str(tiny_dir)))
    torch.testing.assert_close(cached, sft_scores, rtol=1e-5, atol=1e-3)
    assert (cached - base_scores).abs().max() > 1.0


def test_reference_is_scored_once_and_never_in_the_training_loop(
    tiny_dir, sft_adapter, tmp_path, monkeypatch, caplog
):
    """Run 1 scores the reference (no grad) before its first training step and caches it;
    run 2 (fresh --out, same data and models) loads the cache: every scorer call it makes
    is a training step of the policy (grad=True), one per step."""
    import prefrec.scoring

    monkeypatch.setenv("PREFREC_CACHE", str(tmp_path / "cache"))
    calls: list[bool] = []
    original = prefrec.scoring.score_completions

    def recording(*args, grad=False, **kwargs):
        calls.append(grad)
        return original(*args, grad=grad, **kwargs)

    monkeypatch.setattr(prefrec.scoring, "score_completions", recording)

    train_align(_align_cfg(tmp_path / "run1", sft_adapter, max_steps=3), str(tiny_dir),
                TEMPLATE, dtype="float32", device="cpu")
    assert calls == [False, True, True, True]  # one reference chunk, then 3 policy steps
    [cache_file] = (tmp_path / "cache" / "ref_logps").iterdir()
    stamp = cache_file.stat().st_mtime_ns

    calls.clear()
    with caplog.at_level("INFO", logger="prefrec.train.align"):
        train_align(_align_cfg(tmp_path / "run2", sft_adapter, max_steps=3), str(tiny_dir),
                    TEMPLATE, dtype="float32", device="cpu")
    assert calls == [True, True, True]
    assert any("reference log-probs: loaded" in r.getMessage() for r in caplog.records)
    assert list((tmp_path / "cache" / "ref_logps").iterdir()) == [cache_file]
    assert cache_file.stat().st_mtime_ns == stamp


def test_a_killed_reference_pass_resumes_where_it_stopped(
    tiny_dir, sft_adapter, shared_data, tmp_path, monkeypatch
):
    """A pass killed after its first chunk leaves a partial file; the next pass scores only
    the keys after it, and its cache equals an uninterrupted pass's. The partial is removed."""
    import prefrec.scoring
    from prefrec.train.align import reference_logps

    model, tokenizer = load_for_scoring(str(tiny_dir), [sft_adapter])
    examples = limit_examples(_examples(shared_data, "ml1m-dpo-3"), 20)
    _, _, keys = build_groups(examples, None, 0, False)
    assert len(keys) == 80  # two chunks of 64 and 16
    fresh = reference_logps(model, tokenizer, keys, TEMPLATE, tmp_path / "fresh.safetensors")

    original = prefrec.scoring.score_completions
    scored: list[int] = []

    def killed_after_one_chunk(*args, **kwargs):
        if scored:
            raise KeyboardInterrupt
        scored.append(len(args[2]))
        return original(*args, **kwargs)

    cache_file = tmp_path / "resumed.safetensors"
    partial = tmp_path / "resumed.partial.safetensors"
    monkeypatch.setattr(prefrec.scoring, "score_completions", killed_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        reference_logps(model, tokenizer, keys, TEMPLATE, cache_file, save_every_s=0.0)
    assert not cache_file.exists()
    assert load_file(partial)["logps"].shape == (64,)

    def counting(*args, **kwargs):
        scored.append(len(args[2]))
        return original(*args, **kwargs)

    monkeypatch.setattr(prefrec.scoring, "score_completions", counting)
    resumed = reference_logps(model, tokenizer, keys, TEMPLATE, cache_file, save_every_s=0.0)
    assert scored == [64, 16]
    assert resumed == fresh
    assert not partial.exists()
    torch.testing.assert_close(load_file(cache_file)["logps"],
                               load_file(tmp_path / "fresh.safetensors")["logps"])


# --------------------------------------------------------------------------- negatives


def test_negatives_keep_each_users_first_k_pairwise_rows(shared_data):
    examples = _examples(shared_data, "ml1m-dpo-3")
    n, make_group, keys = build_groups(examples, 1, seed=0, resample=False)
    users = group_pairs_by_user(examples)
    assert n == len(users) == 100
    for i, full in enumerate(users):
        group = make_group(i, 0)
        assert group.k == 1
        assert group.rejected == full.rejected[:1]
        assert group.rejected_prompts == full.rejected_prompts[:1]
        assert make_group(i, 5) == group  # pairwise groups never change with the epoch
    # The chosen and the one rejected completion share the first row's prompt.
    assert len(keys) == 2 * n


@pytest.mark.parametrize(
    ("data", "negatives", "message"),
    [
        ("ml1m-dpo-3", "4", "--negatives 4: 2 users have fewer pairwise rows than that"),
        (LASTFM, "20", "--negatives 20: 2 examples have fewer other candidates than that"),
        ("ml1m-dpo-3", "0", "--negatives 0: expected at least 1"),
    ],
    ids=["pairwise-k4", "selection-k20", "k0"],
)
def test_too_many_negatives_is_a_one_line_cli_error(
    data, negatives, message, tiny_dir, shared_data, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("PREFREC_CACHE", str(tmp_path / "cache"))
    if data == LASTFM:
        data = str(shared_data / LASTFM)
    code = cli_main(["align", "--model", str(tiny_dir), "--data", data, "--limit", "2",
                     "--negatives", negatives, "--out", str(tmp_path / "out"),
                     "--device", "cpu", "--dtype", "float32"])
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == [f"prefrec: error: {message}"]
    assert not (tmp_path / "out" / "adapter").exists()


def test_selection_negatives_resample_per_epoch_deterministically(shared_data):
    examples = _examples(shared_data, LASTFM)[:5]
    n, make, keys = build_groups(examples, 3, seed=42, resample=True)
    assert n == 5
    assert len(keys) == sum(len(ex.candidates) for ex in examples)  # every candidate scored
    for i, ex in enumerate(examples):
        others = [ex.completion_for(c) for c in ex.candidates if c != ex.target]
        epoch0, epoch1 = make(i, 0), make(i, 1)
        for group in (epoch0, epoch1):
            assert group.k == 3 and group.chosen == ex.completion_for(ex.target)
            assert set(group.rejected) <= set(others)
            assert group.rejected_prompts == (ex.prompt,) * 3
        assert make(i, 1) == epoch1  # a resumed run draws the same negatives
        assert set(epoch0.rejected) != set(epoch1.rejected)

    _, fixed, _ = build_groups(examples, 3, seed=42, resample=False)
    for i, ex in enumerate(examples):
        first3 = tuple(ex.completion_for(c) for c in ex.candidates if c != ex.target)[:3]
        assert fixed(i, 0).rejected == fixed(i, 1).rejected == first3


@pytest.mark.parametrize("resample", [True, False])
def test_trainer_sees_new_selection_negatives_each_epoch(
    resample, tiny_dir, sft_adapter, shared_data, tmp_path, monkeypatch
):
    """The epoch callback reaches the dataset: epoch 1's groups are make(i, 1), not make(i, 0)."""
    from prefrec.train.align import AlignTrainer

    monkeypatch.setenv("PREFREC_CACHE", str(tmp_path / "cache"))
    seen: list[list] = []
    original = AlignTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        seen.append(inputs["groups"])
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(AlignTrainer, "compute_loss", recording)
    data = str(shared_data / LASTFM)
    cfg = AlignConfig(data=data, out=str(tmp_path / "out"), sft=str(sft_adapter), limit=2,
                      negatives=3, batch_size=2, epochs=2, save_steps=1000, seed=5,
                      resample_negatives=resample)
    train_align(cfg, str(tiny_dir), TEMPLATE, dtype="float32", device="cpu")

    _, make, _ = build_groups(_examples(shared_data, LASTFM)[:2], 3, cfg.seed, resample)
    assert len(seen) == 2  # one step per epoch
    by_prompt = [{g.prompt: g for g in step} for step in seen]
    for epoch, groups in enumerate(by_prompt):
        expected = [make(i, epoch) for i in range(2)]
        assert groups == {g.prompt: g for g in expected}
    assert (by_prompt[0] != by_prompt[1]) is resample


# --------------------------------------------------------------------------- SIGKILL resume


def _prefrec(stage: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "prefrec", stage, "--dtype", "float32", "--device", "cpu",
            "--out", str(out), "--max-steps", "12", "--seed", "7", "--lr", "1e-3",
            "--save-total-limit", "20", *extra]


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    """Run ``cmd`` in the background, stderr to ``log`` (a pipe nobody reads could fill)."""
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=fh)


def _kill_after_checkpoint(cmd: list[str], out: Path, env: dict, min_step: int) -> int:
    """Start ``cmd``, SIGKILL it once a complete checkpoint >= ``min_step`` exists."""
    log = out.parent / f"{out.name}.killed.log"
    proc = _start(cmd, env, log)
    ckpt = out / "checkpoints"
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        done = [
            int(d.name.split("-")[1])
            for d in (ckpt.glob("checkpoint-*") if ckpt.is_dir() else [])
            if checkpoint_state_is_complete(d / "trainer_state.json")  # not torn mid-write
        ]
        if done and max(done) >= min_step:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return max(done)
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    pytest.fail(f"the run ended (rc={proc.returncode}) before it could be killed:\n"
                f"{log.read_text(errors='replace')[-2000:]}")


def _assert_kill_resume_matches(cmd_for, tmp_path: Path, min_step: int) -> None:
    """Uninterrupted run vs killed-then-rerun: same final adapter, same per-step losses."""
    env = {**os.environ, "PREFREC_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    # The uninterrupted run goes alongside the one that gets killed (2 cores, 1 thread each).
    uninterrupted = _start(cmd_for(full), env, tmp_path / "full.log")
    step = _kill_after_checkpoint(cmd_for(killed), killed, env, min_step)
    assert not (killed / "adapter").exists()
    assert uninterrupted.wait() == 0, (tmp_path / "full.log").read_text()[-2000:]
    resumed = subprocess.run(cmd_for(killed), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # A later checkpoint may complete between the last poll and the kill.
    [resumed_from] = re.findall(
        rf"resuming from {re.escape(str(killed / 'checkpoints'))}/checkpoint-(\d+)", resumed.stderr
    )
    assert step <= int(resumed_from) < 12

    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
    assert [(r["step"], r["loss"]) for r in _log_rows(killed)] == [
        (r["step"], r["loss"]) for r in _log_rows(full)
    ]


def test_align_resumes_bit_identically_after_sigkill(tiny_dir, sft_adapter, shared_data,
                                                    tmp_path):
    """S-DPO data with 3 of 19 negatives resampled per epoch; 4 groups, batch 2 (2 steps an
    epoch), checkpoints every 5 steps: the kill lands mid-epoch, so the resume must skip
    batches, restore the RNG (LoRA dropout) and redraw the same negatives."""

    def cmd(out: Path) -> list[str]:
        return _prefrec("align", out, "--model", str(tiny_dir), "--sft", str(sft_adapter),
                        "--data", str(shared_data / LASTFM), "--limit", "4", "--negatives", "3",
                        "--loss", "sdpo", "--batch-size", "2", "--save-steps", "5")

    _assert_kill_resume_matches(cmd, tmp_path, min_step=5)


def test_sft_resumes_bit_identically_after_sigkill(tiny_dir, tmp_path):
    def cmd(out: Path) -> list[str]:
        return _prefrec("sft", out, "--model", str(tiny_dir), "--data", "ml1m-sft",
                        "--limit", "4", "--batch-size", "2", "--save-steps", "3")

    _assert_kill_resume_matches(cmd, tmp_path, min_step=4)


# --------------------------------------------------------------------------- embedded


@pytest.mark.embedded
def test_embedded_smollm2_sft_align_eval(embedded_model, tmp_path, monkeypatch):
    """Two real steps per stage on SmolLM2-135M, then eval; the align adapter also opens
    with plain PEFT on the SFT-merged base and gives the logits prefrec's chain gives."""
    from peft import PeftModel

    from prefrec.model import cache_root

    # Reference caches go to tmp; the converted model is reused from the real cache.
    converted = cache_root() / "models" / "smollm2-135m"
    monkeypatch.setenv("PREFREC_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "models").mkdir(parents=True)
    (tmp_path / "cache" / "models" / "smollm2-135m").symlink_to(converted)

    cpu = ["--device", "cpu", "--dtype", "float32"]
    sft, align, evaluation = tmp_path / "sft", tmp_path / "align", tmp_path / "eval"
    assert cli_main(["sft", "--data", "ml1m-sft", "--limit", "2", "--batch-size", "1",
                     "--max-steps", "2", "--out", str(sft), *cpu]) == 0
    assert cli_main(["align", "--sft", str(sft / "adapter"), "--data", "ml1m-dpo-3",
                     "--limit", "2", "--negatives", "2", "--loss", "dmpo", "--batch-size", "1",
                     "--max-steps", "2", "--lr", "1e-3", "--out", str(align), *cpu]) == 0
    rows = _log_rows(align)
    assert len(rows) == 2
    assert rows[0]["loss/preference"] == pytest.approx(math.log(2), abs=1e-4)
    assert cli_main(["eval", "--adapter", str(align / "adapter"), "--data", "ml1m-eval",
                     "--limit", "4", "--n-boot", "50", "--out", str(evaluation), *cpu]) == 0
    result = json.loads((evaluation / "metrics.json").read_text())
    assert result["settings"]["adapters"] == [str((sft / "adapter").resolve()),
                                              str(align / "adapter")]
    assert result["metrics"]["pairwise_accuracy"]["n"] == 4
    assert 0.0 <= result["metrics"]["pairwise_accuracy"]["value"] <= 1.0

    base, tokenizer = embedded_model
    enc = tokenizer("You are an assistant working on movie recommendations.",
                    return_tensors="pt")
    import copy

    sft_merged = PeftModel.from_pretrained(copy.deepcopy(base), str(sft / "adapter"))
    sft_merged = sft_merged.merge_and_unload()
    plain = PeftModel.from_pretrained(sft_merged, str(align / "adapter")).eval()
    chained, _ = load_for_scoring("smollm2-135m", [sft / "adapter", align / "adapter"])
    with torch.no_grad():
        peft_logits = plain(**enc).logits
        prefrec_logits = chained(**enc).logits
        with plain.disable_adapter():
            sft_logits = plain(**enc).logits
    torch.testing.assert_close(peft_logits, prefrec_logits, rtol=1e-4, atol=1e-4)
    assert (peft_logits - sft_logits).abs().max() > 1e-3  # the align adapter is not a no-op


def test_rerunning_a_finished_stage_is_a_no_op_and_other_settings_are_refused(
    sft_run, tiny_dir, monkeypatch
):
    """A pipeline re-run after a crash skips finished stages instead of retraining them."""
    import transformers

    cfg, out, adapter, _ = sft_run
    before = (adapter / "adapter_model.safetensors").read_bytes()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage must not train again")

    monkeypatch.setattr(transformers.Trainer, "train", no_training)
    assert train_sft(cfg, str(tiny_dir), TEMPLATE, dtype="float32", device="cpu") == adapter
    assert (adapter / "adapter_model.safetensors").read_bytes() == before

    # How often a run checkpoints and logs is not what it trains: still the same run.
    bookkeeping = dataclasses.replace(cfg, save_steps=7, save_minutes=1.0, logging_steps=3)
    assert train_sft(bookkeeping, str(tiny_dir), TEMPLATE, dtype="float32", device="cpu") == (
        adapter
    )

    changed = dataclasses.replace(cfg, lr=cfg.lr / 2)
    with pytest.raises(PrefrecError, match=r"other settings \(lr\)"):
        train_sft(changed, str(tiny_dir), TEMPLATE, dtype="float32", device="cpu")


def test_timed_checkpoints_ask_for_a_save_once_the_minutes_have_passed():
    from transformers import TrainerControl, TrainerState

    from prefrec.train.common import TimedCheckpoints

    now = [100.0]
    callback = TimedCheckpoints(minutes=2, clock=lambda: now[0])
    state, control = TrainerState(), TrainerControl()
    now[0] += 119
    callback.on_step_end(None, state, control)
    assert not control.should_save
    now[0] += 1
    callback.on_step_end(None, state, control)
    assert control.should_save
    callback.on_save(None, state, control)  # the clock restarts at the save
    control.should_save = False
    now[0] += 60
    callback.on_step_end(None, state, control)
    assert not control.should_save


@pytest.mark.parametrize("save_minutes", [0.0, 1e-9])
def test_save_minutes_checkpoints_between_save_steps(tiny_dir, tmp_path, save_minutes):
    """With ``save_steps`` far away, only the timer writes checkpoints before the last step
    (which the Trainer always saves); 0 turns it off."""
    out = tmp_path / "sft"
    cfg = SFTConfig(data="ml1m-sft", out=str(out), limit=6, batch_size=2, max_steps=3,
                    save_steps=1000, save_minutes=save_minutes, save_total_limit=5)
    train_sft(cfg, str(tiny_dir), TEMPLATE, dtype="float32", device="cpu")
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    timed = ["checkpoint-1", "checkpoint-2"] if save_minutes else []
    assert ckpts == [*timed, "checkpoint-3"]


def test_finished_stage_from_an_older_config_or_another_folder_is_reused(
    sft_run, tiny_dir, tmp_path, monkeypatch
):
    """A config.yaml written before a field existed (its default applied then) and a
    stage folder copied elsewhere (``prefrec study``) both count as the same run."""
    import shutil

    import transformers
    import yaml

    cfg, out, adapter, _ = sft_run
    copy = tmp_path / "copied"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    saved = yaml.safe_load((copy / "config.yaml").read_text())
    del saved["both_orders"]
    (copy / "config.yaml").write_text(yaml.safe_dump(saved))

    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage must not train again")

    monkeypatch.setattr(transformers.Trainer, "train", no_training)
    moved = dataclasses.replace(cfg, out=str(copy))
    assert train_sft(moved, str(tiny_dir), TEMPLATE, dtype="float32", device="cpu") == (
        copy / "adapter"
    )
    with pytest.raises(PrefrecError, match=r"other settings \(both_orders\)"):
        train_sft(dataclasses.replace(moved, both_orders=True), str(tiny_dir), TEMPLATE,
                  dtype="float32", device="cpu")


def test_both_orders_doubles_the_groups_and_refuses_selection_data(
    tiny_dir, sft_adapter, shared_data, tmp_path
):
    cfg = _align_cfg(tmp_path / "both", sft_adapter, both_orders=True, limit=3, negatives=2)
    train_align(cfg, str(tiny_dir), TEMPLATE, dtype="float32", device="cpu")
    import yaml

    assert yaml.safe_load((tmp_path / "both" / "config.yaml").read_text())["n_groups"] == 6
    bad = _align_cfg(tmp_path / "sel", sft_adapter, both_orders=True,
                     data=str(shared_data / "sdpo-lastfm" / "lastfm-val.json"))
    with pytest.raises(PrefrecError, match="pairwise .DMPO. data only"):
        train_align(bad, str(tiny_dir), TEMPLATE, dtype="float32", device="cpu")
