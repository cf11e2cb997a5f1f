"""The bundled digits models: architectures, the training recipe, and asset verification.

The project's embedded default certifies real images offline: scikit-learn's digits
(:mod:`densepure_core.data.digits`, 16x16 grayscale) with

- ``ddpm/``: a small diffusers ``UNet2DModel`` (epsilon prediction) + ``DDPMScheduler`` (linear
  1000-step schedule, beta 1e-4..0.02, ``variance_type="fixed_small"``), saved as a
  ``DDPMPipeline`` folder (``unet/``, ``scheduler/``, ``model_index.json``, safetensors);
- ``classifier_clean/``: a timm ``test_resnet`` (narrowed by ``model_args``) trained on clean
  images only, the papers' "off-the-shelf classifier" for DDS and DensePure;
- ``classifier_noise_<sigma>/`` for sigma 0.25, 0.5, 1.0: the same architecture trained with
  Gaussian noise added in [0, 1] pixel space, Cohen et al.'s randomized-smoothing baseline;
- ``manifest.json``: the full recipe (every hyper-parameter, split, seeds, library versions,
  training seconds, measured figures) and the sha256 of every file.

Classifiers are in timm's local-dir format, so they load with no code of ours::

    timm.create_model("local-dir:densepure_core/assets/digits/classifier_clean", pretrained=True)

(``pretrained=True`` is what makes timm read ``model.safetensors``; without it the weights are
random.) Everything trains on the CPU in about 13 minutes on two cores. Regenerate with::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m densepure_core.models.toy --out densepure_core/assets/digits
    .venv/bin/python -m densepure_core.models.toy --out /tmp/toy --quick     # seconds-long smoke run

Recipe, figures and trade-offs: docs/digits_models.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from densepure_core.data.digits import (DIGITS_NUM_CLASSES, DIGITS_TEST_FRACTION, digits_split_indices,
                          load_digits_split)

__all__ = [
    "DIGITS_ASSETS",
    "MANIFEST_NAME",
    "NOISE_SIGMAS",
    "AssetVerificationError",
    "ToyRecipe",
    "build_unet",
    "build_scheduler",
    "build_classifier",
    "one_shot_denoise",
    "t_star_nearest",
    "train_all",
    "verify_assets",
    "main",
]

DIGITS_ASSETS = Path(__file__).resolve().parents[1] / "assets" / "digits"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "densepure-toy-manifest/1"
NOISE_SIGMAS = (0.25, 0.5, 1.0)


class AssetVerificationError(RuntimeError):
    """A bundled asset is missing or differs from the sha256 recorded in manifest.json."""


@dataclass(frozen=True)
class ToyRecipe:
    """Every hyper-parameter of the bundled models (written verbatim into manifest.json).

    The default is the committed recipe; :meth:`quick` keeps the architectures and code path but
    trains for a handful of steps (a smoke test, not a model).
    """

    image_size: int = 16
    num_threads: int = 2  # part of the recipe: the thread count changes float reduction order
    # --- UNet (diffusers UNet2DModel), sized for CPU throughput; see docs/digits_models.md
    unet_block_out_channels: tuple[int, ...] = (8, 16, 32)
    unet_layers_per_block: int = 1
    unet_norm_num_groups: int = 4
    unet_mid_attention: bool = False
    unet_steps: int = 2000
    unet_batch_size: int = 128
    unet_lr: float = 2e-3
    unet_warmup_steps: int = 200
    unet_weight_decay: float = 0.0
    unet_grad_clip: float = 1.0
    unet_ema_decay: float = 0.999
    # t sampling: with probability unet_t_focus_prob, t ~ U{0..unet_t_focus_max-1}, else
    # U{0..999}. 0.0 = the standard uniform DDPM objective.
    unet_t_focus_prob: float = 0.5
    unet_t_focus_max: int = 500
    # --- DDPM schedule: the papers' linear 1000-step schedule (t* values depend on it)
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # --- classifiers (timm)
    classifier_arch: str = "test_resnet"
    classifier_model_args: dict[str, Any] = field(
        default_factory=lambda: {"channels": [16, 32, 48, 64], "stem_width": 16})
    classifier_mean: float = 0.5  # timm pretrained_cfg normalization: x -> (x - 0.5) / 0.5
    classifier_std: float = 0.5
    classifier_batch_size: int = 128
    classifier_lr: float = 3e-3
    classifier_weight_decay: float = 0.05
    classifier_epochs_clean: int = 30
    classifier_epochs_noise: int = 100
    noise_sigmas: tuple[float, ...] = NOISE_SIGMAS
    # --- evaluation (figures in the manifest; not part of the weights)
    eval_draws: int = 8  # Gaussian draws per test image per sigma
    eval_max_images: int | None = None  # None: the whole test split
    throughput_batch_sizes: tuple[int, ...] = (256, 512, 1024)
    throughput_seconds: float = 4.0

    @classmethod
    def quick(cls) -> "ToyRecipe":
        """Seconds-long smoke configuration: same architectures and code path, tiny budgets.

        One thread: with two OpenMP threads on two cores that other processes also use (CI,
        parallel test runs), barrier spin-waits made 40 tiny steps take 90 s instead of 3.
        """
        return cls(num_threads=1, unet_steps=4, unet_batch_size=32, unet_warmup_steps=2,
                   classifier_epochs_clean=1, classifier_epochs_noise=1,
                   eval_draws=1, eval_max_images=32, throughput_batch_sizes=(64,),
                   throughput_seconds=0.0)

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# --------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------

def build_unet(recipe: ToyRecipe):
    """The digits UNet: ``(x_t[B,1,S,S], t[B]) -> .sample`` epsilon ``[B,1,S,S]``, S = image_size.

    Three resolutions (16, 8, 4 at S = 16) with 8/16/32 channels, one ResNet block per level, no
    attention: 11 MFLOP per image, sized for CPU certification throughput, where DensePure
    makes K x S calls per noisy copy. Attention was left out untried for quality: at these
    sizes it only added latency. docs/digits_models.md compares the variants measured.
    """
    from diffusers import UNet2DModel

    levels = len(recipe.unet_block_out_channels)
    return UNet2DModel(
        sample_size=recipe.image_size,
        in_channels=1,
        out_channels=1,
        layers_per_block=recipe.unet_layers_per_block,
        block_out_channels=tuple(recipe.unet_block_out_channels),
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        norm_num_groups=recipe.unet_norm_num_groups,
        add_attention=recipe.unet_mid_attention,
    )


def build_scheduler(recipe: ToyRecipe):
    """The DDPM schedule: linear betas 1e-4..0.02 over 1000 steps, epsilon prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=recipe.num_train_timesteps,
        beta_start=recipe.beta_start,
        beta_end=recipe.beta_end,
        beta_schedule="linear",
        prediction_type="epsilon",
        variance_type="fixed_small",
        clip_sample=True,
        clip_sample_range=1.0,
    )


