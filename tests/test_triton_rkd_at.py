"""The Triton RKD (distance, angle) and attention-transfer kernels against the reference.

Without a GPU they run in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1),
so the shapes are small; with a GPU the same tests also run on CUDA tensors, plus realistic shapes.
"""
import pytest
import torch
from precision import rounding_slack

from fastkd import functional as KF
from fastkd.kernel_autograd import sq_hi_lo
from fastkd import reference

pytest.importorskip("triton")
import fastkd.triton as fkt  # noqa: E402
from fastkd.triton import attention as tat  # noqa: E402
from fastkd.triton import rkd as trkd  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
needs_interpreter = pytest.mark.skipif(fkt.unavailable_reason(torch.device("cpu")) is not None,
                                       reason="CPU tensors need TRITON_INTERPRET=1 set before import")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

RKD_LOSSES = {
    "rkd_distance_loss": lambda s, t, b: KF.rkd_distance_loss(s, t, backend=b),
    "rkd_distance_loss_squared": lambda s, t, b: KF.rkd_distance_loss(s, t, squared=True, eps=1e-8, backend=b),
    "rkd_angle_loss": lambda s, t, b: KF.rkd_angle_loss(s, t, backend=b),
    "rkd_loss": lambda s, t, b: KF.rkd_loss(s, t, backend=b),
}


# The reference's Gram products in true float32 on CUDA, as on CPU (TF32 would make eager the noisy one).
pytestmark = pytest.mark.usefixtures("no_tf32")


def kernel_device(device):
    if device == "cpu" and fkt.unavailable_reason(torch.device("cpu")) is not None:
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    return device


def features(*shape, seed, device="cpu", dtype=torch.float32, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g) + offset).to(device=device, dtype=dtype)


def loss_and_grads(fn, student, teacher):
    s = student.detach().clone().requires_grad_()
    t = teacher.detach().clone().requires_grad_()
    loss = fn(s, t)
    loss.backward()
    return loss.detach(), s.grad, t.grad


