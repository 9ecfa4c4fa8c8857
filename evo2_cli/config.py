"""Strict YAML configs shared by every command.

A config is a tree of typed dataclasses (one per section). Loading is strict: an unknown key, a value of the
wrong type or one that fails a dataclass's `__post_init__` check is a `ConfigError` naming the file, the line,
the dotted key and the fix. `--set section.key=value` overrides go through the same path, so they are checked
exactly like the file. No interpolation or arithmetic inside YAML.

Section dataclasses validate themselves in `__post_init__` with `check(cond, field, message)`; a section may
define a classmethod `expand_config(raw: dict) -> dict` that rewrites its raw mapping before validation (for
example to expand a named preset under explicit keys).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from evo2_cli.errors import ConfigError, InputError, shorten

T = TypeVar("T")


class FieldError(ValueError):
    """Raised by a section's `__post_init__`; `field` is the key relative to that section."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


def check(condition: bool, field: str, message: str) -> None:
    """Validation helper for `__post_init__`: raise a FieldError naming `field` unless `condition`."""
    if not condition:
        raise FieldError(field, message)


# ---------------------------------------------------------------- YAML with line numbers


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `3e-4` as a float (YAML 1.1 demands a dot, which surprises everyone)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

KeyPath = tuple[str, ...]


def parse_yaml_value(text: str, key: str = "", where: str = "--set") -> Any:
    """One scalar or flow value as it would read in a config file (`--set` values), read with the same
    checks: a tag that builds objects is a ConfigError naming `key` and `where` (the override's label)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        path = tuple(key.split(".")) if key else ()
        return None if node is None else _node_to_python(loader, node, path, {}, lambda line: where)
    finally:
        loader.dispose()


# Where a node is: 'FILE:LINE' for a file, the override's label for a --set value
Locate = Callable[[int], str]


def _check_tag(loader: _Loader, node: yaml.Node, path: KeyPath, locate: Locate) -> None:
    """Refuse an explicit tag that is not plain data. The walk below builds mappings and lists itself, so
    without this a `!!python/object:...` mapping would pass as a plain one (and read as unknown keys)."""
    if isinstance(node, yaml.MappingNode):
        plain = node.tag == yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG
    elif isinstance(node, yaml.SequenceNode):
        plain = node.tag == yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG
    else:
        plain = node.tag in loader.yaml_constructors
    if plain:
        return
    tag = node.tag.replace("tag:yaml.org,2002:", "!!")
    where = locate(node.start_mark.line + 1)
    if tag.startswith("!!python/"):
        problem = f"unsafe YAML tag '{shorten(tag)}': a config holds plain values, never Python objects"
    else:
        problem = f"unsupported YAML tag '{shorten(tag)}'"
    raise ConfigError(".".join(path), problem, where, "remove the tag")


def _node_to_python(
    loader: _Loader, node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int], locate: Locate
):
    _check_tag(loader, node, path, locate)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                problem = f"keys must be strings, got {shorten(repr(key))}"
                raise ConfigError(".".join(path), problem, locate(line))
            if key in out:
                dotted = ".".join((*path, key))
                raise ConfigError(dotted, "appears twice", locate(line), "keep one of the two entries")
            lines[(*path, key)] = line
            out[key] = _node_to_python(loader, value_node, (*path, key), lines, locate)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [
            _node_to_python(loader, item, (*path, str(i)), lines, locate) for i, item in enumerate(node.value)
        ]
    return loader.construct_object(node, deep=True)


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[KeyPath, int]]:
    """Parse a YAML mapping; returns it and the line of every key. Raises InputError on unreadable files."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read config file: {exc}") from None
    loader = _Loader(text)
    lines: dict[KeyPath, int] = {}
    try:
        node = loader.get_single_node()
        data = {} if node is None else _node_to_python(loader, node, (), lines, lambda line: f"{path}:{line}")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise InputError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise InputError(f"{path}: a config file must be a mapping of sections, got {type(data).__name__}")
    if not data:  # every command refuses it alike, rather than running on defaults the user never saw
        raise InputError(f"{path}: empty config file; write the sections to set in it (examples in configs/)")
    return data, lines


class _Source:
    """Tells where a key came from: 'FILE:LINE', or the override's label ('--set KEY' or a flag's name)."""

    def __init__(self, name: str | None, lines: dict[KeyPath, int], overridden: dict[KeyPath, str]):
        self.name, self.lines, self.overridden = name, lines, overridden

    def where(self, path: KeyPath) -> str | None:
        if path and path not in self.lines and path not in self.overridden:
            # A section no file gives, made by an override of a key inside it: `--set foo.bar=1` makes 'foo'.
            made_by = (label for key, label in self.overridden.items() if key[: len(path)] == path)
            label = next(made_by, None)
            if label is not None:
                return label
        for end in range(len(path), 0, -1):
            if path[:end] in self.overridden:
                return self.overridden[path[:end]]
            if path[:end] in self.lines:
                return f"{self.name}:{self.lines[path[:end]]}"
        return self.name


# ---------------------------------------------------------------- typed construction


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return repr(tp).replace("typing.", "")
    return "null" if tp is type(None) else getattr(tp, "__name__", repr(tp))


