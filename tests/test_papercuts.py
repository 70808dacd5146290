"""Papercuts, each with the test that would catch its return.

- numpy is a runtime dependency (torch warns "Failed to initialize NumPy" without it);
- `dir(fastkd.functional)` and `dir(fastkd.losses)` list the public API only;
- `ConvRegressor` has a real signature;
- mixed floating dtypes (a float32 student, a bfloat16 teacher) follow one documented rule on every backend;
- the reference's KL, JSD and KD keep no more for the backward pass than the plain PyTorch formula, and their
  fused path (the teacher needs no gradient) is the formula: same values, gradients as accurate, the same
  NaN/Inf and -inf semantics. Speed itself is `python -m bench.cpu_reference`'s (no timers in tests).
"""
from __future__ import annotations

import ast
import inspect
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from fastkd import functional as KF
from fastkd import losses as L
from fastkd import reference as R
from fastkd.reference import logits as RL

REPO = Path(__file__).resolve().parent.parent
F64 = torch.float64
INF = math.inf


# ----------------------------------------------------------------------------------------------------------
# packaging and the public surface

def test_numpy_is_a_runtime_dependency():
    tree = ast.parse((REPO / "setup.py").read_text())
    setup = next(node for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
    requires = ast.literal_eval(next(k.value for k in setup.keywords if k.arg == "install_requires"))
    assert "numpy" in {r.split(">")[0].split("=")[0].split("<")[0].strip() for r in requires}
    # setup.py is the one place dependencies are declared: pyproject.toml has no [project] table to disagree.
    assert "[project]" not in (REPO / "pyproject.toml").read_text()


@pytest.mark.parametrize("module", [KF, L], ids=["functional", "losses"])
def test_dir_lists_only_the_public_api(module):
    assert dir(module) == sorted(module.__all__)
    for name in module.__all__:
        assert callable(getattr(module, name))
    for leaked in ("torch", "checks", "resolve", "reference", "Sequence", "Callable", "annotations", "nn", "KF"):
        assert leaked not in dir(module)


def test_conv_regressor_has_a_real_signature():
    params = inspect.signature(L.ConvRegressor).parameters
    assert list(params) == ["student_shape", "teacher_shape", "use_relu"]
    assert params["student_shape"].annotation == params["teacher_shape"].annotation == "Sequence[int]"
    assert params["use_relu"].annotation == "bool" and params["use_relu"].default is True
    assert all(p.default is inspect.Parameter.empty for p in list(params.values())[:2])
    forward = inspect.signature(L.ConvRegressor.forward)
    assert list(forward.parameters) == ["self", "x"] and forward.return_annotation == "torch.Tensor"
    assert "student_shape:" in L.ConvRegressor.__doc__ and "use_relu:" in L.ConvRegressor.__doc__

    reg = L.ConvRegressor(torch.Size([2, 8, 8, 8]), (2, 16, 4, 4), use_relu=False)
    assert reg(torch.randn(2, 8, 8, 8)).shape == (2, 16, 4, 4)
    with pytest.raises(ValueError, match=r"student_shape must be a 4-d map shape .* got \(8, 8, 8\)"):
        L.ConvRegressor((8, 8, 8), (2, 16, 4, 4))
    with pytest.raises(ValueError, match=r"teacher_shape must hold 4 positive ints .* got \(2, 16, 0, 4\)"):
        L.ConvRegressor((2, 8, 8, 8), (2, 16, 0, 4))


# ----------------------------------------------------------------------------------------------------------
# mixed dtypes: computed in the wider of the two and at least float32, gradients in each input's own dtype

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MIXED = [(s, t) for s in DTYPES for t in DTYPES if s != t]
LOGIT_LOSSES = {
    "kd_loss": lambda s, t, b: KF.kd_loss(s, t, 2.0, target=torch.arange(4) % 7, ce_weight=0.1, kd_weight=0.9,
                                          backend=b),
    "kl_div_loss": lambda s, t, b: KF.kl_div_loss(s, t, direction="reverse", backend=b),
    "jsd_loss": lambda s, t, b: KF.jsd_loss(s, t, beta=0.3, temperature=1.5, backend=b),
    "dkd_loss": lambda s, t, b: KF.dkd_loss(s, t, torch.arange(4) % 7, backend=b),
}


def mixed_inputs(s_dtype, t_dtype, teacher_grad):
    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(4, 7, generator=g, dtype=F64)).to(s_dtype).requires_grad_()
    t = (3 * torch.randn(4, 7, generator=g, dtype=F64)).to(t_dtype).requires_grad_(teacher_grad)
    return s, t


