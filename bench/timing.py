"""How time, memory and bandwidth are measured.

On a GPU: CUDA events through `triton.testing.do_bench` (median of many calls after a warm-up; it also
flushes L2 before each call). On a CPU (--quick only): `time.perf_counter`, median of a few calls; there is
no peak-memory counter, so those columns stay empty.
"""
from __future__ import annotations

import statistics
import time

import torch


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, grad_to_none=None, quick=False) -> float:
    """Median milliseconds of one call of `fn`."""
    if torch.device(device).type == "cuda":
        import triton.testing
        warmup, rep = (5, 20) if quick else (25, 100)
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                             return_mode="median"))
    reps = 3 if quick else 10
    fn()  # warm-up: first-call costs (kernel compilation, allocator) are not what we measure
    times = []
    for _ in range(reps):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_mb_above(baseline_bytes: int, run, device) -> float | None:
    """Peak allocated MB while `run()` runs, above `baseline_bytes` (what was allocated before the pass
    began: the inputs, and for the backward pass also the forward graph). None off CUDA."""
    if torch.device(device).type != "cuda":
        run()
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - baseline_bytes) / 2**20


def allocated(device) -> int:
    return torch.cuda.memory_allocated(device) if torch.device(device).type == "cuda" else 0


def copy_bandwidth_gbps(device, quick=False) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second, in GB/s (1e9).

    The floor of every pass is its minimal bytes over this number: what this device moves at best.
    1 GiB on a GPU (far beyond L2); 64 MiB on a CPU, enough for a rough figure.
    """
    on_gpu = torch.device(device).type == "cuda"
    nbytes = (2**28 if quick else 2**30) if on_gpu else 2**26
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, quick=quick)
    del src, dst
    if on_gpu:
        torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9


MATMUL_N = {"cuda": 8192, "cpu": 512}


def matmul_note(device) -> str:
    on_gpu = torch.device(device).type == "cuda"
    n = MATMUL_N["cuda" if on_gpu else "cpu"]
    return f"torch.mm of two {n}x{n} {'bfloat16' if on_gpu else 'float32'} matrices"


def matmul_tflops(device, quick=False) -> float:
    """The matrix-product rate this device reaches, in TFLOP/s (1e12): `torch.mm` of two 8192 x 8192 bfloat16
    matrices on a GPU (cuBLAS on the tensor cores: the practical roofline of the fused cases, below the
    datasheet's peak), 512 x 512 float32 on a CPU (a rough figure for --quick). Measured once per run."""
    on_gpu = torch.device(device).type == "cuda"
    n = MATMUL_N["cuda" if on_gpu else "cpu"]
    dtype = torch.bfloat16 if on_gpu else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: torch.mm(a, b), device, quick=quick)
    del a, b
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    # Allocation failures that do not come as OutOfMemoryError (CPU, some Triton launches).
    text = str(err).lower()
    return "out of memory" in text or "not enough memory" in text


def free_memory(device) -> None:
    import gc
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
