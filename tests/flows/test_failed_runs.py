"""Issue 17 through the real CLI: getting out of a failed run, errors caught before any GPU time,
partitions whose every image was quarantined, and which alpha the published tables use."""

import json
import shutil

import pytest
import yaml
from cli_checks import one_error_line, snapshot
from model_factory import image_folder, tiny_job
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def _write(tmp_path, data):
    config = tmp_path / f"{data['run_name']}.yaml"
    config.write_text(yaml.safe_dump(data))
    return config


def test_a_partition_whose_every_image_is_quarantined_stays_in_the_report(tmp_path):
    """Item 2: 12x12 images without dataset.image_size: RS resizes them, DDS quarantines them all.
    The DDS partition stays in summary.json and both report tables with 0 images and 6
    quarantined; an OUT with nothing but such partitions reports instead of crashing."""
    data = tiny_job(tmp_path, methods=[{"kind": "rs"}, {"kind": "dds"}], sigmas=[0.5],
                    on_bad_input="quarantine")
    shutil.rmtree(tmp_path / "data")
    image_folder(tmp_path / "data", size=12)
    data["dataset"]["image_size"] = None
    result = runner.invoke(app, ["certify", "--config", str(_write(tmp_path, data))])
    assert result.exit_code == 0, result.output
    assert "6 image(s) quarantined" in result.output
    summary = json.loads((tmp_path / "out" / "tables" / "summary.json").read_text())
    parts = {p["method"]: p for p in summary["partitions"]}
    assert parts["dds"]["images"] == 0 and parts["dds"]["quarantined"] == 6
    assert parts["rs"]["images"] == 6 and parts["rs"]["quarantined"] == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| 0.5 | dds | 0 | - | - | - | - | - | - | - |" in report  # the accuracy table
    assert "| 0.5 | dds | 0 | 0 | 0 | 6 | - |" in report  # images, expected, missing, quarantined
    assert "| 0.5 | rs | 6 | 6 | 0 | 0 |" in report

    data.update(run_name="only-dds", methods=[{"kind": "dds"}], out=str(tmp_path / "out-dds"))
    result = runner.invoke(app, ["certify", "--config", str(_write(tmp_path, data))])
    assert result.exit_code == 0, result.output  # was: error: TypeError: 'NoneType' object is not iterable
    assert "| 0.5 | dds | 0 | 0 | 0 | 6 | - |" in result.output and "- alpha: 0.01 " in result.output
    votes = snapshot(tmp_path / "out-dds" / "votes")
    rebuilt = runner.invoke(app, ["report", data["out"]])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert "| 0.5 | dds | 0 | 0 | 0 | 6 | - |" in rebuilt.output
    assert snapshot(tmp_path / "out-dds" / "votes") == votes and len(votes) == 3


def test_a_new_alpha_on_the_same_out_is_said_by_config_yaml_run_json_and_the_tables(tmp_path):
    """Item 4: a rerun with another alpha re-aggregates the same votes (nothing voted again);
    config.yaml, run.json and both tables then say the new alpha, and config.yaml still resumes."""
    import pyarrow.parquet as pq

    data = tiny_job(tmp_path, methods=[{"kind": "rs"}], sigmas=[0.5])
    config = _write(tmp_path, data)
    out = tmp_path / "out"
    assert runner.invoke(app, ["certify", "--config", str(config)]).exit_code == 0
    votes = snapshot(out / "votes")
    result = runner.invoke(app, ["certify", "--config", str(config), "--set", "alpha=0.05"])
    assert result.exit_code == 0, result.output
    assert "computed 0 shards" in result.output and "- alpha: 0.05 " in result.output
    assert snapshot(out / "votes") == votes
    stored = yaml.safe_load((out / "config.yaml").read_text())
    run = json.loads((out / "run.json").read_text())
    assert stored["alpha"] == 0.05 and run["tables"]["alpha"] == 0.05 and run["tables"]["radii"] == stored["radii"]
    assert set(pq.read_table(out / "tables" / "accuracy.parquet").column("alpha").to_pylist()) == {0.05}
    assert set(pq.read_table(out / "tables" / "certificates.parquet").column("alpha").to_pylist()) == {0.05}
    assert json.loads((out / "tables" / "summary.json").read_text())["alpha"] == 0.05
    # the rewritten config.yaml is the same run: it resumes (nothing voted), it is not "a different config"
    again = runner.invoke(app, ["certify", "--config", str(out / "config.yaml")])
    assert again.exit_code == 0 and "computed 0 shards" in again.output, again.output
    assert snapshot(out / "votes") == votes


