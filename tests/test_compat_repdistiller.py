"""`fastkd.compat.repdistiller` against RepDistiller's own formulas: values, return types and gradients.

The reference classes below are RepDistiller's modules (its `distiller_zoo` and `models/util.py`) around its
formulas, as tests/formulas.py writes them out once for every test that measures against RepDistiller, so a test
failure means the one-line migration
`from distiller_zoo import ...` -> `from fastkd.compat.repdistiller import ...` changes numbers.
fastkd is never used to compute an expected value.
"""
import formulas as repdistiller
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastkd.compat import repdistiller as compat

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# RepDistiller's modules (distiller_zoo), around its formulas as tests/formulas.py writes them out
# --------------------------------------------------------------------------------------------------

class RefDistillKL(nn.Module):
    def __init__(self, T):
        super().__init__()
        self.T = T

    def forward(self, y_s, y_t):
        return repdistiller.distill_kl(y_s, y_t, self.T)


class RefHintLoss(nn.Module):
    def forward(self, f_s, f_t):
        return repdistiller.hint(f_s, f_t)


class RefAttention(nn.Module):
    def __init__(self, p=2):
        super().__init__()
        self.p = p

    def forward(self, g_s, g_t):
        return [repdistiller.at(f_s, f_t, self.p) for f_s, f_t in zip(g_s, g_t)]


class RefSimilarity(nn.Module):
    def forward(self, g_s, g_t):
        return [repdistiller.similarity(f_s, f_t) for f_s, f_t in zip(g_s, g_t)]


class RefRKDLoss(nn.Module):
    def __init__(self, w_d=25, w_a=50):
        super().__init__()
        self.w_d, self.w_a = w_d, w_a

    def forward(self, f_s, f_t):
        return repdistiller.rkd(f_s, f_t, self.w_d, self.w_a)


class RefPKT(nn.Module):
    def forward(self, f_s, f_t):
        return repdistiller.pkt(f_s, f_t)


class RefFSP(nn.Module):
    def __init__(self, s_shapes, t_shapes):
        super().__init__()
        assert len(s_shapes) == len(t_shapes), "unequal length of feat list"
        s_c = [s[1] for s in s_shapes]
        t_c = [t[1] for t in t_shapes]
        if s_c != t_c:
            raise ValueError("num of channels not equal (error in FSP)")

    def forward(self, g_s, g_t):
        return repdistiller.fsp_losses(g_s, g_t)


class RefNSTLoss(nn.Module):
    def forward(self, g_s, g_t):
        return [repdistiller.nst(f_s, f_t) for f_s, f_t in zip(g_s, g_t)]


class RefCorrelation(nn.Module):
    def forward(self, f_s, f_t):
        return repdistiller.correlation(f_s, f_t)


class RefConvReg(nn.Module):
    """RepDistiller's `models/util.py` ConvReg (its `raise NotImplemented(...)` branch left out)."""

    def __init__(self, s_shape, t_shape, use_relu=True):
        super().__init__()
        self.use_relu = use_relu
        s_N, s_C, s_H, s_W = s_shape
        t_N, t_C, t_H, t_W = t_shape
        if s_H == 2 * t_H:
            self.conv = nn.Conv2d(s_C, t_C, kernel_size=3, stride=2, padding=1)
        elif s_H * 2 == t_H:
            self.conv = nn.ConvTranspose2d(s_C, t_C, kernel_size=4, stride=2, padding=1)
        elif s_H >= t_H:
            self.conv = nn.Conv2d(s_C, t_C, kernel_size=(1 + s_H - t_H, 1 + s_W - t_W))
        self.bn = nn.BatchNorm2d(t_C)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.conv(x)
        return self.relu(self.bn(x)) if self.use_relu else self.bn(x)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def rand(*shape, seed, scale=1.0, grad=True):
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(*shape, generator=g, dtype=DT))
    return x.requires_grad_(grad)


