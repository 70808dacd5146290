"""rkd_loss, rkd_distance_loss and rkd_angle_loss (relational KD) on every backend: forward and gradient.

Each test takes the `backend` fixture (tests/conftest.py): "torch" (the reference), "triton" (CUDA tensors, or
without a GPU CPU tensors in Triton's interpreter: small shapes) and "cuda" (the CUDA C++ extension, GPU only).
A kernel backend is compared with the reference on the same inputs; the reference itself with the reference
in float64 on the same values, at the same tolerances. The GPU-only tests (realistic shapes, B = 4096) run the
two kernel backends.
"""
import pytest
import torch
from helpers import (RKD_LOSSES, assert_close_to_reference, assert_error_within_twice_reference,
                     assert_matches_reference, close, compile_fullgraph, eager_and_compiled, features,
                     float64_reference, kernels_only, logits, loss_and_grads, on_gpu_kernels)

from fastkd import functional as KF
from fastkd import reference

# The reference's Gram products in true float32 on CUDA, as on CPU (TF32 would make eager the noisy one).
pytestmark = pytest.mark.usefixtures("no_tf32")


def reference_value(fn, s, t, backend):
    """The loss a backend's is compared with: the reference's, or for the reference itself its float64 value."""
    if backend == "torch":
        return fn(s.double(), t.double(), "torch").to(torch.float32)
    return fn(s, t, "torch")


@pytest.mark.parametrize("B", [2, 3, 7, 33])
@pytest.mark.parametrize("D", [1, 5, 17])
@pytest.mark.parametrize("name", sorted(RKD_LOSSES))
def test_rkd_matches_reference(backend, device, B, D, name):
    """Degenerate cases have an exactly zero gradient in exact arithmetic, where the Gram form leaves
    float32 rounding noise: at B = 2 both terms are constant (one distance, normalised to 1; every angle 1),
    and at D = 1 every angle is +-1. There the gradient is checked against an absolute 1e-6 (per unit of
    angle weight) instead."""
    s = features(B, D, seed=B * 100 + D, device=device)
    t = features(B, D + 3, seed=B * 100 + D + 1, device=device)
    if D == 1:  # points at least ~1/B of the spread apart, so rounding noise is not blown up by 1/gap^2
        s = (torch.linspace(-2.0, 2.0, B) + 0.3 / B * features(B, seed=B, device="cpu"))[
            torch.randperm(B, generator=torch.Generator().manual_seed(B))].to(device)[:, None]
    grad_atol = None
    if B == 2 or (D == 1 and "angle" in name):
        grad_atol = 1e-6
    elif D == 1 and name == "rkd_loss":
        grad_atol = 50 * 1e-6  # the angle term's noise, times its weight
    assert_close_to_reference(RKD_LOSSES[name], s, t, backend, grad_atol=grad_atol)


def test_rkd_image_features_non_contiguous(backend, device):
    """(B, C, H, W) features flattened; a non-contiguous student (a channel slice) and a transposed teacher."""
    s = features(6, 5, 3, 3, seed=1, device=device)[:, 1:4]
    t = features(6, 4, 4, seed=2, device=device).transpose(1, 2)
    for fn in RKD_LOSSES.values():
        assert_close_to_reference(fn, s, t, backend)


@pytest.mark.parametrize("weights", [(0.0, 50.0), (25.0, 0.0), (0.0, 0.0), (-1.5, 3.0)])
def test_rkd_weights(backend, device, weights):
    s = features(5, 4, seed=3, device=device)
    t = features(5, 6, seed=4, device=device)
    w_d, w_a = weights

    def fn(s, t, b):
        return KF.rkd_loss(s, t, distance_weight=w_d, angle_weight=w_a, backend=b)
    if weights == (0.0, 0.0):
        s = s.requires_grad_()
        loss = fn(s, t, backend)
        assert loss.item() == 0.0 and loss.dtype == torch.float32
        return
    assert_close_to_reference(fn, s, t, backend)


def test_rkd_duplicate_rows(backend, device):
    """Exact duplicates: distance loss and gradient match; angle forward matches (the duplicate pair's angles
    are 0, as F.normalize's zero vector). The reference's angle gradient there is scaled by 1/1e-12 (the
    normalize clamp on a zero vector): meaningless, so only a teacher with duplicates is checked for it."""
    s = features(7, 9, seed=5, device=device)
    s[4] = s[1]
    s[6] = s[1]
    t = features(7, 5, seed=6, device=device)
    t[2] = t[0]
    for name in ("rkd_distance_loss", "rkd_distance_loss_squared"):
        assert_close_to_reference(RKD_LOSSES[name], s, t, backend)
    angle = RKD_LOSSES["rkd_angle_loss"]
    close(angle(s, t, backend), reference_value(angle, s, t, backend), 1e-5, "angle loss, student duplicates")
    s_unique = features(7, 9, seed=7, device=device)
    assert_close_to_reference(angle, s_unique, t, backend)  # teacher duplicates: forward and gradient