def build_classifier(recipe: ToyRecipe) -> torch.nn.Module:
    """A timm classifier for ``[B,1,S,S]`` normalized images -> logits ``[B,10]``.

    The ``pretrained_cfg`` carries the preprocessing (input size, bilinear, mean/std 0.5) so the
    saved folder is self-describing for ``timm.create_model("local-dir:...")``.
    """
    import timm

    s = recipe.image_size
    overlay = {"input_size": (1, s, s), "interpolation": "bilinear", "crop_pct": 1.0,
               "crop_mode": "center", "mean": (recipe.classifier_mean,),
               "std": (recipe.classifier_std,)}
    return timm.create_model(recipe.classifier_arch, pretrained=False,
                             num_classes=DIGITS_NUM_CLASSES, in_chans=1,
                             pretrained_cfg_overlay=overlay, **recipe.classifier_model_args)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

def _sub_seed(seed: int, name: str) -> int:
    """An independent 63-bit seed per component, so adding a component never shifts the others."""
    h = hashlib.blake2b(f"densepure-toy/{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def _batches(n: int, batch_size: int, g: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless index batches: successive seeded permutations of range(n) (last partial dropped)."""
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): _sha256(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}


def _versions() -> dict[str, str]:
    import diffusers
    import numpy
    import safetensors
    import sklearn
    import timm

    return {"python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "timm": timm.__version__,
            "numpy": numpy.__version__, "scikit-learn": sklearn.__version__,
            "safetensors": safetensors.__version__}


