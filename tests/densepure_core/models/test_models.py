"""Tests for densepure_core.models: diffusion (local, s3://, hub) and timm classifier loading.

Tiny models are built here with fixed seeds (a 42k-parameter UNet2DModel, timm's
``test_resnet``), saved in every supported format, loaded back and compared with the original;
a few output values are pinned. Everything runs on CPU, offline; S3 is a loopback moto server.

    .venv/bin/python -m pytest tests/densepure_core/models/test_models.py -q
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid

import pytest
import torch
import torch.nn.functional as F

from densepure_core.models import diffusion
from densepure_core.models import (
    Classifier,
    DiffusionModel,
    ModelLoadError,
    file_sha256,
    load_classifier,
    load_diffusion,
    model_fingerprint,
)


# ------------------------------------------------------------------------------------------
# tiny diffusion model


def _tiny_unet(in_channels: int = 3):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=in_channels, out_channels=in_channels,
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    return unet.eval()


def _tiny_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                         beta_schedule="linear", variance_type="fixed_small")


def _unet_input():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 8, 8, generator=g), torch.tensor([10, 500])


def _unet_out(unet) -> torch.Tensor:
    x, t = _unet_input()
    with torch.no_grad():
        return unet(x, t).sample


@pytest.fixture(scope="module")
def tiny_diffusion(tmp_path_factory):
    """(original unet, flat dir, pipeline dir)."""
    root = tmp_path_factory.mktemp("diffusion")
    unet, sched = _tiny_unet(), _tiny_scheduler()
    flat = root / "flat"
    unet.save_pretrained(flat)
    sched.save_pretrained(flat)
    pipe = root / "pipeline"
    unet.save_pretrained(pipe / "unet")
    sched.save_pretrained(pipe / "scheduler")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    return unet, flat, pipe


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


# output[0, :, 0, 0] and output[1, 0, 3, :3] of the seeded tiny UNet on the seeded input
PINNED_UNET = torch.tensor([-0.074005, -0.429516, -0.142545, -0.107164, -0.237283, -0.142830])


def _pinned_slice(out: torch.Tensor) -> torch.Tensor:
    return torch.cat([out[0, :, 0, 0], out[1, 0, 3, :3]])


@pytest.mark.parametrize("layout", ["flat", "pipeline"])
def test_load_diffusion_local_matches_original(tiny_diffusion, layout):
    unet, flat, pipe = tiny_diffusion
    dm = load_diffusion(str(flat if layout == "flat" else pipe))
    assert isinstance(dm, DiffusionModel) and dm.source == str(flat if layout == "flat" else pipe)
    assert type(dm.unet).__name__ == "UNet2DModel"
    assert type(dm.scheduler).__name__ == "DDPMScheduler"
    assert dm.scheduler.config.num_train_timesteps == 1000
    assert dm.scheduler.config.variance_type == "fixed_small"
    torch.testing.assert_close(dm.scheduler.alphas_cumprod, _tiny_scheduler().alphas_cumprod)
    out = _unet_out(dm.unet)
    assert torch.equal(out, _unet_out(unet))
    torch.testing.assert_close(_pinned_slice(out), PINNED_UNET, atol=1e-5, rtol=0)
    assert model_fingerprint(dm) == model_fingerprint(unet)


def test_load_diffusion_eval_frozen_dtype(tiny_diffusion):
    _, flat, _ = tiny_diffusion
    dm = load_diffusion(str(flat), dtype=torch.float64)
    assert not dm.unet.training
    assert all(not p.requires_grad for p in dm.unet.parameters())
    assert {p.dtype for p in dm.unet.parameters()} == {torch.float64}
    # a different dtype is a different set of numbers: the fingerprint says so
    assert model_fingerprint(dm) != model_fingerprint(load_diffusion(str(flat)))


def test_pickle_only_refused_unless_allowed(tiny_diffusion, tmp_path):
    unet, flat, _ = tiny_diffusion
    d = tmp_path / "bin"
    unet.save_pretrained(d, safe_serialization=False)
    _tiny_scheduler().save_pretrained(d)
    assert (d / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(ModelLoadError, match=r"only pickle weights .*diffusion_pytorch_model\.bin"
                       r".*allow_pickle=True"):
        load_diffusion(str(d))
    dm = load_diffusion(str(d), allow_pickle=True)
    assert torch.equal(_unet_out(dm.unet), _unet_out(unet))


def test_truncated_safetensors_names_file(tiny_diffusion, tmp_path):
    _, flat, _ = tiny_diffusion
    d = _copy(flat, tmp_path / "trunc")
    f = d / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=r"diffusion_pytorch_model\.safetensors is truncated"):
        load_diffusion(str(d))


def test_missing_weights_file_names_it(tiny_diffusion, tmp_path):
    _, flat, _ = tiny_diffusion
    d = _copy(flat, tmp_path / "noweights")
    (d / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no weights in .*noweights: expected "
                       r"diffusion_pytorch_model\.safetensors"):
        load_diffusion(str(d))


def test_partial_weights_name_missing_keys(tiny_diffusion, tmp_path):
    from safetensors.torch import load_file, save_file

    _, flat, _ = tiny_diffusion
    d = _copy(flat, tmp_path / "partial")
    f = d / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    del sd["conv_norm_out.weight"]
    save_file(sd, str(f))
    with pytest.raises(ModelLoadError, match=r"missing_keys: \['conv_norm_out\.weight'\]"):
        load_diffusion(str(d))


def test_size_mismatch_is_an_error(tiny_diffusion, tmp_path):
    from safetensors.torch import load_file, save_file

    _, flat, _ = tiny_diffusion
    d = _copy(flat, tmp_path / "mismatch")
    f = d / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    sd["conv_out.bias"] = torch.zeros(5)
    save_file(sd, str(f))
    with pytest.raises(ModelLoadError, match=r"do not match .*config\.json \(conv_out\.bias: "
                       r"file \[5\] vs model \[3\]\)"):
        load_diffusion(str(d))


def test_missing_config_and_scheduler(tiny_diffusion, tmp_path):
    _, flat, _ = tiny_diffusion
    with pytest.raises(ModelLoadError, match=r"no config\.json in .*save_pretrained directory"):
        load_diffusion(str(tmp_path))
    d = _copy(flat, tmp_path / "nosched")
    (d / "scheduler_config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"no scheduler_config\.json in .*nosched"):
        load_diffusion(str(d))
    cfg = json.loads((d / "config.json").read_text())
    cfg["_class_name"] = "UNet2DConditionModel"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"describes a UNet2DConditionModel, not a "
                       r"UNet2DModel"):
        load_diffusion(str(d))
    with pytest.raises(ModelLoadError, match=r"no such directory"):
        load_diffusion(str(tmp_path / "does" / "not" / "exist"))


def _offline(monkeypatch, cache):
    """Offline mode and an empty hub cache, even though huggingface_hub is already imported."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub read the variables at import; its download code checks these attributes
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))


