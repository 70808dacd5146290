"""A temperature given as a tensor: learnable (a 0-d `nn.Parameter`, as in CTKD) or one per row, with its gradient.

Every logit loss with a temperature (`kd_loss`, `kl_div_loss`, `jsd_loss`, `dkd_loss`, and `mutual_learning_loss`
through `kd_loss`) takes it on every backend. The kernels make the temperature's gradient in the same pass as the
logits' (fastkd/kernel_ops.py: `d_T`); the reference gets it from autograd. Compared here: loss and the gradients
of student, teacher and temperature against the reference (the reference against itself in float64), both row
paths of the Triton kernels, grad_output of 1, 0.5, 0 and per row, 16-bit logits, torch.compile, the float
temperature (the same numbers), non-positive temperatures (NaN), validation, and a module that learns T.
"""
import pytest
import torch
from helpers import (assert_matches_reference, compile_fullgraph, labels_for, logits, loss_and_grads,
                     shifted_masked_tokens, targets)

import fastkd
from fastkd import functional as KF
from fastkd import reference as R


def temperatures(kind, rows_shape, device, dtype=torch.float32):
    """A 0-d temperature, one per row, or one per sequence broadcast over its tokens (`(B, 1)` for `(B, L)`)."""
    if kind == "scalar":
        return torch.tensor(2.5, device=device, dtype=dtype)
    g = torch.Generator().manual_seed(7)
    shape = rows_shape if kind == "per_row" else (rows_shape[0],) + (1,) * (len(rows_shape) - 1)
    return (0.5 + 3.0 * torch.rand(shape, generator=g)).to(device=device, dtype=dtype)


LOSSES = {
    "kd": lambda s, t, T, b: KF.kd_loss(s, t, T, backend=b),
    "kd_ce_sum": lambda s, t, T, b: KF.kd_loss(s, t, T, reduction="sum", target=torch.arange(s.shape[0],
                                               device=s.device) % s.shape[-1], ce_weight=0.3, kd_weight=0.7,
                                               backend=b),
    "kl_forward": lambda s, t, T, b: KF.kl_div_loss(s, t, T, backend=b),
    "kl_reverse": lambda s, t, T, b: KF.kl_div_loss(s, t, T, direction="reverse", backend=b),
    "jsd": lambda s, t, T, b: KF.jsd_loss(s, t, beta=0.3, temperature=T, backend=b),
    "dkd": lambda s, t, T, b: KF.dkd_loss(s, t, torch.arange(s.shape[0], device=s.device) % s.shape[-1],
                                          temperature=T, backend=b),
}


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("kind", ["scalar", "per_row"])
@pytest.mark.parametrize("V", [1, 9, 45])
def test_matches_reference(backend, device, name, kind, V, small_blocks):
    # Rows of 45 run through several 16-column blocks of the Triton kernels (small_blocks); 9 through one.
    s, t = logits(6, V, seed=1, device=device), logits(6, V, seed=2, device=device)
    T = temperatures(kind, (6,), device)
    assert_matches_reference(LOSSES[name], s, t, T, backend=backend)


@pytest.mark.parametrize("loss", ["kl_forward", "kl_reverse", "jsd"])
@pytest.mark.parametrize("kind", ["scalar", "per_row", "per_sequence"])
def test_token_losses_masked(backend, device, loss, kind, small_blocks):
    s, t = logits(2, 5, 37, seed=3, device=device), logits(2, 5, 37, seed=4, device=device)
    labels = labels_for((2, 5), device, masked=(1, 4, 5))
    T = temperatures(kind, (2, 5), device)
    fns = {"kl_forward": lambda s, t, T, b: KF.kl_div_loss(s, t, T, labels=labels, backend=b),
           "kl_reverse": lambda s, t, T, b: KF.kl_div_loss(s, t, T, direction="reverse", labels=labels, backend=b),
           "jsd": lambda s, t, T, b: KF.jsd_loss(s, t, beta=0.7, temperature=T, labels=labels, backend=b)}
    assert_matches_reference(fns[loss], s, t, T, backend=backend)


