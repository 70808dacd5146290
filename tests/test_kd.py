"""kd_loss and kl_div_loss (the KL family) on every backend: forward, both gradients, every option.

Each test takes the `backend` fixture (tests/conftest.py): "torch" (the reference), "triton" (CUDA tensors, or
without a GPU CPU tensors in Triton's interpreter: small shapes) and "cuda" (the CUDA C++ extension, GPU only).
A kernel backend is compared with the reference on the same inputs; the reference itself with the reference
in float64 on the same values, at the same tolerances. The GPU-only tests (realistic shapes, offsets past
2^31) run the two kernel backends.
"""
import pytest
import torch
from helpers import (all_finite, assert_logits_on_gpu, assert_matches_reference, compile_fullgraph, eager_and_compiled,
                     gpu_logit_sizes, logits, loss_and_grads, on_gpu_kernels, shifted_masked_tokens)

from fastkd import functional as KF

VOCABS = [1, 7, 100, 1037]


@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_loss(backend, device, V, T):
    s, t = logits(5, V, seed=1, device=device), logits(5, V, seed=2, device=device)
    assert_matches_reference(lambda s, t, b: KF.kd_loss(s, t, T, backend=b), s, t, backend=backend)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_kd_loss_with_hard_labels(backend, device, reduction, small_blocks):
    s, t = logits(6, 45, seed=3, device=device), logits(6, 45, seed=4, device=device)
    y = torch.tensor([0, 44, 3, 17, 16, 15], device=device)
    weights = logits(6, seed=5, device=device) if reduction == "none" else None
    assert_matches_reference(lambda s, t, b: KF.kd_loss(s, t, 2.0, reduction=reduction, target=y, ce_weight=0.3,
                                                        kd_weight=0.7, backend=b), s, t, backend=backend,
                             grad_output=weights)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_kl_div_loss_masked_tokens(backend, device, direction, reduction, small_blocks):
    s, t = logits(2, 5, 37, seed=6, device=device), logits(2, 5, 37, seed=7, device=device)
    labels = torch.tensor([[1, -100, 2, 3, -100], [-100, 0, 0, 5, 9]], device=device)
    weights = logits(2, 5, seed=8, device=device) if reduction == "none" else None
    assert_matches_reference(lambda s, t, b: KF.kl_div_loss(s, t, 1.5, direction=direction, labels=labels,
                                                            reduction=reduction, backend=b),
                             s, t, backend=backend, grad_output=weights)


