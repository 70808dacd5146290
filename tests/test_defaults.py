"""Default arguments, and parameter branches no other test enters.

- The documented defaults (RepDistiller's, mdistiller's, TRL's values, as the docstrings name them) are the
  defaults of `fastkd.functional`, of `fastkd.reference` and of the modules' constructors (the kernel
  backends' losses have none: the public functions pass every option): one table, checked against every signature.
- `pkt_loss`'s default eps is RepDistiller's 1e-7, checked by value on an input where eps matters.
- Branches found untested: `kd_loss` given a target with `ce_weight=0` (the target is then ignored, also by
  the kernels), `rkd_loss(squared=True)` through the kernels (distance and angle together), float64 logits
  through a kernel backend (the reference runs).
"""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F

from fastkd import functional as KF
from fastkd import kernel_losses
from fastkd import losses as L
from fastkd import reference as R

# The documented default of every optional argument of the public losses (backend aside).
DOCUMENTED = {
    "kd_loss": dict(temperature=4.0, reduction="batchmean", target=None, ce_weight=0.0, kd_weight=1.0,
                    vocab_mismatch="error", process_group=None, vocab_range=None),
    "kl_div_loss": dict(temperature=1.0, direction="forward", labels=None, ignore_index=-100, reduction="batchmean",
                        vocab_mismatch="error", process_group=None, vocab_range=None),
    "jsd_loss": dict(beta=0.5, temperature=1.0, labels=None, ignore_index=-100, reduction="batchmean",
                     vocab_mismatch="error", process_group=None, vocab_range=None),
    "dkd_loss": dict(alpha=1.0, beta=8.0, temperature=4.0, vocab_mismatch="error"),
    "sparse_kd_loss": dict(labels=None, tail="renormalize", temperature=1.0, ignore_index=-100,
                           num_items_in_batch=None, reduction="batchmean", process_group=None, vocab_range=None),
    "fused_linear_distill_loss": dict(teacher_hidden=None, teacher_weight=None, labels=None, loss="forward_kl",
                                      beta=0.5, temperature=1.0, ignore_index=-100, ce_weight=0.0, kd_weight=1.0,
                                      student_bias=None, teacher_bias=None, teacher_logits=None,
                                      teacher_topk=None, tail="renormalize", student_softcap=None,
                                      teacher_softcap=None, vocab_mismatch="error", num_items_in_batch=None,
                                      chunk_size=None, process_group=None, vocab_range=None),
    "kl_div": dict(reduction="mean", log_target=False),
    "mutual_learning_loss": dict(target=None, temperature=1.0, ce_weight=1.0, kl_weight=1.0),
    "rkd_loss": dict(distance_weight=25.0, angle_weight=50.0, squared=False, eps=1e-12, process_group=None),
    "rkd_distance_loss": dict(squared=False, eps=1e-12, process_group=None),
    "rkd_angle_loss": dict(process_group=None),
    "attention_map": dict(p=2),
    "at_loss": dict(p=2, mode="code"),
    "sp_loss": dict(norm="l2", process_group=None),
    "fsp_loss": dict(),
    "pkt_loss": dict(eps=1e-7, process_group=None),
    "nst_loss": dict(),
    "cc_loss": dict(process_group=None),
    "hint_loss": dict(regressor=None),
}

# Options the public functions resolve before the reference runs (a mismatched vocabulary becomes two views; a
# process group runs fastkd.distributed's losses, or gathers a relational loss's batch).
PUBLIC_ONLY = {"vocab_mismatch", "process_group", "vocab_range"}

