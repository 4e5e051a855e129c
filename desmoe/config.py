"""Experiment configs: dataclasses filled from YAML plus dotted CLI overrides.

``load_config(MyConfig, "configs/x.yaml", ["train.lr=3e-4"])`` returns a
validated ``MyConfig``.  Every field is type-checked on the way in; unknown keys
and bad values raise :class:`ConfigError` naming the source and the dotted key.
A dataclass may define ``check(self)`` for cross-field rules; it is called after
the whole tree is built (children first) and should raise ``ConfigError`` with
the dotted key through :func:`bad`.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, get_args, get_origin

import yaml

from desmoe.errors import ConfigError

C = TypeVar("C")


def bad(key: str, expected: str, got: Any = dataclasses.MISSING) -> ConfigError:
    """Build the standard one-line error for a key whose value is wrong."""
    shown = "" if got is dataclasses.MISSING else f", got {got!r}"
    return ConfigError(f"key '{key}': expected {expected}{shown}")


def load_config(cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = ()) -> C:
    data: dict[str, Any] = {}
    source = "defaults"
    given: dict[str, str] = {}  # dotted key -> where its value came from (the last to set it)
    if path is not None:
        source = str(path)
        data = _read_yaml(Path(path))
        given.update((key, source) for key in _leaf_keys(data))
    for item in overrides:
        key, value = _apply_override(data, item, cls)
        given.update((k, f"override '{item}'") for k in _leaf_keys({key: value}))
    try:
        cfg = _build(cls, data, prefix="")
        _check_tree(cfg, prefix="")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    object.__setattr__(cfg, _GIVEN, given)  # not a field: the dumps (asdict) leave it out; deepcopy keeps it
    return cfg


_GIVEN = "_desmoe_given_keys"


def given_keys(cfg: Any) -> dict[str, str] | None:
    """The dotted keys the YAML and the overrides of ``load_config`` set, each with where it was set (a
    value equal to the default counts too: the user wrote it); None for a config not built by load_config.
    A default gives way to another source where a choice must not (train.lr to the DeepSpeed JSON's
    number: engine.fold_lr), and the value alone cannot tell the two apart."""
    return getattr(cfg, _GIVEN, None)


def _leaf_keys(data: Any, prefix: str = "") -> list[str]:
    if not isinstance(data, dict) or not data:
        return [prefix.rstrip(".")] if prefix else []
    return [k for key, value in data.items() for k in _leaf_keys(value, f"{prefix}{key}.")]


def check_as(section: Any, check, prefix: str) -> None:
    """Run ``check`` (a section class's ``check``) on ``section`` from a parent's check, naming its keys
    under ``prefix`` as the tree walk does (e.g. the architecture of ``model.*``, checked only where the
    experiment uses it)."""
    try:
        check(section)
    except ConfigError as err:
        raise ConfigError(str(err).replace("key '", f"key '{prefix}.", 1)) from None


def with_defaults(saved: Any, cls: type) -> Any:
    """``saved`` (a config written earlier, as nested dicts) with each key it lacks at ``cls``'s default: a key
    added to the config since then had its default then.  Keys only ``saved`` has stay."""
    def merge(old: Any, default: Any) -> Any:
        if not (isinstance(old, dict) and isinstance(default, dict)):
            return old
        return {**default, **{k: merge(v, default.get(k)) for k, v in old.items()}}

    return merge(saved, to_dict(cls()))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def split_overrides(argv: Sequence[str]) -> list[str]:
    """Accept both ``a.b=1`` and ``--a.b 1`` / ``--a.b=1`` forms."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":  # the end-of-options marker (argparse passes it on): not a key named ''
            i += 1
            continue
        if arg.startswith("--"):
            arg = arg[2:]
            if "=" not in arg:
                if i + 1 >= len(argv):
                    raise ConfigError(f"override '--{arg}': expected a value after it")
                arg = f"{arg}={argv[i + 1]}"
                i += 1
        if "=" not in arg:
            raise ConfigError(f"override '{arg}': expected the form key.path=value")
        out.append(arg)
        i += 1
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys: a second ``train:`` block appended to a config replaced the
    first whole, and its steps, batch and schedule silently fell back to the defaults.  Keys of one mapping
    must differ; those a merge key (``<<: *anchor``) brings in may still be overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}  # key -> its line
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKey(f"key '{key}' given twice (lines {seen[key]} and {line})")
                    seen[key] = line
                except TypeError:  # an unhashable key: SafeLoader's own error names it
                    continue
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    pass