def test_all_tokens_ignored_gives_zero_and_zero_gradients(backend, device):
    s = logits(3, 11, seed=9, device=device).requires_grad_()
    t = logits(3, 11, seed=10, device=device)
    if backend != "torch":  # the kernels never read an ignored token's logits (the reference's autograd does)
        s.data[1] = float("nan")
    loss = KF.kl_div_loss(s, t, labels=torch.full((3,), -100, device=device), backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_non_contiguous_rows(backend, device, direction, small_blocks):
    # logits[:, :-1] of a (B, S+1, V) tensor, the usual next-token slice: rows addressed by strides.
    s_full, t_full = logits(2, 6, 29, seed=11, device=device), logits(2, 6, 29, seed=12, device=device)
    s, t = s_full[:, :-1], t_full[:, :-1]
    assert not s.is_contiguous()
    assert_matches_reference(lambda s, t, b: KF.kl_div_loss(s, t, 2.0, direction=direction, backend=b), s, t,
                             backend=backend)
    transposed = logits(29, 4, seed=13, device=device).T  # column stride != 1
    assert_matches_reference(lambda s, t, b: KF.kd_loss(s, t, 3.0, backend=b), transposed, transposed.flip(0),
                             backend=backend)


def test_one_row_and_one_class(backend, device):
    s, t = logits(1, 9, seed=14, device=device), logits(1, 9, seed=15, device=device)
    assert_matches_reference(lambda s, t, b: KF.kd_loss(s, t, backend=b), s, t, backend=backend)
    one = logits(4, 1, seed=16, device=device)
    loss, gs, gt = loss_and_grads(lambda s, t: KF.kd_loss(s, t, backend=backend), one, one.flip(0))
    assert loss.item() == 0.0 and torch.equal(gs, torch.zeros_like(gs)) and torch.equal(gt, torch.zeros_like(gt))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_masked_vocabulary_and_underflow(backend, device, direction, small_blocks):
    s, t = logits(4, 40, seed=17, device=device), logits(4, 40, seed=18, device=device)
    s[:, 30:] = float("-inf")  # padded vocabulary, masked in both
    t[:, 30:] = float("-inf")
    p_side = t if direction == "forward" else s  # the distribution the KL is taken under
    p_side[:, 5] = -1e4  # a probability that underflows to 0
    p_side[0, 7] = float("-inf")  # masked on one side only: probability 0 there
    assert_matches_reference(lambda s, t, b: KF.kl_div_loss(s, t, direction=direction, backend=b), s, t,
                             backend=backend)
    loss, gs, gt = loss_and_grads(lambda s, t: KF.kl_div_loss(s, t, direction=direction, backend=backend), s, t)
    assert all_finite(loss, gs, gt)


def test_student_masked_where_teacher_has_mass_is_infinite(backend, device, small_blocks):
    s, t = logits(2, 40, seed=19, device=device), logits(2, 40, seed=20, device=device)
    s[1, 33] = float("-inf")
    loss = KF.kl_div_loss(s, t, reduction="none", backend=backend)
    assert torch.isfinite(loss[0]) and loss[1].item() == float("inf")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_inputs_never_give_a_finite_loss(backend, device, bad):
    for which in (0, 1):
        s, t = logits(3, 20, seed=21, device=device), logits(3, 20, seed=22, device=device)
        (s, t)[which][1, 4] = bad
        assert not torch.isfinite(KF.kd_loss(s, t, backend=backend))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_low_precision_error_within_twice_pytorch(backend, device, dtype, direction):
    """The backend's error against float64 (on the same rounded inputs) is at most ~2x that of PyTorch computing
    the loss in the input dtype end to end; the gradient comes back in the input dtype."""
    s, t = logits(8, 300, seed=25, device=device, dtype=dtype), logits(8, 300, seed=26, device=device, dtype=dtype)
    exact = KF.kl_div_loss(s.double(), t.double(), 2.0, direction=direction, backend="torch")
    ls, lt = torch.log_softmax(s / 2.0, -1), torch.log_softmax(t / 2.0, -1)  # all in `dtype`
    plain = ((lt.exp() * (lt - ls)) if direction == "forward" else (ls.exp() * (ls - lt))).sum(-1).mean()
    s = s.requires_grad_()
    got = KF.kl_div_loss(s, t, 2.0, direction=direction, backend=backend)
    got.backward()
    assert got.dtype == torch.float32 and s.grad.dtype == dtype
    assert abs(got.double() - exact) <= 2 * abs(plain.double() - exact) + 1e-6 * abs(exact)


COMPILE_CASES = {
    "kd_loss": lambda s, t, y, b: KF.kd_loss(s, t, 4.0, target=y, ce_weight=0.1, kd_weight=0.9, backend=b),
    "kl_div_loss": lambda s, t, y, b: KF.kl_div_loss(s, t, 2.0, direction="reverse", labels=y - 5, backend=b),
}


@eager_and_compiled
@pytest.mark.parametrize("name", sorted(COMPILE_CASES))
def test_eager_and_compiled(backend, device, compiled, name):
    """Eager: against the reference. Compiled (torch.compile(fullgraph=True): one graph, forward and backward):
    the eager numbers of the same backend."""
    s, t = logits(4, 33, seed=29, device=device), logits(4, 33, seed=30, device=device)
    y = torch.tensor([0, 5, 32, 7], device=device)
    fn = COMPILE_CASES[name]
    if not compiled:
        assert_matches_reference(lambda s, t, b: fn(s, t, y, b), s, t, backend=backend, requires_grad=(True, False))
        return
    eager = lambda s, t: fn(s, t, y, backend)  # noqa: E731
    loss, grad = loss_and_grads(compile_fullgraph(eager), s, t, requires_grad=(True, False))
    expected, expected_grad = loss_and_grads(eager, s, t, requires_grad=(True, False))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


# --- GPU only: larger and realistic shapes, the two kernel backends ------------------------------------------

LOGIT_CASES = {
    "kd": lambda s, t, b: KF.kd_loss(s, t, 4.0, backend=b),
    "kd+ce": lambda s, t, b: KF.kd_loss(s, t, 2.0, target=torch.arange(s.shape[0], device="cuda") % s.shape[-1],
                                        ce_weight=0.3, kd_weight=0.7, backend=b),
    "kl-forward": lambda s, t, b: KF.kl_div_loss(s, t, 1.5, backend=b),
    "kl-reverse": lambda s, t, b: KF.kl_div_loss(s, t, 1.5, direction="reverse", backend=b),
}


@on_gpu_kernels
@gpu_logit_sizes
@pytest.mark.parametrize("name", sorted(LOGIT_CASES))
def test_logit_losses_on_gpu(backend, device, name, size):
    assert_logits_on_gpu(LOGIT_CASES[name], backend, device, size)


@on_gpu_kernels
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_masked_tokens_strided_rows_and_masked_vocabulary_on_gpu(backend, device, direction):
    s, t, labels = shifted_masked_tokens(device)
    assert_matches_reference(lambda s, t, b: KF.kl_div_loss(s, t, direction=direction, labels=labels, backend=b),
                             s, t, backend=backend, rtol=1e-4, atol=1e-5)


@on_gpu_kernels
@pytest.mark.parametrize("N,V", [(2048, 32000), (512, 128256), (64, 262144)])
def test_realistic_shapes_bf16_on_gpu(backend, device, N, V):
    s = logits(N, V, seed=31, device=device, dtype=torch.bfloat16)
    t = logits(N, V, seed=32, device=device, dtype=torch.bfloat16)
    assert_matches_reference(lambda s, t, b: KF.kl_div_loss(s, t, backend=b), s, t, backend=backend,
                             rtol=2e-3, atol=1e-5)


@on_gpu_kernels
def test_offsets_beyond_two_to_the_31_on_gpu(backend, device):
    # 16400 x 131072 bf16 = 2^31 + 2^27 elements (4.3 GB a tensor): 32-bit offsets would wrap around.
    N, V = 16400, 131072
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2 ** 30:
        pytest.skip("needs about 40 GB of GPU memory")
    s = torch.randn(N, V, device=device, dtype=torch.bfloat16)
    t = torch.randn(N, V, device=device, dtype=torch.bfloat16)
    per_row = KF.kl_div_loss(s, t, reduction="none", backend=backend)
    tail = slice(N - 3, N)  # rows past 2^31 elements
    torch.testing.assert_close(per_row[tail], KF.kl_div_loss(s[tail], t[tail], reduction="none", backend="torch"),
                               rtol=1e-4, atol=1e-5)
