"""Edge cases for every loss in `fastkd.functional`.

Covered: the smallest batch, one class, odd sizes, leading dims; non-contiguous, strided, transposed and
channels-last inputs; -inf logits (masked vocabulary) and probabilities that underflow to 0; NaN/Inf inputs;
masked tokens and the reductions; bf16/fp16/fp64 inputs and the bf16 error budget; determinism.

The oracles (`naive_*` here, and the popular implementations' formulas of tests/formulas.py) are plain PyTorch
transcriptions of the popular implementations' formulas (RepDistiller, mdistiller, TRL, torchdistill), written
independently of `fastkd.reference` and run in float64. The bf16 budget test measures against
`fastkd.reference` in float64, as its rule says.
"""
from __future__ import annotations

import formulas as popular
import pytest
import torch
import torch.nn.functional as F

from fastkd import functional as K
from fastkd import reference as R
from fastkd.losses import ConvRegressor

INF, NAN = float("inf"), float("nan")
F64 = torch.float64
LOW_PRECISION = (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------------------
# helpers

def randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def leaves(values, dtype=torch.float32):
    return [v.detach().to(dtype).requires_grad_() for v in values]


def grads(loss, inputs):
    """Gradients of `loss.sum()` for each input; zeros for an input the loss does not depend on."""
    return list(torch.autograd.grad(loss.sum(), inputs, allow_unused=True, materialize_grads=True))


def loss_and_grads(fn, inputs):
    loss = fn(*inputs)
    return loss.detach(), grads(loss, inputs)


def all_finite(tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def assert_all_close(actual, expected, **tol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e.to(a.dtype), **tol)


# ----------------------------------------------------------------------------------------------------------
# naive oracles (float64, straight from the formulas the libraries use)

def rows2d(x):
    return x.reshape(-1, x.shape[-1])


def naive_kd(s, t, T):
    """RepDistiller `DistillKL(T)`."""
    s, t = rows2d(s), rows2d(t)
    return F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T


def naive_kl(s, t, T, direction):
    """forward `KL(p_t || p_s)`, reverse `KL(p_s || p_t)`, mean over rows, no T^2."""
    s, t = rows2d(s), rows2d(t)
    if direction == "reverse":
        s, t = t, s
    return F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="sum") / s.shape[0]


def naive_jsd(s, t, beta, T):
    """TRL `generalized_jsd_loss` (probability targets, so a finite input against p = 0 gives 0)."""
    s, t = rows2d(s), rows2d(t)
    ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    if beta == 0:
        per = F.kl_div(ls, lt.exp(), reduction="none")
    elif beta == 1:
        per = F.kl_div(lt, ls.exp(), reduction="none")
    else:
        b = torch.tensor(beta, dtype=ls.dtype)
        m = torch.logsumexp(torch.stack([ls + torch.log1p(-b), lt + torch.log(b)]), 0)
        per = b * F.kl_div(m, lt.exp(), reduction="none") + (1 - b) * F.kl_div(m, ls.exp(), reduction="none")
    return per.sum() / s.shape[0]


def naive_dkd(s, t, target, alpha=1.0, beta=8.0, T=4.0):
    """mdistiller `dkd_loss`, including its `- 1000 * gt` trick."""
    gt = F.one_hot(target, s.shape[1]).to(s.dtype)
    other = 1 - gt
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * other).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * other).sum(1)], 1)
    tckd = F.kl_div(torch.log(bs), bt, reduction="sum") * T ** 2 / s.shape[0]
    nckd = F.kl_div(F.log_softmax(s / T - 1000.0 * gt, 1), F.softmax(t / T - 1000.0 * gt, 1),
                    reduction="sum") * T ** 2 / s.shape[0]
    return alpha * tckd + beta * nckd


def naive_kl_div(s, t):
    return F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean")


def naive_mutual(s, t, T):
    """Two students, ce_weight 0: each gets `T^2 KL(p_peer || p_self)` with the peer detached."""
    return naive_kd(s, t.detach(), T) + naive_kd(t, s.detach(), T)


def flat(x):
    return x.reshape(x.shape[0], -1)


def naive_at(s, t, p, mode):
    """RepDistiller's `Attention.at_loss` ("code"); torchdistill's paper mode on maps pooled as RepDistiller does."""
    if mode == "code":
        return popular.at(s, t, p)
    return popular.at_paper(*popular.pool_to_smaller(s, t), p)