def _machine(num_threads: int) -> dict[str, Any]:
    """Where the weights were made: bitwise reproducibility is only expected on the same CPU type."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                       cpu)
    return {"platform": platform.platform(), "cpu_model": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": num_threads}


@contextlib.contextmanager
def _reproducible(num_threads: int) -> Iterator[None]:
    """Fixed thread count + deterministic algorithms for the block; restores the caller's state."""
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    det_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):  # torch.manual_seed below stays local
            yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det, warn_only=det_warn)


def t_star_nearest(alphas_cumprod: torch.Tensor, sigma: float) -> int:
    """The t with sqrt((1 - abar_t) / abar_t) nearest to 2 sigma (DensePure's rule).

    Duplicates ``noise_level``'s "nearest" rule on purpose: the toy's figures must not move
    when the pipeline's rule options change. Linear 1000-step schedule: 0.25/0.5/1.0 ->
    144/258/396.
    """
    ratio = ((1.0 - alphas_cumprod.double()) / alphas_cumprod.double()).sqrt()
    return int(torch.argmin((ratio - 2.0 * sigma).abs()).item())


@torch.no_grad()
def one_shot_denoise(unet, alphas_cumprod: torch.Tensor, x_noisy01: torch.Tensor,
                     sigma: float) -> torch.Tensor:
    """Carlini et al.'s one-shot denoising of Gaussian copies in [0, 1].

    Args:
        unet: epsilon-prediction ``UNet2DModel``.
        alphas_cumprod: the schedule's ``abar`` ``[T]``.
        x_noisy01: ``x + sigma * e`` ``[B,1,S,S]`` (pixel space, unclipped).
        sigma: the smoothing noise level.

    Returns:
        ``[B,1,S,S]`` in [0, 1]: ``x_t* = sqrt(abar)(2 x_noisy - 1)`` at ``t* = t_star_nearest``,
        ``x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)`` clipped to [-1, 1], mapped to [0, 1].
    """
    t = t_star_nearest(alphas_cumprod, sigma)
    abar = float(alphas_cumprod[t])
    x_t = math.sqrt(abar) * (2.0 * x_noisy01 - 1.0)
    eps = unet(x_t, torch.full((x_t.shape[0],), t, dtype=torch.long)).sample
    x0 = (x_t - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)
    return (x0.clamp(-1.0, 1.0) + 1.0) / 2.0