def rand_list(shapes, seed):
    return [rand(*s, seed=seed + i) for i, s in enumerate(shapes)]


def total(x):
    """Sum a loss or a list of losses into one scalar (as the training scripts do)."""
    return sum(v.sum() for v in x) if isinstance(x, (list, tuple)) else x


def grads(loss, inputs):
    """Gradients of `loss` w.r.t. `inputs`; None for an input the loss does not depend on."""
    return torch.autograd.grad(total(loss), inputs, allow_unused=True)


def assert_same_grads(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None or torch.count_nonzero(g) == 0, f"input {i}: expected no gradient"
        else:
            assert g is not None, f"input {i}: expected a gradient, got none"
            torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"input {i}: {m}")


def assert_same_list(got, want):
    assert isinstance(got, list)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, **TOL)


# Feature-map lists, student vs teacher, with spatial size mismatches in both directions
# and channel counts that differ (AT and NST accept that; FSP does not).
MAPS_S = [(5, 3, 9, 9), (5, 6, 5, 5), (5, 7, 3, 3)]
MAPS_T = [(5, 6, 5, 5), (5, 10, 9, 9), (5, 7, 3, 3)]


# --------------------------------------------------------------------------------------------------
# DistillKL
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1.0, 4, 2.5])
def test_distill_kl(T):
    y_s, y_t = rand(7, 13, seed=1, scale=3.0), rand(7, 13, seed=2, scale=3.0)
    got, want = compat.DistillKL(T)(y_s, y_t), RefDistillKL(T)(y_s, y_t)
    assert got.shape == ()
    torch.testing.assert_close(got, want, **TOL)
    # RepDistiller does not detach y_t: the teacher gets the same gradient too.
    assert_same_grads(grads(got, [y_s, y_t]), grads(want, [y_s, y_t]))


def test_distill_kl_on_maps_uses_dim_1_and_batch_size():
    # RepDistiller's softmax is over dim 1 and it divides by shape[0], also for (B, C, L) logits.
    y_s, y_t = rand(4, 5, 3, seed=3), rand(4, 5, 3, seed=4)
    got, want = compat.DistillKL(2.0)(y_s, y_t), RefDistillKL(2.0)(y_s, y_t)
    torch.testing.assert_close(got, want, **TOL)
    assert_same_grads(grads(got, [y_s, y_t]), grads(want, [y_s, y_t]))


# --------------------------------------------------------------------------------------------------
# HintLoss, ConvReg
# --------------------------------------------------------------------------------------------------

def test_hint_loss():
    f_s, f_t = rand(5, 6, 7, 7, seed=3), rand(5, 6, 7, 7, seed=4)
    got, want = compat.HintLoss()(f_s, f_t), RefHintLoss()(f_s, f_t)
    assert got.shape == ()
    torch.testing.assert_close(got, want, **TOL)
    assert_same_grads(grads(got, [f_s, f_t]), grads(want, [f_s, f_t]))


@pytest.mark.parametrize("s_shape, t_shape, conv_type", [
    ((5, 3, 10, 10), (5, 6, 5, 5), nn.Conv2d),            # student twice the teacher: stride-2 3x3
    ((5, 3, 5, 5), (5, 6, 10, 10), nn.ConvTranspose2d),   # student half the teacher: transposed conv
    ((5, 3, 9, 9), (5, 6, 5, 5), nn.Conv2d),              # larger, not 2x: valid 5x5 conv
    ((5, 3, 7, 7), (5, 6, 7, 7), nn.Conv2d),              # same size: 1x1 conv
    ((5, 3, 9, 7), (5, 6, 5, 4), nn.Conv2d),              # non-square valid conv, kernel (5, 4)
])
@pytest.mark.parametrize("use_relu", [True, False])
def test_conv_reg_matches_repdistiller(s_shape, t_shape, conv_type, use_relu):
    torch.manual_seed(0)
    reg = compat.ConvReg(s_shape, t_shape, use_relu=use_relu).to(DT)
    ref = RefConvReg(s_shape, t_shape, use_relu=use_relu).to(DT)
    assert type(reg.conv) is conv_type
    # A RepDistiller checkpoint of the regressor loads into the fastkd one, and vice versa.
    assert reg.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(reg.state_dict())
    x = rand(*s_shape, seed=5)
    out, out_ref = reg(x), ref(x)
    assert out.shape == t_shape
    torch.testing.assert_close(out, out_ref, **TOL)
    params, params_ref = list(reg.parameters()), list(ref.parameters())
    assert_same_grads(grads(out.pow(2).sum(), [x] + params), grads(out_ref.pow(2).sum(), [x] + params_ref))
    if use_relu:
        assert (out >= 0).all()
    else:
        assert (out < 0).any()


