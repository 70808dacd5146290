"""What the per-loss kernel tests share: inputs, loss-and-gradient runs, comparisons with the reference, backends.

Imported as `from helpers import ...`: pytest puts tests/ on sys.path (rootdir-relative "prepend" import mode,
tests/ has no __init__.py), as for `precision`. The fixtures built on these (`backend`, `device`,
`small_blocks`, `block_columns`, `no_tf32`) are in tests/conftest.py.
"""
from __future__ import annotations

import pytest
import torch
from precision import rounding_slack

from fastkd import functional as KF

BACKENDS = ("torch", "triton", "cuda")
KERNEL_BACKENDS = ("triton", "cuda")

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
eager_and_compiled = pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
# The GPU-only logit cases: 9 rows of V logits (float32), or "bf16": 16 rows of 4099 (bfloat16).
gpu_logit_sizes = pytest.mark.parametrize("size", [1, 7, 1000, 5003, 32000, "bf16"])


def on_gpu_kernels(test):
    """A GPU-only test, run by the two kernel backends (its `backend` parametrized; `device` follows)."""
    return needs_gpu(pytest.mark.parametrize("backend", KERNEL_BACKENDS)(test))


# ----------------------------------------------------------------------------------------------------------
# backends

def backend_device(backend: str) -> str:
    """The device the backend runs on here, or skip with the reason it cannot run.

    torch: the CPU. triton: CUDA tensors when there is a GPU, else CPU tensors in Triton's interpreter
    (tests/conftest.py sets TRITON_INTERPRET=1 then). cuda: CUDA tensors only; the extension is built just in
    time on first use."""
    if backend == "torch":
        return "cpu"
    if backend == "triton":
        fkt = pytest.importorskip("fastkd.triton")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        reason = fkt.unavailable_reason(torch.device(device))
        if reason is not None:
            pytest.skip(reason)
        return device
    if not torch.cuda.is_available():
        pytest.skip("the CUDA C++ backend needs a CUDA device")
    import fastkd.cuda
    reason = fastkd.cuda.unavailable_reason(torch.device("cuda"), build=True)
    if reason is not None:
        pytest.skip(reason)
    return "cuda"


def kernels_only(backend: str) -> None:
    """Skip a test whose yardstick is the reference itself (backend "torch" would be measured against itself)."""
    if backend == "torch":
        pytest.skip("measures the kernels against the reference: nothing to measure for backend 'torch'")


# ----------------------------------------------------------------------------------------------------------
# inputs

def features(*shape, seed, device="cpu", dtype=torch.float32, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g) + offset).to(device=device, dtype=dtype)


def logits(*shape, seed, device="cpu", dtype=torch.float32, scale=3.0):
    return features(*shape, seed=seed, device=device, dtype=dtype, scale=scale)


def labels_for(rows_shape, device, masked=(1,), seed=0):
    """Token labels in [0, 5) with the (flat) positions `masked` set to -100."""
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, 5, rows_shape, generator=g).reshape(-1)
    labels[list(masked)] = -100
    return labels.reshape(rows_shape).to(device)


def targets(rows, classes, device, seed=0):
    """A class per row."""
    g = torch.Generator().manual_seed(seed + 2)
    return torch.randint(0, classes, (rows,), generator=g).to(device)


def shifted_masked_tokens(device):
    """`logits[:, :-1]` of (3, 9, 517) logits whose columns 500+ are -inf (a padded vocabulary), and labels with
    masked tokens, a row all masked and a row all kept: student, teacher, labels."""
    s, t = logits(3, 9, 517, seed=5, device=device)[:, :-1], logits(3, 9, 517, seed=6, device=device)[:, :-1]
    s[..., 500:] = float("-inf")
    t[..., 500:] = float("-inf")
    labels = torch.tensor([[1, -100, 2, 3, -100, 1, 1, 1], [-100] * 8, [0] * 8], device=device)
    return s, t, labels


# ----------------------------------------------------------------------------------------------------------
# running a loss

def same_layout_copy(x):
    """A copy of x with x's strides, gaps included: a strided view (`logits[:, :-1]`) stays strided, where
    `clone()` would return a contiguous copy of it."""
    y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    return y.copy_(x.detach())


def loss_and_grads(fn, *inputs, grad_output=None, requires_grad=None):
    """`fn(*inputs)` on fresh leaves: the loss and the gradient of each input that requires one (all by default;
    `requires_grad` a flag per input), None for an input the loss does not reach (RKD detaches the teacher)."""
    flags = [True] * len(inputs) if requires_grad is None else list(requires_grad)
    leaves = [same_layout_copy(x).requires_grad_(flag) for x, flag in zip(inputs, flags)]
    loss = fn(*leaves)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype))
    return (loss.detach(), *[x.grad for x, flag in zip(leaves, flags) if flag])


def all_finite(*tensors):
    return all(bool(torch.isfinite(x).all()) for x in tensors)


def reference_results(fn, *inputs, backend, grad_output=None, requires_grad=None):
    """What `fn(*inputs, backend)` is judged by: the reference on the same inputs; for the reference itself, the
    reference in float64 on the same values, rounded to the results' dtypes (None stays None)."""
    if backend != "torch":
        return loss_and_grads(lambda *x: fn(*x, "torch"), *inputs, grad_output=grad_output,
                              requires_grad=requires_grad)
    want = loss_and_grads(lambda *x: fn(*x, "torch"), *[x.double() for x in inputs], grad_output=grad_output,
                          requires_grad=requires_grad)
    dtypes = [torch.promote_types(inputs[0].dtype, torch.float32)]  # the loss: float32 for 16-bit inputs too
    dtypes += [x.dtype for x, flag in zip(inputs, requires_grad or [True] * len(inputs)) if flag]
    return tuple(None if w is None else w.to(d) for w, d in zip(want, dtypes))


