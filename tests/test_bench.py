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
    assert len(rows) == 2 * len(peers) * 4  # 2 cases x peers x passes
    assert {r["pass"] for r in rows} == {"fwd-nograd", "fwd", "bwd", "fwd+bwd"}
    assert "[1/2] kd 64x100 float32" in stdout  # one progress line per case
    for row in rows:
        # "ok (bwd = fwd+bwd - fwd: ...)": fastkd's kernel losses cannot be backpropagated twice, so their
        # backward is timed as a whole step less its forward.
        assert row["status"] in ("ok", suite.DERIVED_BWD) or row["status"].startswith(
            ("unavailable: ", "mismatch: ", "error: ")), row
        assert row["date"] and row["commit"] and row["device"] and row["torch"] and row["fastkd"]
        assert int(row["min_bytes"]) > 0
        assert row["flops"] == row["tflops"] == row["pct_mm"] == row["mm_tflops"] == ""  # fused cases only
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
    assert kd_min == {"fwd-nograd": 2 * 64 * 100 * 4, "fwd": 2 * 64 * 100 * 4, "bwd": 64 * 100 * 4,
                      "fwd+bwd": 3 * 64 * 100 * 4}
    # The path bytes: fastkd's own peers on the logit losses only (64 x 100 float32: one Triton block).
    for row in rows:
        if row["peer"] in ("triton", "cuda") and row["loss"] == "kd":
            assert row["path_bytes"] != "", row
        else:
            assert row["path_bytes"] == row["pct_path"] == "", row
    triton_kd = {r["pass"]: r for r in rows if r["peer"] == "triton" and r["loss"] == "kd"}
    elements = 64 * 100 * 4
    assert {p: int(r["path_bytes"]) for p, r in triton_kd.items()} == {
        "fwd-nograd": 2 * elements, "fwd": 3 * elements, "bwd": 0, "fwd+bwd": 3 * elements}
    for pass_, row in triton_kd.items():
        if row["status"] == "ok" and pass_ != "bwd":
            assert float(row["pct_path"]) == pytest.approx(
                100 * int(row["path_bytes"]) / (float(row["median_ms"]) * 1e6) / float(row["copy_gbps"]), rel=1e-3)
    # CUDA C++ stages the row pair in shared memory: the same bytes as Triton's one block.
    cuda_kd = {r["pass"]: int(r["path_bytes"]) for r in rows if r["peer"] == "cuda" and r["loss"] == "kd"}
    assert cuda_kd == {"fwd-nograd": 2 * elements, "fwd": 3 * elements, "bwd": 0, "fwd+bwd": 3 * elements}
    assert "[1/2] kd 64x100 float32  [path/floor fwd-nograd/fwd/bwd/fwd+bwd: triton 1.00 1.50 0.00 1.00 (one block); " \
           "cuda 1.00 1.50 0.00 1.00 (staged)]" in stdout
    assert "[2/2] at 4x8x8x8 float32\n" in stdout  # no model: nothing more said


def test_report_renders_a_table(quick_csv, tmp_path):
    out, _ = quick_csv
    md = tmp_path / "README.md"
    done = run_bench("report", "--csv", str(out), "--md", str(md), "--no-plots")
    assert done.returncode == 0, done.stderr
    text = md.read_text()
    assert ("| shape | dtype | pass | peer | ms | x eager | x compile | % floor | path/floor | % path | peak MB "
            "| max err |") in text
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
    assert run_bench("--passes", "nope", "--quick").returncode != 0


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


# --- the bytes fastkd's kernels move (bench/traffic.py) ----------------------------------------------------------

from bench import traffic  # noqa: E402
from bench.cases import LOSSES, PASSES, build_cases  # noqa: E402

LOGIT_LOSSES = ("kd", "kl_forward", "kl_reverse", "jsd", "dkd")
ELEM = {"float32": 4, "bfloat16": 2, "float16": 2}
# Multiples of N x V per pass, written out from the kernels' docstrings (fastkd/triton/kl.py, jsd.py, dkd.py;
# csrc/kl.cu, jsd.cu, dkd.cu), the student's gradient only (g = 1), grad_output 1.
ONE_BLOCK = {"fwd-nograd": 2, "fwd": 3, "bwd": 0, "fwd+bwd": 3}
STREAMED = {"kl": {"fwd-nograd": 4, "fwd": 7, "bwd": 0, "fwd+bwd": 7},
            "jsd": {"fwd-nograd": 6, "fwd": 9, "bwd": 0, "fwd+bwd": 9}}


def expected(name, backend, N, V, dtype, pass_, one_block):
    """`one_block`: the row read once (Triton's one block, CUDA C++'s staged row)."""
    kernel = "jsd" if name == "jsd" else "kl"   # DKD streams as KL does
    mult = ONE_BLOCK[pass_] if one_block else STREAMED[kernel][pass_]
    labels = 8 * N if name == "dkd" and pass_ != "bwd" else 0
    return mult * N * V * ELEM[dtype] + labels