def test_hub_id_offline_message(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    with pytest.raises(ModelLoadError, match=r"offline and 'google/ddpm-cifar10-32' is not in the "
                       r"local cache.*pass its path.*densepure models fetch"):
        load_diffusion("google/ddpm-cifar10-32", cache_dir=tmp_path)


# ------------------------------------------------------------------------------------------
# S3 (loopback moto server from tests/conftest.py)


def _upload(endpoint: str, local_dir, uri_prefix: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    bucket = uri_prefix.split("/")[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    for f in sorted(local_dir.rglob("*")):
        if f.is_file():
            fs.put_file(str(f), f"{uri_prefix}/{f.relative_to(local_dir).as_posix()}")


def test_load_diffusion_from_s3_with_cache(tiny_diffusion, s3_endpoint, tmp_path, monkeypatch):
    unet, _, pipe = tiny_diffusion
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    _upload(s3_endpoint, pipe, f"{bucket}/ddpm/tiny")
    uri = f"s3://{bucket}/ddpm/tiny"
    opts = {"endpoint_url": s3_endpoint}
    cache = tmp_path / "cache"

    dm = load_diffusion(uri, cache_dir=cache, storage_options=opts)
    assert dm.source == uri
    assert torch.equal(_unet_out(dm.unet), _unet_out(unet))
    local = cache / hashlib.sha256(uri.encode()).hexdigest()[:16]
    weights = local / "unet" / "diffusion_pytorch_model.safetensors"
    original = pipe / "unet" / "diffusion_pytorch_model.safetensors"
    assert file_sha256(weights) == file_sha256(original)
    assert (local / ".densepure-s3.json").is_file()
    mtime = weights.stat().st_mtime_ns

    # second load: the listing matches the marker, nothing is copied again
    assert diffusion._sync_s3_dir(uri, cache_dir=cache, storage_options=opts) == (local, 0)
    dm2 = load_diffusion(uri, cache_dir=cache, storage_options=opts)
    assert weights.stat().st_mtime_ns == mtime
    assert torch.equal(_unet_out(dm2.unet), _unet_out(unet))

    # endpoint from the standard AWS variable instead of storage_options
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    assert diffusion._sync_s3_dir(uri, cache_dir=cache) == (local, 0)

    # a changed remote file is copied again (and only that one)
    new = _tiny_scheduler()
    new.register_to_config(variance_type="fixed_large")
    new.save_pretrained(tmp_path / "sched2")
    _upload(s3_endpoint, tmp_path / "sched2", f"{bucket}/ddpm/tiny/scheduler")
    dm3 = load_diffusion(uri, cache_dir=cache, storage_options=opts)
    assert dm3.scheduler.config.variance_type == "fixed_large"
    assert weights.stat().st_mtime_ns == mtime


def test_s3_errors(tiny_diffusion, s3_endpoint, tmp_path):
    unet, _, _ = tiny_diffusion
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    d = tmp_path / "bin"
    unet.save_pretrained(d, safe_serialization=False)
    _tiny_scheduler().save_pretrained(d)
    _upload(s3_endpoint, d, f"{bucket}/bin")
    opts = {"endpoint_url": s3_endpoint}
    with pytest.raises(ModelLoadError, match=r"only pickle weights \(s3://.*/bin/"
                       r"diffusion_pytorch_model\.bin\).*allow_pickle=True"):
        load_diffusion(f"s3://{bucket}/bin", cache_dir=tmp_path / "c", storage_options=opts)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").rglob("*.bin"))
    dm = load_diffusion(f"s3://{bucket}/bin", cache_dir=tmp_path / "c", storage_options=opts,
                        allow_pickle=True)
    assert torch.equal(_unet_out(dm.unet), _unet_out(unet))
    with pytest.raises(ModelLoadError, match=r"no files under the prefix"):
        load_diffusion(f"s3://{bucket}/nothing", cache_dir=tmp_path / "c", storage_options=opts)


# ------------------------------------------------------------------------------------------
# timm classifiers


def _tiny_timm(num_classes: int = 10, **kw):
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False, num_classes=num_classes, **kw).eval()


def _images(c: int = 3, size: int = 8, n: int = 2) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(2))


def _manual(model, x01, size, mode, mean, std):
    x = x01
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=size, mode=mode, align_corners=False)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def tiny_timm(tmp_path_factory):
    """(original model, local-dir folder)."""
    from timm.models import save_for_hf

    model = _tiny_timm()
    d = tmp_path_factory.mktemp("timm") / "test_resnet_10"
    save_for_hf(model, str(d), safe_serialization=True)
    return model, d