def _coerce(tp: Any, value: Any, path: KeyPath, source: _Source) -> Any:
    dotted = ".".join(path)

    def fail(expected: str) -> ConfigError:
        return ConfigError(dotted, f"expected {expected}, got {shorten(repr(value))}", source.where(path))

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, path, source)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise fail(_type_name(tp))
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise fail(f"one of {_type_name(tp)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail(f"a list ({_type_name(tp)})")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise fail(f"a list of {len(args)} items")
            pairs = enumerate(zip(args, value, strict=True))
            return tuple(_coerce(a, v, (*path, str(i)), source) for i, (a, v) in pairs)
        item_type = args[0] if args else Any
        items = [_coerce(item_type, v, (*path, str(i)), source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        key_type, value_type = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise fail("a mapping")
        return {
            _coerce(key_type, k, (*path, str(k)), source): _coerce(value_type, v, (*path, str(k)), source)
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:
            value = {}
        return _build(tp, value, path, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)
        raise fail("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail("a string")
    if tp is Path:
        if isinstance(value, (str, Path)) and str(value):
            return Path(value)
        raise fail("a path")
    raise TypeError(f"config type {tp!r} at {dotted} is not supported by the loader")


def _build(cls: type[T], raw: Any, prefix: KeyPath, source: _Source) -> T:
    dotted = ".".join(prefix) or "<root>"
    if not isinstance(raw, dict):
        problem = f"expected a mapping of keys, got {shorten(repr(raw))}"
        raise ConfigError(dotted, problem, source.where(prefix))
    expand = getattr(cls, "expand_config", None)
    if expand is not None:
        try:
            raw = expand(dict(raw))
        except FieldError as exc:
            path = (*prefix, *exc.field.split("."))
            raise ConfigError(".".join(path), exc.message, source.where(path)) from None
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{close[0]}'?" if close else "known keys: " + ", ".join(names)
            path = (*prefix, str(key))
            raise ConfigError(".".join(path), "unknown key", source.where(path), hint)
    kwargs = {name: _coerce(hints[name], raw[name], (*prefix, name), source) for name in names if name in raw}
    try:
        return cls(**kwargs)
    except FieldError as exc:
        path = (*prefix, *exc.field.split("."))
        raise ConfigError(".".join(path), exc.message, source.where(path)) from None
    except TypeError as exc:  # a required field is missing
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.init
            and f.name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if not missing:
            raise
        path = (*prefix, missing[0])
        raise ConfigError(
            ".".join(path), "is required", source.where(prefix), f"set it: --set {'.'.join(path)}=..."
        ) from exc


# ---------------------------------------------------------------- public API


# An override: 'a.b.c=value' (from --set), or ('a.b.c=value', label) where the label names what the user
# typed, e.g. the flag '--split', for a value's error messages (None: '--set a.b.c').
Override = str | tuple[str, str | None]


def apply_override(raw: dict[str, Any], assignment: str, label: str | None = None) -> KeyPath:
    """Apply one `a.b.c=value` to the raw mapping in place; returns the key path. `label` names the
    override in an error about its value (default '--set a.b.c')."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(key, f"--set expects section.key=value, got {shorten(repr(assignment))}", "--set")
    try:
        where = label or "--set " + shorten(key)
        value = parse_yaml_value(text, key, where) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"cannot parse value {shorten(repr(text))}: {exc}", "--set") from None
    path = tuple(key.split("."))
    node = raw
    for depth, part in enumerate(path[:-1]):
        if isinstance(node, list) or part.isdigit():  # an item of a list the file has: data.datasets.0.path=
            child = node[_list_index(node, path[: depth + 1])]
        else:
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
        if not isinstance(child, (dict, list)):
            raise ConfigError(
                ".".join(path[: depth + 1]), "is not a section, cannot set a key inside it", "--set"
            )
        node = child
    if isinstance(node, list) or path[-1].isdigit():
        node[_list_index(node, path)] = value
    else:
        node[path[-1]] = value
    return path


def _list_index(items: list | dict, path: KeyPath) -> int:
    part, parent = path[-1], ".".join(path[:-1])
    if not isinstance(items, list):  # a numeric key where the config files have no list (yet)
        problem = f"{parent} is not a list in the config file, so it has no item {part} to set"
    elif not part.isdigit() or int(part) >= len(items):
        problem = f"the list {parent} has {len(items)} item(s), indexed from 0"
    else:
        return int(part)
    raise ConfigError(".".join(path), problem, "--set", f"set the whole list instead: --set '{parent}=[...]'")


def build_config(
    cls: type[T],
    raw: dict[str, Any],
    overrides: Sequence[Override] = (),
    name: str | None = None,
    lines: dict[KeyPath, int] | None = None,
) -> T:
    """Validate a raw mapping (plus overrides, applied in order) into the dataclass `cls`."""
    raw = _deep_copy(raw)
    overridden: dict[KeyPath, str] = {}  # key -> the label of the last override that set it
    for override in overrides:
        assignment, label = (override, None) if isinstance(override, str) else override
        path = apply_override(raw, assignment, label)
        overridden[path] = label or "--set " + shorten(".".join(path))
    return _build(cls, raw, (), _Source(name, lines or {}, overridden))


def load_config(cls: type[T], path: Path | None = None, overrides: Sequence[Override] = ()) -> T:
    """Load `path` (or only defaults when None), apply overrides, validate into `cls`."""
    raw, lines = read_yaml(Path(path)) if path is not None else ({}, {})
    return build_config(cls, raw, overrides, str(path) if path is not None else None, lines)


def to_dict(obj: Any) -> Any:
    """A config as plain YAML-able data (paths as strings, tuples as lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=None, width=110)


def _deep_copy(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: _deep_copy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_deep_copy(v) for v in raw]
    return raw
