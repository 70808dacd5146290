"""The logit losses with the gradient made in the forward pass (fastkd.kernel_losses._RowLoss over the Triton
row operators): values and both gradients against the reference, every reduction and grad_output, long rows,
dtypes, strided rows, -inf and NaN; what autograd keeps (only the gradient buffers); the refused second
backward; torch.compile; opcheck of the operators; and the memory traffic of the kernels, counted in Triton's
interpreter, against the model (one read of each input and one write per gradient for a row in one block,
nothing N x V in the backward when grad_output is 1).

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1),
so the shapes are small; on a GPU the same tests run on CUDA tensors (the traffic count needs the interpreter).
"""
from __future__ import annotations

import collections
import contextlib
import inspect
import math

import numpy as np
import pytest
import torch

from fastkd import functional as KF

pytest.importorskip("triton")
import fastkd.triton as fkt  # noqa: E402
from fastkd.triton import rows as triton_rows  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if fkt.unavailable_reason(torch.device(DEVICE)) is not None:
    pytest.skip(fkt.unavailable_reason(torch.device(DEVICE)), allow_module_level=True)
KERNELS = fkt.KERNELS
interpreted = pytest.mark.skipif(not fkt.INTERPRET, reason="counts the loads and stores of Triton's interpreter")

ONCE = "once-differentiable"


def logits(*shape, seed, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(device=DEVICE, dtype=dtype)


def labels_for(rows, seed, classes=5):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (rows,), generator=g)
    labels[1::3] = -100
    return labels.to(DEVICE)


