"""Config helpers shared by every settings dataclass (preprocess, tuning, inference, edit).

Configs are frozen dataclasses with a default and a comment per field. They come from JSON
files, CLI flags or the app as plain dicts; :func:`from_dict` turns such a dict into the
dataclass and refuses what it cannot place: an unknown key (a typo like ``guidance_scal``
must fail loudly, not vanish) or a value of the wrong type. Nested configs (``EditConfig``
holds a ``TuneConfig``) are built recursively, JSON lists become tuples so the result stays
hashable, and :func:`to_dict` is the exact inverse, so ``from_dict(C, to_dict(c)) == c``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

from eym.errors import EymError

C = TypeVar("C")

__all__ = ["from_dict", "to_dict", "load_config", "replace"]

MAX_SETTINGS_BYTES = 1 << 20  # a settings file is a few hundred bytes; anything this big is not one


def from_dict(cls: type[C], data: Mapping[str, Any] | None, *, where: str | None = None) -> C:
    """Build the config dataclass ``cls`` from a plain dict, rejecting unknown keys and bad types.

    Args:
        cls: a dataclass type (usually frozen) whose fields have type annotations.
        data: field name -> value; missing fields keep their defaults. ``None`` means ``{}``.
            Values for nested dataclass fields may be dicts (built recursively) or instances.
        where: name used in error messages (default: the class name), e.g. ``"edit.tune"``.

    Returns:
        An instance of ``cls``.

    Raises:
        EymError: naming the unknown keys (and the known ones) or the field with a wrong type.
            Errors from the dataclass's own ``__post_init__`` checks (``EymError``) pass through.
    """
    where = where or cls.__name__
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise EymError(f"{where}: expected a mapping of settings, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise EymError(
            f"{where}: unknown setting(s) {', '.join(map(repr, unknown))}; "
            f"known settings are {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """The JSON-ready dict of a config dataclass (tuples become lists, nested configs dicts)."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"to_dict expects a dataclass instance, got {type(config).__name__}")
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def load_config(cls: type[C], path: str | Path) -> C:
    """Read a JSON (or YAML, by suffix) settings file into ``cls``; bad files raise EymError."""
    path = Path(path)
    try:
        if not path.exists():
            raise EymError(f"cannot read settings file {path.name}: no such file; check the path")
        if not path.is_file():  # a device (/dev/zero), a FIFO or a folder would never end or make sense
            raise EymError(f"settings file {path.name} is not a regular file; give the path of a JSON or YAML file")
        with open(path, "rb") as f:
            raw = f.read(MAX_SETTINGS_BYTES + 1)
    except OSError as err:
        raise EymError(f"cannot read settings file {path.name}: {err.strerror}; check the path") from None
    if len(raw) > MAX_SETTINGS_BYTES:
        raise EymError(f"settings file {path.name} is over {MAX_SETTINGS_BYTES // 1024} KB; a settings file is a few lines")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise EymError(f"settings file {path.name} is not UTF-8 text; save it as a JSON or YAML text file") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as err:
                raise ValueError(str(err)) from None
        else:
            data = json.loads(text)
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        raise EymError(f"settings file {path.name} is not valid: {err}; fix its syntax") from None
    except RecursionError:
        raise EymError(f"settings file {path.name} is nested too deeply; settings are at most two levels deep") from None
    return from_dict(cls, data, where=path.name)


def replace(config: C, **changes: Any) -> C:
    """``dataclasses.replace`` with the same key and type checks as :func:`from_dict`."""
    merged = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    unknown = sorted(set(changes) - set(merged))
    if unknown:
        raise EymError(f"{type(config).__name__}: unknown setting(s) {', '.join(map(repr, unknown))}")
    merged.update(changes)
    return from_dict(type(config), merged)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert lists to tuples and dicts to configs."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        # Floats last, so that 1 stays an int in `int | float`.
        specific = None  # a mapping meant for a nested config: its own error says what is wrong
        for member in sorted(args, key=lambda a: a is float):
            try:
                return _coerce(value, member, where)
            except EymError as err:
                if dataclasses.is_dataclass(member) and isinstance(value, Mapping) and specific is None:
                    specific = err
                continue
        if specific is not None:
            raise specific
        raise EymError(f"{where}: {value!r} is not a {' or '.join(_type_name(a) for a in args)}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise EymError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
    if tp is type(None):
        if value is None:
            return None
        raise EymError(f"{where}: expected null, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where=where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise EymError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise EymError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
        if not args:
            return tuple(value)
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise EymError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise EymError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise EymError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        # JSON writes 1.0 as 1; ints are fine where floats are expected, booleans are not.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise EymError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise EymError(f"{where}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise EymError(f"{where}: expected a path, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise EymError(f"{where}: {value!r} is not a {_type_name(tp)}")
