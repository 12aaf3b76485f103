"""Config validation errors as one line a user can act on.

Each error names the field (``routes.0.prefix``); an error in a value that came from a
``RELAY_*`` environment variable names the variable and its value first; an unknown field
gets the closest known name when one is close (a typo), else the list of known names.
"""

from __future__ import annotations

import difflib
import shlex
import types
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

ENV_PREFIX = "RELAY_"
ENV_DELIMITER = "__"
# Not a setting: the path of the config file.
NOT_SETTINGS = frozenset({"RELAY_CONFIG"})
MAX_SHOWN_VALUE = 60

Loc = tuple[int | str, ...]


def format_validation_error(
    error: ValidationError, model: type[BaseModel], environ: Mapping[str, str]
) -> str:
    overrides = env_overrides(environ)
    lines = []
    for item in error.errors():
        loc: Loc = tuple(item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden" and loc:
            message = unknown_field(str(loc[-1]), fields_at(model, loc[:-1]))
        where = ".".join(str(part) for part in loc)
        line = f"{where}: {message}" if where else message
        source = env_source(loc, overrides)
        if source is not None:
            name, value = source
            line = f"{name}={shown(value)}: {line}"
        lines.append(line)
    return "; ".join(lines)


def env_overrides(environ: Mapping[str, str]) -> dict[tuple[str, ...], tuple[str, str]]:
    """Settings path (lowercase, as pydantic-settings matches it) -> (variable, value)."""
    found: dict[tuple[str, ...], tuple[str, str]] = {}
    for name, value in environ.items():
        upper = name.upper()
        if upper.startswith(ENV_PREFIX) and upper not in NOT_SETTINGS:
            path = tuple(name[len(ENV_PREFIX) :].lower().split(ENV_DELIMITER))
            found[path] = (name, value)
    return found


def env_source(
    loc: Loc, overrides: Mapping[tuple[str, ...], tuple[str, str]]
) -> tuple[str, str] | None:
    """The variable that set the value at ``loc``, or a section holding it (most specific)."""
    parts = tuple(str(part).lower() for part in loc)
    for length in range(len(parts), 0, -1):
        source = overrides.get(parts[:length])
        if source is not None:
            return source
    return None


def shown(value: str) -> str:
    if len(value) > MAX_SHOWN_VALUE:
        value = value[: MAX_SHOWN_VALUE - 3] + "..."
    return shlex.quote(value)


def unknown_field(name: str, known: Sequence[str] | None) -> str:
    if not known:
        return "unknown field"
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        return f"unknown field, did you mean {close[0]}?"
    return f"unknown field (known: {', '.join(known)})"


def fields_at(model: type[BaseModel], loc: Loc) -> list[str] | None:
    """The field names of the model found at ``loc`` (through dict values and list items)."""
    annotation: Any = model
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            if field is None:
                return None
            annotation = field.annotation
        elif get_origin(annotation) in (dict, list):
            annotation = get_args(annotation)[-1]
        else:
            return None
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    return None


def _unwrap(annotation: Any) -> Any:
    """``Annotated[X, ...]`` and ``X | None`` -> ``X``."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            options = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(options) != 1:
                return annotation
            annotation = options[0]
        else:
            return annotation