def targets(rows, classes, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, (rows,), generator=g).to(DEVICE)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 16 columns: rows of more than 16 take the long-row path (passes over blocks)."""
    monkeypatch.setattr(triton_rows, "MAX_BLOCK_V", 16)


def loss_and_grads(fn, student, teacher, grad_output, backend, teacher_grad=True):
    s = student.detach().clone().requires_grad_()
    t = teacher.detach().clone().requires_grad_(teacher_grad)
    loss = fn(s, t, backend)
    if grad_output == "rows":
        g = torch.Generator().manual_seed(99)
        go = torch.randn(loss.shape, generator=g).to(loss.device)
    else:
        go = torch.full_like(loss, grad_output)
    loss.backward(go)
    return loss.detach(), s.grad, t.grad


def tolerances(dtype, want):
    # The loss is float32 for every input dtype; the gradients come back in the input's dtype, each rounded
    # once from float32 (kernel and reference alike): a unit or two of the last place of that dtype, relative
    # to the element, or to the largest element where the terms of a sum (KD's KL and CE parts) cancel.
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-6)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    scale = want.detach().float().abs().nan_to_num(posinf=0.0).max().item() if want.numel() else 0.0
    return dict(rtol=ulp, atol=max(ulp * scale, 1e-6))


def assert_matches_reference(fn, student, teacher, grad_output=1.0, teacher_grad=True):
    got = loss_and_grads(fn, student, teacher, grad_output, "triton", teacher_grad)
    want = loss_and_grads(fn, student, teacher, grad_output, "torch", teacher_grad)
    for g, w, what in zip(got, want, ("loss", "student grad", "teacher grad")):
        if w is None:
            assert g is None, what
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, what
        tol = tolerances(torch.float32 if what == "loss" else student.dtype, w)
        torch.testing.assert_close(g, w, equal_nan=True, **tol, msg=lambda m: f"{what}: {m}")


# The losses, each as fn(student, teacher, backend), with the reductions and options to cover.
def kd(reduction, ce, T=2.0):
    def fn(s, t, backend):
        y = targets(s.numel() // s.shape[-1], s.shape[-1], seed=5).reshape(s.shape[:-1])
        return KF.kd_loss(s, t, T, reduction=reduction, target=y if ce else None, ce_weight=0.3 if ce else 0.0,
                          kd_weight=0.7, backend=backend)
    return fn


def kl_div(direction, reduction, masked=True):
    def fn(s, t, backend):
        labels = labels_for(s.numel() // s.shape[-1], seed=6).reshape(s.shape[:-1]) if masked else None
        return KF.kl_div_loss(s, t, 1.5, direction=direction, labels=labels, reduction=reduction, backend=backend)
    return fn


def jsd(beta, reduction, masked=True):
    def fn(s, t, backend):
        labels = labels_for(s.numel() // s.shape[-1], seed=7).reshape(s.shape[:-1]) if masked else None
        return KF.jsd_loss(s, t, beta=beta, temperature=2.0, labels=labels, reduction=reduction, backend=backend)
    return fn


def dkd():
    def fn(s, t, backend):
        return KF.dkd_loss(s, t, targets(s.shape[0], s.shape[-1], seed=8), alpha=1.0, beta=8.0, temperature=4.0,
                           backend=backend)
    return fn


REDUCTIONS = ["batchmean", "sum", "mean", "none"]
LOSSES = {
    **{f"kd-{r}-{'ce' if ce else 'plain'}": kd(r, ce) for r in REDUCTIONS for ce in (True, False)},
    **{f"kl-{d}-{r}": kl_div(d, r) for d in ("forward", "reverse") for r in REDUCTIONS},
    **{f"jsd-{b}-{r}": jsd(b, r) for b in (0.3, 0.0, 1.0) for r in ("batchmean", "none")},
    "dkd": dkd(),
}
ONE_OF_EACH = {"kd": kd("batchmean", True), "kl": kl_div("reverse", "batchmean"), "jsd": jsd(0.3, "batchmean"),
               "dkd": dkd()}


def grad_output_for(name):
    # A per-row grad_output for a per-row loss, else 0.5 (a scale that is neither 1 nor 0).
    return "rows" if name.endswith("none") or "-none-" in name else 0.5


@pytest.mark.parametrize("V", [1, 7, 100])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_matches_reference(name, V):
    s, t = logits(6, V, seed=1), logits(6, V, seed=2)
    assert_matches_reference(LOSSES[name], s, t, grad_output_for(name))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_long_rows_match_reference(name, small_blocks):
    """V = 45 > MAX_BLOCK_V = 16: the passes over blocks, the last one writing the gradient."""
    s, t = logits(6, 45, seed=3), logits(6, 45, seed=4)
    assert_matches_reference(LOSSES[name], s, t, grad_output_for(name))


@pytest.mark.parametrize("long_rows", [False, True], ids=["one-block", "long"])
@pytest.mark.parametrize("grad_output", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("name", sorted(ONE_OF_EACH))
def test_grad_output(name, grad_output, long_rows, monkeypatch):
    if long_rows:
        monkeypatch.setattr(triton_rows, "MAX_BLOCK_V", 16)
    s, t = logits(5, 37, seed=9), logits(5, 37, seed=10)
    assert_matches_reference(ONE_OF_EACH[name], s, t, grad_output)


@pytest.mark.parametrize("name", sorted(ONE_OF_EACH))
def test_student_gradient_only(name):
    """The usual distillation: the teacher needs no gradient, none is written."""
    s, t = logits(5, 37, seed=11), logits(5, 37, seed=12)
    assert_matches_reference(ONE_OF_EACH[name], s, t, 0.5, teacher_grad=False)


@pytest.mark.parametrize("long_rows", [False, True], ids=["one-block", "long"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name", sorted(ONE_OF_EACH))
def test_dtypes(name, dtype, long_rows, monkeypatch):
    if long_rows:
        monkeypatch.setattr(triton_rows, "MAX_BLOCK_V", 16)
    s, t = logits(4, 40, seed=13, dtype=dtype), logits(4, 40, seed=14, dtype=dtype)
    assert_matches_reference(ONE_OF_EACH[name], s, t, 1.0)


@pytest.mark.parametrize("long_rows", [False, True], ids=["one-block", "long"])
@pytest.mark.parametrize("name", ["kd", "kl", "jsd"])
def test_non_contiguous_rows(name, long_rows, monkeypatch):
    """logits[:, :-1] of (B, S + 1, V): rows addressed by strides; the gradients reach the full tensors."""
    if long_rows:
        monkeypatch.setattr(triton_rows, "MAX_BLOCK_V", 16)
    fn = ONE_OF_EACH[name]
    sliced = lambda s, t, backend: fn(s[:, :-1], t[:, :-1], backend)  # noqa: E731
    assert_matches_reference(sliced, logits(2, 4, 29, seed=15), logits(2, 4, 29, seed=16), 0.5)


@pytest.mark.parametrize("long_rows", [False, True], ids=["one-block", "long"])
@pytest.mark.parametrize("name", sorted(ONE_OF_EACH))
def test_minus_infinity(name, long_rows, monkeypatch):
    """A masked vocabulary (-inf in both) and a probability of 0 on one side: the reference's values."""
    if long_rows:
        monkeypatch.setattr(triton_rows, "MAX_BLOCK_V", 16)
    s, t = logits(4, 40, seed=17), logits(4, 40, seed=18)
    s[:, 30:] = float("-inf")
    t[:, 30:] = float("-inf")
    # Probability 0 on the side the KL is taken under (the student for the reverse KL): a finite divergence.
    (s if name == "kl" else t)[0, 7] = float("-inf")
    (s if name == "kl" else t)[1, 8] = -1e4
    if name == "dkd":  # targets where both have mass
        s[:, 30:] = t[:, 30:] = -1e4
    assert_matches_reference(ONE_OF_EACH[name], s, t, 1.0)


