"""The Triton JSD and DKD kernels against the PyTorch references: forward, student and teacher gradients.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes stay small; with one, the same tests also run on CUDA tensors.
"""
import pytest
import torch
from precision import rounding_slack

import fastkd.triton as fkt
import fastkd.triton.losses as triton_losses
import fastkd.triton.rows as triton_rows
from fastkd import functional as KF
from fastkd import reference
from fastkd.triton import ops

if fkt.unavailable_reason(None) is not None:
    pytest.skip(f"Triton kernels cannot run here: {fkt.unavailable_reason(None)}", allow_module_level=True)

DEVICES = (["cpu"] if fkt.INTERPRET else []) + (["cuda"] if torch.cuda.is_available() else [])
if not DEVICES:
    pytest.skip("no device the Triton kernels run on", allow_module_level=True)

device_param = pytest.mark.parametrize("device", DEVICES)
BETAS = [0.0, 0.3, 0.5, 0.9, 1.0]
VOCABS = [1, 7, 100, 1037]


def make(shape, device, scale=3.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(device)


def labels_for(rows_shape, device, masked=(1,), seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, 5, rows_shape, generator=g).reshape(-1)
    labels[list(masked)] = -100
    return labels.reshape(rows_shape).to(device)


def run(fn, s, t, backend, grad_out=None):
    """Loss and the gradients of both inputs (teacher's only when it requires grad) for one backend."""
    s = s.detach().clone().requires_grad_(s.requires_grad)
    t = t.detach().clone().requires_grad_(t.requires_grad)
    loss = fn(s, t, backend)
    inputs = [x for x in (s, t) if x.requires_grad]
    grads = torch.autograd.grad(loss, inputs, grad_out if grad_out is not None else torch.ones_like(loss))
    return (loss, *grads)


def check_against_torch(fn, s, t, grad_out=None, rtol=1e-5, atol=1e-6):
    expected = run(fn, s, t, "torch", grad_out)
    got = run(fn, s, t, "triton", grad_out)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol, equal_nan=True)
    return got


def jsd(beta=0.5, temperature=2.0, labels=None, reduction="batchmean"):
    return lambda s, t, backend: KF.jsd_loss(s, t, beta=beta, temperature=temperature, labels=labels,
                                             reduction=reduction, backend=backend)


def dkd(target, alpha=1.0, beta=8.0, temperature=4.0):
    return lambda s, t, backend: KF.dkd_loss(s, t, target, alpha=alpha, beta=beta, temperature=temperature,
                                             backend=backend)


def targets(rows, classes, device, seed=0):
    g = torch.Generator().manual_seed(seed + 2)
    return torch.randint(0, classes, (rows,), generator=g).to(device)


# ----------------------------------------------------------------------------------------------------------
# JSD

@device_param
@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("beta", BETAS)
def test_jsd_matches_reference(device, V, beta):
    s = make((2, 3, V), device, seed=V).requires_grad_()
    t = make((2, 3, V), device, seed=V + 100).requires_grad_()
    check_against_torch(jsd(beta, labels=labels_for((2, 3), device)), s, t)


@device_param
@pytest.mark.parametrize("beta", BETAS)
def test_jsd_streams_over_blocks(device, beta, monkeypatch):
    monkeypatch.setattr(triton_rows, "MAX_BLOCK_V", 64)
    s = make((3, 300), device, seed=1).requires_grad_()  # 5 blocks, the last one partial
    t = make((3, 300), device, seed=2).requires_grad_()
    check_against_torch(jsd(beta, temperature=1.5, labels=labels_for((3,), device)), s, t)


@device_param
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(1, 50), (50,)])
def test_jsd_one_row(device, beta, shape):
    s = make(shape, device, seed=3).requires_grad_()
    t = make(shape, device, seed=4).requires_grad_()
    check_against_torch(jsd(beta), s, t)


@device_param
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_strided_rows(device, beta):
    """`logits[:, :-1]` of (B, S + 1, V) and a teacher with a column stride: views, no copies needed."""
    s = make((2, 5, 40), device, seed=5)[:, :-1].requires_grad_()
    t = make((2, 40, 5), device, seed=6).transpose(1, 2)[:, 1:].requires_grad_()
    assert not s.is_contiguous() and not t.is_contiguous()
    check_against_torch(jsd(beta, labels=labels_for((2, 4), device, masked=(2,))), s, t)


@device_param
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_reductions(device, reduction, beta):
    s = make((2, 3, 37), device, seed=7).requires_grad_()
    t = make((2, 3, 37), device, seed=8).requires_grad_()
    grad_out = make((2, 3), device, scale=1.0, seed=9) if reduction == "none" else None
    check_against_torch(jsd(beta, labels=labels_for((2, 3), device), reduction=reduction), s, t, grad_out)


