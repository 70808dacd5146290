"""sparse_kd_loss and SparseKDLoss (issue 14, the reference and the public API): KD against a teacher stored as k
ids and their log-probabilities per token, with the tails "renormalize", "bucket" and "none".

The yardstick is `formulas.sparse_kd_tokens`, the definition written out slot by slot, in float64 on the same
values; in bfloat16 the reference's error is held to twice that of the same formula run in bfloat16. The
behaviour the reference's docstring defines on unusual rows (unused slots, duplicate ids, ids out of range,
rows with no used slot, a teacher whose top-k holds almost all the mass) is checked here as documented.
The kernels are checked in tests/test_sparse_kd_kernels.py; here, backends whose kernel set lacks the operator:
"auto" runs the reference, and such a backend named says it has no kernel.
The float64 gradcheck of the reference is in tests/test_gradcheck.py.
"""
import math
import types

import pytest
import torch
from formulas import sparse_kd_tokens
from helpers import compile_fullgraph, loss_and_grads, max_error
from precision import rounding_slack

import fastkd
from fastkd import _dispatch
from fastkd import functional as KF
from fastkd import losses as L
from fastkd import reference as R

TAILS = ("renormalize", "bucket", "none")
NEG_INF = float("-inf")
F64 = torch.float64
EXACT = dict(rtol=1e-12, atol=1e-14)  # float64 against float64


def student(rows_shape, V, *, seed, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*rows_shape, V, generator=g, dtype=F64)).to(dtype)


def sparse_teacher(rows_shape, V, k, *, seed, dtype=torch.float32, unused=0, scale=3.0):
    """A teacher cache's rows: teacher logits `(..., V)`, the ids of their `k - unused` most probable ids in a
    shuffled slot order, then `unused` unused slots (log-probability -inf) holding ids that must never be read
    (out of range, or a used id again); and the log-probabilities (over all V) in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    t = scale * torch.randn(*rows_shape, V, generator=g, dtype=F64)
    top = torch.log_softmax(t, -1).topk(k - unused, -1)
    order = torch.argsort(torch.rand(*rows_shape, k - unused, generator=g), -1)
    ids, lp = top.indices.gather(-1, order), top.values.gather(-1, order)
    if unused:
        junk = torch.tensor([V + 3, -1, 0])[torch.arange(unused) % 3].expand(*rows_shape, unused).clone()
        junk[..., 2::3] = ids[..., :1]  # an unused slot naming an id that is in the set
        ids = torch.cat([ids, junk], -1)
        lp = torch.cat([lp, torch.full((*rows_shape, unused), NEG_INF, dtype=F64)], -1)
    return t.to(dtype), ids, lp.to(dtype)


def tokens_mean(tail, T=1.0):
    """The formula's loss: the mean over tokens, as "batchmean" without labels."""
    return lambda s, ids, lp: sparse_kd_tokens(s, ids, lp, tail, T).mean()


def t_for(tail):
    return 2.0 if tail == "renormalize" else 1.0


# ----------------------------------------------------------------------------------------------------------
# against the definition

@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("rows, V, k, unused", [((6,), 37, 5, 2), ((2, 3), 100, 8, 3)])
def test_value_and_gradients_match_the_formula(tail, rows, V, k, unused):
    T = t_for(tail)
    s = student(rows, V, seed=1)
    _, ids, lp = sparse_teacher(rows, V, k, seed=2, unused=unused)
    got = loss_and_grads(lambda a, b: KF.sparse_kd_loss(a, ids, b, tail=tail, temperature=T), s, lp)
    want = loss_and_grads(lambda a, b: tokens_mean(tail, T)(a, ids, b), s.double(), lp.double())
    assert [x.dtype for x in got] == [torch.float32] * 3
    for g, w, what in zip(got, want, ("loss", "student grad", "teacher grad")):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("tail", TAILS)
def test_float64_is_the_formula(tail):
    s = student((4,), 29, seed=3, dtype=F64)
    _, ids, lp = sparse_teacher((4,), 29, 7, seed=4, dtype=F64, unused=2)
    got = loss_and_grads(lambda a, b: KF.sparse_kd_loss(a, ids, b, tail=tail, temperature=t_for(tail)), s, lp)
    want = loss_and_grads(lambda a, b: tokens_mean(tail, t_for(tail))(a, ids, b), s, lp)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **EXACT)


