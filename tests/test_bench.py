"""The benchmark suite cannot rot: its quick mode runs here, writes rows, and the report renders them."""
import csv

import pytest
import torch

from bench import __main__ as bench_cli
from bench import report, results
from bench.suite import disagreement


def test_quick_run_writes_rows_and_the_report_renders_them(tmp_path, capsys):
    out = tmp_path / "quick.csv"
    # A small slice of the quick suite keeps this fast; Triton runs in the interpreter (tests/conftest.py).
    code = bench_cli.main(["--quick", "--losses", "kd,rkd,at", "--peers", "eager,liger,triton,cuda",
                           "--passes", "fwd,fwd+bwd", "--out", str(out)])
    assert code == 0
    assert "[1/" in capsys.readouterr().out  # progress, one line per case
    rows = list(csv.DictReader(out.open()))
    assert rows and set(results.COLUMNS) <= set(rows[0])
    by_peer = {row["peer"]: row for row in rows}
    assert by_peer["eager"]["status"] == "ok" and float(by_peer["eager"]["median_ms"]) > 0
    assert by_peer["cuda"]["status"].startswith("unavailable: ")  # never a crash, always a reason
    assert by_peer["liger"]["status"].startswith("unavailable: ")
    if not torch.cuda.is_available():
        assert all(row["mode"] == "quick" and row["device"].startswith("cpu") for row in rows)

    markdown = tmp_path / "README.md"
    assert report.main(["--csv", str(out), "--md", str(markdown), "--no-plots"]) == 0
    text = markdown.read_text()
    assert "| shape | dtype | pass | peer | ms |" in text and "### kd" in text


def test_full_suite_without_a_gpu_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert bench_cli.main(["--losses", "kd"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_a_peer_that_disagrees_is_caught():
    grad = torch.ones(3, 4)
    assert disagreement((1.0, grad), (1.0, grad)) == 0
    assert disagreement((1.0, grad), (1.1, grad)) == pytest.approx(0.1)
    assert disagreement((1.0, grad), (1.0, grad * 1.5)) == pytest.approx(0.5)
    assert disagreement((1.0, grad), (float("nan"), grad)) == float("inf")
