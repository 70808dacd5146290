"""attention_map and at_loss (attention transfer) on every backend: forward, student and teacher gradients.

Each test takes the `backend` fixture (tests/conftest.py): "torch" (the reference), "triton" (CUDA tensors, or
without a GPU CPU tensors in Triton's interpreter: small shapes) and "cuda" (the CUDA C++ extension, GPU only).
A kernel backend is compared with the reference on the same inputs; the reference itself with the reference
in float64 on the same values, at the same tolerances. The GPU-only tests (realistic shapes) run the two kernel
backends.
"""
import pytest
import torch
from helpers import (assert_close_to_reference, assert_error_within_twice_reference, assert_matches_reference, at_fn,
                     close, compile_fullgraph, eager_and_compiled, features, float64_reference, kernels_only, logits,
                     loss_and_grads, on_gpu_kernels, reference_results)

from fastkd import functional as KF

# The reference's products in true float32 on CUDA, as on CPU.
pytestmark = pytest.mark.usefixtures("no_tf32")


@pytest.mark.parametrize("p", [1, 2, 3, 4, 2.5, 0.5])
@pytest.mark.parametrize("mode", ["code", "paper"])
def test_at_matches_reference(backend, device, p, mode):
    s = features(3, 5, 7, 6, seed=20, device=device)
    t = features(3, 4, 7, 6, seed=21, device=device)
    if not float(p).is_integer():  # non-integer powers of negative entries are NaN, in both
        s, t = s.abs(), t.abs()
    assert_close_to_reference(at_fn(p, mode), s, t, backend)


@pytest.mark.parametrize("p", [1, 3, 5])
def test_odd_power_keeps_the_sign_of_negative_entries(backend, device, p):
    """Odd integer p on signed maps (p = 5 by binary exponentiation): f^p keeps
    the sign and its derivative p f^(p-1) is even. Map, at_loss (both modes) and gradients against the
    reference, and against the reference in float64 (gradcheck'd in test_gradcheck.py)."""
    f = features(2, 3, 4, 5, seed=60 + p, device=device)
    assert (f < 0).any() and (f > 0).any()
    w = features(2, 20, seed=70, device=device)  # weights of the map's entries for its backward

    def weighted_map(b):
        return lambda s, t: (KF.attention_map(s, p, backend=b) * w.to(s.dtype)).sum() + 0.0 * t.sum()
    got = loss_and_grads(weighted_map(backend), f, f)
    want = loss_and_grads(weighted_map("torch"), f, f)
    exact = loss_and_grads(weighted_map("torch"), f.double(), f.double())
    close(got[0], want[0], 1e-5, "weighted map")
    close(got[1], want[1], 1e-5, "map gradient")
    close(got[1].double(), exact[1], 1e-5, "map gradient against float64")
    # the sign survives: the map of -f is minus the map of f
    close(KF.attention_map(-f, p, backend=backend), -KF.attention_map(f, p, backend="torch"), 1e-5, "odd map")
    t = features(2, 4, 4, 5, seed=80 + p, device=device)
    for mode in ("code", "paper"):
        assert_close_to_reference(at_fn(p, mode), f, t, backend)
        got = loss_and_grads(lambda a, b: at_fn(p, mode)(a, b, backend), f, t)
        exact = float64_reference(at_fn(p, mode), f, t)
        for g, e, what in zip(got, exact, ("loss", "student grad", "teacher grad")):
            close(g.double(), e, 1e-5, f"{mode} {what} against float64")


def test_at_negative_entries_non_integer_power(backend, device):
    """torch.pow semantics: NaN for a negative entry under a non-integer power, in every backend."""
    f = features(2, 3, 4, 4, seed=22, device=device)
    got = KF.attention_map(f, 1.5, backend=backend)
    want = KF.attention_map(f, 1.5, backend="torch")
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()