def test_passes_and_floors():
    assert PASSES == ("fwd-nograd", "fwd", "bwd", "fwd+bwd")
    case = build_cases(["kd"], ["256x1000"], ["bfloat16"])[0]
    size = 256 * 1000 * 2
    assert [case.min_bytes(p) for p in PASSES] == [2 * size, 2 * size, size, 3 * size]
    at = build_cases(["at"], ["4x8x8x8"], ["float32"])[0]
    assert at.min_bytes("fwd-nograd") == at.min_bytes("fwd") == 2 * 4 * 8 * 8 * 8 * 4


@pytest.mark.parametrize("dtype", list(ELEM))
@pytest.mark.parametrize("name", LOGIT_LOSSES)
def test_path_bytes_one_block_and_streamed(name, dtype, monkeypatch):
    """Rows up to MAX_BLOCK_V (read from fastkd.triton.rows, not copied) are one Triton block; one more column
    streams. The CUDA C++ kernels stage a row pair that fits in an H100's 227 KiB of shared memory per block (less
    the kernels' static shared memory), and re-read a longer one."""
    monkeypatch.delenv(traffic.STAGE_ENV, raising=False)
    limit = traffic.triton_max_block_v()
    assert limit is not None and limit >= 2
    from fastkd.triton import rows
    assert limit == rows.MAX_BLOCK_V
    N = 3
    for V, one_block in ((limit, True), (limit + 1, False), (7, True)):
        for pass_ in PASSES:
            got = traffic.path_bytes(LOSSES[name], (N, V), dtype, "triton", pass_)
            assert got == expected(name, "triton", N, V, dtype, pass_, one_block), (name, V, pass_)
        case = build_cases([name], [f"{N}x{V}"], [dtype])[0]
        assert case.path_bytes("triton", "fwd+bwd") == expected(name, "triton", N, V, dtype, "fwd+bwd", one_block)
        assert traffic.path_kind(case, "triton") == (
            "one block" if one_block else ("4 passes" if name == "jsd" else "3 passes"))
    # The longest staged row: (V + K) elements per row, the first rounded up to 16 bytes, in 227 KiB less the
    # kernels' static shared memory.
    elem, budget = ELEM[dtype], 232448 - traffic.ROW_KERNEL_STATIC_SHARED
    longest = budget // (2 * elem) - 16 // elem
    assert traffic.cuda_staged_bytes(longest, elem) <= budget < traffic.cuda_staged_bytes(longest + 1, elem)
    for V, staged in ((longest, True), (longest + 1, False), (7, True)):
        for pass_ in PASSES:
            got = traffic.path_bytes(LOSSES[name], (N, V), dtype, "cuda", pass_)
            assert got == expected(name, "cuda", N, V, dtype, pass_, staged), (name, V, pass_)
        case = build_cases([name], [f"{N}x{V}"], [dtype])[0]
        assert traffic.path_kind(case, "cuda") == ("staged" if staged else "re-read")
    # FASTKD_CUDA_STAGE_BYTES=0: the kernels never stage (and the model follows).
    monkeypatch.setenv(traffic.STAGE_ENV, "0")
    assert traffic.path_bytes(LOSSES[name], (N, 7), dtype, "cuda", "fwd") == expected(name, "cuda", N, 7, dtype, "fwd",
                                                                                    False)


def test_path_bytes_follows_the_triton_limit(monkeypatch):
    from fastkd.triton import rows
    monkeypatch.setattr(rows, "MAX_BLOCK_V", 64)
    assert traffic.path_bytes("kd", (2, 64), "float32", "triton", "fwd+bwd") == 3 * 2 * 64 * 4
    assert traffic.path_bytes("kd", (2, 65), "float32", "triton", "fwd+bwd") == 7 * 2 * 65 * 4
    monkeypatch.setattr(rows, "MAX_BLOCK_V", 4096)
    assert traffic.path_bytes("jsd", (2, 4096), "bfloat16", "triton", "fwd") == 3 * 2 * 4096 * 2


