"""tasks/certify/report.py: report.md, the plot, the CLI accuracy table and Cohen-style TSV export."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from votes_factory import hand_votes, make_votes, write_votes

from tasks.certify.aggregate import aggregate
from tasks.certify.report import TSV_HEADER, ReportError, export_tsv, format_accuracy_table, write_report

SECONDS = [1.5, 2.0, 0.25, 3600.5, 1.0, 61.0]  # per image a..f


@pytest.fixture
def hand_out(tmp_path):
    hand_votes(tmp_path, seconds=SECONDS, k=2, steps=3)
    aggregate(str(tmp_path), alpha=0.001, radii=[0, 0.5, 1.0, 1.5])
    return tmp_path


def test_report_holds_the_accuracy_table_and_the_costs(hand_out):
    md = write_report(str(hand_out), title="Hand example")
    assert (hand_out / "report.md").read_text() == md
    assert md.startswith("# Hand example\n")
    assert "- alpha: 0.001 " in md and "- run: `run-test`" in md
    # certified accuracy (%) at Cohen's radii over the 5 labeled images
    assert ("| sigma | method | images | r = 0 | r = 0.5 | r = 1 | r = 1.5 | r = 2 | r = 2.5 "
            "| r = 3 |") in md
    assert "| 0.5 | dds | 5 | 40.0 | 40.0 | 20.0 | 0.0 | 0.0 | 0.0 | 0.0 |" in md
    # 6 images, 2 abstained; n0 varies (10..100), n = 1000, K = 2, S = 3; calls and seconds means
    calls = sum((n0 + 1000) * 2 for n0 in (100, 100, 100, 100, 10, 10)) / 6
    row = (f"| 0.5 | dds | 6 | - | 0 | 0 | 33.3 | 10-100 | 1000 | 2 | 3 | {calls * 3:,.0f} "
           f"| {calls:,.0f} | {sum(SECONDS) / 6:.3g} | {sum(SECONDS):,.0f} |")
    assert row in md
    assert "Partial results" not in md
    png = (hand_out / "certified_accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    assert "![certified accuracy vs radius](certified_accuracy.png)" in md


def test_report_says_how_many_images_are_missing(tmp_path):
    write_votes(str(tmp_path), make_votes(6, 3, sigma=0.5))
    aggregate(str(tmp_path), alpha=0.001, expected={(0.5, "dds"): 8, (1.0, "dds"): 3},
              allow_partial=True)
    md = write_report(str(tmp_path))
    assert "**Partial results: 5 expected image(s) have no votes.**" in md
    assert "> - sigma=0.5, dds: 6 of 8 images (2 missing)" in md
    assert "> - sigma=1, dds: 0 of 3 images (3 missing)" in md
    assert "| 0.5 | dds | 6 | 8 | 2 |" in md and "| 1 | dds | 0 | 3 | 3 |" in md


def test_report_needs_the_tables(tmp_path):
    write_votes(str(tmp_path), make_votes(3, 3))
    with pytest.raises(ReportError, match="holds no densepure run"):
        write_report(str(tmp_path))
    (tmp_path / "config.yaml").write_text("n: 10\n")  # a plan, votes, no tables yet
    with pytest.raises(ReportError, match="run the aggregate stage first: rerun `densepure certify`"):
        write_report(str(tmp_path))


def test_format_accuracy_table_is_pinned(hand_out):
    text = format_accuracy_table(pq.read_table(hand_out / "tables" / "accuracy.parquet"))
    assert text == (
        "certified accuracy (%) at L2 radius r\n"
        "sigma  method  images   r=0  r=0.5   r=1  r=1.5\n"
        "-----  ------  ------  ----  -----  ----  -----\n"
        "  0.5  dds          5  40.0   40.0  20.0    0.0")
    rows = [{"sigma": 0.25, "method": "dds", "radius": 0.0, "certified_accuracy": None,
             "images": 0}]
    assert format_accuracy_table(rows).splitlines()[-1] == " 0.25  dds          0    -"


def test_export_tsv_is_cohen_format(hand_out, tmp_path_factory):
    (path,) = export_tsv(str(hand_out))
    assert path == str(hand_out / "tsv" / "sigma=0.5_method=dds.tsv")
    assert open(path).read() == (
        "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
        "a\t1\t1\t0.889\t1\t0:00:01.500000\n"
        "b\t0\t-1\t0.0\t0\t0:00:02\n"
        "c\t2\t2\t1.23\t1\t0:00:00.250000\n"
        "d\t2\t-1\t0.0\t0\t1:00:00.500000\n"
        "e\t1\t0\t1.23\t0\t0:00:01\n"
        "f\t-1\t1\t1.23\t0\t0:01:01\n")
    assert TSV_HEADER == "idx\tlabel\tpredict\tradius\tcorrect\ttime"
    dest = tmp_path_factory.mktemp("elsewhere")
    assert export_tsv(str(hand_out), str(dest)) == [str(dest / "sigma=0.5_method=dds.tsv")]
