"""Every reference loss passes torch.autograd.gradcheck in float64, masked tokens and -inf logits included."""
import pytest
import torch
from torch.autograd import gradcheck

from fastkd import reference as R
from fastkd.losses import ConvRegressor


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()


def masked_vocab_logits(rows, classes, seed):
    """Logits with the last two classes masked to -inf (a padded vocabulary)."""
    x = torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[:, -2:] = float("-inf")
    return x.requires_grad_()


def check(fn, *inputs):
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


TARGET = torch.tensor([0, 3, 4, 1, 2])
LABELS = torch.tensor([[0, -100, 3], [-100, 1, 2]])


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_kd_loss(reduction):
    check(lambda s, t: R.kd_loss(s, t, 2.5, reduction=reduction, target=TARGET, ce_weight=0.3, kd_weight=0.7),
          rand(5, 6), rand(5, 6, seed=1))


def test_kd_loss_masked_vocabulary():
    check(lambda s, t: R.kd_loss(s, t, 2.0), masked_vocab_logits(4, 7, 0), masked_vocab_logits(4, 7, 1))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_kl_div_loss_masked_tokens(direction, reduction):
    check(lambda s, t: R.kl_div_loss(s, t, 1.5, direction=direction, labels=LABELS, reduction=reduction),
          rand(2, 3, 5), rand(2, 3, 5, seed=1))


def test_kl_div_loss_all_tokens_ignored():
    labels = torch.full((2, 3), -100)
    check(lambda s, t: R.kl_div_loss(s, t, labels=labels), rand(2, 3, 5), rand(2, 3, 5, seed=1))


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_jsd_loss(beta):
    check(lambda s, t: R.jsd_loss(s, t, beta=beta, temperature=2.0, labels=LABELS), rand(2, 3, 5), rand(2, 3, 5, seed=1))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_loss_masked_vocabulary(beta):
    check(lambda s, t: R.jsd_loss(s, t, beta=beta), masked_vocab_logits(3, 6, 0), masked_vocab_logits(3, 6, 1))


def test_dkd_loss():
    check(lambda s, t: R.dkd_loss(s, t, TARGET, alpha=1.0, beta=8.0, temperature=4.0), rand(5, 7), rand(5, 7, seed=1))


def test_dkd_loss_one_class():
    check(lambda s, t: R.dkd_loss(s, t, torch.zeros(3, dtype=torch.long)), rand(3, 1), rand(3, 1, seed=1))


@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div(log_target):
    inp = torch.log_softmax(torch.randn(4, 5, dtype=torch.float64), -1).requires_grad_()
    tgt = torch.softmax(torch.randn(4, 5, dtype=torch.float64), -1)
    tgt = (tgt.log() if log_target else tgt).requires_grad_()
    check(lambda i, t: R.kl_div(i, t, reduction="batchmean", log_target=log_target), inp, tgt)


@pytest.mark.parametrize("squared", [False, True])
def test_rkd_distance_student_normaliser(squared):
    # The student's mean-distance normaliser carries gradient; gradcheck sees it through every entry.
    teacher = rand(6, 5, seed=1).detach()
    check(lambda s: R.rkd_distance_loss(s, teacher, squared=squared), rand(6, 4))


def test_rkd_angle():
    teacher = rand(5, 3, seed=1).detach()
    check(lambda s: R.rkd_angle_loss(s, teacher), rand(5, 4))


def test_rkd_loss():
    teacher = rand(5, 2, 3, seed=1).detach()
    check(lambda s: R.rkd_loss(s, teacher), rand(5, 3, 2))


@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("mode", ["code", "paper"])
def test_at_loss(p, mode):
    check(lambda s, t: R.at_loss(s, t, p=p, mode=mode), rand(3, 2, 6, 6), rand(3, 4, 3, 3, seed=1))


@pytest.mark.parametrize("p", [1, 3, 5])
def test_attention_map(p):
    # odd p on signed entries: the float64 reference the kernels' odd-power gradients are checked against
    f = rand(2, 3, 4, 5)
    assert (f < 0).any()
    check(lambda f: R.attention_map(f, p), f)


def test_at_loss_odd_power_five():
    check(lambda s, t: R.at_loss(s, t, p=5), rand(2, 3, 4, 4), rand(2, 2, 4, 4, seed=1))


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_sp_loss(norm):
    check(lambda s, t: R.sp_loss(s, t, norm=norm), rand(5, 7), rand(5, 3, seed=1))


def test_fsp_loss():
    teacher = [rand(2, 3, 4, 4, seed=2).detach(), rand(2, 2, 4, 4, seed=3).detach()]
    check(lambda a, b: R.fsp_loss([a, b], teacher), rand(2, 3, 8, 8), rand(2, 2, 4, 4, seed=1))


def test_pkt_loss():
    check(lambda s, t: R.pkt_loss(s, t), rand(5, 6), rand(5, 4, seed=1))


def test_nst_loss():
    # The teacher-teacher term is detached by definition (RepDistiller), so only the student is checked.
    teacher = rand(2, 4, 3, 3, seed=1).detach()
    check(lambda s: R.nst_loss(s, teacher), rand(2, 3, 6, 6))


def test_cc_loss():
    check(lambda s, t: R.cc_loss(s, t), rand(5, 4), rand(5, 4, seed=1))


def test_hint_loss_with_regressor():
    regressor = ConvRegressor((2, 3, 6, 6), (2, 4, 3, 3), use_relu=False).double()
    check(lambda s, t: R.hint_loss(s, t, regressor), rand(2, 3, 6, 6), rand(2, 4, 3, 3, seed=1))


# sparse_kd_loss: 3 rows of 6 student logits, 4 slots each. Row 0: three ids holding 0.9 of the teacher's mass
# (log p_tail by its -expm1 branch) and an unused slot with an out-of-range id; row 1: two ids with 0.3 (the
# log1p branch) and two unused slots; row 2: no used slot.
SPARSE_IDS = torch.tensor([[4, 0, 2, 9], [1, 5, 0, -1], [3, 3, 3, 3]])
SPARSE_PROBS = torch.tensor([[0.5, 0.3, 0.1, 0.0], [0.2, 0.1, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
SPARSE_LABELS = torch.tensor([0, 1, 2])


@pytest.mark.parametrize("tail", ["renormalize", "bucket", "none"])
def test_sparse_kd_loss(tail):
    temperature = 1.5 if tail == "renormalize" else 1.0
    check(lambda s, l: R.sparse_kd_loss(s, SPARSE_IDS, l, SPARSE_LABELS, tail=tail, temperature=temperature),
          rand(3, 6), SPARSE_PROBS.log().requires_grad_())


@pytest.mark.parametrize("tail", ["renormalize", "bucket", "none"])
def test_sparse_kd_loss_masked_tokens(tail):
    labels = torch.tensor([-100, 1, -100])
    check(lambda s, l: R.sparse_kd_loss(s, SPARSE_IDS, l, labels, tail=tail, reduction="none"),
          rand(3, 6), SPARSE_PROBS.log().requires_grad_())
