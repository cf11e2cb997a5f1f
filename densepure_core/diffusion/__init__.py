"""Diffusion arithmetic: the schedule, sigma -> t*, DensePure's re-spacing, the one reverse step
and the purifiers built on it.

``noise_level`` (t* from any alphas_cumprod), ``schedule`` (``DiffusionSchedule``), ``respace``
(re-spaced timesteps and coefficients), ``reverse`` (``ReverseProcess.step``: the only place a
step's arithmetic is written), ``purify`` (none, one-shot DDS, DensePure S-step, full chain).

Imports torch and numpy only: no noise generation (a purifier takes its noise as an argument), no
model loading, no config.
"""
