"""Issue 22 through the real CLI: a run never mixes models or runs.

- item 2: the weights' fingerprint is part of what a resume checks (certify and attack), and
  every row records the fingerprints of the models that produced it;
- item 3: a run holds a lease on its OUT; a second run is told who holds it; a dead holder's
  lease is taken over; an OUT two runs already mixed is repaired by `densepure repair`;
- item 4: a failed `attack` start does not lock its OUT;
- item 6: every model source is resolved before anything is written, and a run can gain sigmas
  and methods (or fix partitions without votes) while a change to voted partitions is refused.
"""

import json
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from cli_checks import one_error_line, snapshot
from model_factory import attack_job, tiny_job
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _replace_weights(weights: Path) -> None:
    """Other weights under the same name: what retraining into the same folder does."""
    state = load_file(str(weights))
    first = sorted(state)[0]
    state[first] = state[first] + 0.5
    save_file(state, str(weights))


def _run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def test_a_run_grows_by_sigmas_and_methods_and_never_mixes_models(tmp_path):
    out = tmp_path / "out"
    rs_only = tiny_job(tmp_path, methods=[{"kind": "rs"}], sigmas=[0.5], shard_size=3)
    # Item 6: a diffusion source that points nowhere is refused before anything is written (it
    # used to let the RS partitions vote, then lock the OUT against the corrected source).
    wrong = dict(rs_only, methods=[{"kind": "rs"}, {"kind": "dds"}], diffusion={"source": str(tmp_path / "nowhere")})
    refused = runner.invoke(app, ["certify", "--config", str(_write(tmp_path / "wrong.yaml", wrong))])
    assert refused.exit_code == 1
    assert str(tmp_path / "nowhere") in one_error_line(refused) and "checked before anything runs" in refused.output
    assert not out.exists()

    first = runner.invoke(app, ["certify", "--config", str(_write(tmp_path / "rs.yaml", rs_only))])
    assert first.exit_code == 0, first.output
    run = _run_json(out)
    clf_source = rs_only["classifier"]["source"]
    rows = pq.read_table(out / "votes" / "sigma=0.5" / "method=rs" / "shard=00000.parquet").to_pylist()
    assert {r["classifier_fingerprint"] for r in rows} == {run["model_fingerprints"][clf_source]}
    assert {r["diffusion_fingerprint"] for r in rows} == {None}  # plain RS calls no diffusion model
    assert {r["config_hash"] for r in rows} == {run["partition_hashes"]["0.5/rs"]}
    kept = snapshot(out / "votes")

    # A sigma and a method more: the same run continues, the RS votes are kept as they are.
    grown = dict(rs_only, methods=[{"kind": "rs"}, {"kind": "dds"}], sigmas=[0.25, 0.5])
    second = runner.invoke(app, ["certify", "--config", str(_write(tmp_path / "grown.yaml", grown))])
    assert second.exit_code == 0, second.output
    extended = _run_json(out)
    assert extended["run_id"] == run["run_id"] and extended["extended"][-1]["added"] == ["0.25/rs", "0.25/dds", "0.5/dds"]
    assert all(snapshot(out / "votes")[p] == b for p, b in kept.items())
    accuracy = pq.read_table(out / "tables" / "accuracy.parquet").to_pydict()
    assert {(s, m) for s, m in zip(accuracy["sigma"], accuracy["method"])} == {
        (0.25, "rs"), (0.25, "dds"), (0.5, "rs"), (0.5, "dds")}

    # A change to what voted partitions depend on is refused, naming them.
    changed = runner.invoke(app, ["certify", "--config", str(tmp_path / "grown.yaml"), "--set", "n=13"])
    assert changed.exit_code == 1
    message = one_error_line(changed)
    assert "different config: its votes of partition(s) 0.25/dds, 0.25/rs, 0.5/dds, 0.5/rs" in message
    assert "fields that differ: n)" in message and "another --out" in message

    # Item 2: other weights under the same diffusion.source, one DDS shard deleted: the resume is
    # refused before anything is voted, naming the model, both fingerprints and the way out.
    planned = _run_json(out)["model_fingerprints"][grown["diffusion"]["source"]]
    _replace_weights(Path(grown["diffusion"]["source"]) / "unet" / "diffusion_pytorch_model.safetensors")
    (out / "votes" / "sigma=0.5" / "method=dds" / "shard=00000.parquet").unlink()
    before = snapshot(out)
    resumed = runner.invoke(app, ["certify", "--config", str(tmp_path / "grown.yaml")])
    assert resumed.exit_code == 1
    message = one_error_line(resumed)
    assert f"diffusion.source {grown['diffusion']['source']} is not the model this run was planned with" in message
    assert f"the plan recorded {planned}" in message and "new --out" in message
    assert snapshot(out) == before  # nothing voted, nothing rewritten


