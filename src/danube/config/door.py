"""The one door from a composed Hydra config to the typed config a task runs on.

:func:`typed` checks what composition lets through (keys added with ``+``, values left
``???``), moves renamed keys to their new names, and builds the schema's dataclasses,
whose ``__post_init__`` checks ranges and cross-field rules. :func:`one_line` turns
Hydra's and OmegaConf's own (multi-line) errors into one line naming the key, the bad
value and the closest valid name. Nothing below ``danube.tasks`` sees a ``DictConfig``.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
import typing
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from danube.settings import rows, section_of, strip_none

log = logging.getLogger(__name__)

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value, key or choice that cannot run: one line, naming it."""


# -- the schema's shape ----------------------------------------------------------------------
def _kinds(schema: type) -> dict[str, Any]:
    """Each field's type, ``| None`` taken off (``Optional`` sections are sections too); class constants left out."""
    hints = typing.get_type_hints(schema)
    return {name: strip_none(hints[name]) for name in field_names(schema)}


def field_names(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def all_keys(schema: type, prefix: str = "") -> list[str]:
    """Every dotted key of ``schema``, its sections expanded (``optim.lr``, ``train.max_steps``, ...)."""
    out = []
    for name, kind in _kinds(schema).items():
        if dataclasses.is_dataclass(kind):
            out += all_keys(kind, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def closest(word: str, options: list[str]) -> str | None:
    """The option most like ``word`` (difflib), or None when none is close."""
    found = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return found[0] if found else None


def _did_you_mean(key: str, root: type | None) -> str:
    """`` (did you mean optim.lr?)`` for ``train.lrr``: a key of the same section first, then of any section."""
    if root is None:
        return ""
    keys = all_keys(root)
    section, _, leaf = key.rpartition(".")
    for candidates in ([k for k in keys if k.rpartition(".")[0] == section], keys):
        by_leaf = {k.rpartition(".")[2]: k for k in reversed(candidates)}
        guess = closest(leaf, list(by_leaf))
        if guess:
            return f" (did you mean {by_leaf[guess]}?)"
    return ""


# -- what composition lets through ------------------------------------------------------------
def unknown_keys(node: Any, schema: type, path: str = "", root: type | None = None) -> None:
    """Refuse keys ``schema`` does not have (``+train.lrr=1`` composes: ``+`` lifts Hydra's struct check)."""
    root = root or schema
    if not _present(node):
        return
    extra = _extra(node, schema)
    if extra:
        raise ConfigError(unknown_message(path, extra, schema, root))
    for name, kind in _kinds(schema).items():
        child, item = node._get_node(name), section_of(kind)
        if child is None or item is None:
            continue
        key = f"{path}.{name}" if path else name
        if dataclasses.is_dataclass(kind):
            unknown_keys(child, kind, key, root)
        elif typing.get_origin(kind) is list and isinstance(child, ListConfig) and not child._is_none():
            for i in range(len(child)):
                element = child._get_node(i)
                extra = _extra(element, item)
                if extra:
                    label = element.get("name") if "name" in element else None
                    raise ConfigError(f"{key}[{i}]{f' ({label})' if label else ''}: unknown keys {sorted(extra)}; "
                                      f"allowed: {', '.join(field_names(item))}")
        elif typing.get_origin(kind) is dict and _present(child):
            for entry in child.keys():
                extra = _extra(child._get_node(entry), item)
                if extra:
                    raise ConfigError(f"{key}.{entry}: unknown key(s) {', '.join(extra)}; allowed: "
                                      f"{', '.join(field_names(item))}")


def unknown_message(section: str, extra: list[str], schema: type, root: type | None) -> str:
    keys = [f"{section}.{k}" if section else k for k in extra]
    hint = _did_you_mean(keys[0], root) if len(keys) == 1 else ""
    return (f"unknown config key(s) {', '.join(keys)}{hint}; {section or 'the top level'} has "
            f"{', '.join(field_names(schema))}")


def _present(node: Any) -> bool:
    """A mapping node with content (not None, not ``???``, not an interpolation)."""
    return isinstance(node, DictConfig) and not (node._is_none() or node._is_missing() or node._is_interpolation())


def _extra(node: Any, schema: type) -> list[str]:
    return [str(k) for k in node.keys() if k not in field_names(schema)] if _present(node) else []


def renamed(cfg: DictConfig, renames: dict[str, str], script: str) -> DictConfig:
    """``cfg`` with the keys renamed in this release moved to their new names (the old ones warn)."""
    present = [old for old in renames if old in cfg and not OmegaConf.is_missing(cfg, old) and cfg[old] is not None]
    if not present:
        return cfg
    cfg = cfg.copy()
    with open_dict(cfg):
        for old in present:
            new, value = renames[old], cfg[old]
            theirs = None if OmegaConf.is_missing(cfg, new) else cfg.get(new)
            if theirs is not None and theirs != value:
                raise ConfigError(f"{old}={value} and {new}={theirs}: {old} is the old name of {new}; give {new} only")
            log.warning("%s: %s= is deprecated and goes in the next release; use %s=%s", script, old, new, value)
            cfg[new] = value
            cfg[old] = None
    return cfg


def typed(cfg: DictConfig, schema: type[T], script: str, required: dict[str, str] | None = None) -> T:
    """The composed ``cfg`` as ``schema``'s dataclass: every check that needs no file or device, once.

    ``required`` says, for a key left ``???``, what to pass (``{"model_dir": "model_dir=PATH is required: ..."}``).
    """
    cfg = renamed(cfg, getattr(schema, "RENAMED", {}), script)
    unknown_keys(cfg, schema)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        first = missing[0]
        doc = {key: doc for key, _, _, _, doc in rows(schema)}.get(first)
        also = f"; also missing: {', '.join(missing[1:])}" if len(missing) > 1 else ""
        raise ConfigError((required or {}).get(first) or
                          f"{first}=??? must be given: pass {first}=VALUE{f' ({doc})' if doc else ''}{also}")
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:  # an interpolation that does not resolve, a bad value
        raise ConfigError(one_line(err)) from err


# -- old recorded configs -------------------------------------------------------------------
def with_defaults(values: dict, schema: type) -> dict:
    """A config an earlier release recorded, with this schema's defaults for the keys it did not have yet.

    Stages, chat sources and every other section are filled field by field, so that a run
    directory recorded before a setting existed compares equal to the same run now.
    """
    out = dict(values)
    kinds = _kinds(schema)
    for f in dataclasses.fields(schema):
        if f.name not in out:
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
                out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
            continue
        value, kind, item = out[f.name], kinds[f.name], section_of(kinds[f.name])
        if item is None:
            continue
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            out[f.name] = with_defaults(value, kind)
        elif typing.get_origin(kind) is list and isinstance(value, list):
            out[f.name] = [with_defaults(v, item) if isinstance(v, dict) else v for v in value]
        elif typing.get_origin(kind) is dict and isinstance(value, dict):
            out[f.name] = {k: with_defaults(v, item) if isinstance(v, dict) else v for k, v in value.items()}
    return out


# -- Hydra's and OmegaConf's errors in one line ---------------------------------------------
def _first_line(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), str(text))


def one_line(err: BaseException, root: type | None = None) -> str:
    """One line for a composition error: the key or choice, what is wrong, the closest valid name."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    if isinstance(err, MissingConfigException):
        path = str(getattr(err, "missing_cfg_file", "") or "")
        group, _, option = path.rpartition("/")
        options = list(getattr(err, "options", None) or [])
        if group:
            guess = closest(option, options)
            hint = f" (did you mean {group}={guess}?)" if guess else ""
            return (f"{group}={option}: no such option{hint}; {group} has {', '.join(options) or 'no options'} "
                    f"(conf/{group}/)")
        return _first_line(err)
    if isinstance(err, OverrideParseException):
        return (f"an override does not parse: {_first_line(err)} (key=value, group=option, +key=value; quote "
                "lists and dicts: 'key=[a,b]')")
    cause = err.__cause__ if isinstance(err, ConfigCompositionException) and err.__cause__ is not None else err
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and getattr(cause, "full_key", None):
        key = str(cause.full_key)
        schema = getattr(cause, "object_type", None)
        section = key.rpartition(".")[0]
        if dataclasses.is_dataclass(schema):
            where = f" (in {_merging(err)})" if _merging(err) else ""
            return unknown_message(section, [key.rpartition(".")[2]], schema, root) + where
        return f"unknown config key {key}{_did_you_mean(key, root)}"
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        conversion = re.match(r"Value '(.*)' of type '\w+' could not be converted to (\w+)", _first_line(cause))
        if conversion:  # "Value 'abc' of type 'str' could not be converted to Float"
            value, kind = conversion.groups()
            return f"{cause.full_key}={value!r} is not {'an' if kind[0] in 'AEIOU' else 'a'} {kind.lower()}"
        return f"{cause.full_key}: {_lower(_first_line(cause))}"
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return f"{cause.full_key}: {_lower(_first_line(cause))}"
    text = _first_line(err)
    if cause is not err:
        text += f": {_first_line(cause)}"
    return text


def _merging(err: BaseException) -> str | None:
    """The config file a composition error arose in (``conf/model/mine.yaml``), when Hydra names it."""
    match = re.search(r"Error merging '([^']+)'", str(err))
    return f"conf/{match.group(1)}.yaml" if match else None


def _lower(text: str) -> str:
    return text[:1].lower() + text[1:]