@torch.no_grad()
def _predict(model: torch.nn.Module, x01: torch.Tensor, recipe: ToyRecipe,
             batch_size: int = 512) -> torch.Tensor:
    """Class predictions ``[N]`` for images ``[N,1,S,S]`` in pixel space (normalizes first)."""
    model.eval()
    out = [model((x01[i:i + batch_size] - recipe.classifier_mean) / recipe.classifier_std).argmax(1)
           for i in range(0, len(x01), batch_size)]
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def _train_unet(recipe: ToyRecipe, images01: torch.Tensor, seed: int, log: Callable[[str], None]):
    """DDPM training (Ho et al.): MSE on epsilon, EMA weights, t drawn from a two-part mixture.

    Half the batch draws t uniformly over all 1000 steps, so this stays a real DDPM (it can
    sample from pure noise and purify at any sigma); the other half draws t below 500, which
    covers every t* that certification at sigma <= ~1.2 uses (sigma 1.0 -> t* = 396). On a
    CPU budget that doubles the training signal where the project needs it; the price is a
    less-trained model at t > 500 (samples from pure noise are worse than they could be).
    """
    scheduler = build_scheduler(recipe)
    torch.manual_seed(_sub_seed(seed, "unet-init"))
    unet = build_unet(recipe)
    ema = copy.deepcopy(unet).requires_grad_(False)
    g = _generator(_sub_seed(seed, "unet-batches"))
    x0_all = images01 * 2.0 - 1.0
    abar = scheduler.alphas_cumprod.float()
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.unet_lr,
                            weight_decay=recipe.unet_weight_decay)
    batches = _batches(len(x0_all), recipe.unet_batch_size, g)
    unet.train()
    t0, running = time.perf_counter(), 0.0
    for step in range(recipe.unet_steps):
        idx = next(batches)
        x0 = x0_all[idx]
        t = torch.randint(0, recipe.num_train_timesteps, (len(idx),), generator=g)
        if recipe.unet_t_focus_prob > 0:
            t_focus = torch.randint(0, recipe.unet_t_focus_max, (len(idx),), generator=g)
            pick = torch.rand(len(idx), generator=g) < recipe.unet_t_focus_prob
            t = torch.where(pick, t_focus, t)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * eps
        loss = F.mse_loss(unet(x_t, t).sample, eps)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, recipe.unet_steps, recipe.unet_lr, recipe.unet_warmup_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), recipe.unet_grad_clip)
        opt.step()
        # EMA with the usual warm-up (1 + n) / (10 + n): early averages are not dominated by
        # the random initialization when the run is short.
        decay = min(recipe.unet_ema_decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1.0 - decay)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % 500 == 0 or step + 1 == recipe.unet_steps:
            log(f"  unet step {step + 1}/{recipe.unet_steps}  loss(ema) {running:.4f}  "
                f"{time.perf_counter() - t0:.0f}s")
    ema.eval()
    return ema, scheduler


def _train_classifier(recipe: ToyRecipe, images01: torch.Tensor, labels: torch.Tensor,
                      sigma: float, epochs: int, seed: int, name: str,
                      log: Callable[[str], None]) -> torch.nn.Module:
    """Cross-entropy training; ``sigma > 0`` adds fresh N(0, sigma^2) noise in [0, 1] pixel space
    (before normalization, unclipped), exactly the noise the smoothed classifier will see."""
    torch.manual_seed(_sub_seed(seed, f"{name}-init"))
    model = build_classifier(recipe)
    g = _generator(_sub_seed(seed, f"{name}-batches"))
    steps_per_epoch = len(images01) // recipe.classifier_batch_size
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.classifier_lr,
                            weight_decay=recipe.classifier_weight_decay)
    batches = _batches(len(images01), recipe.classifier_batch_size, g)
    model.train()
    t0 = time.perf_counter()
    for step in range(total):
        idx = next(batches)
        x = images01[idx]
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=g)
        logits = model((x - recipe.classifier_mean) / recipe.classifier_std)
        loss = F.cross_entropy(logits, labels[idx])
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, total, recipe.classifier_lr, steps_per_epoch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    log(f"  {name}: {epochs} epochs, {total} steps, last loss {loss.item():.4f}, "
        f"{time.perf_counter() - t0:.0f}s")
    return model


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------

def _save_ddpm(unet, scheduler, out: Path) -> None:
    """``out/unet/`` + ``out/scheduler/`` + ``model_index.json`` (a loadable DDPMPipeline)."""
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(out), safe_serialization=True)