# ------------------------------------------------------------------------------------------
# item 7: the smaller ones
# ------------------------------------------------------------------------------------------

def test_report_and_export_tsv_on_an_empty_or_partial_out_are_one_error_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    partial = tmp_path / "partial"  # a plan and a vote file, no tables: the aggregate never ran
    (partial / "votes" / "sigma=0.5" / "method=rs").mkdir(parents=True)
    (partial / "votes" / "sigma=0.5" / "method=rs" / "shard=00000.parquet").write_bytes(b"votes")
    (partial / "config.yaml").write_text("n: 10\n")
    before = snapshot(partial)
    for command in ("report", "export-tsv"):
        for out, fix in ((empty, "holds no densepure run"), (tmp_path / "nothing", "holds no densepure run"),
                         (partial, "run the aggregate stage first")):
            result = runner.invoke(app, [command, str(out)])
            assert result.exit_code == 1, (command, out, result.output)
            message = one_error_line(result)
            assert str(out) in message and fix in message
    assert snapshot(partial) == before and not (tmp_path / "nothing").exists()


def test_convert_adm_names_a_missing_file_before_any_flag_and_every_flag_has_help(tmp_path):
    import typer.main

    result = runner.invoke(app, ["convert-adm", str(tmp_path / "missing.pt"), str(tmp_path / "out")])
    assert result.exit_code != 0
    message = one_error_line(result)
    assert "missing.pt: no such file" in message and "num_heads" not in message
    (tmp_path / "model.pt").write_bytes(b"\x80\x02\x8c\x02\xff\xfe.")  # exists: the flags are checked next
    result = runner.invoke(app, ["convert-adm", str(tmp_path / "model.pt"), str(tmp_path / "out")])
    message = one_error_line(result)
    assert "without --preset" in message and "--preset imagenet256-uncond or cifar10-improved" in message
    assert not (tmp_path / "out").exists()
    command = typer.main.get_command(app).commands["convert-adm"]
    undocumented = [p.opts[0] for p in command.params if p.opts[0].startswith("--") and not p.help]
    assert undocumented == []
    assert runner.invoke(app, ["convert-adm", "--help"]).exit_code == 0


def test_models_fetch_with_random_bytes_names_the_file_and_the_fix(tmp_path, monkeypatch):
    """A .pt of random bytes used to end in a UTF-8 decode error (or claim it held pickled objects)."""
    monkeypatch.setenv("DENSEPURE_OFFLINE", "1")
    raw = tmp_path / "downloads" / "cifar10_uncond_50M_500K.pt"
    raw.parent.mkdir()
    for junk in (b"\x80\x02\x8c\x02\xff\xfe.", b"\x80\x02e.", b"PK\x03\x04not a zip"):
        raw.write_bytes(junk)
        result = runner.invoke(app, ["models", "fetch", "cifar10-improved", "--cache", str(tmp_path)])
        assert result.exit_code == 1
        message = one_error_line(result)
        assert str(raw) in message and "truncated, corrupt or not a torch checkpoint" in message
        assert "delete it" in message and "pickled Python objects" not in message
        assert raw.read_bytes() == junk and not (tmp_path / "cifar10-improved").exists()


