"""jsd_loss (generalised Jensen-Shannon, TRL's) on every backend: forward, student and teacher gradients.

Each test takes the `backend` fixture (tests/conftest.py): "torch" (the reference), "triton" (CUDA tensors, or
without a GPU CPU tensors in Triton's interpreter: small shapes) and "cuda" (the CUDA C++ extension, GPU only).
A kernel backend is compared with the reference on the same inputs; the reference itself with the reference
in float64 on the same values, at the same tolerances.
"""
import pytest
import torch
from helpers import (all_finite, assert_error_within_twice_reference, assert_logits_on_gpu, assert_matches_reference,
                     compile_fullgraph, eager_and_compiled, gpu_logit_sizes, kernels_only, labels_for, logits,
                     loss_and_grads, on_gpu_kernels, shifted_masked_tokens)

from fastkd import functional as KF
from fastkd import reference

BETAS = [0.0, 0.3, 0.5, 0.9, 1.0]
VOCABS = [1, 7, 100, 1037]


def jsd(beta=0.5, temperature=2.0, labels=None, reduction="batchmean"):
    return lambda s, t, backend: KF.jsd_loss(s, t, beta=beta, temperature=temperature, labels=labels,
                                             reduction=reduction, backend=backend)


def check(fn, s, t, backend, grad_out=None, requires_grad=None):
    """The comparison with the reference, NaN equal to NaN."""
    return assert_matches_reference(fn, s, t, backend=backend, grad_output=grad_out, requires_grad=requires_grad,
                                    equal_nan=True)


@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("beta", BETAS)
def test_jsd_matches_reference(backend, device, V, beta):
    s = logits(2, 3, V, seed=V, device=device)
    t = logits(2, 3, V, seed=V + 100, device=device)
    check(jsd(beta, labels=labels_for((2, 3), device)), s, t, backend)


@pytest.mark.parametrize("beta", BETAS)
def test_jsd_streams_over_blocks(backend, device, beta, block_columns):
    block_columns(64)
    s = logits(3, 300, seed=1, device=device)  # 5 blocks, the last one partial
    t = logits(3, 300, seed=2, device=device)
    check(jsd(beta, temperature=1.5, labels=labels_for((3,), device)), s, t, backend)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(1, 50), (50,)])
def test_jsd_one_row(backend, device, beta, shape):
    s = logits(*shape, seed=3, device=device)
    t = logits(*shape, seed=4, device=device)
    check(jsd(beta), s, t, backend)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_strided_rows(backend, device, beta):
    """`logits[:, :-1]` of (B, S + 1, V) and a teacher with a column stride: views, no copies needed."""
    s = logits(2, 5, 40, seed=5, device=device)[:, :-1]
    t = logits(2, 40, 5, seed=6, device=device).transpose(1, 2)[:, 1:]
    assert not s.is_contiguous() and not t.is_contiguous()
    check(jsd(beta, labels=labels_for((2, 4), device, masked=(2,))), s, t, backend)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_reductions(backend, device, reduction, beta):
    s = logits(2, 3, 37, seed=7, device=device)
    t = logits(2, 3, 37, seed=8, device=device)
    grad_out = logits(2, 3, seed=9, device=device, scale=1.0) if reduction == "none" else None
    check(jsd(beta, labels=labels_for((2, 3), device), reduction=reduction), s, t, backend, grad_out)


@pytest.mark.parametrize("beta", BETAS)
def test_jsd_all_tokens_masked(backend, device, beta):
    s = logits(2, 3, 20, seed=10, device=device)
    t = logits(2, 3, 20, seed=11, device=device)
    labels = torch.full((2, 3), -100, device=device)
    loss, d_s, d_t = check(jsd(beta, labels=labels), s, t, backend)
    assert loss.item() == 0.0
    assert not d_s.any() and not d_t.any()


@pytest.mark.parametrize("beta", BETAS)
def test_jsd_neg_inf_columns_in_both(backend, device, beta):
    s = logits(4, 30, seed=12, device=device)
    t = logits(4, 30, seed=13, device=device)
    s[:, [0, 7, 29]] = float("-inf")
    t[:, [0, 7, 29]] = float("-inf")
    s[1, :25] = float("-inf")  # most of a row
    t[1, :25] = float("-inf")
    loss, d_s, d_t = check(jsd(beta), s, t, backend)
    assert all_finite(loss, d_s, d_t)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 0.9])
def test_jsd_neg_inf_columns_teacher_only(backend, device, beta):
    """The teacher gives some classes probability 0: finite for every beta but 1 (reverse KL is +inf)."""
    s = logits(4, 30, seed=14, device=device)
    t = logits(4, 30, seed=15, device=device)
    t[:, [3, 4, 20]] = float("-inf")
    loss, d_s, d_t = check(jsd(beta), s, t, backend)
    assert all_finite(loss, d_s, d_t)


