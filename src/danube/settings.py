"""A setting is one dataclass field: its type, its default, one line of documentation and its allowed range.

    lr: float = setting(2e-4, "peak learning rate, reached at the end of warm-up", above=0)

:func:`check_ranges` (called by every section's ``__post_init__``) refuses a value outside
the range in one line naming the key; :func:`rows` lists a schema's settings for the
README's table (tests/test_config_schema.py keeps the two equal). The schemas themselves are in
:mod:`danube.config` (and :class:`danube.precision.PrecisionConfig`, beside what it configures).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Iterator

_RANGE = ("min", "max", "above", "below", "choices")


def setting(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = None, **limits: Any) -> Any:
    """A dataclass field documented by ``doc`` and checked against ``limits`` (min, max, above, below, choices).

    ``factory`` builds a mutable default (a list, a section) as ``default_factory`` does.
    """
    unknown = set(limits) - set(_RANGE)
    if unknown:
        raise TypeError(f"setting(): unknown limits {sorted(unknown)}; allowed: {_RANGE}")
    metadata = {"doc": doc, **limits}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def shown(value: Any) -> str:
    """A value as a user would type it on the command line (``-1``, not ``-1.0``)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def choice_text(choice: Any) -> str:
    """A choice as YAML writes it (``true``, not ``True``)."""
    return str(choice).lower() if isinstance(choice, bool) else str(choice)


def check_ranges(section: Any, prefix: str) -> None:
    """Refuse any field of ``section`` outside its declared range, naming ``prefix.key`` and the value."""
    for f in dataclasses.fields(section):
        value, meta = getattr(section, f.name), f.metadata
        key = f"{prefix}.{f.name}" if prefix else f.name
        if value is None or isinstance(value, bool) or not any(k in meta for k in _RANGE):
            continue
        if "choices" in meta and value not in meta["choices"]:
            raise ValueError(f"{key}={value!r}; allowed: {', '.join(map(choice_text, meta['choices']))}")
        if not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key}={value!r} must be a finite number")
        if "min" in meta and value < meta["min"]:
            raise ValueError(f"{key}={shown(value)} must be >= {meta['min']}")
        if "max" in meta and value > meta["max"]:
            raise ValueError(f"{key}={shown(value)} must be <= {meta['max']}")
        if "above" in meta and value <= meta["above"]:
            raise ValueError(f"{key}={shown(value)} must be > {meta['above']}")
        if "below" in meta and value >= meta["below"]:
            raise ValueError(f"{key}={shown(value)} must be < {meta['below']}")


def range_text(meta: Any) -> str:
    """The allowed values of a setting as the README's table shows them."""
    parts = []
    if "choices" in meta:
        parts.append(" \\| ".join(choice_text(c) for c in meta["choices"]))
    if "min" in meta:
        parts.append(f">= {meta['min']}")
    if "max" in meta:
        parts.append(f"<= {meta['max']}")
    if "above" in meta:
        parts.append(f"> {meta['above']}")
    if "below" in meta:
        parts.append(f"< {meta['below']}")
    return ", ".join(parts)


def rows(schema: type, prefix: str = "") -> Iterator[tuple[str, str, Any, str, str]]:
    """``(key, type, default, allowed, doc)`` of every setting of ``schema``, its sections expanded."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        kind = hints[f.name]
        section = section_of(kind)
        if section is not None and f.default_factory is section:  # a section always there: its settings
            yield from rows(section, key + ".")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "???"
        yield key, type_text(kind), default, range_text(f.metadata), f.metadata.get("doc", "")
        if section is not None:  # an optional section, a list of them or a mapping of named ones
            origin = typing.get_origin(strip_none(kind))
            yield from rows(section, key + ("[]." if origin is list else ".NAME." if origin is dict else "."))


def strip_none(kind: Any) -> Any:
    """``X`` for ``X | None`` (and ``Optional[X]``); any other type as it is."""
    import types

    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0] if len(args) == 1 else kind
    return kind


def section_of(kind: Any) -> type | None:
    """The dataclass a field holds: itself, optional, in a list or as a mapping's values (else None)."""
    kind = strip_none(kind)
    origin = typing.get_origin(kind)
    if origin is list:
        kind = typing.get_args(kind)[0]
    elif origin is dict:
        kind = typing.get_args(kind)[1]
    return kind if dataclasses.is_dataclass(kind) else None


def type_text(kind: Any) -> str:
    """``int``, ``str | None``, ``list[float]``, ``StageConfig``: a type as it reads in the source."""
    import types

    if kind is typing.Any:
        return "any"
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_text(a) for a in typing.get_args(kind))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_text(a) for a in typing.get_args(kind))}]"
    return "null" if kind is type(None) else kind.__name__