@pytest.mark.parametrize("mode", ["code", "paper"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_at_layouts_and_pooling(backend, device, mode, layout):
    """Student larger than the teacher (pooled), teacher larger than the student, odd sizes, odd channels;
    channels-last and sliced (non-contiguous) student maps; the gradient keeps the student's layout."""
    for (cs, hs, ws), (ct, ht, wt) in [((5, 8, 8), (3, 4, 4)), ((1, 3, 5), (7, 6, 10)), ((17, 5, 5), (2, 5, 5))]:
        s = features(2, cs, hs + 1, ws, seed=23 + hs, device=device)
        s = s[:, :, 1:] if layout == "sliced" else s[:, :, :hs]
        if layout == "channels_last":
            s = s.contiguous().to(memory_format=torch.channels_last)
        t = features(2, ct, ht, wt, seed=24 + ht, device=device)
        assert_close_to_reference(at_fn(3, mode), s, t, backend)
        if backend != "torch":  # the kernels' promise (the reference's autograd gives channels-first gradients)
            s_grad = loss_and_grads(lambda a, b: at_fn(2, mode)(a, b, backend), s, t)[1]
            assert s_grad.stride() == torch.empty_like(s).stride()


@pytest.mark.parametrize("layout", ["w_cropped", "w_strided", "channels_last_w_cropped"])
def test_attention_map_spatial_strides(backend, device, layout):
    """Maps whose spatial dimensions do not merge into one (a crop along W: H's stride is not W times W's) take
    the kernels' general (h, w) addressing; a W stride of 2 still merges. Forward and gradient."""
    f = features(2, 5, 6, 9, seed=60, device=device)
    if layout.startswith("channels_last"):
        f = f.to(memory_format=torch.channels_last)
    f = f[..., 1:8] if layout.endswith("w_cropped") else f[..., ::2]
    for p in (2, 3, 2.5):
        x = f.abs() if p == 2.5 else f
        w = features(2, x.shape[2] * x.shape[3], seed=61, device=device)

        def weighted_map(a, b, bk):
            return (KF.attention_map(a, p, backend=bk) * w).sum()
        got = loss_and_grads(lambda a, b: weighted_map(a, b, backend), x, x)
        want = reference_results(weighted_map, x, x, backend=backend)
        close(got[0], want[0], 1e-5, f"map {layout} p={p}")
        close(got[1], want[1], 1e-5, f"grad {layout} p={p}")


@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 3, 4, 5), (2, 3, 2, 3, 2)])
def test_attention_map_any_spatial_rank(backend, device, shape):
    f = features(*shape, seed=25, device=device)

    def map_and_grad(x, b):
        x = x.detach().clone().requires_grad_()
        out = KF.attention_map(x, 2, backend=b)
        (out * torch.arange(out.shape[1], device=device)).sum().backward()
        return out.detach(), x.grad
    got, g_got = map_and_grad(f, backend)
    want, g_want = map_and_grad(f, "torch") if backend != "torch" else [
        x.to(torch.float32) for x in map_and_grad(f.double(), "torch")]
    close(got, want, 1e-5, "map")
    close(g_got, g_want, 1e-5, "grad")


