"""The bytes fastkd's own kernels move for a case and pass ("path bytes"), beside the floor of `Case.min_bytes`.

The floor is what any implementation must move; the path is what fastkd's design moves, as its kernels say in
their docstrings. A time gives both shares: floor bytes / time / copy bandwidth (% floor: how far the design
and its execution are from the ideal) and path bytes / time / copy bandwidth (% path: how close the kernel runs
to its own design's traffic), and their ratio, path / floor, is the design's own overhead (1.00 = the design
moves only the floor).

Why a model and not a counter: the GPU has no cheap byte counter the suite could read per call (Nsight is a
separate run), and the interpreter's count (tests/test_forward_grad.py, bottom) checks that the kernels move
what these formulas say. So the numbers below are the formulas of the kernels' docstrings, and nothing else:

- fastkd/triton/kl.py, jsd.py, dkd.py ("Design and cost"): a row of V <= `fastkd.triton.rows.MAX_BLOCK_V`
  (read from the module at each call, never copied here: it may change) is loaded once and kept in registers:
  2 x N x V element reads (X and Y once) + g x N x V writes (g gradients asked for), with or without a gradient.
  A longer row streams: KL (kd, kl_forward, kl_reverse, jsd with beta 0 or 1) and DKD in 3 passes, 6 reads with
  a gradient, 4 without (the gradient pass is skipped); JSD in 4 passes, 8 reads with a gradient, 6 without.
- csrc/kl.cu, dkd.cu, jsd.cu (headers, "Design"): a row pair that fits in a block's shared memory is staged there
  by the first pass (`cuda_staged` below: `staged_bytes` of csrc/common.cuh within the device's opt-in limit per
  block less the kernel's static shared memory, and FASTKD_CUDA_STAGE_BYTES): 2 reads, as Triton's one block; a
  longer row is re-read by every pass: KL and DKD 6 reads with a gradient, 4 without; JSD 8 with, 6 without;
  + g writes.
- The backward (fastkd/triton/rows.py `scale_rows_`, csrc/rows.cu): the gradient was written by the forward,
  already weighted; at grad_output exactly 1 (`loss.backward()`, as the suite calls it) the kernel reads its
  scale and returns: no N x V bytes. Any other grad_output: 1 read + 1 write of each gradient (2 g x N x V).

Per pass, as the suite runs them (`bench.suite.time_pass`; N rows of V, e the element size: 4 for float32, 2
for bfloat16/float16; the student needs a gradient, the teacher does not, so g = 1):

    pass         what runs                                      path bytes (R1 = reads with, R0 = without grad)
    fwd-nograd   forward under torch.no_grad(): no gradient      R0 x N x V x e
    fwd          forward, the student requiring a gradient       (R1 + g) x N x V x e   (the gradient written here)
    bwd          backward alone = fwd+bwd - fwd                  0 (grad_output 1), else 2 g x N x V x e
    fwd+bwd      forward then loss.backward()                    fwd + bwd

    Triton, V <= MAX_BLOCK_V:  R0 = R1 = 2 (every loss)
    Triton, V > MAX_BLOCK_V:   KL, DKD: R0 = 4, R1 = 6;   JSD: R0 = 6, R1 = 8
    CUDA C++, staged:          R0 = R1 = 2 (every loss)
    CUDA C++, re-read:         KL, DKD: R0 = 4, R1 = 6;   JSD: R0 = 6, R1 = 8

So path / floor (floors 2, 2, 1, 3 x N x V x e) is, for one block (or staged): 1.00, 1.50, 0.00, 1.00; for KL/DKD
streamed (or re-read): 2.00, 3.50, 0.00, 2.33 (= (6 + 1) / 3); for JSD streamed: 3.00, 4.50, 0.00, 3.00.
On an H100/H200 (227 KiB per block) CUDA C++ stages bfloat16 rows up to V ~ 57K and float32 up to ~28.7K.

Included besides the N x V terms: DKD's int64 labels (8 x N bytes, once per forward), as the floor counts them,
and KD's labels when the CE term is on (`ce=True`; the suite's kd case has none: CE reads the student row the
KL reads anyway, so it adds no N x V bytes). Left out, all O(N): the per-row loss terms written (4 bytes each),
the row weights, the target logits and the scales' loads, and the PyTorch reduction of the per-row terms.
RKD and attention transfer have no such model in their kernels: `path_bytes` returns None for them.
"""
from __future__ import annotations