WHAT = ("loss", "student grad", "teacher grad")


def assert_matches_reference(fn, *inputs, backend="triton", rtol=1e-5, atol=1e-6, grad_output=None,
                             requires_grad=None, equal_nan=False):
    """`fn(*inputs, backend)` and the reference (`reference_results`): the same loss and the same gradient of
    every input that requires one, in the same dtype and shape, within (rtol, atol). Returns the backend's."""
    got = loss_and_grads(lambda *x: fn(*x, backend), *inputs, grad_output=grad_output, requires_grad=requires_grad)
    want = reference_results(fn, *inputs, backend=backend, grad_output=grad_output, requires_grad=requires_grad)
    assert len(got) == len(want)
    for g, w, what in zip(got, want, WHAT):
        assert g.dtype == w.dtype and g.shape == w.shape, what
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, equal_nan=equal_nan, msg=lambda m: f"{what}: {m}")
    return got


def close(got, want, rtol, what):
    """|got - want| <= rtol * (|want| + max(max|want|, 1e-3)): relative to the tensor's scale, with a floor
    for tensors that are exactly 0 in the reference (e.g. RKD angles at D = 1, all +-1)."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    scale = max(want.abs().max().item(), 1e-3) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


def assert_close_to_reference(fn, student, teacher, backend="triton", rtol=1e-5, grad_atol=None):
    """The feature losses' comparison (RKD, attention transfer): loss and student gradient by `close`, or the
    student gradient against an absolute `grad_atol` where it is exactly 0 in exact arithmetic; the teacher's
    gradient by `close` where the loss has one (attention transfer), else none in either (RKD detaches it)."""
    got = loss_and_grads(lambda s, t: fn(s, t, backend), student, teacher)
    want = reference_results(fn, student, teacher, backend=backend)
    close(got[0], want[0], rtol, "loss")
    if grad_atol is None:
        close(got[1], want[1], rtol, "student grad")
    else:
        torch.testing.assert_close(got[1], want[1], rtol=rtol, atol=grad_atol)
    if want[2] is None:  # RKD detaches the teacher
        assert got[2] is None
    else:  # attention transfer does not
        close(got[2], want[2], rtol, "teacher grad")


def assert_logits_on_gpu(fn, backend, device, size):
    """The GPU-only comparison at larger shapes (`gpu_logit_sizes`): 9 rows of `size` logits in float32, or for
    "bf16" 16 rows of 4099 in bfloat16."""
    if size == "bf16":
        s = logits(16, 4099, seed=3, device=device, dtype=torch.bfloat16)
        t = logits(16, 4099, seed=4, device=device, dtype=torch.bfloat16)
        assert_matches_reference(fn, s, t, backend=backend, rtol=2e-2, atol=1e-3)
    else:
        s, t = logits(9, size, seed=1, device=device), logits(9, size, seed=2, device=device)
        assert_matches_reference(fn, s, t, backend=backend, rtol=1e-4, atol=1e-5)


def max_error(got, exact):
    return (got.double() - exact).abs().max().item()


def assert_error_within_twice_reference(fn, s, t, backend, device, rel_slack, abs_slack=0.0):
    """16-bit inputs: each result (loss, student and teacher gradients where the loss has them) at most twice as
    far from the reference in float64 on the same values as the reference in the input dtype, plus `rel_slack`
    of the result's size (and `abs_slack`), plus for a gradient one rounding to the input dtype (see
    precision.rounding_slack). Returns the backend's results."""
    dtype = s.dtype
    got = loss_and_grads(lambda a, b: fn(a, b, backend), s, t)
    plain = loss_and_grads(lambda a, b: fn(a, b, "torch"), s, t)
    exact = float64_reference(fn, s, t)
    for i, (k, r, e) in enumerate(zip(got, plain, exact)):
        what = WHAT[i]
        if e is None:  # RKD's teacher
            assert k is None and r is None, what
            continue
        assert k.dtype == r.dtype and k.shape == r.shape, what
        kernel_err, torch_err = max_error(k, e), max_error(r, e)
        scale = e.abs().max().item()
        slack = rel_slack * scale + abs_slack + (rounding_slack(dtype, device, scale) if i else 0.0)
        assert kernel_err <= 2 * torch_err + slack, (what, kernel_err, torch_err)
    return got


def float64_reference(fn, student, teacher):
    """The reference in float64 on the same (rounded) inputs: the exact answer the others are judged by."""
    return loss_and_grads(lambda s, t: fn(s, t, "torch"), student.double(), teacher.double())


def compile_fullgraph(fn):
    """`fn` compiled into one graph (a graph break fails), traced by dynamo and AOTAutograd without compiling C++."""
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


# ----------------------------------------------------------------------------------------------------------
# the feature losses as (s, t, backend) -> loss, shared with tests/test_kernel_ops.py

RKD_LOSSES = {
    "rkd_distance_loss": lambda s, t, b: KF.rkd_distance_loss(s, t, backend=b),
    "rkd_distance_loss_squared": lambda s, t, b: KF.rkd_distance_loss(s, t, squared=True, eps=1e-8, backend=b),
    "rkd_angle_loss": lambda s, t, b: KF.rkd_angle_loss(s, t, backend=b),
    "rkd_loss": lambda s, t, b: KF.rkd_loss(s, t, backend=b),
}


def at_fn(p, mode):
    return lambda s, t, b: KF.at_loss(s, t, p=p, mode=mode, backend=b)
