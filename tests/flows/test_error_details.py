"""An unexpected failure of a run: its type and message on the error line, its traceback in a log
file under OUT named there (issue 15 item 7)."""

import yaml
from cli_checks import one_error_line
from model_factory import addt_job
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def test_an_unexpected_failure_leaves_its_traceback_in_a_log_under_out_named_in_the_error(tmp_path, monkeypatch):
    """A known refusal is one line; an unexpected error is its type and message, with the whole
    traceback written to OUT/logs/ (issue 15 item 7: "the details belong in a log file under OUT")."""
    import flows.train_addt as flow_module
    from tasks.train_addt.train import plan_training

    def plan_then_break(cfg, out):
        plan_training(cfg, out)  # OUT holds a run from here on
        raise RuntimeError("a bug deep inside")

    monkeypatch.setattr(flow_module, "plan_training", plan_then_break)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(addt_job(tmp_path)))
    result = runner.invoke(app, ["train-addt", "--config", str(config)])
    assert result.exit_code == 1
    message = one_error_line(result)
    assert message.startswith("error: RuntimeError: a bug deep inside (details: ")
    logs = list((tmp_path / "out" / "logs").glob("error-*.log"))
    assert len(logs) == 1 and str(logs[0]) in message
    text = logs[0].read_text()
    assert "Traceback" in text and "plan_then_break" in text and "a bug deep inside" in text
