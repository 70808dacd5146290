"""The kernel operators: one declaration each (fastkd.kernel_ops), registered alike by every backend; and the
kernels' own contracts that no public function reaches (out-of-range indices, tiles and blocks, the power).

- csrc/ops.cpp defines the CUDA C++ operators with the declared schemas (read from the source: no build needed),
  all but `kernel_ops.TRITON_ONLY`, and the CUDA C++ backend runs no loss built on those;
- the Triton operators carry the declared schemas;
- every declared op passes `torch.library.opcheck` (schema, fake, autograd registration, dispatch) on the
  Triton backend (interpreted on CPU tensors without a GPU), on the CUDA C++ backend with a GPU, and on the
  CPU stand-in of the CUDA extension (its device code on CPU threads; see tests/test_cuda_standin.py);
- a backend that misses a declared op is refused.
"""
import re
from pathlib import Path

import pytest
import torch
from helpers import RKD_LOSSES, at_fn, features, logits
from helpers import assert_close_to_reference as assert_matches_reference  # the RKD / attention comparison

import fastkd
from fastkd import _dispatch, kernel_losses, kernel_ops
from fastkd import functional as KF
from fastkd.rkd_autograd import sq_hi_lo

fkt = pytest.importorskip("fastkd.triton")

# The devices the Triton kernels run on here: CPU tensors in the interpreter, CUDA tensors with a GPU.
DEVICES = [] if fkt.unavailable_reason(None) is not None else (
    (["cpu"] if fkt.INTERPRET else []) + (["cuda"] if torch.cuda.is_available() else []))
needs_interpreter = pytest.mark.skipif(fkt.unavailable_reason(torch.device("cpu")) is not None,
                                       reason="CPU tensors need TRITON_INTERPRET=1 set before import")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CSRC = Path(__file__).resolve().parents[1] / "csrc"

# The reference's Gram products in true float32 on CUDA, as on CPU (TF32 would make eager the noisy one).
pytestmark = pytest.mark.usefixtures("no_tf32")


def kernel_device(device):
    if device == "cpu" and fkt.unavailable_reason(torch.device("cpu")) is not None:
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    return device


# --- the declarations against csrc/ -----------------------------------------------------------------------

def cpp_schemas() -> dict[str, str]:
    """`m.def("...")` of csrc/ops.cpp: operator name -> "(arguments) -> outputs" (adjacent literals joined)."""
    schemas = {}
    for call in re.finditer(r'm\.def\(((?:\s*"[^"]*")+)', (CSRC / "ops.cpp").read_text()):
        text = "".join(re.findall(r'"([^"]*)"', call.group(1)))
        name, arguments = text.split("(", 1)
        schemas[name] = "(" + arguments
    return schemas


# The declared ops csrc/ defines: all but those only Triton launches so far.
CUDA_OPS = [name for name in kernel_ops.OPS if name not in kernel_ops.TRITON_ONLY]


def test_csrc_defines_every_declared_op_with_its_schema():
    """Every declared op but `TRITON_ONLY`, each with its schema: so `TRITON_ONLY` is exactly the declared ops
    csrc/ lacks (once one is added there, it must leave that list)."""
    schemas = cpp_schemas()
    assert schemas.pop("cuda_build_info") == "() -> str"
    assert set(kernel_ops.TRITON_ONLY) <= set(kernel_ops.OPS)
    assert schemas == {f"cuda_{name}": kernel_ops.OPS[name].schema for name in CUDA_OPS}