import math
import os

import torch

from .cases import DTYPES, LOSSES, PASSES, Loss

BACKENDS = ("triton", "cuda")
LABEL_BYTES = 8  # int64 labels / targets


def row_kernel(loss: Loss) -> str | None:
    """Which row kernel runs `loss`: "kl", "jsd" or "dkd"; None for losses without a traffic model."""
    if loss.op in ("kd_loss", "kl_div_loss"):
        return "kl"
    if loss.op == "jsd_loss":
        # beta 0 and 1 are exactly forward and reverse KL and run on the KL kernel (fastkd.kernel_losses).
        return "kl" if float(loss.kwargs.get("beta", 0.5)) in (0.0, 1.0) else "jsd"
    if loss.op == "dkd_loss":
        return "dkd"
    return None


def triton_max_block_v() -> int | None:
    """`fastkd.triton.rows.MAX_BLOCK_V` as it is now (None where the Triton backend cannot be imported)."""
    try:
        from fastkd.triton import rows
    except Exception:  # no triton package, or a broken import: no Triton model
        return None
    return int(rows.MAX_BLOCK_V)


# The shared memory per block an H100 or H200 lets a kernel opt in to (227 KiB): the CUDA C++ model's device where
# no GPU is visible (on a GPU, its own limit).
H100_SHARED_OPTIN = 232448
# The most static shared memory a CUDA C++ row kernel declares (its block reductions' scratch; 2304 bytes at most
# when measured for sm_80 and sm_90): tests/test_cuda_build.py checks the built kernels against it. Its dynamic
# shared memory is the opt-in limit less its own static size; the model takes this bound for all of them.
ROW_KERNEL_STATIC_SHARED = 2560
STAGE_ENV = "FASTKD_CUDA_STAGE_BYTES"