def naive_sp(s, t, norm):
    p = 2 if norm == "l2" else 1
    s, t = flat(s), flat(t)
    gs, gt = F.normalize(s @ s.t(), p=p, dim=1), F.normalize(t @ t.t(), p=p, dim=1)
    return ((gt - gs) ** 2).sum() / s.shape[0] ** 2


def naive_fsp(s0, s1, t0, t1):
    return popular.fsp([s0, s1], [t0, t1])


def naive_cc(s, t):
    return popular.correlation(flat(s), flat(t))


# ----------------------------------------------------------------------------------------------------------
# the cases: each makes its inputs `make(batch, size, seed)` (float64 values) and calls the loss on them

class Case:
    def __init__(self, name, make, fn, naive, min_batch=1, logits=False, naive_grads=None):
        self.name, self.make, self.fn, self.naive = name, make, fn, naive
        self.min_batch, self.logits = min_batch, logits
        self.naive_grads = naive_grads  # indices of the inputs whose naive gradients are comparable (None: all)

    def __repr__(self):
        return self.name


def logit_pair(b, n, seed=0):
    return randn(b, n, seed=seed, scale=3.0), randn(b, n, seed=seed + 1, scale=3.0)


def flat_pair(b, n, seed=0):
    return randn(b, n, seed=seed), randn(b, n + 3, seed=seed + 1)


def same_pair(b, n, seed=0):
    return randn(b, n, seed=seed), randn(b, n, seed=seed + 1)


def map_pair(b, n, seed=0):
    return randn(b, 3, 5, n, seed=seed), randn(b, 4, 5, n, seed=seed + 1)


def same_maps(b, n, seed=0):
    return randn(b, 3, 5, n, seed=seed), randn(b, 3, 5, n, seed=seed + 1)


def one_map(b, n, seed=0):
    return (randn(b, 3, 5, n, seed=seed),)


def fsp_maps(b, n, seed=0):
    return tuple(randn(b, c, 3, n, seed=seed + i) for i, c in enumerate((2, 3, 2, 3)))


def dkd_target(s):
    """A fixed target per row; for 11 classes rows 0..3 get 1, 4, 7, 10 (never the MASKED columns)."""
    return (3 * torch.arange(s.shape[0]) + 1) % s.shape[-1]


def logit_case(name, fn, naive, **kw):
    return Case(name, logit_pair, fn, naive, logits=True, **kw)


JSD_BETAS = (0.0, 0.3, 0.5, 1.0)

LOGIT_CASES = [
    logit_case("kd_loss", lambda s, t: K.kd_loss(s, t, 4.0), lambda s, t: naive_kd(s, t, 4.0)),
    logit_case("kl_div_loss[forward]", lambda s, t: K.kl_div_loss(s, t, 2.0, direction="forward"),
               lambda s, t: naive_kl(s, t, 2.0, "forward")),
    logit_case("kl_div_loss[reverse]", lambda s, t: K.kl_div_loss(s, t, 2.0, direction="reverse"),
               lambda s, t: naive_kl(s, t, 2.0, "reverse")),
    *[logit_case(f"jsd_loss[beta={b:g}]", lambda s, t, b=b: K.jsd_loss(s, t, beta=b, temperature=2.0),
                 lambda s, t, b=b: naive_jsd(s, t, b, 2.0)) for b in JSD_BETAS],
    logit_case("dkd_loss", lambda s, t: K.dkd_loss(s, t, dkd_target(s)),
               lambda s, t: naive_dkd(s, t, dkd_target(s)),
               # mdistiller's teacher side is NaN-differentiable (xlogy at its -1000 entry); it is detached there
               naive_grads=(0,)),
    logit_case("kl_div", lambda s, t: K.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), "batchmean"), naive_kl_div),
    logit_case("mutual_learning_loss", lambda s, t: K.mutual_learning_loss([s, t], ce_weight=0.0, temperature=2.0),
               lambda s, t: naive_mutual(s, t, 2.0)),
]