@pytest.mark.parametrize("s_shape, t_shape", [
    ((5, 3, 5, 5), (5, 6, 7, 7)),    # smaller, not half
    ((5, 3, 3, 3), (5, 6, 9, 9)),    # a third
    ((5, 3, 9, 5), (5, 6, 7, 7)),    # taller but narrower: no valid kernel
])
def test_conv_reg_raises_when_no_regressor_fits(s_shape, t_shape):
    with pytest.raises(ValueError, match="no regressor"):
        compat.ConvReg(s_shape, t_shape)


# --------------------------------------------------------------------------------------------------
# Attention, Similarity, NST: lists of per-pair losses
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [2, 1, 3, 2.5])
def test_attention(p):
    g_s, g_t = rand_list(MAPS_S, seed=10), rand_list(MAPS_T, seed=20)
    if p == 2.5:  # a fractional power needs non-negative maps (RepDistiller applies it after ReLU)
        g_s = [f.detach().abs().requires_grad_() for f in g_s]
        g_t = [f.detach().abs().requires_grad_() for f in g_t]
    got, want = compat.Attention(p)(g_s, g_t), RefAttention(p)(g_s, g_t)
    assert len(got) == len(MAPS_S)
    assert_same_list(got, want)
    assert all(v.shape == () for v in got)
    # RepDistiller does not detach the teacher maps.
    assert_same_grads(grads(got, g_s + g_t), grads(want, g_s + g_t))


def test_attention_default_p_is_2():
    g_s, g_t = rand_list(MAPS_S, seed=11), rand_list(MAPS_T, seed=21)
    assert_same_list(compat.Attention()(g_s, g_t), RefAttention(2)(g_s, g_t))


def test_similarity():
    shapes_s = [(7, 13), (7, 3, 5, 5), (7, 4, 3, 3)]
    shapes_t = [(7, 17), (7, 6, 9, 9), (7, 4, 3, 3)]
    g_s, g_t = rand_list(shapes_s, seed=30), rand_list(shapes_t, seed=40)
    got, want = compat.Similarity()(g_s, g_t), RefSimilarity()(g_s, g_t)
    assert_same_list(got, want)
    assert all(v.shape == (1,) for v in got)
    assert_same_grads(grads(got, g_s + g_t), grads(want, g_s + g_t))


def test_nst():
    g_s, g_t = rand_list(MAPS_S, seed=50), rand_list(MAPS_T, seed=60)
    got, want = compat.NSTLoss()(g_s, g_t), RefNSTLoss()(g_s, g_t)
    assert_same_list(got, want)
    assert all(v.shape == () for v in got)
    # The teacher-teacher term is detached in RepDistiller; the cross term still reaches the teacher.
    got_grads = grads(got, g_s + g_t)
    assert_same_grads(got_grads, grads(want, g_s + g_t))
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in got_grads)


@pytest.mark.parametrize("cls, ref_cls", [(compat.Attention, RefAttention), (compat.NSTLoss, RefNSTLoss),
                                          (compat.Similarity, RefSimilarity)])
