"""The CUDA kernels of csrc/ run on the CPU through the stand-in, against the reference: forward and gradients.

`fastkd.cuda.standin` compiles csrc/ with g++ and -DFASTKD_STANDIN (csrc/standin/cuda_standin.h: one thread per
CUDA thread of a block, real barriers and warp shuffles), so the device code itself runs here, without a GPU.
Each op is called directly, as `torch.ops.fastkd_standin.cuda_*`, and compared with the reference's per-row
terms (fastkd/reference) and their autograd gradients, for random incoming gradients. A block of 128-512
threads costs milliseconds here: few rows, small shapes. The stand-in cannot see timing or the GPU's rounding
of the fast-math intrinsics (see the header); the tolerances are those of the GPU tests.
The row ops write their weighted gradient in the forward call: it is compared with the reference's autograd
gradient of the weighted sum of the per-row terms. Three tests compile a copy of the sources with planted bugs and
check that these comparisons catch them.
"""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastkd.cuda import standin
from fastkd.reference import logits as R
from fastkd.reference import relational

if standin.unavailable_reason() is not None:
    pytest.skip(f"cannot build the CUDA stand-in: {standin.unavailable_reason()}", allow_module_level=True)

@pytest.fixture(scope="module")
def ops():
    """One compile (cached in torch's extension folder across sessions) for the whole module."""
    return standin.build()


def logits(*shape, seed, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dtype)


def row_weights(n, seed):
    """A random incoming gradient per row, so that a gradient off by a per-row factor shows."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) + 0.5


# (rtol, atol) by the dtype of a result: float32 as the GPU tests; bfloat16 and float16 gradients, rounded in
# both the kernel and the reference from float32 values that differ by rounding, a few of their ulps.
TOLERANCES = {torch.bfloat16: (2e-2, 2e-3), torch.float16: (4e-3, 1e-3)}


def check(got, want, what, dtype=torch.float32):
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    rtol, atol = TOLERANCES.get(dtype, (1e-4, 1e-5))
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def reference_grads(per_row, inputs, weights):
    """Gradients of sum_i (weights[i] * per_row(*inputs)[i]).sum() to each input."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    total = sum((w * term).sum() for term, w in zip(per_row(*leaves), weights))
    return torch.autograd.grad(total, leaves)


# --- KL (kd_loss, kl_div_loss) --------------------------------------------------------------------------------

def kl_reference(s, t, T, reverse, target, labels, ignore_index=-100):
    V = s.shape[-1]
    log_ps, log_pt = R.log_probs(s, T), R.log_probs(t, T)
    kl = (R.kl_rows(log_ps, log_pt) if reverse else R.kl_rows(log_pt, log_ps)).reshape(-1)
    if labels is not None:
        kl = torch.where(labels.reshape(-1) != ignore_index, kl, 0.0)
    terms = [kl]
    if target is not None:
        terms.append(F.cross_entropy(s.float().reshape(-1, V), target.reshape(-1), reduction="none"))
    return terms


def stride0(value, rows):
    """One weight for every row, as an expanded 0-stride view (as fastkd.kernel_losses passes a mean's)."""
    return torch.tensor([value]).expand(rows)


def check_flags(call, values, weights, reference, inputs, what):
    """The op `call(weights, student_grad, teacher_grad)` with one gradient flag at a time and with none: the same
    values bit for bit (`values`), the gradient asked for against the reference's of the weighted sum, the
    other an empty (0,) tensor; `weights` (None read as 1) per term of `reference`."""
    ones = [w if w is not None else torch.ones(values[0].numel()) for w in weights]
    want = reference_grads(reference, inputs, ones)
    for student_grad, teacher_grad in ((True, False), (False, True), (False, False)):
        out = call(weights, student_grad, teacher_grad)
        assert len(out) == len(values) + 3 and out[-1].shape == (0,), (what, "d_T not asked for")
        for got, value in zip(out[:len(values)], values):
            torch.testing.assert_close(got, value, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m: f"{what}: values change with the flags: {m}")
        for flag, got, want_grad, x, side in ((student_grad, out[-3], want[0], inputs[0], "student"),
                                              (teacher_grad, out[-2], want[1], inputs[1], "teacher")):
            if flag:
                check(got, want_grad, f"{what}: {side} grad alone", x.dtype)
            else:
                assert got.shape == (0,) and got.dtype == x.dtype, (what, side, got.shape, got.dtype)


def check_kl(ops, s, t, T=2.0, reverse=False, target=None, labels=None):
    rows = s.numel() // s.shape[-1]
    weights = [row_weights(rows, 1), row_weights(rows, 2) if target is not None else None]
    kl, ce, d_s, d_t, d_T = ops.cuda_kl_rows(s, t, T, None, reverse, target, labels, -100, *weights, True, True,
                                             False)
    assert d_T.shape == (0,)
    want = kl_reference(s, t, T, reverse, target, labels)
    check(kl, want[0], "KL")
    if target is not None:
        check(ce, want[1], "CE")
    else:
        assert ce.shape == (0,)
    reference = lambda s, t: kl_reference(s, t, T, reverse, target, labels)  # noqa: E731
    want_s, want_t = reference_grads(reference, [s, t], [w for w in weights if w is not None])
    check(d_s, want_s, "student grad", s.dtype)
    check(d_t, want_t, "teacher grad", t.dtype)
    assert d_s.is_contiguous() and d_t.is_contiguous() and d_s.shape == s.shape and d_t.shape == t.shape
    # One gradient at a time (the kernels' other template instances) and none, with 0-stride weights (the CE's
    # None: 1).
    check_flags(lambda w, sg, tg: ops.cuda_kl_rows(s, t, T, None, reverse, target, labels, -100, *w, sg, tg, False),
                [kl, ce], [stride0(0.7, rows), None], reference, [s, t], "KL")


# --- JSD ------------------------------------------------------------------------------------------------------

def jsd_reference(s, t, beta, T, labels, ignore_index=-100):
    log_ps, log_pt = R.log_probs(s, T), R.log_probs(t, T)
    log_m = R.log_mixture(log_ps, log_pt, beta)
    jsd = (beta * R.kl_rows(log_pt, log_m) + (1.0 - beta) * R.kl_rows(log_ps, log_m)).reshape(-1)
    if labels is not None:
        jsd = torch.where(labels.reshape(-1) != ignore_index, jsd, 0.0)
    return [jsd]


def check_jsd(ops, s, t, beta, T, labels=None):
    rows = s.numel() // s.shape[-1]
    weights = [row_weights(rows, 3)]
    loss, d_s, d_t, _ = ops.cuda_jsd_rows(s, t, beta, T, None, labels, -100, weights[0], True, True, False)
    reference = lambda s, t: jsd_reference(s, t, beta, T, labels)  # noqa: E731
    check(loss, reference(s, t)[0], "JSD")
    want_s, want_t = reference_grads(reference, [s, t], weights)
    check(d_s, want_s, "student grad", s.dtype)
    check(d_t, want_t, "teacher grad", t.dtype)
    check_flags(lambda w, sg, tg: ops.cuda_jsd_rows(s, t, beta, T, None, labels, -100, w[0], sg, tg, False), [loss],
                [stride0(1.3, rows)], reference, [s, t], "JSD")
    check_flags(lambda w, sg, tg: ops.cuda_jsd_rows(s, t, beta, T, None, labels, -100, w[0], sg, tg, False), [loss],
                [None], reference, [s, t], "JSD, weight None")


@pytest.mark.parametrize("V", [1, 7, 1037])
@pytest.mark.parametrize("beta", [0.3, 0.5])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_jsd(ops, V, beta, T):
    check_jsd(ops, logits(3, V, seed=V + 20), logits(3, V, seed=V + 21), beta, T)


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16)])
def test_jsd_low_precision(ops, dtypes):
    check_jsd(ops, logits(3, 257, seed=22, dtype=dtypes[0]), logits(3, 257, seed=23, dtype=dtypes[1]), 0.7, 1.0)


def test_jsd_masked_tokens_and_vocabulary(ops):
    s, t = logits(2, 4, 99, seed=24)[:, :-1], logits(2, 4, 99, seed=25)[:, :-1]
    s[..., 90:] = float("-inf")
    t[..., 85:] = float("-inf")  # columns 85..89: the teacher has no mass, the student has
    check_jsd(ops, s, t, 0.7, 1.0, labels=torch.tensor([[0, -100, 2], [-100, -100, 1]]))


# --- DKD ------------------------------------------------------------------------------------------------------

