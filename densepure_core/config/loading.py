"""Reading a job's config: a YAML file or a packaged preset, ``--set`` overrides, validation.

The presets ship in the package (``densepure_core/config/presets/*.yaml``, named ``default``,
``imagenet_dds``, ...: :func:`packaged_config`). ``--set key=value`` overrides any field by its
dotted path (``--set n=500``, ``--set methods.1.k=5``, ``--set sigmas=[0.25,0.5]``), values
parsed as YAML. Every invalid value is refused with a message that names the field.
"""

from __future__ import annotations

import difflib
import importlib.resources
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from densepure_core.config.certify import CertifyConfig
from densepure_core.config.fields import ConfigError, _nested_models

__all__ = ["PACKAGED_CONFIGS", "packaged_config", "resolve_config_path", "load_config", "apply_overrides"]

#: The YAML presets shipped as package data (default, imagenet_dds, imagenet_densepure, ...).
PACKAGED_CONFIGS = importlib.resources.files("densepure_core.config") / "presets"


def _fields_at(model: type[BaseModel], path: tuple) -> list[str]:
    """The field names of the (nested) model at ``path`` (list indices skipped); [] if unknown."""
    current = model
    for part in path:
        if isinstance(part, int):
            continue
        info = current.model_fields.get(part)
        nested = _nested_models(info.annotation) if info else []
        if not nested:
            return []
        current = nested[0]
    return list(current.model_fields)


def _format_errors(exc: ValidationError, origin: str, model: type[BaseModel], overrides: list[str]) -> str:
    """One line per invalid field. An unknown field gets the closest real names ("did you mean"),
    and one that came from ``--set`` is reported against ``--set``, not against the YAML file."""
    set_keys = {item.split("=", 1)[0].strip() for item in overrides if "=" in item}
    from_set, from_file = [], []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            known = _fields_at(model, tuple(err["loc"][:-1]))
            close = difflib.get_close_matches(str(err["loc"][-1]), known, n=3, cutoff=0.6)
            msg = "no such field" + (f"; did you mean {' or '.join(close)}?" if close else
                                     f" (fields here: {', '.join(known)})" if known else "")
        (from_set if loc in set_keys else from_file).append(f"  {loc}: {msg}")
    lines = []
    if from_set:
        lines += ["invalid --set override(s):"] + [line.replace("  ", "  --set ", 1) for line in from_set]
    if from_file:
        lines += [f"invalid config ({origin}):"] + from_file
    return "\n".join(lines)


def _set_path(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[int(key)]
            continue
        if key not in node or node[key] is None:
            node[key] = {}
        node = node[key]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` overrides (dotted keys, YAML values) to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set n=500")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({exc})") from exc
        try:
            _set_path(data, key.strip(), value)
        except (IndexError, ValueError, TypeError) as exc:
            raise ConfigError(f"--set {key}: no such field path in the config") from exc
    return data


def packaged_config(name: str):
    """The packaged preset ``name`` (``default``, ``imagenet_dds``; ``.yaml`` optional), read
    from the installed package (importlib.resources), never from a source tree. Raises
    ConfigError for an unknown name."""
    stem = name.removesuffix(".yaml").removesuffix(".yml")
    resource = PACKAGED_CONFIGS / f"{stem}.yaml"
    if not resource.is_file():
        names = sorted(p.name.removesuffix(".yaml") for p in PACKAGED_CONFIGS.iterdir() if p.name.endswith(".yaml"))
        raise ConfigError(f"no packaged config {name!r}; packaged: {', '.join(names)}")
    return resource


def resolve_config_path(path: str | Path):
    """A config file: ``path`` if it exists, else the packaged preset it names.

    ``default`` or ``imagenet_dds.yaml`` (a bare name) and ``configs/imagenet_dds.yaml`` (where
    the presets lived in the source tree before they became package data) name a packaged
    preset when no such file exists; anything else is returned as given.
    """
    if isinstance(path, (str, Path)):
        p = Path(path).expanduser()
        if p.exists():
            return p
        if p.parent in (Path("."), Path("configs")) and p.suffix in ("", ".yaml", ".yml"):
            try:
                return packaged_config(p.name)
            except ConfigError:
                pass
        return p
    return path  # an importlib.resources Traversable


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key repeated in one mapping (PyYAML keeps the last one
    silently, so a config with two ``n:`` lines would run with whichever came last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found the key {key!r} twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                    f"keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


#: ``job:`` of a config -> (the command that runs it, what it is called in messages).
_JOB_COMMANDS = {"attack": ("densepure attack", "an attack evaluation"),
                 "train-addt": ("densepure train-addt", "an ADDT training")}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict | None = None, model: type[BaseModel] | None = None) -> CertifyConfig:
    """Read YAML (or take ``data``), apply overrides, validate. Raises ConfigError.

    ``path``: a YAML file, or a packaged preset (:func:`resolve_config_path`). ``model``: the
    config type (default :class:`CertifyConfig`; ``densepure attack`` passes
    :class:`densepure_core.config.attack.AttackConfig`).
    """
    model = model or CertifyConfig
    origin = str(path) if path else "<dict>"
    if data is None:
        if path is None:
            raise ConfigError("no config given")
        try:
            data = yaml.load(resolve_config_path(path).read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except IsADirectoryError as exc:
            raise ConfigError(f"config {path} is a directory: pass a YAML file (e.g. {path}/config.yaml), or a "
                              f"packaged preset name") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}): pass a YAML file, not a "
                              f"binary one") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} holds a YAML {type(data).__name__}, not a mapping of fields "
                              f"(e.g. 'n: 500')")
    data = apply_overrides(json.loads(json.dumps(data)), overrides or [])
    if isinstance(data, dict):  # another job's config: say which command runs it
        job = data.get("job")
        wanted = model.model_fields["job"].default if "job" in model.model_fields else None
        if job != wanted and job in _JOB_COMMANDS:
            raise ConfigError(f"{origin} is {_JOB_COMMANDS[job][1]} config (job: {job}): run it with "
                              f"`{_JOB_COMMANDS[job][0]} --config {origin}`")
        if model is not CertifyConfig and job is None and "methods" in data:
            raise ConfigError(f"{origin} is a certification config (it has methods and no 'job:'): run it "
                              f"with `densepure certify --config {origin}`")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin, model, overrides or [])) from None

