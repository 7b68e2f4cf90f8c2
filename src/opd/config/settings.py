"""The config system of every verb: frozen dataclasses whose fields declare themselves.

A field is made with `setting(default, help, …bounds or choices)`, a group of fields with
`group(Class, help)`. From the declarations come everything else, for every verb alike:
- the command-line flags (`--lr`, `--objective.k`: the field's dotted path), `--config FILE`
  (YAML, nested mappings or dotted keys), `--set KEY=VALUE` (YAML value syntax) and
  `--help-config`;
- one validation path: building a config (from layers of values, or in Python) converts each
  value to its field's type and checks its bounds, then the class's own `check()` looks at
  fields together. A bad value is an `OPDError` of one line naming the field and the fix.

Layers merge in order, later winning: defaults < profile < --config < flags < --set < values a
verb forces.
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from opd.errors import OPDError

MISSING = dataclasses.MISSING
RENAMED = {"rollouts_per_prompt": "samples_per_prompt", "n": "samples_per_prompt",
           "eval_n": "eval_samples_per_prompt"}
"""Old setting name → its new name, for the line that says so when someone uses the old one."""
_PREFIX: contextvars.ContextVar[str] = contextvars.ContextVar("opd_config_prefix", default="")
"""Dotted path of the group being built, so that a nested field's error names its full path."""


def setting(
    default: Any = MISSING,
    help: str = "",
    *,
    factory: Any = MISSING,
    choices: Sequence[Any] | None = None,
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | None = None,
    below: float | None = None,
) -> Any:
    """A config field: its default (none: the setting is required), what it means, and the
    values it accepts (`minimum` and `maximum` inclusive, `above` and `below` exclusive; for a
    list, each item)."""
    metadata = {"help": " ".join(help.split()), "choices": tuple(choices) if choices else None,
                "minimum": minimum, "above": above, "maximum": maximum, "below": below}
    return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


def group(cls: type, help: str) -> Any:
    """A field that holds a nested config (its own dataclass), e.g. `objective`."""
    return dataclasses.field(default_factory=cls, metadata={"help": " ".join(help.split())})


