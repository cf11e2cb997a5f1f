"""Convert OpenAI ADM checkpoints (guided-diffusion, improved-diffusion) to diffusers, exactly.

The diffusion models of the papers this project reproduces are OpenAI's: the ImageNet 256x256
unconditional ADM of guided-diffusion (DDS, DensePure) and the CIFAR-10 ``L_hybrid`` model of
improved-diffusion. Both are saved as ``torch.save(model.state_dict())`` with no architecture
description, so the converter takes the training flags (``AdmConfig``, or a preset of
``ADM_PRESETS``), builds the equivalent diffusers ``UNet2DModel`` + ``DDPMScheduler``, moves
every weight to its diffusers name, and writes ``OUT/unet`` + ``OUT/scheduler`` with
``save_pretrained`` (safetensors), the layout ``models.load_diffusion`` reads.

What maps exactly (tests/densepure_core/models/test_adm.py compares against guided_diffusion's own
``UNetModel`` on random weights: max abs difference <= 1e-4 in fp32):

- time embedding: ADM's sinusoid ``cat(cos, sin)`` with frequencies
  ``exp(-ln(10000) i / half)`` is diffusers' ``Timesteps(flip_sin_to_cos=True,
  downscale_freq_shift=0)`` (``time_embedding_type="positional"``); the MLP
  ``time_embed.{0,2}`` is ``time_embedding.linear_{1,2}``.
- ``rescale_timesteps`` (improved-diffusion's default: the model is fed ``t * 1000 / T``; the
  CIFAR-10 cosine 4000-step model needs it): represented exactly by
  ``time_embedding_type="learned"`` whose table row t holds ADM's sinusoid of ``t * 1000 / T``
  computed in float32 as ADM computes it. The UNet then takes the ORIGINAL integer timestep
  0..T-1, as every purifier passes it. (Integer timesteps only: a fractional t is an error.)
- ResBlock -> ``ResnetBlock2D`` (``time_embedding_norm="scale_shift"`` for
  ``use_scale_shift_norm``, else ``"default"``); the 1x1 skip conv -> ``conv_shortcut``.
- ``resblock_updown``: ADM's down/up ResBlocks (avg-pool / nearest inside the block) ->
  ``ResnetDownsampleBlock2D`` / ``ResnetUpsampleBlock2D`` and ``downsample_type="resnet"`` /
  ``upsample_type="resnet"`` for the attention blocks; without it, ADM's strided 3x3 conv and
  nearest+3x3 conv -> ``Downsample2D`` / ``Upsample2D`` (``"conv"``).
- attention at the levels named by ``attention_resolutions`` -> ``AttnDownBlock2D`` /
  ``AttnUpBlock2D``; the middle block (ResBlock, attention, ResBlock) -> ``UNetMidBlock2D``
  with ``attn_norm_num_groups=32`` (diffusers drops that GroupNorm with scale-shift otherwise).
  ADM's fused ``qkv`` 1x1 conv is split into ``to_q``, ``to_k``, ``to_v`` in the order the
  checkpoint's code used: ``use_new_attention_order=False`` (guided-diffusion's default,
  ``QKVAttentionLegacy``, and improved-diffusion's only ``QKVAttention``) interleaves
  ``[q, k, v]`` per head; ``True`` (guided-diffusion's ``QKVAttention``) stores all q, then k,
  then v. ADM scales q and k by ``ch**-0.25`` each, diffusers the product by ``ch**-0.5``: equal
  up to float rounding.
- heads: diffusers uses one ``attention_head_dim`` for the whole UNet. ADM's
  ``num_head_channels`` is exactly that; ``num_heads`` (fixed head count) maps when every
  attention block (middle block included) has the same head width, as in the CIFAR-10 model,
  or when it is 1 (``attention_head_dim=None``: each block's one head is as wide as the block).
- output: ``out.0`` GroupNorm + SiLU + ``out.2`` conv -> ``conv_norm_out`` / ``conv_out``.
- schedule: ``linear`` (betas ``1e-4..0.02`` scaled by ``1000 / T``) -> ``beta_schedule=
  "linear"``; ``cosine`` -> ``"squaredcos_cap_v2"`` (the same ``betas_for_alpha_bar``, capped at
  0.999); variance: ``learn_sigma`` -> ``"learned_range"``, else ``"fixed_large"`` (or
  ``"fixed_small"`` with ``sigma_small``), as guided-diffusion's ``create_gaussian_diffusion``;
  ``predict_xstart`` -> ``prediction_type="sample"``. diffusers keeps betas in float32, so the
  coefficients differ from guided-diffusion's float64 ones by float32 rounding (~1e-7 relative).

Refused, with the feature named (never converted approximately):

- ``channel_mult[0] != 1`` (guided-diffusion's 512x512 model: 0.5): ADM sizes the time
  embedding by ``num_channels``, diffusers by the first block's width.
- ``num_heads`` with attention blocks of different widths (the head width would vary per
  block), and ``num_heads_upsample`` giving the up path another head width.
- class-conditional models (``class_cond``, ``label_emb``): the purifiers call the UNet
  without a label.
- channel widths not divisible by 32 (ADM's GroupNorm has 32 groups), ``noise_schedule`` other
  than linear/cosine, a checkpoint whose tensors do not match the flags (every mismatch is
  listed, with the flag that explains it where one does).

``use_fp16`` is a compute-precision flag of the original code, not an architecture: the
weights are converted in float32 and the pipeline's ``precision`` picks the compute dtype.

Example::

    convert_adm_checkpoint("256x256_diffusion_uncond.pt", "models/imagenet256-uncond",
                           ADM_PRESETS["imagenet256-uncond"])
    dm = load_diffusion("models/imagenet256-uncond")
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from densepure_core.models import ModelLoadError, read_state_dict

__all__ = [
    "AdmConversionError",
    "AdmConfig",
    "ADM_PRESETS",
    "parse_int_list",
    "parse_mult_list",
    "unet_config",
    "scheduler_config",
    "build_unet",
    "build_scheduler",
    "timestep_table",
    "read_adm_checkpoint",
    "convert_state_dict",
    "convert_adm_checkpoint",
]

_NUM_GROUPS = 32  # guided-diffusion's normalization(): GroupNorm32(32, channels)
_NOISE_SCHEDULES = ("linear", "cosine")
_METADATA = "adm_conversion.json"


class AdmConversionError(ValueError):
    """An ADM checkpoint or flag set cannot be converted exactly; the message names why and the fix."""


@dataclass(frozen=True)
class AdmConfig:
    """The flags of guided-diffusion's ``script_util`` that define a model and its diffusion.

    Defaults are guided-diffusion's ``model_and_diffusion_defaults()`` (improved-diffusion's
    differ: ``rescale_timesteps=True``; see ``ADM_PRESETS["cifar10-improved"]``).

    Attributes:
        image_size: training resolution (picks the default ``channel_mult``; informational in
            diffusers, ``sample_size``).
        num_channels: base width (``model_channels``).
        num_res_blocks: ResBlocks per level.
        channel_mult: width multiplier per level; ``None``: the codebases' default for
            ``image_size`` (256: 1,1,2,2,4,4; 128: 1,1,2,3,4; 64: 1,2,3,4; 32: 1,2,2,2).
        attention_resolutions: resolutions (not downsample rates) that get attention.
        num_heads: heads per attention block when ``num_head_channels == -1``.
        num_head_channels: fixed channels per head (-1: use ``num_heads``).
        num_heads_upsample: heads in the up path (-1: ``num_heads``).
        learn_sigma: 2C output channels, learned-range variance.
        sigma_small: fixed small variance when not ``learn_sigma`` (else fixed large).
        class_cond: class-conditional (refused).
        resblock_updown: ResBlocks do the up/down sampling.
        use_scale_shift_norm: FiLM-like ``norm(h) * (1 + scale) + shift`` in ResBlocks.
        use_new_attention_order: guided-diffusion's ``QKVAttention`` (split q/k/v before heads).
        dropout: training dropout (kept in the config; inactive in eval).
        diffusion_steps: T.
        noise_schedule: ``"linear"`` or ``"cosine"``.
        predict_xstart: the model predicts x0 instead of epsilon.
        rescale_timesteps: the model was fed ``t * 1000 / T`` (improved-diffusion's default).
        in_channels: image channels (3 for every released model).
    """

    image_size: int = 64
    num_channels: int = 128
    num_res_blocks: int = 2
    channel_mult: tuple[float, ...] | None = None
    attention_resolutions: tuple[int, ...] = (16, 8)
    num_heads: int = 4
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    learn_sigma: bool = False
    sigma_small: bool = False
    class_cond: bool = False
    resblock_updown: bool = False
    use_scale_shift_norm: bool = True
    use_new_attention_order: bool = False
    dropout: float = 0.0
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    predict_xstart: bool = False
    rescale_timesteps: bool = False
    in_channels: int = 3

    # -- derived ---------------------------------------------------------------------------
    @property
    def mults(self) -> tuple[float, ...]:
        """``channel_mult``, or the codebases' default for ``image_size``."""
        if self.channel_mult is not None:
            return tuple(self.channel_mult)
        defaults = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
                    64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}
        if self.image_size not in defaults:
            raise AdmConversionError(
                f"image_size={self.image_size} has no default channel_mult (the codebases know "
                f"{sorted(defaults)}); pass channel_mult explicitly (--channel-mult 1,2,2,2)")
        return defaults[self.image_size]

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels per level: ``int(mult * num_channels)``, as ADM computes them."""
        return tuple(int(m * self.num_channels) for m in self.mults)

    @property
    def attention_levels(self) -> tuple[bool, ...]:
        """Whether level i (downsample rate 2^i) has attention blocks."""
        ds = {self.image_size // int(r) for r in self.attention_resolutions}
        return tuple((2 ** i) in ds for i in range(len(self.mults)))

    def with_flags(self, **changes: Any) -> AdmConfig:
        """A copy with some flags changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The flags as a JSON-able dict (channel_mult resolved)."""
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.mults)
        d["attention_resolutions"] = list(self.attention_resolutions)
        return d


#: The papers' models. ``imagenet256-uncond``: guided-diffusion's README flags of
#: ``256x256_diffusion_uncond.pt`` (as in Carlini et al.'s ``imagenet/DRM.py``).
#: ``cifar10-improved``: improved-diffusion's README flags of ``cifar10_uncond_50M_500K.pt``
#: on top of improved-diffusion's defaults (num_heads 4, attention at 16 and 8, scale-shift
#: norm, rescale_timesteps=True; Carlini et al.'s ``cifar10/DRM.py`` sets the same).
ADM_PRESETS: dict[str, AdmConfig] = {
    "imagenet256-uncond": AdmConfig(
        image_size=256, num_channels=256, num_res_blocks=2, channel_mult=(1, 1, 2, 2, 4, 4),
        attention_resolutions=(32, 16, 8), num_heads=4, num_head_channels=64, learn_sigma=True,
        resblock_updown=True, use_scale_shift_norm=True, diffusion_steps=1000,
        noise_schedule="linear"),
    "cifar10-improved": AdmConfig(
        image_size=32, num_channels=128, num_res_blocks=3, channel_mult=(1, 2, 2, 2),
        attention_resolutions=(16, 8), num_heads=4, learn_sigma=True, dropout=0.3,
        use_scale_shift_norm=True, diffusion_steps=4000, noise_schedule="cosine",
        rescale_timesteps=True),
}


def parse_int_list(text: str | Sequence[int], name: str) -> tuple[int, ...]:
    """``"32,16,8"`` (or a sequence) -> ``(32, 16, 8)``; errors name the flag."""
    if not isinstance(text, str):
        return tuple(int(v) for v in text)
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise AdmConversionError(f"{name}={text!r}: expected comma-separated integers, "
                                 f"e.g. 32,16,8") from None


def parse_mult_list(text: str | Sequence[float] | None, name: str = "channel_mult"
                    ) -> tuple[float, ...] | None:
    """``"1,1,2,2,4,4"`` -> ``(1, 1, 2, 2, 4, 4)``; ``""``/None -> None (the default)."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if not isinstance(text, str):
        return tuple(float(v) if float(v) != int(float(v)) else int(float(v)) for v in text)
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise AdmConversionError(f"{name}={text!r}: expected comma-separated numbers, "
                                 f"e.g. 1,1,2,2,4,4") from None
    return tuple(int(v) if v == int(v) else v for v in vals)


