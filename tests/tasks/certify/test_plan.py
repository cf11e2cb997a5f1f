"""Stage 1: manifest, shards, run metadata, resume of the same config, refusal of another."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from densepure_core.config import load_config
from tasks.common.run_dir import RunDir
from tasks.certify.plan import PlanError, load_plan, plan_run


def image_folder(root, classes=("a", "b"), per_class=5):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _models(tmp):
    """Tiny real models under ``tmp/models`` (the plan loads every model before writing anything)."""
    from model_factory import tiny_classifier, tiny_ddpm

    models = tmp / "models"
    if not (models / "ddpm").exists():
        tiny_ddpm(models / "ddpm")
        tiny_classifier(models / "clf")
        tiny_classifier(models / "clf5", num_classes=5)
    return models


def config(root, out, **over):
    models = _models(root.parent)
    data = {
        "dataset": {"kind": "imagefolder", "path": str(root), "every": 2},
        "classifier": {"source": f"local-dir:{models / 'clf'}"},
        "diffusion": {"source": str(models / "ddpm")},
        "methods": [{"kind": "rs"}, {"kind": "densepure", "k": 3, "steps": 2}],
        "sigmas": [0.25, 0.5],
        "shard_size": 2,
        "out": str(out),
    }
    return load_config(data=data, overrides=[f"{k}={v}" for k, v in over.items()])


def test_plan_writes_manifest_config_and_run(tmp_path):
    root = image_folder(tmp_path / "data")
    out = tmp_path / "out"
    plan = plan_run(config(root, out))
    assert len(plan.records) == 5  # every 2nd of 10
    assert plan.shards == [[0, 1], [2, 3], [4]]
    assert plan.partitions == [(0.25, "rs"), (0.25, "densepure-k3-s2"), (0.5, "rs"), (0.5, "densepure-k3-s2")]
    assert len(plan.tasks()) == 3 * 4
    manifest = pq.read_table(out / "manifest.parquet").to_pydict()
    assert manifest["image_id"] == ["a/0.png", "a/2.png", "a/4.png", "b/1.png", "b/3.png"]
    assert manifest["label"] == [0, 0, 0, 1, 1] and manifest["shard"] == [0, 0, 1, 1, 2]
    run = json.loads((out / "run.json").read_text())
    assert run["config_hash"] == plan.config_hash and run["images"] == 5 and "torch" in run["versions"]
    stored = yaml.safe_load((out / "config.yaml").read_text())
    assert stored["sigmas"] == [0.25, 0.5] and stored["out"] == str(out)
    assert RunDir(str(out)).shard_uri(0.5, "rs", 2).endswith("votes/sigma=0.5/method=rs/shard=00002.parquet")


def _voted(out):
    """Mark OUT as voted (a shard file exists): from then on the stored plan is the run."""
    shard = out / "votes" / "sigma=0.25" / "method=rs" / "shard=00000.parquet"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"votes")


def test_resume_reuses_the_stored_plan(tmp_path):
    root = image_folder(tmp_path / "data")
    out = tmp_path / "out"
    first = plan_run(config(root, out))
    _voted(out)
    (root / "a" / "0.png").unlink()  # the dataset changes: the stored plan still wins
    again = plan_run(config(root, out, alpha=0.01, batch_size=3))  # alpha/batch size may change
    assert again.resumed and again.run_id == first.run_id and again.records == first.records
    assert load_plan(str(out)).shards == first.shards


def test_a_different_config_is_refused_naming_the_fields(tmp_path):
    root = image_folder(tmp_path / "data")
    out = tmp_path / "out"
    first = plan_run(config(root, out))
    again = plan_run(config(root, out, n=77, seed=3))  # nothing voted yet: simply planned again
    assert not again.resumed and again.run_id != first.run_id
    assert yaml.safe_load((out / "config.yaml").read_text())["n"] == 77
    _voted(out)
    with pytest.raises(PlanError, match=r"different config: its votes of partition\(s\) 0.25/rs depend on "
                                        r"fields this config changes \(fields that differ: n, seed\)"):
        plan_run(config(root, out))


def test_interrupted_plan_is_redone(tmp_path):
    root = image_folder(tmp_path / "data")
    out = tmp_path / "out"
    plan_run(config(root, out))
    (out / "run.json").unlink()  # killed between config.yaml and run.json
    plan = plan_run(config(root, out))
    assert not plan.resumed and (out / "run.json").exists()


def test_steps_beyond_t_star_refused_and_hashes_recorded(tmp_path):
    root = image_folder(tmp_path / "data")
    ddpm, clf = _models(tmp_path) / "ddpm", _models(tmp_path) / "clf"
    with pytest.raises(PlanError, match=r"methods.1.steps = 200 exceeds t\* = 144"):
        plan_run(config(root, tmp_path / "o1", **{"methods.1.steps": 200}))
    assert not (tmp_path / "o1").exists()  # refused before anything is written
    plan_run(config(root, tmp_path / "o2"))
    run = json.loads((tmp_path / "o2" / "run.json").read_text())
    assert run["t_star"] == {"0.25": 144, "0.5": 258}
    weights = run["model_hashes"][str(ddpm)]
    assert set(weights) == {"unet/diffusion_pytorch_model.safetensors"}
    assert all(len(h) == 64 for h in weights.values())
    assert list(run["model_hashes"][f"local-dir:{clf}"]) == ["model.safetensors"]


def test_classifier_num_classes_decides_and_labels_are_checked(tmp_path):
    # Two class folders, classifier.num_classes 5: a subset of the classes, planned as it is.
    root = image_folder(tmp_path / "data")
    clf5 = f"local-dir:{_models(tmp_path) / 'clf5'}"
    plan = plan_run(config(root, tmp_path / "out", **{"classifier.num_classes": 5, "classifier.source": clf5}))
    assert plan.num_classes == 5
    assert json.loads((tmp_path / "out" / "run.json").read_text())["num_classes"] == 5
    # Without it, nothing is invented from the data: the workers use the classifier's width.
    assert plan_run(config(root, tmp_path / "out2")).num_classes is None
    # Three folders, a 2-class classifier: label 2 is refused, naming the image and the fix.
    root3 = image_folder(tmp_path / "data3", classes=("a", "b", "c"))
    with pytest.raises(PlanError, match=r"'c/0.png' .* has label 2, but the classifier has 2 outputs"):
        plan_run(config(root3, tmp_path / "out3", **{"classifier.num_classes": 2}))
    assert not (tmp_path / "out3").exists()
    # Without classifier.num_classes the loaded classifier's width is checked the same way.
    with pytest.raises(PlanError, match=r"'c/0.png' .* has label 2, but the classifier has 2 outputs"):
        plan_run(config(root3, tmp_path / "out4"))
    assert not (tmp_path / "out4").exists()