def test_a_second_run_is_told_who_holds_the_out_and_a_mixed_out_is_repaired(tmp_path):
    from tasks.common.lease import Lease
    from tasks.common.run_dir import RunDir

    data = tiny_job(tmp_path, methods=[{"kind": "rs"}], sigmas=[0.5], shard_size=3)
    config = str(_write(tmp_path / "job.yaml", data))
    out = tmp_path / "out"
    assert runner.invoke(app, ["certify", "--config", config]).exit_code == 0

    # Item 3: while another run holds the lease, a second run stops at once, naming it.
    with Lease(RunDir(str(out)), "densepure certify, run name 'nightly'", ttl=60):
        busy = runner.invoke(app, ["certify", "--config", config])
    assert busy.exit_code == 1
    message = one_error_line(busy)
    assert "is in use by another run: densepure certify, run name 'nightly'" in message
    assert "last alive" in message and "choose another --out" in message
    assert not (out / "lease.json").exists()

    # A holder that died (its process on this host is gone) lets go: the next run takes over.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    (out / "lease.json").write_text(json.dumps({"holder": "densepure certify, run name 'killed'",
                                                "host": socket.gethostname(), "pid": int(dead.stdout), "token": "x",
                                                "acquired_at": now, "heartbeat_at": now, "ttl": 600}))
    again = runner.invoke(app, ["certify", "--config", config])
    assert again.exit_code == 0, again.output
    assert "2 shard(s) already complete, skipped" in again.output  # one line for every complete shard
    assert not (out / "lease.json").exists()

    # An OUT two runs of one config wrote before leases existed: a shard of another run_id.
    shard0 = out / "votes" / "sigma=0.5" / "method=rs" / "shard=00000.parquet"
    shard1 = out / "votes" / "sigma=0.5" / "method=rs" / "shard=00001.parquet"

    def relabel(shard, config_hash=None):
        table = pq.read_table(shard)
        table = table.set_column(0, table.schema.field(0), pa.array(["tiny-other"] * table.num_rows))
        if config_hash:  # a run of another config: its counts cannot be kept
            i = table.schema.get_field_index("config_hash")
            table = table.set_column(i, table.schema.field(i), pa.array([config_hash] * table.num_rows))
        pq.write_table(table, shard)

    relabel(shard0)
    stuck = runner.invoke(app, ["certify", "--config", config])
    assert stuck.exit_code == 1
    message = one_error_line(stuck)
    assert "mixes" in message and "run_id" in message and "densepure repair OUT" in message
    assert "tiny-other: " in message and "shard=00000.parquet" in message
    relabel(shard1, "0123456789abcdef")  # and one of another config too
    repaired = runner.invoke(app, ["repair", str(out)])
    assert repaired.exit_code == 0, repaired.output
    assert "1 relabelled" in repaired.output and "1 removed" in repaired.output
    assert {r["run_id"] for r in pq.read_table(shard0).to_pylist()} == {_run_json(out)["run_id"]}
    assert not shard1.exists()
    fixed = runner.invoke(app, ["certify", "--config", config])
    assert fixed.exit_code == 0, fixed.output  # the removed shard is voted again
    assert shard1.exists()


def test_attack_replans_after_a_failed_start_and_refuses_a_replaced_classifier(tmp_path):
    data = attack_job(tmp_path, defenses=[{"kind": "none"}], attacks=[{"kind": "pgd_eot", "iterations": 2}],
                      score_purifications=1, shard_size=3)
    out = tmp_path / "out"
    # Item 4: a start that fails before its first shard (a corrupt image) leaves a plan only...
    corrupt = tmp_path / "data" / "a" / "0.png"
    good = corrupt.read_bytes()
    corrupt.write_bytes(b"not an image")
    failed = runner.invoke(app, ["attack", "--config", str(_write(tmp_path / "a.yaml", data))])
    assert failed.exit_code == 1 and "cannot be decoded" in one_error_line(failed)
    assert (out / "config.yaml").exists() and not (out / "attacks").exists()
    # ... and the corrected start (another M, the image fixed) is planned afresh, not refused.
    corrupt.write_bytes(good)
    fixed = dict(data, score_purifications=2)
    result = runner.invoke(app, ["attack", "--config", str(_write(tmp_path / "b.yaml", fixed))])
    assert result.exit_code == 0, result.output
    run = _run_json(out)
    rows = pq.read_table(out / "attacks", partitioning=None).to_pylist()
    assert {r["classifier_fingerprint"] for r in rows} == {run["model_fingerprints"][data["classifier"]["source"]]}
    assert yaml.safe_load((out / "config.yaml").read_text())["score_purifications"] == 2  # the corrected plan

    # Item 2 for attacks: other classifier weights under the same source, one shard deleted: the
    # resume is refused, naming the model and the fingerprint the rows were made with.
    _replace_weights(Path(data["classifier"]["source"].removeprefix("local-dir:")) / "model.safetensors")
    (out / "attacks" / "defense=none" / "threat=linf-8" / "attack=pgd_eot" / "shard=00001.parquet").unlink()
    before = snapshot(out)
    refused = runner.invoke(app, ["attack", "--config", str(tmp_path / "b.yaml")])
    assert refused.exit_code == 1
    message = one_error_line(refused)
    assert "is not the model this run was planned with" in message and data["classifier"]["source"] in message
    assert run["model_fingerprints"][data["classifier"]["source"]] in message
    assert snapshot(out) == before


def test_an_linf_eps_without_its_255_is_refused_before_any_work(tmp_path):
    """Item 5: eps: 8 for L_inf (the /255 forgotten) ran for 4 minutes as threat linf-2040."""
    data = attack_job(tmp_path)
    result = runner.invoke(app, ["attack", "--config", str(_write(tmp_path / "a.yaml", data)),
                                 "--set", "threats.0.eps=8"])
    assert result.exit_code == 2
    assert "eps 8 for linf covers the whole [0, 1] pixel range" in result.output and "8/255" in result.output
    assert not (tmp_path / "out").exists()