def cuda_staged_bytes(V: int, elem: int) -> int:
    """csrc/common.cuh `staged_bytes` for a row pair of one element size: each row V + K elements (K = 16 / elem),
    the first rounded up to 16 bytes."""
    k = 16 // elem
    return -(-(V + k) * elem // 16) * 16 + (V + k) * elem


def cuda_stage_limit() -> int:
    """The most bytes a CUDA C++ row kernel stages: the visible GPU's (else an H100's) opt-in shared memory per block
    less ROW_KERNEL_STATIC_SHARED, and no more than FASTKD_CUDA_STAGE_BYTES where set."""
    optin = H100_SHARED_OPTIN
    if torch.cuda.is_available():
        optin = int(getattr(torch.cuda.get_device_properties(torch.cuda.current_device()),
                            "shared_memory_per_block_optin", optin))
    limit = optin - ROW_KERNEL_STATIC_SHARED
    cap = os.environ.get(STAGE_ENV, "")
    return min(limit, int(cap)) if cap.strip().isdigit() else limit


def cuda_staged(V: int, elem: int) -> bool:
    """Whether the CUDA C++ row kernels stage a row pair of V elements of `elem` bytes in shared memory."""
    return cuda_staged_bytes(V, elem) <= cuda_stage_limit()


def one_block(backend: str, V: int, elem: int) -> bool | None:
    """Whether `backend` reads a row of V elements of `elem` bytes once: Triton where V <= MAX_BLOCK_V, CUDA C++
    where the row pair is staged in shared memory."""
    if backend == "cuda":
        return cuda_staged(V, elem)
    if backend == "triton":
        limit = triton_max_block_v()
        return None if limit is None else V <= limit
    return None


def reads(kernel: str, backend: str, V: int, grad: bool, elem: int) -> int | None:
    """Element reads per element of the N x V input pair (X and Y together) in one forward launch."""
    single = one_block(backend, V, elem)
    if single is None:
        return None
    if single:
        return 2
    passes = 4 if kernel == "jsd" else 3           # with a gradient; the last (gradient) pass skipped without
    return 2 * passes if grad else 2 * (passes - 1)


def path_elements(kernel: str, backend: str, V: int, pass_: str, grads: int = 1,
                  grad_output_one: bool = True, elem: int = 2) -> int | None:
    """The multiple of N x V elements `pass_` moves (see the module docstring's table); `elem`: the logits'
    element size, which decides whether CUDA C++ stages the row."""
    if pass_ not in PASSES:
        raise ValueError(f"unknown pass {pass_!r}; choose from {PASSES}")
    bwd = 0 if grad_output_one else 2 * grads
    if pass_ == "bwd":
        return bwd if one_block(backend, V, elem) is not None else None
    if pass_ == "fwd-nograd" or grads == 0:
        fwd = reads(kernel, backend, V, grad=False, elem=elem)
    else:
        fwd = reads(kernel, backend, V, grad=True, elem=elem)
        fwd = None if fwd is None else fwd + grads
    if fwd is None:
        return None
    return fwd + bwd if pass_ == "fwd+bwd" else fwd


def path_bytes(loss, shape, dtype: str, backend: str, pass_: str, *, grads: int = 1,
               grad_output_one: bool = True, ce: bool = False) -> int | None:
    """Bytes fastkd's `backend` ("triton" or "cuda") moves in `pass_` for `loss` (a `bench.cases.Loss` or its
    name) on logits of `shape` (..., V) in `dtype`; None for losses without a model (RKD, attention), for
    other backends, and for Triton where it cannot be imported. `grads`: gradients written with a gradient
    (1: the student's, as in the suite; 2: both, mutual learning); `grad_output_one`: whether the backward
    gets exactly 1 (`loss.backward()`); `ce`: KD's cross-entropy term on (its labels counted)."""
    if isinstance(loss, str):
        loss = LOSSES[loss]
    kernel = row_kernel(loss)
    if kernel is None or backend not in BACKENDS:
        return None
    V = int(shape[-1])
    rows = math.prod(shape) // V if V else 0
    elem = torch.empty((), dtype=DTYPES[dtype]).element_size()
    mult = path_elements(kernel, backend, V, pass_, grads, grad_output_one, elem)
    if mult is None:
        return None
    n = mult * rows * V * elem
    if pass_ != "bwd" and (kernel == "dkd" or (ce and loss.op == "kd_loss")):
        n += rows * LABEL_BYTES
    return n


def path_kind(case, backend: str) -> str:
    """How `backend` reads this case's rows: "one block", "3 passes", "4 passes" (Triton), "staged" or "re-read"
    (CUDA C++)."""
    kernel = row_kernel(case.loss)
    single = one_block(backend, case.shape[-1], torch.empty((), dtype=DTYPES[case.dtype]).element_size())
    if kernel is None or single is None:
        return "-"
    if backend == "cuda":
        return "staged" if single else "re-read"
    return "one block" if single else f"{4 if kernel == 'jsd' else 3} passes"


def fmt_bytes(n) -> str:
    """Decimal units, 3 significant digits (GB/s in the CSV is 1e9 bytes per second too)."""
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:#.3g}".rstrip(".") + f" {unit}"
    return f"{n} B"


def ratio(path, floor) -> str:
    return "-" if path is None or not floor else f"{path / floor:.2f}"


def fmt_flops(n) -> str:
    """Decimal units, 3 significant digits: 17.2 TFLOP."""
    if n is None:
        return "-"
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("KFLOP", 1e3)):
        if n >= size:
            return f"{n / size:#.3g}".rstrip(".") + f" {unit}"
    return f"{n} FLOP"


# The fused cases' FLOP splits shown by --list (bench/cases.py, FLOPS_SPLIT): a representative peer of each.
FLOP_SPLITS = (("unfused", ("eager", "compile")), ("fastkd", ("triton", "cuda")), ("liger", ("liger",)))


