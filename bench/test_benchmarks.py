"""The suite's cases under pytest-benchmark: `pytest bench/ --benchmark-only`.

Forward + backward of each case for each peer that runs here: the quick shapes on a CPU, the full ones on
a GPU (with the same correctness check as `python -m bench` first). `python -m bench` remains the source
of the committed results (CUDA-event timing, memory, % of the floor); this is for quick local comparisons
with pytest-benchmark's statistics, `--benchmark-compare` and friends.
"""
import pytest
import torch

pytest.importorskip("pytest_benchmark")

from bench import peers as peers_mod  # noqa: E402
from bench.cases import build_cases  # noqa: E402
from bench.suite import TOLERANCE, disagreement, loss_and_grad  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QUICK = DEVICE == "cpu"
CASES = build_cases(quick=QUICK)
PEERS = ("eager", "compile", "triton", "cuda") if not QUICK else ("eager", "triton")


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.label.replace(" ", "-"))
def test_forward_backward(benchmark, case, peer):
    try:
        fn = peers_mod.build(peer, case, DEVICE, quick=QUICK)
    except peers_mod.Unavailable as why:
        pytest.skip(str(why))
    inputs = case.make_inputs(DEVICE)
    reference = peers_mod.build("eager", case, DEVICE, quick=QUICK)
    error = disagreement(loss_and_grad(reference, inputs), loss_and_grad(fn, inputs))
    assert error <= TOLERANCE[case.dtype], f"{peer} disagrees with the reference: {error}"

    def step():
        loss_and_grad(fn, inputs)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = case.label
    benchmark(step)