def test_an_op_not_in_csrc_is_no_loss_of_the_cuda_backend(monkeypatch):
    """The mechanism of `TRITON_ONLY` (empty today), with `sparse_kd_rows` taken as Triton-only: a CUDA C++
    KernelSet that lacks it makes `backend="cuda"` say it has no kernel for sparse_kd_loss, "auto" on CUDA tensors
    takes Triton (or the reference where Triton cannot run), and the other losses are unchanged."""
    import types
    monkeypatch.setattr(kernel_ops, "TRITON_ONLY", ("sparse_kd_rows",))
    cuda_kernels = types.SimpleNamespace(**{name: None for name in kernel_ops.OPS if name != "sparse_kd_rows"})
    monkeypatch.setitem(_dispatch._modules, "cuda", types.SimpleNamespace(
        unavailable_reason=lambda device, build=False: None, KERNELS=cuda_kernels))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    assert kernel_losses.missing_ops("sparse_kd_loss", cuda_kernels) == ["sparse_kd_rows"]
    assert "sparse_kd_loss" not in kernel_losses.backend_losses(cuda_kernels)
    assert kernel_losses.backend_losses(fkt.KERNELS) == sorted(kernel_losses.LOSSES)
    cuda = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)  # resolves without a GPU
    message = r"backend 'cuda' has no kernel for sparse_kd_loss: it does not have the operator\(s\) \['sparse_kd_rows"
    with pytest.raises(fastkd.BackendUnavailableError, match=message):
        _dispatch.resolve("sparse_kd_loss", "cuda", cuda, cuda)
    assert _dispatch.resolve("kd_loss", "cuda", cuda, cuda).args == (cuda_kernels,)
    # "auto": Triton first; with a preference measured for CUDA C++, still Triton for this loss.
    monkeypatch.setattr(_dispatch, "AUTO_ORDER", ("cuda", "triton", "torch"))
    monkeypatch.setitem(_dispatch.AUTO_PREFERENCE, ("sparse_kd_loss", 9), "cuda")
    monkeypatch.setitem(_dispatch._modules, "triton", types.SimpleNamespace(
        unavailable_reason=lambda device: None, KERNELS=fkt.KERNELS))
    impl = _dispatch.resolve("sparse_kd_loss", "auto", cuda, cuda)
    assert impl.func is kernel_losses.sparse_kd_loss and impl.args == (fkt.KERNELS,)
    monkeypatch.setitem(_dispatch._modules, "triton", types.SimpleNamespace(
        unavailable_reason=lambda device: "no Triton here", KERNELS=None))
    assert _dispatch.resolve("sparse_kd_loss", "auto", cuda, cuda) is fastkd.reference.sparse_kd_loss
    assert _dispatch.resolve("kd_loss", "auto", cuda, cuda).args == (cuda_kernels,)
    # what `fastkd info` reports: one loss fewer for CUDA C++
    assert _dispatch._loss_count("cuda") == _dispatch._loss_count("triton") - len(kernel_ops.TRITON_ONLY)


def test_a_backend_must_launch_every_declared_op():
    with pytest.raises(ValueError, match=r"missing \['at_channel_mean_pow_backward'\]"):
        kernel_ops.register("incomplete", {name: print for name in kernel_ops.OPS
                                           if name != "at_channel_mean_pow_backward"})


def test_triton_ops_carry_the_declared_schemas():
    for name, op in kernel_ops.OPS.items():
        assert str(getattr(torch.ops.fastkd, f"triton_{name}").default._schema) == f"fastkd::triton_{name}{op.schema}"


def test_auto_picks_triton_only_for_cuda_tensors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    cpu = torch.empty(2, 3)
    cuda = type("CudaTensor", (), {"device": torch.device("cuda"), "dtype": torch.float32})()  # resolves without a GPU
    assert _dispatch.resolve("kd_loss", "auto", cpu) is fastkd.reference.kd_loss
    impl = _dispatch.resolve("kd_loss", "auto", cuda)
    assert impl.func is kernel_losses.kd_loss and impl.args == (fkt.KERNELS,)


# --- opcheck of every declared op, on every backend ---------------------------------------------------------