FEATURE_CASES = [
    Case("rkd_loss", map_pair, K.rkd_loss, popular.rkd, min_batch=2),
    Case("rkd_distance_loss", flat_pair, K.rkd_distance_loss, popular.rkd_distance, min_batch=2),
    Case("rkd_angle_loss", flat_pair, K.rkd_angle_loss, popular.rkd_angle, min_batch=2),
    *[Case(f"attention_map[p={p}]", one_map, lambda f, p=p: K.attention_map(f, p),
           lambda f, p=p: popular.attention_map(f, p)) for p in (1, 2, 3)],
    *[Case(f"at_loss[{mode},p={p}]", map_pair, lambda s, t, p=p, mode=mode: K.at_loss(s, t, p=p, mode=mode),
           lambda s, t, p=p, mode=mode: naive_at(s, t, p, mode)) for mode in ("code", "paper") for p in (1, 2, 3)],
    Case("sp_loss[l2]", map_pair, lambda s, t: K.sp_loss(s, t, norm="l2"), lambda s, t: naive_sp(s, t, "l2")),
    Case("sp_loss[l1]", flat_pair, lambda s, t: K.sp_loss(s, t, norm="l1"), lambda s, t: naive_sp(s, t, "l1")),
    Case("fsp_loss", fsp_maps, lambda s0, s1, t0, t1: K.fsp_loss([s0, s1], [t0, t1]), naive_fsp),
    Case("pkt_loss", flat_pair, K.pkt_loss, popular.pkt),
    Case("nst_loss", map_pair, K.nst_loss, popular.nst),
    Case("cc_loss", same_pair, K.cc_loss, naive_cc, min_batch=2),
    Case("hint_loss", same_maps, K.hint_loss, F.mse_loss),
]

ALL_CASES = LOGIT_CASES + FEATURE_CASES
CASES_BY_NAME = {c.name: c for c in ALL_CASES}

all_cases = pytest.mark.parametrize("case", ALL_CASES, ids=repr)
logit_cases = pytest.mark.parametrize("case", LOGIT_CASES, ids=repr)


def check_against_naive(case, values, rtol=1e-7, atol=1e-9):
    """fastkd and the naive formula on the same float64 values: same loss, same gradients."""
    got, got_grads = loss_and_grads(case.fn, leaves(values, F64))
    want, want_grads = loss_and_grads(case.naive, leaves(values, F64))
    assert got.dtype == F64
    torch.testing.assert_close(got, want.reshape(got.shape), rtol=rtol, atol=atol)
    keep = range(len(values)) if case.naive_grads is None else case.naive_grads
    assert_all_close([got_grads[i] for i in keep], [want_grads[i] for i in keep], rtol=rtol, atol=atol)
    return got, got_grads


# ----------------------------------------------------------------------------------------------------------
# sizes

@all_cases
def test_smallest_batch(case):
    """B = 1 (B = 2 for RKD and CC, which need pairs): finite, and equal to the formula."""
    loss, g = check_against_naive(case, case.make(case.min_batch, 7))
    assert all_finite([loss, *g])


ODD_SIZES = [(3, 7), (5, 13), (9, 1007)]


@pytest.mark.parametrize("b, n", ODD_SIZES + [pytest.param(4, 1, id="4-1-features-only")])
@all_cases
def test_odd_sizes(case, b, n):
    if case.logits and n == 1:
        pytest.skip("one class is test_one_class")
    check_against_naive(case, case.make(b, n, seed=b * n))


@pytest.mark.parametrize("rows", [1, 3])
@logit_cases
def test_one_class(case, rows):
    """C = 1: both distributions are [1], every divergence is 0, with zero (not NaN) gradients."""
    inputs = leaves(case.make(rows, 1))
    loss, g = loss_and_grads(case.fn, inputs)
    for grad in g:
        assert torch.equal(grad, torch.zeros_like(grad))
    assert loss.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@logit_cases
def test_identical_distributions_give_zero(case, dtype):
    """Student == teacher (self-distillation at initialisation): every divergence is exactly 0."""
    if case.name == "kl_div":
        pytest.skip("its input log_softmax(s) and target softmax(s) are not exactly consistent")
    s, _ = case.make(6, 50)
    s = s.to(dtype)
    assert case.fn(s, s.clone()).item() == 0.0


