"""`densepure convert-adm` and `densepure models fetch|list` on tiny checkpoints, offline.

The commands are registered on a fresh typer app with ``flows.cli_models.register`` (what
``flows/cli.py`` does). Downloads use ``file://`` URLs (the real urllib path, no network); the
offline message is checked for the URL to fetch and the exact path to place each file at.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings

import pytest
import torch
import typer
from typer.testing import CliRunner

from densepure_core.models import presets
from densepure_core.models.adm import ADM_PRESETS
from densepure_core.models import load_diffusion
from flows.cli_models import register

runner = CliRunner(env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})  # no rich truncation

TINY_FLAGS = ["--image-size", "16", "--num-channels", "32", "--num-res-blocks", "1",
              "--channel-mult", "1,2", "--attention-resolutions", "8", "--num-head-channels", "16"]
TINY = ADM_PRESETS["imagenet256-uncond"].with_flags(
    image_size=16, num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
    attention_resolutions=(8,), num_head_channels=16)


def make_app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main():  # a group, like the real `densepure` app
        """densepure (test app)"""

    register(app)
    return app


def invoke(*args):
    return runner.invoke(make_app(), [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def adm_checkpoint(tmp_path_factory):
    """A tiny ADM with ADM-256's flags, made by OpenAI's code and saved as the release was."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from guided_diffusion.unet import UNetModel
    torch.manual_seed(0)
    model = UNetModel(image_size=16, in_channels=3, model_channels=32, out_channels=6,
                      num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2),
                      num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True)
    with torch.no_grad():
        for p in model.out.parameters():
            p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_uncond.pt"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def test_help_lists_the_commands():
    out = invoke("--help").output
    assert "convert-adm" in out and "models" in out
    assert invoke("models", "--help").exit_code == 0
    for flag in ("--num-head-channels", "--resblock-updown", "--use-scale-shift-norm",
                 "--noise-schedule", "--allow-pickle", "--preset"):
        assert flag in invoke("convert-adm", "--help").output


def test_convert_adm_with_flags_gives_the_original_outputs(adm_checkpoint, tmp_path):
    ckpt, model = adm_checkpoint
    out = tmp_path / "conv"
    result = invoke("convert-adm", ckpt, out, *TINY_FLAGS, "--learn-sigma", "--resblock-updown",
                    "--use-scale-shift-norm", "--diffusion-steps", "1000",
                    "--noise-schedule", "linear")
    assert result.exit_code == 0, result.output
    assert "converted" in result.output and "learned-range" in result.output
    dm = load_diffusion(str(out))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 321])
    with torch.no_grad():
        assert (dm.unet(x, t).sample - model(x, t)).abs().max().item() <= 1e-4
    assert dm.scheduler.config.num_train_timesteps == 1000


def test_convert_adm_preset_plus_overrides(adm_checkpoint, tmp_path):
    ckpt, _ = adm_checkpoint
    result = invoke("convert-adm", ckpt, tmp_path / "p", "--preset", "imagenet256-uncond",
                    *TINY_FLAGS)
    assert result.exit_code == 0, result.output
    assert load_diffusion(str(tmp_path / "p")).unet.config.attention_head_dim == 16


def test_convert_adm_names_the_flag_that_does_not_match(adm_checkpoint, tmp_path):
    ckpt, _ = adm_checkpoint
    result = invoke("convert-adm", ckpt, tmp_path / "x", "--preset", "imagenet256-uncond",
                    *TINY_FLAGS, "--no-learn-sigma")
    assert result.exit_code == 2
    assert "pass --learn-sigma" in result.output and not (tmp_path / "x").exists()


def test_convert_adm_refuses_unrepresentable_architectures(adm_checkpoint, tmp_path):
    ckpt, _ = adm_checkpoint
    result = invoke("convert-adm", ckpt, tmp_path / "y", "--image-size", "512")
    assert result.exit_code == 2 and "channel_mult[0]=0.5" in result.output
    result = invoke("convert-adm", ckpt, tmp_path / "y", "--preset", "nope")
    assert result.exit_code == 2 and "imagenet256-uncond" in result.output


