"""Every preset in configs/ through the real code path, on tiny stand-in weights of the same format.

Each preset is loaded with ``load_config`` and only its weights and data are swapped (``--set``
style overrides) for tiny ones in the same formats: an ADM checkpoint made by OpenAI's code with
the preset's flags shrunk, converted by ``densepure_core.models.adm``; a timm local-dir of the same
BEiT architecture shrunk through ``model_args`` (ImageNet) or a timm checkpoint file plus
``model_name`` (CIFAR-10); a tiny image folder / manifest. Then one image is certified in-process
with ``tasks.certify.vote.VoteWorker``, exactly as a Ray actor would, with tiny n0/n.
"""

from __future__ import annotations

import csv
import math
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from densepure_core.models.adm import ADM_PRESETS, convert_adm_checkpoint
from densepure_core.config import load_config
from densepure_core.models import load_classifier, load_diffusion
from densepure_core.models.presets import CONFIG_PRESETS, MODEL_PRESETS, resolve_models
from densepure_core.diffusion.schedule import DiffusionSchedule
from tasks.certify.plan import plan_run
from tasks.certify.vote import VoteWorker

PRESETS = sorted(CONFIG_PRESETS)


def _gd_checkpoint(cfg, path):
    """A random ADM in OpenAI's own code, saved as the released checkpoints were."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from guided_diffusion.unet import UNetModel
    torch.manual_seed(0)
    model = UNetModel(
        image_size=cfg.image_size, in_channels=3, model_channels=cfg.num_channels,
        out_channels=6 if cfg.learn_sigma else 3, num_res_blocks=cfg.num_res_blocks,
        attention_resolutions=tuple(cfg.image_size // r for r in cfg.attention_resolutions),
        dropout=cfg.dropout, channel_mult=cfg.mults, num_heads=cfg.num_heads,
        num_head_channels=cfg.num_head_channels, use_scale_shift_norm=cfg.use_scale_shift_norm,
        resblock_updown=cfg.resblock_updown)
    with torch.no_grad():  # ADM zero-initialises its output conv: make the model do something
        for p in model.out.parameters():
            p.normal_(0, 0.02)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    """Tiny weights and data in the presets' formats; returns {preset family: overrides}."""
    import timm
    from safetensors.torch import save_file
    from timm.models import save_for_hf

    root = tmp_path_factory.mktemp("presets")
    # ImageNet: ADM-256's flags (learned sigma, scale-shift, resblock up/down, 64-channel heads
    # -> 16 here) at 16x16 with two levels.
    imagenet_adm = ADM_PRESETS["imagenet256-uncond"].with_flags(
        image_size=16, num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
        attention_resolutions=(8,), num_head_channels=16)
    convert_adm_checkpoint(_gd_checkpoint(imagenet_adm, root / "adm256.pt"), root / "adm256",
                           imagenet_adm)
    # CIFAR-10: the improved-diffusion flags (cosine 4000 steps, rescaled timesteps, 4 heads,
    # dropout) at 32x32, the preset's own image size.
    cifar_adm = ADM_PRESETS["cifar10-improved"].with_flags(
        num_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(16,),
        num_heads=2)
    convert_adm_checkpoint(_gd_checkpoint(cifar_adm, root / "cifar.pt"), root / "cifar",
                           cifar_adm)

    # BEiT-L/16 512's architecture (timm class, relative position bias, 512x512, bicubic,
    # mean/std 0.5, 1000 classes) at width 32 and depth 1, in timm's local-dir format.
    torch.manual_seed(0)
    beit = timm.create_model("beit_large_patch16_512", pretrained=False, embed_dim=32, depth=1,
                             num_heads=2)
    save_for_hf(beit, str(root / "beit"), safe_serialization=True)
    # CIFAR-10 classifier: a timm checkpoint file + model_name, as the preset; timm's tiny
    # test_vit stands in for ViT-B/16 (it has a fixed 160x160 input).
    vit = timm.create_model("test_vit", pretrained=False, num_classes=10)
    save_file(vit.state_dict(), str(root / "vit.safetensors"))

    rng = np.random.default_rng(0)
    # ImageNet-like folder: 2 synset folders of 1000 (classes_file keeps num_classes = 1000)
    synsets = [f"n{i:08d}" for i in range(1000)]
    (root / "classes.txt").write_text("\n".join(synsets) + "\n")
    for s in synsets[:2]:
        (root / "val" / s).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
            root / "val" / s / "img0.JPEG")
    # CIFAR-10-like manifest: 32x32 PNGs, labels up to 9 (num_classes = 10)
    (root / "cifar").mkdir(exist_ok=True)
    with open(root / "test.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "uri", "label"])
        for i, label in enumerate((3, 9)):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                root / f"c{i}.png")
            w.writerow([f"test-{i}", f"c{i}.png", label])

    tiny_run = ["n0=2", "n=3", "batch_size=10", "dataset.every=1", "dataset.max_images=1"]
    return root, {
        "imagenet": [f"dataset.path={root / 'val'}", f"dataset.classes_file={root / 'classes.txt'}",
                     "dataset.image_size=16", f"diffusion.source={root / 'adm256'}",
                     f"classifier.source=local-dir:{root / 'beit'}", *tiny_run],
        "cifar10": [f"dataset.path={root / 'test.csv'}", f"diffusion.source={root / 'cifar'}",
                    f"classifier.source={root / 'vit.safetensors'}", "classifier.model_name=test_vit",
                    "classifier.input_size=160", *tiny_run],
    }