@pytest.mark.parametrize("tail", TAILS)
def test_bfloat16_error_within_twice_pytorch(tail):
    """bfloat16 student and teacher: the loss (float32) and both gradients (bfloat16) at most twice as far from
    float64 as the formula computed in bfloat16 end to end, plus a gradient's one rounding to bfloat16."""
    T = t_for(tail)
    s = student((8,), 300, seed=5, dtype=torch.bfloat16)
    _, ids, lp = sparse_teacher((8,), 300, 20, seed=6, dtype=torch.bfloat16, unused=3)
    formula = tokens_mean(tail, T)
    got = loss_and_grads(lambda a, b: KF.sparse_kd_loss(a, ids, b, tail=tail, temperature=T), s, lp)
    plain = loss_and_grads(lambda a, b: formula(a, ids, b), s, lp)
    exact = loss_and_grads(lambda a, b: formula(a, ids, b), s.double(), lp.double())
    assert [x.dtype for x in got] == [torch.float32, torch.bfloat16, torch.bfloat16]
    for i, (g, p, e) in enumerate(zip(got, plain, exact)):
        scale = e.abs().max().item()
        slack = 1e-6 * scale + (rounding_slack(torch.bfloat16, "cpu", scale) if i else 0.0)
        assert max_error(g, e) <= 2 * max_error(p, e) + slack, (i, max_error(g, e), max_error(p, e))


@pytest.mark.parametrize("s_dtype, t_dtype", [(torch.bfloat16, torch.float32), (torch.float32, F64),
                                              (torch.float16, torch.bfloat16)])
def test_mixed_dtypes_compute_in_the_wider_and_at_least_float32(s_dtype, t_dtype):
    s = student((3,), 17, seed=7, dtype=s_dtype)
    _, ids, lp = sparse_teacher((3,), 17, 4, seed=8, dtype=t_dtype)
    common = torch.promote_types(torch.promote_types(s_dtype, t_dtype), torch.float32)
    for tail in TAILS:
        loss, gs, gt = loss_and_grads(lambda a, b: KF.sparse_kd_loss(a, ids, b, tail=tail), s, lp)
        assert loss.dtype == common and gs.dtype == s_dtype and gt.dtype == t_dtype
        want = loss_and_grads(lambda a, b: KF.sparse_kd_loss(a, ids, b, tail=tail), s.to(common), lp.to(common))
        torch.testing.assert_close(loss, want[0])
        torch.testing.assert_close(gs, want[1].to(s_dtype))


# ----------------------------------------------------------------------------------------------------------
# what the sparse teacher is: the full KL when every id is there, the KL to the sampled distribution

@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("tail, T", [("renormalize", 0.5), ("renormalize", 1.0), ("renormalize", 2.5),
                                     ("renormalize", 4.0), ("bucket", 1.0), ("none", 1.0)])
def test_every_id_is_kl_div_loss(dtype, tail, T):
    """k = V (each id once, in a shuffled order): the forward KL of the full logits, `kl_div_loss`."""
    t, ids, lp = sparse_teacher((3, 4), 23, 23, seed=9, dtype=dtype)
    s = student((3, 4), 23, seed=10, dtype=dtype)
    got = loss_and_grads(lambda a: KF.sparse_kd_loss(a, ids, lp, tail=tail, temperature=T), s)
    want = loss_and_grads(lambda a: KF.kl_div_loss(a, t, T), s)
    tol = EXACT if dtype == F64 else dict(rtol=2e-6, atol=1e-7)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


def sampled_teacher(t, n, generator):
    """Random-sampling KD's cache: n ids drawn from softmax(t) per row, each distinct id once with
    log(count / n), padded with unused slots to the longest row; and the dense `log(count / n)` (-inf unsampled)."""
    draws = torch.multinomial(torch.softmax(t, -1), n, replacement=True, generator=generator)
    counts = torch.zeros_like(t).scatter_add_(-1, draws, torch.ones_like(draws, dtype=t.dtype))
    k = int((counts > 0).sum(-1).max())
    ids = counts.argsort(-1, descending=True)[..., :k]
    c = counts.gather(-1, ids)
    lp = torch.where(c > 0, (c / n).log(), NEG_INF)
    return ids, lp, torch.where(counts > 0, (counts / n).log(), NEG_INF)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_sampled_teacher_is_the_kl_to_the_empirical_distribution(T):
    g = torch.Generator().manual_seed(11)
    t, s = student((5,), 40, seed=12, dtype=F64), student((5,), 40, seed=13, dtype=F64)
    ids, lp, dense = sampled_teacher(t, 64, g)
    assert (lp == NEG_INF).any()  # rows of different lengths: unused slots
    got = loss_and_grads(lambda a: KF.sparse_kd_loss(a, ids, lp, temperature=T), s)
    want = loss_and_grads(lambda a: KF.kl_div_loss(a, dense, T), s)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **EXACT)