def test_path_bytes_options_and_losses_without_a_model():
    shape = (8, 100)
    # bwd is fwd+bwd less fwd; at a grad_output other than 1 the backward reads and writes each gradient.
    for backend in ("triton", "cuda"):
        fwd, both = (traffic.path_bytes("kd", shape, "float32", backend, p) for p in ("fwd", "fwd+bwd"))
        assert traffic.path_bytes("kd", shape, "float32", backend, "bwd") == both - fwd == 0
        assert traffic.path_bytes("kd", shape, "float32", backend, "bwd", grad_output_one=False) == 2 * 800 * 4
        assert traffic.path_bytes("kd", shape, "float32", backend, "bwd", grads=2, grad_output_one=False) \
            == 4 * 800 * 4
    # Both gradients (mutual learning): one more write; a leading batch dimension counts as rows.
    assert traffic.path_bytes("kl_forward", shape, "float32", "triton", "fwd", grads=2) == 4 * 800 * 4
    assert traffic.path_bytes("kl_forward", (2, 4, 100), "float32", "triton", "fwd") == 3 * 800 * 4
    # KD's CE term reads the student row the KL reads already: only its labels are added.
    assert traffic.path_bytes("kd", shape, "float32", "triton", "fwd", ce=True) == 3 * 800 * 4 + 8 * 8
    # JSD at beta 0 or 1 runs on the KL kernel (3 passes streamed, not 4); a row of 10**6 is never staged.
    from bench.cases import Loss
    jsd_kl = Loss("jsd", "jsd_loss", "logits", {"beta": 1.0})
    assert traffic.path_bytes(jsd_kl, (2, 10**6), "float32", "cuda", "fwd") == 7 * 2 * 10**6 * 4
    assert traffic.path_bytes("jsd", (2, 10**6), "float32", "cuda", "fwd") == 9 * 2 * 10**6 * 4
    for name in ("rkd", "at"):
        case = build_cases([name], quick=True)[0]
        assert all(case.path_bytes(b, p) is None for b in ("triton", "cuda") for p in PASSES)
    assert traffic.path_bytes("kd", shape, "float32", "eager", "fwd") is None
    with pytest.raises(ValueError, match="unknown pass"):
        traffic.path_bytes("kd", shape, "float32", "triton", "forward")


def test_list_shows_floor_and_path_bytes():
    done = run_bench("--list", "--losses", "kd,jsd,rkd", "--shapes", "256x1000,8192x128256", "--dtypes", "bfloat16")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    limit = traffic.triton_max_block_v()
    assert lines[0].startswith("# floor: ") and lines[1].startswith(f"# triton reads a row once up to V = {limit} ")
    assert lines[2].split() == ["#", "case", "pass", "floor", "triton", "path", "x", "cuda", "path", "x"]
    body = lines[3:]
    assert len(body) == 4 * 4 + 2  # kd, jsd x 2 shapes x 4 passes, then rkd's two cases (labels only)
    first = body[0].split()
    assert first[:3] == ["kd", "256x1000", "bfloat16"] and first[3] == "fwd-nograd"
    assert first[4:] == ["1.02", "MB", "1.02", "MB", "1.00", "1.02", "MB", "1.00", "triton:", "one", "block,",
                         "cuda:", "staged"]
    llm = next(i for i, line in enumerate(body) if line.startswith("kd 8192x128256 bfloat16"))
    ratios = [line.split()[-1] if i else line.split()[-6] for i, line in enumerate(body[llm:llm + 4])]
    assert ratios == ["2.00", "3.50", "0.00", "2.33"]  # streamed: 4, 6 + 1, 0, 6 + 1 over 2, 2, 1, 3
    jsd_llm = next(line for line in body if line.startswith("jsd 8192x128256 bfloat16"))
    assert "triton: 4 passes" in jsd_llm and "4.20 GB       12.6 GB  3.00" in jsd_llm
    assert body[-2:] == ["rkd 256x1000 bfloat16", "rkd 8192x128256 bfloat16"]
    # Only the passes and fastkd backends asked for; without either nothing but the labels.
    done = run_bench("--list", "--losses", "kd", "--quick", "--passes", "fwd+bwd", "--peers", "eager,cuda")
    assert done.stdout.splitlines()[-2:] == [
        "kd 64x100 float32   fwd+bwd        76.8 KB       76.8 KB  1.00   cuda: staged",
        "kd 32x512 bfloat16  fwd+bwd        98.3 KB       98.3 KB  1.00   cuda: staged"]
    done = run_bench("--list", "--losses", "kd", "--quick", "--peers", "eager")
    assert done.stdout.splitlines() == ["kd 64x100 float32", "kd 32x512 bfloat16"]


OLD_COLUMNS = [  # bench/results.py's columns before path_bytes and pct_path
    "date", "run_id", "mode", "commit", "device", "torch", "triton", "cuda", "fastkd", "liger",
    "loss", "shape", "dtype", "peer", "pass",
    "median_ms", "peak_mb", "min_bytes", "gbps", "pct_copy_bw", "copy_gbps", "max_err", "status",
]


