"""Adapter lineage: which base model and parent adapters an adapter folder sits on.

An aligned adapter is trained on top of the SFT model (base + SFT adapter merged), so
using it needs the whole chain. Each adapter folder prefrec writes carries
``prefrec_adapter.json`` next to PEFT's own files, and :func:`adapter_chain` follows it,
so ``prefrec eval --adapter runs/align`` needs no other flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prefrec.data.reading import read_json_file
from prefrec.errors import PrefrecError
from prefrec.io import atomic_write_json

META_FILE = "prefrec_adapter.json"


@dataclass
class AdapterChain:
    """A base model and the adapters to apply to it, oldest first."""

    base_model: str
    adapters: list[Path] = field(default_factory=list)
    template: str | None = None


def write_adapter_meta(
    adapter_dir: str | Path,
    base_model: str,
    parents: list[str | Path],
    template: str,
    extra: dict | None = None,
) -> None:
    """Record the lineage of a freshly saved adapter folder."""
    meta = {
        "base_model": base_model,
        "parents": [str(Path(p).resolve()) for p in parents],
        "template": template,
        **(extra or {}),
    }
    atomic_write_json(Path(adapter_dir) / META_FILE, meta)


def adapter_chain(adapter_dir: str | Path | None, default_model: str) -> AdapterChain:
    """Resolve ``adapter_dir`` (or no adapter) into a base model and an ordered chain."""
    if adapter_dir is None:
        return AdapterChain(default_model)
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise PrefrecError(f"{adapter_dir}: not a PEFT adapter folder (no adapter_config.json)")
    meta_path = adapter_dir / META_FILE
    if not meta_path.is_file():
        # A plain PEFT adapter trained elsewhere: apply it alone to the given model.
        return AdapterChain(default_model, [adapter_dir])
    meta = read_json_file(meta_path)
    if not isinstance(meta, dict) or not isinstance(meta.get("parents", []), list):
        raise PrefrecError(f"{meta_path}: expected an object with a list of parents")
    parents = [Path(p) for p in meta.get("parents", [])]
    for p in parents:
        if not (p / "adapter_config.json").is_file():
            raise PrefrecError(f"{meta_path}: parent adapter {p} is missing")
    return AdapterChain(meta.get("base_model", default_model), parents + [adapter_dir],
                        meta.get("template"))
