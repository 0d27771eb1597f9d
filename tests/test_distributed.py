"""Multi-process training: ``accelerate launch`` with 2 CPU processes (DDP over gloo).

With DDP the global batch of a step is the concatenation of the ranks' batches: accelerate
shards ONE seeded permutation batch by batch (rank r takes batches r, r + 2, ...), so
2 processes x batch b see, at every step, exactly the groups 1 process x batch 2b sees.
Gradients are averaged over the ranks and every loss is a mean over groups, so the two
runs must end with the same adapter up to float rounding. That equivalence is what these
tests check; it fails when the ranks skip the gradient all-reduce (the shared-prefix scorer
calls the decoder directly, around DDP's forward), draw different negatives, see
overlapping data, or log only rank 0's metrics.

Every run is a subprocess (``accelerate launch`` / ``python -m prefrec``) on the tiny random
Llama saved to a folder (``tiny_dir`` of conftest.py), single-threaded, like a user's command.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO

ACCELERATE = Path(sys.executable).with_name("accelerate")
DDP_CPU_CONFIG = REPO / "configs" / "accelerate" / "ddp-cpu.yaml"
LASTFM = "sdpo-lastfm/lastfm-val.json"
STEPS = 6  # 6 groups, global batch 2: 3 steps an epoch, 2 epochs (new negatives in epoch 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "PREFREC_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def _align_args(model_dir: Path, data: Path, out: Path, batch_size: int) -> list[str]:
    """S-DPO on LastFM, 3 of 19 negatives resampled per epoch, dropout 0, constant seed."""
    return ["align", "--model", str(model_dir), "--data", str(data), "--limit", "6",
            "--negatives", "3", "--loss", "sdpo", "--epochs", "2", "--lr", "1e-3",
            "--warmup-ratio", "0", "--lora-dropout", "0", "--seed", "3", "--save-steps", "2",
            "--device", "cpu", "--dtype", "float32", "--batch-size", str(batch_size),
            "--out", str(out)]


def _ddp_command(args: list[str]) -> list[str]:
    return [str(ACCELERATE), "launch", "--config_file", str(DDP_CPU_CONFIG),
            "--main_process_port", str(_free_port()), "-m", "prefrec", *args]


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _step_rows(out: Path) -> list[dict]:
    return [r for r in _rows(out) if "loss" in r]


@pytest.fixture(scope="module")
def runs(tiny_dir, shared_data, tmp_path_factory):
    """The same S-DPO run twice, side by side: 2 DDP processes x batch 1 (with activation
    checkpointing, which must not change the result) and 1 process x batch 2. Each has
    its own reference cache, so both compute the reference log-probs."""
    root = tmp_path_factory.mktemp("ddp")
    data = shared_data / LASTFM
    ddp, single = root / "ddp", root / "single"
    ddp_args = [*_align_args(tiny_dir, data, ddp, 1), "--gradient-checkpointing"]
    with open(root / "single.err", "w") as err:
        single_proc = subprocess.Popen(
            [sys.executable, "-m", "prefrec", *_align_args(tiny_dir, data, single, 2)],
            env=_env(root / "cache-single"), stdout=subprocess.DEVNULL, stderr=err,
        )
        ddp_done = _run(_ddp_command(ddp_args), _env(root / "cache-ddp"))
        assert single_proc.wait(timeout=600) == 0, (root / "single.err").read_text()[-3000:]
    return {
        "root": root, "ddp": ddp, "single": single, "ddp_args": ddp_args, "ddp_done": ddp_done,
        # Kept before the resume test rewrites the DDP folder.
        "ddp_adapter": _adapter(ddp), "ddp_rows": _step_rows(ddp),
    }


def test_two_processes_train_what_one_process_trains_with_the_same_global_batch(runs):
    ddp, single = runs["ddp_adapter"], _adapter(runs["single"])
    assert ddp.keys() == single.keys() and ddp
    update = max(t.abs().max().item() for name, t in single.items() if "lora_B" in name)
    # 6 Adam steps at lr 1e-3 move B (zero at init) by ~6e-3; rank-local gradients (no
    # all-reduce) differ from the synced run by about as much as the update itself.
    assert update > 1e-3
    for name in ddp:
        torch.testing.assert_close(ddp[name], single[name], rtol=0, atol=2e-5)

    # The logged metrics are means over both ranks' groups, not rank 0's alone.
    # (rewards/accuracies is left out: it thresholds rewards that start at 0 +- rounding.)
    ddp_rows, single_rows = runs["ddp_rows"], _step_rows(runs["single"])
    steps = list(range(1, STEPS + 1))
    assert [r["step"] for r in ddp_rows] == [r["step"] for r in single_rows] == steps
    for a, b in zip(ddp_rows, single_rows, strict=True):
        for key in ("loss", "loss/preference", "loss/sft", "logps/chosen", "logps/rejected",
                    "rewards/margins"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)


def test_reference_logps_are_sharded_over_ranks_and_cached_once(runs):
    """Each rank scores half of the completions; the gathered result is the single
    process's, and one file (no temporary left over) is written."""
    [ddp_file] = (runs["root"] / "cache-ddp" / "ref_logps").iterdir()
    [single_file] = (runs["root"] / "cache-single" / "ref_logps").iterdir()
    assert ddp_file.name == single_file.name  # same key: same data, template and model
    a, b = load_file(ddp_file), load_file(single_file)
    assert a["logps"].shape == (6 * 20,)  # 6 examples x 20 candidates
    torch.testing.assert_close(a["logps"], b["logps"], rtol=0, atol=1e-4)
    assert torch.equal(a["n_tokens"], b["n_tokens"])
    assert "reference log-probs: computed 120" in runs["ddp_done"].stderr


