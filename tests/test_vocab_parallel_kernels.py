"""The vocabulary-parallel slice kernels, one process, on every backend that has them: the Triton kernels
(fastkd/triton/vocab_parallel.py; Triton's interpreter on CPU) and their CUDA C++ twin (csrc/vocab_parallel.cu),
run on the CPU through the stand-in of tests/test_cuda_standin.py (csrc/ compiled with g++ and -DFASTKD_STANDIN,
the same build, the device code on CPU threads). Each shared test takes the `kernels` fixture, the backend's
`KernelSet`; a backend that cannot run here is skipped.

W ranks are simulated by cutting full rows into slices of the vocabulary: each op is called on each slice, the
row statistics combined in PyTorch as the collectives combine them (or the global normalisers taken from
float64), and
- the slices' (max, sum) against float64;
- the partial sums added over the slices against `reference.logits.divergence_rows` of the full rows in float64;
- the gradient slices, concatenated, against the closed-form single-process gradient in float64 (checked itself
  against the reference's autograd);
- the stand-in against the Triton twin (in the interpreter), where both run.

Tolerance: the kernels' error against float64 is at most about twice that of PyTorch computing the same in the
inputs' compute dtype (float32; the gradient rounded to the student's dtype, as `_StudentDivergence` returns it),
plus a floor of a few float32 ulps of the values' scale (PyTorch's own error can be 0 by chance), and for
bfloat16 gradients in Triton's interpreter one ulp (it truncates where a GPU rounds to nearest: precision.py).
The float64 reference forms `logits * (1/T)` per backend as each has always been judged: for Triton in the
reference's dtype, for the stand-in as the kernels form it (the float32 product, `scaled`).
"""
import pytest
import torch
from precision import rounding_slack

