"""ADM -> diffusers conversion against OpenAI's own code (guided-diffusion-sdk, test-only).

Small random ADM UNets in several configurations are saved as the original checkpoints are
(``torch.save(model.state_dict())``), converted with ``densepure_core.models.adm``, loaded through
``models.load_diffusion``, and must give guided_diffusion's ``UNetModel`` output to 1e-4 (fp32).
The purifier math on the converted model (posterior mean/variance with learned range, DensePure's
S-step re-spaced sampler, the one-shot x0) must match guided_diffusion's ``GaussianDiffusion`` /
``SpacedDiffusion`` driving the original model, to the same tolerance.

improved-diffusion's UNet is guided-diffusion's with ``use_new_attention_order=False``
(its ``QKVAttention`` is guided-diffusion's ``QKVAttentionLegacy``; same state-dict names) and
``rescale_timesteps=True``: the "improved" cases below are exactly that.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

with warnings.catch_warnings():  # guided_diffusion/nn.py uses torch.cuda.amp.custom_fwd
    warnings.simplefilter("ignore", FutureWarning)
    from guided_diffusion import gaussian_diffusion as gd
    from guided_diffusion.respace import SpacedDiffusion
    from guided_diffusion.unet import UNetModel

from densepure_core.models import adm
from densepure_core.models.adm import ADM_PRESETS, AdmConfig, AdmConversionError
from densepure_core.models import load_diffusion
from densepure_core.diffusion.purify import (
    ReverseProcess,
    one_shot,
    respaced_timesteps,
    reverse_process,
    unet_denoiser,
)
from densepure_core.rng import REVERSE, RowNoise, derive_seed
from densepure_core.diffusion.schedule import DiffusionSchedule

TOL = 1e-4

# name -> tiny flags covering: learned sigma on/off, scale-shift on/off, resblock up/down on/off,
# attention at several resolutions, num_heads (legacy and new order) and num_head_channels,
# rescaled timesteps (improved-diffusion), predict_xstart, fixed small/large variance.
CASES = {
    "adm256-like": AdmConfig(  # the ImageNet model's flags, shrunk
        image_size=16, num_channels=32, num_res_blocks=1, channel_mult=(1, 1, 2),
        attention_resolutions=(8, 4), num_head_channels=16, learn_sigma=True,
        resblock_updown=True, use_scale_shift_norm=True, diffusion_steps=1000),
    "improved-cifar-like": AdmConfig(  # the CIFAR-10 model's flags, shrunk
        image_size=16, num_channels=32, num_res_blocks=2, channel_mult=(1, 2, 2),
        attention_resolutions=(8, 4), num_heads=2, learn_sigma=True, dropout=0.3,
        use_scale_shift_norm=True, diffusion_steps=4000, noise_schedule="cosine",
        rescale_timesteps=True),
    "plain-conv-resample": AdmConfig(
        image_size=16, num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
        attention_resolutions=(16,), num_heads=1, learn_sigma=False,
        use_scale_shift_norm=False, resblock_updown=False),
    "new-order-updown-no-scale-shift": AdmConfig(
        image_size=16, num_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2),
        attention_resolutions=(16, 4), num_head_channels=8, use_new_attention_order=True,
        learn_sigma=True, resblock_updown=True, use_scale_shift_norm=False),
    "new-order-num-heads-xstart": AdmConfig(
        image_size=8, num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
        attention_resolutions=(4,), num_heads=4, use_new_attention_order=True,
        predict_xstart=True, sigma_small=True, use_scale_shift_norm=True),
    "mid-attention-only": AdmConfig(
        image_size=8, num_channels=32, num_res_blocks=2, channel_mult=(1, 1),
        attention_resolutions=(), num_heads=2, learn_sigma=True, resblock_updown=True,
        diffusion_steps=500, noise_schedule="cosine", rescale_timesteps=True),
}


def gd_unet(cfg: AdmConfig, seed: int = 0) -> UNetModel:
    """guided_diffusion's UNetModel for ``cfg`` (as script_util.create_model builds it), with
    every parameter randomised (ADM zero-initialises its output convs)."""
    model = UNetModel(
        image_size=cfg.image_size, in_channels=3, model_channels=cfg.num_channels,
        out_channels=6 if cfg.learn_sigma else 3, num_res_blocks=cfg.num_res_blocks,
        attention_resolutions=tuple(cfg.image_size // r for r in cfg.attention_resolutions),
        dropout=cfg.dropout, channel_mult=cfg.mults, num_heads=cfg.num_heads,
        num_head_channels=cfg.num_head_channels, num_heads_upsample=cfg.num_heads_upsample,
        use_scale_shift_norm=cfg.use_scale_shift_norm, resblock_updown=cfg.resblock_updown,
        use_new_attention_order=cfg.use_new_attention_order)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:  # fan-in scaled, so activations stay O(1) through the depth
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif ".norm." in name or "in_layers.0" in name or "out_layers.0" in name or \
                    name.startswith("out.0"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def gd_diffusion(cfg: AdmConfig, use_timesteps=None) -> SpacedDiffusion:
    """guided_diffusion's diffusion for ``cfg``, as script_util.create_gaussian_diffusion builds it."""
    betas = gd.get_named_beta_schedule(cfg.noise_schedule, cfg.diffusion_steps)
    var = (gd.ModelVarType.LEARNED_RANGE if cfg.learn_sigma else
           gd.ModelVarType.FIXED_SMALL if cfg.sigma_small else gd.ModelVarType.FIXED_LARGE)
    return SpacedDiffusion(
        use_timesteps=use_timesteps if use_timesteps is not None else range(cfg.diffusion_steps),
        betas=betas, model_mean_type=gd.ModelMeanType.START_X if cfg.predict_xstart
        else gd.ModelMeanType.EPSILON, model_var_type=var, loss_type=gd.LossType.MSE,
        rescale_timesteps=cfg.rescale_timesteps)


