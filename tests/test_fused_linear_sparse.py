"""fused_linear_distill_loss with a sparse teacher (`teacher_topk=(ids, logprobs)`, issue 14): the output layer and
sparse_kd_loss by chunks of tokens, neither side's N x V logits made.

The yardstick is the unfused composition: the student's logits `softcap(h W^T + b)` materialised, then
`kd_weight * sparse_kd_loss(z, ids, logprobs, labels, tail, T)` (times T^2 for loss="kd") plus the CE term; the
fused loss must give its value and the gradients of the student's hidden states, weight and bias on every
backend ("torch": the reference's closed forms per chunk; "triton": its `sparse_kd_rows` operator, in the
interpreter without a GPU), for the three tails, chunk sizes that do and do not divide the tokens, masked tokens,
`num_items_in_batch`, unused slots and rows with none. Also: the closed-form gradient of
`sparse_kd_rows_and_grad` against autograd in float64, k = V against the teacher-logits path, the rule for an id
out of range, the bfloat16 tolerance rule, no N x V tensor, the kernel-rows fallback, validation, the module and
torch.compile.
"""
import functools
import types

import pytest
import torch
import torch.nn.functional as F
from helpers import compile_fullgraph, max_error
from precision import rounding_slack
from test_fused_linear import TensorSizes, assert_same, softcapped, value_and_grads
from test_sparse_kd import sparse_teacher

import fastkd
from fastkd import _dispatch, fused_linear
from fastkd import functional as KF
from fastkd import losses as L
from fastkd import reference as R
from fastkd.reference.sparse import sparse_kd_rows, sparse_kd_rows_and_grad

N, H, V, K = 29, 12, 41, 7  # 29 tokens in chunks of 8: a last chunk of 5
TAILS = ("renormalize", "bucket", "none")
NEG_INF = float("-inf")


def t_for(tail):
    return 2.0 if tail == "renormalize" else 1.0  # "bucket" and "none" need T = 1


def make(dtype=torch.float32, device="cpu", seed=0, bias=True, k=K, unused=2, lp_dtype=None):
    """The student's layer and a teacher cache's rows for its N tokens: the top `k - unused` ids of random
    teacher logits and `unused` unused slots (-inf, ids that must not be read; tests/test_sparse_kd.py)."""
    g = torch.Generator().manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::4] = -100
    _, ids, lp = sparse_teacher((N,), V, k, seed=seed + 1, unused=unused, dtype=lp_dtype or dtype)
    return dict(student_hidden=draw(N, H), student_weight=draw(V, H, scale=0.5),
                student_bias=draw(V) if bias else None, labels=labels.to(device),
                teacher_topk=(ids.to(device), lp.to(device)))


def unfused(student_hidden, student_weight, labels, *, teacher_topk, tail="renormalize", loss="forward_kl",
            temperature=1.0, ignore_index=-100, ce_weight=0.0, kd_weight=1.0, student_bias=None,
            student_softcap=None, num_items_in_batch=None, unchecked=False, **_):
    """The composition the fused loss must equal: the materialised logits, the public sparse_kd_loss (`unchecked`:
    its reference, past the check of the ids), and CE."""
    z = softcapped(F.linear(student_hidden, student_weight, student_bias), student_softcap)
    ids, lp = teacher_topk
    sparse_kd_loss = R.sparse_kd_loss if unchecked else functools.partial(KF.sparse_kd_loss, backend="torch")
    kd = sparse_kd_loss(z, ids, lp, labels, tail=tail, temperature=temperature, ignore_index=ignore_index,
                        num_items_in_batch=num_items_in_batch)
    total = kd_weight * kd * (temperature ** 2 if loss == "kd" else 1.0)
    if ce_weight:
        count = ((labels != ignore_index).sum().clamp(min=1) if num_items_in_batch is None
                 else num_items_in_batch)
        ce = F.cross_entropy(z.reshape(-1, z.shape[-1]).float(), labels.reshape(-1), ignore_index=ignore_index,
                             reduction="sum")
        total = total + ce_weight * ce / count
    return total