def test_ctrl_c_says_how_to_resume_and_a_failed_aggregate_prints_one_line(tmp_path):
    """Ctrl-C (SIGINT to the driver) ends with an "interrupted: ... rerun" line and exit 130,
    keeps the finished shards and leaves no Ray temp directory; the resumed run shows no
    "ETA nan", and its failing aggregate (a duplicated shard file) prints the error alone, without
    nanobind's leak report."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    data = tiny_job(tmp_path, methods=[{"kind": "rs"}, {"kind": "dds"}], sigmas=[0.5], shard_size=1, n=400)
    config = _write(tmp_path, data)
    ray_tmp = tempfile.mkdtemp(prefix="dp-t-")  # short: Ray's socket paths must fit in 107 bytes
    env = dict(os.environ, RAY_TMPDIR=ray_tmp)
    densepure = [str(Path(sys.executable).parent / "densepure"), "certify", "--config", str(config)]
    # A shell that started the suite in the background ignores SIGINT, and a child inherits an
    # ignored signal (Python then installs no KeyboardInterrupt handler): give the driver the
    # default disposition, as a terminal's foreground process has.
    proc = subprocess.Popen(densepure, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("  [vote] 2/"):
            os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C sends the driver
            break
    output = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, output
    assert "interrupted: finished shards under" in output and "rerun the same command to resume" in output
    assert "Traceback" not in output
    votes = tmp_path / "out" / "votes"
    kept = snapshot(votes)
    assert len(kept) >= 2
    assert os.listdir(ray_tmp) == []
    os.rmdir(ray_tmp)

    rs = votes / "sigma=0.5" / "method=rs"
    (rs / "shard=00099.parquet").write_bytes((rs / "shard=00000.parquet").read_bytes())
    rerun = subprocess.run(densepure, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 1, rerun.stderr[-3000:]
    assert "ETA nan" not in rerun.stderr and "skipped (complete)" in rerun.stderr
    assert "have more than one vote row" in one_error_line(rerun_result(rerun))
    assert "nanobind" not in rerun.stderr and "leaked" not in rerun.stderr, rerun.stderr[-2000:]
    assert all(snapshot(votes)[p] == b for p, b in kept.items())  # finished work intact


class rerun_result:  # noqa: N801 - CliRunner's result shape for one_error_line
    def __init__(self, completed):
        self.output = completed.stdout + completed.stderr


# ------------------------------------------------------------------------------------------
# item 5: checked at plan time, with the fix that helps
# ------------------------------------------------------------------------------------------

def test_a_label_the_classifier_cannot_output_is_refused_at_plan_time(tmp_path):
    """Three label folders, a two-class classifier (its local config.json says 2): refused before
    anything is written or Ray starts, naming the image, the label, the classes and the fixes
    (it used to fail in the workers, suggesting a checkpoint with more classes)."""
    data = tiny_job(tmp_path, methods=[{"kind": "dds"}], sigmas=[0.5])
    image_folder(tmp_path / "data", classes=("c",), per_class=1)  # label 2
    result = runner.invoke(app, ["certify", "--config", str(_write(tmp_path, data))])
    assert result.exit_code == 1
    message = one_error_line(result)
    assert "'c/0.png'" in message and "has label 2" in message and "0..1" in message
    assert "dataset.classes_file" in message and "Ray" not in result.output
    assert not (tmp_path / "out").exists()


def test_rgb_images_for_a_grayscale_diffusion_model_name_dataset_channels(tmp_path):
    """A 1-channel diffusion model and RGB files: refused at plan time with dataset.channels: 1
    (it used to quarantine or stop at every image, suggesting dataset.image_size); with it the
    same command on the same OUT certifies."""
    from model_factory import tiny_ddpm

    data = tiny_job(tmp_path, methods=[{"kind": "dds"}], sigmas=[0.5])
    data["diffusion"]["source"] = str(tiny_ddpm(tmp_path / "models" / "gray", channels=1))
    config = _write(tmp_path, data)
    result = runner.invoke(app, ["certify", "--config", str(config)])
    assert result.exit_code == 1
    message = one_error_line(result)
    assert "3 channel(s), but the diffusion model takes 1: set dataset.channels: 1" in message
    assert not (tmp_path / "out").exists()
    fixed = runner.invoke(app, ["certify", "--config", str(config), "--set", "dataset.channels=1"])
    assert fixed.exit_code == 0, fixed.output
    assert "| 0.5 | dds | 6 |" in fixed.output


# ------------------------------------------------------------------------------------------
# item 1: getting out of a failed run
# ------------------------------------------------------------------------------------------

def test_a_run_that_failed_before_any_vote_takes_the_fix_it_was_given(tmp_path):
    """A corrupt image stops the run before any shard is written (one shard). Doing what the error
    says (remove the image) and correcting the config (another n) on the same OUT plans again
    and certifies: it used to loop on "does not exist" (the stale manifest) and refuse the config
    as "a different config". Once votes exist, a different config is refused naming the way out."""
    data = tiny_job(tmp_path, methods=[{"kind": "rs"}], sigmas=[0.5], shard_size=10)
    bad = tmp_path / "data" / "a" / "1.png"
    bad.write_bytes(b"not a png")
    config = _write(tmp_path, data)
    failed = runner.invoke(app, ["certify", "--config", str(config)])
    assert failed.exit_code == 1
    assert "cannot be decoded" in one_error_line(failed) and "Fix or remove the image" in failed.output
    assert not (tmp_path / "out" / "votes").exists()

    bad.unlink()
    fixed = runner.invoke(app, ["certify", "--config", str(config), "--set", "n=16"])
    assert fixed.exit_code == 0, fixed.output
    assert "| 0.5 | rs | 5 |" in fixed.output
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["n"] == 16

    votes = snapshot(tmp_path / "out" / "votes")
    refused = runner.invoke(app, ["certify", "--config", str(config), "--set", "n=20"])
    assert refused.exit_code == 1
    message = one_error_line(refused)
    assert "fields that differ: n" in message and "choose another --out" in message
    assert str(tmp_path / "out" / "config.yaml") in message  # the stored config that resumes it
    assert snapshot(tmp_path / "out" / "votes") == votes


@pytest.mark.slow  # make test-slow (~25 s): three runs; the default run's 20-minute limit
def test_after_votes_a_removed_image_names_the_way_out_that_keeps_them(tmp_path):
    """Item 1, after voting: the last shard's corrupt image stops the run with two shards voted.
    Removing the image as advised is then "does not exist" (the plan is kept with its votes), and
    the message names the way out that keeps them: on_bad_input=quarantine, which finishes."""
    data = tiny_job(tmp_path, methods=[{"kind": "rs"}], sigmas=[0.5], shard_size=2, workers=1)
    bad = tmp_path / "data" / "b" / "2.png"  # the last image: the third shard
    bad.write_bytes(b"not a png")
    config = _write(tmp_path, data)
    failed = runner.invoke(app, ["certify", "--config", str(config)])
    assert failed.exit_code == 1 and "cannot be decoded" in one_error_line(failed)
    votes = snapshot(tmp_path / "out" / "votes")
    assert len(votes) == 2

    bad.unlink()
    gone = runner.invoke(app, ["certify", "--config", str(config)])
    assert gone.exit_code == 1
    message = one_error_line(gone)
    assert "does not exist" in message and "--set on_bad_input=quarantine" in message
    finished = runner.invoke(app, ["certify", "--config", str(config), "--set", "on_bad_input=quarantine"])
    assert finished.exit_code == 0, finished.output
    assert "1 image(s) quarantined" in finished.output and "| 0.5 | rs | 5 |" in finished.output
    assert all(snapshot(tmp_path / "out" / "votes")[p] == b for p, b in votes.items())  # the votes were kept