# logits[0, :4] of the seeded test_resnet on the seeded 8x8 images, resized to 160 bilinear
PINNED_LOGITS = torch.tensor([0.069949, 0.074182, 0.004296, 0.024746])


def test_local_dir_matches_original_and_resizes(tiny_timm):
    model, d = tiny_timm
    clf = load_classifier(f"local-dir:{d}")
    assert isinstance(clf, Classifier)
    assert (clf.num_classes, clf.input_size, clf.interpolation) == (10, (160, 160), "bilinear")
    assert clf.mean == (0.5, 0.5, 0.5) and clf.std == (0.5, 0.5, 0.5)
    assert clf.source == f"local-dir:{d}" and clf.in_chans == 3
    assert not clf.training and all(not p.requires_grad for p in clf.parameters())
    x = _images()
    with torch.no_grad():
        logits = clf(x)
    assert logits.shape == (2, 10)
    expected = _manual(model, x, (160, 160), "bilinear", (0.5,) * 3, (0.5,) * 3)
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits[0, :4], PINNED_LOGITS, atol=1e-5, rtol=0)
    assert model_fingerprint(clf) == model_fingerprint(model)


def test_explicit_preprocessing_wins_and_same_size_is_not_resized(tiny_timm):
    model, d = tiny_timm
    mean, std = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)
    clf = load_classifier(f"local-dir:{d}", num_classes=10, input_size=(32, 24),
                          interpolation="bicubic", mean=mean, std=std, model_name="test_resnet")
    assert (clf.input_size, clf.interpolation) == ((32, 24), "bicubic")
    assert (clf.mean, clf.std) == (mean, std)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(clf(x), _manual(model, x, (32, 24), "bicubic", mean, std),
                                   atol=1e-6, rtol=1e-5)
        # at the model's size the input goes straight to normalization
        x32 = torch.rand(2, 3, 32, 24, generator=torch.Generator().manual_seed(3))
        m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        direct = model((x32 - m) / s)
        torch.testing.assert_close(clf(x32), direct, atol=1e-6, rtol=1e-5)
    near = load_classifier(f"local-dir:{d}", input_size=16, interpolation="nearest")
    with torch.no_grad():
        manual = model((F.interpolate(x, size=(16, 16), mode="nearest") - 0.5) / 0.5)
        torch.testing.assert_close(near(x), manual, atol=1e-6, rtol=1e-5)