@pytest.mark.parametrize("loss", ["kl_forward", "kl_reverse", "jsd"])
def test_minus_infinity_in_the_vocabulary(backend, device, loss, small_blocks):
    # A padded vocabulary (-inf past column 500), masked tokens, strided rows (`logits[:, :-1]`).
    s, t, labels = shifted_masked_tokens(device)
    T = temperatures("per_row", labels.shape, device)
    fns = {"kl_forward": lambda s, t, T, b: KF.kl_div_loss(s, t, T, labels=labels, backend=b),
           "kl_reverse": lambda s, t, T, b: KF.kl_div_loss(s, t, T, direction="reverse", labels=labels, backend=b),
           "jsd": lambda s, t, T, b: KF.jsd_loss(s, t, temperature=T, labels=labels, backend=b)}
    got = assert_matches_reference(fns[loss], s, t, T, backend=backend)
    assert all(bool(torch.isfinite(x).all()) for x in got)


@pytest.mark.parametrize("grad_output", [1.0, 0.5, 0.0, "per_row"])
def test_grad_output(backend, device, grad_output):
    s, t = logits(5, 23, seed=5, device=device), logits(5, 23, seed=6, device=device)
    T = temperatures("per_row", (5,), device)
    reduction = "none" if grad_output == "per_row" else "batchmean"
    upstream = (logits(5, seed=7, device=device) if grad_output == "per_row"
                else torch.tensor(grad_output, device=device))
    y = targets(5, 23, device)
    fn = lambda s, t, T, b: KF.kd_loss(s, t, T, reduction=reduction, target=y, ce_weight=0.5, backend=b)  # noqa: E731
    assert_matches_reference(fn, s, t, T, backend=backend, grad_output=upstream)


@pytest.mark.parametrize("name", list(LOSSES))
def test_a_tensor_equal_to_the_number_gives_the_same_loss(backend, device, name):
    s, t = logits(4, 19, seed=8, device=device), logits(4, 19, seed=9, device=device)
    with_number = loss_and_grads(lambda s, t: LOSSES[name](s, t, 2.5, backend), s, t)
    with_tensor = loss_and_grads(lambda s, t: LOSSES[name](s, t, torch.tensor(2.5, device=device), backend), s, t)
    for a, b in zip(with_number, with_tensor):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["kd_ce_sum", "jsd", "dkd"])
def test_16_bit_logits(backend, device, dtype, name, small_blocks):
    # The kernels and the reference both compute in float32 from the same 16-bit values: they agree to float32
    # rounding (the gradients of the logits are rounded once to 16 bits).
    if backend == "torch":
        pytest.skip("compares the kernels with the reference on the same 16-bit inputs")
    s, t = logits(6, 40, seed=10, device=device, dtype=dtype), logits(6, 40, seed=11, device=device, dtype=dtype)
    T = temperatures("per_row", (6,), device)
    got = loss_and_grads(lambda *x: LOSSES[name](*x, backend), s, t, T)
    want = loss_and_grads(lambda *x: LOSSES[name](*x, "torch"), s, t, T)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for g, w in zip(got[1:3], want[1:3]):
        torch.testing.assert_close(g, w, rtol=1e-2, atol=1e-2 * w.abs().max().item())
    torch.testing.assert_close(got[3], want[3], rtol=1e-4, atol=1e-5 * want[3].abs().max().item())


def test_non_positive_temperature_gives_nan(backend, device):
    s, t = logits(3, 11, seed=12, device=device), logits(3, 11, seed=13, device=device)
    T = torch.tensor([2.0, 0.0, -1.0], device=device)
    per_row = KF.kd_loss(s, t, T, reduction="none", backend=backend)
    assert torch.isfinite(per_row[0]) and per_row[1:].isnan().all()
    assert KF.jsd_loss(s, t, temperature=T, backend=backend).isnan()
    assert KF.dkd_loss(s, t, targets(3, 11, device), temperature=T, backend=backend).isnan()


