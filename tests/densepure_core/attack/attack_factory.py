"""Tiny defenses made in the test: a random diffusers UNet and a linear classifier (CPU, seconds)."""

import torch

from densepure_core.attack import Defense
from densepure_core.models import Classifier
from densepure_core.diffusion.respace import respaced_timesteps
from densepure_core.diffusion.reverse import ReverseProcess, unet_denoiser
from densepure_core.diffusion.schedule import DiffusionSchedule


def tiny_models(channels: int = 3, size: int = 8, classes: int = 3):
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval().requires_grad_(False)
    schedule = DiffusionSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                              beta_start=1e-4, beta_end=0.02))
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(channels * size * size, 16), torch.nn.Tanh(),
                              torch.nn.Linear(16, classes))
    clf = Classifier(net, input_size=size, interpolation="bilinear", mean=0.5, std=0.5, in_chans=channels,
                     num_classes=classes).eval().requires_grad_(False)
    return unet, schedule, clf


def tiny_defense(steps: int = 3, t_star: int = 100, k: int = 1, **kw) -> Defense:
    unet, schedule, clf = tiny_models(**kw)
    process = ReverseProcess(unet_denoiser(unet), schedule, respaced_timesteps(t_star, steps))
    return Defense(f"purify-s{steps}", clf, process, t_star, k)


def tiny_images(n: int = 4, channels: int = 3, size: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g)