@pytest.mark.parametrize("long_rows", [False, True], ids=["one-block", "long"])
@pytest.mark.parametrize("which", ["student", "teacher"])
@pytest.mark.parametrize("name", sorted(ONE_OF_EACH))
def test_nan_never_gives_a_finite_loss(name, which, long_rows, monkeypatch):
    if long_rows:
        monkeypatch.setattr(triton_rows, "MAX_BLOCK_V", 16)
    s, t = logits(3, 20, seed=19), logits(3, 20, seed=20)
    (s if which == "student" else t)[2, 4] = float("nan")  # row 2: never an ignored token
    s.requires_grad_()
    loss = ONE_OF_EACH[name](s, t, "triton")
    assert not torch.isfinite(loss)
    loss.backward()
    assert not torch.isfinite(s.grad[2]).all()


def big_saved(fn, s, t):
    """The tensors autograd saves for the loss's backward that have as many elements as the logits."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = fn(s, t, "triton")
    return loss, [x for x in saved if x.numel() >= s.numel()]


@pytest.mark.parametrize("teacher_grad", [False, True])
@pytest.mark.parametrize("name", sorted(ONE_OF_EACH))
def test_only_the_gradient_is_saved(name, teacher_grad):
    s = logits(4, 33, seed=21).requires_grad_()
    t = logits(4, 33, seed=22).requires_grad_(teacher_grad)
    loss, saved = big_saved(ONE_OF_EACH[name], s, t)
    assert len(saved) == 1 + teacher_grad
    inputs = {s.untyped_storage().data_ptr(), t.untyped_storage().data_ptr()}
    assert all(x.untyped_storage().data_ptr() not in inputs for x in saved), "a logit tensor was saved"
    loss.backward()
    # The saved buffers are the gradients, scaled in place and handed to autograd.
    torch.testing.assert_close(saved[0], s.grad, rtol=0, atol=0)
    if teacher_grad:
        torch.testing.assert_close(saved[1], t.grad, rtol=0, atol=0)


def test_nothing_saved_without_grad():
    s, t = logits(4, 33, seed=23), logits(4, 33, seed=24)
    with torch.no_grad():
        loss, saved = big_saved(ONE_OF_EACH["kd"], s.requires_grad_(), t)
    assert saved == [] and not loss.requires_grad


@pytest.mark.parametrize("name", sorted(ONE_OF_EACH))
def test_second_backward_raises(name):
    s = logits(4, 9, seed=25).requires_grad_()
    t = logits(4, 9, seed=26).requires_grad_()
    loss = ONE_OF_EACH[name](s, t, "triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=ONCE):
        loss.backward()
    with pytest.raises(RuntimeError):  # without retain_graph, autograd's own refusal
        loss2 = ONE_OF_EACH[name](s, t, "triton")
        loss2.backward()
        loss2.backward()


def test_per_row_loss_summed_reads_no_gradient():
    """`loss.sum().backward()` on a per-row loss: grad_output is an expanded 1, every row is left as written."""
    s, t = logits(5, 11, seed=27), logits(5, 11, seed=28)
    assert_matches_reference(lambda s, t, b: KF.kl_div_loss(s, t, reduction="none", backend=b).sum()[None], s, t)


def compiled_cases():
    y = targets(6, 10, seed=46)
    labels = labels_for(6, seed=47)
    return {  # the index tensors made outside the traced function
        "kd": lambda s, t: KF.kd_loss(s, t, 4.0, target=y, ce_weight=0.1, kd_weight=0.9, backend="triton"),
        "kd-none": lambda s, t: KF.kd_loss(s, t, 4.0, reduction="none", backend="triton"),
        "kl": lambda s, t: KF.kl_div_loss(s, t, 2.0, direction="reverse", labels=labels, backend="triton"),
        "jsd": lambda s, t: KF.jsd_loss(s, t, beta=0.3, labels=labels, reduction="sum", backend="triton"),
        "dkd": lambda s, t: KF.dkd_loss(s, t, y, backend="triton"),
    }


@pytest.mark.parametrize("name", ["kd", "kd-none", "kl", "jsd", "dkd"])
def test_compiled_equals_eager(name):
    torch._dynamo.reset()
    fn = compiled_cases()[name]
    s = logits(6, 10, seed=29).requires_grad_()
    t = logits(6, 10, seed=30).requires_grad_()
    fn(s, t)  # the backend's first use (its module import) before tracing
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for grad_output in (1.0, 0.5):
        loss = compiled(s, t)
        got = torch.autograd.grad(loss, (s, t), torch.full_like(loss, grad_output))
        expected = fn(s, t)
        want = torch.autograd.grad(expected, (s, t), torch.full_like(expected, grad_output))
        torch.testing.assert_close(loss, expected)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


def test_opcheck():
    s, t = logits(4, 10, seed=31), logits(4, 10, seed=32)
    labels = torch.tensor([0, -100, 4, 2], device=DEVICE)
    y = torch.tensor([1, 2, 9, 0], device=DEVICE)
    one = torch.ones(1, device=DEVICE).expand(4)
    w = torch.rand(4, device=DEVICE)
    t_rows = 0.5 + torch.rand(4, device=DEVICE)
    t_one = torch.full((1,), 2.0, device=DEVICE).expand(4)  # one temperature for every row: a stride-0 view
    for grads in [(True, True), (True, False), (False, True), (False, False)]:
        torch.library.opcheck(KERNELS.kl_rows, (s, t, 2.0, None, False, y, None, -100, one, w, *grads, False))
        torch.library.opcheck(KERNELS.kl_rows, (s, t, 1.0, None, True, None, labels, -100, w, None, *grads, False))
        torch.library.opcheck(KERNELS.jsd_rows, (s, t, 0.3, 2.0, None, labels, -100, one, *grads, False))
        torch.library.opcheck(KERNELS.dkd_rows, (s, t, y, 4.0, None, one, w, *grads, False))
    torch.library.opcheck(KERNELS.kl_rows, (s, t, 2.0, None, False, None, None, -100, None, None, True, False, False))
    # A per-row temperature, with its gradient alone or beside the inputs' (tests/test_kernel_ops.py: every flag).
    torch.library.opcheck(KERNELS.kl_rows, (s, t, 1.0, t_rows, False, y, None, -100, one, w, True, True, True))
    torch.library.opcheck(KERNELS.kl_rows, (s, t, 1.0, t_one, True, None, labels, -100, w, None, False, False, True))
    torch.library.opcheck(KERNELS.jsd_rows, (s, t, 0.3, 1.0, t_rows, labels, -100, one, True, False, True))
    torch.library.opcheck(KERNELS.dkd_rows, (s, t, y, 1.0, t_one, one, w, False, True, True))
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(KERNELS.scale_rows_, (logits(4, 10, seed=33, dtype=dtype), w))
        torch.library.opcheck(KERNELS.scale_rows_, (logits(2, 2, 10, seed=34, dtype=dtype), one))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scale_rows(dtype):
    d = logits(5, 300, seed=35, dtype=dtype)
    d[3, 7] = float("inf")
    scale = torch.tensor([1.0, 0.5, 0.0, 0.0, 3.0], device=DEVICE)
    want = (d.float() * scale[:, None]).to(d.dtype)  # 0 * inf: NaN, as autograd's product
    KERNELS.scale_rows_(d, scale)
    # float32 exactly; bfloat16 within its rounding (the interpreter's conversion is not round-to-nearest)
    torch.testing.assert_close(d, want, equal_nan=True, **(dict(rtol=0, atol=0) if dtype == torch.float32 else
                                                           dict(rtol=2 ** -7, atol=0)))
    assert torch.isnan(d[3, 7]) and torch.equal(d[2], torch.zeros_like(d[2]))


@pytest.mark.parametrize("V", [1, 2, 7])
def test_small_vocabularies_every_loss_and_flag(V):
    """The operators directly: every combination of gradient flags gives the same per-row terms, and a
    gradient not asked for is an empty tensor."""
    s, t = logits(3, V, seed=36), logits(3, V, seed=37)
    y = targets(3, V, seed=38)
    w = torch.ones(3, device=DEVICE)
    base = None
    for grads in [(False, False), (True, False), (False, True), (True, True)]:
        out = KERNELS.kl_rows(s, t, 2.0, None, False, y, None, -100, w, w, *grads, False)
        assert [o.numel() for o in out[2:]] == [s.numel() if g else 0 for g in grads] + [0]
        base = out[:2] if base is None else base
        torch.testing.assert_close(out[:2], base, rtol=0, atol=0)


# --- a per-row (learnable) temperature: d_T, against float64 autograd of the plain formulas --------------------
#
# The operators directly (fastkd.kernel_losses, the public functions' side, adds the T^2 of the weights). Each
# case runs the kernel with `temperature_rows` and `temperature_grad`, and float64 autograd of the formula with
# a per-row temperature tensor that requires grad: d_T[r] = d/dT_r sum_r w_r term_r (CE has no T), and the
# input gradients of sum_r w_r term_r (+ ce_w_r CE_r) with that same temperature.

KINDS = ["kl-forward", "kl-forward-ce", "kl-reverse-labels", "jsd-labels", "dkd"]
T_ROWS = [0.7, 1.5, 2.0, 3.3, 1.0]


def call_rows(kind, s, t, temperature, t_rows, weights, target, labels, grads=(True, True), t_grad=True):
    """`(terms, d_student, d_teacher, d_T)` of the kind's operator; `terms` a list (CE, DKD's two parts)."""
    w1, w2 = weights
    if kind.startswith("kl"):
        ce = kind.endswith("-ce")
        kl, ce_rows, d_s, d_t, d_T = KERNELS.kl_rows(
            s, t, temperature, t_rows, "reverse" in kind, target if ce else None,
            labels if "labels" in kind else None, -100, w1, w2 if ce else None, *grads, t_grad)
        return [kl, ce_rows] if ce else [kl], d_s, d_t, d_T
    if kind.startswith("jsd"):
        jsd_r, d_s, d_t, d_T = KERNELS.jsd_rows(s, t, 0.3, temperature, t_rows, labels if "labels" in kind else None,
                                                -100, w1, *grads, t_grad)
        return [jsd_r], d_s, d_t, d_T
    tckd, nckd, d_s, d_t, d_T = KERNELS.dkd_rows(s, t, target, temperature, t_rows, w1, w2, *grads, t_grad)
    return [tckd, nckd], d_s, d_t, d_T


def reference_rows(kind, s, t, t_rows, weights, target, labels):
    """float64 autograd of the plain formulas with a per-row temperature: `(terms, d_s, d_t, d_T)`. -inf reads
    as -1e4 (the same softmax in float64, and no `-inf / T` whose d/dT is -inf * 0)."""
    rows, V = s.shape
    T = t_rows.detach().double().cpu().requires_grad_()
    s64 = s.detach().double().cpu().clamp_min(-1e4).requires_grad_()
    t64 = t.detach().double().cpu().clamp_min(-1e4).requires_grad_()
    w1, w2 = (w.double().cpu() for w in weights)
    active = torch.ones(rows, dtype=torch.bool) if "labels" not in kind else labels.cpu() != -100
    x_s, x_t = s64 / T[:, None], t64 / T[:, None]
    ls, lt = torch.log_softmax(x_s, -1), torch.log_softmax(x_t, -1)
    target = target.cpu()
    if kind.startswith("kl"):
        lp, lq = (ls, lt) if "reverse" in kind else (lt, ls)
        terms = [(lp.exp() * (lp - lq)).sum(-1)]
        total = (w1 * active * terms[0]).sum()
        if kind.endswith("-ce"):
            terms.append(-torch.log_softmax(s64, -1).gather(1, target[:, None])[:, 0])  # the raw student, no T
            total = total + (w2 * terms[1]).sum()
    elif kind.startswith("jsd"):
        beta = 0.3
        lm = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log(1 - beta)]), 0)
        terms = [beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)]
        total = (w1 * active * terms[0]).sum()
    else:
        gt = torch.nn.functional.one_hot(target, V).bool()
        p_s, p_t = ls.exp(), lt.exp()
        b_s = torch.stack([p_s[gt], p_s.masked_fill(gt, 0).sum(-1)], -1)
        b_t = torch.stack([p_t[gt], p_t.masked_fill(gt, 0).sum(-1)], -1)
        tckd = (b_t * (b_t.log() - b_s.log())).sum(-1)
        lq_rest = torch.log_softmax(x_s[~gt].reshape(rows, V - 1), -1)
        lp_rest = torch.log_softmax(x_t[~gt].reshape(rows, V - 1), -1)
        nckd = (lp_rest.exp() * (lp_rest - lq_rest)).sum(-1)
        terms = [tckd, nckd]
        total = (w1 * tckd + w2 * nckd).sum()
    d_s, d_t, d_T = torch.autograd.grad(total, (s64, t64, T))
    terms = [torch.where(active, term, 0.0).detach() for term in terms]
    return terms, d_s, d_t, d_T


def t_rows_inputs(kind, dtype, minus_inf, rows=5, V=37):
    s, t = logits(rows, V, seed=60, dtype=dtype), logits(rows, V, seed=61, dtype=dtype)
    target = targets(rows, 28, seed=62)  # where both have mass
    labels = labels_for(rows, seed=63)
    if minus_inf:
        s[:, 30:] = t[:, 30:] = float("-inf")  # a masked vocabulary
        (s if "reverse" in kind else t)[0, 7] = float("-inf")  # probability 0 on the side the KL is taken under
        (s if "reverse" in kind else t)[2, 5] = -1e4
    g = torch.Generator().manual_seed(64)
    weights = tuple((0.2 + torch.rand(rows, generator=g)).to(DEVICE) for _ in range(2))
    return s, t, target, labels, weights


def assert_d_T_close(got, want):
    # float32 sums of per-element products against float64: relative to the row's largest |d_T|.
    want = want.to(got.device, torch.float32)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5 * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("long_rows", [False, True], ids=["one-block", "long"])
@pytest.mark.parametrize("case", [(d, False) for d in (torch.float32, torch.bfloat16, torch.float16)]
                         + [(torch.float32, True)], ids=["fp32", "bf16", "fp16", "fp32-minus-inf"])
@pytest.mark.parametrize("kind", KINDS)
def test_temperature_gradient(kind, case, long_rows, monkeypatch):
    """d_T (and the terms and both input gradients at the per-row temperature) against float64 autograd."""
    dtype, minus_inf = case
    if long_rows:
        monkeypatch.setattr(triton_rows, "MAX_BLOCK_V", 16)
    s, t, target, labels, weights = t_rows_inputs(kind, dtype, minus_inf)
    t_rows = torch.tensor(T_ROWS, device=DEVICE)
    terms, d_s, d_t, d_T = call_rows(kind, s, t, 123.0, t_rows, weights, target, labels)
    want_terms, want_s, want_t, want_T = reference_rows(kind, s, t, t_rows, weights, target, labels)
    assert d_T.dtype == torch.float32 and d_T.shape == (s.shape[0],)
    assert_d_T_close(d_T, want_T)
    for got, want in zip(terms, want_terms):
        torch.testing.assert_close(got, want.to(got.device, torch.float32), rtol=1e-5, atol=1e-5)
    for got, want in ((d_s, want_s), (d_t, want_t)):
        want = want.to(got.device, dtype)
        torch.testing.assert_close(got, want, **tolerances(dtype, want))
    if "labels" in kind:
        ignored = labels == -100
        assert (d_T[ignored] == 0).all() and (terms[0][ignored] == 0).all()


@pytest.mark.parametrize("long_rows", [False, True], ids=["one-block", "long"])
@pytest.mark.parametrize("kind", KINDS)
def test_temperature_rows_equal_the_float(kind, long_rows, monkeypatch):
    """One temperature for every row as an expanded 0-stride view: terms and gradients exactly those of the
    float temperature (the same 1/T in float32), d_T as float64's; the float path with `temperature_grad`
    gives the same d_T; only the gradients asked for are written."""
    if long_rows:
        monkeypatch.setattr(triton_rows, "MAX_BLOCK_V", 16)
    s, t, target, labels, weights = t_rows_inputs(kind, torch.float32, True)
    rows = s.shape[0]
    t_one = torch.full((1,), 1.5, device=DEVICE).expand(rows)
    want = call_rows(kind, s, t, 1.5, None, weights, target, labels, t_grad=False)
    assert want[3].numel() == 0
    got = call_rows(kind, s, t, 0.0, t_one, weights, target, labels)  # the float is ignored, even 0
    for g, w in zip(got[0] + list(got[1:3]), want[0] + list(want[1:3])):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)
    assert_d_T_close(got[3], reference_rows(kind, s, t, t_one, weights, target, labels)[3])
    torch.testing.assert_close(call_rows(kind, s, t, 1.5, None, weights, target, labels)[3], got[3], rtol=0,
                               atol=0)
    # d_T alone, or with one input's gradient: the same d_T, the terms unchanged, only that gradient written.
    for grads in [(False, False), (True, False)] if long_rows else [(False, False), (True, False), (False, True)]:
        out = call_rows(kind, s, t, 0.0, t_one, weights, target, labels, grads=grads)
        assert [o.numel() for o in out[1:3]] == [s.numel() if g else 0 for g in grads]
        torch.testing.assert_close(out[3], got[3], rtol=0, atol=0)
        for g, w in zip(out[0], want[0]):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("long_rows", [False, True], ids=["one-block", "long"])
@pytest.mark.parametrize("kind", KINDS)
def test_temperature_not_positive_gives_nan(kind, long_rows, monkeypatch):
    """A row whose temperature is 0, negative or NaN: NaN terms, gradients and d_T in that row only."""
    if long_rows:
        monkeypatch.setattr(triton_rows, "MAX_BLOCK_V", 16)
    kind = kind.replace("-labels", "")  # every row active
    s, t, target, labels, weights = t_rows_inputs(kind, torch.float32, False)
    t_rows = torch.tensor([1.5, 0.0, -1.0, float("nan"), 2.0], device=DEVICE)
    terms, d_s, d_t, d_T = call_rows(kind, s, t, 1.0, t_rows, weights, target, labels)
    bad = torch.tensor([False, True, True, True, False], device=DEVICE)
    for term in terms[:1] if kind.endswith("-ce") else terms:  # CE has no temperature
        assert torch.isnan(term[bad]).all() and torch.isfinite(term[~bad]).all()
    assert torch.isnan(d_T[bad]).all() and torch.isfinite(d_T[~bad]).all()
    for d in (d_s, d_t):
        assert torch.isnan(d[bad]).all() and torch.isfinite(d[~bad]).all()
    want = reference_rows(kind, s[~bad], t[~bad], t_rows[~bad], [w[~bad] for w in weights], target[~bad], None)
    assert_d_T_close(d_T[~bad], want[3])


@pytest.mark.parametrize("kind", ["kl-forward-ce", "jsd-labels", "dkd"])
def test_temperature_rows_of_strided_rows(kind):
    """logits[:, :-1] of (B, S + 1, V): row r of the (B, S) rows reads temperature_rows[r], as contiguous."""
    s, t = logits(2, 4, 29, seed=65), logits(2, 4, 29, seed=66)
    y = targets(6, 29, seed=67)
    labels = labels_for(6, seed=68)
    weights = (torch.rand(6, device=DEVICE), torch.rand(6, device=DEVICE))
    t_rows = torch.tensor([0.6, 1.1, 1.7, 2.3, 2.9, 3.5], device=DEVICE)
    flat = lambda v: v[:, :-1].reshape(6, 29)  # noqa: E731
    if kind == "dkd":  # DKD's rows are (N, C)
        s, t = s[:, :-1].reshape(6, 29), t[:, :-1].reshape(6, 29)
        got = call_rows(kind, s.t().contiguous().t(), t, 1.0, t_rows, weights, y, labels)  # column-major student
        want = call_rows(kind, s.contiguous(), t, 1.0, t_rows, weights, y, labels)
    else:
        got = call_rows(kind, s[:, :-1], t[:, :-1], 1.0, t_rows, weights, y.reshape(2, 3), labels.reshape(2, 3))
        want = call_rows(kind, flat(s).contiguous(), flat(t).contiguous(), 1.0, t_rows, weights, y, labels)
    for g, w in zip(got[0] + [got[3]], want[0] + [want[3]]):
        torch.testing.assert_close(g.reshape(-1), w.reshape(-1), rtol=0, atol=0)
    for g, w in zip(got[1:3], want[1:3]):
        torch.testing.assert_close(g.reshape(-1, 29), w.reshape(-1, 29), rtol=0, atol=0)


# --- the memory traffic, counted in the interpreter --------------------------------------------------------

class Traffic:
    """Elements each kernel launch loads and stores, by kernel and by argument (the tensor the address falls
    in), counted in Triton's interpreter: only the lanes the mask lets through."""

    def __init__(self):
        self.counts = collections.Counter()
        self.launches = []
        self._current = None

    def regions(self, fn, args, kwargs):
        names = inspect.getfullargspec(fn).args
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        out = []
        for name in names:  # in the kernel's argument order: the logits first
            value = bound.get(name)
            if isinstance(value, torch.Tensor) and value.numel() > 0:
                storage = value.untyped_storage()
                out.append((name, storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
        return out

    def count(self, what, ptrs, mask):
        kernel, regions = self._current
        addresses = ptrs.data.astype("uint64")
        lanes = np.broadcast_to(mask.data.astype(bool), addresses.shape)
        taken = addresses[lanes].reshape(-1)
        for name, lo, hi in regions:
            inside = (taken >= lo) & (taken < hi)
            if inside.any():
                self.counts[kernel, name, what] += int(inside.sum())
                taken = taken[~inside]
        assert taken.size == 0, f"{kernel}: an access outside its arguments"

    def __getitem__(self, key):
        return self.counts[key]

    def total(self, kernel, what):
        return sum(n for (k, _, w), n in self.counts.items() if k == kernel and w == what)


@contextlib.contextmanager
def traffic():
    from triton.runtime import interpreter
    counter = Traffic()
    builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
    load, store, call = builder.create_masked_load, builder.create_masked_store, executor.__call__

    def counted_load(self, ptrs, mask, *rest):
        counter.count("load", ptrs, mask)
        return load(self, ptrs, mask, *rest)

    def counted_store(self, ptrs, value, mask, *rest):
        counter.count("store", ptrs, mask)
        return store(self, ptrs, value, mask, *rest)

    def launch(self, *args, **kwargs):
        counter._current = (self.fn.__name__, counter.regions(self.fn, args, kwargs))
        counter.launches.append(self.fn.__name__)
        try:
            return call(self, *args, **kwargs)
        finally:
            counter._current = None

    builder.create_masked_load, builder.create_masked_store, executor.__call__ = counted_load, counted_store, launch
    try:
        yield counter
    finally:
        builder.create_masked_load, builder.create_masked_store, executor.__call__ = load, store, call


def forward_backward_traffic(fn, s, t, grad_output=1.0, teacher_grad=False):
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_(teacher_grad)
    with traffic() as forward:
        loss = fn(s, t, "triton")
    with traffic() as backward:
        loss.backward(torch.full_like(loss, grad_output))
    return forward, backward


N, V = 6, 40


@interpreted
@pytest.mark.parametrize("long_rows", [False, True], ids=["one-block", "long"])
@pytest.mark.parametrize("grad_output", [1.0, 0.5])
def test_traffic_kl_student_gradient(grad_output, long_rows, monkeypatch):
    """Forward KL (X = teacher, Y = student), the student's gradient: one block reads each input once and
    writes the gradient once; long rows read each input three times (maxima, sums, gradient). The backward
    reads one scale per row and, at grad_output 1, nothing else."""
    if long_rows:
        monkeypatch.setattr(triton_rows, "MAX_BLOCK_V", 16)
    reads = 3 if long_rows else 1
    s, t = logits(N, V, seed=40), logits(N, V, seed=41)
    forward, backward = forward_backward_traffic(kl_div("forward", "batchmean", masked=False), s, t, grad_output)
    assert forward.launches == ["kl_rows_kernel"]
    k = "kl_rows_kernel"
    assert forward[k, "x_ptr", "load"] == reads * N * V  # the teacher
    assert forward[k, "y_ptr", "load"] == reads * N * V  # the student
    assert forward[k, "dy_ptr", "store"] == N * V  # the student's gradient, once
    assert forward[k, "dx_ptr", "store"] == 0  # no teacher gradient asked for
    assert forward[k, "kl_w_ptr", "load"] == N  # the row weight (stride 0: one number)
    assert forward.total(k, "load") == 2 * reads * N * V + N
    assert forward.total(k, "store") == N * V + N  # the gradient and the per-row KL

    assert backward.launches == ["scale_rows_kernel"]
    assert backward["scale_rows_kernel", "scale_ptr", "load"] == N
    moved = 0 if grad_output == 1.0 else N * V
    assert backward["scale_rows_kernel", "d_ptr", "load"] == moved
    assert backward["scale_rows_kernel", "d_ptr", "store"] == moved


@interpreted
@pytest.mark.parametrize("long_rows", [False, True], ids=["one-block", "long"])
def test_traffic_both_gradients_every_loss(long_rows, monkeypatch):
    """Both gradients (mutual learning): each input read once per pass (1 for one block; 3 for long rows,
    4 for JSD, whose gradient needs the divergences of pass 3), each gradient written once; the per-row
    scalars besides (CE's target logit, DKD's target logits, the weights, the labels) are O(N)."""
    if long_rows:
        monkeypatch.setattr(triton_rows, "MAX_BLOCK_V", 16)
    s, t = logits(N, V, seed=42), logits(N, V, seed=43)
    cases = {"kd": ("kl_rows_kernel", 3, 1), "kl": ("kl_rows_kernel", 3, 0), "jsd": ("jsd_rows_kernel", 4, 0),
             "dkd": ("dkd_rows_kernel", 3, 1)}
    for name, (kernel, long_reads, scalars) in cases.items():
        reads = long_reads if long_rows else 1
        forward, backward = forward_backward_traffic(ONE_OF_EACH[name], s, t, 1.0, teacher_grad=True)
        assert forward.launches == [kernel], name
        # kd: X = teacher, Y = student (+ the target logit for CE); kl (reverse): X = student; jsd, dkd: X = student.
        student, teacher = ("y_ptr", "x_ptr") if name == "kd" else ("x_ptr", "y_ptr")
        kept = N - len(range(1, N, 3)) if name in ("kl", "jsd") else N  # ignored tokens read nothing
        assert forward[kernel, student, "load"] == reads * kept * V + scalars * N, name
        assert forward[kernel, teacher, "load"] == reads * kept * V + (N if name == "dkd" else 0), name
        assert forward[kernel, "dx_ptr", "store"] == N * V and forward[kernel, "dy_ptr", "store"] == N * V, name
        assert forward[kernel, "dx_ptr", "load"] == forward[kernel, "dy_ptr", "load"] == 0, name
        assert backward.launches == ["scale_rows_kernel"] * 2, name
        assert backward.total("scale_rows_kernel", "load") == 2 * N, name  # the scales only
        assert backward.total("scale_rows_kernel", "store") == 0, name


@interpreted
def test_traffic_inference_writes_no_gradient():
    s, t = logits(N, V, seed=44), logits(N, V, seed=45)
    for name, fn in ONE_OF_EACH.items():
        with torch.no_grad(), traffic() as forward:
            fn(s.requires_grad_(), t, "triton")
        (kernel,) = forward.launches
        assert forward[kernel, "dx_ptr", "store"] == forward[kernel, "dy_ptr", "store"] == 0, name
        assert forward.total(kernel, "store") <= 2 * N, name  # the per-row terms only
        assert forward.total(kernel, "load") <= 2 * N * V + 3 * N, name
