"""Assertions shared by the CLI tests of bad input: one ``error:`` line, and OUT untouched."""

from pathlib import Path


def snapshot(root: Path) -> dict[Path, bytes]:
    """Every file under ``root`` with its bytes ({} when root does not exist)."""
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} if root.exists() else {}


def one_error_line(result) -> str:
    """The run's ``error:`` message (from the line on); asserts it is printed once, and only once."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.output
    message = result.output[result.output.index("error:"):]
    # said once: Prefect's own error records stay off the console (issue 15, item 7). The whole
    # line is counted: its first words may be a path the run's header line names too.
    assert result.output.count(message.splitlines()[0][len("error: "):]) == 1, result.output
    assert "Traceback" not in result.output, result.output
    return message