def samples(kernels, device="cpu") -> dict[str, list[tuple]]:
    """Arguments for every declared op, small enough for the interpreter and the stand-in."""
    def rand(*shape, seed, scale=3.0):
        return logits(*shape, seed=seed, device=device, scale=scale)

    s, t = rand(3, 10, seed=1), rand(3, 10, seed=2)
    s3, t3 = rand(2, 3, 17, seed=40), rand(2, 3, 17, seed=41)
    y = torch.tensor([1, 2, 9], device=device)
    labels, labels3 = torch.tensor([0, -100, 4], device=device), torch.tensor([[0, -100, 4], [1, 2, -100]], device=device)
    w, w6 = rand(3, seed=3, scale=1.0), rand(6, seed=4, scale=1.0)
    one = torch.ones(1, device=device).expand(3)  # one weight for every row: a stride-0 view
    one6 = torch.ones(1, device=device).expand(6)
    x = features(5, 4, seed=32).to(device)
    wx = features(5, 5, seed=5).to(device)
    (qh_s, ql_s), (qh_t, ql_t) = sq_hi_lo(x), sq_hi_lo(features(5, 6, seed=33).to(device))
    f = features(2, 3, 4, 5, seed=34).to(device).requires_grad_()
    f_cl = features(2, 3, 4, 5, seed=35).to(device).to(memory_format=torch.channels_last).requires_grad_()
    flags = [(True, True), (True, False), (False, True), (False, False)]
    # A per-row temperature (learnable, or per token), and one for every row as a stride-0 view; with its
    # gradient (the last flag), alone or beside the inputs'.
    t_rows, t_rows6 = 0.5 + rand(3, seed=6, scale=1.0).abs(), 0.5 + rand(6, seed=7, scale=1.0).abs()
    t_one, t_one6 = torch.full((1,), 2.0, device=device).expand(3), torch.full((1,), 2.0, device=device).expand(6)
    # Sparse teacher slots: a duplicated id (row 1), an unused slot holding an out-of-range id (row 2); int32 ids
    # and bf16 log-probabilities beside int64 / float32; rows of (2, 3) with labels, and a strided student.
    ids = torch.tensor([[1, 4, 9, 0], [2, 2, 5, 7], [0, 3, 11, 6]], device=device)
    lp = torch.tensor([[0.5, 0.2, 0.1, 0.05], [0.3, 0.3, 0.2, 0.1], [0.6, 0.3, 1.0, 0.05]], device=device).log()
    lp[2, 2] = float("-inf")
    ids3 = torch.tensor([[[0, 16, 3], [5, 6, 7], [1, 2, 3]], [[4, 4, 8], [9, 10, 0], [15, 14, 13]]], device=device)
    lp3 = torch.tensor([0.4, 0.3, 0.2], device=device).log().expand(2, 3, 3).to(torch.bfloat16)
    tails = (("renormalize", 2.0), ("bucket", 1.0), ("none", 1.0))
    vp_shift = torch.zeros(6, 2, device=device)
    vp_total = torch.stack([torch.logsumexp(s3 * 0.5, -1), torch.logsumexp(t3 * 0.5, -1)], -1).reshape(6, 2)
    vp_kl = torch.full((6,), 0.2, device=device)
    return {
        "kl_rows": [(s, t, 2.0, None, False, y, None, -100, w, one, *g, False) for g in flags]
        + [(s, t, 1.0, None, True, None, labels, -100, w, None, True, False, False)]
        + [(s, t, 1.0, t_rows, False, y, None, -100, w, one, *g, True) for g in flags]
        + [(s, t, 1.0, t_one, True, None, labels, -100, w, None, True, False, True),
           (s, t, 1.0, t_rows, False, None, None, -100, None, None, False, False, False)],
        "jsd_rows": [(s3, t3, 0.3, 2.0, None, labels3, -100, w6, *g, False) for g in flags]
        + [(s3, t3, 0.7, 1.0, None, None, -100, None, True, False, False)]
        + [(s3, t3, 0.3, 1.0, t_rows6, labels3, -100, w6, *g, True) for g in flags]
        + [(s3, t3, 0.7, 1.0, t_one6, None, -100, None, True, False, True)],
        "dkd_rows": [(s, t, y, 4.0, None, w, one, *g, False) for g in flags]
        + [(s, t, y, 1.0, None, None, None, True, True, False)]
        + [(s, t, y, 1.0, t_rows, w, one, *g, True) for g in flags]
        + [(s, t, y, 1.0, t_one, None, None, True, True, True)],
        "sparse_kd_rows": [(s, ids, lp, tail, T, None, -100, w, g) for tail, T in tails for g in (True, False)]
        + [(s3, ids3.int(), lp3, tail, T, labels3, -100, one6, True) for tail, T in tails]
        + [(rand(2, 4, 17, seed=48)[:, 1:], ids3, lp3, "bucket", 1.0, None, -100, w6, True)],
        "scale_rows_": [(rand(2, 3, 17, seed=47).to(dtype), scale) for dtype in (torch.float32, torch.bfloat16)
                        for scale in (w6, torch.ones(1, device=device).expand(6))],
        # The vocabulary-parallel slice kernels: a slice of (2, 3, 17), the global shifts and
        # log-totals per row `(rows, 2)` (student, teacher), each kind, the forward gradient with and without weights.
        "vocab_row_stats": [(s3, t3, 0.5), (s3.to(torch.bfloat16), t3.to(torch.bfloat16), 1.0)],
        "vocab_row_terms": [(s3, t3, 0.5, vp_shift, vp_total, kind, 0.3, w6, kind == "forward")
                            for kind in ("forward", "reverse", "jsd")]
        + [(s3, t3, 0.5, vp_shift, vp_total, "forward", 0.3, None, True)],
        "vocab_row_grad": [(s3, t3, 0.5, vp_shift, vp_total, kind, 0.3, vp_kl, weight)
                           for kind in ("reverse", "jsd") for weight in (w6, None)],
        "rkd_sq_distances": [(x,)],
        "rkd_weighted_diff": [(wx + wx.T, x)],
        "rkd_angle_sum": [(qh_s, ql_s, qh_t, ql_t, u_s, u_t) for u_s, u_t in ((False, False), (False, True), (True, False))],
        "rkd_angle_weights": [(qh_s, ql_s, qh_t, ql_t, u_t) for u_t in (False, True)],
        "at_channel_mean_pow": [(m, p) for m in (f, f_cl) for p in (1.0, 2.0, 3.0)]
        + [(m.abs().detach().requires_grad_(), 2.5) for m in (f, f_cl)],  # a fractional power of positive maps
        "at_channel_mean_pow_backward": [(features(2, 20, seed=36).to(device), m.detach(), 2.0) for m in (f, f_cl)],
    }


