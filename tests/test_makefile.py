"""The Makefile's test targets: `make test-gpu` exists, selects the gpu marker and refuses to
run (rather than pass by skipping) where torch sees no CUDA device."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

MAKEFILE = Path(__file__).resolve().parents[1] / "Makefile"


def recipe(target: str) -> list[str]:
    lines = MAKEFILE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    out = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        out.append(line[1:])
    return out


def test_every_phony_target_has_a_recipe():
    phony = next(line for line in MAKEFILE.read_text().splitlines() if line.startswith(".PHONY:"))
    for target in phony.split(":", 1)[1].split():
        assert any(line.startswith(f"{target}:") for line in MAKEFILE.read_text().splitlines()), target


def test_test_gpu_runs_the_gpu_marker():
    lines = recipe("test-gpu")
    assert lines[-1] == "$(PY) -m pytest -q -m gpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the guard passes where CUDA is present")
def test_test_gpu_fails_clearly_without_a_gpu():
    guard = recipe("test-gpu")[0].lstrip("@").replace("$(PY)", sys.executable)
    run = subprocess.run(["bash", "-c", guard], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "sees no CUDA device" in run.stderr and "docs/testing.md" in run.stderr
