"""The CUDA C++ backend: its build configuration (everywhere) and its kernels against the reference (GPU only).

CI compiles and links the extension on a machine without a GPU (tests/test_cuda_build.py, which .ci/run enables);
the kernel tests below need a GPU and are skipped without one. They mirror the Triton tests' cases.
"""
import pytest
import torch

import fastkd
import fastkd.cuda
from fastkd import functional as KF
from fastkd.cuda import build

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_every_listed_source_exists():
    sources = build.sources()
    assert [s.name for s in sources][0] == "ops.cpp"
    for source in sources:
        assert source.is_file(), source


def test_architectures_follow_the_override(monkeypatch):
    monkeypatch.setenv("FASTKD_CUDA_ARCH", "8.0;9.0")
    assert build.architectures() == ["8.0", "9.0"]
    assert build.gencode_flags(["8.0", "9.0"]) == [
        "-DFASTKD_ARCHS=sm80_sm90", "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]


def test_cpu_tensors_say_why():
    assert "run on CUDA tensors" in fastkd.cuda.unavailable_reason(torch.device("cpu"))
    with pytest.raises(fastkd.BackendUnavailableError, match="CUDA tensors"):
        KF.rkd_loss(torch.randn(3, 4), torch.randn(3, 4), backend="cuda")


def test_auto_never_compiles(monkeypatch):
    # Without a prebuilt fastkd._C, "auto" must not start a compiler: the extension reports "not built".
    monkeypatch.setattr(fastkd.cuda, "_loaded", False)
    reason = fastkd.cuda.unavailable_reason(torch.device("cuda"), build=False) if torch.version.cuda else None
    if reason is not None:
        assert "not built" in reason or "CPU-only" in reason


def rand(*shape, seed, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(device="cuda", dtype=dtype)


def assert_matches_reference(fn, *inputs, rtol=1e-4, atol=1e-5, grad_output=None):
    results = []
    for backend in ("cuda", "torch"):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        loss = fn(*leaves, backend)
        loss.backward(grad_output if grad_output is not None else torch.ones_like(loss))
        results.append([loss.detach()] + [x.grad for x in leaves])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


LOGIT_CASES = {
    "kd": lambda s, t, b: KF.kd_loss(s, t, 4.0, backend=b),
    "kd+ce": lambda s, t, b: KF.kd_loss(s, t, 2.0, target=torch.arange(s.shape[0], device="cuda") % s.shape[-1],
                                        ce_weight=0.3, kd_weight=0.7, backend=b),
    "kl-forward": lambda s, t, b: KF.kl_div_loss(s, t, 1.5, backend=b),
    "kl-reverse": lambda s, t, b: KF.kl_div_loss(s, t, 1.5, direction="reverse", backend=b),
    "jsd-0.3": lambda s, t, b: KF.jsd_loss(s, t, beta=0.3, temperature=2.0, backend=b),
    "jsd-0.5": lambda s, t, b: KF.jsd_loss(s, t, beta=0.5, backend=b),
    "dkd": lambda s, t, b: KF.dkd_loss(s, t, torch.arange(s.shape[0], device="cuda") % s.shape[-1], backend=b),
}


@gpu
@pytest.mark.parametrize("name", sorted(LOGIT_CASES))
@pytest.mark.parametrize("V", [1, 7, 1000, 5003, 32000])
def test_logit_losses(name, V):
    assert_matches_reference(LOGIT_CASES[name], rand(9, V, seed=1), rand(9, V, seed=2))


@gpu
@pytest.mark.parametrize("name", sorted(LOGIT_CASES))
def test_logit_losses_bf16(name):
    assert_matches_reference(LOGIT_CASES[name], rand(16, 4099, seed=3, dtype=torch.bfloat16),
                             rand(16, 4099, seed=4, dtype=torch.bfloat16), rtol=2e-2, atol=1e-3)


@gpu
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_masked_tokens_strided_rows_and_masked_vocabulary(direction):
    s, t = rand(3, 9, 517, seed=5)[:, :-1], rand(3, 9, 517, seed=6)[:, :-1]
    s[..., 500:] = float("-inf")
    t[..., 500:] = float("-inf")
    labels = torch.tensor([[1, -100, 2, 3, -100, 1, 1, 1], [-100] * 8, [0] * 8], device="cuda")
    assert_matches_reference(lambda s, t, b: KF.kl_div_loss(s, t, direction=direction, labels=labels, backend=b),
                             s, t)
    assert_matches_reference(lambda s, t, b: KF.jsd_loss(s, t, beta=0.7, labels=labels, backend=b), s, t)


@gpu
@pytest.mark.parametrize("B,D", [(2, 3), (7, 17), (33, 5), (256, 512)])
def test_rkd(B, D):
    teacher = rand(B, D + 1, seed=8)
    for fn in (lambda s, b: KF.rkd_loss(s, teacher, backend=b),
               lambda s, b: KF.rkd_distance_loss(s, teacher, squared=True, backend=b)):
        assert_matches_reference(fn, rand(B, D, seed=7), rtol=1e-3, atol=1e-5)


@gpu
@pytest.mark.parametrize("p", [1, 2, 3, 5, 2.5])
@pytest.mark.parametrize("mode", ["code", "paper"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_transfer(p, mode, channels_last):
    s, t = rand(4, 6, 14, 14, seed=9), rand(4, 3, 7, 7, seed=10)
    if p == 2.5:
        s, t = s.abs(), t.abs()
    if channels_last:
        s = s.to(memory_format=torch.channels_last)
    assert_matches_reference(lambda s, t, b: KF.at_loss(s, t, p=p, mode=mode, backend=b), s, t, rtol=1e-4)


@gpu
def test_offsets_beyond_two_to_the_31():
    N, V = 16400, 131072
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2 ** 30:
        pytest.skip("needs about 40 GB of GPU memory")
    s = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    t = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    tail = slice(N - 3, N)
    torch.testing.assert_close(KF.kl_div_loss(s, t, reduction="none", backend="cuda")[tail],
                               KF.kl_div_loss(s[tail], t[tail], reduction="none", backend="torch"),
                               rtol=1e-4, atol=1e-5)


@gpu
def test_opcheck_and_compile():
    s, t = rand(4, 33, seed=11).requires_grad_(), rand(4, 33, seed=12).requires_grad_()
    KF.kd_loss(s, t, backend="cuda")  # loads (and if needed builds) the extension
    torch.library.opcheck(torch.ops.fastkd.cuda_kl_rows.default, (s, t, 2.0, False, None, None, -100))
    torch.library.opcheck(torch.ops.fastkd.cuda_jsd_rows.default, (s, t, 0.5, 1.0, None, -100))
    compiled = torch.compile(lambda s, t: KF.jsd_loss(s, t, beta=0.3, backend="cuda"), fullgraph=True)
    torch.testing.assert_close(compiled(s, t), KF.jsd_loss(s, t, beta=0.3, backend="cuda"))


@gpu
@pytest.mark.parametrize("p", [1, 3, 5])
def test_attention_map_odd_power_signed_entries(p):
    """Odd p keeps the sign of negative entries (no abs()); the gradient p f^(p-1) is even. Against the reference
    and against the reference in float64."""
    f = rand(2, 3, 6, 5, seed=11, scale=1.0)
    w = rand(2, 30, seed=12, scale=1.0)
    results = []
    for backend, x in (("cuda", f), ("torch", f), ("torch", f.double())):
        x = x.detach().clone().requires_grad_()
        out = KF.attention_map(x, p, backend=backend)
        (out * w.to(out.dtype)).sum().backward()
        results.append((out.detach(), x.grad))
    for got, want in ((results[0], results[1]), (results[0], results[2])):
        torch.testing.assert_close(got[0].double(), want[0].double(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1].double(), want[1].double(), rtol=1e-5, atol=1e-6)
