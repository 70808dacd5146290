"""sparse_kd_loss on the Triton backend (issue 14, the kernel: fastkd/triton/sparse.py, composed by
fastkd.kernel_losses): the value and the student's gradient against the reference, for the three tails, in
float32, bfloat16 and float16 (the tolerance rule: error against float64 at most twice PyTorch's in the same
dtype), on rows held in one block and on long rows streamed through the passes (`rows.MAX_BLOCK_V` set small);
the reference's behaviour on unusual rows (unused slots, a row with none used, duplicates, out-of-range ids:
a NaN row and no read outside the tensors), labels, reductions, num_items_in_batch, grad_output, strided rows,
hostile logits; what autograd keeps (the gradient, never the logits), torch.compile, and the traffic of the
kernel counted in Triton's interpreter. The operator's opcheck is in tests/test_kernel_ops.py; the dispatch
between backends (CUDA C++ has no kernel for this loss yet) there too.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (tests/conftest.py), so the shapes are small.
"""
from __future__ import annotations

import math

import pytest
import torch
from formulas import sparse_kd_tokens
from helpers import assert_matches_reference, compile_fullgraph, loss_and_grads, max_error
from precision import rounding_slack
from test_sparse_kd import TAILS, sampled_teacher, sparse_teacher, student, t_for

from fastkd import functional as KF
from fastkd import kernel_losses
from fastkd import reference as R

