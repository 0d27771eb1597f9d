"""Reading config files: YAML mappings, unknown keys and value types, as one-line errors.

Every YAML a user writes (``prefrec run`` configs and their ``key=value`` overrides,
``prefrec study`` files, ``prefrec baselines --config``) is checked here against the type
hints of the dataclasses that describe it, before anything runs. Without the check a
wrong type surfaces minutes later, deep in a stage, as a traceback
(``eval: {limit: sixty}`` used to end in ``TypeError: '<' not supported between
instances of 'str' and 'int'``); with it the error names the key, the type it needs and
the value given::

    run.yaml: eval.limit: expected an integer or null, got 'sixty'
    run.yaml: eval.limit (set by override eval.limit=abc): expected an integer or null, got 'abc'
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from prefrec.errors import PrefrecError

_SHOWN_CHARS = 60  # a value quoted in an error is cut to this length
_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
          type(None): "null", dict: "a mapping", list: "a list"}
_PLURALS = {int: "integers", float: "numbers", str: "strings", bool: "booleans",
            dict: "mappings", list: "lists"}


# --------------------------------------------------------------------------- files


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty file: ``{}``); one-line errors for a
    missing or unreadable file, bad bytes, bad YAML and nesting that exhausts the parser."""
    if not path.is_file():
        raise PrefrecError(f"{path}: no such {what} file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise PrefrecError(f"{path}: not valid UTF-8 (byte offset {err.start})") from None
    except OSError as err:
        raise PrefrecError(f"{path}: cannot read file: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise PrefrecError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    except RecursionError:
        raise PrefrecError(f"{path}: not valid YAML (nested too deeply)") from None
    if not isinstance(data, dict):
        raise PrefrecError(f"{path}: expected a mapping at the top level")
    return data


def check_keys(section: str, given: Mapping[Any, Any], allowed: set[str], source: str) -> None:
    """Refuse keys outside ``allowed``, naming them and the ones that exist."""
    unknown = sorted(str(k) for k in set(given) - allowed)
    if unknown:
        raise PrefrecError(
            f"{source}: unknown key(s) {', '.join(unknown)} in {section}; "
            f"expected some of: {', '.join(sorted(allowed))}"
        )


# --------------------------------------------------------------------------- types


def matches(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a type hint. An integer is a valid float, a boolean is
    not a number, a float must be finite, and ``list[X]``/``dict[K, V]`` check every item."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(matches(value, h) for h in args)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if hint is None or hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return (isinstance(value, int | float) and not isinstance(value, bool)
                and math.isfinite(value))
    if origin is list:
        return isinstance(value, list) and all(matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            matches(k, args[0]) and matches(v, args[1]) for k, v in value.items()
        )
    return isinstance(value, origin or hint)


def describe(hint: Any, plural: bool = False) -> str:
    """A type hint in words: ``int | None`` -> "an integer or null"."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(h, plural) for h in args)
    if origin is Literal:
        words = [yaml.safe_dump(a, default_flow_style=True).strip().removesuffix("...").strip()
                 for a in args]
        return words[0] if len(words) == 1 else "one of " + ", ".join(words)
    if origin is list:
        return ("lists" if plural else "a list") + (
            "" if args[0] is Any else f" of {describe(args[0], plural=True)}")
    if origin is dict:
        return "mappings" if plural else "a mapping"
    if hint is Any:
        return "anything"
    base = hint if hint is not None else type(None)
    return (_PLURALS if plural else _NAMES).get(base, getattr(base, "__name__", str(base)))


def _cut(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def shown(value: Any) -> str:
    """A value as an error quotes it: its repr, cut short when long (a 100,000-character
    string must not become a 100,000-character error line)."""
    if isinstance(value, bool) or value is None:
        return "true" if value is True else "false" if value is False else "null"  # as YAML
    return _cut(repr(value))


def check_value(where: str, value: Any, hint: Any) -> None:
    """Raise ``<where>: expected <type>, got <value>`` unless ``value`` fits ``hint``."""
    if not matches(value, hint):
        hint_text = describe(hint)
        if isinstance(value, str) and hint_text.startswith(("a number", "an integer")):
            try:
                float(value)
            except ValueError:
                pass
            else:  # YAML 1.1 reads 5e-5 (no dot) as a string
                hint_text += " (YAML reads a number without a dot, such as 5e-5, as a string: " \
                             "write 5.0e-5)"
        raise PrefrecError(f"{where}: expected {hint_text}, got {shown(value)}")


def dataclass_hints(cls: type, exclude: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """Field name -> resolved type hint of a dataclass, less ``exclude``."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name not in exclude}


class ConfigSource:
    """Where a config value came from, for errors: the file, and the override that set it.

    ``overrides`` maps dotted keys (``eval.limit``) to the override text that set them
    (``eval.limit=abc``); a key under an overridden one (``eval.limit`` under ``eval=...``)
    is attributed to that override.
    """

    def __init__(self, path: str | Path, overrides: Mapping[str, str] | None = None) -> None:
        self.path = str(path)
        self.overrides = dict(overrides or {})

    def where(self, key: str) -> str:
        """``<file>: a.b``, plus `` (set by override a.b=v)`` when an override set it
        (``""``: the file alone)."""
        if not key:
            return self.path
        # experiments[0].name is under the override experiments=[...]
        parts = [re.sub(r"\[\d+\]$", "", part) for part in key.split(".")]
        for n in range(len(parts), 0, -1):
            text = self.overrides.get(".".join(parts[:n]))
            if text is not None:
                return f"{self.path}: {key} (set by override {_cut(text)})"
        return f"{self.path}: {key}"


def check_section(source: ConfigSource, section: str, given: Any,
                  hints: Mapping[str, Any]) -> None:
    """A config section: a mapping, with known keys only, each value of its type.

    ``section`` is the dotted prefix of the keys (``""`` for the top level).
    """
    label = section or "the top level"
    if not isinstance(given, dict):
        raise PrefrecError(f"{source.where(section)}: expected a mapping, got {shown(given)}")
    check_keys(label, given, set(hints), source.path)
    for key, value in given.items():
        check_value(source.where(f"{section}.{key}" if section else str(key)), value, hints[key])