def to_float64(inputs):
    def up(v):
        if isinstance(v, tuple):
            return tuple(up(x) for x in v)
        return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
    return {k: up(v) for k, v in inputs.items()}


# ----------------------------------------------------------------------------------------------------------
# the closed-form gradient of the reference's rows

def rows_with_every_edge(V_, seed, dtype=torch.float64):
    """Rows of student logits and k = 6 slots: plain top-k rows, a duplicated id, unused slots with junk ids, a
    row with no used slot, a used id out of range, a row whose set is the whole vocabulary (V_ = 6), a row whose
    k ids hold almost all the mass (the tail's 1 - sum cancels)."""
    g = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(8, V_, generator=g, dtype=dtype)
    t = 3 * torch.randn(8, V_, generator=g, dtype=dtype)
    lp, ids = torch.log_softmax(t, -1).topk(6, -1)
    ids[1, 3] = ids[1, 0]                       # a duplicate id: two slots, two terms
    lp[2, 4:], ids[2, 4:] = NEG_INF, V_ + 5     # unused slots, their ids never read
    lp[3] = NEG_INF                             # no used slot: loss 0, gradient 0
    ids[4, 2] = V_ + 1                          # a used id out of range: loss NaN, gradient 0
    t[5] = -30.0
    t[5, ids[5]] = 10.0                         # the k ids hold all but ~1e-17 of the teacher's mass
    lp[5] = torch.log_softmax(t[5], -1)[ids[5]]
    return z, ids, lp


@pytest.mark.parametrize("tail, T", [("renormalize", 1.0), ("renormalize", 0.7), ("renormalize", 2.5),
                                     ("bucket", 1.0), ("none", 1.0)])
@pytest.mark.parametrize("V_", [6, 23])  # 6: the set is every id (bucket's tail is empty)
def test_closed_form_gradient_is_autograds(tail, T, V_):
    z, ids, lp = rows_with_every_edge(V_, seed=1)
    leaf = z.clone().requires_grad_()
    want_rows = sparse_kd_rows(leaf, ids, lp, tail, T)
    # The NaN row's loss is left out of the sum (its gradient through the reference's `where` is 0 either way).
    want_grad, = torch.autograd.grad(torch.where(want_rows.isnan(), 0.0, want_rows).sum(), leaf)
    rows, grad = sparse_kd_rows_and_grad(z, ids, lp, tail, T)
    assert torch.equal(rows.isnan(), want_rows.isnan()) and rows[4].isnan()
    torch.testing.assert_close(rows, want_rows.detach(), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-14)
    assert grad[3].abs().max() == 0 and grad[4].abs().max() == 0
    # The gradient of each row sums to 0 (a constant added to a row changes no probability).
    torch.testing.assert_close(grad.sum(-1), torch.zeros(8, dtype=z.dtype), rtol=0, atol=1e-13)


def test_closed_form_in_float32_is_close_to_float64():
    z, ids, lp = rows_with_every_edge(23, seed=2)
    for tail in TAILS:
        rows, grad = sparse_kd_rows_and_grad(z.float(), ids, lp.float(), tail, 1.0)
        want_rows, want_grad = sparse_kd_rows_and_grad(z, ids, lp, tail, 1.0)
        assert rows.dtype == grad.dtype == torch.float32
        torch.testing.assert_close(rows.double(), want_rows, rtol=1e-5, atol=1e-5, equal_nan=True)
        torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# against the unfused composition

