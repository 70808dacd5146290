"""Static GPU checks without a GPU: every Triton kernel, compiled for sm_80 and sm_90 with the specialisations
the public launchers produce (fastkd.triton.static), must compile, not spill, stay within a register
budget, and load 128 bits at a time from global memory where the rows are contiguous.

The compile runs in child processes without TRITON_INTERPRET (conftest.py sets it when there is no GPU, and
the interpreter replaces the kernels), one per architecture, in parallel, once per module.
"""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
static = pytest.importorskip("fastkd.triton.static")
# The budgets below are Triton 3.8's code generation (its ptxas allocates registers differently from 3.6's,
# which CI tests in the interpreter only): the checks run where they were measured.
if tuple(int(v) for v in triton.__version__.split(".")[:2]) != (3, 8):
    pytest.skip(f"register budgets measured with triton 3.8, this is {triton.__version__}", allow_module_level=True)

ARCHS = ("8.0", "9.0")

# Registers per thread, per kernel: the most measured over both archs, every case (Triton 3.8's ptxas), plus
# ~15% headroom, rounded up to 8. Why a budget: the logit row kernels run 8 warps (256 threads) per row
# for long rows, and <= 128 registers keeps two such programs per SM (65536 / (256 * 128)); a row held in one
# block of 4096 lanes runs 16 warps, where 128 is the hardware's cap (rows.row_maxnreg). A jump past the
# budget is a code-generation change to look at, not noise.
REGISTER_BUDGET = {
    # The row kernels write the gradient (and d_T with a per-row temperature) in the forward pass; the most
    # registers are the long-row passes' (V > rows.MAX_BLOCK_V = 4096: blocks of 2048 over 8 warps). Measured
    # 2026-11-30 with the plan's long rows at V = 8192 and cases with a per-row temperature and d_T beside
    # both gradients (fastkd/triton/static.py as updated for the temperature_rows schema):
    "kl_rows_kernel": 128,  # measured 116 (fp16, V=8192, labels+ce, both grads + d_T, sm_80; 113 without d_T)
    "jsd_rows_kernel": 168,  # measured 143 (fp16, V=8192, student grad, sm_90); one block (V=4096): 128, the cap
    "dkd_rows_kernel": 120,  # measured 101 (bf16, V=8192, both grads + d_T, sm_90; 90 without d_T)
    "sparse_kd_rows_kernel": 104,  # measured 90 (bf16, V=8192, bucket, labels, student grad, sm_90)
    "scale_rows_kernel": 40,  # measured 32
    # The vocabulary-parallel slice kernels, measured 2026-11-30 (a helper's static compile, sm_80/sm_90, fp32/bf16/
    # fp16, V = 1024 and 8192, contiguous and strided): stats 64; terms 70 (forward KL with its gradient), 82 (JSD);
    # grad 55 (JSD).
    "vocab_stats_kernel": 80,
    "vocab_terms_kernel": 96,
    "vocab_grad_kernel": 72,
    "at_map_forward_kernel": 184,  # measured 162 (fp32 channels-last p=2.5, sm_90; 8 warps for tiles >= 2048)
    "at_map_backward_kernel": 168,  # measured 148 (fp16 channels-last p=2.5, sm_90)
    "rkd_sq_dist_kernel": 88,  # measured 72
    "rkd_weighted_diff_kernel": 144,  # measured 128
    "rkd_angle_forward_kernel": 128,  # measured 114
    "rkd_angle_rows_kernel": 200,  # measured 180 (sm_80)
    "rkd_angle_cols_kernel": 192,  # measured 167
}


def _plan():
    try:
        return static.plan(ARCHS)
    except Exception:  # collection must not fail where the kernels cannot be imported; the fixture skips
        return []


PLAN = _plan()


def _id(row):
    kernel, arch, case = row
    return f"{kernel}-sm{arch.replace('.', '')}-{case.replace(' ', '_')}"


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    check = subprocess.run([sys.executable, "-c", "import fastkd.triton.static as s; print(s.unavailable_reason() or '')"],
                           env=env, capture_output=True, text=True)
    if check.returncode != 0 or check.stdout.strip():
        pytest.skip(f"no static compile here: {(check.stdout + check.stderr).strip()[-500:]}")
    procs = {arch: subprocess.Popen([sys.executable, "-m", "fastkd.triton.static", "--json", "--arch", arch], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in ARCHS}
    rows = {}
    for arch, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"compiling for sm_{arch} failed:\n{err[-4000:]}"
        for r in json.loads(out):
            rows[(r["kernel"], r["arch"], r["case"])] = r
    return rows


def _row(report, row):
    assert row in report, f"{row} was not compiled (the launchers changed?); compiled: {len(report)} rows"
    return report[row]


def test_report_covers_the_plan(report):
    assert set(report) == set(PLAN)
    assert len(PLAN) > 200


@pytest.mark.parametrize("row", PLAN, ids=[_id(r) for r in PLAN])
def test_compiles_within_register_budget(report, row):
    r = _row(report, row)
    assert 0 < r["registers"] <= REGISTER_BUDGET[r["kernel"]], r


@pytest.mark.parametrize("row", PLAN, ids=[_id(r) for r in PLAN])
def test_no_spills(report, row):
    r = _row(report, row)
    assert (r["stack"], r["local"]) == (0, 0), f"spills: {r}"


def _load_rows():
    params = []
    for row in PLAN:
        kernel, arch, case = row
        if (kernel in static.LOGIT_KERNELS + static.SPARSE_KERNELS + static.SCALE_KERNELS + static.VOCAB_KERNELS
                and "contiguous" in case):
            params.append(pytest.param(row, id=_id(row)))
        elif kernel in static.AT_KERNELS:
            params.append(pytest.param(row, id=_id(row)))
    return params


@pytest.mark.parametrize("row", _load_rows())
def test_128_bit_global_loads(report, row):
    r = _row(report, row)
    assert r["widest_load"] == "LDG.E.128", r
