"""accel.prepare_module on CPU: channels_last gives the default layout's outputs; compile runs."""

from __future__ import annotations

import time

import pytest
import torch
from model_factory import tiny_ddpm

from densepure_core.models.accel import prepare_module, to_channels_last
from densepure_core.models import load_classifier, load_diffusion
from densepure_core.diffusion.purify import unet_denoiser


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    return tiny_ddpm(tmp_path_factory.mktemp("ddpm"), learned_range=True)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, 8, 8, generator=g), torch.tensor([0, 400, 999])


def test_channels_last_unet_equals_default_layout(unet_dir):
    ref_unet = load_diffusion(str(unet_dir)).unet
    fast_unet = prepare_module(load_diffusion(str(unet_dir)).unet, channels_last=True,
                               compile=False, device="cpu")
    x, t = _inputs()
    with torch.no_grad():
        ref = ref_unet(x, t).sample
        out = fast_unet(x, t).sample
    conv = fast_unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert out.shape == ref.shape == (3, 6, 8, 8)
    assert (out - ref).abs().max().item() <= 1e-5
    # the purifiers' wrapper still sees the model's dtype through the prepared module
    assert unet_denoiser(fast_unet)(x, t).shape == (3, 6, 8, 8)


def test_channels_last_classifier_equals_default_layout(tmp_path):
    from model_factory import tiny_classifier

    folder = tiny_classifier(tmp_path / "clf", num_classes=3, size=16)
    ref = load_classifier(f"local-dir:{folder}")
    fast = load_classifier(f"local-dir:{folder}")
    fast.model = prepare_module(fast.model, channels_last=True, compile=False, device="cpu")
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (fast(x) - ref(x)).abs().max().item() <= 1e-5


def test_prepare_module_is_idempotent_and_converts_only_4d():
    m = torch.nn.Conv2d(3, 4, 3)
    prepare_module(m, channels_last=True, compile=False)
    prepare_module(m, channels_last=True, compile=False)
    assert len(m._forward_pre_hooks) == 1
    v = torch.zeros(2, 3)
    assert to_channels_last(v) is v and to_channels_last("x") == "x"
    assert to_channels_last(torch.zeros(1, 3, 4, 4)).is_contiguous(
        memory_format=torch.channels_last)


def test_compile_wraps_and_traces_unet_on_cpu(unet_dir):
    """The wiring with the eager backend (dynamo traces the diffusers UNet; no C++ codegen)."""
    ref_unet = load_diffusion(str(unet_dir)).unet
    compiled = prepare_module(load_diffusion(str(unet_dir)).unet, channels_last=False,
                              compile=True, device="cpu", compile_options={"backend": "eager"})
    x, t = _inputs()
    with torch.no_grad():
        out = compiled(x, t).sample
        ref = ref_unet(x, t).sample
    assert hasattr(compiled, "_orig_mod")
    assert compiled.dtype == torch.float32 and compiled.config.out_channels == 6
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_inductor_compile_runs_on_cpu(unet_dir):
    """TorchInductor on CPU: ~35-60 s on the 2-core dev machine (a C++ compile), hence slow."""
    ref_unet = load_diffusion(str(unet_dir)).unet
    compiled = prepare_module(load_diffusion(str(unet_dir)).unet, channels_last=True,
                              compile=True, device="cpu")
    x, t = _inputs()
    start = time.perf_counter()
    with torch.no_grad():
        out = compiled(x, t).sample
        ref = ref_unet(x, t).sample
    assert time.perf_counter() - start < 900
    assert (out - ref).abs().max().item() <= 1e-4


def test_prepare_module_compiles_once_per_module(unet_dir):
    unet = load_diffusion(str(unet_dir)).unet
    opts = {"backend": "eager"}
    first = prepare_module(unet, channels_last=False, compile=True, compile_options=opts)
    assert prepare_module(unet, channels_last=False, compile=True, compile_options=opts) is first
    assert prepare_module(first, channels_last=False, compile=True, compile_options=opts) is first
    assert prepare_module(first, channels_last=False, compile=False) is unet
    assert first not in list(unet.modules())  # no cycle: the module does not own its wrapper