CASES = {
    "plain": {},
    "ce": dict(ce_weight=0.4, kd_weight=0.6),
    "softcap": dict(student_softcap=3.0, ce_weight=0.2),
    "kd": dict(loss="kd", ce_weight=0.5),
    "num_items": dict(num_items_in_batch=50, ce_weight=1.0),
    "no_bias": dict(bias=False),
    "no_labels": dict(labels=None),
}


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("case", list(CASES))
def test_equals_the_unfused_composition(backend, device, tail, case):
    options = dict(CASES[case])
    inputs = make(device=device, bias=options.pop("bias", True))
    if "labels" in options:
        inputs["labels"] = options.pop("labels")
    options.update(tail=tail, temperature=t_for(tail), chunk_size=8, backend=backend)
    assert_same(value_and_grads(KF.fused_linear_distill_loss, inputs, **options),
                value_and_grads(unfused, inputs, **options))


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("chunk_size", [1, 7, 29, 64, None])  # 7 does not divide 29; None: the default
def test_chunk_sizes(backend, device, tail, chunk_size):
    inputs = make(device=device, seed=3)
    options = dict(tail=tail, temperature=t_for(tail), ce_weight=0.3, chunk_size=chunk_size, backend=backend)
    assert_same(value_and_grads(KF.fused_linear_distill_loss, inputs, **options),
                value_and_grads(unfused, inputs, **options))


def test_leading_dimensions(backend, device):
    # (batch, sequence, hidden) states, labels and slots (batch, sequence, ...).
    inputs = make(device=device, seed=4)
    inputs["student_hidden"] = inputs["student_hidden"][:28].reshape(4, 7, H)
    inputs["labels"] = inputs["labels"][:28].reshape(4, 7)
    inputs["teacher_topk"] = tuple(x[:28].reshape(4, 7, K) for x in inputs["teacher_topk"])
    options = dict(tail="bucket", ce_weight=0.5, chunk_size=5, backend=backend)
    assert_same(value_and_grads(KF.fused_linear_distill_loss, inputs, **options),
                value_and_grads(unfused, inputs, **options))


@pytest.mark.parametrize("tail", TAILS)
def test_unused_slots_and_rows_without_any(backend, device, tail):
    inputs = make(device=device, seed=5, unused=3)
    ids, lp = inputs["teacher_topk"]
    lp = lp.clone()
    lp[[0, 1, 9, 28]] = NEG_INF  # kept and ignored tokens (labels[::4] are ignored) with no used slot
    inputs["teacher_topk"] = (ids, lp)
    options = dict(tail=tail, ce_weight=0.2, chunk_size=8, backend=backend)
    got = value_and_grads(KF.fused_linear_distill_loss, inputs, **options)
    assert all(torch.isfinite(x).all() for x in got)
    assert_same(got, value_and_grads(unfused, inputs, **options))
    # No used slot anywhere: the divergence is 0 with no gradient, the CE term alone remains.
    inputs["teacher_topk"] = (ids, torch.full_like(lp, NEG_INF))
    nothing = value_and_grads(KF.fused_linear_distill_loss, inputs, **options)
    ce_only = value_and_grads(KF.fused_linear_distill_loss, inputs, **{**options, "kd_weight": 0.0})
    assert_same(nothing, ce_only)


@pytest.mark.parametrize("tail, T, loss", [("renormalize", 2.0, "kd"), ("renormalize", 1.0, "forward_kl"),
                                           ("bucket", 1.0, "forward_kl"), ("none", 1.0, "kd")])
def test_every_id_is_the_teacher_logits_path(backend, device, tail, T, loss):
    # k = V (every id once, shuffled): the sparse teacher is the teacher's whole distribution, so the loss is the
    # forward KL against its logits (for "bucket" no tail outcome is left, and "none" sums to the KL).
    inputs = make(device=device, seed=6)
    g = torch.Generator().manual_seed(7)
    teacher_logits = (2 * torch.randn(N, V, generator=g)).to(device)
    ids = torch.argsort(torch.rand(N, V, generator=g), -1).to(device)
    lp = torch.log_softmax(teacher_logits, -1).gather(-1, ids)
    options = dict(loss=loss, temperature=T, ce_weight=0.3, chunk_size=8, backend=backend)
    sparse = value_and_grads(KF.fused_linear_distill_loss, {**inputs, "teacher_topk": (ids, lp)}, tail=tail,
                             **options)
    dense = value_and_grads(KF.fused_linear_distill_loss, {**inputs, "teacher_topk": None,
                                                           "teacher_logits": teacher_logits}, **options)
    assert_same(sparse, dense, rtol=2e-5, atol=2e-6)


