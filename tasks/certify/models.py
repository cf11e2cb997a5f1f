"""The models of a certification run: the diffusion model (for ``dds``/``densepure``) and one
classifier per source, loaded once through :class:`tasks.common.models.LoadedModels`, with the
class count they must agree on and each partition's fingerprints."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from densepure_core.config import CertifyConfig, MethodConfig
from tasks.common.models import LoadedModels
from tasks.common.workers import BadInputError

__all__ = ["RunModels", "PartitionModels"]


@dataclass(frozen=True)
class PartitionModels:
    """The sources and fingerprints of the models one (sigma, method) partition votes with."""

    classifier_source: str
    classifier_fingerprint: str
    diffusion_source: str | None = None  # None: plain RS, no diffusion model
    diffusion_fingerprint: str | None = None


class RunModels(LoadedModels):
    """The models of ``cfg`` (see the module docstring).

    Args:
        cfg: the run's config.
        device: where the models live.
        num_classes: the count vectors' length (``classifier.num_classes``); None: the output
            width of the first classifier loaded, which every later one must match.
        expected: ``{source: fingerprint}`` the run was planned with (None: no check).
    """

    def __init__(self, cfg: CertifyConfig, device: torch.device, num_classes: int | None = None,
                 expected: dict[str, str] | None = None):
        super().__init__(device, cfg.allow_pickle, expected)
        self.cfg = cfg
        self.num_classes = int(num_classes) if num_classes else None

    def run_diffusion(self):
        """``(DiffusionModel, DiffusionSchedule)`` of ``diffusion.source``."""
        return self.diffusion(self.cfg.diffusion.source)

    def partition_classifier(self, method: MethodConfig, sigma: float):
        """The classifier of one partition (``{sigma}`` in its source expanded)."""
        ccfg = self.cfg.classifier_for(method, sigma)
        clf = self.classifier(ccfg, self.num_classes, "the classifier" if method.classifier is None
                              else f"the classifier of method {method.label!r}")
        width = int(clf.num_classes)
        if self.num_classes is None:
            self.num_classes = width  # the classifier's output width is the class count
        elif width != self.num_classes:
            raise BadInputError(
                f"the classifier of method {method.label!r} at sigma={sigma} ({ccfg.source}) has {width} "
                f"outputs, but the run's count vectors have {self.num_classes} classes; every classifier "
                f"of a run must have the same number of classes (check classifier.num_classes)")
        return clf

    def partition(self, method: MethodConfig, sigma: float) -> PartitionModels:
        """Load what a partition votes with; its sources and fingerprints."""
        source = self.cfg.classifier_for(method, sigma).source
        self.partition_classifier(method, sigma)
        if method.kind == "rs":
            return PartitionModels(source, self._fingerprints[source])
        self.run_diffusion()
        d = self.cfg.diffusion.source
        return PartitionModels(source, self._fingerprints[source], d, self._fingerprints[d])

    def load_all(self) -> dict[str, str]:
        """Load every model of every partition; ``{source: fingerprint}``."""
        for sigma in self.cfg.sigmas:
            for method in self.cfg.methods:
                self.partition(method, sigma)
        return self.fingerprints