TOKEN_FNS = {
    "kd_loss": lambda s, t, **kw: K.kd_loss(s, t, 4.0, **kw),
    "kl_div_loss[forward]": lambda s, t, **kw: K.kl_div_loss(s, t, 2.0, direction="forward", **kw),
    "kl_div_loss[reverse]": lambda s, t, **kw: K.kl_div_loss(s, t, 2.0, direction="reverse", **kw),
    **{f"jsd_loss[beta={b:g}]": (lambda s, t, b=b, **kw: K.jsd_loss(s, t, beta=b, temperature=2.0, **kw))
       for b in JSD_BETAS},
}
MASKABLE = [name for name in TOKEN_FNS if name != "kd_loss"]
REDUCTIONS = ("batchmean", "sum", "mean", "none")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(TOKEN_FNS))
def test_leading_dims_are_rows(name, reduction):
    """Logits (2, 3, V) are 6 rows: the same loss and gradients as (6, V); "none" has shape (2, 3)."""
    fn = TOKEN_FNS[name]
    s, t = randn(2, 3, 17, seed=1, scale=3), randn(2, 3, 17, seed=2, scale=3)
    loss3, g3 = loss_and_grads(lambda a, b: fn(a, b, reduction=reduction), leaves([s, t]))
    loss2, g2 = loss_and_grads(lambda a, b: fn(a, b, reduction=reduction), leaves([rows2d(s), rows2d(t)]))
    assert loss3.shape == ((2, 3) if reduction == "none" else ())
    torch.testing.assert_close(loss3, loss2.reshape(loss3.shape))
    assert_all_close(g3, [g.reshape(2, 3, 17) for g in g2])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kd_loss_with_target_on_leading_dims(reduction):
    s, t = randn(2, 3, 17, seed=1, scale=3), randn(2, 3, 17, seed=2, scale=3)
    y = torch.randint(0, 17, (2, 3), generator=torch.Generator().manual_seed(0))
    kw = dict(ce_weight=0.1, kd_weight=0.9, reduction=reduction)
    loss3, g3 = loss_and_grads(lambda a, b: K.kd_loss(a, b, 4.0, target=y, **kw), leaves([s, t]))
    loss2, g2 = loss_and_grads(lambda a, b: K.kd_loss(a, b, 4.0, target=y.reshape(6), **kw),
                               leaves([rows2d(s), rows2d(t)]))
    assert loss3.shape == ((2, 3) if reduction == "none" else ())
    torch.testing.assert_close(loss3, loss2.reshape(loss3.shape))
    assert_all_close(g3, [g.reshape(2, 3, 17) for g in g2])
    if reduction == "batchmean":  # RepDistiller's mix: 0.1 * CE + 0.9 * DistillKL(4)
        want = 0.1 * F.cross_entropy(rows2d(s), y.reshape(6)) + 0.9 * naive_kd(s, t, 4.0)
        torch.testing.assert_close(loss3.double(), want, rtol=1e-5, atol=1e-6)


SPATIAL_CASES = [
    *[(f"at_loss[{mode},p={p}]", lambda s, t, p=p, mode=mode: K.at_loss(s, t, p=p, mode=mode),
       lambda s, t, p=p, mode=mode: naive_at(s, t, p, mode)) for mode in ("code", "paper") for p in (1, 2, 3)],
    ("nst_loss", K.nst_loss, popular.nst),
]


@pytest.mark.parametrize("student_larger", [True, False], ids=["student8x8", "teacher8x8"])
@pytest.mark.parametrize("name, fn, naive", SPATIAL_CASES, ids=[c[0] for c in SPATIAL_CASES])
def test_spatial_sizes_differ(name, fn, naive, student_larger):
    """Maps of different (square) sizes: the larger is pooled to the smaller, as RepDistiller does."""
    big, small = randn(3, 4, 8, 8, seed=1), randn(3, 6, 4, 4, seed=2)
    values = [big, small] if student_larger else [small, big]
    got, got_grads = loss_and_grads(fn, leaves(values, F64))
    want, want_grads = loss_and_grads(naive, leaves(values, F64))
    torch.testing.assert_close(got, want)
    assert_all_close(got_grads, want_grads)


def test_fsp_layers_of_different_sizes():
    values = [randn(3, 2, 8, 8, seed=1), randn(3, 5, 4, 4, seed=2), randn(3, 2, 8, 8, seed=3), randn(3, 5, 4, 4, seed=4)]
    check_against_naive(CASES_BY_NAME["fsp_loss"], values)


# ----------------------------------------------------------------------------------------------------------
# memory layout: a view and its contiguous copy give the same loss and gradients