def test_older_results_still_load_report_and_take_new_rows(tmp_path):
    """A results.csv written before the path columns: read (the new columns empty), reported (the new table
    columns empty), and upgraded in place on the next append, its rows kept."""
    from bench.report import markdown
    from bench.results import append_rows, read_rows
    old = tmp_path / "results.csv"
    base = {"date": "2026-01-01T00:00:00Z", "run_id": "1", "mode": "full", "commit": "abc", "device": "NVIDIA H200",
            "torch": "2.14", "triton": "3.8", "cuda": "13.0", "fastkd": "0.1.0", "liger": "", "loss": "kd",
            "shape": "8192x128256", "dtype": "bfloat16", "pass": "fwd+bwd", "min_bytes": "6304038912",
            "copy_gbps": "4000", "max_err": "0", "status": "ok", "peak_mb": "", "gbps": "", "pct_copy_bw": "50"}
    with open(old, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=OLD_COLUMNS)
        writer.writeheader()
        writer.writerow({**base, "peer": "eager", "median_ms": "9.0"})
        writer.writerow({**base, "peer": "triton", "median_ms": "3.0"})
    rows = read_rows(old)
    assert len(rows) == 2 and all(r["path_bytes"] == r["pct_path"] == "" for r in rows)
    text = markdown(rows)
    assert "| 8192x128256 | bfloat16 | fwd+bwd | triton | 3 | 3x |  | 50.0 |  |  |  | 0 |" in text

    new = {**base, "date": "2026-02-01T00:00:00Z", "peer": "triton", "median_ms": 4.0,
           "path_bytes": 7 * 8192 * 128256 * 2, "pct_path": 91.9}
    append_rows(old, [new])
    with open(old, newline="") as f:
        assert next(csv.reader(f)) == COLUMNS
    rows = read_rows(old)
    assert [r["peer"] for r in rows] == ["eager", "triton", "triton"] and rows[0]["median_ms"] == "9.0"
    assert rows[2]["path_bytes"] == str(7 * 8192 * 128256 * 2)
    text = markdown(rows)
    assert "| 8192x128256 | bfloat16 | fwd+bwd | triton | 4 | 2.25x |  | 50.0 | 2.33 | 91.9 |  | 0 |" in text

    alien = tmp_path / "alien.csv"
    alien.write_text("date,something_else\n1,2\n")
    with pytest.raises(SystemExit, match="other columns"):
        append_rows(alien, [new])


def test_fwd_nograd_runs_without_autograd():
    seen = []

    def loss(x):
        seen.append(torch.is_grad_enabled())
        return (x * x).sum()

    sets = [(torch.randn(8, 10, requires_grad=True),) for _ in range(2)]
    suite.time_pass(loss, sets, "fwd-nograd", "cpu", quick=True)
    assert seen and not any(seen)
    seen.clear()
    suite.time_pass(loss, sets, "fwd", "cpu", quick=True)
    assert seen and all(seen)
    assert torch.is_grad_enabled()


# --- the fused linear + distillation loss (bench/cases.py family "fused_linear") --------------------------------

from bench import peers as peers_mod  # noqa: E402
from bench.cases import FUSED_VOCABS  # noqa: E402


def test_fused_cases_exist_with_their_shapes():
    full = build_cases(["fused_jsd", "fused_kl"])
    assert [c.label for c in full[:6]] == [f"fused_jsd {bt}x4096x{v} bfloat16" for bt in (4096, 8192)
                                           for v in (32000, 128256, 262144)]
    assert len(full) == 12 and {c.group for c in full} == {"llm_fused"} and all(c.fused for c in full)
    assert FUSED_VOCABS == (32000, 128256, 262144)
    # The rest of the sweep only when named; explicit BT x H x V shapes (bfloat16 unless asked), once each.
    sweep = build_cases(["fused_jsd"], ["llm_fused_sweep"])
    assert [c.shape for c in sweep] == [(bt, 4096, v) for bt in (1024, 16384) for v in FUSED_VOCABS]
    both = build_cases(["fused_jsd"], ["llm_fused", "llm_fused_sweep", "16384x4096x262144"])
    assert len(both) == 12 and both[-1].label == "fused_jsd 16384x4096x262144 bfloat16"
    custom = build_cases(["fused_kl"], ["2048x2048x50000"])
    assert [(c.shape, c.dtype, c.group) for c in custom] == [((2048, 2048, 50000), "bfloat16", "custom")]
    assert build_cases(["kd"], ["2048x2048x50000"]) == []  # a rank-3 shape is not a logit shape
    with pytest.raises(ValueError, match="unknown shape"):
        build_cases(["fused_jsd"], ["llm_fusd"])
    # The default run (no --losses) has them; --quick a tiny CPU shape.
    assert "fused_jsd 8192x4096x128256 bfloat16" in [c.label for c in build_cases()]
    quick = build_cases(["fused_jsd"], quick=True)
    assert [c.label for c in quick] == ["fused_jsd 64x32x100 bfloat16"]
    h_s, w_s, h_t, w_t, labels = quick[0].make_inputs("cpu")
    assert h_s.shape == h_t.shape == (64, 32) and w_s.shape == w_t.shape == (100, 32)
    assert h_s.dtype == w_s.dtype == torch.bfloat16 and labels.dtype == torch.int64 and labels.shape == (64,)
    assert h_s.requires_grad and w_s.requires_grad and not h_t.requires_grad and not w_t.requires_grad
    assert 0.5 < float(F_linear_std(h_s, w_s)) < 2  # logits of standard deviation about 1
    sliced = quick[0].check_slice((h_s, w_s, h_t, w_t, labels))
    assert sliced[0].shape == (64, 32) and sliced[1] is w_s and sliced[0].requires_grad