# module -> (the function it calls, its constructor arguments that are that function's arguments)
MODULES = {
    L.KDLoss: ("kd_loss", ["temperature", "reduction", "ce_weight", "kd_weight", "process_group", "vocab_range"]),
    L.KLDivLoss: ("kl_div", ["reduction", "log_target"]),
    L.KLDistillationLoss: ("kl_div_loss", ["temperature", "direction", "ignore_index", "reduction", "process_group",
                                           "vocab_range"]),
    L.JSDLoss: ("jsd_loss", ["beta", "temperature", "ignore_index", "reduction", "process_group", "vocab_range"]),
    L.DKDLoss: ("dkd_loss", ["alpha", "beta", "temperature"]),
    L.SparseKDLoss: ("sparse_kd_loss", ["tail", "temperature", "ignore_index", "reduction", "process_group",
                                        "vocab_range"]),
    L.FusedLinearDistillLoss: ("fused_linear_distill_loss", ["loss", "beta", "temperature", "ignore_index",
                                                             "ce_weight", "kd_weight", "student_softcap",
                                                             "teacher_softcap", "vocab_mismatch", "chunk_size",
                                                             "tail", "process_group", "vocab_range"]),
    L.MutualLearningLoss: ("mutual_learning_loss", ["temperature", "ce_weight", "kl_weight"]),
    L.RKDLoss: ("rkd_loss", ["distance_weight", "angle_weight", "squared", "eps", "process_group"]),
    L.AttentionTransferLoss: ("at_loss", ["p", "mode"]),
    L.SimilarityLoss: ("sp_loss", ["norm", "process_group"]),
    L.PKTLoss: ("pkt_loss", ["eps", "process_group"]),
}


def defaults(fn) -> dict:
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty and name != "backend"}


def same(a, b) -> bool:
    return type(a) is type(b) and a == b if not isinstance(a, (int, float)) or isinstance(a, bool) \
        else not isinstance(b, bool) and float(a) == float(b)


def test_every_public_loss_is_in_the_table():
    assert set(DOCUMENTED) == set(KF.__all__) - {"fsp_matrix"}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_functional_defaults_are_the_documented_ones(name):
    got = defaults(getattr(KF, name))
    assert got.keys() == DOCUMENTED[name].keys()
    for arg, want in DOCUMENTED[name].items():
        assert same(got[arg], want), f"{name}({arg}=...): {got[arg]!r}, documented {want!r}"


@pytest.mark.parametrize("name", sorted(set(DOCUMENTED) & set(R.IMPLEMENTATIONS)))
def test_reference_defaults_are_the_documented_ones(name):
    got = defaults(R.IMPLEMENTATIONS[name])
    for arg, want in DOCUMENTED[name].items():
        if arg in PUBLIC_ONLY:
            continue
        assert arg in got and same(got[arg], want), f"reference.{name}({arg}=...): {got.get(arg)!r}, want {want!r}"
    assert got.keys() <= DOCUMENTED[name].keys()


@pytest.mark.parametrize("name", sorted(kernel_losses.LOSSES))
def test_kernel_backend_losses_take_the_reference_arguments_without_defaults(name):
    """The kernel backends' losses (Triton, CUDA C++) take the kernel set, then the reference's arguments, with
    no defaults of their own: the public function passes every option, so the defaults are decided there."""
    def shape(fn):  # names and kinds (annotations aside)
        return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]
    params = list(inspect.signature(kernel_losses.LOSSES[name]).parameters.values())
    assert params[0].name == "kernels"
    assert [(p.name, p.kind) for p in params[1:]] == shape(R.IMPLEMENTATIONS[name])
    assert all(p.default is inspect.Parameter.empty for p in params)


@pytest.mark.parametrize("cls", list(MODULES), ids=lambda c: c.__name__)
def test_module_defaults_are_the_documented_ones(cls):
    name, args = MODULES[cls]
    got = defaults(cls.__init__)
    for arg in args:
        assert same(got[arg], DOCUMENTED[name][arg]), f"{cls.__name__}({arg}=...): {got[arg]!r}"


# ----------------------------------------------------------------------------------------------------------
# pkt_loss's default eps, by value

