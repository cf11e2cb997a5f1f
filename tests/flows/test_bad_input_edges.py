"""Bad input at the edges (issue 15, items 1-4), through the real CLI: one ``error:`` line naming
the input and the fix, a non-zero exit, and nothing under OUT touched."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from cli_checks import one_error_line, snapshot
from model_factory import tiny_job
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


@pytest.mark.parametrize("case", ["directory", "binary", "duplicate-key", "not-a-mapping"])
def test_a_bad_config_file_is_one_line_naming_the_file(case, tmp_path):
    path = tmp_path / "job.yaml"
    if case == "directory":
        path.mkdir()
    elif case == "binary":
        path.write_bytes(b"\xff\xfe\x00binary\x00")
    elif case == "duplicate-key":
        path.write_text("n0: 10\nn: 100\nn: 500\n")
    else:
        path.write_text("- a list\n- not fields\n")
    result = runner.invoke(app, ["certify", "--config", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    message = one_error_line(result)
    assert str(path) in message
    fix = {"directory": "pass a YAML file", "binary": "not UTF-8", "duplicate-key": "found the key 'n' twice",
           "not-a-mapping": "not a mapping"}[case]
    assert fix in message
    assert not (tmp_path / "out").exists()


def _manifest_job(tmp_path, labels, *, garbage=False):
    data = tiny_job(tmp_path)
    images = sorted((tmp_path / "data").rglob("*.png"))
    manifest = tmp_path / "manifest.parquet"
    if garbage:
        manifest.write_bytes(b"this is, not parquet\n1,2,3\n")
    else:
        pq.write_table(pa.table({"image_id": [f"{p.parent.name}/{p.name}" for p in images],
                                 "uri": [str(p) for p in images],
                                 "label": pa.array(labels + [labels[0] if labels else 0] * (len(images) - len(labels)))}), manifest)
    data["dataset"] = {"kind": "manifest", "path": str(manifest), "image_size": 8}
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(data))
    return config, tmp_path / "out", manifest


@pytest.mark.parametrize("labels,expected", [
    ([0, None], "column 'label' holds"),
    (["0", "cat"], "holds 'cat'"),
    ([0, 1, -3], "holds -3"),
    ([0, 1.5], "holds 1.5"),
])
def test_bad_manifest_labels_are_refused_at_plan_time_naming_the_row(labels, expected, tmp_path):
    config, out, manifest = _manifest_job(tmp_path, labels)
    out.mkdir()
    (out / "finished.txt").write_text("earlier work")
    before = snapshot(out)
    result = runner.invoke(app, ["certify", "--config", str(config)])
    assert result.exit_code != 0
    message = one_error_line(result)
    assert str(manifest) in message and expected in message and "row" in message
    assert "fix the label column" in message
    assert snapshot(out) == before  # nothing planned, nothing voted, nothing removed


def test_a_manifest_that_is_not_parquet_names_the_file(tmp_path):
    config, out, manifest = _manifest_job(tmp_path, [], garbage=True)
    result = runner.invoke(app, ["certify", "--config", str(config)])
    assert result.exit_code != 0
    message = one_error_line(result)
    assert str(manifest) in message and "cannot be read as Parquet" in message and "CSV file" in message
    assert not out.exists()


def test_a_manifest_uri_that_never_existed_is_refused_at_plan_time(tmp_path):
    """Item 5: checked before anything is written (local files: one stat each), naming the file,
    where relative URIs are resolved from, and both ways out."""
    config, out, manifest = _manifest_job(tmp_path, [0])
    table = pq.read_table(manifest).to_pydict()
    table["uri"][2] = "no/such/image.png"  # relative: resolved against the manifest's directory
    pq.write_table(pa.table(table), manifest)
    result = runner.invoke(app, ["certify", "--config", str(config)])
    assert result.exit_code != 0
    message = one_error_line(result)
    assert str(tmp_path / "no/such/image.png") in message
    assert "resolved against the manifest's directory" in message and "on_bad_input: quarantine" in message
    assert not out.exists()


@pytest.mark.slow  # make test-slow (~20 s): two full runs per policy; the default run's 20-minute limit
def test_a_decompression_bomb_and_a_float_tiff_are_bad_inputs_under_both_policies(tmp_path):
    """Item 6 (and issue 17's float TIFF): a per-image decode failure is a bad input: quarantined
    under `quarantine` (the run goes on), one clear error under `fail`."""
    from PIL import Image

    data = tiny_job(tmp_path, methods=[{"kind": "rs"}], sigmas=[0.5], on_bad_input="quarantine")
    bomb = tmp_path / "data" / "a" / "1.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 4e8 pixels: over twice Pillow's limit, ~50 kB on disk
    floaty = tmp_path / "data" / "b" / "2.tif"
    (tmp_path / "data" / "b" / "2.png").unlink()
    Image.new("F", (8, 8), 0.5).save(floaty)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["certify", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "2 image(s) quarantined" in result.output
    errors = runner.invoke(app, ["sql", data["out"], "SELECT image_id, error FROM errors ORDER BY 1", "--format", "csv"])
    assert "a/1.png" in errors.output and "decompression bomb" in errors.output
    assert "b/2.tif" in errors.output and "mode F" in errors.output

    data["on_bad_input"], data["out"] = "fail", str(tmp_path / "out-fail")
    config.write_text(yaml.safe_dump(data))
    failed = runner.invoke(app, ["certify", "--config", str(config)])
    assert failed.exit_code != 0
    message = one_error_line(failed)
    assert ("decompression bomb" in message or "mode F" in message) and "on_bad_input: quarantine" in message