def F_linear_std(h, w):
    return torch.nn.functional.linear(h.detach().float(), w.detach().float()).std()


def test_fused_floor_and_flops():
    case = build_cases(["fused_jsd"], ["8192x4096x128256"])[0]
    bt, h, v, e = 8192, 4096, 128256, 2
    read, write = 2 * (bt * h + v * h) * e + 8 * bt, (bt * h + v * h) * e
    assert [case.min_bytes(p) for p in PASSES] == [read, read, write, read + write]
    assert case.input_bytes() == read
    product = 2 * bt * h * v
    f = g = 2 * product
    assert case.flops("fwd+bwd", "eager") == f + g == 4 * 2 * 8192 * 4096 * 128256
    # Where each design runs the gradient products: autograd's backward (eager, compile), fastkd's forward when
    # the student needs a gradient, Liger's forward always. fwd+bwd is the same for all.
    assert {peer: [case.flops(p, peer) for p in PASSES] for peer in peers_mod.PEERS} == {
        "eager": [f, f, g, f + g], "compile": [f, f, g, f + g], "triton": [f, f + g, 0, f + g],
        "cuda": [f, f + g, 0, f + g], "liger": [f + g, f + g, 0, f + g]}
    assert case.flops("fwd") == f  # no peer: the unfused split
    assert build_cases(["kd"], quick=True)[0].flops("fwd+bwd", "triton") is None
    assert traffic.fmt_flops(f + g) == "34.4 TFLOP" and traffic.fmt_flops(1638400) == "1.64 MFLOP"