class Config:
    """Base of every config dataclass: values are converted and checked on construction."""

    def __post_init__(self) -> None:
        prefix = _PREFIX.get()
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            path = prefix + field.name
            value = convert(type(self), field.name, getattr(self, field.name), path)
            object.__setattr__(self, field.name, value)
            _check_bounds(field, value, path)
        self.check()

    def check(self) -> None:
        """Rules that involve several fields; raise OPDError naming them and the fix."""


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Resolved type of each field (the standard `get_type_hints`, cached per class)."""
    return typing.get_type_hints(cls)


def _unwrap_optional(kind: Any) -> tuple[Any, bool]:
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        return inner[0], True
    return kind, False


def _type_name(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin is tuple:
        return f"comma-separated list of {_type_name(typing.get_args(kind)[0])}"
    if origin is dict or kind is dict:
        return "mapping"
    return getattr(kind, "__name__", str(kind))


class NotFinite(ValueError):
    """A float setting given nan or inf."""


def _scalar(kind: type, value: Any) -> Any:
    if kind is Any:
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        lowered = str(value).lower()
        if lowered in {"true", "1", "yes", "on"}:
            return True
        if lowered in {"false", "0", "no", "off"}:
            return False
        raise ValueError
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if not math.isfinite(number):
            raise NotFinite
        return number
    if kind is str:
        if not isinstance(value, str | int | float):
            raise ValueError
        return str(value)
    return kind(value)


def convert(cls: type, name: str, value: Any, path: str) -> Any:
    """`value` as the type of field `name` of `cls`, or an OPDError naming `path`."""
    kind, optional = _unwrap_optional(field_types(cls)[name])
    if value is None or (optional and isinstance(value, str) and value.lower() in {"none", "null"}):
        if optional:
            return None
        raise OPDError(f"config: {path} cannot be empty; give a {_type_name(kind)}")
    if dataclasses.is_dataclass(kind):
        return _build_group(kind, value, path)
    origin = typing.get_origin(kind)
    try:
        if origin is tuple:
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list | tuple):
                raise ValueError
            inner = typing.get_args(kind)[0]
            return tuple(_scalar(inner, v.strip() if isinstance(v, str) else v)
                         for v in items if not (isinstance(v, str) and not v.strip()))
        if origin is dict or kind is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value) or {}
            if not isinstance(value, Mapping):
                raise ValueError
            return dict(value)
        return _scalar(kind, value)
    except NotFinite:
        raise OPDError(f"config: {path} must be a finite number, got {value!r}") from None
    except (TypeError, ValueError):
        raise OPDError(f"config: {path} must be a {_type_name(kind)}, got {value!r}") from None


def _build_group(kind: type, value: Any, path: str) -> Any:
    if isinstance(value, kind):
        return value
    if not isinstance(value, Mapping):
        raise OPDError(f"config: {path} is a group of settings; set one of them, e.g. "
                       f"{path}.{dataclasses.fields(kind)[0].name}=…")
    return construct(kind, dict(value), prefix=f"{path}.")


def construct(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    """`cls(**values)` with unknown keys refused, naming the dotted path."""
    names = {f.name for f in dataclasses.fields(cls)}
    for field in dataclasses.fields(cls):
        required = field.default is MISSING and field.default_factory is MISSING
        if required and values.get(field.name) in (None, ""):
            flag = "--" + (prefix + field.name).replace("_", "-")
            raise OPDError(f"config: {prefix + field.name} is required; pass {flag} VALUE")
    for key in values:
        if key not in names and RENAMED.get(key) in names:
            raise OPDError(f"config: {prefix + key} was renamed {prefix + RENAMED[key]}")
        if key not in names:
            close = [n for n in sorted(names) if n.startswith(key[:3])]
            hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""
            raise OPDError(f"config: unknown key {prefix + key!r}{hint}; see --help-config")
    token = _PREFIX.set(prefix)
    try:
        return cls(**values)
    finally:
        _PREFIX.reset(token)


def _check_bounds(field: dataclasses.Field, value: Any, path: str) -> None:
    meta = field.metadata
    if value is None or not meta:
        return
    items = value if isinstance(value, tuple) else (value,)
    choices = meta.get("choices")
    if choices and any(item not in choices for item in items):
        raise OPDError(f"config: {path} must be {'each ' if isinstance(value, tuple) else ''}one "
                       f"of {list(choices)}, got {value!r}")
    low_open, high_open = meta.get("above") is not None, meta.get("below") is not None
    low = meta.get("above") if low_open else meta.get("minimum")
    high = meta.get("below") if high_open else meta.get("maximum")
    for number in items:
        if not isinstance(number, int | float) or isinstance(number, bool):
            continue
        too_low = low is not None and (number <= low if low_open else number < low)
        too_high = high is not None and (number >= high if high_open else number > high)
        if too_low or too_high:
            raise OPDError(f"config: {path} must {_describe_bounds(low, low_open, high, high_open)}"
                           f", got {value!r}")


def _describe_bounds(low: float | None, open_low: bool, high: float | None, open_high: bool) -> str:
    if high is None:
        if open_low:
            return "be positive" if low == 0 else f"be greater than {low:g}"
        return f"be at least {low:g}"
    if low is None:
        return f"be below {high:g}" if open_high else f"be at most {high:g}"
    return f"lie in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"




# -- layers: YAML, --set, flags ---------------------------------------------------------------
def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys: {"objective": {"k": 8}} → {"objective.k": 8}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise OPDError(f"config: {key!r} sets a part of {part!r}, which is not a group")
            node = child
        node[leaf] = value
    return nested


def build(cls: type, *layers: Mapping[str, Any]) -> Any:
    """A validated `cls` from layers of values (nested or dotted keys; later layers win)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update({k: v for k, v in flatten(layer).items() if v is not None})
    return construct(cls, unflatten(merged))


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """`key=value` strings from --set, with YAML value syntax."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise OPDError(f"--set: {item!r} is not key=value")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            raise OPDError(f"--set: the value of {key.strip()!r} is not valid YAML ({raw!r}); "
                           "quote it, e.g. --set 'key=\"text\"'") from None
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise OPDError(f"--config: {str(path)!r} is a folder; give a YAML file")
    if not path.is_file():
        raise OPDError(f"--config: file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise OPDError(f"--config: {path} is not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise OPDError(f"--config: {path}{where} is not valid YAML ({type(err).__name__}); fix "
                       "that line") from None
    if not isinstance(data, dict):
        raise OPDError(f"--config: {path} must hold a mapping of key: value")
    return data


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested values (tuples as lists), ready for YAML or JSON."""
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}


