"""The models of a run, loaded once per process, with the fingerprints of their weights.

Every job loads its models through :class:`LoadedModels`: the plan on the driver's CPU before
anything is written (a source that points nowhere, a broken checkpoint or an unreachable hub
fails there, not after other partitions ran), each Ray worker on its device. The plan records
each source's fingerprint in run.json; a worker given those (``expected``) refuses weights that
are not the planned ones, and writes the fingerprints into every row it produces, so a resumed
run never combines two different models under one name.

A fingerprint is the first 16 hex digits of :func:`densepure_core.models.model_fingerprint`
(sha256 over every weight's name, dtype, shape and bytes): the same weights give the same
fingerprint from a local folder, S3 or the hub, and any changed weight changes it.
"""

from __future__ import annotations

import torch

from densepure_core.config import ClassifierConfig, resolve_source

__all__ = ["LoadedModels", "ModelChangedError", "fingerprint_of", "FINGERPRINT_CHARS"]

FINGERPRINT_CHARS = 16


class ModelChangedError(ValueError):
    """The weights behind a source are not the ones the run was planned (or voted) with."""


def fingerprint_of(model) -> str:
    """The fingerprint of a loaded model (see the module docstring)."""
    from densepure_core.models import model_fingerprint

    return model_fingerprint(model)[:FINGERPRINT_CHARS]


class LoadedModels:
    """Diffusion models and classifiers by source, each loaded once, with their fingerprints.

    Args:
        device: where the models live.
        allow_pickle: accept pickle weights (the config's ``allow_pickle``).
        expected: ``{source: fingerprint}`` the run was planned with; a loaded model whose
            fingerprint differs raises :class:`ModelChangedError` naming both (None: no check).
    """

    def __init__(self, device: torch.device, allow_pickle: bool = False, expected: dict[str, str] | None = None):
        self.device = device
        self.allow_pickle = allow_pickle
        self.expected = dict(expected or {})
        self._diffusion: dict[str, tuple] = {}
        self._classifiers: dict[str, torch.nn.Module] = {}
        self._fingerprints: dict[str, str] = {}

    def diffusion(self, source: str, what: str = "diffusion.source"):
        """``(DiffusionModel, DiffusionSchedule)`` of ``source``."""
        if source not in self._diffusion:
            from densepure_core.diffusion.schedule import DiffusionSchedule
            from densepure_core.models import load_diffusion

            model = load_diffusion(resolve_source(source), device=self.device, allow_pickle=self.allow_pickle)
            self._remember(source, model, what)
            self._diffusion[source] = (model, DiffusionSchedule.from_scheduler(model.scheduler))
        return self._diffusion[source]

    def classifier(self, ccfg: ClassifierConfig, num_classes: int | None = None, what: str = "the classifier"):
        """The classifier of ``ccfg`` (``{sigma}`` already expanded), with ``num_classes`` outputs
        unless ``ccfg`` sets them."""
        if ccfg.source not in self._classifiers:
            from densepure_core.models import load_classifier

            clf = load_classifier(
                resolve_source(ccfg.source), num_classes=ccfg.num_classes or num_classes,
                model_name=ccfg.model_name, input_size=ccfg.input_size, interpolation=ccfg.interpolation,
                mean=ccfg.mean, std=ccfg.std, device=self.device, allow_pickle=self.allow_pickle)
            self._remember(ccfg.source, clf, what)
            self._classifiers[ccfg.source] = clf
        return self._classifiers[ccfg.source]

    @property
    def fingerprints(self) -> dict[str, str]:
        """``{source: fingerprint}`` of every model loaded so far."""
        return dict(self._fingerprints)

    def _remember(self, source: str, model, what: str) -> None:
        fp = fingerprint_of(model)
        planned = self.expected.get(source)
        if planned is not None and planned != fp:
            raise ModelChangedError(
                f"{what} {source} is not the model this run was planned with: its weights' fingerprint is now "
                f"{fp}, the plan recorded {planned} (the weights at that source were replaced). Results of "
                f"different models are never mixed: restore the planned weights, or use a new --out.")
        self._fingerprints[source] = fp