def test_every_declared_op_has_samples():
    assert set(samples(fkt.KERNELS, DEVICES[0] if DEVICES else "cpu")) == set(kernel_ops.OPS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(kernel_ops.OPS))
def test_opcheck_triton(device, name):
    for args in samples(fkt.KERNELS, device)[name]:
        torch.library.opcheck(getattr(fkt.KERNELS, name), args)


@gpu
@pytest.mark.parametrize("name", CUDA_OPS)
def test_opcheck_cuda(name):
    import fastkd.cuda
    reason = fastkd.cuda.unavailable_reason(torch.device("cuda"), build=True)
    if reason is not None:
        pytest.skip(reason)
    for args in samples(fastkd.cuda.KERNELS, "cuda")[name]:
        torch.library.opcheck(getattr(fastkd.cuda.KERNELS, name), args)


@pytest.fixture(scope="module")
def standin_kernels():
    from fastkd.cuda import standin
    if standin.unavailable_reason() is not None:
        pytest.skip(f"cannot build the CUDA stand-in: {standin.unavailable_reason()}")
    return standin.kernel_set(standin.build())


@pytest.mark.parametrize("name", CUDA_OPS)
def test_opcheck_cuda_standin(standin_kernels, name):
    for args in samples(standin_kernels)[name]:
        torch.library.opcheck(getattr(standin_kernels, name), args)


@gpu
def test_cuda_compiles_in_one_graph():
    s, t = logits(4, 33, seed=11, device="cuda").requires_grad_(), logits(4, 33, seed=12, device="cuda")
    compiled = torch.compile(lambda s, t: KF.jsd_loss(s, t, beta=0.3, backend="cuda"), fullgraph=True)
    torch.testing.assert_close(compiled(s, t), KF.jsd_loss(s, t, beta=0.3, backend="cuda"))