def test_sampled_teacher_gradient_is_unbiased():
    """At T = 1 the student's gradient `q - p_hat` has expectation `q - p`, the full KL's: averaged over 4000
    rows of 16 draws each (standard error at most 0.002)."""
    g = torch.Generator().manual_seed(14)
    t, z = student((1,), 12, seed=15, dtype=F64), student((1,), 12, seed=16, dtype=F64)
    rows = 4000
    ids, lp, _ = sampled_teacher(t.expand(rows, 12).contiguous(), 16, g)
    _, grad = loss_and_grads(lambda a: KF.sparse_kd_loss(a, ids, lp, reduction="sum"), z.expand(rows, 12).contiguous())
    full = torch.softmax(z, -1) - torch.softmax(t, -1)
    assert (grad.mean(0) - full[0]).abs().max() < 0.01


# ----------------------------------------------------------------------------------------------------------
# defined behaviour on unusual rows

@pytest.mark.parametrize("tail", TAILS)
def test_unused_slots_are_not_among_the_ids(tail):
    """Slots with a log-probability of -inf change nothing, whatever id they hold (out of range, or an id of the
    set again), and wherever they are among the slots."""
    s = student((2, 3), 19, seed=17, dtype=F64)
    _, ids, lp = sparse_teacher((2, 3), 19, 5, seed=18, dtype=F64)
    _, padded_ids, padded_lp = sparse_teacher((2, 3), 19, 9, seed=18, dtype=F64, unused=4)
    assert torch.equal(padded_ids[..., :5], ids) and (padded_ids[..., 5:] >= 19).any()
    order = torch.tensor([5, 0, 6, 1, 2, 7, 3, 8, 4])
    fn = lambda i, p: lambda a: KF.sparse_kd_loss(a, i, p, tail=tail, reduction="none")  # noqa: E731
    got = loss_and_grads(fn(padded_ids[..., order], padded_lp[..., order]), s)
    want = loss_and_grads(fn(ids, lp), s)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **EXACT)


@pytest.mark.parametrize("tail", TAILS)
def test_a_row_with_no_used_slot_gives_zero_and_still_counts(tail):
    s = student((3, 4), 19, seed=19, dtype=F64)
    _, ids, lp = sparse_teacher((3, 4), 19, 4, seed=20, dtype=F64)
    lp[1, 2] = NEG_INF
    ids[1, 2] = torch.tensor([0, 19, -5, 3])  # never read
    per_token, gs, gt = loss_and_grads(lambda a, b: KF.sparse_kd_loss(a, ids, b, tail=tail, reduction="none"), s, lp)
    assert per_token[1, 2].item() == 0.0
    assert torch.equal(gs[1, 2], torch.zeros(19, dtype=F64)) and torch.equal(gt[1, 2], torch.zeros(4, dtype=F64))
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
    torch.testing.assert_close(per_token, sparse_kd_tokens(s, ids, lp, tail), **EXACT)
    # "batchmean" counts the token (the labels decide what counts)
    torch.testing.assert_close(KF.sparse_kd_loss(s, ids, lp, tail=tail), per_token.sum() / 12, **EXACT)
    # every row empty: 0, with a zero gradient
    loss, gs, gt = loss_and_grads(lambda a, b: KF.sparse_kd_loss(a, ids, b, tail=tail), s, torch.full_like(lp, NEG_INF))
    assert loss.item() == 0.0 and not gs.any() and not gt.any()


