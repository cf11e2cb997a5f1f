"""benchmarks/digits_table.py runs end to end through the pipeline (``--dry-run``: 2 images,
n0=10, n=20, sigma 0.5, three methods, temp dirs; ~30 s, mostly Prefect and Ray start-up).

The real figures come from running the script itself (docs/results/digits.md).
"""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load():
    spec = importlib.util.spec_from_file_location("bench_digits_table", ROOT / "benchmarks" / "digits_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_table_dry_run(capsys):
    mod = load()
    result = mod.main(["--dry-run"])
    rows = {(r["sigma"], r["method"]): r for r in result["rows"]}
    assert set(rows) == {(0.5, "rs-clean"), (0.5, "dds"), (0.5, "densepure-k5-s2")}
    for r in rows.values():
        assert r["images"] == 2 and r["n0"] == 10 and r["n"] == 20
        accs = [r[f"acc_{x:g}"] for x in mod.TABLE_RADII]
        assert all(0.0 <= a <= 1.0 for a in accs) and accs == sorted(accs, reverse=True)
    assert rows[(0.5, "rs-clean")]["unet_calls"] == 0
    assert rows[(0.5, "dds")]["unet_calls"] == rows[(0.5, "dds")]["classifier_calls"] == 30
    dp = rows[(0.5, "densepure-k5-s2")]
    assert dp["unet_no_exit"] == 30 * 5 * 2 and dp["classifier_no_exit"] == 30 * 5
    assert dp["unet_calls"] <= dp["unet_no_exit"] and 0.0 <= dp["unet_saved"] < 1.0
    assert dp["unet_calls"] == 2 * dp["classifier_calls"]  # S = 2 UNet calls per classified purification
    out = capsys.readouterr().out
    assert "### Certified accuracy (%)" in out and "### Exact early exit (DensePure)" in out
    line = dict(kv.split("=", 1) for kv in out.strip().splitlines()[-1].split())
    assert line["images"] == "2" and line["n"] == "20"
    assert 0.0 <= float(line["densepure_k5_s2_acc_r0.5_s0.5"]) <= 1.0
    assert "dds_acc_r0_s0.5" in line


def test_radius_cap_and_interval():
    mod = load()
    assert abs(mod.radius_cap(1.0, 500, 0.001) - 2.2055) < 1e-3
    lo, hi = mod.proportion_ci(30, 60)
    assert 0.36 < lo < 0.37 and 0.63 < hi < 0.64