def test_an_id_out_of_range_raises_on_cpu_and_is_nan_past_the_check():
    inputs = make(seed=8)
    ids, lp = inputs["teacher_topk"]
    ids = ids.clone()
    ids[5, 0] = V  # a used slot (the unused ones are the last two) naming the first id past the vocabulary
    inputs["teacher_topk"] = (ids, lp)
    with pytest.raises(ValueError, match=r"teacher_indices holds ids outside \[0, 41\) in used slots"):
        KF.fused_linear_distill_loss(**inputs)
    # Where the ids are not read (a GPU), the token's loss is NaN and its gradient 0, as sparse_kd_loss's rule:
    # the chunk loop past the public checks, against the reference's composition.
    options = dict(loss="forward_kl", beta=0.5, temperature=1.0, ignore_index=-100, ce_weight=0.5, kd_weight=1.0,
                   teacher_bias=None, teacher_logits=None, student_softcap=None, teacher_softcap=None,
                   vocab_mismatch="error", num_items_in_batch=None, chunk_size=8, tail="bucket")

    def loop(student_hidden, student_weight, labels, student_bias, teacher_topk, **kw):
        return fused_linear.fused_linear_distill_terms(
            fused_linear.reference_rows, student_hidden, student_weight, None, None, labels,
            student_bias=student_bias, teacher_topk=teacher_topk, **kw)[0]
    loss, *grads = value_and_grads(loop, inputs, **options)
    assert loss.isnan()
    assert all(torch.isfinite(g).all() for g in grads)  # the NaN token's gradient is 0, the others' as usual
    # The same token ignored by its label: left out, as the unfused composition leaves it out.
    inputs["labels"] = inputs["labels"].clone()
    inputs["labels"][5] = -100
    assert_same(value_and_grads(loop, inputs, **options), value_and_grads(unfused, inputs, unchecked=True,
                                                                           **options))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tail", TAILS)
def test_within_twice_the_unfused_error(backend, device, dtype, tail):
    # The tolerance rule: against the float64 composition, the fused loss errs at most about twice as much as the
    # unfused composition in the same dtype (slack: a small part of the result, and for a 16-bit gradient one
    # rounding to its dtype).
    inputs = make(dtype=dtype, device=device, seed=9)
    options = dict(tail=tail, temperature=t_for(tail), ce_weight=0.3, student_softcap=5.0, chunk_size=8,
                   backend=backend)
    got = value_and_grads(KF.fused_linear_distill_loss, inputs, **options)
    plain = value_and_grads(unfused, inputs, **options)
    exact = value_and_grads(unfused, to_float64(inputs), **options)
    for i, (what, g, p, e) in enumerate(zip(("loss", "d hidden", "d weight", "d bias"), got, plain, exact)):
        assert g.dtype == p.dtype, what
        scale = e.abs().max().item()
        slack = 1e-6 * scale + (rounding_slack(dtype, device, scale) if i and dtype != torch.float32 else 0.0)
        assert max_error(g, e) <= 2 * max_error(p, e) + slack, (what, max_error(g, e), max_error(p, e))


def test_mixed_dtypes_compute_in_the_wider():
    # bfloat16 student layer, float32 log-probabilities: the divergence in float32, as sparse_kd_loss.
    inputs = make(dtype=torch.bfloat16, seed=10, lp_dtype=torch.float32)
    options = dict(tail="bucket", ce_weight=0.3, chunk_size=8)
    got = value_and_grads(KF.fused_linear_distill_loss, inputs, **options)
    want = value_and_grads(unfused, inputs, **options)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    assert_same(got, want, rtol=2e-2, atol=1e-2)