def test_fused_list_shows_floor_and_flops(capsys):
    from bench.__main__ import main
    assert main(["--list", "--losses", "kd,fused_jsd", "--shapes", "llm,llm_fused", "--passes", "fwd,fwd+bwd",
                 "--peers", "eager,liger,triton"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# fused linear + loss: "))
    assert all(not line.startswith("fused") for line in lines[:start])  # the logit cases come first
    assert lines[start + 1].split() == ["#", "case", "pass", "floor", "unfused", "flops", "fastkd", "flops",
                                        "liger", "flops"]
    body = lines[start + 2:]
    assert len(body) == 6 * 2
    assert body[0].split() == ["fused_jsd", "4096x4096x32000", "bfloat16", "fwd", "591", "MB", "2.15", "TFLOP",
                               "4.29", "TFLOP", "4.29", "TFLOP"]
    llm = body[body.index(next(x for x in body if x.startswith("fused_jsd 8192x4096x128256"))) + 1]
    assert llm.split() == ["fwd+bwd", "3.35", "GB", "34.4", "TFLOP", "34.4", "TFLOP", "34.4", "TFLOP"]
    assert main(["--list", "--losses", "fused_kl", "--quick", "--peers", "eager"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["#", "case", "pass", "floor", "unfused", "flops"] and len(out) == 2 + 4
    assert out[2].split() == ["fused_kl", "64x32x100", "bfloat16", "fwd-nograd", "21.5", "KB", "819", "KFLOP"]


@pytest.mark.parametrize("name", ["fused_jsd", "fused_kl"])
def test_fused_peers_agree_with_the_reference(name):
    """The eager composition (bf16 logits) and fastkd's chunked torch backend against the float32 reference;
    Liger's wiring through fastkd.compat.liger's drop-in of LigerFusedLinearJSDLoss (same constructor and
    call); a peer without the weight's gradient, or with a wrong loss, is caught."""
    import functools
    from fastkd import functional
    from fastkd.compat import liger as compat_liger
    case = build_cases([name], quick=True)[0]
    inputs = case.make_inputs("cpu")
    ref = suite.loss_and_grad(peers_mod.reference_fn(case, "cpu"), inputs)
    assert len(ref) == 3 and ref[1].shape == (64, 32) and ref[2].shape == (100, 32)  # loss, dh_s, dW_s
    tol = suite.TOLERANCE[case.dtype]
    fastkd_torch = functools.partial(functional.fused_linear_distill_loss, backend="torch", **case.loss.kwargs)
    for fn in (peers_mod.build("eager", case, "cpu"), fastkd_torch,
               peers_mod.liger_fused(case, compat_liger.LigerFusedLinearJSDLoss)):
        assert suite.disagreement(ref, suite.loss_and_grad(fn, inputs)) <= tol
    no_dw = functools.partial(peers_mod.unfused, **case.loss.kwargs)
    assert suite.disagreement(ref, suite.loss_and_grad(
        lambda h_s, w_s, *rest: no_dw(h_s, w_s.detach(), *rest), inputs)) == float("inf")
    other = "forward_kl" if name == "fused_jsd" else "reverse_kl"
    wrong = functools.partial(functional.fused_linear_distill_loss, backend="torch", loss=other)
    assert suite.disagreement(ref, suite.loss_and_grad(wrong, inputs)) > tol
    with pytest.raises(peers_mod.Unavailable):
        peers_mod.build("liger", case, "cpu")  # not installed here, or not on a CPU: says why


@pytest.fixture(scope="module")
def fused_quick_csv(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "fused.csv"
    done = run_bench("--quick", "--losses", "fused_jsd", "--peers", "eager,compile", "--out", str(out),
                     env={"TRITON_INTERPRET": "0"})
    assert done.returncode == 0, done.stdout + done.stderr
    return out, done.stdout


def test_fused_quick_smoke_run(fused_quick_csv):
    out, stdout = fused_quick_csv
    assert "[1/1] fused_jsd 64x32x100 bfloat16  [matmul 1.64 MFLOP per fwd+bwd, floor 32.0 KB]" in stdout
    assert "matmul rate (fused cases' roofline): " in stdout
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    assert len(rows) == 2 * 4 and {r["peer"] for r in rows} == {"eager", "compile"}
    product = 2 * 64 * 32 * 100
    for row in rows:
        assert row["loss"] == "fused_jsd" and row["shape"] == "64x32x100" and row["dtype"] == "bfloat16"
        assert int(row["flops"]) == {"fwd-nograd": 2, "fwd": 2, "bwd": 2, "fwd+bwd": 4}[row["pass"]] * product
        assert float(row["mm_tflops"]) > 0 and row["path_bytes"] == ""
        if row["peer"] == "eager":
            assert row["status"] == "ok" and 0 < float(row["max_err"]) <= suite.TOLERANCE["bfloat16"]
            tflops = int(row["flops"]) / (float(row["median_ms"]) * 1e-3) / 1e12
            assert float(row["tflops"]) == pytest.approx(tflops, rel=1e-3)
            assert float(row["pct_mm"]) == pytest.approx(100 * tflops / float(row["mm_tflops"]), rel=1e-3)
        else:
            assert row["status"].startswith("unavailable: skipped in --quick on CPU") and row["tflops"] == ""


def test_fused_report_has_flop_columns(fused_quick_csv, quick_csv):
    """The fused tables carry TFLOP/s and % mm; the other losses' tables do not (their rows have no FLOPs)."""
    from bench.report import _axis, markdown
    from bench.results import read_rows
    rows = read_rows(fused_quick_csv[0]) + read_rows(quick_csv[0])
    text = markdown(rows)
    fused = text[text.index("### fused_jsd"):]
    assert "| peak MB | max err | TFLOP/s | % mm |" in fused
    eager = next(line for line in fused.splitlines() if line.startswith("| 64x32x100 | bfloat16 | fwd+bwd | eager |"))
    assert len(eager.split("|")) == 16 and eager.split("|")[-3].strip() != ""
    kd = text[text.index("### kd"):text.index("### at")]
    assert "TFLOP/s" not in kd and "| peak MB | max err |\n" in kd
    assert _axis("fused_jsd", "8192x4096x128256") == ("vocabulary (V)", 128256, "BT=8192 H=4096")


def test_results_from_before_the_flop_columns_still_load(tmp_path):
    from bench.report import markdown
    from bench.results import append_rows, read_rows
    before = COLUMNS[:COLUMNS.index("flops")]
    assert before[-2:] == ["path_bytes", "pct_path"]
    old = tmp_path / "results.csv"
    with open(old, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=before)
        writer.writeheader()
        writer.writerow({**dict.fromkeys(before, ""), "date": "2026-01-01T00:00:00Z", "mode": "full",
                         "device": "NVIDIA H200", "loss": "kd", "shape": "8192x128256", "dtype": "bfloat16",
                         "peer": "triton", "pass": "fwd+bwd", "median_ms": "3.0", "status": "ok"})
    rows = read_rows(old)
    assert rows[0]["flops"] == rows[0]["tflops"] == "" and "TFLOP/s" not in markdown(rows)
    append_rows(old, [{**rows[0], "loss": "fused_jsd", "shape": "8192x4096x128256", "flops": 34428457844736,
                       "tflops": 500.0, "pct_mm": 62.5, "mm_tflops": 800.0}])
    rows = read_rows(old)
    assert len(rows) == 2 and rows[1]["tflops"] == "500" and "| 500 | 62.5 |" in markdown(rows)


# --- bench/communication.py: the bytes the distributed losses send, per rank and call -------------------------

from bench import communication as comm  # noqa: E402


def test_communication_ring_convention_and_small_cases():
    # A ring all-reduce of S bytes sends 2 (W - 1) / W x S per rank; an all-gather of T bytes in all (W - 1) / W x T.
    assert comm.Collective("x", "all_reduce", 10, 4, "forward").sent(2) == 40
    assert comm.Collective("x", "all_reduce", 8, 4, "forward").sent(4) == 48
    assert comm.Collective("x", "all_gather", 12, 8, "forward").sent(4) == 72
    assert comm.Collective("x", "reduce_scatter", 12, 8, "backward").sent(4) == 72
    # KL over N = 10 rows on 2 ranks, fp32: the layout check (4 int64 per rank, 32 bytes sent), then both sides'
    # row maxima and sums of exp (two all-reduces of 20 floats, 80 bytes each) and the divergence's partial sums
    # (10 floats, 40 bytes).
    assert comm.totals(comm.vocab_parallel("kl_div_loss", rows=10, world=2, dtype=torch.float32), 2) == (232, 0)
    # bf16 logits: the per-row numbers are float32 all the same; on 4 ranks each all-reduce of 32 bytes sends 48,
    # and JSD sums its two partials (to the mixture) in one all-reduce of 64 bytes.
    jsd = comm.vocab_parallel("jsd_loss", rows=8, world=4, dtype=torch.bfloat16)
    assert comm.totals(jsd, 4) == (96 + 4 * 48 + 96, 0)
    # KD with its CE term: three more forward (the student's normaliser at T = 1, the label's log-probability) and
    # in the backward the sum over the slices of that normaliser's gradient.
    assert comm.totals(comm.vocab_parallel("kd_loss", rows=10, world=2, ce=True), 2) == (32 + 8 * 40, 40)
    # The fused loss adds the N x H all-reduce of the hidden states' gradient, in their dtype: 10 x 6 x 2 bytes.
    assert comm.totals(comm.fused(rows=10, hidden=6, world=2, dtype=torch.bfloat16), 2) == (232 + 120, 0)
    # RKD, 4 samples per rank on 2 ranks, D_s = 3, D_t = 5, fp32: features 48 + 80 bytes sent in the forward, and
    # the row checks; the gathered student gradient (8 x 3 floats, 96 bytes) reduce-scattered in the backward.
    from fastkd.distributed.collectives import _MAX_ROW_DIMS
    assert comm.totals(comm.relational(batch=4, student_dim=3, teacher_dim=5, world=2), 2) == (
        128 + 2 * 8 * (3 + _MAX_ROW_DIMS), 48)
    # Top-2 of 3 rows on 2 ranks: layout 32, normalisers 12 + 12, candidates 2 x 3 x 2 x (4 + 8) gathered (72 sent).
    assert comm.totals(comm.sharded_topk(rows=3, k=2, world=2), 2) == (128, 0)
    # FSDP2 weights, V = 10, H = 3, bf16, 2 ranks: 60 bytes each gathered (30 sent), the gradient reduce-scattered.
    assert comm.totals(comm.fsdp_weights(vocab=10, hidden=3, world=2), 2) == (30, 30)
    # Gathering both sides' logits instead: (W - 1) / W x N x V x 2 bytes each.
    assert comm.totals(comm.gathered_logits(rows=10, vocab=100, world=2), 2) == (2000, 0)
    with pytest.raises(ValueError, match="unknown vocabulary-parallel loss"):
        comm.vocab_parallel("dkd_loss", rows=1, world=2)
    with pytest.raises(ValueError, match="no CE term"):
        comm.vocab_parallel("kl_div_loss", rows=1, world=2, ce=True)


def test_communication_table_from_the_cli():
    done = run_bench("--communication")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "| loss | shape | W | forward | backward | total | gathering the logits instead | less |" in lines
    table = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert len(table) == len(comm.cases(2)) * len(comm.WORLDS)
    # KL at N = 8192 on 2 ranks, on the kernels' slice operators: 3 x 2 x 8192 floats all-reduced + 32 bytes;
    # gathering both sides' bf16 logits instead, 2 x 8192 x 128256 x 2 / 2 bytes.
    assert "| kl_div_loss | N=8192 V=128256 bf16 | 2 | 192.03 KiB | 0 B | 192.03 KiB | 1.96 GiB | 10,686x |" in lines


_recorded = []
_phase = ["forward"]


def _record(rank, world, case):
    """On each rank: run `case` forward and backward with every all-reduce, all-gather and reduce-scatter
    recorded as (phase, op, bytes), all-gathers and reduce-scatters by their total (every rank's part)."""
    import torch.distributed as dist
    from fastkd import functional as KF
    from fastkd.distributed import topk
    reduce, gather, scatter = dist.all_reduce, dist.all_gather, dist.reduce_scatter

    def all_reduce(tensor, *args, **kwargs):
        _recorded.append((_phase[0], "all_reduce", tensor.numel() * tensor.element_size()))
        return reduce(tensor, *args, **kwargs)

    def all_gather(parts, tensor, *args, **kwargs):
        _recorded.append((_phase[0], "all_gather", sum(p.numel() * p.element_size() for p in parts)))
        return gather(parts, tensor, *args, **kwargs)

    def reduce_scatter(output, parts, *args, **kwargs):
        _recorded.append((_phase[0], "reduce_scatter", sum(p.numel() * p.element_size() for p in parts)))
        return scatter(output, parts, *args, **kwargs)

    dist.all_reduce, dist.all_gather, dist.reduce_scatter = all_reduce, all_gather, reduce_scatter
    g = torch.Generator().manual_seed(rank if case == "rkd" else 0)
    rows, local = 6, 5
    s = torch.randn(rows, local, generator=g).requires_grad_()
    t = torch.randn(rows, local, generator=g)
    group = dist.group.WORLD
    _phase[0] = "forward"
    if case == "kl":
        loss = KF.kl_div_loss(s, t, process_group=group)
    elif case == "kl_triton":
        loss = KF.kl_div_loss(s, t, process_group=group, backend="triton")
    elif case == "jsd_triton":
        loss = KF.jsd_loss(s, t, process_group=group, backend="triton")
    elif case == "jsd":
        loss = KF.jsd_loss(s, t, process_group=group)
    elif case == "kd_ce":
        loss = KF.kd_loss(s, t, target=torch.arange(rows), ce_weight=0.5, process_group=group)
    elif case == "sparse_bucket":
        ids = torch.tensor([[0, 7, 9]] * rows)
        logprobs = torch.log(torch.tensor([[0.5, 0.2, 0.1]] * rows))
        loss = KF.sparse_kd_loss(s, ids, logprobs, tail="bucket", process_group=group)
    elif case == "fused_ce":
        h = torch.randn(rows, 4, generator=g).requires_grad_()
        loss = KF.fused_linear_distill_loss(h, torch.randn(local, 4, generator=g), torch.randn(rows, 3, generator=g),
                                            torch.randn(local, 3, generator=g), torch.arange(rows), ce_weight=0.5,
                                            process_group=group)
    elif case == "topk":
        topk.sharded_topk(t, 2, group)
        loss = None
    else:
        loss = KF.rkd_loss(torch.randn(4, 3, generator=g).requires_grad_(), torch.randn(4, 5, generator=g),
                           process_group=group)
    _phase[0] = "backward"
    if loss is not None:
        loss.backward()
    return list(_recorded)


@pytest.mark.parametrize("case", ["kl", "jsd", "kl_triton", "jsd_triton", "kd_ce", "sparse_bucket", "fused_ce",
                                  "topk", "rkd"])
def test_communication_model_counts_the_real_collectives(case):
    """The model's collectives are those a 2-rank gloo run makes, one for one (bench/communication.py)."""
    from ranks import run_ranks
    f32 = torch.float32
    model = {
        "kl": comm.vocab_parallel("kl_div_loss", rows=6, world=2, dtype=f32),
        "kd_ce": comm.vocab_parallel("kd_loss", rows=6, world=2, dtype=f32, ce=True),
        "sparse_bucket": comm.vocab_parallel("sparse_kd_loss", rows=6, world=2, dtype=f32, tail="bucket"),
        "fused_ce": comm.fused(rows=6, hidden=4, world=2, dtype=f32, ce=True),
        "jsd": comm.vocab_parallel("jsd_loss", rows=6, world=2, dtype=f32),
        "kl_triton": comm.vocab_parallel("kl_div_loss", rows=6, world=2, dtype=f32, kernels=True),
        "jsd_triton": comm.vocab_parallel("jsd_loss", rows=6, world=2, dtype=f32, kernels=True),
        "topk": comm.sharded_topk(rows=6, k=2, world=2, dtype=f32),
        "rkd": comm.relational(batch=4, student_dim=3, teacher_dim=5, world=2),
    }[case]
    expected = sorted((c.when, c.op, c.elements * c.itemsize) for c in model)
    for recorded in run_ranks(2, _record, case):
        listed = "\n".join(map(str, recorded)) + "\nmodel:\n" + "\n".join(c.what for c in model)
        assert sorted(recorded) == expected, listed