def test_convert_adm_pickle_needs_opt_in(adm_checkpoint, tmp_path):
    _, model = adm_checkpoint
    legacy = tmp_path / "legacy.pt"
    # a training checkpoint that pickles its argparse options next to the weights
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1e-4)}, legacy)
    args = ["convert-adm", legacy, tmp_path / "z", "--preset", "imagenet256-uncond", *TINY_FLAGS]
    refused = invoke(*args)
    assert refused.exit_code == 2 and "--allow-pickle" in refused.output
    assert invoke(*args, "--allow-pickle").exit_code == 0
    again = invoke(*args, "--allow-pickle")
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert invoke(*args, "--allow-pickle", "--overwrite").exit_code == 0


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache, so no BEiT weights are found."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_fetch_offline_says_what_to_place_where(tmp_path, empty_hub):
    cache = tmp_path / "models"
    result = invoke("models", "fetch", "imagenet_densepure", "--cache", cache, "--offline")
    assert result.exit_code == 1
    out = " ".join(result.output.split())  # rich wraps long lines
    spec = presets.MODEL_PRESETS["imagenet256-uncond"]
    assert spec.url in out and str(cache / "downloads" / spec.filename) in out
    assert "timm/beit_large_patch16_512.in22k_ft_in22k_in1k" in out
    assert f"then rerun: densepure models fetch imagenet_densepure --cache {cache}" in out
    assert not (cache / "imagenet256-uncond").exists()

    result = invoke("models", "fetch", "cifar10_dds", "--cache", cache, "--offline")
    out = " ".join(result.output.split())
    assert result.exit_code == 1
    assert str(cache / "cifar10-vit-b16-224.safetensors") in out and "fine-tune" in out.lower()


def test_fetch_downloads_converts_then_finds_it_present(adm_checkpoint, tmp_path, monkeypatch):
    ckpt, model = adm_checkpoint
    spec = presets.MODEL_PRESETS["imagenet256-uncond"]
    monkeypatch.setitem(presets.MODEL_PRESETS, "imagenet256-uncond",
                        dataclasses.replace(spec, url=ckpt.as_uri(), adm=TINY))
    cache = tmp_path / "models"
    result = invoke("models", "fetch", "imagenet256-uncond", "--cache", cache, "--online")
    assert result.exit_code == 0, result.output
    assert "imagenet256-uncond: fetched" in result.output
    assert (cache / "downloads" / spec.filename).read_bytes() == ckpt.read_bytes()
    dm = load_diffusion(str(cache / "imagenet256-uncond"))
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([10])
    with torch.no_grad():
        assert (dm.unet(x, t).sample - model(x, t)).abs().max().item() <= 1e-4
    again = invoke("models", "fetch", "imagenet256-uncond", "--cache", cache, "--offline")
    assert again.exit_code == 0 and "imagenet256-uncond: present" in again.output


def test_fetch_offline_converts_a_placed_checkpoint(adm_checkpoint, tmp_path, monkeypatch):
    ckpt, _ = adm_checkpoint
    spec = presets.MODEL_PRESETS["imagenet256-uncond"]
    monkeypatch.setitem(presets.MODEL_PRESETS, "imagenet256-uncond",
                        dataclasses.replace(spec, adm=TINY))
    cache = tmp_path / "models"
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / spec.filename).write_bytes(ckpt.read_bytes())
    steps = presets.fetch("imagenet256-uncond", cache, offline=True)
    assert [(s.model, s.status) for s in steps] == [("imagenet256-uncond", "converted")]


def test_fetch_unreachable_url_is_reported_like_offline(tmp_path, monkeypatch):
    spec = presets.MODEL_PRESETS["cifar10-improved"]
    monkeypatch.setitem(presets.MODEL_PRESETS, "cifar10-improved",
                        dataclasses.replace(spec, url=(tmp_path / "absent.pt").as_uri()))
    with pytest.raises(presets.FetchError, match="download failed") as info:
        presets.fetch("cifar10-improved", tmp_path / "m", offline=False)
    assert str(tmp_path / "m" / "downloads" / spec.filename) in str(info.value)
    assert not list((tmp_path / "m" / "downloads").glob("*.part"))


def test_models_list_and_unknown_preset(tmp_path):
    result = invoke("models", "list", "--cache", tmp_path)
    assert result.exit_code == 0
    for name in (*presets.MODEL_PRESETS, *presets.CONFIG_PRESETS):
        assert name in result.output
    bad = invoke("models", "fetch", "imagenet", "--cache", tmp_path, "--offline")
    assert bad.exit_code == 2 and "imagenet_densepure" in bad.output


def test_fetch_reports_a_corrupt_download(tmp_path):
    spec = presets.MODEL_PRESETS["cifar10-improved"]
    raw = spec.raw_file(tmp_path / "m")
    raw.parent.mkdir(parents=True)
    raw.write_bytes(b"not a checkpoint")
    with pytest.raises(presets.FetchError, match="delete it and download it again"):
        presets.fetch("cifar10-improved", tmp_path / "m", offline=True)
    assert not spec.converted_dir(tmp_path / "m").exists()
