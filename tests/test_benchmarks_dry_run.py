"""The benchmark scripts run end to end (``--dry-run``: tiny random models, a few seconds each).

The real figures come from running the scripts themselves (docs/performance.md); these tests
only keep the scripts from rotting: imports, argument handling, every code path, the summary line.
"""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def last_line(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return dict(kv.split("=", 1) for kv in out[-1].split())


def test_engine_benchmark_dry_run(capsys):
    result = load("engine").main(["--dry-run"])
    assert result["counts_identical"] is True
    assert result["unet_calls_engine"] + 2 * result["votes_skipped"] == result["unet_calls_ref"]  # S = 2
    line = last_line(capsys)
    assert line["counts_identical"] == "True" and float(line["speedup"]) > 0


def test_engine_benchmark_dry_run_with_switches(capsys):
    result = load("engine").main(["--dry-run", "--noise-device", "device", "--pad-batches", "--channels-last"])
    assert result["counts_identical"] is True  # the reference loop draws the same (cpu) noise: check
    capsys.readouterr()


def test_gpu_benchmark_dry_run(capsys, tmp_path):
    out = tmp_path / "gpu.json"
    results = load("gpu_models").main(["--dry-run", "--json", str(out)])
    assert out.is_file()
    assert {r["mode"] for r in results["unet"]} == {"fp32", "bf16-autocast", "bf16"}
    assert results["certify"]["copies"] == 2 and results["certify"]["copies_per_s"] > 0
    line = last_line(capsys)
    assert line["dry_run"] == "True" and line["unet_target_met"] == "None"


def test_gpu_benchmark_refuses_a_missing_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(SystemExit, match="no CUDA device"):
        load("gpu_models").main(["--sections", "matmul"])


def test_adaptive_benchmark_dry_run(capsys):
    summary = load("adaptive").main(["--dry-run"])
    out = capsys.readouterr().out
    # every part ran: the two simulated distributions, validity, re-certification, three methods
    for part in ("matched (digits DDS, sigma 0.5)", "broad mixture", "== Validity", "== Re-certification",
                 "dds sigma=0.5", "rs sigma=0.5", "densepure sigma=0.5", "rule before issue 25"):
        assert part in out, part
    assert summary["validity_ok"] and summary["dry_run"]
    for method in ("dds", "rs", "densepure"):
        assert summary[f"{method}_s0.5_engine_checked"] == 1  # the engine agreed with the replay
        assert float(summary[f"{method}_s0.5_grid_fewer_calls"]) >= 1
    line = last_line_of(out)
    assert line["dry_run"] == "True" and float(line["sim_broad_fewer_calls"]) >= 1


def test_digits_attacks_benchmark_dry_run(capsys):
    result = load("digits_attacks").main(["--dry-run"])
    assert result["images"] == 2 and result["partitions"] == 7  # none + 2 purifiers x 3 attacks, 1 threat
    out = capsys.readouterr().out
    assert "worst (last, M=2)" in out and "worst (any, M'=3)" in out and "exact only" in out and "K=2 only" in out
    assert "union + targeted" in out and "load average" in out
    assert last_line_of(out)["dry_run"] == "True"


def last_line_of(text: str) -> dict:
    return dict(kv.split("=", 1) for kv in text.strip().splitlines()[-1].split())


def test_undefended_digits_benchmark_dry_run(capsys):
    result = load("undefended_digits").main(["--dry-run"])
    assert result["images"] == 20 and 0 <= result["short_10"] and result["short_8"] <= result["clean"]
    for e in (8, 10):  # a union of attacks never leaves more than any of its members
        assert result[f"union_targeted_{e}"] <= result[f"union_{e}"] <= result[f"long_{e}"]
    assert last_line_of(capsys.readouterr().out)["dry_run"] == "True"


def test_cgpo_effect_benchmark_dry_run(capsys):
    (row,) = load("cgpo_effect").main(["--dry-run"])
    assert row["t"] == 100 and row["images"] == 4 and 0 < row["lambda"] < 0.3
    assert row["fresh"] == pytest.approx(row["random"] + row["fresh_gain"])
    out = capsys.readouterr().out
    assert "CGPO fresh noise" in out and last_line_of(out)["dry_run"] == "True"


@pytest.mark.slow
def test_digits_addt_benchmark_dry_run(capsys):
    """Train (2 steps), attack and certify both models through the three flows (~2 min: three
    local Rays and Prefect runs, hence slow; `make test-slow`)."""
    result = load("digits_addt").main(["--dry-run"])
    line = last_line(capsys)
    assert line["dry_run"] == "True" and line["train_steps"] == "2" and result["final_loss"] > 0


def test_run_store_benchmark_dry_run(capsys):
    result = load("run_store").main(["--dry-run"])
    assert result["runs"] == 5 and result["files"] == 5 * 24
    out = capsys.readouterr().out
    assert "complete,4\nfailed,1" in out and "[accuracy]" in out and "5 rows" in out