def test_grayscale_is_repeated(tiny_timm):
    model, d = tiny_timm
    clf = load_classifier(f"local-dir:{d}", input_size=(16, 16))
    g = _images(c=1)
    with torch.no_grad():
        torch.testing.assert_close(clf(g), clf(g.repeat(1, 3, 1, 1)))
        torch.testing.assert_close(clf(g), _manual(model, g, (16, 16), "bilinear", (0.5,) * 3,
                                                   (0.5,) * 3), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match=r"x01 has 2 channels but the classifier takes 3"):
        clf(_images(c=2))


def test_checkpoint_files(tiny_timm, tmp_path):
    from safetensors.torch import save_file

    model, _ = tiny_timm
    x = _images()
    with torch.no_grad():
        ref = model((F.interpolate(x, size=(32, 32), mode="bilinear") - 0.5) / 0.5)
    st = tmp_path / "clf.safetensors"
    save_file(model.state_dict(), str(st))
    pth = tmp_path / "clf.pth"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, pth)  # a training checkpoint
    for f in (st, pth):
        clf = load_classifier(str(f), model_name="test_resnet", num_classes=10, input_size=32)
        with torch.no_grad():
            torch.testing.assert_close(clf(x), ref, atol=1e-6, rtol=1e-5)
        assert model_fingerprint(clf) == model_fingerprint(model)
    with pytest.raises(ModelLoadError, match=r"pass the timm architecture and class count"):
        load_classifier(str(st))
    with pytest.raises(ModelLoadError, match=r"checkpoint has 10 output classes \(fc\.weight\) but "
                       r"num_classes=5"):
        load_classifier(str(st), model_name="test_resnet", num_classes=5)
    with pytest.raises(ModelLoadError, match=r"do not match the architecture .*missing keys"):
        load_classifier(str(st), model_name="test_vit", num_classes=10)


