"""Each reference against an independent formula, the way the popular implementations write it: here, or in
tests/formulas.py where other tests measure against the same one (TRL's JSD, mdistiller's DKD).

Nothing here calls back into fastkd for the expected value. Inputs are float64 and finite, where the
popular formulas are exact; the NaN traps they have are covered in test_edge_cases.py.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F
from formulas import mdistiller_dkd, trl_generalized_jsd

from fastkd import functional as KF



def randn(*shape, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(requires_grad)


def assert_same(actual, expected, inputs, rtol=1e-10, atol=1e-12):
    """Same value, and the same gradient with respect to each input that requires one."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    wanted = [x for x in inputs if x.requires_grad]
    got = torch.autograd.grad(actual.sum(), wanted, retain_graph=True)
    want = torch.autograd.grad(expected.sum(), wanted, retain_graph=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol * 100, atol=atol * 100)


# Knowledge-Distillation-Zoo / RepDistiller / mdistiller: T^2 * sum kl_div / B, plus torchdistill's CE.
def hinton_kd(s, t, T, target=None, alpha=0.0, beta=1.0):
    soft = F.kl_div(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1), reduction="batchmean") * T * T
    if target is None:
        return beta * soft
    return alpha * F.cross_entropy(s, target) + beta * soft


@pytest.mark.parametrize("T", [1.0, 4.0, 0.5])
def test_kd_loss_matches_hinton(T):
    s, t = randn(7, 13), randn(7, 13, seed=1)
    target = torch.randint(0, 13, (7,), generator=torch.Generator().manual_seed(2))
    assert_same(KF.kd_loss(s, t, T), hinton_kd(s, t, T), [s, t])
    assert_same(KF.kd_loss(s, t, T, target=target, ce_weight=0.1, kd_weight=0.9),
                hinton_kd(s, t, T, target, alpha=0.1, beta=0.9), [s, t])


def test_kd_loss_reductions_follow_pytorch():
    s, t = randn(5, 9), randn(5, 9, seed=1)
    T = 2.0
    pointwise = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="none") * T * T
    assert_same(KF.kd_loss(s, t, T, reduction="sum"), pointwise.sum(), [s, t])
    assert_same(KF.kd_loss(s, t, T, reduction="mean"), pointwise.mean(), [s, t])
    assert_same(KF.kd_loss(s, t, T, reduction="none"), pointwise.sum(1), [s, t])


def test_kd_loss_rows_are_every_leading_position():
    s, t = randn(2, 3, 11), randn(2, 3, 11, seed=1)
    assert_same(KF.kd_loss(s, t, 3.0), hinton_kd(s.reshape(6, 11), t.reshape(6, 11), 3.0), [s, t])


def explicit_kl(p, q):
    """KL(p || q) per row by an explicit sum over classes."""
    return torch.stack([sum(p[r, c] * (torch.log(p[r, c]) - torch.log(q[r, c])) for c in range(p.shape[1]))
                        for r in range(p.shape[0])])


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_div_loss_masked_token_mean(direction):
    s, t = randn(2, 4, 6), randn(2, 4, 6, seed=1)
    labels = torch.tensor([[1, -100, 2, 3], [-100, -100, 0, 5]])
    T = 2.0
    p_s = torch.exp(s / T) / torch.exp(s / T).sum(-1, keepdim=True)
    p_t = torch.exp(t / T) / torch.exp(t / T).sum(-1, keepdim=True)
    keep = (labels != -100).reshape(-1)
    p_s, p_t = p_s.reshape(8, 6)[keep], p_t.reshape(8, 6)[keep]
    per_token = explicit_kl(p_t, p_s) if direction == "forward" else explicit_kl(p_s, p_t)
    expected = per_token.sum() / keep.sum()
    assert_same(KF.kl_div_loss(s, t, T, direction=direction, labels=labels), expected, [s, t])


def test_forward_kl_differs_from_torchtune_cross_entropy_by_teacher_entropy():
    # torchtune's ForwardKLLoss is -sum p_t log p_s (masked token mean): KL plus the teacher's entropy.
    s, t = randn(6, 10), randn(6, 10, seed=1)
    p_t = F.softmax(t, -1)
    torchtune_value = -(p_t * F.log_softmax(s, -1)).sum(-1).mean()
    teacher_entropy = -(p_t * F.log_softmax(t, -1)).sum(-1).mean()
    assert_same(KF.kl_div_loss(s, t), torchtune_value - teacher_entropy, [s])


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("masked", [False, True])
def test_jsd_loss_matches_trl(beta, masked):
    s, t = randn(3, 5, 17), randn(3, 5, 17, seed=1)
    labels = torch.tensor([[-100, 1, 2, 3, 4], [5, -100, -100, 1, 1], [0, 0, 0, 0, -100]]) if masked else None
    assert_same(KF.jsd_loss(s, t, beta=beta, temperature=1.5, labels=labels),
                trl_generalized_jsd(s, t, beta, 1.5, labels), [s, t])


