"""`fastkd.losses` modules: each gives the value and gradients of its `fastkd.functional` call with the
same options; `KLDivLoss` is a drop-in for `torch.nn.KLDivLoss`; the modules behave as modules."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastkd import functional as KF
from fastkd import losses as L

DT = torch.float64
TOL = dict(rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------------
# helpers and reference formulas
# --------------------------------------------------------------------------------------------------

def rand(*shape, seed, scale=1.0, grad=True, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=DT)).to(dtype).requires_grad_(grad)


def rand_list(shapes, seed):
    return [rand(*s, seed=seed + i) for i, s in enumerate(shapes)]


def targets(rows_shape, classes, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, rows_shape, generator=g)


def assert_same(got, want, inputs, tol=TOL):
    """Same value and same gradients w.r.t. `inputs` (a loss's every element weighted differently,
    so an unreduced loss is checked element by element)."""
    assert got.shape == want.shape
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, **tol)
    w = torch.linspace(0.5, 1.5, got.numel(), dtype=got.dtype).reshape(got.shape)
    g_got = torch.autograd.grad((got * w).sum(), inputs, allow_unused=True)
    g_want = torch.autograd.grad((want * w).sum(), inputs, allow_unused=True)
    for i, (a, b) in enumerate(zip(g_got, g_want)):
        if b is None:
            assert a is None, f"input {i}: unexpected gradient"
        else:
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"input {i}: {m}")


def mutual_learning_formula(logits, target, T, ce_weight, kl_weight):
    """sum_k ce_weight*CE_k + kl_weight/(K-1) * sum_{l != k} T^2 * KL(p_l.detach() || p_k), KL per row averaged."""
    K = len(logits)
    loss = 0.0
    for k, z_k in enumerate(logits):
        if ce_weight != 0.0:
            loss = loss + ce_weight * F.cross_entropy(z_k, target)
        for l, z_l in enumerate(logits):
            if l != k:
                kl = F.kl_div(F.log_softmax(z_k / T, -1), F.softmax(z_l.detach() / T, -1), reduction="batchmean")
                loss = loss + kl_weight / (K - 1) * T * T * kl
    return loss


def torch_kl_div_module(**kwargs):
    """torch's own `nn.KLDivLoss`, its legacy-argument deprecation warning silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nn.KLDivLoss(**kwargs)


def call_quietly(module, *args):
    # torch warns that reduction="mean" is not the KL's mean; the value is what is compared.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module(*args)


# --------------------------------------------------------------------------------------------------
# logit losses vs functional
# --------------------------------------------------------------------------------------------------

REDUCTIONS = ["batchmean", "sum", "mean", "none"]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ce_weight, kd_weight, with_target", [
    (0.0, 1.0, False), (0.0, 1.0, True), (0.1, 0.9, True), (1.0, 0.0, True), (-0.5, 2.0, True)])
@pytest.mark.parametrize("shape", [(7, 13), (3, 5, 11)])
def test_kd_loss_module(reduction, ce_weight, kd_weight, with_target, shape):
    z_s, z_t = rand(*shape, seed=1, scale=3.0), rand(*shape, seed=2, scale=3.0)
    target = targets(shape[:-1], shape[-1], seed=3) if with_target else None
    mod = L.KDLoss(2.5, reduction=reduction, ce_weight=ce_weight, kd_weight=kd_weight)
    got = mod(z_s, z_t, target)
    want = KF.kd_loss(z_s, z_t, 2.5, reduction=reduction, target=target, ce_weight=ce_weight, kd_weight=kd_weight)
    assert_same(got, want, [z_s, z_t])


def test_kd_loss_module_defaults():
    z_s, z_t = rand(7, 13, seed=4), rand(7, 13, seed=5)
    assert_same(L.KDLoss()(z_s, z_t), KF.kd_loss(z_s, z_t), [z_s, z_t])
    # The default KDLoss is RepDistiller's DistillKL(4).
    want = F.kl_div(F.log_softmax(z_s / 4, 1), F.softmax(z_t / 4, 1), reduction="sum") * 16 / 7
    torch.testing.assert_close(L.KDLoss()(z_s, z_t), want, rtol=1e-10, atol=1e-12)