@device_param
@pytest.mark.parametrize("beta", BETAS)
def test_jsd_all_tokens_masked(device, beta):
    s = make((2, 3, 20), device, seed=10).requires_grad_()
    t = make((2, 3, 20), device, seed=11).requires_grad_()
    labels = torch.full((2, 3), -100, device=device)
    loss, d_s, d_t = check_against_torch(jsd(beta, labels=labels), s, t)
    assert loss.item() == 0.0
    assert not d_s.any() and not d_t.any()


@device_param
@pytest.mark.parametrize("beta", BETAS)
def test_jsd_neg_inf_columns_in_both(device, beta):
    s = make((4, 30), device, seed=12)
    t = make((4, 30), device, seed=13)
    s[:, [0, 7, 29]] = float("-inf")
    t[:, [0, 7, 29]] = float("-inf")
    s[1, :25] = float("-inf")  # most of a row
    t[1, :25] = float("-inf")
    loss, d_s, d_t = check_against_torch(jsd(beta), s.requires_grad_(), t.requires_grad_())
    assert torch.isfinite(loss) and torch.isfinite(d_s).all() and torch.isfinite(d_t).all()


@device_param
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 0.9])
def test_jsd_neg_inf_columns_teacher_only(device, beta):
    """The teacher gives some classes probability 0: finite for every beta but 1 (reverse KL is +inf)."""
    s = make((4, 30), device, seed=14)
    t = make((4, 30), device, seed=15)
    t[:, [3, 4, 20]] = float("-inf")
    loss, d_s, d_t = check_against_torch(jsd(beta), s.requires_grad_(), t.requires_grad_())
    assert torch.isfinite(loss) and torch.isfinite(d_s).all() and torch.isfinite(d_t).all()


@device_param
def test_jsd_neg_inf_teacher_only_reverse_kl_is_inf(device):
    s = make((2, 30), device, seed=14)
    t = make((2, 30), device, seed=15)
    t[:, 3] = float("-inf")
    assert KF.jsd_loss(s, t, beta=1.0, backend="triton").item() == float("inf")


@device_param
@pytest.mark.parametrize("beta", BETAS)
def test_jsd_identical_rows_are_exactly_zero(device, beta):
    s = make((3, 2, 77), device, seed=16)
    s[0, 0, 5] = float("-inf")
    loss, d_s, d_t = run(jsd(beta), s.requires_grad_(), s.clone().requires_grad_(), "triton")
    assert loss.item() == 0.0
    assert not d_s.any() and not d_t.any()


@device_param
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_gradient_only_where_required(device, beta):
    s = make((3, 20), device, seed=17)
    t = make((3, 20), device, seed=18)
    check_against_torch(jsd(beta), s.requires_grad_(), t)                     # student only
    check_against_torch(jsd(beta), s.detach(), t.requires_grad_())            # teacher only


@device_param
def test_jsd_underflow_gives_no_nan(device):
    """Probabilities that underflow to 0 on both sides (huge logit gaps) give 0 terms, not NaN."""
    s = make((3, 40), device, seed=19)
    t = make((3, 40), device, seed=20)
    s[:, :10] -= 1e4
    t[:, :10] -= 1e4
    t[:, 10:15] -= 1e4
    s[:, 15:20] -= 1e4
    loss, d_s, d_t = check_against_torch(jsd(0.5, temperature=1.0), s.requires_grad_(), t.requires_grad_())
    assert torch.isfinite(loss) and torch.isfinite(d_s).all() and torch.isfinite(d_t).all()


# ----------------------------------------------------------------------------------------------------------
# DKD

@device_param
@pytest.mark.parametrize("V", VOCABS)
def test_dkd_matches_reference(device, V):
    s = make((5, V), device, seed=V).requires_grad_()
    t = make((5, V), device, seed=V + 100).requires_grad_()
    check_against_torch(dkd(targets(5, V, device, seed=V)), s, t)


@device_param
@pytest.mark.parametrize("alpha,beta,temperature", [(1.0, 8.0, 4.0), (0.5, 0.5, 1.0), (0.0, 2.0, 2.0),
                                                    (1.0, 0.0, 3.0)])
def test_dkd_weights_and_temperature(device, alpha, beta, temperature):
    s = make((4, 33), device, seed=21).requires_grad_()
    t = make((4, 33), device, seed=22).requires_grad_()
    check_against_torch(dkd(targets(4, 33, device), alpha, beta, temperature), s, t)


@device_param
def test_dkd_streams_over_blocks(device, monkeypatch):
    monkeypatch.setattr(triton_rows, "MAX_BLOCK_V", 64)
    s = make((4, 300), device, seed=23).requires_grad_()
    t = make((4, 300), device, seed=24).requires_grad_()
    target = torch.tensor([0, 63, 64, 299], device=device)  # first, block edges, last
    check_against_torch(dkd(target, temperature=2.0), s, t)


