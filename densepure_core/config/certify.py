"""The one typed configuration of a certification job, validated once at the edge.

A job is: a dataset and which images of it, a diffusion model, a classifier, one or more
methods (``rs``: plain randomized smoothing; ``dds``: one-shot denoising, Carlini et al.;
``densepure``: K reverse runs of S steps and a majority vote), the sigmas, Cohen's n0/n/alpha,
and operational settings (batch size, shard size, device, precision, output location).
Reading it from YAML with ``--set`` overrides is :mod:`densepure_core.config.loading`.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Literal

from pydantic import field_validator, model_validator

from densepure_core.certification.stats import DEFAULT_RADII
from densepure_core.config.fields import (_JobConfig, _no_credentials, _Strict, _stream_version, _vote_dump,
                                          operational, unclassified_fields, votes)
from densepure_core.config.sections import ClassifierConfig, DatasetConfig, DiffusionConfig

__all__ = ["MethodConfig", "AdaptiveConfig", "CertifyConfig", "DEFAULT_RADII"]

MethodKind = Literal["rs", "dds", "densepure"]


class MethodConfig(_Strict):
    """One certification method; each (sigma, method) pair is its own output partition.

    ``k``: DensePure's reverse runs (votes) per noisy copy; ``steps``: S reverse steps.
    ``rs`` and ``dds`` are deterministic given the noisy copy, so k and steps must be 1.
    """

    kind: MethodKind = votes()
    # the partition name: renaming a method starts another partition
    name: str | None = votes(None, pattern=r"^[A-Za-z0-9_.+-]+$")
    k: int = votes(1, ge=1)
    steps: int = votes(1, ge=1)
    classifier: ClassifierConfig | None = votes(None)

    @model_validator(mode="after")
    def _check(self):
        if self.kind in ("rs", "dds") and (self.k != 1 or self.steps != 1):
            raise ValueError(f"method {self.kind!r} is deterministic per noisy copy: k and steps must be 1 "
                             f"(got k={self.k}, steps={self.steps}); use kind 'densepure' for votes")
        if self.kind == "densepure" and self.steps == 1 and self.k > 1:
            raise ValueError(f"densepure with steps: 1 is one deterministic denoiser call per copy (DDS): its k = "
                             f"{self.k} votes would all agree; set steps >= 2 for a stochastic reverse process, "
                             f"or use kind 'dds'")
        return self

    @property
    def label(self) -> str:
        """The partition name: ``name`` if given, else derived from kind, k and steps."""
        if self.name:
            return self.name
        if self.kind == "densepure":
            return f"densepure-k{self.k}-s{self.steps}"
        return self.kind


class AdaptiveConfig(_Strict):
    """Settings of ``sampling: adaptive`` (docs/sequential.md; densepure_core/certification/sequential.py).

    ``bound``: the anytime-valid bound. ``hybrid`` (default): the one-sided beta mixture (prior
    ``a``, ``b``) at ``(1 - final) alpha`` at every look, plus Clopper-Pearson at ``final * alpha``
    at n_max; ``onesided``: the one-sided mixture alone; ``staged``: Clopper-Pearson at geometric
    looks with ``ratio``, alpha split ``split``; ``betabin``: Robbins' two-sided mixture. The
    mixtures look every ``batch`` estimation copies (``batch`` is also the first look).
    ``futility``: stop an image once the predictive probability of reaching the next radius
    by n_max falls below it (0: off); like the grid, it steers where images stop, never the
    certificate's validity. ``stop: false`` turns the stopping rule off (exactly n_max copies:
    fixed CERTIFY's counts). ``alpha`` and ``radii`` steer the stopping rule only (default: the
    run's ``alpha`` and ``radii``); they decide where an image stops, so they are part of an
    adaptive run's hash, but never the certificate's validity (re-certify at any alpha fixed
    in advance with ``densepure sql``).
    """

    bound: Literal["hybrid", "onesided", "staged", "betabin"] = votes("hybrid")
    batch: int = votes(100, ge=1)
    ratio: float = votes(1.5, gt=1.0)
    split: Literal["equal", "late"] = votes("equal")
    final: float = votes(0.75, gt=0.0, lt=1.0, description="hybrid: the share of alpha kept for n_max")
    futility: float = votes(0.1, ge=0.0, lt=1.0, description="stop when the next radius is this unlikely "
                                                             "(predictive probability); 0: off")
    a: float = votes(0.5, gt=0.0)
    b: float = votes(0.5, gt=0.0)
    stop: bool = votes(True)
    alpha: float | None = votes(None, gt=0.0, lt=1.0)
    radii: list[float] | None = votes(None)

    @field_validator("radii")
    @classmethod
    def _radii(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or any(r < 0 for r in v) or sorted(v) != v):
            raise ValueError(f"adaptive.radii must be non-empty, non-negative and ascending (got {v})")
        return v

    @model_validator(mode="after")
    def _prior(self) -> "AdaptiveConfig":
        if self.bound in ("hybrid", "onesided") and (self.a > 1 or self.b > 1):
            raise ValueError(f"adaptive.a and adaptive.b must be <= 1 with bound {self.bound} (got a={self.a}, "
                             f"b={self.b}): the one-sided mixture's bisection relies on it; use the default "
                             f"0.5, or bound betabin for a larger prior")
        return self

    def bound_params(self, n_max: int) -> dict[str, Any]:
        """The bound's parameters as stored with the votes (``bound_params``)."""
        from densepure_core.certification.sequential import geometric_looks

        if self.bound in ("betabin", "onesided"):
            return {"a": float(self.a), "b": float(self.b)}
        if self.bound == "hybrid":
            return {"a": float(self.a), "b": float(self.b), "final": float(self.final), "n_max": int(n_max)}
        looks = geometric_looks(self.batch, n_max, self.ratio) if self.stop else (n_max,)
        return {"looks": [int(v) for v in looks], "split": self.split}

    def schedule(self, n_max: int) -> tuple[int, ...]:
        """The looks at which the rule is consulted (the last is n_max)."""
        from densepure_core.certification.sequential import default_schedule

        if not self.stop:
            return (int(n_max),)
        return default_schedule(self.bound, self.batch, n_max, self.bound_params(n_max))