@pytest.mark.parametrize("name", PRESETS)
def test_preset_validates_with_the_papers_settings(name):
    cfg = load_config(CONFIG_PRESETS[name].path)
    imagenet = name.startswith("imagenet")
    assert cfg.sigmas == [0.25, 0.5, 1.0] and cfg.n0 == 100 and cfg.alpha == 0.001
    assert cfg.n == (10_000 if imagenet else 100_000)
    assert cfg.dataset.every == (500 if imagenet else 20)
    (method,) = cfg.methods
    if name.endswith("densepure"):
        assert (method.kind, method.k, method.steps, cfg.t_star_rule) == \
            ("densepure", 10, 10, "nearest")
    else:
        assert (method.kind, cfg.t_star_rule) == ("dds", "first_at_or_above")
    if imagenet:
        assert cfg.classifier.source.startswith("beit_large_patch16_512")
        assert (cfg.classifier.input_size, cfg.classifier.interpolation) == (512, "bicubic")
        assert cfg.diffusion.source == "models/imagenet256-uncond" and cfg.dataset.image_size == 256
    else:
        assert cfg.classifier.model_name.startswith("vit_base_patch16_224")
        assert cfg.classifier.input_size == 224 and cfg.diffusion.source == "models/cifar10-improved"
    # the models it names are in the registry `models fetch` uses
    for model in resolve_models(name):
        assert model in MODEL_PRESETS
    text = CONFIG_PRESETS[name].path.read_text()
    assert "openaipublic.blob.core.windows.net" in text and "densepure convert-adm" in text


@pytest.mark.parametrize("name", PRESETS)
def test_preset_certifies_one_image_on_standins(name, standins, tmp_path):
    root, overrides = standins
    family = "imagenet" if name.startswith("imagenet") else "cifar10"
    cfg = load_config(CONFIG_PRESETS[name].path,
                      overrides=[*overrides[family], f"out={tmp_path / 'out'}"])
    plan = plan_run(cfg)
    assert plan.num_classes == (1000 if family == "imagenet" else 10)
    worker = VoteWorker(cfg, plan.num_classes, "preset-test")
    results = [worker.run_shard(t) for t in plan.tasks()]
    assert len(results) == 3 and all(not r.skipped and r.images == 1 for r in results)
    rows = pq.read_table(str(tmp_path / "out" / "votes"), partitioning=None).to_pylist()
    assert len(rows) == 3
    per_copy = 10 * 10 if name.endswith("densepure") else 1
    expected_t = {"imagenet_densepure": [144, 258, 396], "imagenet_dds": [145, 259, 396],
                  "cifar10_densepure": [1158, 1983, 2809], "cifar10_dds": [1158, 1984, 2809]}
    for row in sorted(rows, key=lambda r: r["sigma"]):
        assert sum(row["counts0"]) == 2 and sum(row["counts"]) == 3
        assert len(row["counts"]) == plan.num_classes
        assert 0 < row["unet_calls"] <= per_copy * 5
        if name.endswith("dds"):
            assert row["unet_calls"] == 5
    assert [r["t_star"] for r in sorted(rows, key=lambda r: r["sigma"])] == expected_t[name]


def test_standins_load_like_the_real_models(standins):
    """The stand-ins go through load_diffusion / load_classifier with the presets' settings."""
    root, _ = standins
    dm = load_diffusion(str(root / "cifar"))
    schedule = DiffusionSchedule.from_scheduler(dm.scheduler)
    assert (schedule.num_timesteps, schedule.variance_type) == (4000, "learned_range")
    # the cosine schedule's t* for sigma 0.12..1.0: reference.md's 573, 1158, 1984, 2809 are
    # Carlini et al.'s rule (first t at or above); DensePure's nearest rule differs by one twice
    sigmas = (0.12, 0.25, 0.5, 1.0)
    assert [schedule.t_star(s, "first_at_or_above") for s in sigmas] == [573, 1158, 1984, 2809]
    assert [schedule.t_star(s, "nearest") for s in sigmas] == [572, 1158, 1983, 2809]
    assert dm.unet.config.time_embedding_type == "learned"
    cfg = load_config(CONFIG_PRESETS["imagenet_dds"].path)
    clf = load_classifier(f"local-dir:{root / 'beit'}", num_classes=cfg.classifier.num_classes,
                          input_size=cfg.classifier.input_size,
                          interpolation=cfg.classifier.interpolation,
                          mean=cfg.classifier.mean, std=cfg.classifier.std)
    x = torch.rand(2, 3, 16, 16)
    assert clf.preprocess(x).shape == (2, 3, 512, 512)
    assert clf(x).shape == (2, 1000)
    assert type(clf.model).__name__ == "Beit" and math.isclose(clf.mean[0], 0.5)
