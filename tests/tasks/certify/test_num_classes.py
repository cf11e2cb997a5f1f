"""The classifier's output width decides the count vectors; labels are only checked against it.

A manifest whose labels are all -1 (unknown), an ImageNet-like subset that lacks the last
classes, and a label beyond the classifier's width, through plan -> vote -> aggregate -> report
(in-process: the same VoteWorker the Ray actors run).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from model_factory import tiny_classifier, tiny_job
from PIL import Image

from densepure_core.config import load_config
from tasks.certify.aggregate import aggregate
from tasks.certify.plan import PlanError, plan_run
from tasks.certify.report import write_report
from tasks.certify.vote import VoteWorker
from tasks.common.workers import BadInputError


def manifest_job(tmp, labels, classes: int = 2, **over) -> dict:
    """tiny_job over a CSV manifest of len(labels) random 8x8 images with these labels."""
    data = tiny_job(tmp, sigmas=[0.5], methods=[{"kind": "rs"}, {"kind": "dds"}], shard_size=2, **over)
    if classes != 2:
        tiny_classifier(tmp / "models" / f"clf{classes}", num_classes=classes)
        data["classifier"] = {"source": f"local-dir:{tmp / 'models' / f'clf{classes}'}"}
    images = tmp / "manifest_images"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    lines = ["image_id,uri,label"]
    for i, label in enumerate(labels):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(images / f"m{i}.png")
        lines.append(f"m{i},manifest_images/m{i}.png,{label}")
    (tmp / "manifest.csv").write_text("\n".join(lines) + "\n")
    data["dataset"] = {"kind": "manifest", "path": str(tmp / "manifest.csv"), "image_size": 8}
    return data


def certify_in_process(data: dict):
    cfg = load_config(data=data)
    plan = plan_run(cfg)
    worker = VoteWorker(cfg, plan.num_classes, "test-worker")
    results = [worker.run_shard(t) for t in plan.tasks()]
    result = aggregate(cfg.out, alpha=cfg.alpha, radii=cfg.radii, expected=plan.expected_images())
    return cfg, plan, results, result


def test_all_unknown_labels_certify_end_to_end(tmp_path):
    data = manifest_job(tmp_path, [-1] * 5)
    cfg, plan, results, result = certify_in_process(data)
    assert plan.num_classes is None  # not invented from the labels (max(-1) + 1 = 0)
    assert json.loads((tmp_path / "out" / "run.json").read_text())["num_classes"] is None
    votes = pq.read_table(plan.tasks()[0].uri).to_pylist()
    assert all(len(v["counts"]) == 2 and v["label"] == -1 for v in votes)  # the classifier's width
    assert result.images == 10 and all(p.num_classes == 2 and p.labeled == 0 for p in result.partitions)
    certs = pq.read_table(result.certificates_uri).to_pylist()
    assert len(certs) == 10 and all(c["correct"] is None for c in certs)
    acc = pq.read_table(result.accuracy_uri).to_pylist()
    assert acc and all(a["images"] == 0 and a["certified_accuracy"] is None for a in acc)
    report = write_report(cfg.out)
    assert "| 0.5 | dds | 0 |" in report  # no labeled image: accuracy shown as '-'
    assert (tmp_path / "out" / "certified_accuracy.png").exists()


def test_subset_lacking_the_last_classes_uses_the_classifiers_width(tmp_path):
    # A 10-class classifier, images of classes 0 and 3 only: max(label) + 1 = 4 would be wrong.
    data = manifest_job(tmp_path, [0, 3, 3, -1], classes=10)
    data["classifier"]["num_classes"] = 10
    cfg, plan, _, result = certify_in_process(data)
    assert plan.num_classes == 10
    assert all(p.num_classes == 10 for p in result.partitions)
    assert all(len(c) == 10 for c in pq.read_table(plan.tasks()[0].uri).column("counts").to_pylist())
    assert all(p.labeled == 3 for p in result.partitions)


def test_subset_without_num_classes_takes_the_loaded_width(tmp_path):
    # Without classifier.num_classes the workers take the width from the classifier they load.
    data = manifest_job(tmp_path, [0, 3, -1], classes=10)
    cfg, plan, _, result = certify_in_process(data)
    assert plan.num_classes is None
    assert all(p.num_classes == 10 for p in result.partitions)


def test_label_beyond_num_classes_is_refused_at_plan_time(tmp_path):
    data = manifest_job(tmp_path, [0, 1, 12, -1], classes=10)
    data["classifier"]["num_classes"] = 10
    with pytest.raises(PlanError) as err:
        plan_run(load_config(data=data))
    msg = str(err.value)
    assert "'m2'" in msg and "label 12" in msg and "10 outputs" in msg and "classifier.num_classes" in msg
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_label_beyond_the_loaded_width_is_refused_by_the_worker(tmp_path):
    data = manifest_job(tmp_path, [0, 1, -1, 2], on_bad_input="quarantine")  # 2-class classifier
    cfg = load_config(data=data)
    with pytest.raises(PlanError, match="has label 2, but the classifier has 2 outputs"):
        plan_run(cfg)  # the plan loads the classifier: refused before any worker
    assert not (tmp_path / "out").exists()
    # The workers check again (a manifest edited after planning): never quarantined.
    plan = plan_run(load_config(data=manifest_job(tmp_path, [0, 1, -1, 1], on_bad_input="quarantine")))
    worker = VoteWorker(cfg, plan.num_classes, "test-worker")
    first, second = plan.tasks()[0], plan.tasks()[-1]
    second = dataclasses.replace(second, records=(second.records[0], dataclasses.replace(second.records[1], label=2)))
    assert worker.run_shard(first).images == 2  # labels 0, 1: fine
    with pytest.raises(BadInputError) as err:  # never quarantined: the whole run disagrees
        worker.run_shard(second)
    msg = str(err.value)
    assert "'m3'" in msg and "label 2" in msg and "2 outputs" in msg and "-1 (unknown)" in msg
    assert not (tmp_path / "out" / "errors").exists()