def test_kd_loss_module_ce_without_target_raises():
    z_s, z_t = rand(7, 13, seed=4), rand(7, 13, seed=5)
    with pytest.raises(ValueError, match="target"):
        L.KDLoss(ce_weight=0.1)(z_s, z_t)


def token_logits(seed, with_labels, masked, ignore_index):
    """Student and teacher logits (3, 5, 17) and, `with_labels`, labels whose positions `masked` are
    `ignore_index` (else None)."""
    z_s, z_t = rand(3, 5, 17, seed=seed, scale=2.0), rand(3, 5, 17, seed=seed + 1, scale=2.0)
    labels = None
    if with_labels:
        labels = targets((3, 5), 17, seed=seed + 2)
        labels[tuple(zip(*masked))] = ignore_index
    return z_s, z_t, labels


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_labels", [False, True])
def test_kl_distillation_loss_module(direction, reduction, with_labels):
    z_s, z_t, labels = token_logits(10, with_labels, [(0, 1), (2, 4), (1, 0)], -7)
    mod = L.KLDistillationLoss(1.7, direction=direction, ignore_index=-7, reduction=reduction)
    got = mod(z_s, z_t, labels)
    want = KF.kl_div_loss(z_s, z_t, 1.7, direction=direction, labels=labels, ignore_index=-7, reduction=reduction)
    assert_same(got, want, [z_s, z_t])


def test_kl_distillation_loss_module_defaults():
    z_s, z_t = rand(6, 17, seed=13), rand(6, 17, seed=14)
    labels = targets((6,), 17, seed=15)
    labels[2] = -100
    assert_same(L.KLDistillationLoss()(z_s, z_t, labels), KF.kl_div_loss(z_s, z_t, labels=labels), [z_s, z_t])


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_labels", [False, True])
def test_jsd_loss_module(beta, reduction, with_labels):
    z_s, z_t, labels = token_logits(20, with_labels, [(1, 2), (2, 0)], -100)
    got = L.JSDLoss(beta, 2.0, reduction=reduction)(z_s, z_t, labels)
    want = KF.jsd_loss(z_s, z_t, beta=beta, temperature=2.0, labels=labels, reduction=reduction)
    assert_same(got, want, [z_s, z_t])


def test_jsd_loss_module_ignore_index():
    z_s, z_t = rand(9, 17, seed=23), rand(9, 17, seed=24)
    labels = targets((9,), 17, seed=25)
    labels[[0, 5]] = 3000
    got = L.JSDLoss(0.7, ignore_index=3000)(z_s, z_t, labels)
    want = KF.jsd_loss(z_s, z_t, beta=0.7, labels=labels, ignore_index=3000)
    assert_same(got, want, [z_s, z_t])


@pytest.mark.parametrize("alpha, beta, T", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (0.0, 1.0, 3.0)])
@pytest.mark.parametrize("warmup, epoch", [
    (0, None), (0, 7), (20, None), (20, 0), (20, 5), (20, 20), (20, 33), (3, 1.5)])
def test_dkd_loss_module(alpha, beta, T, warmup, epoch):
    z_s, z_t = rand(7, 13, seed=30, scale=3.0), rand(7, 13, seed=31, scale=3.0)
    target = targets((7,), 13, seed=32)
    got = L.DKDLoss(alpha, beta, T, warmup=warmup)(z_s, z_t, target, epoch=epoch)
    scale = min(epoch / warmup, 1.0) if warmup > 0 and epoch is not None else 1.0
    want = scale * KF.dkd_loss(z_s, z_t, target, alpha=alpha, beta=beta, temperature=T)
    assert_same(got, want, [z_s, z_t])


def test_dkd_loss_module_defaults_are_mdistillers():
    z_s, z_t = rand(7, 13, seed=33), rand(7, 13, seed=34)
    target = targets((7,), 13, seed=35)
    assert_same(L.DKDLoss()(z_s, z_t, target), KF.dkd_loss(z_s, z_t, target, alpha=1.0, beta=8.0, temperature=4.0),
                [z_s, z_t])


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("T, ce_weight, kl_weight", [(1.0, 1.0, 1.0), (3.0, 0.5, 2.0), (2.0, 0.0, 1.0)])
def test_mutual_learning_module(K, T, ce_weight, kl_weight):
    logits = [rand(7, 13, seed=40 + k, scale=2.0) for k in range(K)]
    target = targets((7,), 13, seed=49)
    mod = L.MutualLearningLoss(T, ce_weight=ce_weight, kl_weight=kl_weight)
    got = mod(logits, target)
    want_fn = KF.mutual_learning_loss(logits, target, temperature=T, ce_weight=ce_weight, kl_weight=kl_weight)
    assert_same(got, want_fn, logits)
    formula = mutual_learning_formula(logits, target, T, ce_weight, kl_weight)
    assert_same(mod(logits, target), formula, logits, tol=dict(rtol=1e-10, atol=1e-12))
    # One backward trains every student.
    for k, g in enumerate(torch.autograd.grad(mod(logits, target), logits)):
        assert torch.count_nonzero(g) > 0, f"student {k} got no gradient"