def within_tolerance_rule(fn, s, t, backend, what):
    """The kernel's error against float64 is at most twice eager float32's (the reference run in float32), or
    twice 4 roundings of the result when eager is more accurate than that: value relative, gradient relative
    to its largest entry. No absolute tolerance."""
    exact = float64_reference(fn, s, t)
    got = loss_and_grads(lambda a, b: fn(a, b, backend), s, t)
    plain = loss_and_grads(lambda a, b: fn(a, b, "torch"), s, t)
    floor = 4 * 2.0 ** -24
    for i, part in ((0, "loss"), (1, "grad")):
        scale = exact[i].abs().max().item()
        if scale == 0.0:  # e.g. every squared distance under the clamp: the exact gradient is 0
            assert torch.equal(got[i], torch.zeros_like(got[i])), f"{what} {part}: not exactly 0"
            continue
        err = (got[i].double() - exact[i]).abs().max().item() / scale
        ref_err = (plain[i].double() - exact[i]).abs().max().item() / scale
        assert err <= 2 * max(ref_err, floor), f"{what} {part}: {err:.2e} vs eager float32 {ref_err:.2e}"


@pytest.mark.parametrize("gap", [1e-2, 1e-3, 1e-4, 1e-5])
def test_rkd_near_duplicates_and_offset(backend, device, gap):
    """Rows `gap` apart (relative) in batches far from the origin, on both sides, and a tight cluster: where
    a float32 Gram form loses `eps |x| / gap` in the angles and `eps |x| / gap^2` in their gradient (60% at
    1e-4). The kernels stay within the tolerance rule with no slack: they are accurate, not excused."""
    kernels_only(backend)
    s = features(9, 16, seed=8, device=device, offset=50.0)
    s[3] = s[2] + gap * features(16, seed=9, device=device)
    s[5] = s[2] - gap * features(16, seed=10, device=device)
    t = features(9, 8, seed=11, device=device, offset=-20.0)
    t[7] = t[1] + gap * features(8, seed=12, device=device)
    cluster = features(9, 12, seed=13, device=device, scale=gap) + 3.0 * features(12, seed=14, device=device)
    for name, fn in RKD_LOSSES.items():
        within_tolerance_rule(fn, s, t, backend, name)
        within_tolerance_rule(fn, t, s, backend, name + " (swapped)")
        within_tolerance_rule(fn, cluster, t, backend, name + " (cluster)")


@pytest.mark.parametrize("B,D", [(2, 7), (6, 1), (2, 1)])
def test_rkd_angle_degenerate_is_exact(backend, device, B, D):
    """At B = 2 (the only triples are j = k, every angle 1) and D = 1 (every angle +-1) the angle loss is
    piecewise constant: its gradient is exactly 0, and the loss exactly that of the angles' signs."""
    if backend == "torch" and B > 2:
        pytest.skip("the reference's gradient at D = 1 is rounding noise (~1e-8), not exactly 0: a kernel property")
    s = features(B, D, seed=15, device=device).requires_grad_()
    t = features(B, D + 2, seed=16, device=device)
    loss = KF.rkd_angle_loss(s, t, backend=backend)
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s.grad))
    if B == 2:
        assert loss.item() == 0.0
    else:
        exact = KF.rkd_angle_loss(s.detach().double(), t.double(), backend="torch")
        assert abs(loss.item() - exact.item()) <= 4 * 2.0 ** -24 * abs(exact.item())


