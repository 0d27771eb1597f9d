"""Baseline hyperparameters: one dataclass per method, overridable from a YAML file.

A config file has one optional section per method, plus ``validation_fraction`` (the share
of training users held out for the search)::

    validation_fraction: 0.2
    itemknn: {neighbours: 50, shrinkage: 10.0}   # fixed values leave the search
    bpr: {dim: 32, grid: {epochs: [20, 50]}}      # or replace the grid outright
    sasrec: {grid: {}}                            # no search: the defaults are used

A field set in the file is fixed: it is removed from that method's default ``grid``, so
the search only varies what the file leaves open. Unknown sections, fields and values of
the wrong type are errors naming them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

from prefrec.baselines.content import ContentConfig
from prefrec.baselines.itemknn import ItemKNNConfig
from prefrec.baselines.popularity import PopularityConfig
from prefrec.config_io import check_value, matches, read_yaml_mapping
from prefrec.errors import PrefrecError


# The torch-based methods keep their configs here so that reading a config (and building
# the CLI) does not import torch.
@dataclass
class BPRConfig:
    dim: int = 32
    epochs: int = 30
    lr: float = 0.01
    reg: float = 1e-3
    batch_size: int = 256
    explicit_negative_share: float = 0.5
    init_std: float = 0.1
    fold_in: str = "gradient"
    fold_in_steps: int = 50
    fold_in_lr: float = 0.05
    grid: dict[str, list[Any]] = field(
        default_factory=lambda: {
            "dim": [16, 64],
            "epochs": [3, 10, 30, 100],
            "fold_in": ["mean", "gradient"],
        }
    )


@dataclass
class SASRecConfig:
    hidden: int = 64
    blocks: int = 2
    heads: int = 1
    max_len: int = 50
    dropout: float = 0.2
    epochs: int = 50
    lr: float = 1e-3
    batch_size: int = 128
    grid: dict[str, list[Any]] = field(default_factory=lambda: {"epochs": [10, 25, 50, 100]})


@dataclass
class BaselinesConfig:
    validation_fraction: float = 0.2
    popularity: PopularityConfig = field(default_factory=PopularityConfig)
    itemknn: ItemKNNConfig = field(default_factory=ItemKNNConfig)
    bpr: BPRConfig = field(default_factory=BPRConfig)
    content: ContentConfig = field(default_factory=ContentConfig)
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)

    def method(self, name: str) -> Any:
        return getattr(self, name)


def _override(section: str, base: Any, values: Any) -> Any:
    """``base`` with ``values`` applied; fixed fields leave the default grid."""
    if not isinstance(values, dict):
        raise PrefrecError(f"baselines config: section '{section}' must be a mapping")
    hints = get_type_hints(type(base))
    names = {f.name for f in fields(base)}
    for name, value in values.items():
        if name not in names:
            raise PrefrecError(
                f"baselines config: {section}: unknown field '{name}'; known: {', '.join(sorted(names))}"
            )
        check_value(f"baselines config: {section}.{name}", value, hints[name])
    fixed = {k: (float(v) if hints[k] is float else v) for k, v in values.items()}
    if "grid" not in fixed:
        fixed["grid"] = {k: v for k, v in base.grid.items() if k not in fixed}
    return replace(base, **fixed)


def config_from_dict(values: dict[str, Any] | None) -> BaselinesConfig:
    """A :class:`BaselinesConfig` from a parsed YAML mapping (``None``: the defaults)."""
    config = BaselinesConfig()
    if values is None:
        return config
    if not isinstance(values, dict):
        raise PrefrecError("baselines config: expected a mapping of method sections")
    known = {f.name for f in fields(config)}
    for key, value in values.items():
        if key not in known:
            raise PrefrecError(
                f"baselines config: unknown section '{key}'; known: {', '.join(sorted(known))}"
            )
        if key == "validation_fraction":
            if not matches(value, float) or not 0 < value < 1:
                raise PrefrecError(f"baselines config: validation_fraction {value!r}: expected 0 < x < 1")
            config = replace(config, validation_fraction=float(value))
        else:
            config = replace(config, **{key: _override(key, getattr(config, key), value)})
    return config


def load_config(path: str | Path | None) -> BaselinesConfig:
    """Read a YAML config file (``None``: the defaults); errors name the file."""
    if path is None:
        return BaselinesConfig()
    path = Path(path)
    values = read_yaml_mapping(path, "baselines config")
    try:
        return config_from_dict(values)
    except PrefrecError as err:
        raise PrefrecError(f"{path}: {err}") from None