# --- indices out of range: NaN, never a bad read ---------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_out_of_range_target_gives_nan_not_a_bad_read(device):
    s, t = logits(2, 5, seed=23, device=device), logits(2, 5, seed=24, device=device)
    kl, ce, _, _, _ = fkt.KERNELS.kl_rows(s, t, 1.0, None, False, torch.tensor([1, 9], device=device), None, -100,
                                          None, None, True, False, False)
    assert torch.isfinite(ce[0]) and torch.isnan(ce[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [-1, 9, 1000])
def test_dkd_target_out_of_range_is_nan(device, bad):
    """Straight to the kernel (fastkd.functional rejects such CPU targets): NaN, no out-of-bounds read."""
    s = logits(3, 9, seed=36, device=device).requires_grad_()
    t = logits(3, 9, seed=37, device=device)
    target = torch.tensor([1, bad, 4], device=device)
    loss = kernel_losses.dkd_loss(fkt.KERNELS, s, t, target, alpha=1.0, beta=8.0, temperature=4.0)
    assert torch.isnan(loss)
    tckd, nckd, d_s, _, _ = fkt.KERNELS.dkd_rows(s.detach(), t, target, 4.0, None, None, None, True, False, False)
    assert torch.isnan(tckd[1]) and torch.isnan(nckd[1])
    assert torch.isfinite(tckd[[0, 2]]).all() and torch.isfinite(nckd[[0, 2]]).all()
    assert torch.isnan(d_s[1]).all() and torch.isfinite(d_s[[0, 2]]).all()
    t_rows = torch.full((1,), 4.0, device=device).expand(3)  # the same, with a per-row temperature and d_T
    tckd, nckd, d_s, _, d_T = fkt.KERNELS.dkd_rows(s.detach(), t, target, 0.0, t_rows, None, None, True, False, True)
    assert torch.isnan(tckd[1]) and torch.isnan(nckd[1]) and torch.isnan(d_T[1])
    assert torch.isfinite(d_T[[0, 2]]).all()
    assert torch.isfinite(tckd[[0, 2]]).all() and torch.isfinite(nckd[[0, 2]]).all()
    assert torch.isnan(d_s[1]).all() and torch.isfinite(d_s[[0, 2]]).all()
    (d_s,) = torch.autograd.grad(loss, s)
    assert torch.isnan(d_s[1]).all() and torch.isfinite(d_s[[0, 2]]).all()


# --- RKD tiles and attention blocks, the power, the distance kernels ------------------------------------------

POW_CASES = [5, 4, 7, 2.5, 1.5, 0.5, -1.5, 2.3, 0.7, 0.3, 7.77, -1, -2]


def _pow_inputs(device):
    g = torch.Generator().manual_seed(90)
    return {"offset_1e3": 1000 + torch.randn(2000, generator=g), "unit": torch.randn(2000, generator=g).abs(),
            "scale_1e4": 1e4 * torch.randn(2000, generator=g).abs(),
            "scale_1e-4": 1e-4 * torch.randn(2000, generator=g).abs(),
            "wide": torch.empty(2000).uniform_(-20, 20, generator=g).exp()}


@needs_interpreter
def test_rkd_several_tiles(monkeypatch):
    """Blocks of 16 (the smallest) and B = 40: three tiles a side, partial last tiles, in all three kernels."""
    from fastkd.triton import rkd as trkd
    monkeypatch.setattr(trkd, "_block", lambda B: 16)
    s = features(40, 6, seed=17)
    t = features(40, 3, seed=18)
    assert_matches_reference(RKD_LOSSES["rkd_angle_loss"], s, t)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", POW_CASES)
def test_at_pow_accuracy(device, p):
    """f^p (forward, C = 1) and p f^(p-1) (backward) against float64, elementwise in units of u = 2^-24 where
    the true value is at least 2^-100 (the pair's low part a normal float32) and finite in float32:
    correctly rounded but in near-ties (<= 1.05 u) for integer and half-integer p, as torch.pow; a few u for
    other p at every magnitude (exp(p log f) errs by ~|p log f| u: 23 u at f = 1e4, p = 2.5)."""
    from fastkd.triton import attention as tat
    device = kernel_device(device)
    u = 2.0 ** -24
    special = float(p).is_integer() or float(2 * p).is_integer()
    bound = 1.05 * u if special else (4 if device == "cpu" else 8) * u
    for name, x in _pow_inputs(device).items():
        f = x.reshape(1, 1, 1, -1).to(device)
        for what, got, want in [
            ("f^p", tat.at_channel_mean_pow(f, p), x.double().pow(p)),
            ("p f^(p-1)", tat.at_channel_mean_pow_backward(torch.ones(1, x.numel(), device=device), f, p), p * x.double().pow(p - 1)),
        ]:
            normal = (want.abs() >= 2.0 ** -100) & (want.abs() <= torch.finfo(torch.float32).max)  # the pair's l normal
            rel = ((got.reshape(-1).cpu().double() - want) / want).abs()[normal]
            assert rel.max().item() <= bound, f"{name} {what}: {rel.max().item() / u:.2f} u > {bound / u:.2f} u"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0, 1, 2, 3, 4, 5, 33, 0.5, 1.5, 2.5, 0.3, 2.3, 0.7, -1, -2, -3, -0.5, -1.5, -2.3, 1e10])
