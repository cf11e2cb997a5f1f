"""Resume refuses an OUT voted with an older noise-stream version (tasks/certify/plan.py _check_same_run)."""

import json

import numpy as np
import pytest
from PIL import Image

from densepure_core.config import load_config
from densepure_core.rng import STREAM_VERSION
from tasks.certify.plan import PlanError, plan_run


def _config(tmp_path, **over):
    root = tmp_path / "data"
    if not root.exists():
        rng = np.random.default_rng(0)
        for c in ("a", "b"):
            (root / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    from model_factory import tiny_classifier

    clf = tmp_path / "clf"
    if not clf.exists():
        tiny_classifier(clf)
    data = {
        "dataset": {"kind": "imagefolder", "path": str(root)},
        "classifier": {"source": f"local-dir:{clf}"},
        "methods": [{"kind": "rs"}],
        "sigmas": [0.25],
        "shard_size": 2,
        "out": str(tmp_path / "out"),
    }
    return load_config(data=data, overrides=[f"{k}={v}" for k, v in over.items()])


def _edit_run(out, drop=(), **changes):
    run = json.loads((out / "run.json").read_text())
    assert run["stream_version"] == STREAM_VERSION  # what plan_run records
    for key in drop:
        del run[key]
    run.update(changes)
    (out / "run.json").write_text(json.dumps(run))
    # an OUT of an old release holds votes (with none, a plan is simply made again)
    shard = out / "votes" / "sigma=0.25" / "method=rs" / "shard=00000.parquet"
    shard.parent.mkdir(parents=True, exist_ok=True)
    shard.write_bytes(b"votes")


def test_an_out_of_stream_version_1_is_never_resumed(tmp_path):
    cfg = _config(tmp_path)
    out = tmp_path / "out"
    plan_run(cfg)
    assert plan_run(cfg).run_id  # the same version resumes
    # what the code before the stream version wrote: config.yaml as today, run.json with the
    # version-1 hash (no stream_version in the payload)
    _edit_run(out, drop=["stream_version"], config_hash=cfg.config_hash(stream_version=1))
    with pytest.raises(PlanError, match=r"stream_version") as info:
        plan_run(cfg)
    assert "new --out" in str(info.value) and f"version {STREAM_VERSION}" in str(info.value)
    # also when the config differs: the stream version is reported first
    with pytest.raises(PlanError, match=r"stream_version"):
        plan_run(_config(tmp_path, n=7))


def test_an_explicit_old_stream_version_in_run_json_is_refused(tmp_path):
    cfg = _config(tmp_path)
    plan_run(cfg)
    _edit_run(tmp_path / "out", stream_version=1)
    with pytest.raises(PlanError, match=r"noise stream version 1 .*stream_version.*new --out"):
        plan_run(cfg)


def test_a_run_json_hash_of_nothing_known_is_refused(tmp_path):
    cfg = _config(tmp_path)
    plan_run(cfg)
    _edit_run(tmp_path / "out", config_hash="0123456789abcdef")
    with pytest.raises(PlanError, match=r"config_hash 0123456789abcdef is not the hash of its config.yaml"):
        plan_run(cfg)


def test_other_fields_are_still_reported_by_name(tmp_path):
    plan_run(_config(tmp_path))
    _edit_run(tmp_path / "out")  # voted: the stored config is the run's
    with pytest.raises(PlanError, match=r"fields that differ: n, seed\)"):
        plan_run(_config(tmp_path, n=7, seed=2))
    # operational fields never block a resume
    assert plan_run(_config(tmp_path, alpha=0.01, batch_size=3)).run_id
