"""The typed configuration of an attack evaluation (``densepure attack``), validated once.

A job is: a dataset and which images of it, a classifier, a diffusion model (when a defense
purifies), the defenses (``none``; ``purify`` with t* from a sigma or a fraction of the
schedule, DDPM ancestral with S steps or one-shot, K votes), the threat models (L_inf or L_2
balls), the attacks (``pgd_eot``, ``dwbox``, ``bpda``), the number M of purifications that
score the last iterate (mean, majority, worst case), and, with ``any_iterate``, DiffBreak's
protocol next to it: the clean image and every iterate checked against M' fresh purifications
(``iterate_purifications``, 32), the image broken if any check fails. Every (defense, threat, attack) triple is one output partition; ``dwbox`` and
``bpda`` attack the purifier, so on the ``none`` defense only ``pgd_eot`` runs.

Fields are declared ``votes(...)`` (they change the rows: part of :meth:`AttackConfig.config_hash`,
a resumed OUT must agree on them) or ``operational(...)``, as in :mod:`densepure_core.config`.
Presets: ``attack_default`` (the embedded default, bundled digits models), ``attack_cifar10``,
``attack_imagenet``.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Literal

from pydantic import field_validator, model_validator

from densepure_core.config.fields import (_JobConfig, _no_credentials, _Strict, _stream_version, _vote_dump,
                                          operational, unclassified_fields, votes)
from densepure_core.config.sections import ClassifierConfig, DatasetConfig, DiffusionConfig

__all__ = ["DefenseConfig", "ThreatConfig", "AttackItemConfig", "AttackConfig", "parse_eps"]


def parse_eps(value: Any, field: str = "eps") -> float:
    """A radius given as a number or a fraction string (``"8/255"``, ``"0.5/1"``) -> float.

    ``field`` names the setting in the error (pydantic adds where it sits in the config).
    """
    if isinstance(value, str):
        text = value.strip()
        try:
            if "/" in text:
                num, den = (Fraction(part.strip()) for part in text.split("/", 1))
                return float(num / den)
            return float(Fraction(text))
        except (ValueError, ZeroDivisionError) as exc:
            raise ValueError(f"{field} {value!r}: expected a number or a fraction such as 8/255") from exc
    return float(value)


def _fmt(x: float) -> str:
    return f"{x:g}"


class DefenseConfig(_Strict):
    """One defense.

    ``kind``: ``none`` (the bare classifier) or ``purify``. For ``purify``: t* from ``sigma``
    (the certification rule: sqrt((1 - abar) / abar) = 2 sigma, ``t_star_rule``) or from
    ``t_fraction`` (DiffPure: 0.1 on CIFAR-10 L_inf, 0.075 L_2, 0.15 ImageNet), read as
    ``t_fraction_of`` says:

    - ``steps`` (the default, and the only reading before issue 24): a fraction of this model's
      own steps, t* = round(fraction x T). DiffPure's noise level only on a linear 1000-step
      schedule (the one that discretises its SDE);
    - ``vp_sde``: a time of DiffPure's VP-SDE (beta_min 0.1, beta_max 20): t* is the timestep of
      this model's schedule with the same abar (``noise_level.t_star_at_alpha_bar``, rounded by
      ``t_star_rule``), so the purifier adds DiffPure's noise on any schedule (0.1: abar 0.896,
      t* = 809 of improved-diffusion's 4000 cosine steps where round(0.1 x 4000) = 400 is abar 0.972).

    ``reverse``: ``ddpm`` (ancestral, ``steps`` S re-spaced steps; null: every step t*..0) or
    ``one_shot`` (one denoiser call, DDS); ``k``: K purifications per prediction, majority label
    (DensePure).
    """

    kind: Literal["none", "purify"] = votes()
    name: str | None = votes(None, pattern=r"^[A-Za-z0-9_.+-]+$")
    sigma: float | None = votes(None, gt=0, allow_inf_nan=False)
    t_fraction: float | None = votes(None, gt=0, le=1)
    t_fraction_of: Literal["steps", "vp_sde"] = votes(
        "steps", omit_default=True, description="steps: t* = round(t_fraction x T) of this model; vp_sde: t_fraction "
                                                "is a time of DiffPure's VP-SDE, t* the timestep with its abar")
    reverse: Literal["ddpm", "one_shot"] = votes("ddpm")
    steps: int | None = votes(None, ge=1, description="ddpm: S re-spaced steps; null: the full chain")
    k: int = votes(1, ge=1, description="K purifications per prediction, majority label")

    @model_validator(mode="after")
    def _check(self):
        if self.kind == "none":
            if self.sigma is not None or self.t_fraction is not None or self.k != 1 or self.steps is not None:
                raise ValueError("defense kind 'none' is the bare classifier: sigma, t_fraction, steps and k "
                                 "do not apply (remove them)")
        elif (self.sigma is None) == (self.t_fraction is None):
            raise ValueError("a purify defense needs exactly one of sigma (t* as in certification) or t_fraction "
                             "(DiffPure's 0.1 on CIFAR-10; t_fraction_of says of what)")
        if self.t_fraction is None and self.t_fraction_of != "steps":
            raise ValueError(f"t_fraction_of: {self.t_fraction_of} says what t_fraction is a fraction of, but this "
                             f"defense has no t_fraction (remove t_fraction_of, or give t_fraction instead of sigma)")
        if self.reverse == "one_shot" and self.steps not in (None, 1):
            raise ValueError(f"reverse one_shot is one denoiser call: remove steps (got {self.steps})")
        return self

    @property
    def label(self) -> str:
        """The partition name: ``name``, else derived (``purify-t0.1-s4-k3``)."""
        if self.name:
            return self.name
        if self.kind == "none":
            return "none"
        where = f"sigma{_fmt(self.sigma)}" if self.sigma is not None else \
            f"{'vp' if self.t_fraction_of == 'vp_sde' else 't'}{_fmt(self.t_fraction)}"
        how = "oneshot" if self.reverse == "one_shot" else ("full" if self.steps is None else f"s{self.steps}")
        return f"purify-{where}-{how}" + (f"-k{self.k}" if self.k > 1 else "")


class ThreatConfig(_Strict):
    """An L_inf or L_2 ball of radius ``eps`` in [0, 1] pixel units (``8/255`` accepted)."""

    norm: Literal["linf", "l2"] = votes()
    eps: float = votes()
    name: str | None = votes(None, pattern=r"^[A-Za-z0-9_.+-]+$")

    @field_validator("eps", mode="before")
    @classmethod
    def _eps(cls, v: Any) -> float:
        v = parse_eps(v)
        if not (0 < v < float("inf")):
            raise ValueError(f"eps must be a finite number > 0 (got {v})")
        return v

    @model_validator(mode="after")
    def _linf_within_the_pixel_range(self):
        # Images live in [0, 1]: an L_inf ball of radius >= 1 contains every image, so such an
        # eps is a forgotten /255 (eps: 8 ran for minutes as threat linf-2040).
        if self.norm == "linf" and self.eps >= 1:
            raise ValueError(f"eps {_fmt(self.eps)} for linf covers the whole [0, 1] pixel range (images live in "
                             f"[0, 1]): write it over 255, e.g. eps: {_fmt(self.eps)}/255")
        return self

    @property
    def label(self) -> str:
        """``name``, else ``linf-8`` (eps x 255 for L_inf) or ``l2-0.5``."""
        if self.name:
            return self.name
        return f"linf-{_fmt(round(self.eps * 255, 4))}" if self.norm == "linf" else f"l2-{_fmt(self.eps)}"


class AttackItemConfig(_Strict):
    """One attack: ``pgd_eot`` (exact gradients, EOT), ``dwbox`` (fixed noise, EOT 1) or ``bpda``.

    ``eot``: purifications per gradient (default 10; ``dwbox``: 1); ``step_size``: absolute
    (default eps/4 for L_inf, eps/5 for L_2, ADDT's PGD-20 steps); ``random_start``: a uniform
    point of the ball (DiffBreak) rather than the clean image (Lee & Kim, ADDT).
    """

    kind: Literal["pgd_eot", "dwbox", "bpda"] = votes()
    name: str | None = votes(None, pattern=r"^[A-Za-z0-9_.+-]+$")
    iterations: int = votes(20, ge=1)
    eot: int | None = votes(None, ge=1)
    step_size: float | None = votes(None, gt=0)
    random_start: bool = votes(True)
    gradient: Literal["exact", "autograd"] = operational(
        "exact", description="exact: checkpoint every reverse step (memory flat in the steps); autograd: keep "
                             "every step's graph (same gradients, more memory)")

    @field_validator("step_size", mode="before")
    @classmethod
    def _step(cls, v: Any) -> float | None:
        return None if v is None else parse_eps(v, "step_size")

    @model_validator(mode="after")
    def _check(self):
        if self.kind == "dwbox" and self.eot not in (None, 1):
            raise ValueError(f"a dwbox attack fixes the purifier's noise: eot must be 1 (got {self.eot})")
        return self

    @property
    def label(self) -> str:
        return self.name or self.kind

    @property
    def eot_samples(self) -> int:
        return self.eot if self.eot is not None else (1 if self.kind == "dwbox" else 10)


class AttackConfig(_JobConfig):
    """A whole attack evaluation. Written, resolved, next to every result (OUT/config.yaml)."""

    job: Literal["attack"] = votes("attack", description="marks an attack OUT (certify OUTs have none)")
    run_name: str = operational("attack", description="a label for run ids and logs")
    dataset: DatasetConfig = votes(DatasetConfig())
    diffusion: DiffusionConfig | None = votes(None)
    classifier: ClassifierConfig = votes()
    defenses: list[DefenseConfig] = votes(..., min_length=1)
    threats: list[ThreatConfig] = votes(..., min_length=1)
    attacks: list[AttackItemConfig] = votes(..., min_length=1)
    score_purifications: int = votes(10, ge=1, description="M: fresh purifications that score each example")
    # DiffBreak's protocol, next to the last-iterate rules (issue 24; left out of the hash at its defaults).
    any_iterate: bool = votes(False, omit_default=True,
                              description="also check the clean image and every PGD iterate against "
                                          "iterate_purifications fresh purifications (DiffBreak): broken if any fails")
    iterate_purifications: int = votes(32, ge=1, omit_default=True,
                                       description="M': fresh purifications per checked iterate (DiffBreak: 32)")
    t_star_rule: Literal["nearest", "first_at_or_above"] = votes("nearest")
    seed: int = votes(0, ge=0)
    shard_size: int = votes(10, ge=1)
    # Every row draws from its own streams: the batch size changes no result (float rounding aside).
    batch_size: int = operational(256, ge=1, description="purified rows per forward/backward pass")
    workers: int | None = operational(None, ge=1, description="Ray actors; default one per GPU, else 1")
    device: str = operational("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    out: str = operational("results/attack")
    allow_pickle: bool = operational(False)
    prefetch: int = operational(2, ge=0)
    on_bad_input: Literal["fail", "quarantine"] = operational("fail")

    _out_creds = field_validator("out")(_no_credentials)

    @model_validator(mode="after")
    def _check(self):
        for what, items in (("defenses", self.defenses), ("threats", self.threats), ("attacks", self.attacks)):
            labels = [i.label for i in items]
            dup = sorted({x for x in labels if labels.count(x) > 1})
            if dup:
                raise ValueError(f"{what} must have distinct names; repeated: {dup} (set {what}[i].name)")
        if not self.any_iterate and self.iterate_purifications != 32:
            raise ValueError(f"iterate_purifications: {self.iterate_purifications} applies to DiffBreak's any-iterate "
                             f"check only: set any_iterate: true, or remove iterate_purifications")
        if self.diffusion is None and any(d.kind == "purify" for d in self.defenses):
            raise ValueError("diffusion.source is required for purify defenses")
        if not self.partitions():
            raise ValueError("no (defense, threat, attack) partition to run: the 'none' defense is attacked only "
                             "by pgd_eot attacks (dwbox and bpda attack a purifier)")
        return self

    def partitions(self) -> list[tuple[str, str, str]]:
        """Every (defense, threat, attack) label triple that runs, in config order."""
        return [(d.label, t.label, a.label) for d in self.defenses for t in self.threats for a in self.attacks
                if d.kind == "purify" or a.kind == "pgd_eot"]

    def defense(self, label: str) -> DefenseConfig:
        return next(d for d in self.defenses if d.label == label)

    def threat(self, label: str) -> ThreatConfig:
        return next(t for t in self.threats if t.label == label)

    def attack(self, label: str) -> AttackItemConfig:
        return next(a for a in self.attacks if a.label == label)

    def vote_fields(self) -> dict[str, Any]:
        """The hash payload: every ``votes(...)`` field, plus the noise-stream version."""
        return {**_vote_dump(self), "stream_version": _stream_version()}

    def partition_fields(self, defense: str, threat: str, attack: str) -> dict[str, Any]:
        """What the rows of one (defense, threat, attack) partition depend on: :meth:`vote_fields`
        without the other defenses, threats and attacks, with these three (and without the
        diffusion model for the bare classifier, which never calls it). A run can gain
        partitions, or correct partitions without rows, and keep the rows it has."""
        fields = self.vote_fields()
        del fields["defenses"], fields["threats"], fields["attacks"]
        d = self.defense(defense)
        if d.kind == "none":
            fields.pop("diffusion", None)
        fields["defense"] = {**_vote_dump(d), "label": d.label}
        fields["threat"] = {**_vote_dump(self.threat(threat)), "label": threat}
        fields["attack"] = {**_vote_dump(self.attack(attack)), "label": attack}
        return fields



_UNDECLARED = unclassified_fields(AttackConfig)
if _UNDECLARED:  # a developer error: every field must say whether it determines the rows
    raise TypeError(f"AttackConfig fields declared neither votes(...) nor operational(...): {_UNDECLARED}")