fkt = pytest.importorskip("fastkd.triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if fkt.unavailable_reason(torch.device(DEVICE)) is not None:
    pytest.skip(fkt.unavailable_reason(torch.device(DEVICE)), allow_module_level=True)
from fastkd.triton import rows as triton_rows  # noqa: E402

NEG_INF = float("-inf")
F64 = torch.float64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ONE_AND_LONG = pytest.mark.parametrize("long_rows", [False, True], ids=["one-block", "long"])
STUDENT_ONLY = [True, False]  # requires_grad: the student's logits, not the teacher's log-probabilities


@pytest.fixture
def paths(monkeypatch):
    """`paths(long_rows)`: rows of more than 16 logits through the streaming passes (blocks of 16), or not."""
    def set_path(long_rows):
        if long_rows:
            monkeypatch.setattr(triton_rows, "MAX_BLOCK_V", 16)
    return set_path


def on_device(*tensors):
    return [x.to(DEVICE) for x in tensors]


def inputs(rows, V, k, *, seed, dtype=torch.float32, unused=0, scale=3.0):
    """Student logits, ids, log-probabilities (the teacher's top-k, `unused` unused slots with junk ids) on DEVICE."""
    s = student(rows, V, seed=seed, dtype=dtype, scale=scale)
    _, ids, lp = sparse_teacher(rows, V, k, seed=seed + 1, dtype=dtype, unused=unused, scale=scale)
    return on_device(s, ids, lp)


def loss_fn(ids, labels=None, **options):
    """`fn(s, lp, backend)`: the public function with these slots and options."""
    return lambda s, lp, backend: KF.sparse_kd_loss(s, ids, lp, labels, backend=backend, **options)


def matches(fn, s, lp, grad_output=None, equal_nan=False):
    """Value and student gradient of the Triton backend against the reference's, by the dtype's tolerance (the
    loss float32; a gradient rounded once to a 16-bit dtype: an ulp of the largest entry)."""
    if s.dtype == torch.float32:
        tol = dict(rtol=1e-5, atol=1e-6)
    else:
        ulp = 2.0 ** -7 if s.dtype == torch.bfloat16 else 2.0 ** -10
        want = loss_and_grads(lambda a, b: fn(a, b, "torch"), s, lp, requires_grad=STUDENT_ONLY)[1]
        tol = dict(rtol=ulp, atol=ulp * want.float().abs().max().item())
    got = loss_and_grads(lambda a, b: fn(a, b, "triton"), s, lp, grad_output=grad_output, requires_grad=STUDENT_ONLY)
    want = loss_and_grads(lambda a, b: fn(a, b, "torch"), s, lp, grad_output=grad_output, requires_grad=STUDENT_ONLY)
    for g, w, what in zip(got, want, ("loss", "student grad")):
        assert g.dtype == w.dtype and g.shape == w.shape, what
        t = dict(rtol=1e-5, atol=1e-6) if what == "loss" else tol
        torch.testing.assert_close(g, w, equal_nan=equal_nan, **t, msg=lambda m: f"{what}: {m}")
    return got


def within_rule(tail, T, s, ids, lp, rel_slack=1e-6):
    """The tolerance rule (tests/test_adversarial.py's): loss and student gradient at most twice as far from the
    reference in float64 on the same values as PyTorch in the input dtype, plus `rel_slack` of the result's size
    and a gradient's one rounding to its dtype. PyTorch in the input dtype: the reference, which computes in
    float32, and for bfloat16 / float16 also the formula run in that dtype, the nearer of the two (the formula
    in float16 may lose the whole tail: a NaN measures nothing)."""
    fn = loss_fn(ids, tail=tail, temperature=T)
    got = loss_and_grads(lambda a, b: fn(a, b, "triton"), s, lp, requires_grad=STUDENT_ONLY)
    exact = loss_and_grads(lambda a, b: fn(a, b, "torch"), s.double(), lp.double(), requires_grad=STUDENT_ONLY)
    plains = [loss_and_grads(lambda a, b: fn(a, b, "torch"), s, lp, requires_grad=STUDENT_ONLY)]
    if s.dtype != torch.float32:
        plains.append(loss_and_grads(lambda a, b: sparse_kd_tokens(a, ids, b, tail, T).mean(), s, lp,
                                     requires_grad=STUDENT_ONLY))
    for i, (g, e) in enumerate(zip(got, exact)):
        assert torch.isfinite(g).all() or not torch.isfinite(e).all(), i
        plain_error = min(math.inf if math.isnan(err) else err for err in (max_error(p[i], e) for p in plains))
        scale = e.abs().max().item()
        slack = rel_slack * scale + (rounding_slack(s.dtype, DEVICE, scale) if i and s.dtype != torch.float32 else 0)
        assert max_error(g, e) <= 2 * plain_error + slack, (("loss", "grad")[i], max_error(g, e), plain_error)


# ----------------------------------------------------------------------------------------------------------
# against the reference

@ONE_AND_LONG
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("tail", TAILS)
def test_matches_the_reference(tail, dtype, long_rows, paths):
    """Rows of 37 (odd) with 6 slots, 2 unused (holding an id out of range, or one of the set), labels with an
    ignored token; also the tolerance rule against float64."""
    paths(long_rows)
    s, ids, lp = inputs((2, 3), 37, 6, seed=1, dtype=DTYPES[dtype], unused=2)
    labels = torch.tensor([[1, -100, 2], [0, 4, 4]], device=DEVICE)
    matches(loss_fn(ids, labels, tail=tail, temperature=t_for(tail)), s, lp)
    within_rule(tail, t_for(tail), s, ids, lp)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("tail", TAILS)
def test_reductions_labels_and_grad_output(tail, reduction):
    """grad_output 1, 0.5 and 0 of a reduced loss, a different one per token for reduction "none"."""
    s, ids, lp = inputs((2, 4), 29, 5, seed=3, unused=1)
    labels = torch.tensor([[1, -1, 2, 3], [-1, 0, 0, 5]], device=DEVICE)
    fn = loss_fn(ids, labels, tail=tail, temperature=t_for(tail), ignore_index=-1, reduction=reduction)
    if reduction == "none":
        outputs = [torch.linspace(-1.0, 2.0, 8, device=DEVICE).reshape(2, 4), torch.ones(2, 4, device=DEVICE)]
    else:
        outputs = [torch.tensor(x, device=DEVICE) for x in (1.0, 0.5, 0.0)]
    for grad_output in outputs:
        loss, grad = matches(fn, s, lp, grad_output=grad_output)
        assert not grad[0, 1].any() and not grad[1, 0].any()  # the ignored tokens


@pytest.mark.parametrize("n", [7, torch.tensor([7.0])], ids=["int", "tensor"])
@ONE_AND_LONG
def test_num_items_in_batch(n, long_rows, paths):
    paths(long_rows)
    s, ids, lp = inputs((2, 4), 23, 4, seed=5)
    labels = torch.tensor([[0, -100, 1, 1], [2, 2, -100, 3]], device=DEVICE)
    n = n.to(DEVICE) if isinstance(n, torch.Tensor) else n
    for tail in TAILS:
        matches(loss_fn(ids, labels, tail=tail, num_items_in_batch=n), s, lp)


@ONE_AND_LONG
@pytest.mark.parametrize("tail, T", [("renormalize", 0.5), ("renormalize", 2.0), ("bucket", 1.0), ("none", 1.0)])
def test_every_id_is_kl_div_loss(tail, T, long_rows, paths):
    """k = V, each id once in a shuffled order: the forward KL of the full logits, as the reference."""
    paths(long_rows)
    t, ids, lp = on_device(*sparse_teacher((3, 2), 21, 21, seed=7))
    s = student((3, 2), 21, seed=8).to(DEVICE)
    got = loss_and_grads(lambda a: KF.sparse_kd_loss(a, ids, lp, tail=tail, temperature=T, backend="triton"), s)
    want = loss_and_grads(lambda a: KF.kl_div_loss(a, t, T, backend="torch"), s)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("rows, V, k, unused", [
    ((4,), 1, 1, 0), ((5,), 13, 1, 0), ((3,), 7, 7, 0), ((3,), 6, 9, 3), ((2, 2, 2), 5, 2, 1), ((), 19, 4, 1),
    ((3,), 40, 40, 0)], ids=["V=1", "k=1", "k=V", "k>V", "4-d", "1-d", "k=V-long"])
def test_odd_shapes(tail, rows, V, k, unused, paths):
    paths(V > 16)
    s, ids, lp = inputs(rows, V, k, seed=9, unused=unused)
    matches(loss_fn(ids, tail=tail, temperature=t_for(tail)), s, lp)


@ONE_AND_LONG
@pytest.mark.parametrize("tail", TAILS)
def test_non_contiguous_rows(tail, long_rows, paths):
    """`logits[:, :-1]` (rows addressed by strides) and slot tensors whose last dimension is not contiguous; the
    gradient reaches the full tensor."""
    paths(long_rows)
    s = student((2, 5), 31, seed=11).to(DEVICE)
    _, ids, lp = on_device(*sparse_teacher((2, 4), 31, 5, seed=12, unused=1))
    ids_t, lp_t = ids.transpose(1, 2).contiguous().transpose(1, 2), lp.transpose(1, 2).contiguous().transpose(1, 2)
    fn = lambda a, b, backend: KF.sparse_kd_loss(a[:, :-1], ids_t, b, tail=tail, temperature=t_for(tail),  # noqa: E731
                                                 backend=backend)
    loss, grad = matches(fn, s, lp_t)
    assert not grad[:, -1].any()


@ONE_AND_LONG
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_sampled_teacher(T, long_rows, paths):
    """Random-sampling KD's cache (rows of different lengths: unused slots): as the reference."""
    paths(long_rows)
    g = torch.Generator().manual_seed(13)
    t, s = student((5,), 40, seed=14), student((5,), 40, seed=15)
    ids, lp, _ = sampled_teacher(t, 24, g)
    s, ids, lp = on_device(s, ids, lp)
    matches(loss_fn(ids, temperature=T), s, lp)


# ----------------------------------------------------------------------------------------------------------
# unusual rows: the reference's defined behaviour

@ONE_AND_LONG
@pytest.mark.parametrize("tail", TAILS)
def test_unused_slots_empty_rows_and_duplicates(tail, long_rows, paths):
    """Row 0: no used slot (ids that must not be read); row 1: an id in two slots (its mass split); row 2:
    unused slots interleaved; row 3: a used slot whose probability underflows to 0. As the reference: 0 with a
    zero gradient for the empty row; a term per slot, the merged row's gradient for the duplicate."""
    paths(long_rows)
    s, ids, lp = inputs((4,), 33, 6, seed=17, dtype=F64)
    ids[0] = torch.tensor([0, 33, -5, 3, 1000, 2], device=DEVICE)
    lp[0] = NEG_INF
    ids[1, 5] = ids[1, 0]
    lp[1, 0] = lp[1, 5] = lp[1, 0] - math.log(2.0)
    lp[2, 1::2] = NEG_INF
    ids[2, 1::2] = torch.tensor([33, -1, int(ids[2, 0])], device=DEVICE)
    lp[3, 2] = -200.0
    s, lp = s.float(), lp.float()
    loss, grad = matches(loss_fn(ids, tail=tail, temperature=t_for(tail), reduction="none"), s, lp)
    assert loss[0].item() == 0.0 and not grad[0].any()


@pytest.mark.parametrize("tail", TAILS)
def test_duplicates_across_slot_blocks(tail, paths):
    """70 slots (three blocks of the slot loops) over 50 ids, 20 of them twice, the copies in other blocks: each
    id's gradient sums the mass of all its slots (the duplicate tiles), as the reference."""
    paths(True)
    g = torch.Generator().manual_seed(37)
    ids = torch.cat([torch.randperm(50, generator=g), torch.randperm(50, generator=g)[:20]])
    lp = torch.log_softmax(torch.randn(70, generator=g, dtype=F64), -1) - math.log(1.5)
    s = student((2,), 50, seed=38)
    ids, lp = ids.expand(2, 70).contiguous(), lp.expand(2, 70).float().contiguous()
    s, ids, lp = on_device(s, ids, lp)
    matches(loss_fn(ids, tail=tail, temperature=t_for(tail), reduction="sum"), s, lp)


@ONE_AND_LONG
@pytest.mark.parametrize("tail", TAILS)
def test_minus_infinity_in_the_student(tail, long_rows, paths):
    """A masked vocabulary (-inf past column 30) and -inf at ids of the set: +inf where a slot with p > 0 meets
    q = 0, as the reference, with its (finite) gradient; bucket with every logit outside the set -inf."""
    paths(long_rows)
    s, ids, lp = inputs((3,), 36, 4, seed=19)
    s[:, 30:] = NEG_INF
    s[0, ids[0, 1]] = NEG_INF  # a slot's id with q = 0: +inf
    keep = torch.zeros(36, dtype=torch.bool, device=DEVICE)
    keep[ids[2]] = True
    s[2, ~keep] = NEG_INF  # bucket: q_tail = 0
    loss, grad = matches(loss_fn(ids, tail=tail, temperature=t_for(tail), reduction="none"), s, lp, equal_nan=True)
    assert loss[0].item() == math.inf and torch.isfinite(grad[0]).all()


@ONE_AND_LONG
@pytest.mark.parametrize("tail", TAILS)
def test_out_of_range_ids_give_a_nan_row_and_no_bad_read(tail, long_rows, paths):
    """Straight to the kernel loss (fastkd.functional refuses such ids on CPU tensors): a used id outside [0, V)
    makes its row's loss NaN and, as the reference's `where`, its gradient 0; the other rows are untouched, and
    the interpreter sees no access outside the tensors (tests/test_forward_grad.py's counter)."""
    paths(long_rows)
    s, ids, lp = inputs((4,), 27, 5, seed=21)
    ids[1, 2], ids[2, 0] = 27, -1
    got = loss_and_grads(lambda a: kernel_losses.sparse_kd_loss(
        fkt.KERNELS, a, ids, lp, None, tail=tail, temperature=t_for(tail), ignore_index=-100,
        num_items_in_batch=None, reduction="none"), s)
    want = loss_and_grads(lambda a: R.sparse_kd_loss(a, ids, lp, tail=tail, temperature=t_for(tail),
                                                     reduction="none"), s)
    assert torch.isnan(got[0][1:3]).all() and torch.isfinite(got[0][[0, 3]]).all()
    assert not got[1][1:3].any()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, equal_nan=True)
    if fkt.INTERPRET:
        from test_forward_grad import traffic
        with traffic() as counted:  # asserts every load and store falls inside an argument
            fkt.KERNELS.sparse_kd_rows(s, ids, lp, tail, t_for(tail), None, -100, None, True)
        assert counted.launches == ["sparse_kd_rows_kernel"]