# YAML 1.1 reads a leading 0 as octal and a:b as base 60: `train.steps=010` ran 8 steps, `1:30` ran 90.  Those
# spellings now stay strings, which an integer key refuses in one line; every other integer reads as before.
_UniqueKeyLoader.yaml_implicit_resolvers = {  # the class's own tables (SafeLoader's stay as they are)
    first: [(tag, rx) for tag, rx in entries if tag != "tag:yaml.org,2002:int"]
    for first, entries in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"))


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, expected a YAML config file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except _DuplicateKey as err:
        raise ConfigError(f"{path}: {err}; remove one (the second would replace the first)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _apply_override(data: dict[str, Any], item: str, cls: Any = None) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{item}': expected the form key.path=value")
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw != "" else ""
    except _DuplicateKey as err:
        raise ConfigError(f"override '{item}': {err.args[0].split(' (lines')[0]}") from None
    except yaml.YAMLError:
        value = raw
    if raw.count("#") > str(value).count("#"):
        # YAML reads ' #...' as a comment: `run.dir='/data/exp #3'` (quoted for the shell) became /data/exp
        raise ConfigError(f"override '{item}': YAML reads what follows '#' as a comment, dropping it; quote the "
                          f"value for YAML inside the shell's quotes (\"{key}='{raw}'\")")
    parts = key.split(".")
    parent = _section_type(cls, parts[:-1])
    if value is None and parent is not None and dataclasses.is_dataclass(typing.get_type_hints(parent).get(parts[-1])):
        # null for a section that cannot be null read as {}: the config's keys fell back to the defaults
        # (`desmoe.dges=null` meant as "no DGES" ran DGES with the default settings)
        raise ConfigError(f"override '{item}': '{key}' is a section, not a value; set its keys ({key}.KEY=VALUE)")
    node = data
    for part in parts[:-1]:
        if node.get(part) is None:  # a section left empty in the file (its keys commented out) reads as null,
            node[part] = {}         # and as the defaults: a key set into it is set, not refused as no section
        child = node[part]
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{part}' is not a section")
        node = child
    old = node.get(parts[-1])
    tp = _section_type(cls, parts)
    if isinstance(value, dict) and isinstance(old, dict) and tp is not None:
        # a mapping given to a section sets those keys, as key.path=value each would: replacing the section
        # dropped the file's other keys to their defaults (desmoe.schedule={t1: 0.3, t2: 0.8} turned the
        # config's warmup: fig1 into eq11, silently)
        node[parts[-1]] = _merge(old, value, tp)
    else:
        node[parts[-1]] = value
    return key, value


def _section_type(cls: Any, parts: Sequence[str]) -> Any:
    """The dataclass at the dotted path ``parts`` below ``cls``, or None (a plain value, a dict-typed field
    whose keys are the user's, or an unknown key: refused later)."""
    tp = cls
    for part in parts:
        tp = _unwrap_optional(tp)
        if dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp).get(part)
        elif get_origin(tp) is dict and len(get_args(tp)) == 2:
            tp = get_args(tp)[1]
        else:
            return None
    tp = _unwrap_optional(tp)
    return tp if dataclasses.is_dataclass(tp) else None


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return tp


def _merge(old: dict[str, Any], new: dict[str, Any], tp: Any) -> dict[str, Any]:
    out = dict(old)
    for k, v in new.items():
        sub = _section_type(tp, [str(k)])
        out[k] = _merge(old[k], v, sub) if sub is not None and isinstance(v, dict) and isinstance(old.get(k), dict) else v
    return out


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise bad(prefix.rstrip(".") or "<top>", "a mapping", data)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields), key=str)  # YAML keys may be other types: `yes:` is True
    if unknown:
        key, reading = f"{prefix}{unknown[0]}", _yaml_reading(unknown[0])
        raise ConfigError(f"unknown key '{key}' ({reading + '; ' if reading else ''}known here: "
                          f"{', '.join(sorted(fields))})")
    kwargs = {name: _coerce(hints[name], data[name], f"{prefix}{name}") for name in fields if name in data}
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"key '{prefix}{name}' is required")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:  # noqa: C901 - a flat type switch reads best
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(a, value, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise bad(key, "one of " + ", ".join(repr(a) for a in args), value)
        return value
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad(key, "a list", value)
        item_t = args[0] if args else Any
        items = [_coerce(item_t, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad(key, "a mapping", value)
        val_t = args[1] if len(args) == 2 else Any
        for k in value:  # str(k) turned a key `on:` into 'True' and `1.50:` into '1.5', silently
            if not isinstance(k, str):
                raise _not_text(f"{key}.{k}", k, "a text key")
        return {k: _coerce(val_t, v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad(key, "true or false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(key, "an integer", value)
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                raise bad(key, "a number", value) from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(key, "a number", value)
        else:
            try:
                number = float(value)
            except OverflowError:  # an integer beyond float's range: a traceback before
                number = math.inf
        if not math.isfinite(number):
            # .inf/.nan (and the text nan, inf that float() reads) passed checks written as `x > 0`: tau: .inf
            # made the ALR distillation target uniform, lora_alpha: .nan a NaN loss steps later
            raise bad(key, "a finite number", value)
        return number
    if tp is str:
        if not isinstance(value, str):
            raise _not_text(key, value)
        return value
    raise TypeError(f"config type {tp!r} of '{key}' is not supported")  # programming error


def _yaml_reading(value: Any) -> str:
    """Why YAML gave ``value`` for what the user wrote as text ('' for a string)."""
    import datetime

    kinds = ((bool, "an unquoted yes/no/on/off/true/false as a boolean"), (int, "an unquoted number as a number"),
             (float, "an unquoted number as a number"), (datetime.date, "an unquoted date as a date"),
             (type(None), "an empty value, null or ~ as null"))
    return next((f"YAML reads {text}" for t, text in kinds if isinstance(value, t)), "")


def _not_text(key: str, value: Any, what: str = "a string") -> ConfigError:
    """YAML reads unquoted yes/no/on/off, numbers, dates and an empty value as other types: refused with
    what YAML made of the text (the text itself is gone) and the way out, quoting it."""
    import datetime

    reading = _yaml_reading(value)
    why = f" ({reading}); quote it" if reading else ""
    shown = value.isoformat() if isinstance(value, datetime.date) else repr(value)
    return ConfigError(f"key '{key}': expected {what}, got {shown}{why}")


def _check_tree(cfg: Any, prefix: str) -> None:
    for f in dataclasses.fields(cfg):
        child = getattr(cfg, f.name)
        if dataclasses.is_dataclass(child):
            _check_tree(child, prefix=f"{prefix}{f.name}.")
    check = getattr(cfg, "check", None)
    if callable(check):
        try:
            check()
        except ConfigError as err:
            msg = str(err)
            # checks name keys relative to their own section; make them absolute
            if prefix and msg.startswith("key '"):
                msg = "key '" + prefix + msg[len("key '"):]
            raise ConfigError(msg) from None