@pytest.mark.parametrize("name", sorted(RKD_LOSSES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rkd_bf16(backend, device, name, dtype):
    """bf16 inputs, float32 arithmetic: error against float64 on the same inputs at most ~2x the reference's."""
    kernels_only(backend)
    s = features(11, 24, seed=13, device=device, dtype=dtype)
    t = features(11, 12, seed=14, device=device, dtype=dtype)
    got = assert_error_within_twice_reference(RKD_LOSSES[name], s, t, backend, device, 1e-5)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype


def test_rkd_float64_falls_back_to_reference(backend, device):
    s = features(4, 3, seed=15, device=device, dtype=torch.float64)
    t = features(4, 3, seed=16, device=device, dtype=torch.float64)
    assert KF.rkd_loss(s, t, backend=backend).dtype == torch.float64
    torch.testing.assert_close(KF.rkd_loss(s, t, backend=backend), KF.rkd_loss(s, t, backend="torch"))


def test_rkd_under_autocast(backend, device):
    """Autocast makes the reference's Gram product bf16 (`x @ x.T`); the kernels difference float32 rows
    whatever autocast says, and the gradient comes back in the input's dtype."""
    s = features(6, 8, seed=49, device=device).requires_grad_()
    t = features(6, 5, seed=50, device=device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        got = KF.rkd_loss(s, t, backend=backend)
        want = KF.rkd_loss(s, t, backend="torch")
    got.backward()
    assert s.grad.dtype == torch.float32 and torch.isfinite(s.grad).all()
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0)


@eager_and_compiled
def test_eager_and_compiled(backend, device, compiled):
    """Eager: against the reference. Compiled (torch.compile(fullgraph=True): one graph, forward and backward):
    the eager numbers of the same backend."""
    s, t = features(6, 10, seed=37, device=device), features(6, 7, seed=38, device=device)
    if not compiled:
        assert_close_to_reference(RKD_LOSSES["rkd_loss"], s, t, backend)
        return

    def fn(a, b):
        return KF.rkd_loss(a, b, backend=backend)
    got = loss_and_grads(compile_fullgraph(fn), s, t)
    want = loss_and_grads(fn, s, t)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


# --- realistic shapes, GPU only, the two kernel backends -------------------------------------------------------

def _chunked_angle_sum(x: torch.Tensor, y: torch.Tensor, chunk: int = 16) -> float:
    """sum_ijk Huber(A^x - A^y) without autograd, a few apexes i at a time (float32, for large B)."""
    total = 0.0
    for start in range(0, x.shape[0], chunk):
        ex = torch.nn.functional.normalize(x[None, :, :] - x[start:start + chunk, None, :], dim=2)
        ey = torch.nn.functional.normalize(y[None, :, :] - y[start:start + chunk, None, :], dim=2)
        a = torch.bmm(ex, ex.transpose(1, 2)) - torch.bmm(ey, ey.transpose(1, 2))
        total += torch.nn.functional.smooth_l1_loss(a, torch.zeros_like(a), reduction="sum").double().item()
    return total


def test_chunked_angle_sum_helper():
    """The helper the large-batch GPU test compares with is the reference's angle loss, summed."""
    s, t = features(9, 4, seed=47, dtype=torch.float64), features(9, 3, seed=48, dtype=torch.float64)
    want = reference.rkd_angle_loss(s, t).item() * 9 ** 3
    assert abs(_chunked_angle_sum(s, t, chunk=4) - want) <= 1e-12 * abs(want)


@on_gpu_kernels
def test_gpu_rkd_large_batch(backend, device):
    """B = 4096, D = 2048: loss against a chunked reference, finite gradient, memory O(B^2 + B D)."""
    B, D = 4096, 2048
    s = features(B, D, seed=41, device=device).requires_grad_()
    t = features(B, D, seed=42, device=device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = KF.rkd_angle_loss(s, t, backend=backend)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 24 * B * B * 4 + 4 * B * D * 4, peak  # a few dozen B x B float32 buffers at most
    assert torch.isfinite(s.grad).all()
    with torch.no_grad():
        want = _chunked_angle_sum(s.detach(), t) / B ** 3
    assert abs(loss.item() - want) <= 1e-4 * abs(want)
    d = KF.rkd_distance_loss(s, t, backend=backend)
    d_ref = KF.rkd_distance_loss(s, t, backend="torch")
    torch.testing.assert_close(d, d_ref, rtol=1e-4, atol=0)


@on_gpu_kernels
@pytest.mark.parametrize("B,D", [(256, 2048), (1000, 128)])
def test_gpu_rkd_realistic(backend, device, B, D):
    s = features(B, D, seed=43, device=device)
    t = features(B, D // 2, seed=44, device=device)
    for name in ("rkd_loss", "rkd_angle_loss"):
        assert_close_to_reference(RKD_LOSSES[name], s, t, backend, rtol=1e-4)


@on_gpu_kernels
@pytest.mark.parametrize("B,D", [(2, 3), (7, 17), (33, 5), (256, 512)])
def test_rkd_logit_scale_on_gpu(backend, device, B, D):
    """Inputs of scale 3 (as logits), the student's gradient only."""
    teacher = logits(B, D + 1, seed=8, device=device)
    for fn in (lambda s, b: KF.rkd_loss(s, teacher, backend=b),
               lambda s, b: KF.rkd_distance_loss(s, teacher, squared=True, backend=b)):
        assert_matches_reference(fn, logits(B, D, seed=7, device=device), backend=backend, rtol=1e-3, atol=1e-5)