@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("mode", ["code", "paper"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_at_bf16(backend, device, p, mode, dtype):
    """Half-precision maps: loss and gradients (in the input dtype; the teacher's too, as attention transfer
    does not detach it) at most ~2x as far from float64 as the reference's, plus one rounding of the gradient:
    Triton's interpreter truncates float32 -> bf16 (compiled kernels round to nearest), a whole ulp on CPU."""
    kernels_only(backend)
    s = features(3, 6, 5, 5, seed=26, device=device, dtype=dtype)
    t = features(3, 4, 5, 5, seed=27, device=device, dtype=dtype)
    got = assert_error_within_twice_reference(at_fn(p, mode), s, t, backend, device, 1e-5)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype


def test_at_float64_falls_back_to_reference(backend, device):
    s = features(2, 3, 4, 4, seed=28, device=device, dtype=torch.float64)
    t = features(2, 3, 4, 4, seed=29, device=device, dtype=torch.float64)
    torch.testing.assert_close(KF.at_loss(s, t, backend=backend), KF.at_loss(s, t, backend="torch"))


@eager_and_compiled
def test_eager_and_compiled(backend, device, compiled):
    """Eager: against the reference. Compiled (torch.compile(fullgraph=True): one graph, forward and backward):
    the eager numbers of the same backend."""
    s, t = features(2, 3, 8, 8, seed=39, device=device), features(2, 5, 4, 4, seed=40, device=device)

    def fn(a, b, bk):
        return KF.at_loss(a, b, p=2, mode="paper", backend=bk) + KF.at_loss(a, b, backend=bk)
    if not compiled:
        assert_close_to_reference(fn, s, t, backend)
        return
    eager = lambda a, b: fn(a, b, backend)  # noqa: E731
    got = loss_and_grads(compile_fullgraph(eager), s, t)
    want = loss_and_grads(eager, s, t)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# --- GPU only: realistic and larger shapes, the two kernel backends --------------------------------------------

@on_gpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(256, 64, 56, 56), (256, 512, 7, 7)])
def test_gpu_at_realistic(backend, device, dtype, shape):
    B, C, H, W = shape
    s = features(B, C, H, W, seed=45, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    t = features(B, 2 * C, H, W, seed=46, device=device, dtype=dtype)
    for p, mode in ((2, "code"), (3, "paper")):
        fn = at_fn(p, mode)
        if dtype == torch.float32:
            assert_close_to_reference(fn, s, t, backend, rtol=1e-4)
        else:
            got = loss_and_grads(lambda a, b: fn(a, b, backend), s, t)
            plain = loss_and_grads(lambda a, b: fn(a, b, "torch"), s, t)
            exact = float64_reference(fn, s, t)
            for i in (0, 1):
                err = (got[i].double() - exact[i]).abs().max().item()
                ref_err = (plain[i].double() - exact[i]).abs().max().item()
                assert err <= 2 * ref_err + 1e-5 * exact[i].abs().max().item()


@on_gpu_kernels
@pytest.mark.parametrize("p", [1, 2, 3, 5, 2.5])
@pytest.mark.parametrize("mode", ["code", "paper"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_transfer_pooled_on_gpu(backend, device, p, mode, channels_last):
    s, t = logits(4, 6, 14, 14, seed=9, device=device), logits(4, 3, 7, 7, seed=10, device=device)
    if p == 2.5:
        s, t = s.abs(), t.abs()
    if channels_last:
        s = s.to(memory_format=torch.channels_last)
    assert_matches_reference(lambda s, t, b: KF.at_loss(s, t, p=p, mode=mode, backend=b), s, t, backend=backend,
                             rtol=1e-4, atol=1e-5)


@on_gpu_kernels
@pytest.mark.parametrize("p", [1, 3, 5])
def test_attention_map_odd_power_signed_entries_on_gpu(backend, device, p):
    """Odd p keeps the sign of negative entries (no abs()); the gradient p f^(p-1) is even. Against the reference
    and against the reference in float64."""
    f = logits(2, 3, 6, 5, seed=11, device=device, scale=1.0)
    w = logits(2, 30, seed=12, device=device, scale=1.0)
    results = []
    for b, x in ((backend, f), ("torch", f), ("torch", f.double())):
        x = x.detach().clone().requires_grad_()
        out = KF.attention_map(x, p, backend=b)
        (out * w.to(out.dtype)).sum().backward()
        results.append((out.detach(), x.grad))
    for got, want in ((results[0], results[1]), (results[0], results[2])):
        torch.testing.assert_close(got[0].double(), want[0].double(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1].double(), want[1].double(), rtol=1e-5, atol=1e-6)