def test_list_losses_accept_tuples_and_single_pairs(cls, ref_cls):
    g_s, g_t = rand_list(MAPS_S[:1], seed=70), rand_list(MAPS_T[:1], seed=71)
    assert_same_list(cls()(tuple(g_s), tuple(g_t)), ref_cls()(g_s, g_t))


# --------------------------------------------------------------------------------------------------
# RKD
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("w_d, w_a", [(25, 50), (1.0, 0.0), (0, 2.0), (3.5, 1.5)])
@pytest.mark.parametrize("shape_s, shape_t", [((7, 13), (7, 19)), ((6, 3, 2, 2), (6, 5))])
def test_rkd(w_d, w_a, shape_s, shape_t):
    f_s, f_t = rand(*shape_s, seed=80), rand(*shape_t, seed=81, scale=2.0)
    got = compat.RKDLoss(w_d, w_a)(f_s, f_t)
    want = RefRKDLoss(w_d, w_a)(f_s, f_t)
    assert got.shape == ()
    torch.testing.assert_close(got, want, **TOL)
    # The teacher side runs under no_grad in RepDistiller: no gradient reaches f_t.
    assert_same_grads(grads(got, [f_s, f_t]), grads(want, [f_s, f_t]))


def test_rkd_default_weights():
    f_s, f_t = rand(7, 13, seed=82), rand(7, 11, seed=83)
    torch.testing.assert_close(compat.RKDLoss()(f_s, f_t), RefRKDLoss()(f_s, f_t), **TOL)


def test_rkd_duplicate_rows():
    # Two identical samples: their distance is clamped to sqrt(1e-12) and counted in the mean,
    # the angle through them is the normalised zero vector. RepDistiller's numbers, kept.
    f_s = rand(7, 13, seed=84, grad=False)
    f_s[3] = f_s[1]
    f_s.requires_grad_()
    f_t = rand(7, 13, seed=85)
    got, want = compat.RKDLoss()(f_s, f_t), RefRKDLoss()(f_s, f_t)
    torch.testing.assert_close(got, want, **TOL)
    assert_same_grads(grads(got, [f_s]), grads(want, [f_s]))


# --------------------------------------------------------------------------------------------------
# PKT, Correlation
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape_s, shape_t", [((7, 13), (7, 13)), ((7, 13), (7, 21)), ((9, 3), (9, 5))])
def test_pkt(shape_s, shape_t):
    f_s, f_t = rand(*shape_s, seed=90), rand(*shape_t, seed=91, scale=0.5)
    got, want = compat.PKT()(f_s, f_t), RefPKT()(f_s, f_t)
    assert got.shape == ()
    torch.testing.assert_close(got, want, **TOL)
    # RepDistiller does not detach the teacher.
    assert_same_grads(grads(got, [f_s, f_t]), grads(want, [f_s, f_t]))


def test_correlation():
    f_s, f_t = rand(7, 13, seed=100), rand(7, 13, seed=101)
    got, want = compat.Correlation()(f_s, f_t), RefCorrelation()(f_s, f_t)
    assert got.shape == ()
    torch.testing.assert_close(got, want, **TOL)
    assert_same_grads(grads(got, [f_s, f_t]), grads(want, [f_s, f_t]))


# --------------------------------------------------------------------------------------------------
# FSP
# --------------------------------------------------------------------------------------------------

# Student and teacher share channel counts per layer; spatial sizes differ between the
# networks and between consecutive layers (pooled in both directions, bottom > top and bottom < top).
FSP_S = [(5, 3, 9, 9), (5, 6, 5, 5), (5, 4, 7, 7), (5, 4, 7, 7)]
FSP_T = [(5, 3, 11, 11), (5, 6, 11, 11), (5, 4, 3, 3), (5, 4, 5, 5)]