@pytest.mark.parametrize("tail", TAILS)
def test_duplicate_ids_are_a_term_per_slot_with_the_merged_rows_gradient(tail):
    """Id i_0's mass split over two slots: each slot is its own term (the formula's definition), the tail is the
    complement of the set; the student's gradient is the merged row's and the value differs from it by
    -p_0 log 2 (p_0: the merged slot's p)."""
    s = student((4,), 15, seed=21, dtype=F64)
    _, ids, lp = sparse_teacher((4,), 15, 5, seed=22, dtype=F64)
    split = lp[:, :1] - math.log(2.0)
    dup_ids, dup_lp = torch.cat([ids, ids[:, :1]], -1), torch.cat([split, lp[:, 1:], split], -1)
    run = lambda i, p: loss_and_grads(  # noqa: E731
        lambda a: KF.sparse_kd_loss(a, i, p, tail=tail, reduction="none"), s)
    (dup, dup_grad), (merged, merged_grad) = run(dup_ids, dup_lp), run(ids, lp)
    torch.testing.assert_close(dup, sparse_kd_tokens(s, dup_ids, dup_lp, tail), **EXACT)
    torch.testing.assert_close(dup_grad, merged_grad, **EXACT)
    p0 = lp[:, 0].exp() / (lp.exp().sum(-1) if tail == "renormalize" else 1.0)
    torch.testing.assert_close(dup - merged, -p0 * math.log(2.0), **EXACT)
    if tail == "renormalize":  # tempered per slot, 2 a^(1/T), not (2 a)^(1/T): merge duplicates
        _, tempered = loss_and_grads(lambda a: KF.sparse_kd_loss(a, dup_ids, dup_lp, temperature=2.0), s)
        _, tempered_merged = loss_and_grads(lambda a: KF.sparse_kd_loss(a, ids, lp, temperature=2.0), s)
        assert not torch.allclose(tempered, tempered_merged)


@pytest.mark.parametrize("bad", [-1, 19, 1000])
def test_out_of_range_ids_raise_on_cpu(bad):
    s = student((3,), 19, seed=23)
    _, ids, lp = sparse_teacher((3,), 19, 4, seed=24)
    ids[2, 1] = bad
    with pytest.raises(ValueError, match=r"teacher_indices holds ids outside \[0, 19\) in used slots"):
        KF.sparse_kd_loss(s, ids, lp)
    lp[2, 1] = NEG_INF  # the same id in an unused slot is never read
    assert torch.isfinite(KF.sparse_kd_loss(s, ids, lp))


@pytest.mark.parametrize("tail", TAILS)
def test_out_of_range_ids_make_their_row_nan_without_a_check(tail):
    """What CUDA tensors get, where the ids are not read on the host: the reference itself clamps the gather and
    gives that row NaN, the others their values; the student's gradient stays finite (0 on the NaN row)."""
    s = student((4,), 19, seed=25, dtype=F64)
    _, ids, lp = sparse_teacher((4,), 19, 4, seed=26, dtype=F64)
    bad = ids.clone()
    bad[2, 1], bad[3, 0] = 19, -3
    per_token, gs = loss_and_grads(lambda a: R.sparse_kd_loss(a, bad, lp, tail=tail, reduction="none"), s)
    assert per_token[2:].isnan().all()
    torch.testing.assert_close(per_token[:2], sparse_kd_tokens(s[:2], ids[:2], lp[:2], tail), **EXACT)
    assert torch.isfinite(gs).all() and not gs[2:].any()
    # compiled, the CPU check is skipped (it would read the ids): the row's NaN is what comes out
    compiled = compile_fullgraph(lambda a, i, p: KF.sparse_kd_loss(a, i, p, tail=tail, reduction="none"))
    out = compiled(s, bad, lp)
    assert out[2:].isnan().all() and torch.isfinite(out[:2]).all()


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_and_inf_inputs_never_give_a_finite_loss(tail, bad):
    for which in ("student", "teacher"):
        s = student((3,), 20, seed=45)
        _, ids, lp = sparse_teacher((3,), 20, 4, seed=46)
        if which == "student":
            s[1, ids[1, 2]] = bad
        else:
            lp[1, 2] = bad
        assert not torch.isfinite(KF.sparse_kd_loss(s, ids, lp, tail=tail)), which