def noncontiguous(x, kind):
    """A leaf holding x's values in another layout (NaN in the gaps), and the view of it that equals x."""
    if kind == "transposed":
        leaf, view = x.transpose(-1, -2).contiguous(), (lambda l: l.transpose(-1, -2))
    elif kind == "sliced":  # `logits[..., :-1]`: a padded last dim
        leaf, view = torch.cat([x, torch.full_like(x[..., :1], NAN)], -1), (lambda l: l[..., :-1])
    elif kind == "strided":  # every other row
        leaf, view = torch.stack([x, torch.full_like(x, NAN)], 1).flatten(0, 1), (lambda l: l[::2])
    elif kind == "channels_last" and x.dim() == 4:
        leaf, view = x.clone(), (lambda l: l.to(memory_format=torch.channels_last))
    elif kind == "channels_last_view" and x.dim() == 4:  # an NHWC tensor permuted to NCHW
        leaf, view = x.permute(0, 2, 3, 1).contiguous(), (lambda l: l.permute(0, 3, 1, 2))
    else:
        leaf, view = x.clone(), (lambda l: l)
    return leaf.requires_grad_(), view


LAYOUTS = ("transposed", "sliced", "strided", "channels_last", "channels_last_view")


@pytest.mark.parametrize("layout", LAYOUTS)
@all_cases
def test_noncontiguous_inputs(case, layout):
    values = [v.float() for v in case.make(max(case.min_batch, 3), 7)]
    made = [noncontiguous(v, layout) for v in values]
    lvs = [leaf for leaf, _ in made]
    views = [view(leaf) for leaf, view in made]
    if all(v.is_contiguous() for v in views):
        pytest.skip(f"{layout} does not apply to these inputs")
    for v, x in zip(views, values):
        assert torch.equal(v, x)
    got = case.fn(*views)
    got_grads = grads(got, lvs)
    want = case.fn(*[v.contiguous() for v in views])
    want_grads = grads(want, lvs)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
    assert_all_close(got_grads, want_grads, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(TOKEN_FNS) + ["mutual_learning_loss", "kl_div"])
def test_shifted_token_logits(name):
    """The language-model pattern: `logits[:, :-1]` of (B, S+1, V) against `labels[:, 1:]`."""
    s_full = randn(2, 6, 11, seed=1, scale=3).float().requires_grad_()
    t_full = randn(2, 6, 11, seed=2, scale=3).float().requires_grad_()
    labels = torch.tensor([[5, 1, 2, -100, 3, 4], [0, 7, -100, -100, 1, 9]])[:, 1:]
    if name in MASKABLE:
        def fn(s, t):
            return TOKEN_FNS[name](s, t, labels=labels)
    else:
        fn = TOKEN_FNS.get(name) or CASES_BY_NAME[name].fn
    s, t = s_full[:, :-1], t_full[:, :-1]
    assert not s.is_contiguous()
    got = fn(s, t)
    got_grads = grads(got, [s_full, t_full])
    want = fn(s.contiguous(), t.contiguous())
    want_grads = grads(want, [s_full, t_full])
    torch.testing.assert_close(got, want)
    assert_all_close(got_grads, want_grads)
    for g in got_grads:
        assert torch.equal(g[:, -1], torch.zeros_like(g[:, -1]))


def test_hint_loss_channels_last_with_regressor():
    torch.manual_seed(0)
    reg = ConvRegressor((2, 3, 6, 6), (2, 4, 4, 4)).double()
    f_s, f_t = randn(2, 3, 6, 6, seed=1).requires_grad_(), randn(2, 4, 4, 4, seed=2)
    got = K.hint_loss(f_s.to(memory_format=torch.channels_last), f_t.to(memory_format=torch.channels_last), reg)
    got_grads = grads(got, [f_s, *reg.parameters()])
    want = K.hint_loss(f_s, f_t, reg)
    want_grads = grads(want, [f_s, *reg.parameters()])
    torch.testing.assert_close(got, want)
    assert_all_close(got_grads, want_grads)


# ----------------------------------------------------------------------------------------------------------
# -inf logits (masked vocabulary) and probabilities that underflow to 0

MASKED = [2, 5, 8]  # of 11 classes
KEPT = [c for c in range(11) if c not in MASKED]