def test_mutual_learning_module_without_target():
    logits = [rand(7, 13, seed=50 + k) for k in range(3)]
    got = L.MutualLearningLoss(2.0, ce_weight=0.0)(tuple(logits))
    assert_same(got, mutual_learning_formula(logits, None, 2.0, 0.0, 1.0), logits,
                tol=dict(rtol=1e-10, atol=1e-12))
    with pytest.raises(ValueError, match="target"):
        L.MutualLearningLoss()(logits)  # ce_weight=1 by default needs the labels


# --------------------------------------------------------------------------------------------------
# feature losses vs functional
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{}, dict(distance_weight=1.0, angle_weight=0.0),
                                    dict(distance_weight=0.0, angle_weight=2.0),
                                    dict(distance_weight=3.0, angle_weight=0.5, squared=True),
                                    dict(eps=1e-6)])
def test_rkd_loss_module(kwargs):
    f_s, f_t = rand(7, 13, seed=60), rand(7, 3, 2, 3, seed=61)
    assert_same(L.RKDLoss(**kwargs)(f_s, f_t), KF.rkd_loss(f_s, f_t, **kwargs), [f_s, f_t])


MAPS_S = [(5, 3, 9, 9), (5, 6, 5, 5), (5, 7, 3, 3)]
MAPS_T = [(5, 6, 5, 5), (5, 10, 9, 9), (5, 7, 3, 3)]
FEATS_S = [(7, 13), (7, 3, 5, 5), (7, 4, 3, 3)]
FEATS_T = [(7, 17), (7, 6, 9, 9), (7, 4, 3, 3)]


PAIRWISE = [
    (L.AttentionTransferLoss, {}, KF.at_loss, MAPS_S, MAPS_T),
    (L.AttentionTransferLoss, dict(p=3), KF.at_loss, MAPS_S, MAPS_T),
    (L.AttentionTransferLoss, dict(p=2, mode="paper"), KF.at_loss, MAPS_S, MAPS_T),
    (L.SimilarityLoss, {}, KF.sp_loss, FEATS_S, FEATS_T),
    (L.SimilarityLoss, dict(norm="l1"), KF.sp_loss, FEATS_S, FEATS_T),
    (L.NSTLoss, {}, KF.nst_loss, MAPS_S, MAPS_T),
]
PAIRWISE_IDS = ["at", "at-p3", "at-paper", "sp", "sp-l1", "nst"]


