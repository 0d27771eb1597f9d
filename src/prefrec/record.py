"""A run's record: the small files that describe what a run did, without its weights.

``prefrec run`` leaves adapters, checkpoints and data files beside its evaluations. The
record is what the report is built from: finished evaluations (``metrics.json`` +
``scores.jsonl``, so paired tests stay possible), finished trainings' ``log.jsonl`` /
``config.yaml`` / ``loss.png``, audits, ``stages.jsonl``, the report itself. It is a few
MB where the run folder is GBs, so it can be committed as a stage finishes
(``--publish DIR``) and copied back into a fresh run folder (``--restore DIR``): the runner
then neither retrains nor rescores a model whose evaluations are all in the record.

Left out: model weights (``adapter/``, ``checkpoints/``, any file not of a record type),
data folders (rebuilt from the config's seed), hidden temporary files, an evaluation still
without its ``metrics.json`` and a training still without its adapter (their partial files
would mix with a rerun's).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from prefrec.errors import PrefrecError

log = logging.getLogger(__name__)

RECORD_SUFFIXES = frozenset({".json", ".jsonl", ".md", ".html", ".png", ".yaml"})
WEIGHT_DIRS = frozenset({"adapter", "checkpoints"})


def _unfinished(folder: Path) -> bool:
    """An evaluation without its summary or a training without its adapter."""
    if (folder / "scores.jsonl").is_file() and not (folder / "metrics.json").is_file():
        return True
    return (folder / "log.jsonl").is_file() and not (folder / "adapter" / "adapter_config.json").is_file()


def record_files(out: Path, skip_dirs: Iterable[Path] = ()) -> list[Path]:
    """The record's files under run folder ``out``, relative to it, sorted.

    ``skip_dirs``: folders left out whole (the run's data folders)."""
    out = Path(out)
    skipped = {Path(d).resolve() for d in skip_dirs}
    files: list[Path] = []
    for root, dirs, names in os.walk(out):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in WEIGHT_DIRS
                         and (here / d).resolve() not in skipped
                         and not _unfinished(here / d))
        files.extend((here / n).relative_to(out) for n in names
                     if not n.startswith(".") and Path(n).suffix in RECORD_SUFFIXES)
    return sorted(files)


def publish_record(out: Path, dest: Path, skip_dirs: Iterable[Path] = ()) -> int:
    """Replace folder ``dest`` with the record of run folder ``out``; returns the file count.

    Written to a temporary sibling first and swapped in with renames, so ``dest`` is at
    every moment either the previous record or the new one, never a half-copied mix."""
    out, dest = Path(out), Path(dest)
    if dest.resolve() == out.resolve() or out.resolve() in dest.resolve().parents:
        raise PrefrecError(f"--publish {dest}: must not be the run folder {out} or inside it")
    files = record_files(out, skip_dirs)
    tmp = dest.parent / f".{dest.name}.publish.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for rel in files:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / rel, tmp / rel)
    tmp.mkdir(parents=True, exist_ok=True)  # an empty record is still a record
    old = dest.parent / f".{dest.name}.publish.old"
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return len(files)


def restore_record(src: Path, out: Path) -> int:
    """Copy the record in ``src`` into run folder ``out``, never over a file ``out`` has;
    returns how many files were copied."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise PrefrecError(f"--restore {src}: no such folder")
    copied = 0
    for rel in record_files(src):
        target = out / rel
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, target)
        copied += 1
    log.info("restored %d files of the record in %s into %s", copied, src, out)
    return copied