def _save_classifier(model: torch.nn.Module, recipe: ToyRecipe, out: Path) -> None:
    """timm local-dir format: ``config.json`` + ``model.safetensors``.

    ``save_for_hf`` writes the architecture, num_classes, the model_args it needs and the
    pretrained_cfg; we then drop fields inherited from timm's ImageNet test checkpoint that would
    be wrong here (its license, tag and 160-px pool size) and record the true ones.
    """
    import timm

    timm.models.save_for_hf(model, str(out), safe_serialization=True,
                            model_config={"label_names": [str(c) for c in range(DIGITS_NUM_CLASSES)]})
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    pc = cfg["pretrained_cfg"]
    for key in ("license", "hf_hub_id", "url"):
        pc.pop(key, None)
    pc["tag"] = f"digits{recipe.image_size}"
    with torch.no_grad():
        feat = model.forward_features(torch.zeros(1, 1, recipe.image_size, recipe.image_size))
    pc["pool_size"] = list(feat.shape[-2:])
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def _unet_throughput(unet, recipe: ToyRecipe) -> dict[str, float]:
    """Single-image UNet forwards per second at a few batch sizes (machine-dependent)."""
    out: dict[str, float] = {}
    s = recipe.image_size
    for bs in recipe.throughput_batch_sizes:
        x = torch.randn(bs, 1, s, s, generator=_generator(0))
        t = torch.full((bs,), 258, dtype=torch.long)
        unet(x, t)  # warm-up (oneDNN picks kernels on the first call)
        n, t0 = 0, time.perf_counter()
        while True:
            unet(x, t)
            n += 1
            if time.perf_counter() - t0 >= recipe.throughput_seconds:
                break
        out[str(bs)] = round(n * bs / (time.perf_counter() - t0), 1)
    return out


@torch.no_grad()
def _evaluate(recipe: ToyRecipe, seed: int, unet, scheduler, classifiers: dict[str, torch.nn.Module],
              log: Callable[[str], None]) -> dict[str, Any]:
    """Test-split figures: clean accuracy, one-shot-denoised accuracy, noise-trained accuracy.

    Each test image gets ``eval_draws`` Gaussian draws; the same draws (scaled by sigma) serve
    every sigma and every model (common random numbers: differences between models are not
    noise-draw luck). Accuracies are averaged over images and draws.
    """
    test = load_digits_split("test", recipe.image_size)
    x, y = test.images, test.labels
    if recipe.eval_max_images is not None:
        x, y = x[:recipe.eval_max_images], y[:recipe.eval_max_images]
    draws = torch.randn((recipe.eval_draws, *x.shape), generator=_generator(_sub_seed(seed, "eval")))
    abar = scheduler.alphas_cumprod.float()
    clean = classifiers["classifier_clean"]

    def acc(pred: torch.Tensor) -> float:
        return round(float((pred == y).double().mean()), 6)

    metrics: dict[str, Any] = {"eval_images": len(y), "eval_draws": recipe.eval_draws,
                               "clean_accuracy": {k: acc(_predict(m, x, recipe))
                                                  for k, m in classifiers.items()}}
    one_shot, raw_noisy, noise_trained, t_star = {}, {}, {}, {}
    for sigma in recipe.noise_sigmas:
        key = str(sigma)
        t_star[key] = t_star_nearest(abar, sigma)
        a_os, a_raw, a_nt = [], [], []
        for d in range(recipe.eval_draws):
            noisy = x + sigma * draws[d]
            den = torch.cat([one_shot_denoise(unet, abar, noisy[i:i + 512], sigma)
                             for i in range(0, len(noisy), 512)])
            a_os.append(acc(_predict(clean, den, recipe)))
            a_raw.append(acc(_predict(clean, noisy, recipe)))
            a_nt.append(acc(_predict(classifiers[f"classifier_noise_{sigma}"], noisy, recipe)))
        one_shot[key] = round(sum(a_os) / len(a_os), 6)
        raw_noisy[key] = round(sum(a_raw) / len(a_raw), 6)
        noise_trained[key] = round(sum(a_nt) / len(a_nt), 6)
        log(f"  sigma {sigma}: t*={t_star[key]}  one-shot+clean {one_shot[key]:.4f}  "
            f"noise-trained {noise_trained[key]:.4f}  clean on raw noisy {raw_noisy[key]:.4f}")
    metrics.update({"t_star_nearest": t_star,
                    "one_shot_denoised_clean_classifier_accuracy": one_shot,
                    "noise_trained_classifier_accuracy": noise_trained,
                    "clean_classifier_on_raw_noisy_accuracy": raw_noisy})
    return metrics


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------