class CertifyConfig(_JobConfig):
    """A whole certification job. Written, resolved, next to every result (OUT/config.yaml)."""

    # Each field is declared either votes(...) (it changes vote counts: part of config_hash, a
    # resumed OUT must agree on it) or operational(...) (it changes how or where the counts are
    # computed, or what is derived from them afterwards, never a count). tests/densepure_core/
    # test_config.py fails for any field declared with neither.
    run_name: str = operational("default", description="a label for run ids and logs")
    dataset: DatasetConfig = votes(DatasetConfig())
    diffusion: DiffusionConfig | None = votes(None)
    classifier: ClassifierConfig = votes()
    methods: list[MethodConfig] = votes(..., min_length=1)
    sigmas: list[float] = votes(..., min_length=1)
    n0: int = votes(100, ge=1)
    n: int = votes(10_000, ge=1)
    # sampling: fixed is Cohen's CERTIFY (n estimation copies); adaptive draws up to n_max
    # (default n) in looks and stops each image early (docs/sequential.md). For sampling: fixed
    # these three fields are left out of the hash (they change no vote), so hashes of fixed runs
    # are those of the releases before adaptive sampling existed.
    sampling: Literal["fixed", "adaptive"] = votes("fixed")
    n_max: int | None = votes(None, ge=1, description="adaptive: the most estimation copies (default n)")
    adaptive: AdaptiveConfig = votes(AdaptiveConfig())
    # alpha and radii are applied to the stored counts at aggregation (and can be changed later
    # with `densepure sql --alpha`): they never change a vote.
    alpha: float = operational(0.001, gt=0.0, lt=1.0)
    radii: list[float] = operational(default_factory=lambda: list(DEFAULT_RADII))
    # Every row draws from its own generators: batch size and worker count change no count.
    batch_size: int = operational(256, ge=1)
    seed: int = votes(0, ge=0)
    out: str = operational("results/default")
    # The shard layout is stored in run.json and in the vote file names; a resumed OUT must keep it.
    shard_size: int = votes(16, ge=1)
    workers: int | None = operational(None, ge=1, description="Ray actors; default one per GPU, else 1")
    device: str = operational("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    # Lower precision changes the models' outputs, hence the votes.
    precision: Literal["fp32", "bf16", "fp16"] = votes("fp32")
    t_star_rule: Literal["nearest", "first_at_or_above"] = votes("nearest")
    early_exit: bool = operational(True, description="skip DensePure votes that cannot change a copy's "
                                                     "label (exact: the same counts)")
    pad_batches: bool = operational(False)
    channels_last: bool = operational(False, description="GPU: NHWC memory format for both models "
                                                         "(densepure_core.models.accel)")
    compile: bool = operational(False, description="GPU: torch.compile both models; the first batch of each "
                                                   "shape compiles")
    cuda_graphs: bool = operational(False, description="GPU: capture the fixed-shape purify+classify step once "
                                                       "and replay it per batch (CUDA only; implies padded batches)")
    # The two noise streams draw different numbers: different counts.
    noise_device: Literal["cpu", "device"] = votes(
        "cpu", description="cpu: per-row CPU generators, identical counts on every device; device: counter-based "
                           "Philox on the model's device (fast on GPUs; other counts, see densepure_core/rng.py)")
    prefetch: int = operational(2, ge=0, description="images loaded ahead in a background thread (0: inline)")
    allow_pickle: bool = operational(False, description="accept pickle weights; the same weights give the "
                                                        "same counts in either format")
    on_bad_input: Literal["fail", "quarantine"] = operational(
        "fail", description="fail: stop cleanly at the first bad image (finished shards are kept); "
                            "quarantine: record it in the errors table and go on")

    _out_creds = field_validator("out")(_no_credentials)

    @field_validator("sigmas")
    @classmethod
    def _sigmas_positive(cls, v: list[float]) -> list[float]:
        for s in v:
            if not (s > 0 and math.isfinite(s)):
                raise ValueError(f"every sigma must be a finite number > 0 (got {s})")
        if len(set(v)) != len(v):
            raise ValueError(f"sigmas must be distinct (got {v})")
        return v

    @field_validator("radii")
    @classmethod
    def _radii(cls, v: list[float]) -> list[float]:
        if any(r < 0 for r in v) or sorted(v) != v:
            raise ValueError(f"radii must be non-negative and ascending (got {v})")
        return v

    @model_validator(mode="after")
    def _methods(self):
        labels = [m.label for m in self.methods]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"methods must have distinct names; repeated: {dup} (set methods[i].name)")
        if self.diffusion is None and any(m.kind != "rs" for m in self.methods):
            raise ValueError("diffusion.source is required for methods 'dds' and 'densepure'")
        return self

    # -- derived --------------------------------------------------------------------------
    @property
    def budget(self) -> int:
        """The most estimation copies of an image: n (fixed) or n_max (adaptive, default n)."""
        return self.n if self.sampling == "fixed" or self.n_max is None else int(self.n_max)

    def stop_alpha(self) -> float:
        """The alpha the adaptive stopping rule uses (``adaptive.alpha``, default ``alpha``)."""
        return float(self.alpha if self.adaptive.alpha is None else self.adaptive.alpha)

    def stop_radii(self) -> list[float]:
        """The radius grid the adaptive stopping rule uses (``adaptive.radii``, default ``radii``)."""
        return list(self.radii if self.adaptive.radii is None else self.adaptive.radii)

    def classifier_for(self, method: MethodConfig, sigma: float) -> ClassifierConfig:
        return (method.classifier or self.classifier).for_sigma(sigma)

    def vote_fields(self) -> dict[str, Any]:
        """The hash payload: every field declared ``votes(...)`` (nested models: their ``votes``
        fields), JSON-compatible, plus ``stream_version``, the version of the noise streams
        (:data:`densepure_core.rng.STREAM_VERSION`; not a setting: the code's draws)."""
        return self._hash_payload(_stream_version())

    def partition_fields(self, sigma: float, method: MethodConfig) -> dict[str, Any]:
        """What the votes of one (sigma, method) partition depend on: :meth:`vote_fields` without
        the other sigmas and methods, with this method, its sigma and its classifier (``{sigma}``
        expanded); without the diffusion model for plain RS, which never calls it.

        Two configs whose partition fields agree give that partition the same counts, so a run
        can gain sigmas or methods, or correct a setting of partitions not voted yet, and keep
        the votes it has (tasks/certify/plan.py). The model sources are strings here; the plan
        replaces each by its weights' fingerprint.
        """
        fields = self.vote_fields()
        del fields["methods"], fields["sigmas"]
        if method.kind == "rs":
            fields.pop("diffusion", None)
        fields["sigma"] = float(sigma)
        fields["method"] = {k: v for k, v in _vote_dump(method).items() if k != "classifier"}
        fields["method"]["label"] = method.label
        fields["classifier"] = _vote_dump(self.classifier_for(method, sigma))
        return fields

    def config_hash(self, stream_version: int | None = None) -> str:
        """sha256 (first 16 hex digits) of :meth:`vote_fields`: equal hashes, equal counts.

        ``stream_version`` (default: the current one) gives the hash this config had under an
        older noise-stream version; version 1 is the payload of the releases before the
        stream version existed (no ``stream_version`` key, ``noise_device`` only when not
        ``cpu``), so an OUT they wrote can be recognised and refused (tasks/certify/plan.py).
        """
        payload = self._hash_payload(_stream_version() if stream_version is None else stream_version)
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def _hash_payload(self, stream_version: int) -> dict[str, Any]:
        fields = _vote_dump(self)
        if self.sampling == "fixed":  # none of them changes a vote: the pre-adaptive payload
            for name in ("sampling", "n_max", "adaptive"):
                del fields[name]
        else:  # the stopping rule's alpha and grid decide where images stop: resolved here
            fields["n_max"] = self.budget
            fields["adaptive"]["alpha"] = self.stop_alpha()
            fields["adaptive"]["radii"] = [float(r) for r in self.stop_radii()]
        if stream_version == 1:
            if fields.get("noise_device") == "cpu":
                del fields["noise_device"]
        else:
            fields["stream_version"] = int(stream_version)
        return fields


_UNDECLARED = unclassified_fields(CertifyConfig)
if _UNDECLARED:  # a developer error: every field must say whether it determines the votes
    raise TypeError(f"CertifyConfig fields declared neither votes(...) nor operational(...): {_UNDECLARED}")