# -- the command line -------------------------------------------------------------------------
def leaves(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted path, field, resolved type) of every setting, groups expanded, in order."""
    out = []
    for field in dataclasses.fields(cls):
        kind, _ = _unwrap_optional(field_types(cls)[field.name])
        if dataclasses.is_dataclass(kind):
            out += leaves(kind, f"{prefix}{field.name}.")
        else:
            out.append((f"{prefix}{field.name}", field, kind))
    return out


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not MISSING:
        return field.default
    if field.default_factory is not MISSING:
        return field.default_factory()
    return None


def add_arguments(parser: argparse.ArgumentParser, cls: type,
                  profiles: Mapping[str, Any] | None = None) -> None:
    """A flag per setting (its dotted path), plus --config, --set, --help-config, --profile."""
    common = parser.add_argument_group("configuration")
    common.add_argument("--config", metavar="FILE", help="YAML file of settings")
    if profiles:
        common.add_argument("--profile", default=None, choices=None,
                            help=f"defaults profile: {', '.join(profiles)}")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set any setting, e.g. objective.k=8 (repeatable)")
    common.add_argument("--help-config", action="store_true",
                        help="list every setting with its default and meaning")
    for old in _renamed_flags(cls):
        common.add_argument("--" + old.replace("_", "-"), dest=old, help=argparse.SUPPRESS)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for path, field, kind in leaves(cls):
        head = path.rsplit(".", 1)[0] if "." in path else ""
        if head not in groups:
            groups[head] = parser.add_argument_group(f"{head} settings" if head else "settings")
        text = field.metadata.get("help", "")
        default = _default_of(field)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        if field.default is MISSING and field.default_factory is MISSING:
            shown = "required"
        flag = "--" + path.replace("_", "-")
        if kind is bool:
            groups[head].add_argument(flag, dest=path, default=None,
                                      action=argparse.BooleanOptionalAction,
                                      help=f"{text} (default: {shown})")
        else:
            choices = field.metadata.get("choices")
            metavar = "{" + ",".join(map(str, choices)) + "}" if choices else _metavar(kind)
            groups[head].add_argument(flag, dest=path, default=None, metavar=metavar,
                                      help=f"{text} (default: {shown})".replace("%", "%%"))


def _renamed_flags(cls: type) -> list[str]:
    """Old names of `cls`'s settings: hidden flags, so that one says what it was renamed."""
    names = {f.name for f in dataclasses.fields(cls)}
    return [old for old, new in RENAMED.items() if new in names]


def _metavar(kind: Any) -> str:
    if typing.get_origin(kind) is tuple:
        return "A,B,…"
    if typing.get_origin(kind) is dict or kind is dict:
        return "YAML"
    return getattr(kind, "__name__", "VALUE").upper()


def from_args(cls: type, args: argparse.Namespace, forced: Mapping[str, Any] | None = None,
              profiles: Mapping[str, Mapping[str, Any]] | None = None,
              defaults: Mapping[str, Any] | None = None) -> Any:
    """The verb's config: field defaults < profile < the verb's `defaults` < --config < flags
    < --set < `forced`."""
    file_layer = load_yaml(args.config) if getattr(args, "config", None) else {}
    profile_layer: Mapping[str, Any] = {}
    if profiles is not None:
        name = getattr(args, "profile", None) or file_layer.pop("profile", None) or next(iter(profiles))
        if name not in profiles:
            raise OPDError(f"profile: unknown value {name!r}; choose one of {sorted(profiles)}")
        profile_layer = profiles[name]
    flags = {path: getattr(args, path) for path, _, _ in leaves(cls)}
    flags.update({old: getattr(args, old, None) for old in _renamed_flags(cls)})
    return build(cls, profile_layer, defaults or {}, file_layer, flags, parse_set(args.set),
                 forced or {})


Run = Callable[[Any, argparse.Namespace], int]
"""A verb's body: (its config, the parsed arguments) → exit status."""


def add_verb(verbs: Any, name: str, cls: type, run: Run, *, help: str, description: str,
             profiles: Mapping[str, Mapping[str, Any]] | None = None,
             defaults: Mapping[str, Any] | None = None,
             forced: Mapping[str, Any] | None = None) -> argparse.ArgumentParser:
    """A sub-command whose flags come from `cls`; `opd.cli.main` builds the config and calls
    `run`. Returns the parser, for flags that are not settings (e.g. --resume)."""
    parser = verbs.add_parser(name, help=help, description=description)
    add_arguments(parser, cls, profiles)
    parser.set_defaults(run=run, config_class=cls, profiles=profiles, verb_defaults=defaults,
                        forced=forced)
    return parser


def config_of(args: argparse.Namespace) -> Any:
    """The config of a verb added with `add_verb`, from its parsed arguments."""
    return from_args(args.config_class, args, args.forced, args.profiles, args.verb_defaults)


def describe(cls: type) -> str:
    """`path = default` and its meaning for every setting, for --help-config and the docs."""
    lines = []
    for path, field, kind in leaves(cls):
        meta = field.metadata
        accepts = ""
        if meta.get("choices"):
            accepts = f" [{' | '.join(map(str, meta['choices']))}]"
        lines.append(f"  {path} = {_default_of(field)!r}  ({_type_name(kind)}{accepts})\n"
                     f"      {meta.get('help', '')}")
    return "\n".join(lines)
