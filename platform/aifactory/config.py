"""Typed configuration: strict pydantic models, loaded from YAML with every problem reported at once.

Every config in the factory derives from :class:`StrictModel` (unknown fields are errors). Use
:func:`load_config` for files and :func:`parse_config` for dicts (HTTP bodies, Ray Train's
``train_loop_config``); both raise one :class:`~aifactory.exceptions.ConfigError` that names the
source, each bad field and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from aifactory.exceptions import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of all factory configs: unknown fields are rejected, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False)


def format_validation_error(err: ValidationError) -> list[str]:
    """One line per problem: ``field.path: message (got <value>)``."""
    problems = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling; extra fields are not allowed)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        got = e.get("input")
        if e["type"] not in ("missing",) and not isinstance(got, (dict, list)) and got is not None:
            msg = f"{msg} (got {got!r})"
        problems.append(f"{loc}: {msg}")
    return problems


def parse_config(cls: type[M], data: Mapping[str, Any] | None, *, source: str = "<config>") -> M:
    """Validate ``data`` as ``cls``; raise one ConfigError listing every problem."""
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(source, [f"<root>: expected a mapping of fields, got {type(data).__name__}"])
    try:
        return cls.model_validate(dict(data or {}))
    except ValidationError as err:
        raise ConfigError(source, format_validation_error(err)) from None


def read_yaml(path: str | Path) -> Any:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), ["<file>: no such file"])
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "<file>"
        raise ConfigError(str(path), [f"{where}: not valid YAML ({getattr(err, 'problem', err)})"]) from None


def load_config(cls: type[M], path: str | Path, *, overrides: Mapping[str, Any] | None = None) -> M:
    """Load ``path`` (YAML or JSON) as ``cls``, applying dotted-key ``overrides`` first."""
    data = read_yaml(path)
    if overrides:
        if not isinstance(data, dict):
            raise ConfigError(str(path), ["<root>: expected a mapping of fields"])
        data = apply_overrides(data, overrides)
    return parse_config(cls, data, source=str(path))


def apply_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``{"a.b": v}`` overrides set (``None`` values are skipped)."""
    out = json.loads(json.dumps(dict(data), default=str))
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


def config_hash(config: BaseModel | Mapping[str, Any]) -> str:
    """A stable short hash of a config's content (sorted JSON), for provenance and caching."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