def test_pickled_module_refused_by_default(tiny_timm, tmp_path):
    model, _ = tiny_timm
    f = tmp_path / "whole_model.pth"
    torch.save(model, f)
    with pytest.raises(ModelLoadError, match=r"holds pickled Python objects.*allow_pickle=True"):
        load_classifier(str(f), model_name="test_resnet", num_classes=10)
    clf = load_classifier(str(f), model_name="test_resnet", num_classes=10, allow_pickle=True)
    assert model_fingerprint(clf) == model_fingerprint(model)


def test_corrupt_checkpoints(tiny_timm, tmp_path):
    from safetensors.torch import save_file

    model, d = tiny_timm
    st = tmp_path / "cut.safetensors"
    save_file(model.state_dict(), str(st))
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=r"cut\.safetensors is truncated or corrupt"):
        load_classifier(str(st), model_name="test_resnet", num_classes=10)
    pth = tmp_path / "cut.pth"
    torch.save(model.state_dict(), pth)
    pth.write_bytes(pth.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=r"cannot read .*cut\.pth"):
        load_classifier(str(pth), model_name="test_resnet", num_classes=10)
    with pytest.raises(ModelLoadError, match=r"no such file"):
        load_classifier(str(tmp_path / "absent.safetensors"), model_name="test_resnet",
                        num_classes=10)
    # without model_name too: the missing file is the problem, not the missing model_name
    with pytest.raises(ModelLoadError, match=r"absent\.pt.*no such file; check the path") as info:
        load_classifier(str(tmp_path / "absent.pt"))
    assert "model_name" not in str(info.value)


def test_local_dir_errors(tiny_timm, tmp_path):
    _, d = tiny_timm
    with pytest.raises(ModelLoadError, match=r"the model has 10 output classes but num_classes=5"):
        load_classifier(f"local-dir:{d}", num_classes=5)
    with pytest.raises(ModelLoadError, match=r"model_name='test_vit' but the source holds a "
                       r"'test_resnet'"):
        load_classifier(f"local-dir:{d}", model_name="test_vit")
    with pytest.raises(ModelLoadError, match=r"no config\.json in .*save_for_hf"):
        load_classifier(f"local-dir:{tmp_path}")
    e = _copy(d, tmp_path / "noweights")
    (e / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no weights in .*noweights: expected "
                       r"model\.safetensors"):
        load_classifier(f"local-dir:{e}")
    with pytest.raises(ModelLoadError, match=r"is a directory; .*'local-dir:"):
        load_classifier(str(d))


def test_local_dir_model_args_round_trip(tmp_path):
    """config.json's model_args rebuild a non-default architecture (1 channel, 5 classes)."""
    from timm.models import save_for_hf

    model = _tiny_timm(num_classes=5, in_chans=1)
    save_for_hf(model, str(tmp_path / "m"), safe_serialization=True)
    clf = load_classifier(f"local-dir:{tmp_path / 'm'}", num_classes=5, input_size=16)
    assert clf.in_chans == 1 and clf.num_classes == 5 and clf.mean == (0.5,)
    x = _images(c=1)
    with torch.no_grad():
        torch.testing.assert_close(
            clf(x), model((F.interpolate(x, size=(16, 16), mode="bilinear") - 0.5) / 0.5),
            atol=1e-6, rtol=1e-5)