def call_logit_case(case, s, t, target=None):
    if case.name == "dkd_loss":
        return K.dkd_loss(s, t, dkd_target(s) if target is None else target)
    return case.fn(s, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@logit_cases
def test_masked_vocabulary(case, dtype):
    """The same columns -inf in student and teacher: the loss over the remaining columns, finite gradients,
    zero on the masked columns."""
    s, t = randn(4, 11, seed=1, scale=3), randn(4, 11, seed=2, scale=3)
    s[:, MASKED] = -INF
    t[:, MASKED] = -INF
    full = leaves([s, t], dtype)
    kept = leaves([s[:, KEPT], t[:, KEPT]], dtype)
    target = dkd_target(s)
    kept_target = torch.tensor([KEPT.index(int(c)) for c in target])
    loss, g = loss_and_grads(lambda a, b: call_logit_case(case, a, b, target), full)
    want, want_g = loss_and_grads(lambda a, b: call_logit_case(case, a, b, kept_target), kept)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, want)
    for grad, want_grad in zip(g, want_g):
        assert torch.isfinite(grad).all()
        assert torch.equal(grad[:, MASKED], torch.zeros_like(grad[:, MASKED]))
        torch.testing.assert_close(grad[:, KEPT], want_grad)


# Forward-KL-like losses diverge where the student puts no mass and the teacher does; reverse-KL-like ones
# where the teacher puts none and the student does. The JSD mixture with 0 < beta < 1 never diverges.
INF_WHEN_STUDENT_ZERO = {"kd_loss", "kl_div_loss[forward]", "jsd_loss[beta=0]", "dkd_loss", "kl_div",
                         "mutual_learning_loss"}
INF_WHEN_TEACHER_ZERO = {"kl_div_loss[reverse]", "jsd_loss[beta=1]", "mutual_learning_loss"}


@pytest.mark.parametrize("side", ["teacher", "student"])
@logit_cases
def test_neg_inf_on_one_side(case, side):
    """-inf on one side only: +inf where the divergence is infinite (never a silent finite number),
    otherwise finite, equal to the formula, with finite gradients."""
    s, t = randn(4, 11, seed=1, scale=3), randn(4, 11, seed=2, scale=3)
    (t if side == "teacher" else s)[:, MASKED] = -INF
    inputs = leaves([s, t])
    loss = call_logit_case(case, *inputs)
    diverges = case.name in (INF_WHEN_TEACHER_ZERO if side == "teacher" else INF_WHEN_STUDENT_ZERO)
    if diverges:
        assert loss.item() == INF
        return
    assert torch.isfinite(loss)
    assert all_finite(grads(loss, inputs))
    want = case.naive(s, t)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("both", [False, True], ids=["teacher-underflows", "both-underflow"])
@logit_cases
def test_probability_underflows_to_zero(case, both):
    """A teacher logit 1e4 below the rest: its probability is exactly 0 and contributes 0, no NaN."""
    s, t = randn(4, 11, seed=1, scale=3), randn(4, 11, seed=2, scale=3)
    t[:, MASKED] = t[:, MASKED] - 1e4
    if both:
        s[:, MASKED] = s[:, MASKED] - 1e4
    assert (F.softmax(t.float() / 4, -1)[:, MASKED] == 0).all()
    inputs = leaves([s, t])
    loss, g = loss_and_grads(case.fn, inputs)
    assert all_finite([loss, *g])
    torch.testing.assert_close(loss.double(), case.naive(s, t), rtol=1e-5, atol=1e-6)


def test_dkd_target_class_underflows_in_both():
    """Target probability 0 on both sides (mdistiller: log(0) then NaN): TCKD is 0 and DKD is beta * the KD
    over the other classes."""
    s, t = randn(4, 11, seed=1, scale=3), randn(4, 11, seed=2, scale=3)
    y = dkd_target(s)
    rows = torch.arange(4)
    s[rows, y] -= 1e4
    t[rows, y] -= 1e4
    rest = torch.ones(4, 11, dtype=torch.bool)
    rest[rows, y] = False
    inputs = leaves([s, t])
    loss, g = loss_and_grads(lambda a, b: K.dkd_loss(a, b, y), inputs)
    assert all_finite([loss, *g])
    want = 8.0 * naive_kd(s[rest].reshape(4, 10), t[rest].reshape(4, 10), 4.0)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