# ----------------------------------------------------------------------------------------------------------
# hostile inputs, by the tolerance rule

def adversarial(case, V, k, dtype, seed):
    """(student, ids, log-probabilities) in `dtype`."""
    s, ids, lp = inputs((4,), V, k, seed=seed, dtype=F64)
    if case == "peaked_teacher":  # one slot holds all but 1e-6 of the mass
        lp[:, 1:] = math.log(1e-6 / (k - 1))
        lp[:, 0] = math.log1p(-1e-6)
    elif case == "offset_1e3":
        s = s + 1e3
    elif case == "huge_logits":
        s = 3e3 * torch.tanh(s)
    elif case == "set_holds_the_mass":  # the student's mass on the k ids: q_tail ~ e^-30, which 1 - sum q loses
        s[torch.arange(4)[:, None], ids] = 30.0
    elif case == "far_tail":  # every logit outside the set > 100 below: exp(a) underflows there
        s[:] = -150.0 + s
        s[torch.arange(4)[:, None], ids] = 0.0
    return s.to(dtype), ids, lp.to(dtype)


@ONE_AND_LONG
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", ["peaked_teacher", "offset_1e3", "huge_logits", "set_holds_the_mass", "far_tail"])
@pytest.mark.parametrize("tail", TAILS)
def test_adversarial(tail, case, dtype, long_rows, paths):
    if case == "offset_1e3" and dtype == "fp16":
        pytest.skip("1e3 + 3 randn in float16 is a handful of values a unit apart: nothing to measure")
    paths(long_rows)
    s, ids, lp = adversarial(case, 40, 6, DTYPES[dtype], seed=23)
    within_rule(tail, t_for(tail), s, ids, lp)