def test_bucket_tails_are_taken_without_cancellation():
    """The top-5 holds all but 1e-6 of the teacher's mass and the student puts about 1e-12 outside them: in
    float32, `1 - sum q_k` is 0 (log: -inf, an infinite loss); the reference's log-space tails match float64.
    The teacher's gradient `p_k (l_k - log q_k - log p_tail + log q_tail)` is the exception: `log p_tail`
    moves by `-p_k / p_tail` (4e5) per unit of l_k, so float32's rounding of `sum p_k` alone (6e-8) moves it by
    a few percent, in any float32 arithmetic; it is held to 1% of its size."""
    V = 50
    p = torch.tensor([0.4, 0.3, 0.2, 0.1 - 1e-6 - 0.05, 0.05], dtype=F64)
    ids = torch.tensor([[3, 17, 0, 41, 8]])
    lp = p.log()[None]
    z = torch.zeros(1, V, dtype=F64)
    z[0, ids[0]] = 30.0
    q = torch.softmax(z.float(), -1)
    assert (1 - q[0, ids[0]].sum()).item() <= 0.0  # the naive student tail in float32
    got = loss_and_grads(lambda a, b: KF.sparse_kd_loss(a, ids, b, tail="bucket"), z.float(), lp.float())
    want = loss_and_grads(lambda a, b: KF.sparse_kd_loss(a, ids, b, tail="bucket"), z, lp.float().double())
    formula = loss_and_grads(lambda a, b: tokens_mean("bucket")(a, ids, b), z, lp.float().double())
    for g, w, f, rtol in zip(got, want, formula, (1e-5, 1e-5, 1e-2)):
        torch.testing.assert_close(w, f, rtol=1e-9, atol=1e-15)
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), w, rtol=rtol, atol=rtol * w.abs().max().item())


def test_bucket_tail_edges():
    z = student((3,), 6, seed=27, dtype=F64)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]])
    # a teacher whose slots sum past 1 (rounding, or duplicates written in full): p_tail is 0, bucket is none
    over = torch.tensor([[0.6, 0.5], [0.7, 0.3 + 1e-9], [0.99, 0.02]], dtype=F64).log()
    torch.testing.assert_close(KF.sparse_kd_loss(z, ids, over, tail="bucket", reduction="none"),
                               KF.sparse_kd_loss(z, ids, over, tail="none", reduction="none"), **EXACT)
    # the student's logits -inf on every id outside the set: q_tail = 0, an infinite loss where p_tail > 0 and
    # a finite one (with a finite gradient) where p_tail = 0
    masked = z.clone()
    masked[:, 2:] = NEG_INF
    under = torch.tensor([[0.5, 0.3], [0.5, 0.3], [0.5, 0.3]], dtype=F64).log()
    assert KF.sparse_kd_loss(masked[:1], ids[:1], under[:1], tail="bucket").item() == math.inf
    loss, grad = loss_and_grads(lambda a: KF.sparse_kd_loss(a, ids[:1], over[:1], tail="bucket"), masked[:1])
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


# ----------------------------------------------------------------------------------------------------------
# labels, reductions, num_items_in_batch

def kept_tokens(tail, s, ids, lp, labels, ignore_index):
    tokens = sparse_kd_tokens(s, ids, lp, tail)
    keep = labels != ignore_index
    return torch.where(keep, tokens, 0.0), keep.sum()


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_labels_and_reductions(tail, reduction):
    V = 29
    s = student((2, 5), V, seed=28, dtype=F64)
    _, ids, lp = sparse_teacher((2, 5), V, 6, seed=29, dtype=F64, unused=1)
    labels = torch.tensor([[1, -1, 2, 3, -1], [-1, 0, 0, 5, 9]])
    weights = torch.linspace(0.5, 1.5, 10, dtype=F64).reshape(2, 5) if reduction == "none" else None

    def want_fn(a):
        kept, count = kept_tokens(tail, a, ids, lp, labels, -1)
        return {"batchmean": kept.sum() / count, "sum": kept.sum(), "mean": kept.sum() / (count * V),
                "none": kept}[reduction]
    got = loss_and_grads(lambda a: KF.sparse_kd_loss(a, ids, lp, labels, tail=tail, ignore_index=-1,
                                                     reduction=reduction), s, grad_output=weights)
    want = loss_and_grads(want_fn, s, grad_output=weights)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **EXACT)