@device_param
def test_dkd_one_row(device):
    s = make((1, 50), device, seed=25).requires_grad_()
    t = make((1, 50), device, seed=26).requires_grad_()
    check_against_torch(dkd(torch.tensor([17], device=device)), s, t)


@device_param
def test_dkd_strided_rows(device):
    s = make((5, 40), device, seed=27)[:, 2:-1].requires_grad_()      # row stride 40
    t = make((37, 5), device, seed=28).t().requires_grad_()           # column stride 5
    assert not s.is_contiguous() and not t.is_contiguous()
    check_against_torch(dkd(targets(5, 37, device)), s, t)


@device_param
def test_dkd_neg_inf_columns_in_both(device):
    s = make((4, 30), device, seed=29)
    t = make((4, 30), device, seed=30)
    target = torch.tensor([0, 7, 12, 3], device=device)
    s[:, [0, 7, 29]] = float("-inf")  # the target column of rows 0 and 1 too
    t[:, [0, 7, 29]] = float("-inf")
    loss, d_s, d_t = check_against_torch(dkd(target), s.requires_grad_(), t.requires_grad_())
    assert torch.isfinite(loss) and torch.isfinite(d_s).all() and torch.isfinite(d_t).all()


@device_param
def test_dkd_neg_inf_columns_teacher_only(device):
    s = make((4, 30), device, seed=31)
    t = make((4, 30), device, seed=32)
    target = torch.tensor([3, 7, 12, 20], device=device)
    t[:, [3, 4, 20]] = float("-inf")  # the target column of rows 0 and 3 too
    loss, d_s, d_t = check_against_torch(dkd(target), s.requires_grad_(), t.requires_grad_())
    assert torch.isfinite(loss) and torch.isfinite(d_s).all() and torch.isfinite(d_t).all()


@device_param
@pytest.mark.parametrize("V", [1, 2, 50])
def test_dkd_identical_rows_are_exactly_zero(device, V):
    s = make((3, V), device, seed=33)
    loss, d_s, d_t = run(dkd(targets(3, V, device)), s.requires_grad_(), s.clone().requires_grad_(), "triton")
    assert loss.item() == 0.0
    assert not d_s.any() and not d_t.any()


@device_param
def test_dkd_gradient_only_where_required(device):
    s = make((3, 20), device, seed=34)
    t = make((3, 20), device, seed=35)
    fn = dkd(targets(3, 20, device))
    check_against_torch(fn, s.requires_grad_(), t)
    check_against_torch(fn, s.detach(), t.requires_grad_())


@device_param
@pytest.mark.parametrize("bad", [-1, 9, 1000])
def test_dkd_target_out_of_range_is_nan(device, bad):
    """Straight to the kernel (fastkd.functional rejects such CPU targets): NaN, no out-of-bounds read."""
    s = make((3, 9), device, seed=36).requires_grad_()
    t = make((3, 9), device, seed=37)
    target = torch.tensor([1, bad, 4], device=device)
    loss = triton_losses.LOSSES["dkd_loss"](s, t, target)
    assert torch.isnan(loss)
    tckd, nckd, _ = ops.dkd_rows(s, t, target, 4.0)
    assert torch.isnan(tckd[1]) and torch.isnan(nckd[1])
    assert torch.isfinite(tckd[[0, 2]]).all() and torch.isfinite(nckd[[0, 2]]).all()
    (d_s,) = torch.autograd.grad(tckd.sum() + nckd.sum(), s, torch.ones_like(loss))
    assert torch.isnan(d_s[1]).all() and torch.isfinite(d_s[[0, 2]]).all()


# ----------------------------------------------------------------------------------------------------------
# Half precision: the kernels' error against float64 is at most about that of the reference in float32

def max_error(got, exact):
    return (got.double() - exact).abs().max().item()


@device_param
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_name,beta", [("jsd", 0.0), ("jsd", 0.3), ("jsd", 0.5), ("jsd", 0.9), ("jsd", 1.0),
                                            ("dkd", None)])