@pytest.mark.parametrize("cls, kwargs, fn, shapes_s, shapes_t", PAIRWISE, ids=PAIRWISE_IDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_pairwise_module_lists(cls, kwargs, fn, shapes_s, shapes_t, reduction):
    g_s, g_t = rand_list(shapes_s, seed=70), rand_list(shapes_t, seed=80)
    got = cls(**kwargs, reduction=reduction)(g_s, g_t)
    per_pair = [fn(s, t, **kwargs) for s, t in zip(g_s, g_t)]
    want = torch.stack(per_pair) if reduction == "none" else sum(per_pair)
    assert got.shape == ((len(g_s),) if reduction == "none" else ())
    assert_same(got, want, g_s + g_t)


@pytest.mark.parametrize("cls, kwargs, fn, shapes_s, shapes_t", PAIRWISE, ids=PAIRWISE_IDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_pairwise_module_single_tensors(cls, kwargs, fn, shapes_s, shapes_t, reduction):
    f_s, f_t = rand(*shapes_s[1], seed=90), rand(*shapes_t[1], seed=91)
    got = cls(**kwargs, reduction=reduction)(f_s, f_t)
    want = fn(f_s, f_t, **kwargs)
    if reduction == "none":
        want = want.reshape(1)
    assert_same(got, want, [f_s, f_t])
    # A one-element list and a bare tensor pair are the same call.
    torch.testing.assert_close(cls(**kwargs, reduction=reduction)([f_s], (f_t,)), want, **TOL)


@pytest.mark.parametrize("cls", [L.AttentionTransferLoss, L.SimilarityLoss, L.NSTLoss])
def test_pairwise_module_rejects_bad_reduction_and_lengths(cls):
    with pytest.raises(ValueError):
        cls(reduction="mean")
    g_s, g_t = rand_list(MAPS_S, seed=92), rand_list(MAPS_S[:2], seed=93)
    with pytest.raises(ValueError):
        cls()(g_s, g_t)


def test_fsp_loss_module():
    shapes_s = [(5, 3, 9, 9), (5, 6, 5, 5), (5, 4, 7, 7)]
    shapes_t = [(5, 3, 11, 11), (5, 6, 11, 11), (5, 4, 3, 3)]
    g_s, g_t = rand_list(shapes_s, seed=100), rand_list(shapes_t, seed=110)
    got = L.FSPLoss()(g_s, g_t)
    assert got.shape == ()
    assert_same(got, KF.fsp_loss(g_s, g_t), g_s + g_t)


@pytest.mark.parametrize("eps", [1e-7, 1e-3])
def test_pkt_loss_module(eps):
    f_s, f_t = rand(7, 13, seed=120), rand(7, 2, 3, 3, seed=121)
    kwargs = {} if eps == 1e-7 else dict(eps=eps)
    assert_same(L.PKTLoss(**kwargs)(f_s, f_t), KF.pkt_loss(f_s, f_t, eps=eps), [f_s, f_t])


def test_cc_loss_module():
    f_s, f_t = rand(7, 13, seed=130), rand(7, 13, seed=131)
    assert_same(L.CCLoss()(f_s, f_t), KF.cc_loss(f_s, f_t), [f_s, f_t])


def test_hint_loss_module_without_regressor():
    f_s, f_t = rand(5, 6, 7, 7, seed=140), rand(5, 6, 7, 7, seed=141)
    mod = L.HintLoss()
    assert list(mod.parameters()) == []
    assert_same(mod(f_s, f_t), KF.hint_loss(f_s, f_t), [f_s, f_t])


@pytest.mark.parametrize("s_shape, t_shape", [
    ((5, 3, 10, 10), (5, 6, 5, 5)), ((5, 3, 5, 5), (5, 6, 10, 10)), ((5, 3, 9, 9), (5, 6, 5, 5))])
def test_hint_loss_module_with_regressor(s_shape, t_shape):
    torch.manual_seed(0)
    reg = L.ConvRegressor(s_shape, t_shape).to(DT)
    mod = L.HintLoss(reg)
    # The regressor is a submodule: an optimizer over mod.parameters() trains it.
    assert {id(p) for p in mod.parameters()} == {id(p) for p in reg.parameters()}
    assert len(list(mod.parameters())) == 4
    f_s, f_t = rand(*s_shape, seed=150), rand(*t_shape, seed=151)
    params = list(reg.parameters())
    assert_same(mod(f_s, f_t), KF.hint_loss(f_s, f_t, reg), [f_s, f_t] + params)
    for name, g in zip([n for n, _ in reg.named_parameters()],
                       torch.autograd.grad(mod(f_s, f_t), params)):
        assert torch.count_nonzero(g) > 0, f"regressor parameter {name} got no gradient"


# --------------------------------------------------------------------------------------------------
# KLDivLoss: a drop-in for torch.nn.KLDivLoss
# --------------------------------------------------------------------------------------------------

KL_SHAPES = [(7, 13), (3, 4, 5), (11,)]


def kl_inputs(shape, log_target, seed, dtype=DT):
    x = torch.log_softmax(rand(*shape, seed=seed, grad=False, dtype=dtype), -1).requires_grad_()
    t = torch.softmax(rand(*shape, seed=seed + 1, grad=False, dtype=dtype), -1)
    t = (t.log() if log_target else t).requires_grad_()
    return x, t


@pytest.mark.parametrize("reduction", ["none", "mean", "batchmean", "sum"])
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("shape", KL_SHAPES)
def test_kl_div_module_matches_torch(reduction, log_target, shape):
    x, t = kl_inputs(shape, log_target, seed=160)
    got = L.KLDivLoss(reduction=reduction, log_target=log_target)(x, t)
    want = call_quietly(nn.KLDivLoss(reduction=reduction, log_target=log_target), x, t)
    assert_same(got, want, [x, t])


@pytest.mark.parametrize("reduction", ["none", "mean", "batchmean", "sum"])
def test_kl_div_module_matches_torch_float32(reduction):
    x, t = kl_inputs((7, 13), False, seed=161, dtype=torch.float32)
    got = L.KLDivLoss(reduction=reduction)(x, t)
    want = call_quietly(nn.KLDivLoss(reduction=reduction), x, t)
    assert_same(got, want, [x, t], tol=dict(rtol=1e-5, atol=1e-6))  # float32 rounding


def test_kl_div_module_default_is_mean():
    x, t = kl_inputs((7, 13), False, seed=162)
    assert L.KLDivLoss().reduction == "mean"
    assert_same(L.KLDivLoss()(x, t), call_quietly(nn.KLDivLoss(), x, t), [x, t])


@pytest.mark.parametrize("size_average", [None, True, False])
@pytest.mark.parametrize("reduce", [None, True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_module_legacy_arguments(size_average, reduce, reduction, log_target):
    kwargs = dict(size_average=size_average, reduce=reduce, reduction=reduction, log_target=log_target)
    theirs = torch_kl_div_module(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = L.KLDivLoss(**kwargs)
    assert ours.reduction == theirs.reduction
    x, t = kl_inputs((3, 4, 5), log_target, seed=170)
    assert_same(ours(x, t), call_quietly(theirs, x, t), [x, t])


def test_kl_div_module_positional_arguments_as_torch():
    # torch's signature: KLDivLoss(size_average=None, reduce=None, reduction='mean', log_target=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = L.KLDivLoss(None, None, "sum", True), nn.KLDivLoss(None, None, "sum", True)
    assert (ours.reduction, ours.log_target) == (theirs.reduction, theirs.log_target)


@pytest.mark.parametrize("reduction", ["none", "batchmean", "sum"])
def test_kl_div_module_broadcasts_as_torch(reduction):
    x, _ = kl_inputs((7, 13), False, seed=163)
    _, t = kl_inputs((1, 13), False, seed=164)
    want = nn.KLDivLoss(reduction=reduction)(x, t)
    got = L.KLDivLoss(reduction=reduction)(x, t)
    assert_same(got, want, [x, t])


@pytest.mark.parametrize("reduction", ["none", "mean", "batchmean", "sum"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_module_zero_target_against_neg_inf(reduction, log_target):
    # A masked class: target probability exactly 0 and input log-probability -inf. torch gives NaN.
    logits = rand(7, 13, seed=180, grad=False)
    logits[:, [2, 9]] = float("-inf")
    x = torch.log_softmax(logits, -1).requires_grad_()
    t = torch.softmax(rand(7, 13, seed=181, grad=False).masked_fill(logits == float("-inf"), float("-inf")), -1)
    t = (t.log() if log_target else t).requires_grad_()

    theirs = call_quietly(nn.KLDivLoss(reduction=reduction, log_target=log_target), x, t)
    assert torch.isnan(theirs).any()  # the trap fastkd avoids

    ours = L.KLDivLoss(reduction=reduction, log_target=log_target)(x, t)
    assert torch.isfinite(ours).all()
    # The value is torch's on the unmasked classes only.
    keep = (slice(None), [c for c in range(13) if c not in (2, 9)])
    want = F.kl_div(x[keep], t[keep], reduction="none", log_target=log_target)
    if reduction == "none":
        assert (ours[:, [2, 9]] == 0).all()
        torch.testing.assert_close(ours[keep], want, **TOL)
    else:
        want = {"sum": want.sum(), "batchmean": want.sum() / 7, "mean": want.sum() / (7 * 13)}[reduction]
        torch.testing.assert_close(ours, want, **TOL)
    g_x, g_t = torch.autograd.grad(ours.sum(), [x, t])
    assert torch.isfinite(g_x).all() and torch.isfinite(g_t).all()
    assert (g_x[:, [2, 9]] == 0).all() and (g_t[:, [2, 9]] == 0).all()


def test_kl_div_module_zero_target_finite_input():
    # Target 0 against a finite input: torch's value is finite (compared), its target gradient NaN
    # (xlogy's derivative at 0); fastkd's input gradient is torch's and its target gradient 0.
    x, t = kl_inputs((7, 13), False, seed=190)
    t = t.detach().clone()
    t[1, 4] = t[5, 0] = 0.0
    t.requires_grad_()
    ours, theirs = L.KLDivLoss(reduction="sum")(x, t), nn.KLDivLoss(reduction="sum")(x, t)
    torch.testing.assert_close(ours, theirs, **TOL)
    (g_x,) = torch.autograd.grad(ours, [x], retain_graph=True)
    (g_x_theirs,) = torch.autograd.grad(theirs, [x], retain_graph=True)
    torch.testing.assert_close(g_x, g_x_theirs, **TOL)
    (g_t,) = torch.autograd.grad(ours, [t])
    assert torch.isfinite(g_t).all() and g_t[1, 4] == 0 and g_t[5, 0] == 0


# --------------------------------------------------------------------------------------------------
# they behave as modules
# --------------------------------------------------------------------------------------------------

def all_modules():
    return [
        L.KDLoss(2.0, ce_weight=0.1, kd_weight=0.9), L.KLDivLoss(reduction="batchmean"),
        L.KLDistillationLoss(direction="reverse"), L.JSDLoss(0.3), L.DKDLoss(warmup=5), L.SparseKDLoss("bucket"),
        L.MutualLearningLoss(),
        L.RKDLoss(), L.AttentionTransferLoss(), L.SimilarityLoss(), L.FSPLoss(), L.PKTLoss(), L.NSTLoss(),
        L.CCLoss(), L.HintLoss(), L.HintLoss(L.ConvRegressor((5, 3, 9, 9), (5, 6, 5, 5))),
        L.ConvRegressor((5, 3, 9, 9), (5, 6, 5, 5)),
    ]


@pytest.mark.parametrize("mod", all_modules(), ids=lambda m: type(m).__name__)
def test_modules_are_modules(mod):
    assert isinstance(mod, nn.Module)
    text = repr(mod)
    assert type(mod).__name__ in text
    assert mod.to(torch.float64) is mod
    mod.train()
    mod.eval()
    assert mod.training is False
    assert isinstance(mod.state_dict(), dict)


def test_loss_modules_have_no_parameters():
    for mod in all_modules():
        has_params = isinstance(mod, L.ConvRegressor) or getattr(mod, "regressor", None) is not None
        assert (len(list(mod.parameters())) > 0) == has_params, type(mod).__name__


def test_kd_loss_repr_shows_options():
    text = repr(L.KDLoss(2.0, ce_weight=0.1, kd_weight=0.9))
    assert "temperature=2.0" in text and "ce_weight=0.1" in text and "kd_weight=0.9" in text


def test_modules_after_to_float64_in_a_training_step():
    # A float32-built student, the loss modules moved with `.to(torch.float64)`, a plain training step.
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).to(DT)
    head = nn.Linear(4, 10).to(DT)
    hint = L.HintLoss(L.ConvRegressor((5, 4, 9, 9), (5, 6, 5, 5))).to(torch.float64)
    kd = L.KDLoss(4.0, ce_weight=0.1, kd_weight=0.9).to(torch.float64)
    at = L.AttentionTransferLoss().to(torch.float64)
    params = list(student.parameters()) + list(head.parameters()) + list(hint.parameters())
    assert all(p.dtype == DT for p in params)
    opt = torch.optim.SGD(params, lr=0.1)

    x = rand(5, 3, 9, 9, seed=200, grad=False)
    f_t, z_t = rand(5, 6, 5, 5, seed=201, grad=False), rand(5, 10, seed=202, grad=False)
    y = targets((5,), 10, seed=203)
    f_s = student(x)
    z_s = head(f_s.mean((2, 3)))
    loss = kd(z_s, z_t, y) + 100 * hint(f_s, f_t) + 1000 * at([f_s], [f_t])
    assert loss.dtype == DT and loss.shape == ()
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert all(torch.count_nonzero(p.grad) > 0 for p in hint.parameters())
    opt.step()
