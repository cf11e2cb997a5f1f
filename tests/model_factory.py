"""Tiny models and data made in the test: a diffusers DDPM, a timm classifier, an image folder.

Nothing here downloads anything; every model is random-initialised with a fixed seed and saved
in the same formats the real models use (diffusers save_pretrained, timm local-dir).
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def tiny_ddpm(path: Path, channels: int = 3, size: int = 8, learned_range: bool = False, dropout: float = 0.0) -> Path:
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels * (2 if learned_range else 1),
                       block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, dropout=dropout,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              variance_type="learned_range" if learned_range else "fixed_small")
    unet.save_pretrained(path / "unet")
    scheduler.save_pretrained(path / "scheduler")
    return path


def tiny_classifier(path: Path, num_classes: int = 2, size: int = 8, arch: str = "test_resnet") -> Path:
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, size, size), "interpolation": "bilinear",
                            "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    save_for_hf(model, str(path), model_config={"num_classes": num_classes}, safe_serialization=True)
    return path


def image_folder(root: Path, classes=("a", "b"), per_class: int = 3, size: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def tiny_job(tmp: Path, **over) -> dict:
    """A complete, fast certification config over tiny models (RS, DDS, DensePure)."""
    models = tmp / "models"
    if not (models / "ddpm").exists():
        tiny_ddpm(models / "ddpm")
        tiny_classifier(models / "clf")
        image_folder(tmp / "data")
    data = {
        "run_name": "tiny",
        "dataset": {"kind": "imagefolder", "path": str(tmp / "data"), "image_size": 8},
        "diffusion": {"source": str(models / "ddpm")},
        "classifier": {"source": f"local-dir:{models / 'clf'}"},
        "methods": [{"kind": "rs"}, {"kind": "dds"}, {"kind": "densepure", "k": 3, "steps": 2}],
        "sigmas": [0.25, 0.5],
        "n0": 4, "n": 12, "alpha": 0.01, "batch_size": 16, "shard_size": 2, "seed": 3,
        "out": str(tmp / "out"),
    }
    data.update(over)
    return data


def attack_job(tmp: Path, **over) -> dict:
    """A complete, fast attack config over tiny models (bare classifier and a purifier, K = 2)."""
    models = tmp / "models"
    if not (models / "ddpm").exists():
        tiny_ddpm(models / "ddpm")
        tiny_classifier(models / "clf")
        image_folder(tmp / "data")
    data = {
        "job": "attack", "run_name": "tiny-attack",
        "dataset": {"kind": "imagefolder", "path": str(tmp / "data"), "image_size": 8},
        "diffusion": {"source": str(models / "ddpm")},
        "classifier": {"source": f"local-dir:{models / 'clf'}"},
        "defenses": [{"kind": "none"}, {"kind": "purify", "t_fraction": 0.1, "steps": 2, "k": 2}],
        "threats": [{"norm": "linf", "eps": "8/255"}],
        "attacks": [{"kind": "pgd_eot", "iterations": 2, "eot": 2}, {"kind": "dwbox", "iterations": 2},
                    {"kind": "bpda", "iterations": 2, "eot": 2}],
        "score_purifications": 3, "shard_size": 4, "batch_size": 64, "seed": 2, "out": str(tmp / "out"),
    }
    data.update(over)
    return data


def addt_job(tmp: Path, **over) -> dict:
    """A complete, fast ADDT training config over tiny models (a UNet with dropout, 2 classes)."""
    models = tmp / "models"
    if not (models / "ddpm-dropout").exists():
        tiny_ddpm(models / "ddpm-dropout", dropout=0.1)
        tiny_classifier(models / "clf")
        image_folder(tmp / "data", per_class=5)
    data = {
        "job": "train-addt", "run_name": "tiny-addt",
        "dataset": {"kind": "imagefolder", "path": str(tmp / "data"), "image_size": 8},
        "diffusion": {"source": str(models / "ddpm-dropout")},
        "classifier": {"source": f"local-dir:{models / 'clf'}"},
        "steps": 6, "batch_size": 4, "workers": 2, "checkpoint_every": 2, "log_every": 1, "seed": 5,
        "out": str(tmp / "out"),
    }
    data.update(over)
    return data
