"""Issue 22 item 7 through the CLI: messages that used to mislead now say what is there and what to do.

None of these runs a job: each message comes before (or instead of) any Ray or GPU work.
"""

import pyarrow as pa
import pytest
import yaml
from cli_checks import one_error_line
from model_factory import attack_job, tiny_job
from typer.testing import CliRunner
from votes_factory import make_votes, write_votes

from flows.cli import app

runner = CliRunner()


def test_export_tsv_on_an_attack_or_training_out_says_what_it_holds(tmp_path):
    for job, view in (("attack", "attacks"), ("train-addt", "train_metrics")):
        out = tmp_path / job
        out.mkdir()
        (out / "config.yaml").write_text(yaml.safe_dump({"job": job}))
        result = runner.invoke(app, ["export-tsv", str(out)])
        assert result.exit_code == 1
        message = one_error_line(result)
        assert f"holds an {'attack evaluation' if job == 'attack' else 'ADDT training run'} (densepure {job})" \
            in message and f"SELECT * FROM {view}" in message and "certify" not in message.split("densepure sql")[0]


def test_sql_on_a_view_the_out_lacks_lists_the_views_it_has(tmp_path):
    write_votes(str(tmp_path), make_votes(3, 2))
    result = runner.invoke(app, ["sql", str(tmp_path), "SELECT * FROM train_metrics"])
    assert result.exit_code == 1
    assert "train_metrics does not exist" in result.output and "the views: runs, votes." in result.output
    assert "pg_views" not in result.output


def test_a_missing_checkpoint_is_named_before_model_name_is_asked_for(tmp_path):
    data = tiny_job(tmp_path, methods=[{"kind": "rs"}], sigmas=[0.5])
    data["classifier"] = {"source": str(tmp_path / "missing.pt")}
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["certify", "--config", str(config)])
    assert result.exit_code == 1
    message = one_error_line(result)
    assert "missing.pt': no such file; check the path" in message and "model_name" not in message
    assert not (tmp_path / "out").exists()


def test_a_set_typo_is_reported_against_set_with_the_closest_field(tmp_path):
    result = runner.invoke(app, ["config", "show", "--set", "sigmass=[0.5]", "--set", "methods.0.kk=3"])
    assert result.exit_code == 2
    assert "--set sigmass: no such field; did you mean sigmas?" in result.output
    assert "--set methods.0.kk: no such field; did you mean k?" in result.output
    assert "presets" not in result.output  # not blamed on the packaged YAML


@pytest.mark.parametrize("value, ok", [("0.5/1", True), ("4/255", True), ("1/zero", False)])
def test_fractions_name_their_field(value, ok):
    result = runner.invoke(app, ["config", "show", "--config", "attack_default", "--set",
                                 f"attacks.0.step_size={value}"])
    assert (result.exit_code == 0) == ok, result.output
    if not ok:
        assert "step_size '1/zero'" in result.output and "eps" not in result.output


def test_flags_show_no_value_in_help_and_sql_help_names_every_view_and_udf():
    from tasks.common.sqlfuncs import UDFS

    certify = runner.invoke(app, ["certify", "--help"])
    assert "--allow-partial" in certify.output and "<bool>" not in certify.output
    sql = " ".join(runner.invoke(app, ["sql", "--help"]).output.split())
    for name in ("votes", "certificates", "accuracy", "attacks", "attack_summary", "train_metrics", "errors",
                 *UDFS):
        assert name in sql, name


def test_the_attack_header_says_which_partitions_do_not_apply(tmp_path):
    from tasks.common.lease import Lease
    from tasks.common.run_dir import RunDir

    data = attack_job(tmp_path)  # 2 defenses x 1 threat x 3 attacks; dwbox and bpda skip the bare classifier
    config = tmp_path / "a.yaml"
    config.write_text(yaml.safe_dump(data))
    with Lease(RunDir(data["out"]), "another attack", ttl=60):  # the run stops right after its header
        result = runner.invoke(app, ["attack", "--config", str(config)])
    assert "(2 defenses x 1 threats x 3 attacks = 6, less 2 that do not apply (dwbox and bpda on the bare " \
           "classifier): 4 partitions, M=3)" in result.output
    assert "in use by another run: another attack" in one_error_line(result)


def test_threats_sort_by_norm_and_radius_not_by_label():
    import duckdb

    from tasks.attack.summary_sql import SUMMARY_SQL
    from tasks.common.sqlfuncs import register_udfs

    rows = [{"run_id": "r", "defense": "none", "threat": t, "norm": "linf", "eps": e / 255, "attack": "pgd",
             "clean_mean": 1.0, "adv_mean": 0.0, "clean_majority": True, "adv_majority": False,
             "clean_worst": True, "adv_worst": False, "broken_at_majority": -1, "broken_at_worst": 1,
             "gradient_calls": 1, "unet_calls": 0, "seconds": 1.0}
            for t, e in (("linf-32", 32), ("linf-8", 8), ("linf-16", 16))]
    con = duckdb.connect()
    register_udfs(con)
    con.register("attacks", pa.Table.from_pylist(rows))
    threats = [r[0] for r in con.sql(f"SELECT threat FROM ({SUMMARY_SQL}) WHERE rule = 'mean'").fetchall()]
    assert threats == ["linf-8", "linf-16", "linf-32"]