def run_loss(fn, s, t, backend):
    loss = fn(s, t, backend)
    grads = torch.autograd.grad(loss, [x for x in (s, t) if x.requires_grad])
    return loss, grads


@pytest.mark.parametrize("teacher_grad", [False, True], ids=["teacher-fixed", "teacher-grad"])
@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES))
@pytest.mark.parametrize("s_dtype, t_dtype", MIXED, ids=[f"{str(a)[6:]}-{str(b)[6:]}" for a, b in MIXED])
def test_mixed_dtypes_reference(s_dtype, t_dtype, name, teacher_grad):
    """The loss is what both inputs upcast to the common dtype give; gradients come back in each input's dtype."""
    fn = LOGIT_LOSSES[name]
    common = torch.promote_types(torch.promote_types(s_dtype, t_dtype), torch.float32)
    s, t = mixed_inputs(s_dtype, t_dtype, teacher_grad)
    loss, grads = run_loss(fn, s, t, "torch")
    assert loss.dtype == common
    assert [g.dtype for g in grads] == [s_dtype] + ([t_dtype] if teacher_grad else [])
    s_up, t_up = (x.detach().to(common).requires_grad_(x.requires_grad) for x in (s, t))
    want, want_grads = run_loss(fn, s_up, t_up, "torch")
    torch.testing.assert_close(loss, want)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w.to(g.dtype))


@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES))
@pytest.mark.parametrize("s_dtype, t_dtype", MIXED, ids=[f"{str(a)[6:]}-{str(b)[6:]}" for a, b in MIXED])
def test_mixed_dtypes_triton_follow_the_same_rule(s_dtype, t_dtype, name):
    """The Triton kernels (in the interpreter on a CPU) give the reference's dtypes and, within rounding, its
    numbers; a float64 input sends the call to the reference."""
    fkt = pytest.importorskip("fastkd.triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reason = fkt.unavailable_reason(torch.device(device))
    if reason is not None:
        pytest.skip(reason)
    fn = LOGIT_LOSSES[name]
    s, t = mixed_inputs(s_dtype, t_dtype, True)
    want, want_grads = run_loss(fn, s, t, "torch")
    s_dev, t_dev = (x.detach().to(device).requires_grad_() for x in (s, t))
    loss, grads = run_loss(fn, s_dev, t_dev, "triton")
    assert loss.dtype == want.dtype and [g.dtype for g in grads] == [s_dtype, t_dtype]
    torch.testing.assert_close(loss.cpu(), want, rtol=1e-4, atol=1e-5)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g.cpu().double(), w.double(), rtol=2e-2, atol=2e-2 * float(w.abs().max()))


# ----------------------------------------------------------------------------------------------------------
# the reference's memory: no more kept for the backward pass than the plain formula keeps

def flat(x):
    """(..., C) as (rows, C) in float32: batchmean is then per row, as the reference's."""
    return x.reshape(-1, x.shape[-1]).float()


def plain_kl(s, t, T=1.0):
    return F.kl_div(F.log_softmax(flat(s) / T, -1), F.log_softmax(flat(t) / T, -1), log_target=True,
                    reduction="batchmean")


def plain_reverse_kl(s, t):
    return F.kl_div(F.log_softmax(flat(t), -1), F.log_softmax(flat(s), -1), log_target=True, reduction="batchmean")


def plain_kd(s, t, T=4.0):
    return F.kl_div(F.log_softmax(flat(s) / T, -1), F.softmax(flat(t) / T, -1), reduction="batchmean") * T * T


def plain_jsd(s, t, beta=0.5):
    """TRL's generalized_jsd_loss in float32."""
    log_s, log_t = F.log_softmax(flat(s), -1), F.log_softmax(flat(t), -1)
    beta_t = torch.tensor(beta)
    mixture = torch.logsumexp(torch.stack([log_s + torch.log(1 - beta_t), log_t + torch.log(beta_t)]), dim=0)
    jsd = (beta_t * F.kl_div(mixture, log_t, reduction="none", log_target=True)
           + (1 - beta_t) * F.kl_div(mixture, log_s, reduction="none", log_target=True))
    return jsd.sum() / log_s.shape[0]