def test_timm_name_and_hf_hub_offline(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    with pytest.raises(ModelLoadError, match=r"offline and 'test_resnet\.r160_in1k' is not in the "
                       r"local cache.*densepure models fetch"):
        load_classifier("test_resnet.r160_in1k")
    with pytest.raises(ModelLoadError, match=r"offline and 'timm/test_vit\.r160_in1k' is not in "
                       r"the local cache"):
        load_classifier("hf-hub:timm/test_vit.r160_in1k", cache_dir=tmp_path)
    with pytest.raises(ModelLoadError, match=r"not a timm model name"):
        load_classifier("no_such_architecture_xyz")


def test_classifier_wraps_any_module():
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 7))
    clf = Classifier(lin, input_size=4, interpolation="bilinear", mean=0.5, std=0.25,
                     num_classes=7, source="toy")
    assert clf.mean == (0.5, 0.5, 0.5) and clf.input_size == (4, 4)
    assert clf(_images()).shape == (2, 7)
    with pytest.raises(ValueError, match=r"interpolation='area' is not supported"):
        Classifier(lin, input_size=4, interpolation="area", mean=0.5, std=0.5, num_classes=7)
    with pytest.raises(ValueError, match=r"mean=\(0\.1, 0\.2\): expected 1 or 3 values"):
        Classifier(lin, input_size=4, interpolation="bilinear", mean=(0.1, 0.2), std=0.5,
                   num_classes=7)


# ------------------------------------------------------------------------------------------
# hashes


def test_file_sha256_and_fingerprint(tmp_path):
    f = tmp_path / "blob"
    data = os.urandom(3 << 20)
    f.write_bytes(data)
    assert file_sha256(f) == hashlib.sha256(data).hexdigest()
    sd = {"b": torch.arange(3, dtype=torch.int64), "a": torch.ones(2, 2, dtype=torch.bfloat16)}
    fp = model_fingerprint(sd)
    assert fp == model_fingerprint(dict(reversed(list(sd.items()))))  # key order independent
    assert fp != model_fingerprint({**sd, "b": torch.arange(3, dtype=torch.int32)})
    # pinned: the hash format is part of run metadata and must not drift
    assert fp == "0f1b785ded2972cb252903ac75cd207ff3f651065730df5c8d1e616e08c559a4"


def test_s3_sync_uses_the_one_filesystem_factory(tiny_diffusion, s3_endpoint, tmp_path, monkeypatch):
    """diffusion._sync_s3_dir gets its filesystem from remote.filesystem_for: the fail-fast
    timeouts and retries apply, and storage_options go through the same factory."""
    from densepure_core import remote

    _, _, pipe = tiny_diffusion
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    _upload(s3_endpoint, pipe, f"{bucket}/ddpm/tiny")
    uri = f"s3://{bucket}/ddpm/tiny"
    made = []
    real = remote.filesystem_for

    def spy(target, storage_options=None):
        fs, path = real(target, storage_options)
        made.append((target, storage_options, fs))
        return fs, path

    monkeypatch.setattr(remote, "filesystem_for", spy)
    opts = {"endpoint_url": s3_endpoint, "config_kwargs": {"read_timeout": 60}}
    local, copied = diffusion._sync_s3_dir(uri, cache_dir=tmp_path / "c", storage_options=opts)
    assert copied > 0 and (local / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert [(t, o) for t, o, _ in made] == [(uri, opts)]
    config = made[0][2].config_kwargs
    assert config["read_timeout"] == 60  # merged over the defaults, the other timeouts kept
    assert config["connect_timeout"] == 5 and config["retries"]["mode"] == "standard"
    assert remote.S3_CONFIG_KWARGS["retries"] == {"max_attempts": 3, "mode": "standard"}  # not mutated


def test_filesystem_for_keeps_the_timeouts_with_storage_options():
    from densepure_core import remote

    fs, path = remote.filesystem_for("s3://bucket/prefix", {"endpoint_url": "http://127.0.0.1:9"})
    assert path == "bucket/prefix" and fs.config_kwargs == remote.S3_CONFIG_KWARGS
    assert fs.client_kwargs.get("endpoint_url") == "http://127.0.0.1:9" or fs.endpoint_url == "http://127.0.0.1:9"
