"""The Triton KD / KL kernels against the reference: forward, both gradients, every option.

Without a GPU they run in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1),
so the shapes are small; with a GPU the same tests also run on CUDA tensors, plus realistic shapes.
"""
import pytest
import torch

import fastkd
from fastkd import functional as KF

pytest.importorskip("triton")
import fastkd.triton as fkt  # noqa: E402
from fastkd.triton import ops, rows  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
needs_interpreter = pytest.mark.skipif(fkt.unavailable_reason(torch.device("cpu")) is not None,
                                       reason="CPU tensors need TRITON_INTERPRET=1 set before import")


def kernel_device(device):
    if device == "cpu" and fkt.unavailable_reason(torch.device("cpu")) is not None:
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    return device


def logits(*shape, seed, device, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)


def loss_and_grads(fn, student, teacher, grad_output=None):
    s = student.detach().clone().requires_grad_()
    t = teacher.detach().clone().requires_grad_()
    loss = fn(s, t)
    loss.backward(grad_output if grad_output is not None else torch.ones_like(loss))
    return loss.detach(), s.grad, t.grad


def assert_matches_reference(fn, student, teacher, rtol=1e-5, atol=1e-6, grad_output=None):
    """fn(..., backend=b) for b = triton and torch: same loss and the same student and teacher gradients."""
    got = loss_and_grads(lambda s, t: fn(s, t, "triton"), student, teacher, grad_output)
    want = loss_and_grads(lambda s, t: fn(s, t, "torch"), student, teacher, grad_output)
    for g, w, what in zip(got, want, ("loss", "student grad", "teacher grad")):
        assert g.dtype == w.dtype, what
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 16 columns, so a row of a few dozen runs through several blocks of the online softmax."""
    monkeypatch.setattr(rows, "MAX_BLOCK_V", 16)


VOCABS = [1, 7, 100, 1037]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_loss(device, V, T):
    device = kernel_device(device)
    s, t = logits(5, V, seed=1, device=device), logits(5, V, seed=2, device=device)
    assert_matches_reference(lambda s, t, b: KF.kd_loss(s, t, T, backend=b), s, t)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_kd_loss_with_hard_labels(device, reduction, small_blocks):
    device = kernel_device(device)
    s, t = logits(6, 45, seed=3, device=device), logits(6, 45, seed=4, device=device)
    y = torch.tensor([0, 44, 3, 17, 16, 15], device=device)
    weights = logits(6, seed=5, device=device) if reduction == "none" else None
    assert_matches_reference(lambda s, t, b: KF.kd_loss(s, t, 2.0, reduction=reduction, target=y, ce_weight=0.3,
                                                        kd_weight=0.7, backend=b), s, t, grad_output=weights)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_kl_div_loss_masked_tokens(device, direction, reduction, small_blocks):
    device = kernel_device(device)
    s, t = logits(2, 5, 37, seed=6, device=device), logits(2, 5, 37, seed=7, device=device)
    labels = torch.tensor([[1, -100, 2, 3, -100], [-100, 0, 0, 5, 9]], device=device)
    weights = logits(2, 5, seed=8, device=device) if reduction == "none" else None
    assert_matches_reference(lambda s, t, b: KF.kl_div_loss(s, t, 1.5, direction=direction, labels=labels,
                                                            reduction=reduction, backend=b),
                             s, t, grad_output=weights)


@pytest.mark.parametrize("device", DEVICES)
def test_all_tokens_ignored_gives_zero_and_zero_gradients(device):
    device = kernel_device(device)
    s = logits(3, 11, seed=9, device=device).requires_grad_()
    t = logits(3, 11, seed=10, device=device)
    s.data[1] = float("nan")  # an ignored token's logits are never read
    loss = KF.kl_div_loss(s, t, labels=torch.full((3,), -100, device=device), backend="triton")
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_non_contiguous_rows(device, direction, small_blocks):
    # logits[:, :-1] of a (B, S+1, V) tensor, the usual next-token slice: rows addressed by strides.
    device = kernel_device(device)
    s_full, t_full = logits(2, 6, 29, seed=11, device=device), logits(2, 6, 29, seed=12, device=device)
    s, t = s_full[:, :-1], t_full[:, :-1]
    assert not s.is_contiguous()
    assert_matches_reference(lambda s, t, b: KF.kl_div_loss(s, t, 2.0, direction=direction, backend=b), s, t)
    transposed = logits(29, 4, seed=13, device=device).T  # column stride != 1
    assert_matches_reference(lambda s, t, b: KF.kd_loss(s, t, 3.0, backend=b), transposed, transposed.flip(0))


@pytest.mark.parametrize("device", DEVICES)
def test_one_row_and_one_class(device):
    device = kernel_device(device)
    s, t = logits(1, 9, seed=14, device=device), logits(1, 9, seed=15, device=device)
    assert_matches_reference(lambda s, t, b: KF.kd_loss(s, t, backend=b), s, t)
    one = logits(4, 1, seed=16, device=device)
    loss, gs, gt = loss_and_grads(lambda s, t: KF.kd_loss(s, t, backend="triton"), one, one.flip(0))
    assert loss.item() == 0.0 and torch.equal(gs, torch.zeros_like(gs)) and torch.equal(gt, torch.zeros_like(gt))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_masked_vocabulary_and_underflow(device, direction, small_blocks):
    device = kernel_device(device)
    s, t = logits(4, 40, seed=17, device=device), logits(4, 40, seed=18, device=device)
    s[:, 30:] = float("-inf")  # padded vocabulary, masked in both
    t[:, 30:] = float("-inf")
    p_side = t if direction == "forward" else s  # the distribution the KL is taken under
    p_side[:, 5] = -1e4  # a probability that underflows to 0
    p_side[0, 7] = float("-inf")  # masked on one side only: probability 0 there
    assert_matches_reference(lambda s, t, b: KF.kl_div_loss(s, t, direction=direction, backend=b), s, t)
    loss, gs, gt = loss_and_grads(lambda s, t: KF.kl_div_loss(s, t, direction=direction, backend="triton"), s, t)
    assert torch.isfinite(loss) and torch.isfinite(gs).all() and torch.isfinite(gt).all()


@pytest.mark.parametrize("device", DEVICES)
def test_student_masked_where_teacher_has_mass_is_infinite(device, small_blocks):
    device = kernel_device(device)
    s, t = logits(2, 40, seed=19, device=device), logits(2, 40, seed=20, device=device)
    s[1, 33] = float("-inf")
    loss = KF.kl_div_loss(s, t, reduction="none", backend="triton")
    assert torch.isfinite(loss[0]) and loss[1].item() == float("inf")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_inputs_never_give_a_finite_loss(device, bad):
    device = kernel_device(device)
    for which in (0, 1):
        s, t = logits(3, 20, seed=21, device=device), logits(3, 20, seed=22, device=device)
        (s, t)[which][1, 4] = bad
        assert not torch.isfinite(KF.kd_loss(s, t, backend="triton"))


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_range_target_gives_nan_not_a_bad_read(device):
    device = kernel_device(device)
    s, t = logits(2, 5, seed=23, device=device), logits(2, 5, seed=24, device=device)
    kl, ce, _ = ops.kl_rows(s, t, 1.0, False, torch.tensor([1, 9], device=device))
    assert torch.isfinite(ce[0]) and torch.isnan(ce[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_low_precision_error_within_twice_pytorch(device, dtype, direction):
    """The kernel's error against float64 (on the same rounded inputs) is at most ~2x that of PyTorch computing
    the loss in the input dtype end to end; the gradient comes back in the input dtype."""
    device = kernel_device(device)
    s, t = logits(8, 300, seed=25, device=device, dtype=dtype), logits(8, 300, seed=26, device=device, dtype=dtype)
    exact = KF.kl_div_loss(s.double(), t.double(), 2.0, direction=direction, backend="torch")
    ls, lt = torch.log_softmax(s / 2.0, -1), torch.log_softmax(t / 2.0, -1)  # all in `dtype`
    plain = ((lt.exp() * (lt - ls)) if direction == "forward" else (ls.exp() * (ls - lt))).sum(-1).mean()
    s = s.requires_grad_()
    kernel = KF.kl_div_loss(s, t, 2.0, direction=direction, backend="triton")
    kernel.backward()
    assert kernel.dtype == torch.float32 and s.grad.dtype == dtype
    assert abs(kernel.double() - exact) <= 2 * abs(plain.double() - exact) + 1e-6 * abs(exact)


@needs_interpreter
def test_opcheck():
    s = logits(3, 10, seed=27, device="cpu").requires_grad_()
    t = logits(3, 10, seed=28, device="cpu").requires_grad_()
    y = torch.tensor([1, 2, 3])
    labels = torch.tensor([0, -100, 4])
    for args in [(s, t, 2.0, False, y, None, -100), (s, t, 1.0, True, None, labels, -100)]:
        torch.library.opcheck(ops.kl_rows_op, args)


@needs_interpreter
@pytest.mark.parametrize("name", ["kd_loss", "kl_div_loss"])
def test_compiles_in_one_graph(name):
    torch._dynamo.reset()
    s = logits(4, 33, seed=29, device="cpu").requires_grad_()
    t = logits(4, 33, seed=30, device="cpu")
    y = torch.tensor([0, 5, 32, 7])
    fn = {
        "kd_loss": lambda s, t: KF.kd_loss(s, t, 4.0, target=y, ce_weight=0.1, kd_weight=0.9, backend="triton"),
        "kl_div_loss": lambda s, t: KF.kl_div_loss(s, t, 2.0, direction="reverse", labels=y - 5, backend="triton"),
    }[name]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss = compiled(s, t)
    (grad,) = torch.autograd.grad(loss, s)
    expected = fn(s, t)
    (expected_grad,) = torch.autograd.grad(expected, s)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_auto_picks_triton_only_for_cuda_tensors():
    from fastkd import _dispatch
    assert _dispatch.resolve("kd_loss", "auto", torch.device("cpu")) is fastkd.reference.kd_loss
    assert _dispatch.resolve("kd_loss", "auto", torch.device("cuda")) is fastkd.triton.losses.LOSSES["kd_loss"]


def test_cpu_tensors_without_the_interpreter_say_why(monkeypatch):
    monkeypatch.setattr(fkt, "INTERPRET", False)
    assert "TRITON_INTERPRET=1" in fkt.unavailable_reason(torch.device("cpu"))
    with pytest.raises(fastkd.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        KF.kd_loss(torch.randn(2, 3), torch.randn(2, 3), backend="triton")


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.parametrize("N,V", [(2048, 32000), (512, 128256), (64, 262144)])
def test_realistic_shapes_bf16_on_gpu(N, V):
    s = logits(N, V, seed=31, device="cuda", dtype=torch.bfloat16)
    t = logits(N, V, seed=32, device="cuda", dtype=torch.bfloat16)
    assert_matches_reference(lambda s, t, b: KF.kl_div_loss(s, t, backend=b), s, t, rtol=2e-3, atol=1e-5)


@gpu
def test_offsets_beyond_two_to_the_31_on_gpu():
    # 16400 x 131072 bf16 = 2^31 + 2^27 elements (4.3 GB a tensor): 32-bit offsets would wrap around.
    N, V = 16400, 131072
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2 ** 30:
        pytest.skip("needs about 40 GB of GPU memory")
    s = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    t = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    per_row = KF.kl_div_loss(s, t, reduction="none", backend="triton")
    tail = slice(N - 3, N)  # rows past 2^31 elements
    torch.testing.assert_close(per_row[tail], KF.kl_div_loss(s[tail], t[tail], reduction="none", backend="torch"),
                               rtol=1e-4, atol=1e-5)