@pytest.mark.parametrize("alpha,beta,T", [(1.0, 8.0, 4.0), (1.0, 0.5, 1.0), (0.3, 2.0, 2.5)])
def test_dkd_loss_matches_mdistiller(alpha, beta, T):
    # The teacher takes no gradient: mdistiller's teacher gradient is NaN (the log of its underflowed
    # target probability), a trap fastkd does not copy.
    s, t = randn(9, 11), randn(9, 11, seed=1, requires_grad=False)
    target = torch.randint(0, 11, (9,), generator=torch.Generator().manual_seed(2))
    # mdistiller's -1000 only approximately removes the target class: exp(-1000/T) is below float64's
    # resolution here, so the two agree to rounding.
    assert_same(KF.dkd_loss(s, t, target, alpha=alpha, beta=beta, temperature=T),
                mdistiller_dkd(s, t, target, alpha, beta, T), [s, t], rtol=1e-9)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_matches_pytorch(reduction, log_target):
    inp = F.log_softmax(randn(4, 7, requires_grad=False), -1).requires_grad_()
    tgt = F.softmax(randn(4, 7, seed=1, requires_grad=False), -1)
    tgt = (tgt.log() if log_target else tgt).requires_grad_()
    assert_same(KF.kl_div(inp, tgt, reduction, log_target),
                F.kl_div(inp, tgt, reduction=reduction, log_target=log_target), [inp, tgt])


def test_rkd_angle_by_explicit_triples():
    s, t = randn(5, 4), randn(5, 6, seed=1, requires_grad=False)

    def angle(x, i, j, k):
        a, b = x[j] - x[i], x[k] - x[i]
        if i == j or i == k:
            return torch.zeros((), dtype=x.dtype)
        return (a @ b) / (a.norm() * b.norm())

    def huber(d):
        return 0.5 * d * d if abs(d.item()) < 1 else d.abs() - 0.5

    triples = list(itertools.product(range(5), repeat=3))
    expected = sum(huber(angle(s, *ijk) - angle(t, *ijk)) for ijk in triples) / len(triples)
    assert_same(KF.rkd_angle_loss(s, t), expected, [s])


def test_rkd_distance_by_explicit_pairs():
    s, t = randn(6, 3), randn(6, 5, seed=1, requires_grad=False)

    def normalised_distances(x):
        d = torch.stack([torch.stack([(x[i] - x[j]).norm() if i != j else torch.zeros((), dtype=x.dtype)
                                      for j in range(len(x))]) for i in range(len(x))])
        return d / (d.sum() / (len(x) * (len(x) - 1)))

    expected = F.smooth_l1_loss(normalised_distances(s), normalised_distances(t))
    assert_same(KF.rkd_distance_loss(s, t), expected, [s], rtol=1e-8)
    squared = KF.rkd_distance_loss(s, t, squared=True)
    sq = lambda x: torch.cdist(x, x) ** 2 / (torch.cdist(x, x) ** 2).sum() * (len(x) * (len(x) - 1))
    assert_same(squared, F.smooth_l1_loss(sq(s), sq(t)), [s], rtol=1e-8)


def test_rkd_loss_weights_and_skipped_terms():
    s, t = randn(5, 4), randn(5, 4, seed=1, requires_grad=False)
    d, a = KF.rkd_distance_loss(s, t), KF.rkd_angle_loss(s, t)
    assert_same(KF.rkd_loss(s, t), 25 * d + 50 * a, [s])
    assert_same(KF.rkd_loss(s, t, distance_weight=2.0, angle_weight=0.0), 2 * d, [s])
    assert_same(KF.rkd_loss(s, t, distance_weight=0.0, angle_weight=3.0), 3 * a, [s])


def test_at_paper_mode_matches_torchdistill():
    s, t = randn(3, 4, 5, 5), randn(3, 2, 5, 5, seed=1)

    def at(f):
        a = f.pow(2).sum(1).flatten(1)
        return a / a.norm(dim=1, keepdim=True)

    expected = (at(s) - at(t)).norm(dim=1).sum() / 3
    assert_same(KF.at_loss(s, t, mode="paper"), expected, [s, t])


def test_sp_l1_matches_torchdistill():
    s, t = randn(6, 5), randn(6, 8, seed=1)

    def gram(z):
        g = z @ z.T
        return g / g.abs().sum(1, keepdim=True)

    expected = torch.norm(gram(t) - gram(s)) ** 2 / 36
    assert_same(KF.sp_loss(s, t, norm="l1"), expected, [s, t])


def test_fsp_matrix_is_mean_over_positions_of_channel_products():
    bottom, top = randn(2, 3, 4, 4), randn(2, 5, 4, 4, seed=1)
    expected = torch.einsum("bihw,bjhw->bij", top, bottom) / 16
    torch.testing.assert_close(KF.fsp_matrix(bottom, top), expected)


def test_nst_is_squared_mmd_of_polynomial_kernel():
    s, t = randn(2, 3, 4, 4), randn(2, 5, 4, 4, seed=1, requires_grad=False)
    a = F.normalize(s.flatten(2), dim=2)
    b = F.normalize(t.flatten(2), dim=2)
    k = lambda x, y: torch.einsum("bih,bjh->bij", x, y).pow(2).mean()
    assert_same(KF.nst_loss(s, t), k(b, b) + k(a, a) - 2 * k(a, b), [s])


def test_cc_loss_neighbouring_products():
    s, t = randn(5, 4), randn(5, 4, seed=1)
    delta = (s - t).abs()
    expected = sum((delta[i] * delta[i + 1]).sum() for i in range(4)) / 4
    assert_same(KF.cc_loss(s, t), expected, [s, t])


def test_hint_loss_is_mse():
    s, t = randn(3, 4, 5), randn(3, 4, 5, seed=1)
    assert_same(KF.hint_loss(s, t), ((s - t) ** 2).mean(), [s, t])


def test_attention_map_unit_norm_of_channel_mean():
    f = randn(2, 3, 4, 5)
    a = (f ** 3).mean(1).reshape(2, 20)
    torch.testing.assert_close(KF.attention_map(f, 3), a / a.norm(dim=1, keepdim=True))
