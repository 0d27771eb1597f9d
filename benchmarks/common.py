"""What the benchmark scripts share: flags, the header line, timing, memory, JSON output.

Every script prints one JSON object per line on stdout (and appends it to ``--out`` when
given): first a header naming the machine and the software, then one row per
measurement, then summaries. Rows are plain dicts so that ``jq`` or pandas read them.

Timing: each measured callable runs once as a warm-up, then ``--reps`` times, the methods
interleaved within each repetition (ABBA order: even repetitions in the given order, odd
ones reversed) so that background load and thermal drift hit every method alike. On
CUDA the device is synchronised before the clock is read.

Memory: ``peak_rss_mb`` is the resident-set high-water mark of this process's memory
map (``VmHWM`` in ``/proc/self/status``; ``ru_maxrss`` elsewhere). Two ways to make it
per method:

- in-process, :func:`reset_peaks` before a call (Linux: writing ``5`` to
  ``/proc/self/clear_refs`` resets the high-water mark to the current RSS), so a row's
  ``peak_rss_mb - rss_before_mb`` is what that call added on top of everything already
  resident (both sides' models, in a comparison);
- absolute, from a fresh subprocess that loads the model and runs only that method
  (:func:`run_isolated`). ``VmHWM`` belongs to the new memory map after ``exec``, so the
  child's figure is its own (``ru_maxrss`` would inherit the parent's peak across exec).

On CUDA ``torch.cuda.max_memory_allocated`` is reset the same way and is per call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"


# --------------------------------------------------------------------------- flags


def add_common_args(parser: argparse.ArgumentParser, *, groups: int, reps: int) -> None:
    """Flags every benchmark takes; ``groups`` and ``reps`` set the defaults."""
    parser.add_argument("--model", default="smollm2-135m", help="embedded name, dir or hub id")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shipped data folder")
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda")
    parser.add_argument("--dtype", default=None, help="auto (default), float32, bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--reps", type=int, default=reps, help="timed repetitions per method")
    parser.add_argument("--groups", type=int, default=groups, help="groups (users) per measurement")
    parser.add_argument("--out", type=Path, default=None, help="also append the JSON lines here")
    parser.add_argument("--note", default="", help="free text for the header (machine load...)")


def int_list(text: str) -> list[int]:
    """``"1,3,5"`` -> ``[1, 3, 5]`` (an argparse ``type``)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def choice_list(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse ``type`` for a comma-separated subset of ``allowed``."""

    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(allowed)}")
        return names

    return parse


def setup_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads (and one inter-op thread) when asked."""
    import torch

    if threads:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # only allowed before the first parallel work
            pass


# --------------------------------------------------------------------------- output


class Recorder:
    """Prints JSON lines to stdout and appends them to ``out`` (flushed row by row)."""

    def __init__(self, out: Path | None) -> None:
        self._fh: IO[str] | None = None
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(out, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def emit(self, row: dict[str, Any]) -> None:
        from prefrec.io import append_jsonl

        print(json.dumps(row), flush=True)
        if self._fh is not None:
            append_jsonl(self._fh, row)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def header(benchmark: str, args: argparse.Namespace, model: Any = None) -> dict[str, Any]:
    """The first line of every run: what ran, where, with which software and settings."""
    import torch

    row: dict[str, Any] = {
        "header": True,
        "benchmark": benchmark,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": platform.node(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        **{name: _version(name) for name in ("torch", "transformers", "trl", "peft", "prefrec")},
        "model": args.model,
        "argv": sys.argv[1:],
        "note": args.note,
    }
    if model is not None:
        param = next(model.parameters())
        row["device"] = str(param.device)
        row["dtype"] = str(param.dtype).removeprefix("torch.")
        row["attn"] = getattr(model.config, "_attn_implementation", None)
        if param.device.type == "cuda":
            row["gpu"] = torch.cuda.get_device_name(param.device)
    return row


# --------------------------------------------------------------------------- timing


def synchronize(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: Any) -> tuple[float, Any]:
    """Wall seconds of ``fn()`` (device synchronised on both sides) and its result."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def interleaved(methods: Sequence[str], reps: int) -> Iterator[tuple[int, str]]:
    """(rep, method) in ABBA order: even reps in the given order, odd reps reversed."""
    for rep in range(reps):
        for method in methods if rep % 2 == 0 else list(reversed(methods)):
            yield rep, method


def spread(seconds: Sequence[float]) -> dict[str, float]:
    """Median, min and max of a list of timings (rounded to 0.1 ms)."""
    return {
        "median_s": round(statistics.median(seconds), 4),
        "min_s": round(min(seconds), 4),
        "max_s": round(max(seconds), 4),
        "n": len(seconds),
    }


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator rounded to 2 decimals (the speedup of the denominator)."""
    return round(numerator / denominator, 2)


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> dict[str, float]:
    """Median, min and max of the per-repetition ratios a_i / b_i.

    Interleaved methods of one repetition ran under nearly the same machine load, so these
    are steadier than the ratio of medians when the load drifts between repetitions.
    """
    ratios = [a / b for a, b in zip(numerators, denominators, strict=True)]
    return {
        "paired_median": round(statistics.median(ratios), 2),
        "paired_min": round(min(ratios), 2),
        "paired_max": round(max(ratios), 2),
    }


# --------------------------------------------------------------------------- memory


def peak_rss_mb() -> float:
    """Peak resident memory of this process's memory map since the last reset, MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    # ru_maxrss: KiB on Linux, bytes on macOS; never reset.
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, 1)


def reset_peaks(device: Any) -> bool:
    """Reset the RSS high-water mark (Linux only) and CUDA's peak counter.

    Returns whether the RSS mark could be reset (otherwise ``peak_rss_mb`` keeps growing).
    """
    import torch

    if getattr(device, "type", "") == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def current_rss_mb() -> float:
    """This process's resident memory now, MiB."""
    import psutil

    return round(psutil.Process().memory_info().rss / 2**20, 1)


def device_peak_mb(device: Any) -> float | None:
    """``torch.cuda.max_memory_allocated`` since the last reset, MiB; None off CUDA."""
    import torch

    if getattr(device, "type", "") != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def memory_fields(device: Any) -> dict[str, float | None]:
    """The memory columns of a row: RSS now, and the peaks since the last reset."""
    return {
        "rss_mb": current_rss_mb(),
        "peak_rss_mb": peak_rss_mb(),
        "cuda_peak_mb": device_peak_mb(device),
    }


def measured(fn: Callable[[], Any], device: Any) -> tuple[float, Any, dict[str, Any]]:
    """:func:`timed` plus the call's memory: RSS before it and the peaks during it."""
    reset_peaks(device)
    before = current_rss_mb()
    seconds, result = timed(fn, device)
    return seconds, result, {"rss_before_mb": before, **memory_fields(device)}


def run_isolated(script: Path, argv: Sequence[str], timeout: float = 3600) -> list[dict[str, Any]]:
    """Run ``script argv`` in a fresh Python process; return the JSON lines it printed.

    Used for per-method peak memory: the child runs one method only, so its
    ``ru_maxrss`` is that method's peak (model load included).
    """
    done = subprocess.run(
        [sys.executable, str(script), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-5:]
        raise RuntimeError(f"{script.name} {' '.join(argv)} failed: {' | '.join(tail)}")
    rows = []
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            rows.append(json.loads(line))
    return rows


def probe_args(args: argparse.Namespace) -> list[str]:
    """The common flags of ``args`` again, for a child process (never ``--out``)."""
    argv = ["--model", args.model, "--data", str(args.data), "--groups", str(args.groups)]
    for flag in ("device", "dtype", "threads"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag}", str(value)]
    return argv