def train_all(out_dir: str | os.PathLike, *, seed: int = 0, quick: bool = False,
              log: Callable[[str], None] = print, recipe: ToyRecipe | None = None) -> dict[str, Any]:
    """Train the DDPM and the four classifiers, save them under ``out_dir``, write the manifest.

    Args:
        out_dir: folder to (over)write: ``ddpm/``, ``classifier_clean/``,
            ``classifier_noise_{0.25,0.5,1.0}/``, ``manifest.json`` (written last).
        seed: the run seed; each component derives its own seed from it.
        quick: seconds-long smoke configuration (:meth:`ToyRecipe.quick`), same code path.
        log: receives progress lines.
        recipe: override the recipe entirely (``quick`` is then ignored).

    Returns:
        The manifest (also written to ``out_dir/manifest.json``).

    Same seed, same thread count, same machine and library versions -> bitwise-identical
    weights (deterministic algorithms, all randomness from seeded generators). Across CPUs the
    oneDNN kernels may differ and so may the last bits.
    """
    recipe = recipe or (ToyRecipe.quick() if quick else ToyRecipe())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = out / MANIFEST_NAME
    if stale.exists():
        stale.unlink()  # a manifest must never describe half-rewritten weights
    seconds: dict[str, float] = {}
    with _reproducible(recipe.num_threads):
        train = load_digits_split("train", recipe.image_size)
        log(f"digits: {len(train)} training images at {recipe.image_size}x{recipe.image_size}")

        t0 = time.perf_counter()
        log(f"training the DDPM UNet ({recipe.unet_steps} steps, batch {recipe.unet_batch_size})")
        unet, scheduler = _train_unet(recipe, train.images, seed, log)
        seconds["ddpm"] = round(time.perf_counter() - t0, 1)
        _save_ddpm(unet, scheduler, out / "ddpm")

        classifiers: dict[str, torch.nn.Module] = {}
        specs = [("classifier_clean", 0.0, recipe.classifier_epochs_clean)]
        specs += [(f"classifier_noise_{s}", s, recipe.classifier_epochs_noise)
                  for s in recipe.noise_sigmas]
        for name, sigma, epochs in specs:
            t0 = time.perf_counter()
            log(f"training {name} (sigma {sigma})")
            model = _train_classifier(recipe, train.images, train.labels, sigma, epochs, seed,
                                      name, log)
            seconds[name] = round(time.perf_counter() - t0, 1)
            _save_classifier(model, recipe, out / name)
            classifiers[name] = model

        # Reload what was written, through the public loaders only, and check it is what we
        # trained: the committed files, not the in-memory models, are the product.
        import timm
        from diffusers import UNet2DModel

        probe = load_digits_split("test", recipe.image_size).images[:8]
        for name, model in classifiers.items():
            loaded = timm.create_model(f"local-dir:{out / name}", pretrained=True).eval()
            if not torch.equal(_predict(loaded, probe, recipe), _predict(model, probe, recipe)):
                raise RuntimeError(f"{out / name} does not reload to the trained model")
        reloaded = UNet2DModel.from_pretrained(str(out / "ddpm" / "unet"),
                                               low_cpu_mem_usage=False).eval()
        tt = torch.full((len(probe),), 100, dtype=torch.long)
        if not torch.equal(reloaded(probe, tt).sample, unet(probe, tt).sample):
            raise RuntimeError(f"{out / 'ddpm' / 'unet'} does not reload to the trained UNet")

        log("evaluating on the test split")
        metrics = _evaluate(recipe, seed, unet, scheduler, classifiers, log)
        metrics["unet_forwards_per_second"] = _unet_throughput(unet, recipe)
        log(f"  UNet single-image forwards/s by batch size: {metrics['unet_forwards_per_second']}")

    idx = digits_split_indices()
    test_ids = ",".join(f"digits-{i}" for i in idx["test"].tolist())
    manifest = {
        "format": MANIFEST_FORMAT,
        "seed": seed,
        "quick": quick,
        "default_recipe": recipe == ToyRecipe(),
        "recipe": recipe.to_json(),
        "data": {
            "source": "sklearn.datasets.load_digits (8x8, values 0..16, 1797 images)",
            "preprocessing": f"/16 -> [0,1]; 1 channel; torch interpolate to {recipe.image_size}x"
                             f"{recipe.image_size}, bilinear, align_corners=False, antialias=False",
            "split": f"stratified: per class, the round({DIGITS_TEST_FRACTION} * n) ids with the "
                     f"smallest BLAKE2b(salt + id) are test (densepure_core/data/digits.py)",
            "n_train": int(len(idx["train"])),
            "n_test": int(len(idx["test"])),
            "test_ids_sha256": hashlib.sha256(test_ids.encode()).hexdigest(),
            "ddpm_trained_on": "train", "classifiers_trained_on": "train",
        },
        "models": {
            "ddpm": {"path": "ddpm", "unet": "diffusers UNet2DModel", "scheduler": "DDPMScheduler",
                     "parameters": sum(p.numel() for p in unet.parameters()),
                     "weights": "EMA"},
            **{name: {"path": name, "architecture": recipe.classifier_arch,
                      "model_args": recipe.classifier_model_args,
                      "train_noise_sigma": sigma,
                      "parameters": sum(p.numel() for p in classifiers[name].parameters()),
                      "load": f'timm.create_model("local-dir:<assets>/{name}", pretrained=True)'}
               for name, sigma, _ in specs},
        },
        "versions": _versions(),
        "machine": _machine(recipe.num_threads),
        "training_seconds": seconds,
        "metrics": metrics,
        "files": _file_hashes(out),
    }
    _write_json_atomic(out / MANIFEST_NAME, manifest)
    log(f"wrote {out / MANIFEST_NAME} ({len(manifest['files'])} files hashed); "
        f"training took {sum(seconds.values()):.0f}s")
    return manifest