# ----------------------------------------------------------------------------------------------------------
# autograd, torch.compile, the teacher's gradient

def test_teacher_requiring_a_gradient_runs_the_reference():
    """The kernels make the student's gradient only: log-probabilities that require one get the reference, on
    the Triton backend too (the same values and both gradients, exactly)."""
    s, ids, lp = inputs((3,), 17, 4, seed=25)
    fn = loss_fn(ids, tail="bucket")
    got = loss_and_grads(lambda a, b: fn(a, b, "triton"), s, lp)
    want = loss_and_grads(lambda a, b: fn(a, b, "torch"), s, lp)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("tail", TAILS)
def test_only_the_gradient_is_saved(tail):
    s, ids, lp = inputs((4,), 33, 5, seed=27)
    s.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = KF.sparse_kd_loss(s, ids, lp, tail=tail, backend="triton")
    big = [x for x in saved if x.numel() >= s.numel()]
    assert len(big) == 1 and big[0].untyped_storage().data_ptr() != s.untyped_storage().data_ptr()
    loss.backward()
    torch.testing.assert_close(big[0], s.grad, rtol=0, atol=0)  # the buffer, scaled in place, is the gradient
    with pytest.raises(RuntimeError, match="once-differentiable"):
        loss = KF.sparse_kd_loss(s, ids, lp, tail=tail, backend="triton")
        loss.backward(retain_graph=True)
        loss.backward()