def gd_call(model: UNetModel, cfg: AdmConfig, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The original model on original timesteps, with the codebase's timestep rescaling."""
    ts = t.float() * (1000.0 / cfg.diffusion_steps) if cfg.rescale_timesteps else t
    return model(x, ts)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (cfg, original model, load_diffusion result), each converted from a .pt file."""
    root = tmp_path_factory.mktemp("adm")
    out = {}
    for i, (name, cfg) in enumerate(CASES.items()):
        model = gd_unet(cfg, seed=i)
        ckpt = root / f"{name}.pt"
        torch.save(model.state_dict(), ckpt)  # how the released checkpoints were saved
        adm.convert_adm_checkpoint(ckpt, root / name, cfg)
        out[name] = (cfg, model, load_diffusion(str(root / name)))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_converted_unet_matches_guided_diffusion(converted, name):
    cfg, model, dm = converted[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, cfg.image_size, cfg.image_size, generator=g)
    t = torch.randint(0, cfg.diffusion_steps, (3,), generator=g)
    t[0] = cfg.diffusion_steps - 1
    with torch.no_grad():
        ref = gd_call(model, cfg, x, t)
        ours = dm.unet(x, t).sample
    assert ours.shape == ref.shape == (3, 6 if cfg.learn_sigma else 3, cfg.image_size,
                                       cfg.image_size)
    assert ref.abs().mean() > 0.05  # a meaningful output, not zeros
    assert (ours - ref).abs().max().item() <= TOL


def test_time_embedding_and_blocks_map_as_documented(converted):
    cfg, _, dm = converted["adm256-like"]
    c = dm.unet.config
    assert (c.time_embedding_type, c.flip_sin_to_cos, c.freq_shift) == ("positional", True, 0)
    # attention at resolutions 8 and 4 of a 16x16 model: levels 1 and 2 (downsample rates 2, 4)
    assert c.down_block_types == ["ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"]
    assert c.up_block_types == ["AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"]
    assert (c.downsample_type, c.upsample_type, c.resnet_time_scale_shift) == \
        ("resnet", "resnet", "scale_shift")
    assert c.attention_head_dim == 16 and c.attn_norm_num_groups == 32
    assert dm.scheduler.config.variance_type == "learned_range"
    # rescale_timesteps with T != 1000: a learned-type table holding ADM's sinusoid of t*1000/T
    cfg, _, dm = converted["improved-cifar-like"]
    assert dm.unet.config.time_embedding_type == "learned"
    table = dm.unet.time_proj.weight
    assert table.shape == (4000, 32)
    t = torch.tensor([0, 1, 1234, 3999])
    half = 16
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = (t.float() * 0.25)[:, None] * freqs[None]
    assert torch.equal(table[t], torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
    meta = json.loads((Path(dm.source) / "adm_conversion.json").read_text())
    assert meta["adm_flags"]["rescale_timesteps"] is True and len(meta["sha256"]) == 64


@pytest.mark.parametrize("name", list(CASES))
def test_scheduler_matches_guided_diffusion_betas(converted, name):
    cfg, _, dm = converted[name]
    ours = DiffusionSchedule.from_scheduler(dm.scheduler)
    ref = gd_diffusion(cfg)
    assert ours.num_timesteps == cfg.diffusion_steps
    np.testing.assert_allclose(ours.betas, ref.betas, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod, rtol=1e-5, atol=1e-9)
    expect = ("learned_range" if cfg.learn_sigma else "fixed_small" if cfg.sigma_small
              else "fixed_large")
    assert ours.variance_type == expect
    assert ours.prediction_type == ("sample" if cfg.predict_xstart else "epsilon")


@pytest.mark.parametrize("name", ["adm256-like", "improved-cifar-like", "plain-conv-resample",
                                  "new-order-num-heads-xstart"])
def test_posterior_mean_and_variance_match(converted, name):
    """Our reverse step's mean, log variance (learned range) and x0 == p_mean_variance."""
    cfg, model, dm = converted[name]
    schedule = DiffusionSchedule.from_scheduler(dm.scheduler)
    ref_diff = gd_diffusion(cfg)
    den = unet_denoiser(dm.unet)
    chain = ReverseProcess(den, schedule, range(cfg.diffusion_steps - 1, -1, -1))  # step i is t = T-1-i
    spaced = chain.spaced
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=g)
    # The timesteps purifiers use: up to t*(sigma = 1). (Near t = T-1, x0 = x_t / sqrt(abar) - ...
    # multiplies float32 rounding of the UNet by 1/sqrt(abar) ~ 156 on the linear schedule.)
    for t in (1, cfg.diffusion_steps // 10, schedule.t_star(1.0, "nearest")):
        tt = torch.full((2,), t)
        with torch.no_grad():
            ref = ref_diff.p_mean_variance(model, x, tt, clip_denoised=True)
            mean, x0 = chain.step(x, chain.num_steps - 1 - t, torch.zeros_like(x))  # z = 0: the mean
            out = den(x, tt)
            v = out[:, 3:] if cfg.learn_sigma else None
            log_var = spaced.log_variance(t, schedule.variance_type, v, x)
        assert (x0 - ref["pred_xstart"]).abs().max().item() <= TOL
        assert (mean - ref["mean"]).abs().max().item() <= TOL
        assert (log_var.expand_as(x) - ref["log_variance"]).abs().max().item() <= TOL


@pytest.mark.parametrize("name,sigma,steps", [("adm256-like", 0.5, 10),
                                              ("improved-cifar-like", 0.25, 10),
                                              ("new-order-updown-no-scale-shift", 1.0, 4)])
def test_densepure_respaced_sampler_matches_spaced_diffusion(converted, name, sigma, steps,
                                                             monkeypatch):
    """reverse_process(respaced_timesteps(t*, S)) == SpacedDiffusion.p_sample loop, same noise."""
    cfg, model, dm = converted[name]
    schedule = DiffusionSchedule.from_scheduler(dm.scheduler)
    t_star = schedule.t_star(sigma, "nearest")
    ts = respaced_timesteps(t_star, steps)
    seeds = [derive_seed(7, "img", j, 0, REVERSE) for j in range(2)]
    shape = (3, cfg.image_size, cfg.image_size)
    x_t = torch.randn(2, *shape, generator=torch.Generator().manual_seed(3))

    ours = reverse_process(unet_denoiser(dm.unet), schedule, x_t, ts, RowNoise(seeds, shape))

    # guided_diffusion draws th.randn_like(x) at every step (also the last, masked out); feed it
    # the same rows our RowNoise draws, in the same order.
    noise = RowNoise(seeds, shape)
    draws = [noise.draw() for _ in range(len(ts) - 1)] + [torch.zeros(2, *shape)]
    monkeypatch.setattr(torch, "randn_like", lambda x, **kw: draws.pop(0))
    sd = gd_diffusion(cfg, use_timesteps=ts)
    x = x_t
    with torch.no_grad():
        for i in reversed(range(len(ts))):
            out = sd.p_sample(model, x, torch.full((2,), i), clip_denoised=True)
            x = out["sample"]
    monkeypatch.undo()
    assert not draws
    assert sd.timestep_map == sorted(ts)
    assert (ours - out["pred_xstart"]).abs().max().item() <= TOL
    assert (ours - x).abs().max().item() <= TOL  # the last sample is the predicted x0
    assert ours.abs().max() <= 1.0


@pytest.mark.parametrize("name", ["adm256-like", "improved-cifar-like"])
def test_one_shot_matches_carlini_p_sample_pred_xstart(converted, name):
    """DDS: one_shot == diffusion.p_sample(model, x_t*, t*, clip_denoised=True)['pred_xstart']."""
    cfg, model, dm = converted[name]
    schedule = DiffusionSchedule.from_scheduler(dm.scheduler)
    ref_diff = gd_diffusion(cfg)
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(2, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    for sigma in (0.25, 0.5, 1.0):
        t_star = schedule.t_star(sigma, "first_at_or_above")
        tt = torch.full((2,), t_star)
        x_t = ref_diff.q_sample(x0, tt, noise=torch.randn(x0.shape, generator=g))
        with torch.no_grad():
            ref = ref_diff.p_sample(model, x_t, tt, clip_denoised=True)["pred_xstart"]
        ours = one_shot(unet_denoiser(dm.unet), schedule, x_t.float(), t_star)
        assert (ours - ref).abs().max().item() <= TOL


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("flags,feature", [
    (dict(image_size=512, num_channels=64, channel_mult=None), "channel_mult[0]=0.5"),
    (dict(channel_mult=(1, 2), attention_resolutions=(16,), num_heads=4), "num_heads"),
    (dict(channel_mult=(1, 1), num_heads=2, num_heads_upsample=4), "num_heads_upsample"),
    (dict(class_cond=True), "class-conditional"),
    (dict(noise_schedule="sqrt"), "noise_schedule"),
    (dict(num_channels=48), "not divisible by the 32 GroupNorm groups"),
    (dict(image_size=48, channel_mult=None), "no default channel_mult"),
])
def test_unrepresentable_architectures_are_refused_by_name(flags, feature):
    cfg = AdmConfig(image_size=16, num_channels=32, num_res_blocks=1, channel_mult=(1, 2))
    cfg = cfg.with_flags(**flags)
    with pytest.raises(AdmConversionError, match=re.escape(feature)):
        adm.unet_config(cfg)


def test_checkpoint_that_does_not_match_the_flags_names_the_flag(converted, tmp_path):
    cfg, model, _ = converted["adm256-like"]
    ckpt = tmp_path / "m.pt"
    torch.save(model.state_dict(), ckpt)
    with pytest.raises(AdmConversionError, match="pass --learn-sigma"):
        adm.convert_adm_checkpoint(ckpt, tmp_path / "a", cfg.with_flags(learn_sigma=False))
    with pytest.raises(AdmConversionError, match="pass --use-scale-shift-norm"):
        adm.convert_adm_checkpoint(ckpt, tmp_path / "b", cfg.with_flags(use_scale_shift_norm=False))
    with pytest.raises(AdmConversionError, match="pass --resblock-updown"):
        adm.convert_adm_checkpoint(ckpt, tmp_path / "c", cfg.with_flags(resblock_updown=False))
    with pytest.raises(AdmConversionError, match="attention blocks"):
        adm.convert_adm_checkpoint(ckpt, tmp_path / "d", cfg.with_flags(attention_resolutions=(8,)))
    assert not any(tmp_path.glob("[abcd]"))  # nothing half-written


def test_pickles_are_refused_without_allow_pickle(converted, tmp_path):
    cfg, model, _ = converted["mid-attention-only"]
    ckpt = tmp_path / "legacy.pt"
    torch.save({"state_dict": model.state_dict(), "args": argparse_like()}, ckpt)
    with pytest.raises(AdmConversionError, match="--allow-pickle"):
        adm.convert_adm_checkpoint(ckpt, tmp_path / "out", cfg)
    adm.convert_adm_checkpoint(ckpt, tmp_path / "out", cfg, allow_pickle=True)
    assert (tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    with pytest.raises(AdmConversionError, match="--overwrite"):
        adm.convert_adm_checkpoint(ckpt, tmp_path / "out", cfg, allow_pickle=True)


class _Args:  # a non-tensor object, as training scripts sometimes pickle next to the weights
    lr = 1e-4


def argparse_like():
    return _Args()


def test_truncated_checkpoint_is_reported(tmp_path):
    ckpt = tmp_path / "cut.pt"
    torch.save({"w": torch.zeros(1000)}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    with pytest.raises(AdmConversionError, match="truncated"):
        adm.read_adm_checkpoint(ckpt)


# ------------------------------------------------------------------------------ the presets


@pytest.mark.parametrize("name,params,out_channels,schedule", [
    # parameter counts of the released models (reference.md: 552.8M and 52.5M)
    ("imagenet256-uncond", 552_814_086, 6, "linear"),
    ("cifar10-improved", 52_546_438, 6, "squaredcos_cap_v2"),
])
def test_presets_build_the_papers_architectures(name, params, out_channels, schedule):
    cfg = ADM_PRESETS[name]
    unet = adm.build_unet(cfg, device="meta")  # no memory, no init
    ref = UNetModel  # the original architecture on the meta device, for the parameter count
    with torch.device("meta"):
        orig = ref(image_size=cfg.image_size, in_channels=3, model_channels=cfg.num_channels,
                   out_channels=out_channels, num_res_blocks=cfg.num_res_blocks,
                   attention_resolutions=tuple(cfg.image_size // r for r in
                                               cfg.attention_resolutions),
                   channel_mult=cfg.mults, num_heads=cfg.num_heads,
                   num_head_channels=cfg.num_head_channels,
                   use_scale_shift_norm=cfg.use_scale_shift_norm,
                   resblock_updown=cfg.resblock_updown)
    n_ours = sum(p.numel() for p in unet.parameters())
    n_orig = sum(p.numel() for p in orig.parameters())
    extra = cfg.diffusion_steps * cfg.num_channels if cfg.rescale_timesteps else 0  # the table
    assert n_orig == params
    assert n_ours == params + extra
    assert unet.config.out_channels == out_channels
    assert adm.scheduler_config(cfg)["beta_schedule"] == schedule