def test_at_pow_special_values(device, p):
    """torch.pow's values (and its backward p x^(p-1), 0 for p = 0) at 0, -0, +-1, +-inf, NaN, subnormals and
    values whose powers overflow or underflow, for integer, half-integer, other and negative p (signs of
    zero aside: the map is a sum)."""
    from fastkd.triton import attention as tat
    device = kernel_device(device)
    x = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5, float("inf"), -float("inf"), float("nan"),
                      1e-40, -1e-40, 3e38, 1e-20, 1e20, 1.7, -1.7])
    f = x.reshape(1, 1, 1, -1).to(device)
    got = tat.at_channel_mean_pow(f, p).reshape(-1).cpu()
    torch.testing.assert_close(got, x.pow(p), rtol=3e-7, atol=0, equal_nan=True)
    xx = x.clone().requires_grad_()
    xx.pow(p).sum().backward()
    dg = tat.at_channel_mean_pow_backward(torch.ones(1, x.numel(), device=device), f, p).reshape(-1).cpu()
    torch.testing.assert_close(dg, xx.grad, rtol=3e-7, atol=0, equal_nan=True)


@needs_interpreter
def test_at_several_blocks(monkeypatch):
    """Small blocks, so channels and positions run through several blocks and partial ones."""
    from fastkd.triton import attention as tat
    monkeypatch.setattr(tat, "_blocks", lambda f, cl: (2, 16))
    s = features(2, 7, 6, 7, seed=30)
    t = features(2, 5, 6, 7, seed=31).to(memory_format=torch.channels_last)
    assert_matches_reference(at_fn(2, "code"), s, t)
    assert_matches_reference(at_fn(3, "paper"), t, s)


@needs_interpreter
def test_distance_kernels_on_close_rows():
    """Q exactly symmetric with a zero diagonal; Q and the weighted differences within a few ulp of float64 on
    rows 1e-5 apart near a large offset, where the matmul forms lose everything."""
    from fastkd.triton import rkd as trkd
    x = features(7, 10, seed=51, offset=30.0)
    x[4] = x[1] + 1e-5 * features(10, seed=52)
    q = trkd.rkd_sq_distances(x)
    assert torch.equal(q, q.T) and torch.equal(q.diagonal(), torch.zeros(7))
    x64 = x.double()
    diff = x64[:, None, :] - x64[None, :, :]
    q64 = diff.square().sum(2)
    off = ~torch.eye(7, dtype=torch.bool)
    assert ((q.double() - q64).abs()[off] / q64[off]).max() < 4 * 2.0 ** -24 * 10
    w = features(7, 7, seed=53)
    w = w + w.T
    want = (w.double()[:, :, None] * diff).sum(1)
    got = trkd.rkd_weighted_diff(w, x).double()
    assert ((got - want).abs() / (w.double().abs()[:, :, None] * diff.abs()).sum(1)).max() < 8 * 2.0 ** -24