# ---------------------------------------------------------------------------------------------
# what diffusers can represent


def _head_layout(cfg: AdmConfig) -> list[tuple[str, int, int]]:
    """(where, channels, ADM heads) of every attention block, as ADM builds them."""
    def heads(ch: int, n: int) -> int:
        if cfg.num_head_channels != -1:
            if ch % cfg.num_head_channels:
                raise AdmConversionError(
                    f"num_head_channels={cfg.num_head_channels} does not divide the {ch} channels "
                    f"of an attention block (ADM itself refuses this); fix --num-head-channels")
            return ch // cfg.num_head_channels
        return n

    up_heads = cfg.num_heads if cfg.num_heads_upsample == -1 else cfg.num_heads_upsample
    out = []
    for level, (ch, attn) in enumerate(zip(cfg.widths, cfg.attention_levels)):
        if attn:
            out.append((f"down level {level}", ch, heads(ch, cfg.num_heads)))
    out.append(("middle block", cfg.widths[-1], heads(cfg.widths[-1], cfg.num_heads)))
    for level, (ch, attn) in enumerate(zip(cfg.widths, cfg.attention_levels)):
        if attn:
            out.append((f"up level {level}", ch, heads(ch, up_heads)))
    return out


def _attention_head_dim(cfg: AdmConfig) -> int | None:
    """The single diffusers ``attention_head_dim`` equal to every ADM block's head width.

    ``None`` when every block has one head (e.g. improved-diffusion's LSUN models): diffusers
    then makes each block's head as wide as the block.
    """
    layout = _head_layout(cfg)
    if all(h == 1 for _, _, h in layout):
        return None
    dims = {}
    for where, ch, h in layout:
        if h < 1 or ch % h:
            raise AdmConversionError(
                f"the {where} attention has {ch} channels, not divisible into {h} heads (ADM "
                f"itself refuses this); fix --num-heads / --num-head-channels")
        dims.setdefault(ch // h, []).append(f"{where}: {ch} ch / {h} head(s)")
    if len(dims) > 1:
        flag = "num_heads_upsample" if cfg.num_heads_upsample not in (-1, cfg.num_heads) \
            else "num_heads"
        raise AdmConversionError(
            f"{flag}: this ADM has attention heads of different widths "
            f"({'; '.join(v[0] for v in dims.values())}), which diffusers' UNet2DModel cannot "
            f"represent (it uses one attention_head_dim for every block); not converted")
    return next(iter(dims))


def _check_representable(cfg: AdmConfig) -> None:
    if cfg.class_cond:
        raise AdmConversionError(
            "class-conditional ADM (class_cond / label_emb): the purifiers call the UNet without a "
            "class label, so a conditional model cannot be used here; convert an unconditional "
            "checkpoint (e.g. 256x256_diffusion_uncond.pt)")
    if cfg.noise_schedule not in _NOISE_SCHEDULES:
        raise AdmConversionError(f"noise_schedule={cfg.noise_schedule!r}: only {_NOISE_SCHEDULES} "
                                 f"exist in guided-/improved-diffusion")
    for name in ("image_size", "num_channels", "num_res_blocks", "diffusion_steps", "in_channels"):
        if getattr(cfg, name) < 1:
            raise AdmConversionError(f"{name}={getattr(cfg, name)} must be >= 1")
    mults = cfg.mults
    if mults[0] != 1:
        raise AdmConversionError(
            f"channel_mult[0]={mults[0]} (e.g. guided-diffusion's 512x512 model): ADM sizes the "
            f"time embedding by num_channels={cfg.num_channels} but diffusers' UNet2DModel by the "
            f"first level's width {cfg.widths[0]}; this architecture cannot be represented "
            f"exactly, so it is not converted")
    bad = [w for w in cfg.widths if w % _NUM_GROUPS]
    if bad:
        raise AdmConversionError(
            f"channel widths {cfg.widths} (num_channels x channel_mult): {bad} not divisible by "
            f"the {_NUM_GROUPS} GroupNorm groups ADM uses; these flags do not describe an ADM")
    _attention_head_dim(cfg)  # no attention_resolutions: only the middle block attends, fine


# ---------------------------------------------------------------------------------------------
# diffusers configs


def unet_config(cfg: AdmConfig) -> dict[str, Any]:
    """The ``UNet2DModel`` keyword arguments equivalent to ``cfg`` (raises if none exist)."""
    _check_representable(cfg)
    levels = cfg.attention_levels
    n = len(levels)
    resnet = "resnet" if cfg.resblock_updown else "conv"
    plain_down = "ResnetDownsampleBlock2D" if cfg.resblock_updown else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if cfg.resblock_updown else "UpBlock2D"
    config: dict[str, Any] = dict(
        sample_size=cfg.image_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels * (2 if cfg.learn_sigma else 1),
        center_input_sample=False,
        time_embedding_type="positional",
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=tuple("AttnDownBlock2D" if a else plain_down for a in levels),
        mid_block_type="UNetMidBlock2D",
        up_block_types=tuple("AttnUpBlock2D" if levels[n - 1 - u] else plain_up
                             for u in range(n)),
        block_out_channels=cfg.widths,
        layers_per_block=cfg.num_res_blocks,
        mid_block_scale_factor=1,
        downsample_padding=1,
        downsample_type=resnet,
        upsample_type=resnet,
        dropout=float(cfg.dropout),
        act_fn="silu",
        attention_head_dim=_attention_head_dim(cfg),
        norm_num_groups=_NUM_GROUPS,
        attn_norm_num_groups=_NUM_GROUPS,
        norm_eps=1e-5,
        resnet_time_scale_shift="scale_shift" if cfg.use_scale_shift_norm else "default",
        add_attention=True,
    )
    if cfg.rescale_timesteps and cfg.diffusion_steps != 1000:
        config.update(time_embedding_type="learned", num_train_timesteps=cfg.diffusion_steps)
    return config


def scheduler_config(cfg: AdmConfig) -> dict[str, Any]:
    """The ``DDPMScheduler`` keyword arguments of ``cfg``'s diffusion (create_gaussian_diffusion)."""
    _check_representable(cfg)
    if cfg.learn_sigma:
        variance = "learned_range"
    else:
        variance = "fixed_small" if cfg.sigma_small else "fixed_large"
    out: dict[str, Any] = dict(num_train_timesteps=cfg.diffusion_steps, variance_type=variance,
                               prediction_type="sample" if cfg.predict_xstart else "epsilon",
                               clip_sample=True)
    if cfg.noise_schedule == "linear":
        scale = 1000 / cfg.diffusion_steps
        out.update(beta_schedule="linear", beta_start=scale * 0.0001, beta_end=scale * 0.02)
    else:
        out.update(beta_schedule="squaredcos_cap_v2")
    return out


def build_unet(cfg: AdmConfig, *, device: torch.device | str | None = None):
    """A ``UNet2DModel`` of ``cfg``'s architecture (random weights; ``device="meta"``: none)."""
    from diffusers import UNet2DModel

    with torch.device(device) if device is not None else contextlib.nullcontext():
        return UNet2DModel(**unet_config(cfg))


def build_scheduler(cfg: AdmConfig):
    """The ``DDPMScheduler`` of ``cfg``'s diffusion."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**scheduler_config(cfg))


def timestep_table(num_timesteps: int, dim: int, *, rescale: bool) -> torch.Tensor:
    """ADM's sinusoidal embedding of every integer timestep: float32 ``[num_timesteps, dim]``.

    Row t is ``timestep_embedding(t', dim)`` with ``t' = float(t) * (1000 / T)`` when
    ``rescale`` (GaussianDiffusion._scale_timesteps), else t' = t, computed with the same
    float32 operations as guided-diffusion's ``nn.timestep_embedding``.
    """
    t = torch.arange(num_timesteps)
    t = t.float() * (1000.0 / num_timesteps) if rescale else t
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(start=0, end=half, dtype=torch.float32)
                      / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


# ---------------------------------------------------------------------------------------------
# the weights


def read_adm_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False
                        ) -> dict[str, torch.Tensor]:
    """Read an ADM ``.pt`` (``torch.save(model.state_dict())``) or ``.safetensors`` file.

    ``torch.load(weights_only=True)`` unless ``allow_pickle`` (legacy pickles that hold other
    objects; only for files you trust). A ``module.`` prefix (DataParallel) is dropped and an
    ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper unwrapped.

    Raises:
        AdmConversionError: missing, unreadable, pickled without ``allow_pickle``, or not a
            state dict.
    """
    path = Path(path).expanduser()
    what = f"ADM checkpoint {str(path)!r}"
    if not path.is_file():
        raise AdmConversionError(f"{what}: no such file; download it first (docs/models.md) or "
                                 f"run `densepure models fetch`")
    # The model loader's reader: safetensors, or torch.load(weights_only=True) unless
    # allow_pickle; training-checkpoint wrappers and DataParallel prefixes are unwrapped.
    try:
        state_dict = read_state_dict(path, allow_pickle=allow_pickle, what=what)
    except ModelLoadError as e:
        raise AdmConversionError(str(e)) from e
    return {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


_RES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
        "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


@dataclass
class _Plan:
    """ADM module prefix -> (diffusers prefix, kind, heads) in build order."""

    modules: list[tuple[str, str, str, int]] = field(default_factory=list)

    def add(self, adm: str, ours: str, kind: str, heads: int = 0) -> None:
        self.modules.append((adm, ours, kind, heads))


def _module_plan(cfg: AdmConfig) -> _Plan:
    """Walk ADM's UNetModel.__init__ and diffusers' UNet2DModel in parallel."""
    plan = _Plan()
    widths, levels, nrb = cfg.widths, cfg.attention_levels, cfg.num_res_blocks
    n = len(widths)
    d = _attention_head_dim(cfg)

    def heads(ch: int) -> int:
        return 1 if d is None else ch // d

    plan.add("time_embed.0", "time_embedding.linear_1", "plain")
    plan.add("time_embed.2", "time_embedding.linear_2", "plain")
    plan.add("input_blocks.0.0", "conv_in", "plain")
    idx = 1
    for level in range(n):
        for j in range(nrb):
            plan.add(f"input_blocks.{idx}.0", f"down_blocks.{level}.resnets.{j}", "res")
            if levels[level]:
                plan.add(f"input_blocks.{idx}.1", f"down_blocks.{level}.attentions.{j}", "attn",
                         heads(widths[level]))
            idx += 1
        if level != n - 1:
            if cfg.resblock_updown:
                plan.add(f"input_blocks.{idx}.0", f"down_blocks.{level}.downsamplers.0", "res")
            else:
                plan.add(f"input_blocks.{idx}.0.op", f"down_blocks.{level}.downsamplers.0.conv",
                         "plain")
            idx += 1
    plan.add("middle_block.0", "mid_block.resnets.0", "res")
    plan.add("middle_block.1", "mid_block.attentions.0", "attn", heads(widths[-1]))
    plan.add("middle_block.2", "mid_block.resnets.1", "res")
    idx = 0
    for u in range(n):
        level = n - 1 - u
        for i in range(nrb + 1):
            plan.add(f"output_blocks.{idx}.0", f"up_blocks.{u}.resnets.{i}", "res")
            sub = 1
            if levels[level]:
                plan.add(f"output_blocks.{idx}.1", f"up_blocks.{u}.attentions.{i}", "attn",
                         heads(widths[level]))
                sub = 2
            if level and i == nrb:
                if cfg.resblock_updown:
                    plan.add(f"output_blocks.{idx}.{sub}", f"up_blocks.{u}.upsamplers.0", "res")
                else:
                    plan.add(f"output_blocks.{idx}.{sub}.conv", f"up_blocks.{u}.upsamplers.0.conv",
                             "plain")
            idx += 1
    plan.add("out.0", "conv_norm_out", "plain")
    plan.add("out.2", "conv_out", "plain")
    return plan


def _split_qkv(t: torch.Tensor, heads: int, new_order: bool) -> tuple[torch.Tensor, ...]:
    """ADM's fused qkv conv1d weight ``[3C, C, 1]`` (or bias ``[3C]``) -> q, k, v ``[C, C]``/``[C]``."""
    three_c = t.shape[0]
    c = three_c // 3
    rest = t.shape[1:2]  # (C,) for weights, () for biases
    if new_order:  # QKVAttention: [q (all heads), k, v]
        parts = t.reshape(3, c, *rest)
        return tuple(parts[i].contiguous() for i in range(3))
    # QKVAttentionLegacy / improved-diffusion: per head [q, k, v]
    ch = c // heads
    parts = t.reshape(heads, 3, ch, *rest)
    return tuple(parts[:, i].reshape(c, *rest).contiguous() for i in range(3))


def _flag_hints(sd: Mapping[str, torch.Tensor], cfg: AdmConfig) -> list[str]:
    """Mismatches between the checkpoint's tensors and the flags, phrased as the flag to pass."""
    hints = []
    w = sd.get("input_blocks.0.0.weight")
    if w is not None and w.ndim == 4:
        if w.shape[0] != cfg.widths[0]:
            hints.append(f"the checkpoint's first conv has {w.shape[0]} channels, the flags give "
                         f"{cfg.widths[0]}: pass --num-channels {w.shape[0]}")
    w = sd.get("out.2.weight")
    if w is not None and w.ndim == 4:
        want = cfg.in_channels * (2 if cfg.learn_sigma else 1)
        if w.shape[0] != want:
            learned = w.shape[0] == 2 * cfg.in_channels
            hints.append(f"the checkpoint outputs {w.shape[0]} channels: "
                         f"{'pass --learn-sigma' if learned else 'pass --no-learn-sigma'}")
    if "label_emb.weight" in sd:
        hints.append("the checkpoint has label_emb: it is class-conditional (not supported)")
    emb = sd.get("input_blocks.1.0.emb_layers.1.weight")
    conv2 = sd.get("input_blocks.1.0.out_layers.3.weight")
    if emb is not None and conv2 is not None:
        ss = emb.shape[0] == 2 * conv2.shape[0]
        if ss != cfg.use_scale_shift_norm:
            hints.append("the ResBlocks' emb_layers " + (
                "produce scale and shift: pass --use-scale-shift-norm" if ss
                else "produce a shift only: pass --no-use-scale-shift-norm"))
    has_conv_down = any(k.endswith(".op.weight") for k in sd)
    if has_conv_down and cfg.resblock_updown:
        hints.append("the checkpoint downsamples with strided convs (.op.weight): pass "
                     "--no-resblock-updown")
    if not has_conv_down and not cfg.resblock_updown and len(cfg.widths) > 1 and any(
            k.startswith("input_blocks.") for k in sd):
        hints.append("the checkpoint has no strided downsampling convs (.op.weight): pass "
                     "--resblock-updown")
    n_attn = sum(1 for k in sd if k.endswith(".qkv.weight"))
    want_attn = sum(1 for m in _module_plan(cfg).modules if m[2] == "attn")
    if n_attn != want_attn:
        hints.append(f"the checkpoint has {n_attn} attention blocks, the flags give {want_attn}: "
                     f"check --attention-resolutions (and --image-size, --num-res-blocks, "
                     f"--channel-mult)")
    return hints


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], cfg: AdmConfig, *,
                       expected: Mapping[str, torch.Size] | None = None
                       ) -> dict[str, torch.Tensor]:
    """ADM state dict -> the diffusers ``UNet2DModel`` state dict of ``unet_config(cfg)``.

    Args:
        state_dict: the checkpoint's tensors (any float dtype; converted to float32).
        cfg: the checkpoint's flags.
        expected: diffusers key -> shape (default: from ``build_unet(cfg, device="meta")``).

    Returns:
        float32, contiguous tensors under diffusers' names, exactly the keys of the model.

    Raises:
        AdmConversionError: a flag cannot be represented, or the tensors do not match the flags
            (lists the first missing/unexpected/mis-shaped keys and the flags that explain them).
    """
    _check_representable(cfg)
    if expected is None:
        expected = {k: v.shape for k, v in build_unet(cfg, device="meta").state_dict().items()}
    sd = {k: v for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []

    def take(adm_key: str) -> torch.Tensor | None:
        t = sd.get(adm_key)
        if t is None:
            missing.append(adm_key)
            return None
        used.add(adm_key)
        return t.detach().to(torch.float32)

    for adm, ours, kind, heads in _module_plan(cfg).modules:
        if kind == "plain":
            for p in ("weight", "bias"):
                t = take(f"{adm}.{p}")
                if t is not None:
                    out[f"{ours}.{p}"] = t
        elif kind == "res":
            for a, b in _RES.items():
                for p in ("weight", "bias"):
                    key = f"{adm}.{a}.{p}"
                    if a == "skip_connection" and key not in sd and f"{ours}.{b}.{p}" not in expected:
                        continue  # identity skip (in == out channels)
                    t = take(key)
                    if t is not None:
                        out[f"{ours}.{b}.{p}"] = t
        else:  # attention
            for p in ("weight", "bias"):
                t = take(f"{adm}.norm.{p}")
                if t is not None:
                    out[f"{ours}.group_norm.{p}"] = t
                t = take(f"{adm}.qkv.{p}")
                if t is not None:
                    if t.ndim == 3:
                        t = t[..., 0]
                    if t.shape[0] % (3 * heads):
                        missing.append(f"{adm}.qkv.{p} (shape {tuple(t.shape)} is not 3 x heads)")
                    else:
                        q, k, v = _split_qkv(t, heads, cfg.use_new_attention_order)
                        out[f"{ours}.to_q.{p}"], out[f"{ours}.to_k.{p}"], out[f"{ours}.to_v.{p}"] = q, k, v
                t = take(f"{adm}.proj_out.{p}")
                if t is not None:
                    out[f"{ours}.to_out.0.{p}"] = t[..., 0] if t.ndim == 3 else t
    if "time_proj.weight" in expected:  # rescale_timesteps: the embedding as a table
        out["time_proj.weight"] = timestep_table(cfg.diffusion_steps, cfg.widths[0], rescale=True)

    unexpected = sorted(set(sd) - used) + [f"{k} (as converted)"
                                           for k in sorted(set(out) - set(expected))]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs {tuple(expected[k])}"
                  for k, v in out.items() if k in expected and v.shape != expected[k]]
    not_filled = sorted(set(expected) - set(out))
    if missing or unexpected or mismatched or not_filled:
        parts = []
        for name, items in (("missing from the checkpoint", missing),
                            ("unexpected in the checkpoint", unexpected),
                            ("shape mismatches", mismatched),
                            ("diffusers weights left unset", not_filled)):
            if items:
                more = f" (+{len(items) - 4} more)" if len(items) > 4 else ""
                parts.append(f"{len(items)} {name}: {', '.join(items[:4])}{more}")
        hints = _flag_hints(sd, cfg)
        hint = ("; " + "; ".join(hints)) if hints else (
            "; check the flags against the checkpoint's training command")
        raise AdmConversionError("the checkpoint does not match the ADM flags ("
                                 + " | ".join(parts) + ")" + hint)
    return {k: v.contiguous() for k, v in out.items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def convert_adm_checkpoint(checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
                           out_dir: str | os.PathLike, cfg: AdmConfig, *,
                           allow_pickle: bool = False, overwrite: bool = False) -> Path:
    """Convert an ADM checkpoint and write ``OUT/unet`` + ``OUT/scheduler`` (safetensors).

    The folder is built next to ``out_dir`` and renamed into place when complete, so a failed or
    interrupted conversion never leaves a half-written model where ``load_diffusion`` looks.
    ``OUT/adm_conversion.json`` records the flags, the diffusers configs and the checkpoint's
    sha256.

    Args:
        checkpoint: the ``.pt``/``.safetensors`` file, or an already loaded state dict.
        out_dir: the destination folder (must not exist, or be empty, unless ``overwrite``).
        cfg: the checkpoint's flags (``ADM_PRESETS[...]`` for the papers' models).
        allow_pickle: see :func:`read_adm_checkpoint`.
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        AdmConversionError: unreadable checkpoint, unrepresentable flags, weights that do not
            match the flags, or an existing ``out_dir`` without ``overwrite``.
    """
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise AdmConversionError(f"{out_dir} is a file; OUT_DIR must be a folder (new or empty)")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise AdmConversionError(f"{out_dir} already exists and is not empty; pass --overwrite "
                                 f"(overwrite=True) to replace it, or choose another OUT_DIR")
    if not isinstance(checkpoint, Mapping) and not Path(checkpoint).expanduser().is_file():
        # first: a wrong path is the likeliest mistake, and no flag can fix it
        raise AdmConversionError(f"checkpoint {checkpoint}: no such file; give the path of the ADM .pt "
                                 f"(or .safetensors) file")
    _check_representable(cfg)
    source: dict[str, Any]
    if isinstance(checkpoint, Mapping):
        state_dict = dict(checkpoint)
        source = {"checkpoint": "<state dict>"}
    else:
        path = Path(checkpoint).expanduser()
        state_dict = read_adm_checkpoint(path, allow_pickle=allow_pickle)
        source = {"checkpoint": path.name, "sha256": _sha256(path)}

    meta_unet = build_unet(cfg, device="meta")
    expected = {k: v.shape for k, v in meta_unet.state_dict().items()}
    converted = convert_state_dict(state_dict, cfg, expected=expected)
    del state_dict
    # assign=True swaps the meta tensors for ours: no random init of a 550M-parameter model.
    meta_unet.load_state_dict(converted, strict=True, assign=True)
    still_meta = [n for n, t in [*meta_unet.named_parameters(), *meta_unet.named_buffers()]
                  if t.is_meta]
    if still_meta:  # pragma: no cover  (a diffusers version with buffers we do not know)
        raise AdmConversionError(f"internal: diffusers UNet2DModel has tensors the converter "
                                 f"does not fill: {still_meta[:5]}")
    unet = meta_unet.eval()

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        unet.save_pretrained(str(tmp / "unet"), safe_serialization=True)
        build_scheduler(cfg).save_pretrained(str(tmp / "scheduler"))
        meta = {"converter": "densepure_core.models.adm", **source, "adm_flags": cfg.to_json(),
                "unet_config": json.loads(json.dumps(unet_config(cfg))),
                "scheduler_config": scheduler_config(cfg)}
        (tmp / _METADATA).write_text(json.dumps(meta, indent=1, sort_keys=True))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
