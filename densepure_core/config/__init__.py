"""The typed, validated configs of the three jobs, and the machinery they share.

- ``fields``: how a field is declared (``votes(...)``: part of the config hash; ``operational(...)``:
  never a result), the job-config base class (hash, YAML), the error type;
- ``sections``: the sections every job shares (dataset, diffusion model, classifier) and
  ``bundled:`` sources;
- ``certify``, ``attack``, ``addt``: the three job configs (``densepure certify``, ``attack``,
  ``train-addt``);
- ``loading``: YAML files and packaged presets (``presets/*.yaml``, package data), ``--set``
  overrides, validation with messages that name the field.

Imports :mod:`densepure_core.certification` (the default radius grid, the adaptive looks) and,
lazily, :mod:`densepure_core.rng` (the stream version in every hash); nothing else of the project.
The names below are the package's public API.
"""

from densepure_core.config.certify import DEFAULT_RADII, AdaptiveConfig, CertifyConfig, MethodConfig
from densepure_core.config.fields import ConfigError, determines_votes, operational, unclassified_fields, votes
from densepure_core.config.loading import (PACKAGED_CONFIGS, apply_overrides, load_config, packaged_config,
                                           resolve_config_path)
from densepure_core.config.sections import (ASSETS_DIR, ClassifierConfig, DatasetConfig, DiffusionConfig,
                                            resolve_source)

__all__ = [
    "ASSETS_DIR", "PACKAGED_CONFIGS", "packaged_config", "resolve_config_path", "ConfigError", "DatasetConfig",
    "DiffusionConfig", "ClassifierConfig", "MethodConfig", "AdaptiveConfig", "CertifyConfig", "load_config",
    "apply_overrides", "resolve_source", "DEFAULT_RADII", "votes", "operational", "determines_votes",
    "unclassified_fields",
]
