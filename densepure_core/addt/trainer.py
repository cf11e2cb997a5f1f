"""One ADDT training step, its keyed randomness, and its state (pure torch; no Ray, no Prefect).

:class:`AddtTrainer` fine-tunes an epsilon-prediction ``UNet2DModel`` with the math of
:mod:`densepure_core.addt.formulas`: per example a uniform timestep t, CGPO's delta (or the L_inf
variant's), the loss against the mixed noise, AdamW with gradient clipping, and an EMA
(diffusers' ``EMAModel`` with warm-up: at optimisation step s (0-based) the decay is
``addt.ema_decay(s)``, capped at ``ema_max_decay``). The Ray Train loop (tasks/train_addt/train.py)
gives each worker its slice of the global batch and the DDP-wrapped model.

Randomness is explicit and keyed, so a run is a function of its config: at step s the global
batch is examples s*B .. s*B + B - 1 of an epoch-wise permutation of the training set
(:func:`batch_positions`; one permutation per epoch, keyed by (seed, epoch)), and example i of
step s draws its timestep, its flip, CGPO's mixing noise of iteration j (one stream per
(seed, s, i, j): fresh noise every iteration, as the reference loop), delta0, eps' and RBGM
samples from streams keyed by (seed, step, i, purpose) (:func:`step_draws`). The same example
gets the same draws whichever worker holds it, and a run resumed from a checkpoint continues the
same trajectory. Dropout (if the model has any, or ``dropout`` forces it) draws from torch's
generator, re-seeded per (seed, step, rank): the one draw that depends on the worker count.

:data:`DRAWS_VERSION` numbers this scheme; a training OUT records it in run.json, and an OUT of
another version is never resumed (tasks/train_addt/train.py): version 1 (before issue 24) reused one
mixing-noise draw for all CGPO iterations.

CGPO runs on the bare module (``trainer.unet``): it differentiates w.r.t. delta only, and a
forward through the DDP wrapper without a parameter backward would leave DDP's reducer waiting.
The training loss runs through the wrapper (``forward_model``), so its gradients are averaged
over the workers (the reference code's EDM variant bypasses DDP there: each rank then trains
alone; not copied).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from densepure_core.addt import formulas as addt
from densepure_core.rng import derive_seed, gaussian_rows, row_generator

__all__ = ["STATE_FORMAT", "DRAWS_VERSION", "batch_positions", "StepDraws", "step_draws", "set_dropout",
           "AddtTrainer"]

STATE_FORMAT = "densepure-addt-state/1"
#: The version of the keyed draws of a step (see the module docstring); 2: fresh CGPO noise per iteration.
DRAWS_VERSION = 2
_ID = "addt"  # the image_id slot of rng.derive_seed: ADDT's streams are keyed by step and example


def _seed(seed: int, step: int, index: int, purpose: str) -> int:
    return derive_seed(seed, _ID, step, index, f"addt:{purpose}")


def batch_positions(seed: int, step: int, batch_size: int, n: int) -> np.ndarray:
    """Dataset positions ``[batch_size]`` of the global batch of ``step``.

    Global example g = step * batch_size + i is position g mod n of epoch g // n's permutation
    of range(n) (keyed by (seed, epoch)): every image once per epoch, epochs independent.
    """
    g = step * batch_size + np.arange(batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(g, n)
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        perm = row_generator(_seed(seed, int(epoch), -1, "order")).permutation(n)
        mask = epochs == epoch
        out[mask] = perm[offsets[mask]]
    return out


@dataclass
class StepDraws:
    """The draws of a slice of one step's batch (rows in example order).

    t: ``[b]`` long timesteps in [0, T); eps: ``[iterations, b, C, H, W]`` N(0, I), CGPO's (or
    the L_inf steps') mixing noise, a fresh tensor per iteration; delta0, eps_prime:
    ``[b, C, H, W]`` N(0, I) (CGPO's initial delta, the loss's fresh noise); flip: ``[b]`` bool,
    a horizontal flip of the image (applied when the config asks for flips); rbgm: one numpy
    generator per example for RBGM's sorted samples.
    """

    t: torch.Tensor
    eps: torch.Tensor
    delta0: torch.Tensor
    eps_prime: torch.Tensor
    flip: torch.Tensor
    rbgm: list[np.random.Generator]


def step_draws(seed: int, step: int, examples: range, shape: tuple[int, ...], num_timesteps: int,
               device: torch.device | str = "cpu", *, iterations: int = 5) -> StepDraws:
    """The draws of examples ``examples`` (global indices within the batch) of ``step``.

    Every tensor row is keyed by (seed, step, example, purpose), CGPO's noise of iteration j by
    purpose ``eps<j>``: the draws of an example do not depend on the slice (worker) it is in.
    """
    if iterations < 1:
        raise ValueError(f"step_draws: iterations must be >= 1 (the config's cgpo_iterations), got {iterations}")
    t = [int(row_generator(_seed(seed, step, i, "t")).integers(num_timesteps)) for i in examples]
    flip = [bool(row_generator(_seed(seed, step, i, "flip")).random() < 0.5) for i in examples]

    def normals(purpose: str) -> torch.Tensor:
        return gaussian_rows([_seed(seed, step, i, purpose) for i in examples], shape, device)

    return StepDraws(t=torch.tensor(t, dtype=torch.long, device=device),
                     eps=torch.stack([normals(f"eps{j}") for j in range(iterations)]),
                     delta0=normals("delta0"), eps_prime=normals("eps_prime"),
                     flip=torch.tensor(flip, dtype=torch.bool, device=device),
                     rbgm=[row_generator(_seed(seed, step, i, "rbgm")) for i in examples])


def set_dropout(module: torch.nn.Module, p: float) -> int:
    """Set the probability of every ``torch.nn.Dropout`` in ``module`` to ``p`` (the reference's
    ``set_dropout``: ADDT forces 0.1 on the pretrained CIFAR-10 DDPM); returns how many."""
    layers = [m for m in module.modules() if isinstance(m, torch.nn.Dropout)]
    for m in layers:
        m.p = float(p)
    return len(layers)


class AddtTrainer:
    """The model, optimiser, EMA and step counter of one ADDT run (on one worker).

    Args:
        cfg: the run's ``AddtConfig``.
        unet: the ``UNet2DModel`` being fine-tuned (put in train mode, parameters trainable).
        alphas_cumprod: ``[T]`` abar_t of the model's schedule.
        classifier: the frozen classifier on [0, 1] images (``[B, C, H, W] -> [B, classes]``).
        forward_model: the module the training loss calls (the DDP wrapper of ``unet`` under
            Ray Train); default ``unet``.
        rank: this worker's rank (keys its dropout stream).
    """

    def __init__(self, cfg, unet, alphas_cumprod: torch.Tensor, classifier, *, forward_model=None, rank: int = 0):
        from diffusers.training_utils import EMAModel

        self.cfg = cfg
        self.unet = unet.train().requires_grad_(True)
        if cfg.dropout is not None and not set_dropout(self.unet, cfg.dropout) and cfg.dropout > 0:
            raise ValueError(f"dropout: {cfg.dropout} asked for, but the diffusion model has no torch.nn.Dropout "
                             f"layer to set (set dropout: null to train it as it is)")
        self.forward_model = forward_model if forward_model is not None else self.unet
        self.device = next(unet.parameters()).device
        self.abar = alphas_cumprod.to(self.device, torch.float32)
        self.classifier = classifier.eval().requires_grad_(False)
        self.rank = rank
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                           weight_decay=cfg.weight_decay)
        # use_ema_warmup with inv_gamma 1 and power 3/4 is ADDT's min(max, 1 - (1 + s)^-0.75)
        self.ema = EMAModel(self.unet.parameters(), decay=cfg.ema_max_decay, use_ema_warmup=True, inv_gamma=1.0,
                            power=0.75)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.step = 0

    # -- the schedule -------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Linear warm-up over ``lr_warmup_steps``, then constant (the paper: constant)."""
        warm = self.cfg.lr_warmup_steps
        return self.cfg.lr * min(1.0, (step + 1) / warm) if warm else self.cfg.lr

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _eps(self, module):
        def eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with self._autocast():
                out = module(x_t, t).sample
            return out[:, : x_t.shape[1]].float()  # learned-variance models: the epsilon half
        return eps

    # -- one step -----------------------------------------------------------------------------
    def train_step(self, x01: torch.Tensor, labels: torch.Tensor, draws: StepDraws) -> dict[str, Any]:
        """One optimisation step on this worker's slice: ``x01`` ``[b, C, H, W]`` in [0, 1], labels ``[b]``.

        Returns the step's metrics (this worker's loss; the caller averages across workers).
        """
        start = time.perf_counter()
        cfg, step = self.cfg, self.step
        torch.manual_seed(derive_seed(cfg.seed, _ID, step, self.rank, "addt:dropout"))
        if draws.eps.shape[0] != cfg.cgpo_iterations:
            raise ValueError(f"step_draws gave {draws.eps.shape[0]} iterations of noise, the config's cgpo_iterations "
                             f"is {cfg.cgpo_iterations} (call step_draws(..., iterations=cfg.cgpo_iterations))")
        x01 = x01.to(self.device, torch.float32)
        if cfg.random_flip:  # keyed per example: the same flip whichever worker holds it
            x01 = torch.where(draws.flip.to(self.device).view(-1, *[1] * (x01.ndim - 1)), x01.flip(-1), x01)
        x0 = x01 * 2 - 1
        y = labels.to(self.device)
        t = draws.t.to(self.device)
        abar = self.abar[t]
        eps, delta0, eps_prime = (d.to(self.device) for d in (draws.eps, draws.delta0, draws.eps_prime))
        bare = self._eps(self.unet)
        if cfg.variant == "gaussian":
            delta = addt.cgpo(bare, self.classifier, x0, y, t, abar, eps, delta0, draws.rbgm)
            loss = addt.addt_loss(self._eps(self.forward_model), x0, t, abar, delta, eps_prime)
            mix = addt.addt_lambda(abar)
        else:
            delta = addt.linf_perturbation(bare, self.classifier, x0, y, t, abar, eps, radius=cfg.linf_radius,
                                           step=cfg.linf_step)
            loss = addt.linf_loss(self._eps(self.forward_model), x0, t, abar, delta, eps_prime)
            mix = addt.linf_ratio(abar)
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        params = list(self.unet.parameters())
        max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.ema.step(params)
        self.step += 1
        return {"step": step + 1, "loss": float(loss.detach()), "grad_norm": grad_norm, "lr": lr,
                "ema_decay": float(self.ema.cur_decay_value), "mix_mean": float(mix.mean()),
                "seconds": time.perf_counter() - start}

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs: raw weights, optimiser, EMA, scaler, step."""
        return {"format": STATE_FORMAT, "step": self.step, "model": self.unet.state_dict(),
                "optimizer": self.optimizer.state_dict(), "ema": self.ema.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"training state format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        self.unet.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])

    def ema_unet(self):
        """A copy of the UNet holding the EMA weights (eval mode), for export."""
        import copy

        model = copy.deepcopy(self.unet).eval()
        self.ema.copy_to(model.parameters())
        return model.requires_grad_(False)