def test_every_token_ignored_gives_zero_and_zero_gradients():
    s = student((3,), 11, seed=30, dtype=F64)
    _, ids, lp = sparse_teacher((3,), 11, 3, seed=31, dtype=F64)
    for tail in TAILS:
        loss, grad = loss_and_grads(lambda a: KF.sparse_kd_loss(a, ids, lp, torch.full((3,), -100), tail=tail), s)
        assert loss.item() == 0.0 and not grad.any()


@pytest.mark.parametrize("n", [7, 7.0, torch.tensor(7), torch.tensor([7.0])], ids=["int", "float", "0d", "1-elem"])
def test_num_items_in_batch_divides_the_sum(n):
    s = student((2, 4), 13, seed=32, dtype=F64)
    _, ids, lp = sparse_teacher((2, 4), 13, 3, seed=33, dtype=F64)
    labels = torch.tensor([[0, -100, 1, 1], [2, 2, -100, 3]])
    for tail in TAILS:
        got = loss_and_grads(lambda a: KF.sparse_kd_loss(a, ids, lp, labels, tail=tail, num_items_in_batch=n), s)
        want = loss_and_grads(lambda a: kept_tokens(tail, a, ids, lp, labels, -100)[0].sum() / 7, s)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **EXACT)
    module = L.SparseKDLoss("bucket")
    torch.testing.assert_close(module(s, ids, lp, labels, num_items_in_batch=n),
                               KF.sparse_kd_loss(s, ids, lp, labels, tail="bucket", num_items_in_batch=n), **EXACT)


# ----------------------------------------------------------------------------------------------------------
# shapes and layouts

@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("rows, V, k, unused", [
    ((1,), 9, 3, 0), ((4,), 1, 1, 0), ((5,), 13, 1, 0), ((3,), 7, 7, 0), ((2, 3), 37, 5, 1), ((3,), 6, 9, 3),
    ((2, 2, 2), 5, 2, 1)], ids=["one-row", "V=1", "k=1", "k=V", "odd", "k>V", "4-d"])
def test_odd_shapes_match_the_formula(tail, rows, V, k, unused):
    s = student(rows, V, seed=34, dtype=F64)
    _, ids, lp = sparse_teacher(rows, V, k, seed=35, dtype=F64, unused=unused)
    got = loss_and_grads(lambda a, b: KF.sparse_kd_loss(a, ids, b, tail=tail, temperature=t_for(tail)), s, lp)
    want = loss_and_grads(lambda a, b: tokens_mean(tail, t_for(tail))(a, ids, b), s, lp)
    assert got[0].shape == ()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **EXACT)