# ----------------------------------------------------------------------------------------------------------
# memory, the kernel rows' fallback, the teacher's gradient

def test_no_tensor_holds_the_logits(backend, device):
    inputs = make(device=device)
    leaves = {k: (v.detach().clone().requires_grad_(k.startswith("student")) if isinstance(v, torch.Tensor)
                  and v.is_floating_point() else v) for k, v in inputs.items()}
    for tail in TAILS:
        with TensorSizes() as mode:
            KF.fused_linear_distill_loss(**leaves, tail=tail, ce_weight=0.5, student_softcap=4.0, chunk_size=8,
                                         backend=backend).backward()
        biggest = max(mode.sizes)
        assert biggest[0] < N * V, (tail, biggest)  # the largest is the weight's gradient (V x H) or a chunk's
        assert biggest[0] <= max(V * H, 8 * V, N * H), (tail, biggest)


class Recorder:
    """A KernelSet stand-in with the `sparse_kd_rows` operator as declared in fastkd.kernel_ops, made of the
    closed forms, counting its calls."""

    def __init__(self):
        self.calls = 0

    def sparse_kd_rows(self, student, ids, logprobs, tail, temperature, labels, ignore_index, weight, student_grad):
        self.calls += 1
        rows, d = sparse_kd_rows_and_grad(student, ids, logprobs, tail, temperature)
        keep = torch.ones_like(rows, dtype=torch.bool) if labels is None else labels != ignore_index
        rows = torch.where(keep, rows, 0.0).float()
        d = torch.where(keep[:, None], d * weight[:, None], 0.0).to(student.dtype)
        return rows, (d if student_grad else student.new_empty((0,)))


@pytest.mark.parametrize("kernels", ["without the operator", "with the operator"])
@pytest.mark.parametrize("tail", TAILS)
def test_kernel_rows_take_the_operator_or_the_closed_form(kernels, tail):
    kernel_set = types.SimpleNamespace() if kernels == "without the operator" else Recorder()
    inputs = make(seed=11)
    options = dict(loss="kd", beta=0.5, temperature=t_for(tail), ignore_index=-100, ce_weight=0.4, kd_weight=0.6,
                   teacher_bias=None, teacher_logits=None, student_softcap=3.0, teacher_softcap=None,
                   vocab_mismatch="error", num_items_in_batch=None, chunk_size=8, tail=tail)

    def loop(rows):
        return lambda student_hidden, student_weight, labels, **kw: fused_linear.fused_linear_distill_terms(
            rows, student_hidden, student_weight, None, None, labels, **kw)[0]
    got = value_and_grads(loop(fused_linear.kernel_rows(kernel_set)), inputs, **options)
    assert_same(got, value_and_grads(loop(fused_linear.reference_rows), inputs, **options))
    assert getattr(kernel_set, "calls", 4) == 4  # 29 tokens in chunks of 8


def test_a_kernel_backend_without_the_operator_runs_the_closed_form(monkeypatch):
    # The dispatch of a sparse teacher on a kernel backend ("triton" named, its KernelSet lacking the operator, as
    # the CUDA C++ one): fastkd.functional runs the chunk loop with that backend's kernel_rows.
    for name in ("triton", "cuda"):
        module = types.SimpleNamespace(unavailable_reason=lambda device, build=False: None,
                                       KERNELS=types.SimpleNamespace())
        monkeypatch.setitem(_dispatch._modules, name, module)
    inputs = make(seed=12)
    options = dict(tail="none", ce_weight=0.5, chunk_size=8)
    assert_same(value_and_grads(KF.fused_linear_distill_loss, inputs, backend="cuda", **options),
                value_and_grads(KF.fused_linear_distill_loss, inputs, backend="torch", **options), rtol=0, atol=0)