def test_dkd_student_target_class_underflows():
    """Student target probability 0, teacher's not: mdistiller's log(0) gives inf; here it is finite
    because the binary split is computed in log space."""
    s, t = randn(4, 11, seed=1, scale=3), randn(4, 11, seed=2, scale=3)
    y = dkd_target(s)
    s[torch.arange(4), y] -= 1e4
    inputs = leaves([s, t])
    loss, g = loss_and_grads(lambda a, b: K.dkd_loss(a, b, y), inputs)
    assert all_finite([loss, *g])
    assert loss.item() > 0


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kl_div_zero_target_against_neg_inf_input(reduction, log_target):
    """Where torch's F.kl_div is NaN (target 0 against input -inf), fastkd's kl_div gives 0."""
    s, t = randn(4, 11, seed=1, scale=3), randn(4, 11, seed=2, scale=3)
    s[:, MASKED] = -INF
    t[:, MASKED] = -INF
    inp = F.log_softmax(s, -1).float().requires_grad_()
    tgt = (F.log_softmax(t, -1) if log_target else F.softmax(t, -1)).float()
    assert torch.isnan(F.kl_div(inp, tgt, reduction="sum", log_target=log_target))  # the trap
    loss = K.kl_div(inp, tgt, reduction, log_target)
    g, = grads(loss, [inp])
    assert all_finite([loss, g])
    assert torch.equal(g[:, MASKED], torch.zeros_like(g[:, MASKED]))
    pointwise = F.kl_div(inp[:, KEPT], tgt[:, KEPT], reduction="none", log_target=log_target)
    if reduction == "none":
        assert torch.equal(loss[:, MASKED], torch.zeros_like(loss[:, MASKED]))
        torch.testing.assert_close(loss[:, KEPT], pointwise)
    else:
        total = pointwise.sum()
        want = {"sum": total, "batchmean": total / 4, "mean": total / 44}[reduction]
        torch.testing.assert_close(loss, want)


# ----------------------------------------------------------------------------------------------------------
# NaN and Inf inputs never give a finite loss

def nonfinite_params():
    for case in ALL_CASES:
        n_inputs = len(case.make(case.min_batch, 2))
        bads = ("nan", "+inf") if case.logits else ("nan", "+inf", "-inf")  # -inf is a valid logit
        for i in range(n_inputs):
            for bad in bads:
                for pos in ("first", "last"):
                    yield pytest.param(case, i, bad, pos, id=f"{case.name}-input{i}-{bad}-{pos}")


@pytest.mark.parametrize("case, index, bad, position", list(nonfinite_params()))
def test_nonfinite_input_gives_nonfinite_loss(case, index, bad, position):
    values = [v.float() for v in case.make(max(case.min_batch, 3), 7)]
    values[index].view(-1)[0 if position == "first" else -1] = float(bad)
    loss = case.fn(*values)
    assert not torch.isfinite(loss).all(), f"finite loss {loss} from a {bad} input"


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("bad", [NAN, INF], ids=["nan", "+inf"])
def test_kl_div_nonfinite_input_where_target_is_zero(bad, log_target):
    inp = torch.tensor([[bad, -0.1]])
    tgt = torch.tensor([[-INF, 0.0]]) if log_target else torch.tensor([[0.0, 1.0]])
    assert torch.isnan(F.kl_div(inp, tgt, reduction="sum", log_target=log_target))  # torch: NaN
    assert not torch.isfinite(K.kl_div(inp, tgt, "sum", log_target))


# ----------------------------------------------------------------------------------------------------------
# masked tokens (labels == ignore_index)

