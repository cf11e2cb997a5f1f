"""How a config field is declared, and what every job config shares.

Each field of a job config is declared :func:`votes` (it changes what the job computes: part of
the config hash, and a resumed OUT must agree on it) or :func:`operational` (speed, placement,
post-processing: never a result). :func:`unclassified_fields` finds a field declared with
neither; each job config refuses to import with one. :class:`_JobConfig` hashes the ``votes``
fields and writes the YAML stored next to every result.

Imports pydantic and yaml only (:func:`_stream_version` reads :mod:`densepure_core.rng` lazily).
"""

from __future__ import annotations

import hashlib
import json
import re
import typing
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import to_jsonable_python

__all__ = ["ConfigError", "votes", "operational", "determines_votes", "unclassified_fields"]

_VOTES_KEY = "votes"


_OMIT_NONE_KEY = "hash_omits_none"
_OMIT_DEFAULT_KEY = "hash_omits_default"


def _classified(determines_votes: bool, default: Any, kwargs: dict[str, Any]) -> Any:
    extra = {_VOTES_KEY: determines_votes}
    if kwargs.pop("omit_none", False):  # a field added later: None keeps the hash it had before
        extra[_OMIT_NONE_KEY] = True
    if kwargs.pop("omit_default", False):  # a field added later: its default keeps the hash it had before
        extra[_OMIT_DEFAULT_KEY] = True
    if "default_factory" in kwargs:
        return Field(json_schema_extra=extra, **kwargs)
    return Field(default, json_schema_extra=extra, **kwargs)


def votes(default: Any = ..., **kwargs: Any) -> Any:
    """``Field(...)`` of a setting that changes vote counts: part of :meth:`CertifyConfig.config_hash`."""
    return _classified(True, default, kwargs)


def operational(default: Any = ..., **kwargs: Any) -> Any:
    """``Field(...)`` of a setting that changes no vote count (speed, placement, post-processing)."""
    return _classified(False, default, kwargs)


def determines_votes(model: type[BaseModel], name: str) -> bool | None:
    """The declaration of field ``name``: True (votes), False (operational), None (undeclared)."""
    extra = model.model_fields[name].json_schema_extra
    value = extra.get(_VOTES_KEY) if isinstance(extra, dict) else None
    return value if isinstance(value, bool) else None


def _nested_models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _nested_models(arg)]


def unclassified_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted names of the fields of ``model`` (nested models included) declared neither
    :func:`votes` nor :func:`operational`."""
    missing = []
    for name, info in model.model_fields.items():
        if determines_votes(model, name) is None:
            missing.append(prefix + name)
        for sub in _nested_models(info.annotation):
            missing += unclassified_fields(sub, f"{prefix}{name}.")
    return missing


def _vote_value(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return _vote_dump(value)
    if isinstance(value, (list, tuple)):
        return [_vote_value(v) for v in value]
    return to_jsonable_python(value)


def _omitted(info: Any, value: Any) -> bool:
    """Whether a field added after configs were hashed leaves the hash out at this value: None
    (``omit_none``) or its default (``omit_default``), so older configs keep their hashes."""
    extra = info.json_schema_extra or {}
    return bool((value is None and extra.get(_OMIT_NONE_KEY)) or (extra.get(_OMIT_DEFAULT_KEY) and value == info.default))


def _vote_dump(model: BaseModel) -> dict[str, Any]:
    """The ``votes`` fields of ``model`` as JSON values, recursively (nested: their votes fields)."""
    fields = type(model).model_fields
    return {name: _vote_value(getattr(model, name))
            for name in fields if determines_votes(type(model), name) and not _omitted(fields[name], getattr(model, name))}


def _stream_version() -> int:
    from densepure_core.rng import STREAM_VERSION  # imported here: rng imports torch

    return STREAM_VERSION


class ConfigError(ValueError):
    """An invalid configuration; the message names every offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _JobConfig(_Strict):
    """A job's whole config: hashed over :meth:`vote_fields` (defined by each job), written as YAML."""

    def vote_fields(self) -> dict[str, Any]:
        raise NotImplementedError

    def config_hash(self) -> str:
        """sha256 (first 16 hex digits) of :meth:`vote_fields`: equal hashes, equal results."""
        return hashlib.sha256(json.dumps(self.vote_fields(), sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


_CREDENTIALS_IN_URI = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@\s]+@")


def _no_credentials(value: str | None) -> str | None:
    """Refuse ``scheme://user:secret@host/...``: configs are written next to results."""
    if value and _CREDENTIALS_IN_URI.match(value):
        raise ValueError("credentials must not be embedded in a URI (the config is written to OUT); "
                         "use the AWS environment or credential files instead")
    return value