def test_the_teacher_gets_no_gradient_and_terms_are_the_parts():
    inputs = make(seed=13)
    ids, lp = inputs["teacher_topk"]
    lp = lp.clone().requires_grad_()
    h = inputs["student_hidden"].clone().requires_grad_()
    loss, terms = KF._fused_linear_distill(
        h, inputs["student_weight"], None, None, inputs["labels"], loss="kd", beta=0.5, temperature=2.0,
        ignore_index=-100, ce_weight=0.3, kd_weight=0.7, student_bias=None, teacher_bias=None, teacher_logits=None,
        student_softcap=None, teacher_softcap=None, vocab_mismatch="error", num_items_in_batch=None, chunk_size=8,
        backend="torch", return_terms=True, teacher_topk=(ids, lp))
    loss.backward()
    assert lp.grad is None and h.grad is not None
    z = F.linear(inputs["student_hidden"], inputs["student_weight"])
    kd = 0.7 * 4.0 * KF.sparse_kd_loss(z, ids, lp.detach(), inputs["labels"], temperature=2.0)
    torch.testing.assert_close(terms, torch.stack([kd, 0.3 * F.cross_entropy(z, inputs["labels"])]))


# ----------------------------------------------------------------------------------------------------------
# validation, the module, torch.compile

def errors():
    inputs = make()
    ids, lp = inputs["teacher_topk"]
    call = lambda **kw: KF.fused_linear_distill_loss(**{**inputs, **kw})  # noqa: E731
    teacher_hidden, teacher_weight = torch.randn(N, 5), torch.randn(V, 5)
    return {
        "with teacher_logits": (ValueError, "either as teacher_topk .* not several: got teacher_topk and "
                                            "teacher_logits", lambda: call(teacher_logits=torch.randn(N, V))),
        "with teacher_hidden": (ValueError, "not several: got teacher_topk and teacher_hidden and teacher_weight",
                                lambda: call(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight)),
        "with teacher_bias": (ValueError, "teacher_softcap and teacher_bias apply to logits made from teacher_hidden",
                              lambda: call(teacher_bias=torch.randn(V))),
        "jsd": (ValueError, r"sparse teacher \(teacher_topk\) gives the forward KL only: loss must be one of "
                            r"\('forward_kl', 'kd'\), got 'jsd'", lambda: call(loss="jsd")),
        "reverse_kl": (ValueError, "gives the forward KL only", lambda: call(loss="reverse_kl")),
        "unknown loss": (ValueError, "loss must be one of", lambda: call(loss="kl")),
        "bucket T=2": (ValueError, "tail='bucket' needs temperature=1", lambda: call(tail="bucket", temperature=2.0)),
        "none T=0.5": (ValueError, "tail='none' needs temperature=1", lambda: call(tail="none", temperature=0.5)),
        "tail": (ValueError, "tail must be one of", lambda: call(tail="top")),
        "tail without topk": (ValueError, r"tail='bucket' applies to a sparse teacher \(teacher_topk\) only",
                              lambda: call(teacher_topk=None, teacher_hidden=teacher_hidden,
                                           teacher_weight=teacher_weight, tail="bucket")),
        "no teacher": (ValueError, "the teacher is missing: .* or teacher_topk", lambda: call(teacher_topk=None)),
        "a tensor": (TypeError, r"teacher_topk must be a pair \(teacher_indices, teacher_logprobs\)",
                     lambda: call(teacher_topk=lp)),
        "three": (TypeError, "teacher_topk must be a pair .* of length 3", lambda: call(teacher_topk=(ids, lp, lp))),
        "float ids": (TypeError, "teacher_indices must be an integer tensor", lambda: call(teacher_topk=(lp, lp))),
        "int logprobs": (TypeError, "teacher_logprobs must be a floating-point tensor",
                         lambda: call(teacher_topk=(ids, ids))),
        "k mismatch": (ValueError, "teacher_indices and teacher_logprobs must have the same shape",
                       lambda: call(teacher_topk=(ids[:, :3], lp))),
        "rows": (ValueError, r"must have shape \(29,\) \+ \(k,\) \(k teacher slots per row of student_hidden "
                             r"\(29, 12\)\), got \(28, 7\)", lambda: call(teacher_topk=(ids[:28], lp[:28]))),
        "k = 0": (ValueError, r"at least one slot per row \(k >= 1\)",
                  lambda: call(teacher_topk=(ids[:, :0], lp[:, :0]))),
        "negative id": (ValueError, r"ids outside \[0, 41\) in used slots .* min -1",
                        lambda: call(teacher_topk=(torch.where(ids == ids[0, 0], -1, ids), lp))),
        "module tail": (ValueError, "tail must be one of", lambda: L.FusedLinearDistillLoss(tail="top")),
        "module bucket T": (ValueError, "tail='bucket' needs temperature=1",
                            lambda: L.FusedLinearDistillLoss(tail="bucket", temperature=4.0)),
        "module bucket jsd": (ValueError, "tail='bucket' is for a sparse teacher, which gives the forward KL only",
                              lambda: L.FusedLinearDistillLoss("jsd", tail="bucket")),
        "module jsd forward": (ValueError, "gives the forward KL only",
                               lambda: L.FusedLinearDistillLoss("jsd")(inputs["student_hidden"],
                                                                       inputs["student_weight"],
                                                                       teacher_topk=(ids, lp))),
    }