MEMORY_CASES = {
    "kl_forward": (lambda s, t: R.kl_div_loss(s, t), plain_kl),
    "kl_forward_T2": (lambda s, t: R.kl_div_loss(s, t, 2.0), lambda s, t: plain_kl(s, t, 2.0)),
    "kl_reverse": (lambda s, t: R.kl_div_loss(s, t, direction="reverse"), plain_reverse_kl),
    "kd": (lambda s, t: R.kd_loss(s, t, 4.0), plain_kd),
    "jsd": (lambda s, t: R.jsd_loss(s, t, beta=0.5), plain_jsd),
}


def saved_for_backward(fn, s, t):
    """(bytes, number of rows x classes tensors) autograd saves for the backward pass, the inputs left out."""
    inputs = {s.untyped_storage().data_ptr(), t.untyped_storage().data_ptr()}
    storages, full_size = {}, set()

    def pack(x):
        storage = x.untyped_storage()
        if storage.data_ptr() not in inputs:
            storages[storage.data_ptr()] = storage.nbytes()
            if x.numel() == s.numel():
                full_size.add(storage.data_ptr())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = fn(s, t)
    loss.backward()
    return sum(storages.values()), len(full_size)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", sorted(MEMORY_CASES))
def test_reference_saves_no_more_than_the_plain_formula(name, dtype):
    """The distillation case (student trains, teacher fixed): the reference keeps one (rows, C) tensor, its
    gradient, where the plain formula keeps two (the student's log-probabilities and the teacher's
    probabilities) and autograd through the reference's formula kept those and a mask."""
    ref, plain = MEMORY_CASES[name]
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 8, 1000, generator=g).to(dtype).requires_grad_()
    t = torch.randn(2, 8, 1000, generator=g).to(dtype)
    ref_bytes, ref_full = saved_for_backward(ref, s, t)
    plain_bytes, plain_full = saved_for_backward(plain, s, t)
    assert ref_full == 1 and plain_full >= 2
    assert ref_bytes <= plain_bytes
    torch.testing.assert_close(ref(s, t).float(), plain(s, t).float(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# the fused path (teacher fixed) against the formula (autograd through `divergence_rows`)

KINDS = [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.3), ("jsd", 0.5)]


def logits_case(case, dtype=F64):
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    s, t = 3 * torch.randn(3, 4, 11, generator=g, dtype=F64), 3 * torch.randn(3, 4, 11, generator=g, dtype=F64)
    if case == "masked_both":
        s[..., [2, 5]] = -INF
        t[..., [2, 5]] = -INF
    elif case == "masked_teacher":
        t[..., [2, 5]] = -INF
    elif case == "masked_student":
        s[..., [2, 5]] = -INF
    elif case == "underflow":
        s[..., 3] -= 1e4
        t[..., [3, 4]] -= 1e4
    elif case == "large":
        s, t = 1e4 * s, 1e4 * t
    return s.to(dtype), t.to(dtype)


def by_formula(s, t, T, kind, beta):
    dtype = RL.compute_dtype(s, t)
    return RL.divergence_rows(RL.log_probs(s, T, dtype), RL.log_probs(t, T, dtype), kind, beta)


def rows_and_grad(fn, s, t, *args):
    s = s.detach().clone().requires_grad_()
    rows = fn(s, t.detach(), *args)
    weights = torch.linspace(0.5, 1.5, rows.numel(), dtype=rows.dtype).reshape(rows.shape)
    grad, = torch.autograd.grad(torch.where(torch.isfinite(rows), rows, 0.0).mul(weights).sum(), s)
    return rows.detach(), grad


@pytest.mark.parametrize("case", ["random", "masked_both", "masked_teacher", "masked_student", "underflow", "large"])
@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize("kind, beta", KINDS)
def test_fused_rows_are_the_formula(kind, beta, T, case):
    """Values: the formula's, operation for operation (bit for bit in float64 and float32). Student gradients:
    the formula's to rounding, and finite wherever the formula's are (where a row is infinite and weighted 0,
    autograd through the formula can make 0 * inf = NaN; the closed form does not)."""
    for dtype in (F64, torch.float32):
        s, t = logits_case(case, dtype)
        rows, grad = rows_and_grad(RL.row_divergence, s, t, T, kind, beta)
        want_rows, want_grad = rows_and_grad(by_formula, s, t, T, kind, beta)
        assert torch.allclose(rows, want_rows, rtol=0, atol=0, equal_nan=True)
        finite = torch.isfinite(want_grad)
        assert torch.isfinite(grad[finite]).all()
        # At logits of 1e4 the gradients are ~1e-108 and autograd through the formula loses up to 0.4% of them
        # where the closed form stays exact (checked at 60 digits): accuracy there is the next test's.
        if not finite.any() or case == "large":
            continue
        tol = 1e-12 if dtype == F64 else 1e-5
        torch.testing.assert_close(grad[finite], want_grad[finite], rtol=tol,
                                   atol=tol * float(want_grad[finite].abs().max()))


def gradcheck_student(fn, s, t):
    assert gradcheck(lambda x: fn(x, t), (s.requires_grad_(),), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("case", ["random", "masked_both", "underflow"])
def test_fused_path_gradcheck(case):
    """torch.autograd.gradcheck in float64 with the teacher fixed: the closed-form gradients of the fused path
    (tests/test_gradcheck.py differentiates both inputs, which takes the formula)."""
    s, t = logits_case(case)
    labels = torch.tensor([[0, -100, 3, 1], [-100, -100, 2, 0], [4, 1, -100, 2]])
    for direction in ("forward", "reverse"):
        gradcheck_student(lambda a, b: R.kl_div_loss(a, b, 1.5, direction=direction, labels=labels), s, t)
        gradcheck_student(lambda a, b: R.kl_div_loss(a, b, direction=direction, reduction="none"), s, t)
    for beta in (0.0, 0.3, 1.0):
        gradcheck_student(lambda a, b: R.jsd_loss(a, b, beta=beta, temperature=2.0, labels=labels), s, t)
    target = torch.tensor([[0, 1, 3, 4], [6, 7, 8, 9], [10, 0, 1, 3]])  # none of them a masked class
    gradcheck_student(lambda a, b: R.kd_loss(a, b, 2.5, target=target, ce_weight=0.3, kd_weight=0.7), s, t)


def test_fused_path_semantics():
    """Masked columns: finite loss, zero gradient there. NaN in either input: NaN loss. All tokens ignored: 0
    and a zero gradient. No double backward (the fused gradient is not differentiable again)."""
    s, t = logits_case("masked_both", torch.float32)
    for fn in (lambda a, b: R.kd_loss(a, b), lambda a, b: R.jsd_loss(a, b, beta=0.3),
               lambda a, b: R.kl_div_loss(a, b, direction="reverse")):
        loss, grad = rows_and_grad(fn, s, t)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert torch.equal(grad[..., [2, 5]], torch.zeros_like(grad[..., [2, 5]]))
        for bad in (s, t):
            nan = bad.clone()
            nan[1, 2, 7] = float("nan")
            args = (nan, t) if bad is s else (s, nan)
            assert torch.isnan(rows_and_grad(fn, *args)[0])

    labels = torch.full((3, 4), -100)
    loss, grad = rows_and_grad(lambda a, b: R.jsd_loss(a, b, labels=labels), s, t)
    assert loss == 0 and torch.equal(grad, torch.zeros_like(grad))

    # A non-contiguous student (classes not last in memory) gets the formula's gradient.
    base = s.detach().transpose(0, 2).contiguous().transpose(0, 2)
    assert not base.is_contiguous()
    for kind, beta in KINDS:
        got = rows_and_grad(RL.row_divergence, base, t, 2.0, kind, beta)
        want = rows_and_grad(by_formula, base, t, 2.0, kind, beta)
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])

    x = s.clone().requires_grad_()
    g, = torch.autograd.grad(R.kl_div_loss(x, t), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["random", "masked_teacher", "underflow", "large"])
@pytest.mark.parametrize("kind, beta", KINDS)
def test_fused_path_is_as_accurate_as_the_formula(kind, beta, case, dtype):
    """Against the float64 truth, the fused student gradient in float32 or bfloat16 is at most twice the error of
    autograd through the formula in the same dtype, or a few roundings of the dtype it is returned in."""
    s, t = (x.to(dtype) for x in logits_case(case))
    _, truth = rows_and_grad(by_formula, s.double(), t.double(), 1.0, kind, beta)
    if not torch.isfinite(truth).all():
        pytest.skip("the loss is infinite here")
    _, fused = rows_and_grad(RL.row_divergence, s, t, 1.0, kind, beta)
    _, formula = rows_and_grad(by_formula, s, t, 1.0, kind, beta)
    scale = float(truth.abs().max())

    def err(g):
        return float((g.double() - truth).abs().max()) / scale

    # A few roundings of the dtype the gradient is returned in, as tests/test_adversarial.py's FLOOR.
    floor = 4 * 2.0 ** -8 if dtype == torch.bfloat16 else 8 * 2.0 ** -24
    assert err(fused) <= 2 * max(err(formula), floor)