def dkd_reference(s, t, target, T):
    """Per-row TCKD and NCKD (no T^2 / rows), as fastkd.reference.logits.dkd_loss forms them."""
    classes = s.shape[-1]
    is_target = F.one_hot(target, classes).bool()
    log_ps, log_pt = R.log_probs(s, T), R.log_probs(t, T)
    tckd = R.kl_rows(R.target_vs_rest_log_probs(log_pt, target, is_target),
                     R.target_vs_rest_log_probs(log_ps, target, is_target))
    if classes == 1:
        return [tckd, torch.zeros_like(tckd)]
    rest_s = R.log_probs(s.float().masked_fill(is_target, float("-inf")), T)
    rest_t = R.log_probs(t.float().masked_fill(is_target, float("-inf")), T)
    return [tckd, R.kl_rows(rest_t, rest_s)]


def check_dkd(ops, s, t, target, T):
    rows = s.numel() // s.shape[-1]
    weights = [row_weights(rows, 4), row_weights(rows, 5)]
    tckd, nckd, d_s, d_t, _ = ops.cuda_dkd_rows(s, t, target, T, None, *weights, True, True, False)
    want = dkd_reference(s, t, target, T)
    check(tckd, want[0], "TCKD")
    check(nckd, want[1], "NCKD")
    reference = lambda s, t: dkd_reference(s, t, target, T)  # noqa: E731
    want_s, want_t = reference_grads(reference, [s, t], weights)
    check(d_s, want_s, "student grad", s.dtype)
    check(d_t, want_t, "teacher grad", t.dtype)
    check_flags(lambda w, sg, tg: ops.cuda_dkd_rows(s, t, target, T, None, *w, sg, tg, False), [tckd, nckd],
                [stride0(0.25, rows), None], reference, [s, t], "DKD")