def close(got, want, rtol, what):
    """|got - want| <= rtol * (|want| + max(max|want|, 1e-3)): relative to the tensor's scale, with a floor
    for tensors that are exactly 0 in the reference (e.g. RKD angles at D = 1, all +-1)."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    scale = max(want.abs().max().item(), 1e-3) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


def assert_matches_reference(fn, student, teacher, rtol=1e-5, grad_atol=None):
    got = loss_and_grads(lambda s, t: fn(s, t, "triton"), student, teacher)
    want = loss_and_grads(lambda s, t: fn(s, t, "torch"), student, teacher)
    close(got[0], want[0], rtol, "loss")
    if grad_atol is None:
        close(got[1], want[1], rtol, "student grad")
    else:
        torch.testing.assert_close(got[1], want[1], rtol=rtol, atol=grad_atol)
    if want[2] is None:  # RKD detaches the teacher
        assert got[2] is None
    else:  # attention transfer does not
        close(got[2], want[2], rtol, "teacher grad")


def float64_reference(fn, student, teacher):
    """The reference in float64 on the same (rounded) inputs: the exact answer the others are judged by."""
    return loss_and_grads(lambda s, t: fn(s, t, "torch"), student.double(), teacher.double())


# --- RKD ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B", [2, 3, 7, 33])
@pytest.mark.parametrize("D", [1, 5, 17])
@pytest.mark.parametrize("name", sorted(RKD_LOSSES))
def test_rkd_matches_reference(device, B, D, name):
    """Degenerate cases have an exactly zero gradient in exact arithmetic, where the Gram form leaves
    float32 rounding noise: at B = 2 both terms are constant (one distance, normalised to 1; every angle 1),
    and at D = 1 every angle is +-1. There the gradient is checked against an absolute 1e-6 (per unit of
    angle weight) instead."""
    device = kernel_device(device)
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
    assert_matches_reference(RKD_LOSSES[name], s, t, grad_atol=grad_atol)


@pytest.mark.parametrize("device", DEVICES)
def test_rkd_image_features_non_contiguous(device):
    """(B, C, H, W) features flattened; a non-contiguous student (a channel slice) and a transposed teacher."""
    device = kernel_device(device)
    s = features(6, 5, 3, 3, seed=1, device=device)[:, 1:4]
    t = features(6, 4, 4, seed=2, device=device).transpose(1, 2)
    for fn in RKD_LOSSES.values():
        assert_matches_reference(fn, s, t)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weights", [(0.0, 50.0), (25.0, 0.0), (0.0, 0.0), (-1.5, 3.0)])
def test_rkd_weights(device, weights):
    device = kernel_device(device)
    s = features(5, 4, seed=3, device=device)
    t = features(5, 6, seed=4, device=device)
    w_d, w_a = weights

    def fn(s, t, b):
        return KF.rkd_loss(s, t, distance_weight=w_d, angle_weight=w_a, backend=b)
    if weights == (0.0, 0.0):
        s = s.requires_grad_()
        loss = fn(s, t, "triton")
        assert loss.item() == 0.0 and loss.dtype == torch.float32
        return
    assert_matches_reference(fn, s, t)


@pytest.mark.parametrize("device", DEVICES)
def test_rkd_duplicate_rows(device):
    """Exact duplicates: distance loss and gradient match; angle forward matches (the duplicate pair's angles
    are 0, as F.normalize's zero vector). The reference's angle gradient there is scaled by 1/1e-12 (the
    normalize clamp on a zero vector): meaningless, so only a teacher with duplicates is checked for it."""
    device = kernel_device(device)
    s = features(7, 9, seed=5, device=device)
    s[4] = s[1]
    s[6] = s[1]
    t = features(7, 5, seed=6, device=device)
    t[2] = t[0]
    for name in ("rkd_distance_loss", "rkd_distance_loss_squared"):
        assert_matches_reference(RKD_LOSSES[name], s, t)
    angle = RKD_LOSSES["rkd_angle_loss"]
    close(angle(s, t, "triton"), angle(s, t, "torch"), 1e-5, "angle loss, student duplicates")
    s_unique = features(7, 9, seed=7, device=device)
    assert_matches_reference(angle, s_unique, t)  # teacher duplicates: forward and gradient


def within_tolerance_rule(fn, s, t, what):
    """The kernel's error against float64 is at most twice eager float32's (the reference run in float32), or
    twice 4 roundings of the result when eager is more accurate than that: value relative, gradient relative
    to its largest entry. No absolute tolerance."""
    exact = float64_reference(fn, s, t)
    got = loss_and_grads(lambda a, b: fn(a, b, "triton"), s, t)
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gap", [1e-2, 1e-3, 1e-4, 1e-5])
def test_rkd_near_duplicates_and_offset(device, gap):
    """Rows `gap` apart (relative) in batches far from the origin, on both sides, and a tight cluster: where
    a float32 Gram form loses `eps |x| / gap` in the angles and `eps |x| / gap^2` in their gradient (60% at
    1e-4). The kernels stay within the tolerance rule with no slack: they are accurate, not excused."""
    device = kernel_device(device)
    s = features(9, 16, seed=8, device=device, offset=50.0)
    s[3] = s[2] + gap * features(16, seed=9, device=device)
    s[5] = s[2] - gap * features(16, seed=10, device=device)
    t = features(9, 8, seed=11, device=device, offset=-20.0)
    t[7] = t[1] + gap * features(8, seed=12, device=device)
    cluster = features(9, 12, seed=13, device=device, scale=gap) + 3.0 * features(12, seed=14, device=device)
    for name, fn in RKD_LOSSES.items():
        within_tolerance_rule(fn, s, t, name)
        within_tolerance_rule(fn, t, s, name + " (swapped)")
        within_tolerance_rule(fn, cluster, t, name + " (cluster)")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,D", [(2, 7), (6, 1), (2, 1)])
def test_rkd_angle_degenerate_is_exact(device, B, D):
    """At B = 2 (the only triples are j = k, every angle 1) and D = 1 (every angle +-1) the angle loss is
    piecewise constant: its gradient is exactly 0, and the loss exactly that of the angles' signs."""
    device = kernel_device(device)
    s = features(B, D, seed=15, device=device).requires_grad_()
    t = features(B, D + 2, seed=16, device=device)
    loss = KF.rkd_angle_loss(s, t, backend="triton")
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s.grad))
    if B == 2:
        assert loss.item() == 0.0
    else:
        exact = KF.rkd_angle_loss(s.detach().double(), t.double(), backend="torch")
        assert abs(loss.item() - exact.item()) <= 4 * 2.0 ** -24 * abs(exact.item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(RKD_LOSSES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rkd_bf16(device, name, dtype):
    """bf16 inputs, float32 arithmetic: error against float64 on the same inputs at most ~2x the reference's."""
    device = kernel_device(device)
    s = features(11, 24, seed=13, device=device, dtype=dtype)
    t = features(11, 12, seed=14, device=device, dtype=dtype)
    fn = RKD_LOSSES[name]
    got = loss_and_grads(lambda a, b: fn(a, b, "triton"), s, t)
    plain = loss_and_grads(lambda a, b: fn(a, b, "torch"), s, t)
    exact = float64_reference(fn, s, t)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    for i, what in ((0, "loss"), (1, "grad")):
        err = (got[i].double() - exact[i]).abs().max().item()
        ref_err = (plain[i].double() - exact[i]).abs().max().item()
        scale = exact[i].abs().max().item()
        slack = 1e-5 * scale + (rounding_slack(dtype, device, scale) if i else 0.0)
        assert err <= 2 * ref_err + slack, f"{what}: {err} vs reference {ref_err}"


@pytest.mark.parametrize("device", DEVICES)
def test_rkd_float64_falls_back_to_reference(device):
    device = kernel_device(device)
    s = features(4, 3, seed=15, device=device, dtype=torch.float64)
    t = features(4, 3, seed=16, device=device, dtype=torch.float64)
    assert KF.rkd_loss(s, t, backend="triton").dtype == torch.float64
    torch.testing.assert_close(KF.rkd_loss(s, t, backend="triton"), KF.rkd_loss(s, t, backend="torch"))


@pytest.mark.parametrize("device", DEVICES)
def test_rkd_under_autocast(device):
    """Autocast makes the reference's Gram product bf16 (`x @ x.T`); the kernels difference float32 rows
    whatever autocast says, and the gradient comes back in the input's dtype."""
    device = kernel_device(device)
    s = features(6, 8, seed=49, device=device).requires_grad_()
    t = features(6, 5, seed=50, device=device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        got = KF.rkd_loss(s, t, backend="triton")
        want = KF.rkd_loss(s, t, backend="torch")
    got.backward()
    assert s.grad.dtype == torch.float32 and torch.isfinite(s.grad).all()
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0)


@needs_interpreter
def test_rkd_several_tiles(monkeypatch):
    """Blocks of 16 (the smallest) and B = 40: three tiles a side, partial last tiles, in all three kernels."""
    monkeypatch.setattr(trkd, "_block", lambda B: 16)
    s = features(40, 6, seed=17)
    t = features(40, 3, seed=18)
    assert_matches_reference(RKD_LOSSES["rkd_angle_loss"], s, t)


# --- attention transfer -----------------------------------------------------------------------------------

def at_fn(p, mode):
    return lambda s, t, b: KF.at_loss(s, t, p=p, mode=mode, backend=b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [1, 2, 3, 4, 2.5, 0.5])
@pytest.mark.parametrize("mode", ["code", "paper"])
def test_at_matches_reference(device, p, mode):
    device = kernel_device(device)
    s = features(3, 5, 7, 6, seed=20, device=device)
    t = features(3, 4, 7, 6, seed=21, device=device)
    if not float(p).is_integer():  # non-integer powers of negative entries are NaN, in both
        s, t = s.abs(), t.abs()
    assert_matches_reference(at_fn(p, mode), s, t)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [1, 3, 5])
def test_odd_power_keeps_the_sign_of_negative_entries(device, p):
    """Odd integer p on signed maps (p = 5 by binary exponentiation): f^p keeps
    the sign and its derivative p f^(p-1) is even. Map, at_loss (both modes) and gradients against the
    reference, and against the reference in float64 (gradcheck'd in test_gradcheck.py)."""
    device = kernel_device(device)
    f = features(2, 3, 4, 5, seed=60 + p, device=device)
    assert (f < 0).any() and (f > 0).any()
    w = features(2, 20, seed=70, device=device)  # weights of the map's entries for its backward

    def weighted_map(b):
        return lambda s, t: (KF.attention_map(s, p, backend=b) * w.to(s.dtype)).sum() + 0.0 * t.sum()
    got = loss_and_grads(weighted_map("triton"), f, f)
    want = loss_and_grads(weighted_map("torch"), f, f)
    exact = loss_and_grads(weighted_map("torch"), f.double(), f.double())
    close(got[0], want[0], 1e-5, "weighted map")
    close(got[1], want[1], 1e-5, "map gradient")
    close(got[1].double(), exact[1], 1e-5, "map gradient against float64")
    # the sign survives: the map of -f is minus the map of f
    close(KF.attention_map(-f, p, backend="triton"), -KF.attention_map(f, p, backend="torch"), 1e-5, "odd map")
    t = features(2, 4, 4, 5, seed=80 + p, device=device)
    for mode in ("code", "paper"):
        assert_matches_reference(at_fn(p, mode), f, t)
        got = loss_and_grads(lambda a, b: at_fn(p, mode)(a, b, "triton"), f, t)
        exact = float64_reference(at_fn(p, mode), f, t)
        for g, e, what in zip(got, exact, ("loss", "student grad", "teacher grad")):
            close(g.double(), e, 1e-5, f"{mode} {what} against float64")


POW_CASES = [5, 4, 7, 2.5, 1.5, 0.5, -1.5, 2.3, 0.7, 0.3, 7.77, -1, -2]


def _pow_inputs(device):
    g = torch.Generator().manual_seed(90)
    return {"offset_1e3": 1000 + torch.randn(2000, generator=g), "unit": torch.randn(2000, generator=g).abs(),
            "scale_1e4": 1e4 * torch.randn(2000, generator=g).abs(),
            "scale_1e-4": 1e-4 * torch.randn(2000, generator=g).abs(),
            "wide": torch.empty(2000).uniform_(-20, 20, generator=g).exp()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", POW_CASES)
def test_at_pow_accuracy(device, p):
    """f^p (forward, C = 1) and p f^(p-1) (backward) against float64, elementwise in units of u = 2^-24 where
    the true value is at least 2^-100 (the pair's low part a normal float32) and finite in float32:
    correctly rounded but in near-ties (<= 1.05 u) for integer and half-integer p, as torch.pow; a few u for
    other p at every magnitude (exp(p log f) errs by ~|p log f| u: 23 u at f = 1e4, p = 2.5)."""
    device = kernel_device(device)
    u = 2.0 ** -24
    special = float(p).is_integer() or float(2 * p).is_integer()
    bound = 1.05 * u if special else (4 if device == "cpu" else 8) * u
    for name, x in _pow_inputs(device).items():
        f = x.reshape(1, 1, 1, -1).to(device)
        for what, got, want in [
            ("f^p", tat.map_forward(f, p), x.double().pow(p)),
            ("p f^(p-1)", tat.map_backward(torch.ones(1, x.numel(), device=device), f, p), p * x.double().pow(p - 1)),
        ]:
            normal = (want.abs() >= 2.0 ** -100) & (want.abs() <= torch.finfo(torch.float32).max)  # the pair's l normal
            rel = ((got.reshape(-1).cpu().double() - want) / want).abs()[normal]
            assert rel.max().item() <= bound, f"{name} {what}: {rel.max().item() / u:.2f} u > {bound / u:.2f} u"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0, 1, 2, 3, 4, 5, 33, 0.5, 1.5, 2.5, 0.3, 2.3, 0.7, -1, -2, -3, -0.5, -1.5, -2.3, 1e10])
