"""The typed configuration of ADDT fine-tuning (``densepure train-addt``), validated once.

A job is: the training images (a dataset, by default the digits train split), the pretrained
diffusion model to fine-tune, the frozen classifier that guides CGPO, the variant (``gaussian``:
CGPO + RBGM, the paper's method; ``linf``: signed-gradient steps in an L_inf ball), the
optimiser (AdamW, reference.md section 5: lr 2e-4, betas 0.95/0.999, weight decay 1e-6, clip
1.0, constant or linear warm-up learning rate), EMA with warm-up, the number of steps, the
global batch, the seed every draw is keyed by (``densepure_core.addt.trainer``), and the two
augmentations of the reference script (``dropout`` forced on the UNet, ``random_flip``).

Fields are declared ``votes(...)`` (they change the trained weights: part of
:meth:`AddtConfig.config_hash`; a resumed OUT must agree on them) or ``operational(...)``
(workers, checkpoint cadence, device, where to write), as in :mod:`densepure_core.config`.
``workers`` is operational: the data, timesteps and noises of a step are keyed by the example's
global index, so another worker count trains on the same draws; only dropout masks (keyed per
worker) and the order of the gradient sum differ. Presets: ``addt_default`` (digits, minutes on
2 cores), ``addt_cifar10`` (the paper's setup, GPUs).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ValidationInfo, field_validator, model_validator

from densepure_core.config.attack import parse_eps
from densepure_core.config.fields import _JobConfig, _no_credentials, _vote_dump, operational, unclassified_fields, votes
from densepure_core.config.sections import ClassifierConfig, DatasetConfig, DiffusionConfig

__all__ = ["AddtConfig"]


class AddtConfig(_JobConfig):
    """A whole ADDT fine-tuning run. Written, resolved, next to its results (OUT/config.yaml)."""

    job: Literal["train-addt"] = votes("train-addt", description="marks an ADDT training OUT")
    run_name: str = operational("addt", description="a label for logs")
    dataset: DatasetConfig = votes(DatasetConfig(split="train"), description="the training images")
    diffusion: DiffusionConfig = votes(description="the pretrained epsilon-prediction model to fine-tune")
    classifier: ClassifierConfig = votes(description="the frozen classifier that guides CGPO")
    variant: Literal["gaussian", "linf"] = votes("gaussian", description="gaussian: CGPO + RBGM; linf: PGD in a ball")
    cgpo_iterations: int = votes(5, ge=1, description="CGPO (or L_inf) iterations per training step")
    linf_radius: float = votes(8 / 255, gt=0, le=1, description="linf variant: the ball, in [0, 1] pixel units")
    linf_step: float = votes(4 / 255, gt=0, le=1, description="linf variant: the signed-gradient step")
    # Added with issue 24 (omit_default/omit_none: at their defaults, configs keep their old hashes).
    dropout: float | None = votes(None, ge=0, lt=1, omit_none=True,
                                  description="set every Dropout layer of the UNet to this p for the fine-tuning "
                                              "(ADDT's script forces 0.1 on the CIFAR-10 DDPM); null: as the model is")
    random_flip: bool = votes(False, omit_default=True,
                              description="random horizontal flips of the training images, keyed per (step, "
                                          "example) (ADDT on CIFAR-10: on; not for digits, which are not mirror-"
                                          "symmetric)")
    # Operational: the first s steps never depend on the total, so raising it on a finished OUT
    # continues the same trajectory (lr warm-up and EMA are functions of the step, not the total).
    steps: int = operational(300, ge=1, description="optimisation steps in total; a rerun with more continues")
    batch_size: int = votes(64, ge=1, description="the global batch, split evenly over the workers")
    lr: float = votes(2e-4, gt=0, allow_inf_nan=False)
    betas: tuple[float, float] = votes((0.95, 0.999))
    weight_decay: float = votes(1e-6, ge=0, allow_inf_nan=False)
    grad_clip: float | None = votes(1.0, gt=0, description="max gradient L2 norm; null: no clipping")
    lr_warmup_steps: int = votes(0, ge=0, description="linear warm-up steps, then constant")
    ema_max_decay: float = votes(0.9999, ge=0, lt=1, description="EMA decay min(this, 1 - (1 + step)^-0.75)")
    precision: Literal["fp32", "bf16", "fp16"] = votes("fp32", description="autocast dtype (bf16/fp16: GPUs)")
    seed: int = votes(0, ge=0)
    workers: int = operational(1, ge=1, description="Ray Train workers (DDP ranks); one GPU each on a GPU cluster")
    threads_per_worker: int | None = operational(None, ge=1, description="torch threads per CPU worker")
    checkpoint_every: int = operational(100, ge=1, description="steps between checkpoints (and the last step)")
    keep_checkpoints: int = operational(2, ge=1, description="checkpoints kept under OUT/train")
    max_failures: int = operational(2, ge=0, description="worker failures Ray Train recovers from a checkpoint")
    log_every: int = operational(10, ge=1, description="steps between progress lines")
    device: Literal["auto", "cpu", "cuda"] = operational("auto", description="auto: one GPU per worker when Ray has GPUs")
    out: str = operational("results/addt")
    allow_pickle: bool = operational(False)

    _out_creds = field_validator("out")(_no_credentials)

    @field_validator("linf_radius", "linf_step", mode="before")
    @classmethod
    def _fraction(cls, value: Any, info: ValidationInfo) -> float:
        return parse_eps(value, info.field_name)

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"betas {list(value)}: each must be in [0, 1) (AdamW; the paper uses [0.95, 0.999])")
        return value

    @model_validator(mode="after")
    def _check(self):
        if self.batch_size % self.workers:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by workers {self.workers}: every worker "
                             f"takes an equal slice of the global batch (set batch_size to a multiple of workers)")
        if self.precision == "fp16" and self.device == "cpu":
            raise ValueError("precision fp16 needs a GPU (autocast with a gradient scaler); use fp32 or bf16 on cpu")
        return self

    def vote_fields(self) -> dict[str, Any]:
        """The hash payload: every ``votes(...)`` field."""
        return _vote_dump(self)



_UNDECLARED = unclassified_fields(AddtConfig)
if _UNDECLARED:  # a developer error: every field must say whether it determines the weights
    raise TypeError(f"AddtConfig fields declared neither votes(...) nor operational(...): {_UNDECLARED}")