def test_fsp():
    g_s, g_t = rand_list(FSP_S, seed=110), rand_list(FSP_T, seed=120)
    got = compat.FSP(FSP_S, FSP_T)(g_s, g_t)
    want = RefFSP(FSP_S, FSP_T)(g_s, g_t)
    assert len(got) == len(FSP_S) - 1
    assert all(v.shape == () for v in got)
    assert_same_list(got, want)
    assert_same_grads(grads(got, g_s + g_t), grads(want, g_s + g_t))


def test_fsp_weighted_sum_gradients():
    # The training script weights the pair losses; check a non-uniform weighting, not only the sum.
    g_s, g_t = rand_list(FSP_S, seed=111), rand_list(FSP_T, seed=121)
    w = [1.0, -2.0, 3.5]
    got = sum(wi * v for wi, v in zip(w, compat.FSP(FSP_S, FSP_T)(g_s, g_t)))
    want = sum(wi * v for wi, v in zip(w, RefFSP(FSP_S, FSP_T)(g_s, g_t)))
    assert_same_grads(grads(got, g_s + g_t), grads(want, g_s + g_t))


@pytest.mark.parametrize("s_shapes, t_shapes", [
    ([(5, 3, 9, 9), (5, 6, 5, 5)], [(5, 3, 9, 9), (5, 7, 5, 5)]),
    ([(5, 4, 9, 9), (5, 6, 5, 5)], [(5, 3, 9, 9), (5, 6, 5, 5)]),
])
def test_fsp_channel_mismatch_raises(s_shapes, t_shapes):
    with pytest.raises(ValueError):
        RefFSP(s_shapes, t_shapes)  # the reference agrees that this is an error
    with pytest.raises(ValueError):
        compat.FSP(s_shapes, t_shapes)


# --------------------------------------------------------------------------------------------------
# The migration claim: one RepDistiller-style training step, both imports
# --------------------------------------------------------------------------------------------------

class TinyNet(nn.Module):
    """A conv net returning RepDistiller's `(feat, logit)` for `is_feat=True`: feature maps, then the
    pooled embedding as the last feature."""

    def __init__(self, strides, widths=(4, 6, 5), classes=10):
        super().__init__()
        chans = (3,) + tuple(widths)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], 3, stride=strides[i], padding=1),
                          nn.BatchNorm2d(chans[i + 1]), nn.ReLU())
            for i in range(len(widths)))
        self.fc = nn.Linear(chans[-1], classes)

    def forward(self, x, is_feat=False):
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        emb = x.mean((2, 3))
        feats.append(emb)
        logit = self.fc(emb)
        return (feats, logit) if is_feat else logit


def build_criterion(distill, lib, feat_s, feat_t):
    """`criterion_kd` and the trainable modules it brings, as RepDistiller's train_student.py builds them."""
    if distill == "kd":
        return None, []
    if distill == "hint":
        hint_layer = 2
        reg = (compat.ConvReg if lib == "fastkd" else RefConvReg)(feat_s[hint_layer].shape,
                                                                  feat_t[hint_layer].shape).to(DT)
        crit = compat.HintLoss() if lib == "fastkd" else RefHintLoss()
        return (lambda fs, ft: crit(reg(fs[hint_layer]), ft[hint_layer])), [reg]
    if distill == "attention":
        crit = compat.Attention() if lib == "fastkd" else RefAttention()
        return (lambda fs, ft: sum(crit(fs[1:-1], ft[1:-1]))), []
    if distill == "nst":
        crit = compat.NSTLoss() if lib == "fastkd" else RefNSTLoss()
        return (lambda fs, ft: sum(crit(fs[1:-1], ft[1:-1]))), []
    if distill == "similarity":
        crit = compat.Similarity() if lib == "fastkd" else RefSimilarity()
        return (lambda fs, ft: sum(crit([fs[-2]], [ft[-2]]))), []
    if distill == "rkd":
        crit = compat.RKDLoss() if lib == "fastkd" else RefRKDLoss()
        return (lambda fs, ft: crit(fs[-1], ft[-1])), []
    if distill == "pkt":
        crit = compat.PKT() if lib == "fastkd" else RefPKT()
        return (lambda fs, ft: crit(fs[-1], ft[-1])), []
    if distill == "fsp":
        s_shapes = [f.shape for f in feat_s[:-1]]
        t_shapes = [f.shape for f in feat_t[:-1]]
        crit = (compat.FSP if lib == "fastkd" else RefFSP)(s_shapes, t_shapes)
        return (lambda fs, ft: sum(crit(fs[:-1], ft[:-1]))), []
    if distill == "correlation":
        # RepDistiller's CC embeds both last features to a common size first (Embed: linear + l2 norm).
        torch.manual_seed(1)
        embed_s, embed_t = nn.Linear(feat_s[-1].shape[1], 11).to(DT), nn.Linear(feat_t[-1].shape[1], 11).to(DT)
        crit = compat.Correlation() if lib == "fastkd" else RefCorrelation()
        return (lambda fs, ft: crit(F.normalize(embed_s(fs[-1])), F.normalize(embed_t(ft[-1])))), [embed_s, embed_t]
    raise AssertionError(distill)