def test_compiled_equals_eager(backend, device):
    s, t = logits(4, 21, seed=14, device=device), logits(4, 21, seed=15, device=device)
    T = temperatures("per_row", (4,), device)
    y = targets(4, 21, device)
    fn = lambda s, t, T: KF.kd_loss(s, t, T, target=y, ce_weight=0.2, backend=backend)  # noqa: E731
    eager = loss_and_grads(fn, s, t, T)
    compiled = loss_and_grads(compile_fullgraph(fn), s, t, T)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_logits_not_saved_for_backward(backend, device):
    if backend == "torch":
        pytest.skip("the kernel losses' saved tensors")
    s = logits(4, 33, seed=16, device=device).requires_grad_()
    t = logits(4, 33, seed=17, device=device)
    T = torch.tensor(3.0, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = KF.kd_loss(s, t, T, backend=backend)
    assert not any(x.data_ptr() in (s.data_ptr(), t.data_ptr()) for x in saved)
    assert max(x.numel() for x in saved) <= s.numel()  # the student's gradient buffer, nothing bigger
    loss.backward()
    assert T.grad is not None and torch.isfinite(T.grad)


def reference_loss(name):
    """The reference functions, for gradcheck, with their float64 inputs (T as a tensor per row)."""
    target = torch.tensor([0, 3, 1])
    labels = torch.tensor([1, -100, 2])
    return {
        "kd": lambda s, t, T: R.kd_loss(s, t, T, target=target, ce_weight=0.3),
        "kl_reverse": lambda s, t, T: R.kl_div_loss(s, t, T, direction="reverse", labels=labels),
        "jsd": lambda s, t, T: R.jsd_loss(s, t, beta=0.4, temperature=T),
        "dkd": lambda s, t, T: R.dkd_loss(s, t, target, temperature=T),
    }[name]


@pytest.mark.parametrize("name", ["kd", "kl_reverse", "jsd", "dkd"])
def test_reference_gradcheck(name):
    g = torch.Generator().manual_seed(18)
    s = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    T = (1.0 + torch.rand(3, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(reference_loss(name), (s, t, T))


def test_module_learns_the_temperature(backend, device):
    # CTKD's learnable temperature: a parameter of the loss module, updated by the optimizer with the model.
    loss_fn = fastkd.losses.KDLoss(torch.nn.Parameter(torch.tensor(4.0, device=device)), backend=backend)
    assert [name for name, _ in loss_fn.named_parameters()] == ["temperature"]
    optimizer = torch.optim.SGD(loss_fn.parameters(), lr=0.1)
    s, t = logits(8, 10, seed=19, device=device), logits(8, 10, seed=20, device=device)
    T = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    R.kd_loss(s.double(), t.double(), T.expand(8)).backward()
    loss_fn(s, t).backward()
    torch.testing.assert_close(loss_fn.temperature.grad.double(), T.grad, rtol=1e-4, atol=1e-6)
    optimizer.step()
    assert loss_fn.temperature.item() != 4.0


def test_mutual_learning_with_a_tensor_temperature(backend, device):
    cohort = [logits(4, 6, seed=21 + k, device=device) for k in range(3)]
    T = torch.tensor(2.0, device=device)
    got = KF.mutual_learning_loss(cohort, targets(4, 6, device), temperature=T, backend=backend)
    want = KF.mutual_learning_loss(cohort, targets(4, 6, device), temperature=2.0, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_bad_temperatures_name_the_argument():
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    with pytest.raises(TypeError, match="temperature must be a floating-point tensor"):
        KF.kl_div_loss(s, t, torch.tensor(2))
    with pytest.raises(ValueError, match=r"broadcasts to the rows of the logits \(2, 3\).*got \(3, 2\)"):
        KF.kl_div_loss(s, t, torch.ones(3, 2))
    with pytest.raises(ValueError, match="temperature must be on the logits' device cpu, got meta"):
        KF.jsd_loss(s, t, temperature=torch.ones((), device="meta"))
    with pytest.raises(TypeError, match="temperature must be a positive Python number or a floating-point tensor"):
        KF.kd_loss(s, t, "4")
    with pytest.raises(ValueError, match="temperature must be positive"):
        KF.kd_loss(s, t, -1.0)
    with pytest.raises(TypeError, match="temperature must be a floating-point tensor"):
        fastkd.losses.KDLoss(torch.tensor(4))


def test_module_keeps_a_fixed_tensor_temperature_as_a_buffer():
    loss_fn = fastkd.losses.KLDistillationLoss(torch.tensor(2.0))
    assert "temperature" in dict(loss_fn.named_buffers()) and not list(loss_fn.parameters())
    assert "temperature" in loss_fn.state_dict()
    s, t = torch.randn(3, 7), torch.randn(3, 7)
    torch.testing.assert_close(loss_fn(s, t), KF.kl_div_loss(s, t, 2.0))