def fused_lines(cases, passes, peers) -> list[str]:
    """--list for the fused linear + loss cases: one line per pass with the floor (bench/cases.py) and the matmul
    FLOPs each design asked for in `peers` runs in that pass (unfused: eager, compile; fastkd: triton, cuda; liger)."""
    splits = [(name, group[0]) for name, group in FLOP_SPLITS if any(p in peers for p in group)]
    width = max([len(c.label) for c in cases] + [4]) + 2
    lines = ["# fused linear + loss: floor = read h_s, W_s, h_t, W_t, labels once (fwd), write dh_s, dW_s (bwd); "
             "flops = the 2 x BT x H x V products each design runs in the pass (bench/cases.py FLOPS_SPLIT)",
             f"# {'case':{width - 2}s}{'pass':12s}{'floor':>10s}" + "".join(f"  {name + ' flops':>15s}"
                                                                          for name, _ in splits)]
    for case in cases:
        for i, p in enumerate(passes):
            line = f"{case.label if i == 0 else '':{width}s}{p:12s}{fmt_bytes(case.min_bytes(p)):>10s}"
            line += "".join(f"  {fmt_flops(case.flops(p, peer)):>15s}" for _, peer in splits)
            lines.append(line.rstrip())
    return lines


def list_lines(cases, passes, backends=BACKENDS) -> list[str]:
    """`python -m bench --list`: each case's label; for a logit case one line per pass with its floor and each
    backend's path bytes (and path / floor); the fused cases after the others, one line per pass with the floor
    and the matmul FLOPs (`fused_lines`). Lines that are not cases start with '#'."""
    fused = [c for c in cases if c.fused]
    if fused:
        others = [c for c in cases if not c.fused]
        return (list_lines(others, passes, backends) if others else []) + fused_lines(fused, passes, backends)
    backends = [b for b in BACKENDS if b in backends]
    modelled = backends and any(row_kernel(c.loss) for c in cases)
    width = max([len(c.label) for c in cases] + [4]) + 2
    lines = []
    if modelled:
        limit = triton_max_block_v()
        lines.append("# floor: bytes any implementation moves; path: bytes fastkd's kernels move (bench/traffic.py); "
                     "x = path / floor")
        lines.append(f"# triton reads a row once up to V = {limit if limit is not None else '?'} "
                     f"(fastkd.triton.rows.MAX_BLOCK_V), cuda where the row pair fits in {cuda_stage_limit()} bytes of "
                     f"shared memory (else it re-reads it each pass); fwd: the student needs a "
                     f"gradient (written in the forward), fwd-nograd: under torch.no_grad()")
        head = f"# {'case':{width - 2}s}{'pass':12s}{'floor':>10s}"
        for b in backends:
            head += f"  {b + ' path':>12s} {'x':>5s}"
        lines.append(head)
    for case in cases:
        if not (modelled and row_kernel(case.loss)):
            lines.append(case.label)
            continue
        for i, p in enumerate(passes):
            floor = case.min_bytes(p)
            line = f"{case.label if i == 0 else '':{width}s}{p:12s}{fmt_bytes(floor):>10s}"
            for b in backends:
                path = case.path_bytes(b, p)
                line += f"  {fmt_bytes(path):>12s} {ratio(path, floor):>5s}"
            if i == 0:
                line += "   " + ", ".join(f"{b}: {path_kind(case, b)}" for b in backends)
            lines.append(line.rstrip())
    return lines


def progress_note(case, passes, backends=BACKENDS) -> str:
    """The suffix of a case's progress line in a run: path / floor per backend for the passes run; for a fused
    case the matmul FLOPs of a training step (fwd+bwd, every design)."""
    if case.fused:
        return f"  [matmul {fmt_flops(case.flops('fwd+bwd'))} per fwd+bwd, floor {fmt_bytes(case.min_bytes('fwd+bwd'))}]"
    backends = [b for b in BACKENDS if b in backends]
    if not backends or row_kernel(case.loss) is None:
        return ""
    parts = []
    for b in backends:
        ratios = [ratio(case.path_bytes(b, p), case.min_bytes(p)) for p in passes]
        if all(r == "-" for r in ratios):
            continue
        parts.append(f"{b} {' '.join(ratios)} ({path_kind(case, b)})")
    return f"  [path/floor {'/'.join(passes)}: {'; '.join(parts)}]" if parts else ""
