"""Per-call host overhead of a registered operator against an `autograd.Function` around the same launcher.

fastkd calls its kernels through one door, the `torch.library` operator (fastkd.kernel_ops), eager and compiled
alike. A second, eager-only door (an `autograd.Function` that skips the dispatcher) is worth keeping only if it
saves time per call; this measures that on the CPU, where it is pure host overhead: a trivial launcher (a row
sum, like a loss kernel's launch: one small output) called forward and backward through each door.
Each figure is the best of several repeats (the least disturbed by other processes), in microseconds per call.

    python -m bench.op_overhead
"""
from __future__ import annotations

import time

import torch


def _launcher(x, scale):
    return x.sum(-1) * scale


def _launcher_backward(grad, x, scale):
    return grad[..., None].expand_as(x) * scale


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.scale = inputs[1]


def _registered_op():
    forward = torch.library.custom_op("fastkd_probe::rows", _launcher, mutates_args=(),
                                      schema="(Tensor x, float scale) -> Tensor")
    backward = torch.library.custom_op("fastkd_probe::rows_backward", _launcher_backward, mutates_args=(),
                                       schema="(Tensor grad, Tensor x, float scale) -> Tensor")
    forward.register_fake(lambda x, scale: x.new_empty(x.shape[:-1]))
    backward.register_fake(lambda grad, x, scale: torch.empty_like(x))

    def gradient(ctx, grad):
        return backward(grad, ctx.saved_tensors[0], ctx.scale), None

    forward.register_autograd(gradient, setup_context=_setup)
    return forward


class _Function(torch.autograd.Function):
    @staticmethod
    def forward(x, scale):
        return _launcher(x, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad):
        return _launcher_backward(grad, ctx.saved_tensors[0], ctx.scale), None


def _per_call_us(fn, x, calls: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn(x, 2.0).sum().backward()
        best = min(best, time.perf_counter() - start)
    return best / calls * 1e6


def measure(calls: int = 2000, repeats: int = 7) -> dict[str, float]:
    torch.set_num_threads(1)
    x = torch.randn(4, 8, requires_grad=True)
    doors = {"bare launcher (no autograd)": lambda x, s: _launcher(x.detach(), s).requires_grad_(),
             "registered op": _registered_op(), "autograd.Function": _Function.apply}
    for fn in doors.values():
        _per_call_us(fn, x, 200, 1)
    return {name: _per_call_us(fn, x, calls, repeats) for name, fn in doors.items()}


def main() -> None:
    times = measure()
    bare = times["bare launcher (no autograd)"]
    print(f"torch {torch.__version__}, CPU, 1 thread: microseconds per forward + backward call")
    for name, us in times.items():
        print(f"  {name:28s} {us:7.1f}" + (f"  (+{us - bare:.1f} over the bare launcher)" if us != bare else ""))


if __name__ == "__main__":
    main()