def test_half_precision_error_is_no_worse_than_torch(device, dtype, loss_name, beta):
    V = 300
    s = make((4, V), device, dtype=dtype, seed=38).requires_grad_()
    t = make((4, V), device, dtype=dtype, seed=39).requires_grad_()
    fn = jsd(beta, temperature=1.5) if loss_name == "jsd" else dkd(targets(4, V, device))
    exact = run(fn, s.double(), t.double(), "torch")  # float64 maths on the same rounded values
    by_torch = run(fn, s, t, "torch")
    by_triton = run(fn, s, t, "triton")
    for name, k, r, e in zip(("loss", "d_student", "d_teacher"), by_triton, by_torch, exact):
        assert k.dtype == r.dtype and k.shape == r.shape
        kernel_err, torch_err = max_error(k, e), max_error(r, e)
        slack = 1e-6 * e.abs().max().item() + 1e-12
        if name != "loss":
            slack += rounding_slack(dtype, device, e.abs().max().item())
        assert kernel_err <= 2 * torch_err + slack, (name, kernel_err, torch_err)


# ----------------------------------------------------------------------------------------------------------
# Operator registration and torch.compile

def test_opcheck_jsd_ops():
    s = make((2, 3, 17), "cpu" if "cpu" in DEVICES else "cuda", seed=40)
    dev = s.device
    t = make((2, 3, 17), dev, seed=41)
    labels = labels_for((2, 3), dev)
    torch.library.opcheck(ops.jsd_rows_op, (s.requires_grad_(), t.requires_grad_(), 0.3, 2.0, labels, -100))
    torch.library.opcheck(ops.jsd_rows_op, (s.detach(), t.detach(), 0.7, 1.0, None, -100))
    loss, stats = ops.jsd_rows_op(s.detach(), t.detach(), 0.3, 2.0, labels, -100)
    grad = make((6,), dev, scale=1.0, seed=42)
    for student_grad, teacher_grad in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(ops.jsd_rows_backward_op, (grad, s.detach(), t.detach(), stats, 0.3, 2.0, labels,
                                                         -100, student_grad, teacher_grad))


def test_opcheck_dkd_ops():
    dev = "cpu" if "cpu" in DEVICES else "cuda"
    s = make((4, 13), dev, seed=43)
    t = make((4, 13), dev, seed=44)
    target = targets(4, 13, dev)
    torch.library.opcheck(ops.dkd_rows_op, (s.requires_grad_(), t.requires_grad_(), target, 4.0))
    torch.library.opcheck(ops.dkd_rows_op, (s.detach(), t.detach(), target, 1.0))
    _, _, stats = ops.dkd_rows_op(s.detach(), t.detach(), target, 4.0)
    g_t, g_n = make((4,), dev, scale=1.0, seed=45), make((4,), dev, scale=1.0, seed=46)
    for student_grad, teacher_grad in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(ops.dkd_rows_backward_op, (g_t, g_n, s.detach(), t.detach(), stats, target, 4.0,
                                                         student_grad, teacher_grad))


COMPILE_CASES = {
    "jsd": lambda s, t, y: KF.jsd_loss(s, t, beta=0.3, temperature=2.0, labels=y, backend="triton"),
    "jsd_kl": lambda s, t, y: KF.jsd_loss(s, t, beta=1.0, labels=y, backend="triton"),
    "dkd": lambda s, t, y: KF.dkd_loss(s, t, y.clamp(min=0), backend="triton"),
}


@device_param
@pytest.mark.parametrize("name", sorted(COMPILE_CASES))
def test_compiles_in_one_graph_with_eager_numbers(device, name):
    torch._dynamo.reset()
    fn = COMPILE_CASES[name]
    s = make((6, 10), device, seed=47).requires_grad_()
    t = make((6, 10), device, seed=48).requires_grad_()
    y = torch.tensor([1, 2, -100, 3, 0, 9], device=device)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss = compiled(s, t, y)
    d_s, d_t = torch.autograd.grad(loss, (s, t))
    expected = fn(s, t, y)
    e_s, e_t = torch.autograd.grad(expected, (s, t))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(d_s, e_s)
    torch.testing.assert_close(d_t, e_t)


@device_param
def test_float64_falls_back_to_the_reference(device):
    s = make((3, 11), device, dtype=torch.float64, seed=49)
    t = make((3, 11), device, dtype=torch.float64, seed=50)
    y = targets(3, 11, device)
    assert torch.equal(KF.jsd_loss(s, t, beta=0.3, backend="triton"), reference.jsd_loss(s, t, beta=0.3))
    assert torch.equal(KF.dkd_loss(s, t, y, backend="triton"), reference.dkd_loss(s, t, y))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("column", ["target", "other"])
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_dkd_nan_anywhere_in_a_row_gives_nan(device, column, side):
    # The zero-mass guards (no non-target teacher mass, a zero binary probability) must not hide a NaN.
    s, t = make((3, 9), device, seed=41), make((3, 9), device, seed=42)
    target = torch.tensor([2, 4, 8], device=device)
    (s if side == "student" else t)[1, 4 if column == "target" else 6] = float("nan")
    loss = KF.dkd_loss(s, t, target, backend="triton")
    assert torch.isnan(loss)
