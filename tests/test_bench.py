"""The benchmark suite's --quick mode end to end on the CPU: rows written with every column, statuses
that say why a peer did not run, a report that renders; and the full suite refusing to run without a GPU."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import suite  # noqa: E402
from bench.results import COLUMNS  # noqa: E402


def run_bench(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def quick_csv(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.csv"
    # Under the interpreter the Triton peer runs (slowly): two small cases keep this to seconds.
    done = run_bench("--quick", "--losses", "kd,at", "--shapes", "image,resnet", "--out", str(out),
                     env={"TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    return out, done.stdout


def test_quick_rows_have_every_column(quick_csv):
    out, stdout = quick_csv
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    peers = ("eager", "compile", "liger", "triton", "cuda")
    assert len(rows) == 2 * len(peers) * 3  # 2 cases x peers x passes
    assert {r["pass"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    assert "[1/2] kd 64x100 float32" in stdout  # one progress line per case
    for row in rows:
        # "ok (bwd = fwd+bwd - fwd: ...)": fastkd's kernel losses cannot be backpropagated twice, so their
        # backward is timed as a whole step less its forward.
        assert row["status"] in ("ok", suite.DERIVED_BWD) or row["status"].startswith(
            ("unavailable: ", "mismatch: ", "error: ")), row
        assert row["date"] and row["commit"] and row["device"] and row["torch"] and row["fastkd"]
        assert int(row["min_bytes"]) > 0
        if row["status"] == "ok":
            assert float(row["median_ms"]) > 0 and float(row["gbps"]) > 0 and float(row["pct_copy_bw"]) > 0
            assert row["peak_mb"] == ""  # no memory counter on a CPU
    eager = [r for r in rows if r["peer"] == "eager"]
    assert all(r["status"] == "ok" and float(r["max_err"]) == 0 for r in eager)
    compiled = {r["status"] for r in rows if r["peer"] == "compile"}
    assert all(s.startswith("unavailable: skipped in --quick on CPU") for s in compiled)
    liger_at = {r["status"] for r in rows if r["peer"] == "liger" and r["loss"] == "at"}
    assert liger_at == {"unavailable: liger-kernel has no at_loss equivalent"}
    kd_min = {r["pass"]: int(r["min_bytes"]) for r in eager if r["loss"] == "kd"}
    assert kd_min == {"fwd": 2 * 64 * 100 * 4, "bwd": 64 * 100 * 4, "fwd+bwd": 3 * 64 * 100 * 4}


def test_report_renders_a_table(quick_csv, tmp_path):
    out, _ = quick_csv
    md = tmp_path / "README.md"
    done = run_bench("report", "--csv", str(out), "--md", str(md), "--no-plots")
    assert done.returncode == 0, done.stderr
    text = md.read_text()
    assert "| shape | dtype | pass | peer | ms | x eager | x compile | % floor | peak MB | max err |" in text
    assert "| 64x100 | float32 | fwd+bwd | eager |" in text
    assert "### at" in text and "Not timed:" in text


def test_triton_peer_says_why_without_the_interpreter(tmp_path):
    out = tmp_path / "q.csv"
    done = run_bench("--quick", "--losses", "kd", "--shapes", "image", "--peers", "eager,triton", "--passes", "fwd",
                     "--out", str(out), env={"TRITON_INTERPRET": "0"})
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(open(out, newline="")))
    triton = [r for r in rows if r["peer"] == "triton"]
    assert len(triton) == 1 and triton[0]["status"].startswith("unavailable: ")
    assert "TRITON_INTERPRET" in triton[0]["status"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_full_suite_without_gpu_exits_nonzero():
    done = run_bench("--losses", "kd")
    assert done.returncode != 0
    assert "needs a CUDA GPU" in done.stderr


def test_list_and_bad_arguments():
    done = run_bench("--list", "--losses", "rkd")
    assert done.returncode == 0 and "rkd 4096x2048 float32" in done.stdout and len(done.stdout.splitlines()) == 12
    assert run_bench("--losses", "nope", "--quick").returncode != 0
    assert run_bench("--peers", "nope", "--quick").returncode != 0


def test_a_peer_that_disagrees_is_caught():
    from bench.suite import disagreement
    grad = torch.ones(3, 4)
    assert disagreement((1.0, grad), (1.0, grad)) == 0
    assert disagreement((1.0, grad), (1.1, grad)) == pytest.approx(0.1)
    assert disagreement((1.0, grad), (1.0, grad * 1.5)) == pytest.approx(0.5)
    assert disagreement((1.0, grad), (float("nan"), grad)) == float("inf")


def test_gpu_check_dry_run_lists_every_step(tmp_path):
    """`bash bench/gpu_check.sh --dry-run` (how CI runs it): steps, commands and limits, imports, the benchmark
    plan and the test collection checked, nothing written, exit 0."""
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                          timeout=180, env={**os.environ, "PYTHON": sys.executable,
                                            "FASTKD_RESULTS_DIR": str(tmp_path / "results")})
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for n in range(6):
        assert f"=== step {n}: " in out, n
    limits = [int(x) for x in __import__("re").findall(r"=== step \d: .* \(limit (\d+) s\)", out)]
    assert len(limits) == 6 and sum(limits) < 8 * 60
    for command in ("-m bench.gpu_check preflight --dry-run", "-m fastkd build-cuda", "-m pytest -q tests",
                    "-m bench report --csv", "-m bench.gpu_check summary"):
        assert command in out, command
    assert "imports ok: " in out and "tests collected" in out and "nvcc: " in out
    for case in ("kd 8192x128256 bfloat16", "kl_forward 8192x128256 bfloat16", "jsd 8192x128256 bfloat16",
                 "rkd 1024x512 float32", "rkd 4096x2048 float32", "at 256x64x56x56 bfloat16", "at 256x512x7x7 bfloat16"):
        assert f"case: {case}" in out, case
    assert out.count("--peers eager,compile,liger,triton,cuda") == 3 and "--passes fwd+bwd" in out
    assert "dry run ok" in out
    assert not (tmp_path / "results").exists()  # a dry run writes nothing


def test_gpu_check_summary_reads_the_results(tmp_path):
    from bench.gpu_check import headline, test_counts
    from bench.results import append_rows
    env = {"date": "2026-01-01T00:00:00Z", "mode": "full", "device": "NVIDIA H200", "loss": "kd",
           "shape": "8192x128256", "dtype": "bfloat16", "pass": "fwd+bwd"}
    times = {"eager": 40.0, "compile": 20.0, "liger": "", "triton": 10.0, "cuda": 8.0}
    append_rows(tmp_path / "r.csv", [
        {**env, "peer": peer, "median_ms": ms, "peak_mb": 100.0 if ms else None, "pct_copy_bw": 80.0 if ms else None,
         "status": "ok" if ms else "unavailable: liger-kernel not installed"} for peer, ms in times.items()])
    lines = headline(tmp_path / "r.csv")
    triton = next(line for line in lines if " triton " in line).split()
    assert triton[3:11] == ["triton", "10.000", "4x", "2x", "-", "80.0", "100", "100"]
    cuda = next(line for line in lines if " cuda " in line).split()
    assert cuda[5:7] == ["5x", "2.5x"]
    assert headline(tmp_path / "missing.csv")[0].startswith("no benchmark rows")

    log = tmp_path / "pytest.log"
    log.write_text("....s.F [ 50%]\nFAILED tests/test_x.py::test_y - boom\n3 failed, 10 passed, 2 skipped in 9.1s\n")
    assert test_counts(log) == ({"failed": 3, "passed": 10, "skipped": 2}, ["tests/test_x.py::test_y"], True)
    log.write_text("....s.F [ 50%]\n..ss\n")  # cut short by its time limit: no summary line
    assert test_counts(log) == ({"passed": 7, "failed": 1, "skipped": 3, "error": 0}, [], False)


def test_report_without_csv_reads_what_the_last_run_wrote(quick_csv, tmp_path, monkeypatch, capsys):
    """`python -m bench --quick` then `python -m bench report`: the report reads quick.csv (the newer of the two
    default files), says which, writes beside it, and says that the CPU plots are single points."""
    from bench import report
    full, quick = tmp_path / "results.csv", tmp_path / "quick.csv"
    monkeypatch.setattr(report, "DEFAULT_OUT", full)
    monkeypatch.setattr(report, "QUICK_OUT", quick)
    assert report.main(["--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "no results yet" in err and "python -m bench --quick" in err

    quick.write_text(quick_csv[0].read_text())
    assert report.main(["--no-plots"]) == 0
    out = capsys.readouterr().out
    assert f"reading {quick}" in out and "single points" in out
    assert "| 64x100 | float32 | fwd+bwd | eager |" in (tmp_path / "README.md").read_text()

    full.write_text(quick_csv[0].read_text())  # now the newer one
    os.utime(quick, (1, 1))
    assert report.default_csv() == full


def test_quick_run_says_its_plots_are_single_points(quick_csv):
    _, stdout = quick_csv
    assert "`python -m bench report`" in stdout
    assert "single points" in stdout


def test_cpu_reference_prints_time_and_memory_of_both():
    """`python -m bench.cpu_reference` at a tiny shape: one row per thread count, loss and dtype, with both times,
    their ratio and the memory columns."""
    done = subprocess.run([sys.executable, "-m", "bench.cpu_reference", "--shape", "2x8x100", "--losses", "kl,jsd",
                           "--dtypes", "float32", "--threads", "1", "--reps", "1", "--rounds", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1].split() == ["threads", "loss", "dtype", "reference", "s", "plain", "s", "ratio", "ref", "peak",
                                "plain", "peak", "ref", "saved", "plain", "saved"]
    rows = [line.split() for line in lines[2:]]
    assert [r[:3] for r in rows] == [["1", "kl", "float32"], ["1", "jsd", "float32"]]
    for r in rows:
        assert float(r[3]) > 0 and float(r[4]) > 0 and len(r) == 10


def test_bwd_of_a_graph_that_cannot_be_replayed_is_derived():
    """A loss whose graph refuses a second backward (fastkd's kernel losses) gets its bwd time as a whole
    step less its forward, with a status that says so, instead of an error row."""
    class Once(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            ctx.done = False
            return (x * x).sum()

        @staticmethod
        def backward(ctx, grad):
            if ctx.done:
                raise RuntimeError("this fastkd loss is once-differentiable: ...")
            ctx.done = True
            x, = ctx.saved_tensors
            return 2 * x * grad

    sets = [(torch.randn(64, 100, requires_grad=True),) for _ in range(2)]
    ms, peak, status = suite.time_pass(Once.apply, sets, "bwd", "cpu", quick=True)
    assert status == suite.DERIVED_BWD and ms >= 0 and peak is None
    ms, _, status = suite.time_pass(lambda x: (x * x).sum(), sets, "bwd", "cpu", quick=True)
    assert status == "ok" and ms > 0