# RepDistiller's `-b` weight for each loss (docs/semantics.md).
BETA = {"kd": 0.0, "hint": 100, "attention": 1000, "similarity": 3000, "correlation": 0.02, "rkd": 1,
        "pkt": 30000, "fsp": 50, "nst": 50}


def training_step(distill, lib, state_s, state_t, x, y):
    torch.manual_seed(0)
    model_s = TinyNet(strides=(1, 2, 2)).to(DT)         # maps 11x11, 6x6, 3x3
    model_t = TinyNet(strides=(1, 1, 2), widths=(4, 6, 5)).to(DT)  # maps 11x11, 11x11, 6x6
    model_s.load_state_dict(state_s)
    model_t.load_state_dict(state_t)
    model_t.eval()

    feat_s, logit_s = model_s(x, is_feat=True)
    with torch.no_grad():
        feat_t, logit_t = model_t(x, is_feat=True)
        feat_t = [f.detach() for f in feat_t]

    criterion_div = compat.DistillKL(4) if lib == "fastkd" else RefDistillKL(4)
    criterion_kd, extra_modules = build_criterion(distill, lib, feat_s, feat_t)
    if extra_modules:
        torch.manual_seed(2)  # same init for both libraries' regressors/embeddings
        for m in extra_modules:
            for p in m.parameters():
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, dtype=DT) * 0.3)

    loss_cls = nn.CrossEntropyLoss()(logit_s, y)
    loss_div = criterion_div(logit_s, logit_t)
    loss_kd = criterion_kd(feat_s, feat_t) if criterion_kd is not None else 0.0
    loss = 0.1 * loss_cls + 0.9 * loss_div + BETA[distill] * loss_kd

    params = list(model_s.parameters()) + [p for m in extra_modules for p in m.parameters()]
    return loss, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("distill", list(BETA))
def test_one_line_migration_training_step(distill):
    torch.manual_seed(123)
    state_s = TinyNet(strides=(1, 2, 2)).to(DT).state_dict()
    state_t = TinyNet(strides=(1, 1, 2), widths=(4, 6, 5)).to(DT).state_dict()
    x = rand(7, 3, 11, 11, seed=130, grad=False)
    y = torch.tensor([0, 3, 9, 1, 1, 7, 4])

    loss, g = training_step(distill, "fastkd", state_s, state_t, x, y)
    loss_ref, g_ref = training_step(distill, "repdistiller", state_s, state_t, x, y)
    assert loss.shape == loss_ref.shape  # (1,) with Similarity's list of (1,) tensors, as in RepDistiller
    torch.testing.assert_close(loss, loss_ref, **TOL)
    assert len(g) == len(g_ref)
    for i, (a, b) in enumerate(zip(g, g_ref)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=lambda m: f"parameter {i}: {m}")
    assert any(torch.count_nonzero(a) > 0 for a in g)
