"""ADDT (Liu et al. 2024): fine-tuning a diffusion model against adversarial noise.

``formulas`` holds the paper's math (reference.md section 5: lambda_t, RBGM, CGPO, the loss, the
L_inf variant); ``trainer`` one optimisation step (``AddtTrainer``: CGPO on the bare module, the
loss through DDP, AdamW, EMA with warm-up, state for resume), every draw keyed per (seed, step,
example).

Imports :mod:`densepure_core.rng` and torch/diffusers only; the Ray Train loop around it is
``tasks/train_addt``.
"""