def repdistiller_pkt(f_s, f_t, eps=1e-7):
    """RepDistiller `PKT.cosine_similarity_loss`, written out in float64."""
    def conditional(x):
        x = x / (torch.sqrt((x ** 2).sum(1, keepdim=True)) + eps)
        sim = (x @ x.T + 1.0) / 2.0
        return sim / sim.sum(1, keepdim=True)
    p_s, p_t = conditional(f_s), conditional(f_t)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def test_pkt_default_eps_is_repdistillers():
    g = torch.Generator().manual_seed(0)
    f_s = torch.randn(5, 6, generator=g, dtype=torch.float64)
    f_t = torch.randn(5, 6, generator=g, dtype=torch.float64)
    f_s[2] *= 1e-7  # a row whose norm is comparable to eps: x / (|x| + eps) is about x / (2 |x|)
    want = repdistiller_pkt(f_s, f_t, eps=1e-7)
    # eps matters here: another eps gives a visibly different loss
    assert abs(repdistiller_pkt(f_s, f_t, eps=1e-8) - want) > 1e-3 * abs(want)
    for got in (R.pkt_loss(f_s, f_t), KF.pkt_loss(f_s, f_t), L.PKTLoss()(f_s, f_t)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------------------------------------
# branches

def kernel_backends():
    """The kernel backends that run on CPU tensors here ("triton" under the interpreter)."""
    try:
        import fastkd.triton as fkt
    except ImportError:
        return []
    return ["triton"] if fkt.unavailable_reason(torch.device("cpu")) is None else []


BACKENDS = ["torch"] + kernel_backends()


def logits(*shape, seed):
    return 3 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def loss_and_grads(fn, *inputs):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    loss = fn(*leaves)
    return [loss.detach(), *torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_kd_loss_target_without_ce_weight_is_ignored(backend, reduction):
    s, t = logits(4, 9, seed=1), logits(4, 9, seed=2)
    y = torch.tensor([0, 8, 3, 3])
    got = loss_and_grads(lambda a, b: KF.kd_loss(a, b, 2.0, reduction=reduction, target=y, backend=backend), s, t)
    want = loss_and_grads(lambda a, b: KF.kd_loss(a, b, 2.0, reduction=reduction, backend=backend), s, t)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.skipif(not kernel_backends(), reason="no kernel backend runs on CPU tensors here")
@pytest.mark.parametrize("weights", [(25.0, 50.0), (1.0, 0.0)])
def test_rkd_loss_squared_through_the_kernels(weights):
    s, t = logits(7, 5, seed=3), logits(7, 4, seed=4)
    w_d, w_a = weights

    def fn(b):
        return lambda a, c: KF.rkd_loss(a, c, distance_weight=w_d, angle_weight=w_a, squared=True, eps=1e-9,
                                        backend=b)
    got, want = loss_and_grads(fn("triton"), s, t), loss_and_grads(fn("torch"), s, t)
    exact = loss_and_grads(fn("torch"), s.double(), t.double())
    assert got[2].abs().max() == 0  # the teacher is detached
    for g, w, e in zip(got[:2], want[:2], exact[:2]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-6)
    # squared distances are not plain distances: the branch changes the value
    plain = KF.rkd_loss(s, t, distance_weight=w_d, angle_weight=w_a, backend="triton")
    assert not torch.allclose(plain, got[0])


@pytest.mark.skipif(not kernel_backends(), reason="no kernel backend runs on CPU tensors here")
@pytest.mark.parametrize("name", ["kd_loss", "kl_div_loss", "jsd_loss", "dkd_loss"])
def test_float64_logits_through_a_kernel_backend_run_the_reference(name):
    s, t = logits(3, 7, seed=5).double(), logits(3, 7, seed=6).double()
    extra = (torch.tensor([0, 6, 2]),) if name == "dkd_loss" else ()
    got = getattr(KF, name)(s, t, *extra, backend="triton")
    assert got.dtype == torch.float64
    assert torch.equal(got, R.IMPLEMENTATIONS[name](s, t, *extra))


def test_kd_loss_mean_reduction_with_target_averages_ce_over_rows():
    """reduction="mean": the KL term per element (PyTorch's kl_div "mean"), the CE term per row."""
    s, t = logits(4, 9, seed=7).double(), logits(4, 9, seed=8).double()
    y = torch.tensor([1, 2, 3, 4])
    got = KF.kd_loss(s, t, 2.0, reduction="mean", target=y, ce_weight=0.5, kd_weight=2.0)
    with warnings.catch_warnings():  # PyTorch's note that "mean" is not "batchmean"
        warnings.simplefilter("ignore", UserWarning)
        kl = F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t / 2, -1), reduction="mean")
    want = 2.0 * 4.0 * kl + 0.5 * F.cross_entropy(s, y)
    torch.testing.assert_close(got, want)