@pytest.mark.parametrize("name", list(errors()))
def test_validation_names_the_argument(name):
    exc, match, fn = errors()[name]
    with pytest.raises(exc, match=match):
        fn()


@pytest.mark.parametrize("tail", TAILS)
def test_module_is_the_functional(tail):
    inputs = make(seed=14)
    T = t_for(tail)
    module = L.FusedLinearDistillLoss("kd", temperature=T, ce_weight=0.2, kd_weight=0.8, student_softcap=4.0,
                                      chunk_size=8, tail=tail)
    got = value_and_grads(lambda **kw: module(kw.pop("student_hidden"), kw.pop("student_weight"), **kw), inputs)
    want = value_and_grads(KF.fused_linear_distill_loss, inputs, loss="kd", temperature=T, ce_weight=0.2,
                           kd_weight=0.8, student_softcap=4.0, chunk_size=8, tail=tail)
    assert_same(got, want, rtol=0, atol=0)
    assert (f"tail={tail!r}" in repr(module)) == (tail != "renormalize")
    # A module with the default tail serves a logits teacher and a sparse one alike.
    plain = L.FusedLinearDistillLoss(chunk_size=8)
    assert torch.isfinite(plain(inputs["student_hidden"], inputs["student_weight"],
                                teacher_topk=inputs["teacher_topk"]))


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_compiled_equals_eager(backend, device, tail):
    inputs = make(device=device, seed=15)
    options = dict(loss="kd", tail=tail, temperature=t_for(tail), ce_weight=0.5, chunk_size=8,
                   num_items_in_batch=torch.tensor(20), backend=backend)
    eager = value_and_grads(KF.fused_linear_distill_loss, inputs, **options)
    compiled_fn = compile_fullgraph(lambda **kw: KF.fused_linear_distill_loss(**kw))
    assert_same(value_and_grads(compiled_fn, inputs, **options), eager, rtol=1e-6)


def test_public_api_lists_the_arguments():
    import inspect
    params = inspect.signature(KF.fused_linear_distill_loss).parameters
    assert params["teacher_topk"].default is None and params["tail"].default == "renormalize"
    assert inspect.signature(L.FusedLinearDistillLoss).parameters["tail"].default == "renormalize"
    assert fastkd.functional.fused_linear.SPARSE_LOSSES == ("forward_kl", "kd")
