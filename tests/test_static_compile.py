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

ARCHS = ("8.0", "9.0")

# Registers per thread, per kernel: the most measured over both archs, every case (Triton 3.8's ptxas), plus
# ~15% headroom, rounded up to 8. Why a budget: the logit row kernels run 8 warps (256 threads) per row
# for long rows, and <= 128 registers keeps two such programs per SM (65536 / (256 * 128)); a jump past the
# budget is a code-generation change to look at, not noise. The attention kernels sit at the 255 ceiling
# (p = 2.5: two-float pow) and are held by the spill check instead.
REGISTER_BUDGET = {
    "kl_forward_kernel": 128,  # measured 109 (bf16, V=4096, labels+ce)
    "kl_backward_kernel": 72,  # measured 61
    "jsd_forward_kernel": 144,  # measured 128 (fp32, V=4096, sm_90)
    "jsd_backward_kernel": 72,  # measured 61
    "dkd_forward_kernel": 104,  # measured 90 (sm_80)
    "dkd_backward_kernel": 72,  # measured 60
    "at_map_forward_kernel": 255,  # measured 255 (p=2.5 channels-last, sm_90): the hardware limit
    "at_map_backward_kernel": 255,  # measured 255 (p=2.5 channels-last, sm_90): the hardware limit
    "rkd_sq_dist_kernel": 88,  # measured 72
    "rkd_weighted_diff_kernel": 144,  # measured 128
    "rkd_angle_forward_kernel": 128,  # measured 114
    "rkd_angle_rows_kernel": 200,  # measured 180 (sm_80)
    "rkd_angle_cols_kernel": 192,  # measured 167
}

# Rows that fail a requirement today (Triton 3.8), measured; strict, so they flip to failures when fixed.
SPILLS = {  # (kernel, arch, case): measured STACK bytes, at 255 registers
    ("at_map_forward_kernel", "9.0", "fp16 channels-last p=2.5"): 56,
    ("at_map_backward_kernel", "9.0", "fp16 channels-last p=2.5"): 8,
    ("at_map_backward_kernel", "9.0", "bf16 channels-last p=2.5"): 8,
}
# The channels-first attention tiles are spatial-fastest with a runtime spatial stride, so each element is
# its own load: measured LDG.E.U16 for bf16/fp16 (forward and backward) and LDG.E (32 bits) for fp32, both
# archs, every p. Channels-last reaches LDG.E.128.
NARROW_LOADS = {"fp32": "LDG.E", "bf16": "LDG.E.U16", "fp16": "LDG.E.U16"}


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


def _spill_rows():
    return [pytest.param(row, id=_id(row), marks=pytest.mark.xfail(
                strict=True, reason=f"spills today: measured STACK {SPILLS[row]} bytes, LOCAL 0, at 255 registers "
                                    "(Triton 3.8); a kernel change for a GPU session") if row in SPILLS else ())
            for row in PLAN]


@pytest.mark.parametrize("row", _spill_rows())
def test_no_spills(report, row):
    r = _row(report, row)
    assert (r["stack"], r["local"]) == (0, 0), f"spills: {r}"


def _load_rows():
    params = []
    for row in PLAN:
        kernel, arch, case = row
        if kernel in static.LOGIT_KERNELS and "contiguous" in case:
            params.append(pytest.param(row, id=_id(row)))
        elif kernel in static.AT_KERNELS:
            marks = ()
            if "channels-first" in case:
                measured = NARROW_LOADS[case.split()[0]]
                marks = pytest.mark.xfail(strict=True, reason=f"measured widest load {measured} (one element per "
                                          "load, channels-first tile); a kernel change for a GPU session")
            params.append(pytest.param(row, id=_id(row), marks=marks))
    return params


@pytest.mark.parametrize("row", _load_rows())
def test_128_bit_global_loads(report, row):
    r = _row(report, row)
    assert r["widest_load"] == "LDG.E.128", r
