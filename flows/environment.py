"""Environment defaults of the densepure entry points, applied explicitly, never at import.

The CLI's entry callback applies them before any command imports torch or Prefect (both read
the environment once, at import): programs that drive :mod:`flows.certify` themselves call
:func:`apply_environment_defaults` before importing it. Explicit settings in the environment
always win. Importing this module changes nothing.
"""

from __future__ import annotations

import os

__all__ = ["ENVIRONMENT_DEFAULTS", "apply_environment_defaults"]

ENVIRONMENT_DEFAULTS: dict[str, str] = {
    # Idle OpenMP threads sleep instead of spinning (read when torch is imported, here and in
    # the Ray actors, which inherit the environment). On shared or small machines spinning
    # threads made training and certification steps 5-20x slower; results are unchanged.
    "OMP_WAIT_POLICY": "PASSIVE",
    # Quiet, local-only Prefect (read when prefect is imported: settings and logging).
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}


def apply_environment_defaults() -> dict[str, str]:
    """Set every default not already set in ``os.environ``; returns the ones it set."""
    applied = {}
    for key, value in ENVIRONMENT_DEFAULTS.items():
        if key not in os.environ:
            os.environ[key] = applied[key] = value
    return applied