@pytest.mark.parametrize("V", [1, 2, 7, 300, 1037])
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd(ops, V, T):
    target = torch.tensor([0, V - 1, V // 2, (V * 2) // 3])
    check_dkd(ops, logits(4, V, seed=V + 30), logits(4, V, seed=V + 31), target, T)


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_dkd_low_precision(ops, dtypes):
    s, t = logits(3, 203, seed=32, dtype=dtypes[0]), logits(3, 203, seed=33, dtype=dtypes[1])
    check_dkd(ops, s, t, torch.tensor([5, 0, 202]), 4.0)


def test_dkd_masked_vocabulary(ops):
    s, t = logits(3, 77, seed=34), logits(3, 77, seed=35)
    s[:, 70:] = float("-inf")
    t[:, 70:] = float("-inf")
    check_dkd(ops, s, t, torch.tensor([1, 69, 30]), 2.0)


# --- A per-row (learnable) temperature: temperature_rows and d_T ---------------------------------------------
# Row r at its own T_r (float32 (rows,), any stride), and d_T[r] = d/dT_r of row r's weighted terms (CE excluded),
# against float64 autograd of the plain formulas with a per-row temperature that requires grad.

NEG_INF = float("-inf")


def log_probs(x, T):
    """log_softmax(x / T): T a float (the reference's), or a per-row tensor (float64 here), a -inf logit staying
    -inf without a NaN in T's gradient."""
    if not isinstance(T, torch.Tensor):
        return R.log_probs(x, T)
    x = x.to(T.dtype)
    masked = x == NEG_INF
    scaled = torch.where(masked, 0.0, x) / T.reshape(*x.shape[:-1], 1)
    return torch.log_softmax(torch.where(masked, NEG_INF, scaled), dim=-1)


def kl_terms(s, t, T, reverse, labels):
    log_ps, log_pt = log_probs(s, T), log_probs(t, T)
    kl = (R.kl_rows(log_ps, log_pt) if reverse else R.kl_rows(log_pt, log_ps)).reshape(-1)
    return [kl if labels is None else torch.where(labels.reshape(-1) != -100, kl, 0.0)]


def jsd_terms(s, t, T, beta, labels):
    log_ps, log_pt = log_probs(s, T), log_probs(t, T)
    log_m = R.log_mixture(log_ps, log_pt, beta)
    jsd = (beta * R.kl_rows(log_pt, log_m) + (1.0 - beta) * R.kl_rows(log_ps, log_m)).reshape(-1)
    return [jsd if labels is None else torch.where(labels.reshape(-1) != -100, jsd, 0.0)]


def dkd_terms(s, t, T, target):
    is_target = F.one_hot(target, s.shape[-1]).bool()
    log_ps, log_pt = log_probs(s, T), log_probs(t, T)
    tckd = R.kl_rows(R.target_vs_rest_log_probs(log_pt, target, is_target),
                     R.target_vs_rest_log_probs(log_ps, target, is_target))
    rest_s = log_probs(s.to(T.dtype).masked_fill(is_target, NEG_INF), T)
    rest_t = log_probs(t.to(T.dtype).masked_fill(is_target, NEG_INF), T)
    return [tckd, R.kl_rows(rest_t, rest_s)]


def temperature_reference(terms, s, t, T_rows, weights):
    """(float64 terms, d/ds, d/dt, d/dT) of sum_i weights[i] . terms(s, t, T)[i], T per row in float64."""
    leaves = [x.detach().clone().requires_grad_() for x in (s, t)]
    T64 = T_rows.detach().double().clone().requires_grad_()
    values = terms(*leaves, T64)
    total = sum((w.double() * v).sum() for v, w in zip(values, weights))
    return [v.detach() for v in values], *torch.autograd.grad(total, [*leaves, T64])


def check_temperature(call, n_values, terms, s, t, T_rows, weights, what, rows=slice(None)):
    """`call(T_rows, student_grad, teacher_grad, temperature_grad)`: the values (of `rows`), both gradients and
    d_T against float64 at per-row temperatures; d_T alone or beside either gradient the same bits, the values
    unchanged by temperature_grad, d_T empty without it."""
    values, want_s, want_t, want_T = temperature_reference(terms, s, t, T_rows, weights)
    out = call(T_rows, True, True, True)
    for i, (got, want) in enumerate(zip(out[:n_values], values)):
        check(got[rows], want[rows].float(), f"{what}: value {i}")
    check(out[n_values], want_s, f"{what}: student grad", s.dtype)
    check(out[n_values + 1], want_t, f"{what}: teacher grad", t.dtype)
    d_T = out[-1]
    assert d_T.shape == (s.numel() // s.shape[-1],) and d_T.dtype == torch.float32
    check(d_T, want_T.float(), f"{what}: d_T")
    for student_grad, teacher_grad, t_grad in ((False, False, True), (True, False, True), (False, True, True),
                                               (True, True, False)):
        other = call(T_rows, student_grad, teacher_grad, t_grad)
        for i in range(n_values):
            torch.testing.assert_close(other[i], out[i], rtol=0, atol=0, equal_nan=True)
        if t_grad:
            torch.testing.assert_close(other[-1], d_T, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m: f"{what}: d_T changes with the gradient flags: {m}")
        else:
            assert other[-1].shape == (0,)
        for flag, got, want in ((student_grad, other[n_values], out[n_values]),
                                (teacher_grad, other[n_values + 1], out[n_values + 1])):
            if flag:
                torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
            else:
                assert got.shape == (0,)
    return out


def temperatures(rows, seed):
    return torch.rand(rows, generator=torch.Generator().manual_seed(seed)) * 2.5 + 0.5


DTYPE_PAIRS = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
               "fp32-fp16": (torch.float32, torch.float16)}


# Each case in one dtype pair (a stand-in call costs ~30 ms a row): every pair is in each op's cases.
@pytest.mark.parametrize("reverse, ce, with_labels, dtypes", [(False, False, False, "fp32"),
                                                               (True, False, False, "bf16"),
                                                               (False, True, True, "fp32-fp16"),
                                                               (True, True, False, "fp32"),
                                                               (False, False, True, "bf16")])
def test_kl_temperature_rows(ops, reverse, ce, with_labels, dtypes):
    ds, dt = DTYPE_PAIRS[dtypes]
    s, t = logits(2, 2, 45, seed=100, dtype=ds), logits(2, 2, 45, seed=101, dtype=dt)
    target = torch.tensor([[0, 44], [3, 20]]) if ce else None
    labels = torch.tensor([[1, -100], [0, 5]]) if with_labels else None
    T_rows = temperatures(4, 102)
    weights = [row_weights(4, 103), row_weights(4, 104) if ce else None]

    def call(T, sg, tg, Tg):
        return ops.cuda_kl_rows(s, t, 1.0, T, reverse, target, labels, -100, *weights, sg, tg, Tg)

    active = labels.reshape(-1) != -100 if labels is not None else torch.ones(4, dtype=torch.bool)

    def terms(s, t, T):
        # CE (of the raw logits of the KL's second row: the student, the teacher when reverse; no temperature) is
        # in the written gradients, and out of d_T; an ignored token has no gradient (its CE value is not
        # defined: only the active rows' values are compared).
        kl = kl_terms(s, t, T, reverse, labels)
        if not ce:
            return kl
        y = t if reverse else s
        return kl + [torch.where(active, F.cross_entropy(y.double().reshape(4, -1), target.reshape(-1),
                                                         reduction="none"), 0.0)]

    out = check_temperature(call, 2, terms, s, t, T_rows, [w for w in weights if w is not None], "KL", active)
    if not ce:
        assert out[1].shape == (0,)
    if labels is not None:
        ignored = labels.reshape(-1) == -100
        assert (out[-1][ignored] == 0).all() and (out[0][ignored] == 0).all()


@pytest.mark.parametrize("dtypes, with_labels", [("fp32", True), ("bf16", False), ("fp32-fp16", True)])
def test_jsd_temperature_rows(ops, dtypes, with_labels):
    ds, dt = DTYPE_PAIRS[dtypes]
    s, t = logits(3, 61, seed=110, dtype=ds), logits(3, 61, seed=111, dtype=dt)
    labels = torch.tensor([1, -100, 2]) if with_labels else None
    T_rows, w = temperatures(3, 112), row_weights(3, 113)
    call = lambda T, sg, tg, Tg: ops.cuda_jsd_rows(s, t, 0.3, 1.0, T, labels, -100, w, sg, tg, Tg)  # noqa: E731
    out = check_temperature(call, 1, lambda s, t, T: jsd_terms(s, t, T, 0.3, labels), s, t, T_rows, [w], "JSD")
    if labels is not None:
        assert (out[-1][labels == -100] == 0).all()


@pytest.mark.parametrize("dtypes", list(DTYPE_PAIRS))
def test_dkd_temperature_rows(ops, dtypes):
    ds, dt = DTYPE_PAIRS[dtypes]
    s, t = logits(3, 53, seed=120, dtype=ds), logits(3, 53, seed=121, dtype=dt)
    target = torch.tensor([0, 52, 17])
    T_rows, weights = temperatures(3, 122), [row_weights(3, 123), row_weights(3, 124)]
    call = lambda T, sg, tg, Tg: ops.cuda_dkd_rows(s, t, target, 1.0, T, *weights, sg, tg, Tg)  # noqa: E731
    check_temperature(call, 2, lambda s, t, T: dkd_terms(s, t, T, target), s, t, T_rows, weights, "DKD")


def test_temperature_rows_with_masked_entries(ops):
    """-inf logits (masked vocabulary, and a teacher without mass where the student has some): a zero gradient
    against a -inf logit adds 0 to d_T, never NaN."""
    s, t = logits(3, 70, seed=130), logits(3, 70, seed=131)
    s[:, 60:] = NEG_INF
    t[:, 55:] = NEG_INF  # columns 55..59: the teacher has no mass, the student has
    s[1, 3] = t[1, 3] = NEG_INF
    T_rows, w, w2 = temperatures(3, 132), row_weights(3, 133), row_weights(3, 134)
    check_temperature(lambda T, sg, tg, Tg: ops.cuda_kl_rows(s, t, 1.0, T, False, None, None, -100, w, None, sg, tg,
                                                             Tg),
                      2, lambda s, t, T: kl_terms(s, t, T, False, None), s, t, T_rows, [w], "KL, -inf")
    check_temperature(lambda T, sg, tg, Tg: ops.cuda_jsd_rows(s, t, 0.3, 1.0, T, None, -100, w, sg, tg, Tg),
                      1, lambda s, t, T: jsd_terms(s, t, T, 0.3, None), s, t, T_rows, [w], "JSD, -inf")
    s2 = s.clone()
    s2[:, 55:60] = NEG_INF  # DKD's NCKD needs the student's mass wherever the teacher has some
    target = torch.tensor([0, 54, 3])
    check_temperature(lambda T, sg, tg, Tg: ops.cuda_dkd_rows(s2, t, target, 1.0, T, w, w2, sg, tg, Tg),
                      2, lambda s, t, T: dkd_terms(s, t, T, target), s2, t, T_rows, [w, w2], "DKD, -inf")


def row_calls(ops, s, t):
    """The three ops at temperature `T` (a float, or None: `T_rows`), every output asked for."""
    target, labels, w = torch.tensor([2, 0, 9]), torch.tensor([1, -100, 4]), row_weights(3, 140)
    return {
        "KL": lambda T, T_rows, Tg: ops.cuda_kl_rows(s, t, T, T_rows, False, target, labels, -100, w, w, True, True,
                                                     Tg),
        "JSD": lambda T, T_rows, Tg: ops.cuda_jsd_rows(s, t, 0.3, T, T_rows, labels, -100, w, True, True, Tg),
        "DKD": lambda T, T_rows, Tg: ops.cuda_dkd_rows(s, t, target, T, T_rows, w, w, True, True, Tg),
    }


@pytest.mark.parametrize("T", [0.75, 4.0])
def test_temperature_rows_equal_to_the_float_temperature(ops, T):
    """temperature_rows all T (contiguous, or a 0-stride view) gives the float T's outputs bit for bit (1/T is the
    same float); d_T of a 0-stride view of one T summed over the rows is the derivative by that one T."""
    s, t = logits(3, 40, seed=141, dtype=torch.bfloat16), logits(3, 40, seed=142)
    for name, call in row_calls(ops, s, t).items():
        want = call(T, None, False)
        for T_rows in (stride0(T, 3), torch.full((3, 2), T)[:, 1]):  # 0-stride, and stride 2
            got = call(123.0, T_rows, True)  # the float is ignored
            for i, (g, w) in enumerate(zip(got[:-1], want[:-1])):
                assert same_bits(g.float(), w.float()).all(), (name, T_rows.stride(), i)
            # temperature_grad without temperature_rows: d_T by the float temperature, per row.
            assert same_bits(call(T, None, True)[-1], got[-1]).all(), name
    # One shared T requiring grad, expanded: the sum of d_T is its derivative.
    w = row_weights(3, 140)
    T64 = torch.tensor(T, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, -100, 4])
    (want,) = torch.autograd.grad((w.double() * kl_terms(s, t, T64.expand(3), False, labels)[0]).sum(), T64)
    d_T = row_calls(ops, s, t)["KL"](1.0, stride0(T, 3), True)[-1]
    torch.testing.assert_close(d_T.double().sum(), want, rtol=1e-4, atol=1e-5)


def test_temperature_rows_not_positive_give_nan(ops):
    """A row whose temperature is 0, negative or NaN: NaN terms, gradients and d_T; the other rows as at their own
    temperature."""
    s, t = logits(3, 33, seed=150), logits(3, 33, seed=151)
    T_rows = torch.tensor([2.0, 0.0, -1.5])
    for name, call in row_calls(ops, s, t).items():
        got = call(1.0, T_rows, True)
        good = call(2.0, None, True)
        for i, (g, w) in enumerate(zip(got, good)):
            g, w = g.reshape(3, -1).float(), w.reshape(3, -1).float()
            assert same_bits(g[0], w[0]).all(), (name, i, "row 0 at T = 2")
            if name == "KL" and i == 1:
                assert same_bits(g, w).all(), "CE takes no temperature"
                continue
            assert g[2].isnan().all(), (name, i, "T = -1.5: NaN")
            # Row 1 (T = 0) is an ignored token for KL and JSD (labels): 0 whatever its temperature.
            assert ((g[1] == 0) if name in ("KL", "JSD") else g[1].isnan()).all(), (name, i, "T = 0")
    # NaN and negative temperatures, without labels.
    for T in (-1.5, float("nan"), 0.0):
        rows = torch.tensor([1.0, T])
        kl, _, d_s, d_t, d_T = ops.cuda_kl_rows(s[:2], t[:2], 1.0, rows, True, None, None, -100, None, None, True,
                                                True, True)
        assert kl[1].isnan() and d_s[1].isnan().all() and d_t[1].isnan().all() and d_T[1].isnan(), T
        assert torch.isfinite(kl[0]) and torch.isfinite(d_T[0])
        jsd, d_s, d_t, d_T = ops.cuda_jsd_rows(s[:2], t[:2], 0.5, 1.0, rows, None, -100, None, True, True, True)
        assert jsd[1].isnan() and d_s[1].isnan().all() and d_t[1].isnan().all() and d_T[1].isnan(), T
        tckd, nckd, d_s, d_t, d_T = ops.cuda_dkd_rows(s[:2], t[:2], torch.tensor([0, 1]), 1.0, rows, None, None,
                                                      True, True, True)
        assert tckd[1].isnan() and nckd[1].isnan() and d_s[1].isnan().all() and d_t[1].isnan().all(), T
        assert d_T[1].isnan(), T


def test_temperature_rows_shape_is_checked(ops):
    s, t = logits(3, 10, seed=160), logits(3, 10, seed=161)
    with pytest.raises(RuntimeError, match="temperature_rows must have shape"):
        ops.cuda_kl_rows(s, t, 1.0, torch.ones(4), False, None, None, -100, None, None, False, False, True)
    with pytest.raises(RuntimeError, match="temperature_rows must have shape"):
        ops.cuda_jsd_rows(s, t, 0.5, 1.0, torch.ones(3, 1), None, -100, None, True, False, False)
    d_T = ops.cuda_dkd_rows(s[:0], t[:0], torch.zeros(0, dtype=torch.long), 1.0, torch.ones(0), None, None, False,
                            False, True)[-1]
    assert d_T.shape == (0,)


# --- KL, JSD, DKD on adversarial logits ------------------------------------------------------------------------
# The logit cases of tests/test_adversarial.py (offset 1e3, T = 0.05 and 100, float16 near 6e4, peaked and one-hot
# teachers, logits of +-1e4, -inf entries, one class) through the losses composed on the stand-in's operators
# (`fastkd.cuda.standin.losses`: `fastkd.kernel_losses` with the declared autograd, as the CUDA backend has it), judged
# by that module's rule: error <= 2 max(eager's error, a few roundings), against the float64 reference.

ADVERSARIAL_CASES = ["offset_1e3", "T=0.05", "T=100", "near_fp16_overflow_6e4", "peaked_teacher_+30",
                     "one_hot_teacher_-inf", "teacher_-inf_entries", "logits_1e4", "one_class"]
# The loss names of tests/test_adversarial.py and their calls, the same arguments as there.
ADVERSARIAL_CALLS = {
    "kd_loss": lambda L, A, s, t, T: L["kd_loss"](s, t, T),
    "kd_loss[ce]": lambda L, A, s, t, T: L["kd_loss"](s, t, T, target=A.dkd_target(s), ce_weight=0.1,
                                                      kd_weight=0.9),
    "kl_div_loss[forward]": lambda L, A, s, t, T: L["kl_div_loss"](
        s, t, T, direction="forward", labels=A.token_labels(s, -100), ignore_index=-100),
    "kl_div_loss[reverse]": lambda L, A, s, t, T: L["kl_div_loss"](
        s, t, T, direction="reverse", labels=A.token_labels(s, 7), ignore_index=7),
    "jsd_loss[beta=0.5]": lambda L, A, s, t, T: L["jsd_loss"](s, t, beta=0.5, temperature=T,
                                                              labels=A.token_labels(s, -100)),
    "jsd_loss[beta=0.1]": lambda L, A, s, t, T: L["jsd_loss"](s, t, beta=0.1, temperature=T,
                                                              labels=A.token_labels(s, -100)),
    "dkd_loss": lambda L, A, s, t, T: L["dkd_loss"](s, t, A.dkd_target(s), temperature=T),
}


@pytest.fixture(scope="module")
def adversarial():
    """(tests/test_adversarial.py as a module, the stand-in's losses by name)."""
    import test_adversarial as A  # tests/ is on sys.path (as for `precision`)

    return A, standin.losses(standin.build())


def adversarial_params():
    for case in ADVERSARIAL_CASES:
        dtypes = ["fp32"] + (["fp16"] if case == "near_fp16_overflow_6e4" else []) + (
            ["bf16"] if case == "offset_1e3" else [])
        for loss in ADVERSARIAL_CALLS:
            for dtype in dtypes:
                yield pytest.param(loss, case, dtype, id=f"{loss}-{case}-{dtype}")


@pytest.mark.parametrize("loss_name, case_name, dtype", list(adversarial_params()))
def test_logit_losses_on_adversarial_inputs(adversarial, loss_name, case_name, dtype):
    A, losses = adversarial
    loss = next(x for x in A.LOSSES if x.name == loss_name)
    case = next(c for c in A.CASES if c.family == "logits" and c.name == case_name)
    dtype = A.DTYPES[dtype]
    s, t = A.case_inputs(case, dtype)
    T = case.T
    call = ADVERSARIAL_CALLS[loss_name]
    A.check_rule(lambda a, b: call(losses, A, a, b, T), lambda a, b: loss.ref(a, b, T),
                 lambda a, b: (loss.ref if dtype == torch.float32 else loss.eager)(a, b, T), s, t, "cpu")


@pytest.mark.parametrize("T", [0.05, 100.0])
def test_long_rows_match_the_triton_kernels(ops, T):
    """Rows longer than one Triton block (V = 2500 > rows.MAX_BLOCK_V: Triton's maxima-first path), offset by
    1e3: the stand-in's per-row terms and weighted gradients (random and 0-stride weights; both gradients, and the
    teacher's alone) against the Triton kernels in the interpreter (the same formulation, so the same values up to
    summation order), and the values against float64."""
    triton_ops = pytest.importorskip("fastkd.triton.kl")
    from fastkd.triton import dkd as triton_dkd
    from fastkd.triton import jsd as triton_jsd

    if triton_ops.torch.cuda.is_available():
        pytest.skip("compares on CPU tensors (Triton's interpreter)")
    s, t = logits(2, 2500, seed=70) + 1e3, logits(2, 2500, seed=71) + 1e3
    t[1, ::7] = float("-inf")
    target = torch.tensor([3, 2400])
    rtol = 2e-5  # a few float32 roundings: the same terms summed in another order
    rtol64 = 1e-2  # float64 sees the unrounded X / T: at |X / T| = 2e4 that alone moves KL by ~1e-3

    def close(got, want, what):
        r = rtol64 if want.dtype == torch.float64 else rtol
        torch.testing.assert_close(got, want.to(got.dtype), rtol=r, atol=1e-6, msg=lambda m: f"{what}: {m}")

    w_kl, w_ce = row_weights(2, 72), stride0(0.1, 2)
    # Both gradients, one (the kernel's other instance), and d_T alone from a 0-stride per-row temperature T.
    grads = [(None, True, True, False), (None, False, True, False), (stride0(T, 2), False, False, True)]
    for t_rows, student_grad, teacher_grad, t_grad in grads:
        got = ops.cuda_kl_rows(s, t, T, t_rows, False, target, None, -100, w_kl, w_ce, student_grad, teacher_grad,
                               t_grad)
        want = triton_ops.kl_rows(s, t, T, t_rows, False, target, None, -100, w_kl, w_ce, student_grad,
                                  teacher_grad, t_grad)
        for what, g, w in zip(["KL", "CE", "KL student grad", "KL teacher grad", "KL d_T"], got, want):
            close(g, w, what)
    close(got[0].double(), kl_reference(s.double(), t.double(), T, False, None, None)[0], "KL vs float64")
    for t_rows, student_grad, teacher_grad, t_grad in grads:
        got = ops.cuda_jsd_rows(s, t, 0.3, T, t_rows, None, -100, w_kl, student_grad, teacher_grad, t_grad)
        want = triton_jsd.jsd_rows(s, t, 0.3, T, t_rows, None, -100, w_kl, student_grad, teacher_grad, t_grad)
        for what, g, w in zip(["JSD", "JSD student grad", "JSD teacher grad", "JSD d_T"], got, want):
            close(g, w, what)
    close(got[0].double(), jsd_reference(s.double(), t.double(), 0.3, T, None)[0], "JSD vs float64")
    for t_rows, student_grad, teacher_grad, t_grad in grads:
        got = ops.cuda_dkd_rows(s, t, target, T, t_rows, w_kl, w_ce, student_grad, teacher_grad, t_grad)
        want = triton_dkd.dkd_rows(s, t, target, T, t_rows, w_kl, w_ce, student_grad, teacher_grad, t_grad)
        for what, g, w in zip(["TCKD", "NCKD", "DKD student grad", "DKD teacher grad", "DKD d_T"], got, want):
            close(g, w, what)
    want = dkd_reference(s.double(), t.double(), target, T)
    close(got[0].double(), want[0], "TCKD vs float64")
    close(got[1].double(), want[1], "NCKD vs float64")


# --- Rows staged in shared memory --------------------------------------------------------------------------------
# A row pair that fits in the block's shared memory (csrc/common.cuh `first_pass`) is read from global memory once and
# its later passes read the copy: the same values as the re-reading path, bit for bit, since the copy is exact.
# FASTKD_CUDA_STAGE_BYTES=0 turns staging off; the stand-in has an H100's 227 KiB per block.

STAGE_ENV = "FASTKD_CUDA_STAGE_BYTES"


def staged_and_reread(monkeypatch, call):
    """`call()` with rows staged (the default) and re-read (staging off)."""
    monkeypatch.delenv(STAGE_ENV, raising=False)
    staged = call()
    monkeypatch.setenv(STAGE_ENV, "0")
    reread = call()
    monkeypatch.delenv(STAGE_ENV)
    return staged, reread


def bitwise_equal(a, b):
    """The same shape, dtype and bit pattern (NaN payloads included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    as_int = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def staging_inputs(case):
    """Row pairs that exercise the copy: odd V (rows at every 16-byte phase), strided and offset views (the copy is
    contiguous, the global rows are not), mixed dtypes, -inf and NaN logits; an ignored token in each."""
    s, t = logits(3, 7, 37, seed=90), logits(3, 7, 37, seed=91)
    if case == "odd V":
        return s.reshape(21, 37), t.reshape(21, 37)
    if case == "strided":
        return s[:, :-1, 1:], t.transpose(0, 1).contiguous().transpose(0, 1)[:, :-1, 1:]
    if case == "bf16-fp32, -inf, NaN":
        s, t = s.reshape(21, 37).bfloat16(), t.reshape(21, 37)
        t[2, ::3] = float("-inf")
        s[4, 5] = float("nan")
        return s, t
    raise ValueError(case)


@pytest.mark.parametrize("case", ["odd V", "strided", "bf16-fp32, -inf, NaN"])
def test_staged_rows_give_the_rereading_path_bit_for_bit(ops, monkeypatch, case):
    s, t = staging_inputs(case)
    rows = s.numel() // s.shape[-1]
    target = torch.arange(rows) % s.shape[-1]
    labels = target.clone()
    labels[1] = -100
    w = row_weights(rows, 92)
    t_rows = torch.linspace(0.5, 3.0, rows)
    calls = {
        "KL": lambda: ops.cuda_kl_rows(s, t, 2.0, t_rows, False, target.reshape(s.shape[:-1]), labels, -100, w, w,
                                       True, True, True),
        "JSD": lambda: ops.cuda_jsd_rows(s, t, 0.3, 2.0, None, labels, -100, w, True, False, True),
        "DKD": lambda: ops.cuda_dkd_rows(s, t, target, 4.0, None, w, w, False, True, False),
    }
    for what, call in calls.items():
        staged, reread = staged_and_reread(monkeypatch, call)
        for i, (a, b) in enumerate(zip(staged, reread)):
            if case == "strided":
                # The copy is contiguous where the rows were not: its passes take the vector path, which hands the
                # columns to the threads in another order, so the sums are rounded in another order.
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True,
                                           msg=lambda m: f"{case}, {what}: output {i}: {m}")
            else:
                assert bitwise_equal(a, b), f"{case}, {what}: output {i} differs once staged"


def test_rows_staged_above_48_kib_and_rows_too_long_to_stage(ops, monkeypatch):
    """A float32 row pair of 13000 (104 KB: the kernel's shared-memory limit raised above the default 48 KiB, or the
    stand-in refuses the launch) and of 30000 (240 KB, more than an H100's 227 KiB per block: re-read)."""
    for V in (13000, 30000):
        s, t = logits(1, V, seed=93), logits(1, V, seed=94)
        staged, reread = staged_and_reread(
            monkeypatch, lambda: ops.cuda_kl_rows(s, t, 2.0, None, False, None, None, -100, None, None, True, True,
                                                  False))
        for a, b in zip(staged, reread):
            assert bitwise_equal(a, b), V
        check(staged[0], kl_reference(s, t, 2.0, False, None, None)[0], f"KL, V = {V}")


def test_the_stage_cap_is_checked(ops, monkeypatch):
    s, t = logits(2, 9, seed=95), logits(2, 9, seed=96)
    monkeypatch.setenv(STAGE_ENV, "lots")
    with pytest.raises(ValueError, match="FASTKD_CUDA_STAGE_BYTES must be a number of bytes"):
        ops.cuda_jsd_rows(s, t, 0.5, 1.0, None, None, -100, None, False, False, False)


# --- Sparse-teacher KD (csrc/sparse.cu) ---------------------------------------------------------------------------
# cuda_sparse_kd_rows against the reference's per-row loss (fastkd/reference/sparse.py) and its autograd gradient of
# the weighted sum, and against the Triton launcher in the interpreter (the same formulation: a few float32 ulps).

def sparse_reference(s, ids, lp, tail, T, labels, ignore_index=-100):
    from fastkd.reference import sparse as SP
    rows = SP.sparse_kd_rows(s, ids, lp, tail, T).reshape(-1).float()
    if labels is not None:
        rows = torch.where(labels.reshape(-1) != ignore_index, rows, 0.0)
    return [rows]


def check_sparse(ops, s, ids, lp, tail, T=1.0, labels=None, what=""):
    """The loss (NaN rows included) and the weighted gradient against the reference; without the gradient the same
    loss bit for bit and an empty (0,) gradient. Returns (loss, d_student)."""
    rows = s.numel() // s.shape[-1]
    w = row_weights(rows, 80)
    loss, d_s = ops.cuda_sparse_kd_rows(s, ids, lp, tail, T, labels, -100, w, True)
    reference = lambda s: sparse_reference(s, ids, lp, tail, T, labels)  # noqa: E731
    torch.testing.assert_close(loss, reference(s)[0], rtol=1e-4, atol=1e-5, equal_nan=True,
                               msg=lambda m: f"{what} {tail}: loss: {m}")
    (want,) = reference_grads(reference, [s], [w])
    check(d_s, want, f"{what} {tail}: student grad", s.dtype)
    assert d_s.is_contiguous() and d_s.shape == s.shape
    loss2, d_none = ops.cuda_sparse_kd_rows(s, ids, lp, tail, T, labels, -100, None, False)
    assert d_none.shape == (0,) and d_none.dtype == s.dtype
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0, equal_nan=True)
    return loss, d_s


def sparse_slots(rows, V, k, seed, mass=0.9):
    """k distinct ids per row and their log-probabilities, summing to `mass` (< 1: a bucket tail)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(rows)])
    p = torch.rand(rows, k, generator=g) + 0.1
    return ids, (mass * p / p.sum(-1, keepdim=True)).log()


SPARSE_TAILS = [("renormalize", 2.0), ("bucket", 1.0), ("none", 1.0)]


@pytest.mark.parametrize("tail, T", SPARSE_TAILS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_kd_rows(ops, tail, T, dtype):
    """V small and odd; an unused slot holding an out-of-range id (never read), a duplicated id, int32 ids and
    bf16 log-probabilities; (2, 2) leading dims."""
    V, k = 37, 5
    s = logits(2, 2, V, seed=81, dtype=dtype)
    ids, lp = sparse_slots(4, V, k, seed=82)
    ids[1, 4], lp[1, 4] = 999, float("-inf")
    ids[2, 3] = ids[2, 1]  # a duplicate
    check_sparse(ops, s, ids.reshape(2, 2, k), lp.reshape(2, 2, k), tail, T, what=str(dtype))
    check_sparse(ops, s, ids.reshape(2, 2, k).int(), lp.reshape(2, 2, k).bfloat16(), tail, T, what="int32/bf16")


@pytest.mark.parametrize("tail, T", SPARSE_TAILS)
def test_sparse_kd_rows_unusual_rows(ops, tail, T):
    """k = V (every id once), a row of unused slots only, a used id out of range (NaN loss, zero gradient), an
    ignored token (loss 0, zero gradient), duplicates of one id; k = 1; a strided student."""
    V = 7
    s = logits(5, V, seed=83)
    ids = torch.stack([torch.randperm(V, generator=torch.Generator().manual_seed(i)) for i in range(5)])
    lp = torch.log_softmax(logits(5, V, seed=84), -1)
    lp[1] = float("-inf")  # nothing said about this token
    ids[2, 3] = V  # used, out of range: NaN
    ids[4, :3] = 2  # id 2 three times
    labels = torch.tensor([0, 1, 2, -100, 4])
    loss, d_s = check_sparse(ops, s, ids, lp, tail, T, labels=labels, what="k = V")
    assert loss[2].isnan() and (d_s[2] == 0).all() and loss[3] == 0 and (d_s[3] == 0).all()
    assert loss[1] == 0 and (d_s[1] == 0).all()
    one_id, one_lp = sparse_slots(3, V, 1, seed=85, mass=0.6)
    check_sparse(ops, s[:3], one_id, one_lp, tail, T, what="k = 1")
    wide = logits(3, V + 2, seed=86)
    check_sparse(ops, wide[:, 1:-1], ids[:3], lp[:3], tail, T, what="strided")


@pytest.mark.parametrize("tail, T", SPARSE_TAILS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_kd_rows_long_rows_staged_and_reread(ops, monkeypatch, tail, T, dtype):
    """V = 1037 (several columns per thread and the vector path), 2 rows, k = 40 with a duplicate: the staged row
    (the default) and the re-read one (FASTKD_CUDA_STAGE_BYTES=0) give the same bits, both the reference's."""
    V, k = 1037, 40
    s = logits(2, V, seed=87, dtype=dtype)
    ids, lp = sparse_slots(2, V, k, seed=88, mass=0.7)
    ids[1, 7] = ids[1, 30]
    call = lambda: ops.cuda_sparse_kd_rows(s, ids, lp, tail, T, None, -100, row_weights(2, 89), True)  # noqa: E731
    staged, reread = staged_and_reread(monkeypatch, call)
    for a, b in zip(staged, reread):
        assert bitwise_equal(a, b), f"{tail}: staged and re-read rows differ"
    monkeypatch.setenv(STAGE_ENV, "0")
    check_sparse(ops, s, ids, lp, tail, T, what="re-read")
    monkeypatch.delenv(STAGE_ENV)
    check_sparse(ops, s, ids, lp, tail, T, what="staged")


def test_sparse_kd_rows_far_bucket_tail(ops):
    """Bucket with the logits outside the set far below the max (more than TAIL_FAR): the tail's sum takes its own
    shift, so its mass is not lost to underflow: the reference's loss and gradient."""
    V, k = 301, 6
    s = logits(2, V, seed=90) - 60.0
    ids, lp = sparse_slots(2, V, k, seed=91, mass=0.8)
    s[torch.arange(2).unsqueeze(1), ids] += 70.0  # the set ~70 above the rest
    check_sparse(ops, s, ids, lp, "bucket", 1.0, what="far tail")


def test_sparse_kd_rows_bucket_bitmap_in_global_memory(ops):
    """A row whose bitmap (V / 8 bytes) exceeds the block's shared memory (the stand-in's 227 KiB: V > ~1.86M): the
    bitmap is a zeroed global scratch, the row re-read (too long to stage); the reference's loss and gradient."""
    V, k = 1_900_003, 6
    s = logits(1, V, seed=95)
    ids, lp = sparse_slots(1, V, k, seed=96, mass=0.5)
    ids[0, 0] = V - 1  # the last word of the bitmap
    check_sparse(ops, s, ids, lp, "bucket", 1.0, what="global bitmap")


@pytest.mark.parametrize("tail, T", SPARSE_TAILS)
def test_sparse_kd_rows_match_the_triton_kernel(ops, tail, T):
    """The stand-in against fastkd/triton/sparse.py in the interpreter on the same rows (V = 1037 and 37, a
    duplicate, an unused slot, an out-of-range id, an ignored token, weights): the same formulation, so the loss
    and the gradient agree to a few float32 roundings (summation order)."""
    triton_sparse = pytest.importorskip("fastkd.triton.sparse")
    if triton_sparse.torch.cuda.is_available():
        pytest.skip("compares on CPU tensors (Triton's interpreter)")
    for V, k in ((1037, 24), (37, 6)):
        s = logits(4, V, seed=92) + 1e2
        ids, lp = sparse_slots(4, V, k, seed=93)
        ids[0, 2] = ids[0, 5]
        lp[1, 0] = float("-inf")
        ids[1, 0] = -5
        ids[2, 1] = V + 3
        labels = torch.tensor([0, 1, 2, -100])
        w = row_weights(4, 94)
        got = ops.cuda_sparse_kd_rows(s, ids, lp, tail, T, labels, -100, w, True)
        want = triton_sparse.sparse_kd_rows(s, ids, lp, tail, T, labels, -100, w, True)
        for what, g, x in zip(("loss", "student grad"), got, want):
            torch.testing.assert_close(g, x, rtol=2e-5, atol=1e-7, equal_nan=True,
                                       msg=lambda m: f"{tail}, V = {V}: {what}: {m}")


# --- The backward: scale_rows_ ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scale_rows(ops, dtype):
    """Row r times scale[r] in place, rounded once to d's dtype (0 times inf is NaN, as autograd); a row whose
    scale is exactly 1 is not written (a sentinel NaN stays bit for bit; a NaN scale is a multiply)."""
    d = logits(2, 3, 301, seed=60, dtype=dtype)
    d[0, 1:, 5] = float("inf")  # in the row scaled by 1, and in the one scaled by 0
    d[1, 2, 7] = float("nan")
    scale = torch.tensor([2.0, 1.0, 0.0, -0.3, 1.0, float("nan")])
    want = (d.float() * scale.reshape(2, 3, 1)).to(dtype)
    for s in (scale, torch.stack([scale, scale], 1)[:, 1]):  # contiguous, and stride 2
        got = d.clone()
        assert ops.cuda_scale_rows_(got, s) is None
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        assert same_bits(got.float()[0, 1], d.float()[0, 1]).all()  # scale 1: the inf row untouched
        assert got[0, 2, 5].isnan()  # 0 * inf
    # A 0-stride scale: 1 touches nothing (a buffer of NaNs with a payload stays bit for bit); others multiply
    # every row.
    ints, payload = {torch.float32: (torch.int32, 0x7FA00001), torch.bfloat16: (torch.int16, 0x7FC1),
                     torch.float16: (torch.int16, 0x7E01)}[dtype]
    sentinel = torch.full((4, 37), payload, dtype=ints)
    ops.cuda_scale_rows_(sentinel.view(dtype), stride0(1.0, 4))
    assert (sentinel == payload).all()
    d = logits(4, 37, seed=61, dtype=dtype)
    got = d.clone()
    ops.cuda_scale_rows_(got, stride0(0.5, 4))
    torch.testing.assert_close(got, (d.float() * 0.5).to(dtype), rtol=0, atol=0)
    ops.cuda_scale_rows_(torch.empty(0, dtype=dtype), torch.empty(0))  # nothing to scale


def test_scale_rows_touches_no_memory_where_the_scale_is_1(ops):
    """The rows with scale 1 are neither read nor written: a buffer whose rows hold a non-canonical NaN payload
    (which a float multiply would make canonical) keeps it, and the other rows are scaled."""
    d = torch.full((3, 64), 0, dtype=torch.int32).add_(0x7FA00001).view(torch.float32)  # a payload NaN
    d[1] = torch.arange(64, dtype=torch.float32)
    ops.cuda_scale_rows_(d, torch.tensor([1.0, 3.0, 1.0]))
    assert (d.view(torch.int32)[[0, 2]] == 0x7FA00001).all()
    torch.testing.assert_close(d[1], 3.0 * torch.arange(64, dtype=torch.float32), rtol=0, atol=0)


# --- Attention transfer ---------------------------------------------------------------------------------------

def at_map_reference(f, p):
    return [f.to(torch.promote_types(f.dtype, torch.float32)).pow(p).mean(1).reshape(f.shape[0], -1)]


@pytest.mark.parametrize("p", [1, 2, 3, 2.5, 4, 5, 2.3, 0.5, -1.5, 0])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_attention_map(ops, p, channels_last, dtype):
    f = logits(2, 5, 7, 9, seed=40, dtype=dtype, scale=1.0)
    if not float(p).is_integer():
        f = f.abs()  # a non-integer power of a negative entry is NaN
    if channels_last:
        f = f.to(memory_format=torch.channels_last)
    a = ops.cuda_at_channel_mean_pow(f, float(p))
    want = at_map_reference(f, p)[0].float()
    check(a, want, "map")
    grad = row_weights(a.numel(), 6).reshape(a.shape)
    df = ops.cuda_at_channel_mean_pow_backward(grad, f, float(p))
    assert df.stride() == f.stride()
    (want_df,) = reference_grads(lambda f: at_map_reference(f, p), [f], [grad.to(want.dtype)])
    check(df, want_df, "map grad", dtype)



# The power element by element (C = 1: the map is f^p, the gradient p f^(p-1) for an incoming 1), as the Triton
# kernel's (fastkd/triton/attention.py, "Pow"; tests/test_triton_rkd_at.py, test_at_pow_accuracy and
# test_at_pow_special_values). Integer and half-integer powers (forward q = p, backward q = p - 1) use the same
# float32 operations in both: bit for bit the Triton interpreter's results wherever the truth is at least
# 2^-100 (below, the interpreter's Dekker product and the FMA lose different bits of the underflowing error terms).
# Other fractions use exp2/log2 (libm's here, NumPy's there): against float64 within the Triton tests' CPU bound.
AT_POWERS = [1, 2, 3, 5, 2.5, 2.3, 0.5, -1.5, 0]
AT_SPECIAL = [0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-40,
              1e-45, 1.1e-38, -1.1e-38, 3e38, 1e-20, 1e20, 1.7, -1.7]
U = 2.0 ** -24


def at_pow_inputs(p, n=200):
    """Random (signed where p is an integer), offset 1e3, scales 1e4 and 1e-4, wide (e^+-20) and special values."""
    g = torch.Generator().manual_seed(90)
    x = torch.cat([torch.randn(n, generator=g), 1e3 + torch.randn(n, generator=g), 1e4 * torch.randn(n, generator=g),
                   1e-4 * torch.randn(n, generator=g), torch.empty(n).uniform_(-20, 20, generator=g).exp()])
    return torch.cat([x if float(p).is_integer() else x.abs(), torch.tensor(AT_SPECIAL)])


def at_pow_exact_route(q):
    return float(2 * q).is_integer()  # integer or half-integer: products and sqrt_rn only


def same_bits(got, want):
    """Equal bit patterns (signed zeros included), or both NaN."""
    got, want = got.reshape(-1), want.reshape(-1)
    return (got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())


@pytest.fixture(scope="module")
def triton_at():
    pytest.importorskip("triton")
    import fastkd.triton as fkt
    if fkt.unavailable_reason(torch.device("cpu")) is not None:
        pytest.skip("the Triton kernels on CPU tensors need TRITON_INTERPRET=1")
    from fastkd.triton import attention
    return attention


@pytest.mark.parametrize("p", AT_POWERS)
def test_attention_pow_matches_triton_and_float64(ops, triton_at, p):
    x = at_pow_inputs(p)
    f, ones = x.reshape(1, 1, 1, -1), torch.ones(1, x.numel())
    truth = {"f^p": x.double().pow(p), "p f^(p-1)": p * x.double().pow(p - 1) if p != 0 else torch.zeros(x.shape)}
    for (what, q), got, want in zip([("f^p", p), ("p f^(p-1)", p - 1)],
                                    [ops.cuda_at_channel_mean_pow(f, float(p)),
                                     ops.cuda_at_channel_mean_pow_backward(ones, f, float(p))],
                                    [triton_at.at_channel_mean_pow(f, p), triton_at.at_channel_mean_pow_backward(ones, f, p)]):
        got, want, w64 = got.reshape(-1), want.reshape(-1), truth[what]
        normal = (w64.abs() >= 2.0 ** -100) & (w64.abs() <= torch.finfo(torch.float32).max)
        if at_pow_exact_route(q):
            same = same_bits(got, want)
            assert same[normal | ~torch.isfinite(w64) | (w64 == 0)].all(), (
                f"p = {p}, {what}: differs from Triton at x = {x[~same & normal][:5].tolist()}: "
                f"{got[~same & normal][:5].tolist()} vs {want[~same & normal][:5].tolist()}")
        rel = torch.cat([((got.double() - w64) / w64).abs()[normal], torch.zeros(1, dtype=torch.float64)])
        bound = (1.05 if at_pow_exact_route(q) else 4.0) * U
        assert rel.max().item() <= bound, f"p = {p}, {what}: {rel.max().item() / U:.2f} u > {bound / U:.2f} u"
        tiny = (w64 != 0) & (w64.abs() < 2.0 ** -100)  # the pair's low part subnormal: a few ulp, or of 2^-149
        assert ((got.double() - w64).abs() <= 8 * U * w64.abs() + 2.0 ** -147)[tiny].all(), f"p = {p}, {what}: tiny"


@pytest.mark.parametrize("p", [0, 1, 2, 3, 4, 5, 33, 0.5, 1.5, 2.5, 0.3, 2.3, 0.7, -1, -2, -3, -0.5, -1.5, -2.3, 1e10])
def test_attention_pow_special_values(ops, p):
    """torch.pow's values and its backward at 0, -0, +-1, +-inf, NaN, subnormals (the stand-in does not flush
    them, as --use_fast_math does: csrc/attention.cu), overflow and underflow; a non-finite p is an error."""
    x = torch.tensor(AT_SPECIAL)
    f, ones = x.reshape(1, 1, 1, -1), torch.ones(1, x.numel())
    torch.testing.assert_close(ops.cuda_at_channel_mean_pow(f, float(p)).reshape(-1), x.pow(p), rtol=3e-7, atol=0,
                               equal_nan=True)
    xx = x.clone().requires_grad_()
    xx.pow(p).sum().backward()
    torch.testing.assert_close(ops.cuda_at_channel_mean_pow_backward(ones, f, float(p)).reshape(-1), xx.grad,
                               rtol=3e-7, atol=0, equal_nan=True)


@pytest.mark.parametrize("p", [float("inf"), -float("inf"), float("nan")])
def test_attention_non_finite_power_is_an_error(ops, p):
    f = torch.ones(1, 2, 3, 3)
    with pytest.raises(ValueError, match="finite power"):
        ops.cuda_at_channel_mean_pow(f, p)
    with pytest.raises(ValueError, match="finite power"):
        ops.cuda_at_channel_mean_pow_backward(torch.ones(1, 9), f, p)


def at_adversarial_maps(case):
    """tests/test_adversarial.py's map cases (one side): (2, 4, 5, 5) maps."""
    g = torch.Generator().manual_seed(41)
    f = torch.randn(2, 4, 5, 5, generator=g)
    if case == "offset_1e3":
        return f + 1e3
    if case == "zero_maps":
        f[1] = 0.0
        f[0, 2] = 0.0
        return f
    return f * {"scale_1e4": 1e4, "scale_1e-4": 1e-4, "random": 1.0}[case]


@pytest.mark.parametrize("case", ["random", "offset_1e3", "scale_1e-4", "scale_1e4", "zero_maps"])
@pytest.mark.parametrize("p", [1, 2, 3, 5, 2.5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_adversarial_maps(ops, triton_at, case, p, channels_last):
    """The map against float64 (the channel sum of C = 4 powers: within 6 u of mean_c |f|^p), the gradient bit for
    bit the Triton interpreter's (the same operations, element by element) and within 3 u of float64."""
    f = at_adversarial_maps(case)
    if not float(p).is_integer():
        f = f.abs()
    if channels_last:
        f = f.to(memory_format=torch.channels_last)
    f64 = f.double()
    a = ops.cuda_at_channel_mean_pow(f, float(p))
    scale = f64.abs().pow(p).mean(1).reshape(2, -1)
    assert ((a.double() - f64.pow(p).mean(1).reshape(2, -1)).abs() <= 6 * U * scale).all(), f"{case} map"
    grad = row_weights(a.numel(), 7).reshape(a.shape)
    df = ops.cuda_at_channel_mean_pow_backward(grad, f, float(p))
    assert df.stride() == f.stride()
    assert same_bits(df, triton_at.at_channel_mean_pow_backward(grad, f, p)).all(), f"{case} grad against Triton"
    df64 = p * f64.pow(p - 1) * grad.double().reshape(2, 1, 5, 5) / 4
    assert ((df.double() - df64).abs() <= 3 * U * df64.abs()).all(), f"{case} grad against float64"

# --- Planted faults are caught ---------------------------------------------------------------------------------

# (file, line, replacement): the first occurrence is replaced in a copy of csrc/.
PLANTED = [
    # kl.cu's forward sums without the 1/T on the teacher (the maxima keep it): invisible at T = 1.
    ("kl.cu", "const float a = scaled(x_raw, inv_temperature) - m_x;", "const float a = x_raw - m_x;"),
    # kl.cu's gradient pass weights the CE term with the row's KL weight: invisible where the two are equal.
    ("kl.cu", "const float g_ce = has_ce ? weights.at(1, row) : 0.0f;",
     "const float g_ce = has_ce ? weights.at(0, row) : 0.0f;"),
    # attention.cu's channels-last lane reduction skips its first shuffle (the upper half of the lanes): only
    # the warp emulation computes this sum.
    ("attention.cu", "offset = static_cast<int>(blockDim.x) / 2;", "offset = static_cast<int>(blockDim.x) / 4;"),
]


def planted_build(library, faults, only):
    """The stand-in built from a copy of csrc/ with `faults` planted, under its own library, of the kernel files
    `only`. The copy sits in a fixed folder of the extension cache and is rewritten only where it changed, so the
    build is reused."""
    from torch.utils import cpp_extension

    source = standin.cuda_build.CSRC
    copy = Path(cpp_extension._get_build_directory(library, False)) / "csrc"
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        text = path.read_text()
        for name, line, replacement in faults:
            if path.name == name:
                assert line in text, f"{name} changed: update the planted fault"
                text = text.replace(line, replacement, 1)
        target = copy / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_file() or target.read_text() != text:
            target.write_text(text)
    return standin.build(library, csrc=copy, only=only)


@pytest.fixture(scope="module")
def planted_ops():
    return planted_build("fastkd_standin_planted", PLANTED, only=[name for name, _, _ in PLANTED])


def test_a_planted_temperature_fault_is_caught(planted_ops):
    s, t = logits(3, 50, seed=50), logits(3, 50, seed=51)
    check(planted_ops.cuda_kl_rows(s, t, 1.0, None, False, None, None, -100, None, None, False, False, False)[0],
          kl_reference(s, t, 1.0, False, None, None)[0], "KL at T = 1")
    with pytest.raises(AssertionError, match="KL at T = 2"):
        check(planted_ops.cuda_kl_rows(s, t, 2.0, None, False, None, None, -100, None, None, False, False, False)[0],
              kl_reference(s, t, 2.0, False, None, None)[0], "KL at T = 2")


def test_a_planted_weight_fault_is_caught(planted_ops):
    s, t = logits(3, 50, seed=53), logits(3, 50, seed=54)
    target = torch.tensor([0, 17, 49])
    reference = lambda s, t: kl_reference(s, t, 1.0, False, target, None)  # noqa: E731
    for w_ce, what in ((row_weights(3, 55), "equal weights"), (stride0(0.1, 3), "other CE weight")):
        w_kl = row_weights(3, 55)
        d_s = planted_ops.cuda_kl_rows(s, t, 1.0, None, False, target, None, -100, w_kl, w_ce, True, False, False)[2]
        want = reference_grads(reference, [s, t], [w_kl, w_ce])[0]
        if what == "equal weights":
            check(d_s, want, what)
        else:
            with pytest.raises(AssertionError, match=what):
                check(d_s, want, what)


@pytest.fixture(scope="module")
def planted_staging_ops():
    """The stand-in with a fault in the copy of a staged row only (its x doubled), under its own library."""
    return planted_build("fastkd_standin_planted_staging",
                         [("common.cuh", "out_x = x_raw;", "out_x = 2.0f * x_raw;")], only=["kl.cu"])


def test_a_planted_staging_fault_is_caught_and_staging_can_be_turned_off(planted_staging_ops, monkeypatch):
    """Rows are staged by default (the fault in the copy shows), and FASTKD_CUDA_STAGE_BYTES=0 re-reads them
    (it does not)."""
    s, t = logits(3, 50, seed=97), logits(3, 50, seed=98)
    want = kl_reference(s, t, 2.0, False, None, None)[0]
    call = lambda: planted_staging_ops.cuda_kl_rows(s, t, 2.0, None, False, None, None, -100, None, None,  # noqa: E731
                                                    False, False, False)[0]
    staged, reread = staged_and_reread(monkeypatch, call)
    check(reread, want, "KL re-read")
    with pytest.raises(AssertionError, match="KL staged"):
        check(staged, want, "KL staged")


def test_a_planted_shuffle_fault_is_caught(planted_ops):
    f = logits(2, 6, 5, 5, seed=52, scale=1.0)
    check(planted_ops.cuda_at_channel_mean_pow(f, 2.0), at_map_reference(f, 2)[0], "map, channels first")
    f = f.to(memory_format=torch.channels_last)
    with pytest.raises(AssertionError, match="map, channels last"):
        check(planted_ops.cuda_at_channel_mean_pow(f, 2.0), at_map_reference(f, 2)[0], "map, channels last")


# --- RKD ------------------------------------------------------------------------------------------------------
# The RKD ops against float64 formulas and the Triton ops, and the losses composed from them (as
# fastkd.kernel_losses composes the "cuda" backend) against float64 on near-duplicate rows, clusters and offsets,
# by the tolerance rule of tests/test_adversarial.py: accurate, not excused.

def sq_distances64(x):
    x = x.double()
    return ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)


def close_rows(B, D, gap, seed, offset=0.0):
    x = logits(B, D, seed=seed, scale=1.0) + offset
    x[B - 1] = x[0] + gap * logits(D, seed=seed + 1, scale=1.0)
    x[B - 2] = x[0] - gap * logits(D, seed=seed + 2, scale=1.0)
    return x


@pytest.mark.parametrize("B,D", [(1, 3), (2, 3), (7, 17), (33, 5), (70, 9)])
def test_rkd_sq_distances(ops, B, D):
    x = logits(B, D, seed=B + D, scale=1.0)
    d2 = ops.cuda_rkd_sq_distances(x)
    torch.testing.assert_close(d2.double(), sq_distances64(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(d2, d2.T) and torch.all(d2.diagonal() == 0)


@pytest.mark.parametrize("B,D", [(2, 3), (7, 17), (40, 70)])
def test_rkd_weighted_diff(ops, B, D):
    """sum_k w_mk (x_m - x_k) within a few ulp of float64 relative to its terms, on rows 1e-5 apart near a large
    offset (where the matmul form loses everything); tiles partial in both m and d."""
    x = close_rows(B, D, 1e-5, seed=B, offset=30.0) if B > 2 else logits(B, D, seed=B, scale=1.0)
    w = logits(B, B, seed=B + 1, scale=1.0)
    w = w + w.T
    diff = x.double()[:, None, :] - x.double()[None, :, :]
    want = (w.double()[:, :, None] * diff).sum(1)
    terms = (w.double().abs()[:, :, None] * diff.abs()).sum(1)
    got = ops.cuda_rkd_weighted_diff(w, x).double()
    assert ((got - want).abs() <= 8 * 2.0 ** -24 * terms).all()


@pytest.mark.parametrize("B", [2, 7, 33, 40])
@pytest.mark.parametrize("units", [(False, False), (True, False), (False, True)])
def test_rkd_angle_ops_match_triton(ops, B, units):
    """The angle sum and its gradient weights from the same float64 distance pairs as the Triton kernels (in the
    interpreter): the same formulas, so equal up to the order of the sums (several tiles at B = 33, 40)."""
    triton_rkd = pytest.importorskip("fastkd.triton.rkd")
    from fastkd.rkd_autograd import sq_hi_lo
    xs = close_rows(B, 1 if units[0] else 6, 1e-4, seed=B + 60) if B > 2 else logits(B, 6, seed=B, scale=1.0)
    xt = logits(B, 1 if units[1] else 9, seed=B + 61, scale=1.0)
    pairs = [*sq_hi_lo(xs), *sq_hi_lo(xt)]
    got = ops.cuda_rkd_angle_sum(*pairs, *units)
    want = triton_rkd.rkd_angle_sum(*pairs, *units)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)
    got_w = ops.cuda_rkd_angle_weights(*pairs, units[1])
    want_w = triton_rkd.rkd_angle_weights(*pairs, units[1])
    torch.testing.assert_close(got_w, want_w, rtol=2e-5, atol=2e-6 * want_w.abs().max().item())


@pytest.mark.parametrize("gap", [1e-2, 1e-3, 1e-4, 1e-5])
def test_rkd_losses_on_close_rows_within_the_tolerance_rule(ops, gap):
    """The issue's table: near-duplicate rows (student and teacher side), a tight cluster, a large offset, with
    the CUDA kernels' device code; error against float64 at most twice eager float32's (or 8 roundings)."""
    losses = standin.losses(ops)
    s = close_rows(16, 24, gap, seed=70, offset=50.0)
    t = close_rows(16, 12, gap, seed=80, offset=-20.0)
    cluster = 3.0 * logits(24, seed=90, scale=1.0) + gap * logits(16, 24, seed=91, scale=1.0)
    for name in ("rkd_loss", "rkd_angle_loss", "rkd_distance_loss"):
        for a, b, what in ((s, t, "near duplicates"), (t, s, "teacher near duplicates"), (cluster, t, "cluster")):
            results = []
            for fn, x, y in ((losses[name], a, b), (getattr(relational, name), a, b),
                             (getattr(relational, name), a.double(), b.double())):
                x = x.detach().clone().requires_grad_()
                value = fn(x, y)
                value.backward()
                results.append((value.detach().double(), x.grad.double()))
            (v, g), (v_eager, g_eager), (v64, g64) = results
            floor = 8 * 2.0 ** -24
            err, err_eager = abs(v - v64) / abs(v64), abs(v_eager - v64) / abs(v64)
            assert err <= 2 * max(err_eager, floor), (name, what, "value", err, err_eager)
            scale = g64.abs().max()
            err, err_eager = (g - g64).abs().max() / scale, (g_eager - g64).abs().max() / scale
            assert err <= 2 * max(err_eager, floor), (name, what, "grad", err, err_eager)