@pytest.mark.parametrize("tail", TAILS)
def test_non_contiguous_inputs(tail):
    """`logits[:, :-1]` (rows addressed by strides) and slot tensors whose last dimension is not contiguous."""
    s = student((2, 7), 31, seed=36)[:, :-1]
    _, ids, lp = sparse_teacher((2, 6), 31, 5, seed=37, unused=1)
    ids_t, lp_t = ids.transpose(1, 2).contiguous().transpose(1, 2), lp.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (s.is_contiguous() or ids_t.is_contiguous() or lp_t.is_contiguous())
    fn = lambda i: lambda a, b: KF.sparse_kd_loss(a, i, b, tail=tail, temperature=t_for(tail))  # noqa: E731
    got = loss_and_grads(fn(ids_t), s, lp_t)
    want = loss_and_grads(fn(ids), s.contiguous(), lp)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_any_integer_index_dtype(dtype):
    s = student((3,), 20, seed=38)
    _, ids, lp = sparse_teacher((3,), 20, 4, seed=39)
    torch.testing.assert_close(KF.sparse_kd_loss(s, ids.to(dtype), lp, tail="bucket"),
                               KF.sparse_kd_loss(s, ids, lp, tail="bucket"), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# validation

S = student((4,), 5, seed=40)
IDS = torch.tensor([[0, 1], [2, 3], [4, 0], [1, 2]])
LP = torch.tensor([[0.5, 0.25]] * 4).log()
TENSOR_T_MSG = "a tensor .*temperature is not supported by sparse_kd_loss yet"
ERRORS = {
    "int-student": (TypeError, "student_logits must be a floating-point", lambda: KF.sparse_kd_loss(S.long(), IDS, LP)),
    "list-student": (TypeError, "student_logits must be a torch.Tensor",
                     lambda: KF.sparse_kd_loss(S.tolist(), IDS, LP)),
    "float-ids": (TypeError, "teacher_indices must be an integer tensor", lambda: KF.sparse_kd_loss(S, LP, LP)),
    "list-ids": (TypeError, "teacher_indices must be a torch.Tensor", lambda: KF.sparse_kd_loss(S, IDS.tolist(), LP)),
    "int-logprobs": (TypeError, "teacher_logprobs must be a floating-point",
                     lambda: KF.sparse_kd_loss(S, IDS, IDS)),
    "slot-mismatch": (ValueError, r"teacher_indices and teacher_logprobs must have the same shape .* \(4, 2\) and "
                      r"\(4, 3\)", lambda: KF.sparse_kd_loss(S, IDS, torch.zeros(4, 3))),
    "rows-mismatch": (ValueError, r"must have shape \(4,\) \+ \(k,\)",
                      lambda: KF.sparse_kd_loss(S, IDS[:3], LP[:3])),
    "dims-mismatch": (ValueError, r"must have shape \(4,\) \+ \(k,\)",
                      lambda: KF.sparse_kd_loss(S, IDS[:, None], LP[:, None])),
    "0d-student": (ValueError, "class dimension", lambda: KF.sparse_kd_loss(torch.tensor(1.0), IDS, LP)),
    "k=0": (ValueError, r"at least one slot per row \(k >= 1\)",
            lambda: KF.sparse_kd_loss(S, IDS[:, :0], LP[:, :0])),
    "V=0": (ValueError, "student_logits must have at least one class", lambda: KF.sparse_kd_loss(S[:, :0], IDS, LP)),
    "empty-batch": (ValueError, r"the batch is empty: student_logits has shape \(0, 5\)",
                    lambda: KF.sparse_kd_loss(S[:0], IDS[:0], LP[:0])),
    "meta-logprobs": (ValueError, "same device.*teacher_logprobs on meta",
                      lambda: KF.sparse_kd_loss(S, IDS, LP.to("meta"))),
    "tail": (ValueError, r"tail must be one of \('renormalize', 'bucket', 'none'\)",
             lambda: KF.sparse_kd_loss(S, IDS, LP, tail="top")),
    "bucket-T": (ValueError, "tail='bucket' needs temperature=1, got 2.0: .*tail='renormalize'",
                 lambda: KF.sparse_kd_loss(S, IDS, LP, tail="bucket", temperature=2.0)),
    "none-T": (ValueError, "tail='none' needs temperature=1", lambda: KF.sparse_kd_loss(S, IDS, LP, tail="none",
                                                                                      temperature=0.5)),
    "T=0": (ValueError, "temperature must be positive", lambda: KF.sparse_kd_loss(S, IDS, LP, temperature=0)),
    "T=nan": (ValueError, "temperature must be positive", lambda: KF.sparse_kd_loss(S, IDS, LP, temperature=math.nan)),
    "T=True": (TypeError, "temperature must be a positive Python number",
               lambda: KF.sparse_kd_loss(S, IDS, LP, temperature=True)),
    "T-tensor": (TypeError, TENSOR_T_MSG, lambda: KF.sparse_kd_loss(S, IDS, LP, temperature=torch.tensor(2.0))),
    "reduction": (ValueError, "reduction must be one of", lambda: KF.sparse_kd_loss(S, IDS, LP, reduction="avg")),
    "ignore_index": (TypeError, "ignore_index must be an int",
                     lambda: KF.sparse_kd_loss(S, IDS, LP, ignore_index=-100.0)),
    "labels-shape": (ValueError, r"labels must have shape \(4,\)",
                     lambda: KF.sparse_kd_loss(S, IDS, LP, torch.tensor([0, 1]))),
    "float-labels": (TypeError, "labels must be an integer tensor",
                     lambda: KF.sparse_kd_loss(S, IDS, LP, torch.zeros(4))),
    "num_items=0": (ValueError, "num_items_in_batch must be a positive number",
                    lambda: KF.sparse_kd_loss(S, IDS, LP, num_items_in_batch=0)),
    "num_items=True": (ValueError, "num_items_in_batch must be a positive number",
                       lambda: KF.sparse_kd_loss(S, IDS, LP, num_items_in_batch=True)),
    "num_items-shape": (ValueError, "num_items_in_batch must be a number or a tensor of one element",
                        lambda: KF.sparse_kd_loss(S, IDS, LP, num_items_in_batch=torch.ones(2))),
    "num_items-sum": (ValueError, "num_items_in_batch replaces the token count of reduction='batchmean'",
                      lambda: KF.sparse_kd_loss(S, IDS, LP, num_items_in_batch=8, reduction="sum")),
    "backend": (ValueError, "backend must be 'auto' or one of", lambda: KF.sparse_kd_loss(S, IDS, LP, backend="x")),
    "module-tail": (ValueError, "tail must be one of", lambda: L.SparseKDLoss("top")),
    "module-bucket-T": (ValueError, "tail='bucket' needs temperature=1", lambda: L.SparseKDLoss("bucket",
                                                                                            temperature=4.0)),
    "module-T-tensor": (TypeError, TENSOR_T_MSG, lambda: L.SparseKDLoss(temperature=torch.tensor(2.0))),
    "module-reduction": (ValueError, "reduction must be one of", lambda: L.SparseKDLoss(reduction="avg")),
    "module-ignore_index": (TypeError, "ignore_index must be an int", lambda: L.SparseKDLoss(ignore_index=None)),
    "module-backend": (ValueError, "backend must be", lambda: L.SparseKDLoss(backend="nope")),
    "module-forward": (ValueError, "teacher_indices holds ids outside",
                       lambda: L.SparseKDLoss()(S, IDS + 1, LP)),
}


@pytest.mark.parametrize("exc, match, fn", list(ERRORS.values()), ids=list(ERRORS))
def test_validation_errors(exc, match, fn):
    with pytest.raises(exc, match=match):
        fn()


# ----------------------------------------------------------------------------------------------------------
# the module, backends, torch.compile

@pytest.mark.parametrize("tail", TAILS)
def test_module_is_the_functional(tail):
    s = student((2, 3), 21, seed=41, dtype=F64)
    _, ids, lp = sparse_teacher((2, 3), 21, 4, seed=42, dtype=F64, unused=1)
    labels = torch.tensor([[0, -100, 1], [1, 1, 1]])
    T = t_for(tail)
    module = L.SparseKDLoss(tail, temperature=T, reduction="sum")
    got = loss_and_grads(lambda a, b: module(a, ids, b, labels), s, lp)
    want = loss_and_grads(lambda a, b: KF.sparse_kd_loss(a, ids, b, labels, tail=tail, temperature=T,
                                                         reduction="sum"), s, lp)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert f"tail={tail!r}" in repr(module) and not list(module.parameters())


@pytest.fixture
def kernel_backends_everywhere(monkeypatch):
    """Triton and CUDA C++ backends that can run anywhere, without the operator (their kernels never called)."""
    for name in ("triton", "cuda"):
        module = types.SimpleNamespace(unavailable_reason=lambda device, build=False: None, KERNELS=None)
        monkeypatch.setitem(_dispatch._modules, name, module)


def test_auto_runs_the_reference_also_on_cuda_tensors(kernel_backends_everywhere, monkeypatch):
    cuda = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)  # no GPU needed to resolve
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    assert _dispatch.resolve("sparse_kd_loss", "auto", cuda, cuda) is R.sparse_kd_loss
    assert _dispatch.resolve("sparse_kd_loss", "auto", S, LP) is R.sparse_kd_loss
    assert _dispatch.resolve("sparse_kd_loss", "torch", cuda, cuda) is R.sparse_kd_loss


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_a_named_kernel_backend_says_it_has_no_kernel_for_this_loss(kernel_backends_everywhere, backend):
    with pytest.raises(fastkd.BackendUnavailableError, match=f"backend '{backend}' has no kernel for sparse_kd_loss"):
        KF.sparse_kd_loss(S, IDS, LP, backend=backend)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_compiles_into_one_graph(tail):
    s = student((2, 4), 25, seed=43)
    _, ids, lp = sparse_teacher((2, 4), 25, 5, seed=44, unused=1)
    labels = torch.tensor([[0, -100, 1, 2], [3, 3, -100, 0]])
    T = t_for(tail)
    eager = lambda a, b: KF.sparse_kd_loss(a, ids, b, labels, tail=tail, temperature=T,  # noqa: E731
                                           num_items_in_batch=torch.tensor(5))
    got = loss_and_grads(compile_fullgraph(eager), s, lp)
    want = loss_and_grads(eager, s, lp)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