from fastkd import kernel_ops
from fastkd.cuda import standin
from fastkd.reference.logits import NEG_INF, divergence_rows, kl_rows, log_mixture

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("vocab_row_stats", "vocab_row_terms", "vocab_row_grad")
KINDS = ("forward", "reverse", "jsd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
U = 2.0 ** -24
BETA = 0.3
CUTS = [0, 1, 8, 45]  # three ranks: slices of width 1, 7 and 37 (three blocks of 16: `small_blocks`)
WIDE_CUTS = [0, 600, 1700]  # two ranks: 600 and 1100 columns, more than a block's threads (and vector chunks)


# --- the backends ----------------------------------------------------------------------------------------------

_KERNEL_SETS = {}  # backend -> its KernelSet, or why it cannot run here (loaded, and the stand-in built, once)


def _load(backend):
    if backend == "triton":
        try:
            import fastkd.triton as fkt
        except ImportError as error:
            return f"cannot import fastkd.triton: {error}"
        if fkt.unavailable_reason(torch.device(TRITON_DEVICE)) is not None:
            return "the Triton kernels cannot run here"
        return fkt.KERNELS
    reason = standin.unavailable_reason()
    if reason is not None:
        return f"cannot build the CUDA stand-in: {reason}"
    # the stand-in build of tests/test_cuda_standin.py (one compile, cached in torch's extension folder and shared
    # with that module in one session), with the declared fakes (fastkd.kernel_ops), as the "cuda" backend has it
    return standin.kernel_set(standin.build())


def kernel_set(backend):
    """The `KernelSet` of "triton" or "cuda" (the stand-in), or skip the test where it cannot run."""
    if backend not in _KERNEL_SETS:
        _KERNEL_SETS[backend] = _load(backend)
    if isinstance(_KERNEL_SETS[backend], str):
        pytest.skip(_KERNEL_SETS[backend])
    return _KERNEL_SETS[backend]


# The stand-in's ids say "standin" (CI's torch 2.11 stage leaves those out with -k "not standin", as it does
# tests/test_cuda_standin.py).
@pytest.fixture(params=["triton", pytest.param("cuda", id="standin")])
def kernels(request):
    return kernel_set(request.param)


@pytest.fixture
def triton():
    return kernel_set("triton")


@pytest.fixture
def cuda():
    return kernel_set("cuda")


@pytest.fixture
def blocks(kernels, request):
    """Triton: blocks of 16 columns (`small_blocks`), so the slices run through several blocks; nothing for the
    stand-in."""
    if kernels.backend == "triton":
        request.getfixturevalue("small_blocks")


@pytest.fixture(params=["staged", "re-read"])
def staging(request, monkeypatch):
    """The stand-in's stats kernel with its row pair staged in shared memory (where it fits) and re-read from
    memory (None: a backend without the choice)."""
    if request.param == "re-read":
        monkeypatch.setenv("FASTKD_CUDA_STAGE_BYTES", "0")
    return request.param


# the Triton kernels once, the stand-in staged and re-read (`kernels` and `staging` parametrized together)
STAGED = [pytest.param("triton", None, id="triton"), pytest.param("cuda", "staged", id="standin-staged"),
          pytest.param("cuda", "re-read", id="standin-re-read")]


def device_of(kernels):
    return TRITON_DEVICE if kernels.backend == "triton" else "cpu"


def inputs(rows, V, dtype, seed, scale=3.0, offset=0.0, teacher_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (offset + scale * torch.randn(rows, V, generator=g)).to(dtype)
    t = (offset + teacher_scale * torch.randn(rows, V, generator=g)).to(dtype)
    return s, t


def weights(rows, seed):
    return torch.rand(rows, generator=torch.Generator().manual_seed(seed)) + 0.5


def identity(x):
    return x


def transposed(x):
    """Column stride = rows."""
    return x.reshape(-1, x.shape[-1]).T.contiguous().T.reshape(x.shape)


def every_other(x):
    """Every other column of a wider buffer."""
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    return wide[..., ::2]


# --- float64 (and PyTorch float32) from the full rows ----------------------------------------------------------

def scaled(x, inv_t, dtype):
    """x * (1/T) as the kernels form it: the float32 product of the float32 logit and float32 1/T, then in dtype."""
    return (x.float() * torch.tensor(inv_t, dtype=torch.float32)).to(dtype)


def in_dtype(x, inv_t, dtype):
    """x * (1/T) in dtype (float64: the exact product; the kernels' float32 rounding of it counts as error)."""
    return x.to(dtype) * inv_t


PRODUCT = {"triton": in_dtype, "cuda": scaled}  # how each backend's reference forms x * (1/T)


def closed_form(s, t, inv_t, kind, beta, weight, dtype, product=scaled):
    """`(rows, student gradient)` of the whole vocabulary in `dtype`: `divergence_rows`, and the closed forms of
    `vocab_parallel._StudentDivergence` (the gradient rounded to the student's dtype, except in float64: the
    exact value, against which the kernel's rounding to that dtype counts as error, as PyTorch's does)."""
    lq = torch.log_softmax(product(s, inv_t, dtype), -1)
    lp = torch.log_softmax(product(t, inv_t, dtype), -1)
    rows = divergence_rows(lq, lp, kind, beta)
    q, p = lq.exp(), lp.exp()
    w = torch.ones(s.shape[:-1], dtype=dtype) if weight is None else weight.to(dtype).reshape(s.shape[:-1])
    w = w.unsqueeze(-1) * inv_t
    if kind == "forward":
        grad = w * (q - p)
    elif kind == "reverse":
        d = torch.where(q > 0, lq - lp, 0.0)
        grad = w * q * (d - kl_rows(lq, lp).unsqueeze(-1))
    else:
        log_m = log_mixture(lq, lp, beta)
        d = torch.where(q > 0, lq - log_m, 0.0)
        grad = w * (1 - beta) * q * (d - kl_rows(lq, log_m).unsqueeze(-1))
    return rows, grad if dtype == torch.float64 else grad.to(s.dtype)


def normalisers64(s, t, inv_t):
    """The global `shift` (max, 0 where not finite) and `log_total` of both sides, `(rows, 2)`, from float64."""
    x = torch.stack([scaled(s, inv_t, torch.float64).reshape(-1, s.shape[-1]),
                     scaled(t, inv_t, torch.float64).reshape(-1, s.shape[-1])], 1)
    big = x.amax(-1)
    shift = torch.where(torch.isfinite(big), big, 0.0)
    return shift.float(), torch.log(torch.exp(x - shift.unsqueeze(-1)).sum(-1)).float()


def combine(stats):
    """The collectives' combination of the slices' (maxima, sums): global shift and log_total."""
    m = torch.stack([st[0] for st in stats])  # (slices, rows, 2)
    big = m.amax(0)
    z = sum(torch.where(mi == NEG_INF, 0.0, zi * torch.exp(mi - big)) for mi, zi in stats)
    return torch.where(torch.isfinite(big), big, 0.0), torch.log(z)


def run_slices(K, s, t, inv_t, kind, beta, weight, cuts, view=identity, normalisers="stats"):
    """The ops on the slices `[cuts[i], cuts[i + 1])` of the last dim (each through `view`, e.g. a non-contiguous
    copy). `normalisers`: "stats" (the ops' own statistics, combined as the collectives do) or "float64".
    Returns `(rows, concatenated gradient)`."""
    slices = [(view(s[..., a:b]), view(t[..., a:b])) for a, b in zip(cuts[:-1], cuts[1:])]
    if normalisers == "stats":
        shift, log_total = combine([K.vocab_row_stats(x, y, inv_t) for x, y in slices])
    else:
        shift, log_total = normalisers64(s, t, inv_t)
    w = None if weight is None else weight.reshape(-1)
    parts, grads = [], []
    for x, y in slices:
        part, g = K.vocab_row_terms(x, y, inv_t, shift, log_total, kind, beta, w, kind == "forward")
        assert part.shape == (shift.shape[0], 2) and part.dtype == torch.float32
        if kind != "forward":
            assert g.shape == (0,) and g.dtype == x.dtype
        parts.append(part)
        grads.append(g)
    total = sum(parts)
    if kind == "jsd":
        rows = beta * total[:, 0] + (1 - beta) * total[:, 1]
        row_kl = total[:, 1]
    else:
        assert (total[:, 1] == 0).all()
        rows = row_kl = total[:, 0]
    if kind != "forward":
        grads = [K.vocab_row_grad(x, y, inv_t, shift, log_total, kind, beta, row_kl, w) for x, y in slices]
    for (x, _), g in zip(slices, grads):
        assert g.shape == x.shape and g.dtype == x.dtype and g.is_contiguous()
    return rows.reshape(s.shape[:-1]), torch.cat(grads, -1)


def max_err(got, want):
    """Max |got - want| where want is finite; the non-finite entries must match exactly (NaN with NaN)."""
    got, want = got.double().cpu(), want.double().cpu()
    finite = torch.isfinite(want)
    assert torch.equal(torch.isnan(got[~finite]), torch.isnan(want[~finite])), (got[~finite], want[~finite])
    assert torch.equal(got[~finite & ~torch.isnan(want)], want[~finite & ~torch.isnan(want)])
    return (got - want).abs()[finite].max().item() if finite.any() else 0.0


def check(K, s, t, inv_t, kind, weight, cuts, view=identity, beta=BETA, normalisers="stats"):
    """The slices of `K` (on its backend's device) against the single-process rows and gradient, by the rule in
    the module's docstring."""
    device = device_of(K)
    rows, grad = run_slices(K, s.to(device), t.to(device), inv_t, kind, beta,
                            None if weight is None else weight.to(device), cuts, view, normalisers)
    product = PRODUCT[K.backend]
    rows64, grad64 = closed_form(s.cpu(), t.cpu(), inv_t, kind, beta, weight, torch.float64, product)
    rows32, grad32 = closed_form(s.cpu(), t.cpu(), inv_t, kind, beta, weight, torch.float32, product)
    for what, got, want, torch_got in (("rows", rows, rows64, rows32), ("grad", grad, grad64, grad32)):
        assert got.shape == want.shape and got.dtype == torch_got.dtype, what
        scale = want[torch.isfinite(want)].abs().max().item() if torch.isfinite(want).any() else 1.0
        floor = 16 * U * max(scale, 1e-3 if what == "rows" else 0.0)
        if what == "grad" and s.dtype == torch.bfloat16 and K.backend == "triton" and device == "cpu":
            floor += rounding_slack(s.dtype, device, scale)  # the interpreter truncates to bfloat16
        ours, theirs = max_err(got, want), max_err(torch_got, want)
        assert ours <= 2 * theirs + floor, f"{what}: kernel error {ours:.3g} > 2 x PyTorch's {theirs:.3g} + {floor:.3g}"
    return rows, grad


# --- the closed forms themselves -----------------------------------------------------------------------------

@pytest.mark.parametrize("product", list(PRODUCT))
@pytest.mark.parametrize("kind", KINDS)
def test_closed_form_is_the_reference_gradient(kind, product):
    s, t = inputs(3, 11, torch.float64, seed=30)
    w = weights(3, 31).double()
    leaf = s.clone().requires_grad_()
    rows = divergence_rows(torch.log_softmax(leaf * 0.5, -1), torch.log_softmax(t * 0.5, -1), kind, BETA)
    want, = torch.autograd.grad((w * rows).sum(), leaf)
    _, grad = closed_form(s, t, 0.5, kind, BETA, w, torch.float64, PRODUCT[product])
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)


# --- row statistics --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(DTYPES))
def test_triton_row_stats_per_slice(triton, dtype, small_blocks):
    s, t = inputs(4, 37, DTYPES[dtype], seed=1)
    s[1, 5:9] = NEG_INF
    s[2] = NEG_INF  # a slice row all -inf
    t[3, :] = NEG_INF
    t[0, 2] = 30.0  # a peaked teacher
    for inv_t in (0.5, 1.0):
        m, z = triton.vocab_row_stats(s.to(TRITON_DEVICE), t.to(TRITON_DEVICE), inv_t)
        x = torch.stack([s, t], 1).double() * inv_t  # (rows, 2, V)
        m64 = x.amax(-1)
        z64 = torch.where(m64.unsqueeze(-1) == NEG_INF, 0.0, torch.exp(x - m64.unsqueeze(-1))).sum(-1)
        assert m.dtype == z.dtype == torch.float32 and m.shape == z.shape == (4, 2)
        assert torch.equal(m.cpu().double(), (torch.stack([s, t], 1).float() * inv_t).amax(-1).double())
        assert m[2, 0] == NEG_INF and z[2, 0] == 0 and m[3, 1] == NEG_INF and z[3, 1] == 0
        torch.testing.assert_close(z.cpu().double(), z64, rtol=8 * 37 * U, atol=0)


@pytest.mark.parametrize("V", [1, 7, 37, 1100])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_standin_row_stats(cuda, dtype, V, staging):
    s, t = inputs(4, V, DTYPES[dtype], seed=1)
    s[1, : max(V // 5, 1)] = NEG_INF
    s[2] = NEG_INF  # a slice row all -inf
    t[3] = NEG_INF
    t[0, V // 2] = 30.0  # a peaked teacher
    for inv_t in (0.5, 1 / 1.7):
        m, z = cuda.vocab_row_stats(s, t, inv_t)
        assert m.dtype == z.dtype == torch.float32 and m.shape == z.shape == (4, 2)
        x = torch.stack([scaled(s, inv_t, torch.float32), scaled(t, inv_t, torch.float32)], 1)  # (rows, 2, V)
        assert torch.equal(m, x.amax(-1))
        m64 = x.double().amax(-1, keepdim=True)
        z64 = torch.where(m64 == NEG_INF, 0.0, torch.exp(x.double() - m64)).sum(-1)
        assert m[2, 0] == NEG_INF and z[2, 0] == 0 and m[3, 1] == NEG_INF and z[3, 1] == 0
        torch.testing.assert_close(z.double(), z64, rtol=8 * V * U, atol=0)


@pytest.mark.parametrize(("kernels", "staging"), STAGED, indirect=True)
def test_row_stats_huge_logits_and_strides(kernels, staging):
    device = device_of(kernels)
    s, t = inputs(3, 64, torch.float32, seed=2, offset=1e4)
    wide = torch.cat([t, t.flip(-1)], -1)  # every other column
    s_t = s.T.contiguous().T  # column stride 3
    m, z = kernels.vocab_row_stats(s_t.to(device), wide[:, ::2].to(device), 1.0)
    torch.testing.assert_close(m[:, 0].cpu(), s.amax(-1), rtol=0, atol=0)
    torch.testing.assert_close(m[:, 1].cpu(), wide[:, ::2].amax(-1), rtol=0, atol=0)
    z64 = torch.exp(s.double() - s.double().amax(-1, keepdim=True)).sum(-1)
    torch.testing.assert_close(z[:, 0].cpu().double(), z64, rtol=8 * 64 * U, atol=0)


# --- partials summed over slices, and the gradient, against the single-process rows ---------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_slices_sum_to_the_whole(kernels, kind, dtype, blocks):
    s, t = inputs(5, 45, DTYPES[dtype], seed=3)
    check(kernels, s, t, 0.5, kind, None, CUTS)
    check(kernels, s, t, 1.0, kind, weights(5, 4), CUTS)
    check(kernels, s, t, 1 / 1.7, kind, weights(5, 4), CUTS, normalisers="float64")
    # a student in one dtype and a teacher in another
    check(kernels, s, t.float() if dtype != "fp32" else t.to(torch.bfloat16), 1.0, kind, weights(5, 5), CUTS)


@pytest.mark.parametrize("kind", KINDS)
def test_triton_slice_wider_than_the_streaming_block(triton, kind):
    """The default blocks: a slice of 2100 > rows.STREAM_BLOCK_V (2048) runs two blocks."""
    s, t = inputs(2, 2110, torch.float32, seed=15)
    check(triton, s, t, 0.5, kind, torch.tensor([0.5, 2.0]), [0, 10, 2110])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_standin_slices_wider_than_a_block(cuda, kind, dtype):
    s, t = inputs(2, 1700, DTYPES[dtype], seed=15)
    check(cuda, s, t, 0.5, kind, torch.tensor([0.5, 2.0]), WIDE_CUTS)


@pytest.mark.parametrize("kind", KINDS)
def test_masked_ids_and_an_all_minus_inf_slice_row(kernels, kind, blocks):
    """-inf at the same ids in both (masked ids), and rows whose whole first / last slices are -inf."""
    s, t = inputs(4, 45, torch.float32, seed=5)
    for x in (s, t):
        x[:, [3, 10, 20, 44]] = NEG_INF
        x[1, 8:45] = NEG_INF
        x[2, 0:1] = NEG_INF
    check(kernels, s, t, 0.5, kind, weights(4, 6), CUTS)
    check(kernels, s, t, 0.5, kind, None, CUTS, normalisers="float64")


@pytest.mark.parametrize("kind", KINDS)
def test_student_minus_inf_where_the_teacher_has_mass(kernels, kind, blocks):
    """Forward KL is +inf where q = 0 < p, reverse KL where p = 0 < q (`_kl_partial`); JSD stays finite."""
    s, t = inputs(3, 45, torch.float32, seed=7)
    s[0, 12] = NEG_INF
    t[1, 30] = NEG_INF
    device = device_of(kernels)
    rows, _ = run_slices(kernels, s.to(device), t.to(device), 1.0, kind, BETA, None, CUTS)
    rows64, _ = closed_form(s, t, 1.0, kind, BETA, None, torch.float64, PRODUCT[kernels.backend])
    if kind == "forward":
        assert rows[0] == float("inf") and torch.isfinite(rows[1:]).all()
    if kind == "reverse":
        assert rows[1] == float("inf") and torch.isfinite(rows[[0, 2]]).all()
    if kind == "jsd":
        assert torch.isfinite(rows).all()
    max_err(rows, rows64)
    if kind != "reverse":  # reverse: the inf row's gradient is NaN in both
        check(kernels, s, t, 1.0, kind, None, CUTS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_huge_logits(kernels, kind, dtype, blocks):
    s, t = inputs(3, 45, DTYPES[dtype], seed=8, offset=1e4)
    check(kernels, s, t, 1.0, kind, None, CUTS)
    check(kernels, s, t, 0.5, kind, weights(3, 9), CUTS)
    check(kernels, s, t, 0.5, kind, weights(3, 9), CUTS, normalisers="float64")


@pytest.mark.parametrize("kind", KINDS)
def test_peaked_teacher(kernels, kind, blocks):
    s, t = inputs(4, 45, torch.float32, seed=10, teacher_scale=30.0)
    t[0, 40] = 200.0
    check(kernels, s, t, 1.0, kind, None, CUTS)
    check(kernels, s, t, 0.25, kind, weights(4, 11), CUTS)


@pytest.mark.parametrize("kind", KINDS)
def test_close_rows(kernels, kind, blocks):
    """T = 100: the rows nearly agree and the divergence is second order in their difference."""
    s, t = inputs(3, 45, torch.float32, seed=12)
    check(kernels, s, t, 0.01, kind, None, CUTS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_strided_rows(kernels, kind, dtype, blocks):
    """Slices of a `(2, 3, V)` tensor (two leading strides, row stride V) and of `logits[:, :-1]` (a row view that
    is not contiguous, with a weight of stride 2), each also transposed (column stride = rows) and as every other
    column of a wider buffer."""
    s, t = inputs(6, 45, DTYPES[dtype], seed=13)
    layouts = [(s.reshape(2, 3, 45), t.reshape(2, 3, 45), weights(6, 14).reshape(2, 3))]
    s, t = inputs(8, 45, DTYPES[dtype], seed=13)
    layouts.append((s.reshape(2, 4, 45)[:, :-1], t.reshape(2, 4, 45)[:, :-1], weights(12, 14)[::2].reshape(2, 3)))
    for s3, t3, w in layouts:
        for view in (identity, transposed, every_other):
            check(kernels, s3, t3, 0.5, kind, w, CUTS, view)


def test_weights_and_pairs_by_their_strides(kernels):
    """Per-row weights and row KLs through their strides (an expanded 0-stride view), shift and log_total through
    theirs (a transposed (2, rows) buffer), None as 1."""
    K, device = kernels, device_of(kernels)
    s, t = (x.to(device) for x in inputs(3, 9, torch.float32, seed=16))
    shift = torch.zeros(3, 2, device=device)
    log_total = torch.stack([torch.logsumexp(s, -1), torch.logsumexp(t, -1)], -1)
    two = torch.full((1,), 2.0, device=device).expand(3)
    _, g1 = K.vocab_row_terms(s, t, 1.0, shift, log_total, "forward", 0.5, two, True)
    _, g2 = K.vocab_row_terms(s, t, 1.0, shift, log_total, "forward", 0.5, torch.full((3,), 2.0, device=device), True)
    _, g3 = K.vocab_row_terms(s, t, 1.0, shift, log_total, "forward", 0.5, None, True)
    assert torch.equal(g1, g2) and torch.equal(g1, g3 * 2)
    kl = torch.full((1,), 0.1, device=device).expand(3)
    for kind in ("reverse", "jsd"):
        assert torch.equal(K.vocab_row_grad(s, t, 1.0, shift, log_total, kind, 0.5, kl, two),
                           K.vocab_row_grad(s, t, 1.0, shift, log_total, kind, 0.5, kl.contiguous(), None) * 2)
    for kind in KINDS:
        part, _ = K.vocab_row_terms(s, t, 1.0, shift.T.contiguous().T, log_total.T.contiguous().T, kind, 0.5, None,
                                    False)
        part2, _ = K.vocab_row_terms(s, t, 1.0, shift, log_total, kind, 0.5, None, False)
        assert torch.equal(part, part2)
        # the partials do not change with the gradient flag
        if kind == "forward":
            assert torch.equal(K.vocab_row_terms(s, t, 1.0, shift, log_total, kind, 0.5, two, True)[0], part)


def test_gradient_dtype_and_refusals(kernels):
    K, device = kernels, device_of(kernels)
    s, t = (x.to(device) for x in inputs(2, 5, torch.bfloat16, seed=17))
    pair = torch.zeros(2, 2, device=device)
    zeros = torch.zeros(2, device=device)
    part, g = K.vocab_row_terms(s, t, 1.0, pair, pair, "forward", 0.5, None, True)
    assert g.dtype == torch.bfloat16 and g.shape == s.shape and part.dtype == torch.float32
    part, g = K.vocab_row_terms(s, t, 1.0, pair, pair, "reverse", 0.5, None, False)
    assert g.shape == (0,) and g.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="forward' only"):
        K.vocab_row_terms(s, t, 1.0, pair, pair, "reverse", 0.5, None, True)
    with pytest.raises(ValueError, match="kind must be"):
        K.vocab_row_terms(s, t, 1.0, pair, pair, "kl", 0.5, None, False)
    with pytest.raises(ValueError, match="0 < beta < 1"):
        K.vocab_row_grad(s, t, 1.0, pair, pair, "jsd", 1.0, zeros, None)
    with pytest.raises(ValueError, match="kind 'forward'"):
        K.vocab_row_grad(s, t, 1.0, pair, pair, "forward", 0.5, zeros, None)
    with pytest.raises(ValueError, match="shape"):
        K.vocab_row_terms(s, t, 1.0, torch.zeros(3, 2, device=device), pair, "forward", 0.5, None, False)
    with pytest.raises(ValueError, match="one shape"):
        K.vocab_row_stats(s, t[:, :4], 1.0)
    with pytest.raises({"triton": ValueError, "cuda": RuntimeError}[K.backend], match="row_kl"):  # C++: TORCH_CHECK
        K.vocab_row_grad(s, t, 1.0, pair, pair, "reverse", 0.5, torch.zeros(3, device=device), None)
    assert K.vocab_row_grad(s, t, 1.0, pair, pair, "reverse", 0.5, zeros, None).dtype == torch.bfloat16


def test_zero_width_slice_and_no_rows(kernels):
    """A rank whose slice is empty (V < ranks): m = -inf, z = 0, partials 0, empty gradients; and no rows."""
    K, device = kernels, device_of(kernels)
    s = torch.zeros(3, 0, device=device)
    pair = torch.zeros(3, 2, device=device)
    m, z = K.vocab_row_stats(s, s, 1.0)
    assert m.shape == (3, 2) and (m == NEG_INF).all() and (z == 0).all()
    part, g = K.vocab_row_terms(s, s, 1.0, pair, pair, "forward", 0.5, None, True)
    assert (part == 0).all() and part.shape == (3, 2) and g.shape == (3, 0)
    assert K.vocab_row_grad(s, s, 1.0, pair, pair, "jsd", 0.5, torch.zeros(3, device=device), None).shape == (3, 0)
    e = torch.zeros(0, 5, device=device)
    m, z = K.vocab_row_stats(e, e, 1.0)
    assert m.shape == z.shape == (0, 2)
    part, g = K.vocab_row_terms(e, e, 1.0, torch.zeros(0, 2, device=device), torch.zeros(0, 2, device=device),
                                "forward", 0.5, None, True)
    assert part.shape == (0, 2) and g.shape == (0, 5)


# --- the operators: schemas and fakes --------------------------------------------------------------------------

def op_samples(device):
    s3, t3 = inputs(6, 17, torch.float32, seed=20)
    s3, t3 = s3.reshape(2, 3, 17).to(device), t3.reshape(2, 3, 17).to(device)
    sb, tb = (x.to(torch.bfloat16) for x in (s3, t3))
    strided = torch.zeros(2, 4, 17, device=device)[:, 1:] + s3
    shift = torch.zeros(6, 2, device=device)
    log_total = torch.stack([torch.logsumexp(s3, -1), torch.logsumexp(t3, -1)], -1).reshape(6, 2)
    w = weights(6, 21).to(device)
    one = torch.ones(1, device=device).expand(6)
    kl = torch.full((6,), 0.2, device=device)
    return {
        "vocab_row_stats": [(s3, t3, 0.5), (sb, tb, 1.0), (strided, t3, 1.0), (sb, t3, 1.0)],
        "vocab_row_terms": [(x, y, 0.5, shift, log_total, kind, 0.3, weight, kind == "forward" and grad)
                            for x, y in ((s3, t3), (sb, tb), (sb, t3)) for kind in KINDS for weight, grad in
                            ((w, True), (None, False), (one, True))],
        "vocab_row_grad": [(x, y, 0.5, shift, log_total, kind, 0.3, kl, weight)
                           for x, y in ((s3, t3), (strided, tb), (strided, t3), (sb, t3))
                           for kind in ("reverse", "jsd") for weight in (w, None)],
    }


@pytest.mark.parametrize("name", NAMES)
def test_opcheck(kernels, name):
    for args in op_samples(device_of(kernels))[name]:
        torch.library.opcheck(getattr(kernels, name), args)


def test_ops_are_declared(kernels):
    """Each backend has the three ops (none is Triton-only), with the declared schemas."""
    for name in NAMES:
        assert name not in kernel_ops.TRITON_ONLY
        op = getattr(kernels, name)
        assert str(op._schema) == f"{op.namespace}::{kernels.backend}_{name}{kernel_ops.OPS[name].schema}"


# --- the stand-in against the Triton twin ----------------------------------------------------------------------

def triton_kernels():
    try:
        import fastkd.triton as fkt
    except ImportError:
        return None
    if fkt.unavailable_reason(torch.device("cpu")) is not None or not hasattr(fkt.KERNELS, "vocab_row_stats"):
        return None
    return fkt.KERNELS


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_standin_against_the_triton_twin(cuda, kind, dtype):
    T = triton_kernels()
    if T is None:
        pytest.skip("the Triton vocabulary-parallel kernels cannot run here (interpreter)")
    s, t = inputs(3, 45, DTYPES[dtype], seed=40)
    s[0, [2, 9, 30]] = NEG_INF
    t[0, [2, 9, 30]] = NEG_INF
    s[1, 8:45] = NEG_INF
    t[1, 8:45] = NEG_INF
    w = weights(3, 41)
    ours = run_slices(cuda, s, t, 0.5, kind, BETA, w, CUTS)
    theirs = run_slices(T, s, t, 0.5, kind, BETA, w, CUTS)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    # the gradients: a few ulps of float32, and for bfloat16 one ulp (the interpreter truncates where we round)
    rtol, atol = {torch.float32: (1e-5, 1e-7), torch.float16: (2e-3, 1e-6), torch.bfloat16: (1.6e-2, 1e-5)}[s.dtype]
    torch.testing.assert_close(ours[1], theirs[1], rtol=rtol, atol=atol)
    for x, y in ((s[..., :8], t[..., :8]), (s[..., 8:], t[..., 8:])):
        for a, b in zip(cuda.vocab_row_stats(x, y, 0.5), T.vocab_row_stats(x, y, 0.5)):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=0)