def test_no_gradient_writes_nothing_but_the_terms():
    s, ids, lp = inputs((4,), 33, 5, seed=29)
    with torch.no_grad():
        loss = KF.sparse_kd_loss(s.requires_grad_(), ids, lp, tail="bucket", backend="triton")
    assert not loss.requires_grad
    torch.testing.assert_close(loss, KF.sparse_kd_loss(s.detach(), ids, lp, tail="bucket", backend="torch"))


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_compiles_into_one_graph(tail):
    s, ids, lp = inputs((2, 4), 25, 5, seed=31, unused=1)
    labels = torch.tensor([[0, -100, 1, 2], [3, 3, -100, 0]], device=DEVICE)
    items = torch.tensor(5, device=DEVICE)
    eager = lambda a: KF.sparse_kd_loss(a, ids, lp, labels, tail=tail, temperature=t_for(tail),  # noqa: E731
                                        num_items_in_batch=items, backend="triton")
    eager(s)  # the backend's first use before tracing
    for grad_output in (1.0, 0.5):
        go = torch.tensor(grad_output, device=DEVICE)
        got = loss_and_grads(compile_fullgraph(eager), s, grad_output=go)
        want = loss_and_grads(eager, s, grad_output=go)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


def test_matches_the_reference_through_the_shared_helper():
    """helpers.assert_matches_reference (the other kernel tests' comparison), the teacher without a gradient."""
    s, ids, lp = inputs((3, 2), 19, 3, seed=33)
    assert_matches_reference(loss_fn(ids, tail="none"), s, lp, requires_grad=STUDENT_ONLY)


# ----------------------------------------------------------------------------------------------------------
# the traffic, counted in the interpreter

N, V, K = 6, 40, 5


@pytest.mark.skipif(not fkt.INTERPRET, reason="counts the loads and stores of Triton's interpreter")
@ONE_AND_LONG
@pytest.mark.parametrize("tail", TAILS)
def test_traffic(tail, long_rows, paths):
    """The student read once for a row in one block (three times streamed), its gradient written once, plus the k
    gathered logits and the k overwritten entries of the set; bucket reads its bitmap once per reducing pass
    (a word per lane). The backward at grad_output 1 moves nothing N x V."""
    from test_forward_grad import traffic
    paths(long_rows)
    s, ids, lp = inputs((N,), V, K, seed=35, unused=1)
    readable = N * (K - 1)
    s.requires_grad_()
    with traffic() as forward:
        loss = KF.sparse_kd_loss(s, ids, lp, tail=tail, backend="triton")
    with traffic() as backward:
        loss.backward()
    k = "sparse_kd_rows_kernel"
    assert forward.launches == [k]
    reads = 3 if long_rows else 1
    assert forward[k, "s_ptr", "load"] == reads * N * V + readable
    assert forward[k, "ds_ptr", "store"] == N * V + readable
    assert forward[k, "ds_ptr", "load"] == 0
    assert forward[k, "bits_ptr", "load"] == ((2 if long_rows else 1) * N * V if tail == "bucket" else 0)
    assert backward.launches == ["scale_rows_kernel"]
    assert backward.total("scale_rows_kernel", "load") == N and backward.total("scale_rows_kernel", "store") == 0
    with torch.no_grad(), traffic() as inference:
        KF.sparse_kd_loss(s, ids, lp, tail=tail, backend="triton")
    assert inference[k, "ds_ptr", "store"] == 0
    assert inference[k, "s_ptr", "load"] == (2 if long_rows else 1) * N * V + readable