def verify_assets(path: str | os.PathLike = DIGITS_ASSETS) -> dict[str, Any]:
    """Check every file listed in ``path/manifest.json`` against its recorded sha256.

    Also refuses weights files (``*.safetensors``) that the manifest does not list.

    Returns:
        The manifest.

    Raises:
        AssetVerificationError: naming the missing, changed or unlisted file and the fix.
    """
    root = Path(path)
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise AssetVerificationError(
            f"{mpath} does not exist: the digits assets are missing or incomplete; regenerate them "
            f"with `python -m densepure_core.models.toy --out {root}`")
    manifest = json.loads(mpath.read_text())
    files = manifest.get("files") or {}
    if not files:
        raise AssetVerificationError(f"{mpath} lists no files")
    for rel, expected in files.items():
        f = root / rel
        if not f.is_file():
            raise AssetVerificationError(f"{f} is listed in {mpath} but missing; restore it "
                                         f"(git checkout) or regenerate the assets")
        got = _sha256(f)
        if got != expected:
            raise AssetVerificationError(
                f"{f} has sha256 {got}, but {mpath} records {expected}: the file was modified "
                f"or truncated (a Git LFS pointer?); restore it or regenerate the assets")
    for f in sorted(root.rglob("*.safetensors")):
        if f.relative_to(root).as_posix() not in files:
            raise AssetVerificationError(f"{f} is not listed in {mpath}: stray weights file")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """``python -m densepure_core.models.toy --out DIR [--quick] [--seed N]``."""
    p = argparse.ArgumentParser(prog="python -m densepure_core.models.toy", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (e.g. densepure_core/assets/digits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="seconds-long smoke configuration")
    args = p.parse_args(argv)
    manifest = train_all(args.out, seed=args.seed, quick=args.quick,
                         log=lambda s: print(s, flush=True))
    print(json.dumps(manifest["metrics"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