def test_at_pow_special_values(device, p):
    """torch.pow's values (and its backward p x^(p-1), 0 for p = 0) at 0, -0, +-1, +-inf, NaN, subnormals and
    values whose powers overflow or underflow, for integer, half-integer, other and negative p (signs of
    zero aside: the map is a sum)."""
    device = kernel_device(device)
    x = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5, float("inf"), -float("inf"), float("nan"),
                      1e-40, -1e-40, 3e38, 1e-20, 1e20, 1.7, -1.7])
    f = x.reshape(1, 1, 1, -1).to(device)
    got = tat.map_forward(f, p).reshape(-1).cpu()
    torch.testing.assert_close(got, x.pow(p), rtol=3e-7, atol=0, equal_nan=True)
    xx = x.clone().requires_grad_()
    xx.pow(p).sum().backward()
    dg = tat.map_backward(torch.ones(1, x.numel(), device=device), f, p).reshape(-1).cpu()
    torch.testing.assert_close(dg, xx.grad, rtol=3e-7, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_at_negative_entries_non_integer_power(device):
    """torch.pow semantics: NaN for a negative entry under a non-integer power, in both backends."""
    device = kernel_device(device)
    f = features(2, 3, 4, 4, seed=22, device=device)
    got = KF.attention_map(f, 1.5, backend="triton")
    want = KF.attention_map(f, 1.5, backend="torch")
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["code", "paper"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_at_layouts_and_pooling(device, mode, layout):
    """Student larger than the teacher (pooled), teacher larger than the student, odd sizes, odd channels;
    channels-last and sliced (non-contiguous) student maps; the gradient keeps the student's layout."""
    device = kernel_device(device)
    for (cs, hs, ws), (ct, ht, wt) in [((5, 8, 8), (3, 4, 4)), ((1, 3, 5), (7, 6, 10)), ((17, 5, 5), (2, 5, 5))]:
        s = features(2, cs, hs + 1, ws, seed=23 + hs, device=device)
        s = s[:, :, 1:] if layout == "sliced" else s[:, :, :hs]
        if layout == "channels_last":
            s = s.contiguous().to(memory_format=torch.channels_last)
        t = features(2, ct, ht, wt, seed=24 + ht, device=device)
        assert_matches_reference(at_fn(3, mode), s, t)
        s_grad = loss_and_grads(lambda a, b: at_fn(2, mode)(a, b, "triton"), s, t)[1]
        assert s_grad.stride() == torch.empty_like(s).stride()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["w_cropped", "w_strided", "channels_last_w_cropped"])
def test_attention_map_spatial_strides(device, layout):
    """Maps whose spatial dimensions do not merge into one (a crop along W: H's stride is not W times W's) take
    the kernels' general (h, w) addressing; a W stride of 2 still merges. Forward and gradient."""
    device = kernel_device(device)
    f = features(2, 5, 6, 9, seed=60, device=device)
    if layout.startswith("channels_last"):
        f = f.to(memory_format=torch.channels_last)
    f = f[..., 1:8] if layout.endswith("w_cropped") else f[..., ::2]
    for p in (2, 3, 2.5):
        x = f.abs() if p == 2.5 else f
        w = features(2, x.shape[2] * x.shape[3], seed=61, device=device)
        got = loss_and_grads(lambda a, b: (KF.attention_map(a, p, backend="triton") * w).sum(), x, x)
        want = loss_and_grads(lambda a, b: (KF.attention_map(a, p, backend="torch") * w).sum(), x, x)
        close(got[0], want[0], 1e-5, f"map {layout} p={p}")
        close(got[1], want[1], 1e-5, f"grad {layout} p={p}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 3, 4, 5), (2, 3, 2, 3, 2)])
def test_attention_map_any_spatial_rank(device, shape):
    device = kernel_device(device)
    f = features(*shape, seed=25, device=device).requires_grad_()
    got = KF.attention_map(f, 2, backend="triton")
    (got * torch.arange(got.shape[1], device=device)).sum().backward()
    g_got, f.grad = f.grad, None
    want = KF.attention_map(f, 2, backend="torch")
    (want * torch.arange(want.shape[1], device=device)).sum().backward()
    close(got.detach(), want.detach(), 1e-5, "map")
    close(g_got, f.grad, 1e-5, "grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("mode", ["code", "paper"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_at_bf16(device, p, mode, dtype):
    """Half-precision maps: loss and gradients (in the input dtype; the teacher's too, as attention transfer
    does not detach it) at most ~2x as far from float64 as the reference's, plus one rounding of the gradient:
    Triton's interpreter truncates float32 -> bf16 (compiled kernels round to nearest), a whole ulp on CPU."""
    device = kernel_device(device)
    s = features(3, 6, 5, 5, seed=26, device=device, dtype=dtype)
    t = features(3, 4, 5, 5, seed=27, device=device, dtype=dtype)
    fn = at_fn(p, mode)
    got = loss_and_grads(lambda a, b: fn(a, b, "triton"), s, t)
    plain = loss_and_grads(lambda a, b: fn(a, b, "torch"), s, t)
    exact = float64_reference(fn, s, t)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    for i, what in ((0, "loss"), (1, "grad"), (2, "teacher grad")):
        err = (got[i].double() - exact[i]).abs().max().item()
        ref_err = (plain[i].double() - exact[i]).abs().max().item()
        scale = exact[i].abs().max().item()
        slack = 1e-5 * scale + (rounding_slack(dtype, device, scale) if i else 0.0)
        assert err <= 2 * ref_err + slack, f"{what}: {err} vs reference {ref_err}"


@pytest.mark.parametrize("device", DEVICES)
def test_at_float64_falls_back_to_reference(device):
    device = kernel_device(device)
    s = features(2, 3, 4, 4, seed=28, device=device, dtype=torch.float64)
    t = features(2, 3, 4, 4, seed=29, device=device, dtype=torch.float64)
    torch.testing.assert_close(KF.at_loss(s, t, backend="triton"), KF.at_loss(s, t, backend="torch"))


@needs_interpreter
def test_at_several_blocks(monkeypatch):
    """Small blocks, so channels and positions run through several blocks and partial ones."""
    monkeypatch.setattr(tat, "_blocks", lambda f, cl: (2, 16))
    s = features(2, 7, 6, 7, seed=30)
    t = features(2, 5, 6, 7, seed=31).to(memory_format=torch.channels_last)
    assert_matches_reference(at_fn(2, "code"), s, t)
    assert_matches_reference(at_fn(3, "paper"), t, s)


# --- operators and torch.compile ----------------------------------------------------------------------------

@needs_interpreter
def test_distance_kernels_on_close_rows():
    """Q exactly symmetric with a zero diagonal; Q and the weighted differences within a few ulp of float64 on
    rows 1e-5 apart near a large offset, where the matmul forms lose everything."""
    x = features(7, 10, seed=51, offset=30.0)
    x[4] = x[1] + 1e-5 * features(10, seed=52)
    q = trkd.sq_distances(x)
    assert torch.equal(q, q.T) and torch.equal(q.diagonal(), torch.zeros(7))
    x64 = x.double()
    diff = x64[:, None, :] - x64[None, :, :]
    q64 = diff.square().sum(2)
    off = ~torch.eye(7, dtype=torch.bool)
    assert ((q.double() - q64).abs()[off] / q64[off]).max() < 4 * 2.0 ** -24 * 10
    w = features(7, 7, seed=53)
    w = w + w.T
    want = (w.double()[:, :, None] * diff).sum(1)
    got = trkd.weighted_diff(w, x).double()
    assert ((got - want).abs() / (w.double().abs()[:, :, None] * diff.abs()).sum(1)).max() < 8 * 2.0 ** -24


@needs_interpreter
def test_opcheck():
    x_s, x_t = features(5, 3, seed=32), features(5, 4, seed=33)
    torch.library.opcheck(trkd.sq_distances_op, (x_s,))
    torch.library.opcheck(trkd.weighted_diff_op, (trkd.sq_distances(x_s), x_s))
    (qh_s, ql_s), (qh_t, ql_t) = sq_hi_lo(x_s), sq_hi_lo(x_t)
    for unit_s, unit_t in ((False, False), (False, True)):
        torch.library.opcheck(trkd.angle_sum_op, (qh_s, ql_s, qh_t, ql_t, unit_s, unit_t))
        torch.library.opcheck(trkd.angle_weights_op, (qh_s, ql_s, qh_t, ql_t, unit_t))
    f = features(2, 3, 4, 5, seed=34).requires_grad_()
    f_cl = features(2, 3, 4, 5, seed=35).to(memory_format=torch.channels_last).requires_grad_()
    for x in (f, f_cl):
        for p in (1.0, 2.0, 3.0, 2.5):
            torch.library.opcheck(tat.at_map_op, (x.abs().detach().requires_grad_() if p == 2.5 else x, p))
        torch.library.opcheck(tat.at_map_backward_op, (features(2, 20, seed=36), x.detach(), 2.0))


@needs_interpreter
@pytest.mark.parametrize("name", ["rkd_loss", "at_loss"])
def test_compiles_in_one_graph(name):
    torch._dynamo.reset()
    if name == "rkd_loss":
        s, t = features(6, 10, seed=37), features(6, 7, seed=38)

        def fn(a, b):
            return KF.rkd_loss(a, b, backend="triton")
    else:
        s, t = features(2, 3, 8, 8, seed=39), features(2, 5, 4, 4, seed=40)

        def fn(a, b):
            return KF.at_loss(a, b, p=2, mode="paper", backend="triton") + KF.at_loss(a, b, backend="triton")
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = loss_and_grads(compiled, s, t)
    want = loss_and_grads(fn, s, t)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


# --- realistic shapes, GPU only -------------------------------------------------------------------------------

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


@needs_gpu
def test_gpu_rkd_large_batch():
    """B = 4096, D = 2048: loss against a chunked reference, finite gradient, memory O(B^2 + B D)."""
    B, D = 4096, 2048
    s = features(B, D, seed=41, device="cuda").requires_grad_()
    t = features(B, D, seed=42, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = KF.rkd_angle_loss(s, t, backend="triton")
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 24 * B * B * 4 + 4 * B * D * 4, peak  # a few dozen B x B float32 buffers at most
    assert torch.isfinite(s.grad).all()
    with torch.no_grad():
        want = _chunked_angle_sum(s.detach(), t) / B ** 3
    assert abs(loss.item() - want) <= 1e-4 * abs(want)
    d = KF.rkd_distance_loss(s, t, backend="triton")
    d_ref = KF.rkd_distance_loss(s, t, backend="torch")
    torch.testing.assert_close(d, d_ref, rtol=1e-4, atol=0)


@needs_gpu
@pytest.mark.parametrize("B,D", [(256, 2048), (1000, 128)])
def test_gpu_rkd_realistic(B, D):
    s = features(B, D, seed=43, device="cuda")
    t = features(B, D // 2, seed=44, device="cuda")
    for name in ("rkd_loss", "rkd_angle_loss"):
        assert_matches_reference(RKD_LOSSES[name], s, t, rtol=1e-4)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(256, 64, 56, 56), (256, 512, 7, 7)])
def test_gpu_at_realistic(dtype, shape):
    B, C, H, W = shape
    s = features(B, C, H, W, seed=45, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
    t = features(B, 2 * C, H, W, seed=46, device="cuda", dtype=dtype)
    for p, mode in ((2, "code"), (3, "paper")):
        fn = at_fn(p, mode)
        if dtype == torch.float32:
            assert_matches_reference(fn, s, t, rtol=1e-4)
        else:
            got = loss_and_grads(lambda a, b: fn(a, b, "triton"), s, t)
            plain = loss_and_grads(lambda a, b: fn(a, b, "torch"), s, t)
            exact = float64_reference(fn, s, t)
            for i in (0, 1):
                err = (got[i].double() - exact[i]).abs().max().item()
                ref_err = (plain[i].double() - exact[i]).abs().max().item()
                assert err <= 2 * ref_err + 1e-5 * exact[i].abs().max().item()