def test_jsd_neg_inf_teacher_only_reverse_kl_is_inf(backend, device):
    s = logits(2, 30, seed=14, device=device)
    t = logits(2, 30, seed=15, device=device)
    t[:, 3] = float("-inf")
    assert KF.jsd_loss(s, t, beta=1.0, backend=backend).item() == float("inf")


@pytest.mark.parametrize("beta", BETAS)
def test_jsd_identical_rows_are_exactly_zero(backend, device, beta):
    if backend == "torch":
        pytest.skip("the reference's gradient there is rounding noise, not exactly 0: a kernel property")
    s = logits(3, 2, 77, seed=16, device=device)
    s[0, 0, 5] = float("-inf")
    loss, d_s, d_t = loss_and_grads(lambda s, t: jsd(beta)(s, t, backend), s, s.clone())
    assert loss.item() == 0.0
    assert not d_s.any() and not d_t.any()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_gradient_only_where_required(backend, device, beta):
    s = logits(3, 20, seed=17, device=device)
    t = logits(3, 20, seed=18, device=device)
    check(jsd(beta), s, t, backend, requires_grad=(True, False))  # student only
    check(jsd(beta), s, t, backend, requires_grad=(False, True))  # teacher only


def test_jsd_underflow_gives_no_nan(backend, device):
    """Probabilities that underflow to 0 on both sides (huge logit gaps) give 0 terms, not NaN."""
    s = logits(3, 40, seed=19, device=device)
    t = logits(3, 40, seed=20, device=device)
    s[:, :10] -= 1e4
    t[:, :10] -= 1e4
    t[:, 10:15] -= 1e4
    s[:, 15:20] -= 1e4
    loss, d_s, d_t = check(jsd(0.5, temperature=1.0), s, t, backend)
    assert all_finite(loss, d_s, d_t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_half_precision_error_is_no_worse_than_torch(backend, device, dtype, beta):
    """The kernels' error against float64 is at most about that of the reference in the input dtype."""
    kernels_only(backend)
    s = logits(4, 300, seed=38, device=device, dtype=dtype)
    t = logits(4, 300, seed=39, device=device, dtype=dtype)
    assert_error_within_twice_reference(jsd(beta, temperature=1.5), s, t, backend, device, 1e-6, 1e-12)


def test_float64_falls_back_to_the_reference(backend, device):
    s = logits(3, 11, seed=49, device=device, dtype=torch.float64)
    t = logits(3, 11, seed=50, device=device, dtype=torch.float64)
    assert torch.equal(KF.jsd_loss(s, t, beta=0.3, backend=backend), reference.jsd_loss(s, t, beta=0.3))


COMPILE_CASES = {
    "jsd": lambda s, t, y, b: KF.jsd_loss(s, t, beta=0.3, temperature=2.0, labels=y, backend=b),
    "jsd_kl": lambda s, t, y, b: KF.jsd_loss(s, t, beta=1.0, labels=y, backend=b),
}


@eager_and_compiled
@pytest.mark.parametrize("name", sorted(COMPILE_CASES))
def test_eager_and_compiled(backend, device, compiled, name):
    """Eager: against the reference. Compiled (torch.compile(fullgraph=True): one graph, forward and backward):
    the eager numbers of the same backend."""
    fn = COMPILE_CASES[name]
    s = logits(6, 10, seed=47, device=device)
    t = logits(6, 10, seed=48, device=device)
    y = torch.tensor([1, 2, -100, 3, 0, 9], device=device)
    if not compiled:
        check(lambda s, t, b: fn(s, t, y, b), s, t, backend)
        return
    eager = lambda s, t: fn(s, t, y, backend)  # noqa: E731
    got = loss_and_grads(compile_fullgraph(eager), s, t)
    for g, e in zip(got, loss_and_grads(eager, s, t)):
        torch.testing.assert_close(g, e)


# --- GPU only: larger shapes, the two kernel backends ----------------------------------------------------------

LOGIT_CASES = {
    "jsd-0.3": lambda s, t, b: KF.jsd_loss(s, t, beta=0.3, temperature=2.0, backend=b),
    "jsd-0.5": lambda s, t, b: KF.jsd_loss(s, t, beta=0.5, backend=b),
}


@on_gpu_kernels
@gpu_logit_sizes
@pytest.mark.parametrize("name", sorted(LOGIT_CASES))
def test_jsd_on_gpu(backend, device, name, size):
    assert_logits_on_gpu(LOGIT_CASES[name], backend, device, size)


@on_gpu_kernels
def test_masked_tokens_strided_rows_and_masked_vocabulary_on_gpu(backend, device):
    s, t, labels = shifted_masked_tokens(device)
    assert_matches_reference(lambda s, t, b: KF.jsd_loss(s, t, beta=0.7, labels=labels, backend=b), s, t,
                             backend=backend, rtol=1e-4, atol=1e-5)