def test_only_the_main_process_writes_outputs(runs):
    out = runs["ddp"]
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter", "checkpoints", "config.yaml", "log.jsonl", "loss.png"
    ]
    # One row per step plus Trainer's summary row: a second writer would double them.
    assert [r["step"] for r in _rows(out)] == [*range(1, STEPS + 1), STEPS]
    assert "train_runtime" in _rows(out)[-1]
    assert runs["ddp_done"].stdout.count("aligned adapter:") == 1
    assert sorted(p.name for p in (out / "adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors",
        "prefrec_adapter.json",
    ]
    # Per-rank RNG states are the one file each rank writes, so a resume restores both.
    for step in (STEPS - 2, STEPS):  # --save-steps 2, the last 2 kept
        ckpt = out / "checkpoints" / f"checkpoint-{step}"
        rng = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("rng_state"))
        assert rng == ["rng_state_0.pth", "rng_state_1.pth"]


def test_a_two_process_run_resumes_from_its_checkpoint(runs):
    """Lose the last checkpoint and the adapter, re-run the same command: training resumes
    from step 4, in the middle of epoch 2 (skipped batches, epoch 2's resampled negatives,
    both ranks' RNG), and ends with the same adapter and log."""
    out = runs["ddp"]
    shutil.rmtree(out / "adapter")
    shutil.rmtree(out / "checkpoints" / f"checkpoint-{STEPS}")
    done = _run(_ddp_command(runs["ddp_args"]), _env(runs["root"] / "cache-ddp"))
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-4'}" in done.stderr
    assert "reference log-probs: loaded 120" in done.stderr
    resumed = _adapter(out)
    for name, value in runs["ddp_adapter"].items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6)
    assert [(r["step"], r["loss"]) for r in _step_rows(out)] == [
        (r["step"], r["loss"]) for r in runs["ddp_rows"]
    ]


def test_resume_skips_a_checkpoint_whose_state_file_was_torn(tmp_path):
    """Trainer writes trainer_state.json in place and last; a kill during that write leaves
    an empty file, and resuming from that checkpoint would crash on the JSON."""
    from prefrec.train.common import last_complete_checkpoint

    ckpts = tmp_path / "checkpoints"
    for step, state in [(2, '{"global_step": 2}'), (4, ""), (6, None)]:
        (ckpts / f"checkpoint-{step}").mkdir(parents=True)
        if state is not None:
            (ckpts / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(tmp_path) == str(ckpts / "checkpoint-2")
    (ckpts / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4}')
    assert last_complete_checkpoint(tmp_path) == str(ckpts / "checkpoint-4")