def token_inputs(dtype=torch.float32):
    return leaves([randn(2, 3, 13, seed=1, scale=3), randn(2, 3, 13, seed=2, scale=3)], dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", MASKABLE)
def test_all_tokens_ignored(name, reduction):
    """Every label -100: the loss is exactly 0 (zeros for "none") with a zero gradient, not NaN."""
    inputs = token_inputs()
    labels = torch.full((2, 3), -100)
    loss, g = loss_and_grads(lambda s, t: TOKEN_FNS[name](s, t, labels=labels, reduction=reduction), inputs)
    assert torch.equal(loss, torch.zeros((2, 3) if reduction == "none" else ()))
    for grad in g:
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("ignore_index", [-100, 7])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", MASKABLE)
def test_partially_masked_tokens(name, reduction, ignore_index):
    """The loss over the kept tokens only: batchmean divides by their count, mean by count * V, "none" has
    zeros at the masked tokens; the masked tokens get a zero gradient."""
    fn = TOKEN_FNS[name]
    s, t = token_inputs()
    labels = torch.tensor([[1, ignore_index, 4], [ignore_index, ignore_index, 0]])
    keep = labels != ignore_index
    loss, (gs, gt) = loss_and_grads(lambda a, b: fn(a, b, labels=labels, ignore_index=ignore_index,
                                                    reduction=reduction), [s, t])
    kept = leaves([s[keep], t[keep]])
    want, (ws, wt) = loss_and_grads(lambda a, b: fn(a, b, reduction=reduction), kept)
    if reduction == "none":
        assert loss.shape == (2, 3)
        assert torch.equal(loss[~keep], torch.zeros(3))
        torch.testing.assert_close(loss[keep], want)
    else:
        torch.testing.assert_close(loss, want)
    for g, w in ((gs, ws), (gt, wt)):
        assert torch.equal(g[~keep], torch.zeros_like(g[~keep]))
        torch.testing.assert_close(g[keep], w)


@pytest.mark.parametrize("name", MASKABLE)
def test_int32_labels_mask_the_same(name):
    fn = TOKEN_FNS[name]
    labels = torch.tensor([[1, -100, 4], [-100, 2, 0]])
    a = fn(*token_inputs(), labels=labels)
    b = fn(*token_inputs(), labels=labels.int())
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------
# dtypes

@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16"])
@all_cases
def test_low_precision_inputs(case, dtype):
    """bf16/fp16 inputs: a float32 loss, gradients in the input dtype, all finite."""
    inputs = leaves(case.make(max(case.min_batch, 3), 7), dtype)
    loss, g = loss_and_grads(case.fn, inputs)
    assert loss.dtype == torch.float32
    assert all(grad.dtype == dtype for grad in g)
    assert all_finite([loss, *g])


@all_cases
def test_float64_inputs(case):
    inputs = leaves(case.make(max(case.min_batch, 3), 7), F64)
    loss, g = loss_and_grads(case.fn, inputs)
    assert loss.dtype == F64
    assert all(grad.dtype == F64 for grad in g)


@all_cases
def test_float32_inputs(case):
    inputs = leaves(case.make(max(case.min_batch, 3), 7))
    loss, g = loss_and_grads(case.fn, inputs)
    assert loss.dtype == torch.float32
    assert all(grad.dtype == torch.float32 for grad in g)


# The bf16 budget: fastkd on bf16 inputs may be at most ~2x as far from the float64 reference (on the same,
# upcast values) as plain PyTorch computing the loss in bf16 end to end (the naive formulas above, run on
# bf16 tensors).
BUDGET = {
    "kd_loss": ((16, 1007), lambda s, t: R.kd_loss(s, t, 4.0)),
    "kl_div_loss[forward]": ((16, 1007), lambda s, t: R.kl_div_loss(s, t, 2.0, direction="forward")),
    "kl_div_loss[reverse]": ((16, 1007), lambda s, t: R.kl_div_loss(s, t, 2.0, direction="reverse")),
    **{f"jsd_loss[beta={b:g}]": ((16, 1007), lambda s, t, b=b: R.jsd_loss(s, t, beta=b, temperature=2.0))
       for b in JSD_BETAS},
    "dkd_loss": ((16, 1007), lambda s, t: R.dkd_loss(s, t, dkd_target(s))),
    "at_loss[code,p=2]": ((8, 7), lambda s, t: R.at_loss(s, t, p=2, mode="code")),
    "at_loss[paper,p=2]": ((8, 7), lambda s, t: R.at_loss(s, t, p=2, mode="paper")),
    "rkd_loss": ((16, 7), R.rkd_loss),
    "sp_loss[l2]": ((16, 7), lambda s, t: R.sp_loss(s, t, norm="l2")),
    "cc_loss": ((16, 128), R.cc_loss),
    "nst_loss": ((8, 7), R.nst_loss),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(BUDGET))
def test_bf16_error_within_twice_plain_pytorch_bf16(name, seed):
    case = CASES_BY_NAME[name]
    (b, n), ref = BUDGET[name]
    x = [v.to(torch.bfloat16) for v in case.make(b, n, seed=10 * seed)]
    exact = ref(*[v.double() for v in x]).double()
    fast = case.fn(*x).double()
    plain = case.naive(*x)
    assert plain.dtype == torch.bfloat16  # plain PyTorch really ran in bf16
    err_fast = (fast - exact).abs().item()
    err_plain = (plain.double() - exact).abs().item()
    slack = 1e-6 * abs(exact.item()) + 1e-9
    assert err_fast <= 2.0 * err_plain + slack, (err_fast, err_plain, exact.item())


# ----------------------------------------------------------------------------------------------------------
# determinism

@all_cases
def test_deterministic(case):
    values = case.make(max(case.min_batch, 5), 33)
    loss1, g1 = loss_and_grads(case.fn, leaves(values))
    loss2, g2 = loss_and_grads(case.fn, leaves(values))
    assert torch.equal(loss1, loss2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
