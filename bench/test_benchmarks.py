"""The suite's cases under pytest-benchmark: `pytest bench/ --benchmark-only`.

The real shapes on a GPU, the --quick shapes on a CPU. Each peer is checked against the reference
first (bench.suite's check); a fastkd backend that disagrees fails, any other peer that cannot run or
disagrees is skipped with the reason. Timing is pytest-benchmark's (wall clock, synchronised).
"""
import pytest

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (pip install -e '.[bench]')")

import torch  # noqa: E402

from bench import peers as peers_mod  # noqa: E402
from bench.cases import build_cases  # noqa: E402
from bench.suite import TOLERANCE, disagreement, grad_leaves, loss_and_grad  # noqa: E402
from bench.timing import is_oom, synchronize  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QUICK = DEVICE == "cpu"
CASES = build_cases(quick=QUICK)
# On a CPU the interpreted Triton kernels are slow: time only the fused forward + backward there.
PASSES = ("fwd+bwd",) if QUICK else ("fwd-nograd", "fwd", "fwd+bwd")


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("peer", peers_mod.PEERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label.replace(" ", "-"))
def test_bench(benchmark, case, peer, pass_):
    try:
        fn = peers_mod.build(peer, case, DEVICE, quick=QUICK)
        inputs = case.make_inputs(DEVICE)
        err = disagreement(loss_and_grad(peers_mod.reference_fn(case, DEVICE), inputs),
                           loss_and_grad(fn, inputs))
    except peers_mod.Unavailable as why:
        pytest.skip(f"unavailable: {why}")
    except Exception as exc:
        if is_oom(exc):
            pytest.skip("OOM")
        raise
    if not err <= TOLERANCE[case.dtype]:
        message = f"{peer} disagrees with the reference: max error {err:.3g}"
        if peer in peers_mod.FASTKD_BACKENDS:
            pytest.fail(message)
        pytest.skip(message)
    benchmark.group = f"{case.label} {pass_}"

    def call():
        if pass_ == "fwd-nograd":  # inference: fastkd's kernels write no gradient
            with torch.no_grad():
                fn(*inputs)
            synchronize(DEVICE)
            return
        loss = fn(*inputs)
        if pass_ == "fwd+bwd":
            loss.backward()
            for x in grad_leaves(inputs):  # the student (fused cases: its hidden states and weight)
                x.grad = None
        synchronize(DEVICE)
    benchmark.pedantic(call, rounds=3 if QUICK else 20, warmup_rounds=1)
