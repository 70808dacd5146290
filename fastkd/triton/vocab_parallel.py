"""Vocabulary-parallel (tensor-parallel) divergences: the per-slice kernels between the collectives.

Each rank holds the same rows and a slice `[start, end)` of the vocabulary of the student's logits S and the
teacher's logits Tl (`(..., V_local)`, any row strides, fp32/bf16/fp16; float32 math). The caller
(`fastkd.distributed.vocab_parallel`) combines the slices' row statistics with collectives between the launches;
these kernels are single-process, one program per row, streaming over the slice in blocks of
`min(next_power_of_2(V_local), rows.STREAM_BLOCK_V)` lanes (8 warps at 2048). With `x = S * (1/T)`,
`y = Tl * (1/T)` (the float `inv_temperature`, as the other row kernels' `1/T` multiplier):

1. `vocab_row_stats` -> `maxima (rows, 2)`, `sums (rows, 2)` (float32; column 0 the student x, 1 the teacher y):
       m = max_{j in slice} x_j,   z = sum_{j in slice} exp(x_j - m)       (all -inf: m = -inf, z = 0)
   The caller forms `M = max_ranks m`, `Z = sum_ranks z exp(m - M)` and hands back `shift = M` (0 where not
   finite) and `log_total = log Z`, per row and distribution, each `(rows, 2)` in the same column order.
   One pass, the online max/sum with ONE exponential per element and distribution: per lane, a new element
   either raises the max (`z' = z exp(m - x) + 1`) or not (`z' = z + exp(x - m)`), and the two exponentials
   are the same `exp(-|x - m|)`: `t = exp(min(x, m) - max(x, m))`, `z' = x > m ? z t + 1 : z + t` (the
   rescale of `rows.online_update` and its new term share one exp). The lanes are combined at the end.
2. `vocab_row_terms` -> `partial (rows, 2)` (float32) and, for kind "forward" with `student_grad`, the student's
   gradient of the slice. With `log q_j = (x_j - shift_s) - log_total_s`, `log p_j = (y_j - shift_t) -
   log_total_t` (that order of operations, as `vocab_parallel.log_probs`: `x - shift` is exact for the entries
   carrying the mass), the slice's partial sums, a term whose left probability is 0 contributing 0 (also
   against -inf; a NaN passes, `p * where(p > 0, d, 0)` as `vocab_parallel._kl_partial`):
       "forward":  [sum p (log p - log q), 0]
       "reverse":  [sum q (log q - log p), 0]
       "jsd":      [sum p (log p - log m), sum q (log q - log m)],   m = beta p + (1 - beta) q,  0 < beta < 1
   `log p - log m` and `log q - log m` directly from `delta = log p - log q` (`jsd.mixture_log_ratios`: with
   `hi` the larger of p, q and `w_lo` the weight of the smaller, `log hi - log m = -log1p(w_lo expm1(-|delta|))`;
   the reference's `log_mixture`, `log m = hi + log1p(w_lo expm1(lo - hi))`, without the rounding of `log m`
   itself). Forward KL's student gradient needs no global row sum, so it is written in the same pass:
       d/dS_j = weight_r (q_j - p_j) / T        (`q - p` by `rows.exp_diff`: relative accuracy, 0 for p = q)
   in the student's dtype, contiguous, the student slice's shape (float32 math, rounded once at the store).
3. `vocab_row_grad` -> the student's gradient (the student's dtype, contiguous, its shape) for kinds that need
   the GLOBAL row KL (`row_kl (rows,)` float32: the partials summed over the ranks), as the closed forms of
   `vocab_parallel._StudentDivergence`:
       "reverse":  weight_r q_j (d_j - KL_r) / T,                d_j = where(q_j > 0, log q_j - log p_j, 0)
       "jsd":      weight_r (1 - beta) q_j (d_j - KL_s,r) / T,   d_j = where(q_j > 0, log q_j - log m_j, 0)
                   (KL_s,r = KL(q || m), the student part of the partials summed over the ranks)

What bounds each kernel (per element of the slice; b = 2 bytes for bf16/fp16, 4 for fp32). The kernels do no
more than a few tens of FMA-pipe operations per element; an H200 streams ~4.8 TB/s and does 132 SMs x 16
exp2 per clock (~4.2e12 exp2/s at 1.98 GHz; `tl.exp` is one multiply by log2(e) and one `ex2.approx`, `tl.log`
one `lg2.approx` and a multiply), so the exponential budget is ~0.9 exp2 per byte moved:
- stats:  reads 2b (S and Tl once), writes nothing N x V; 2 exp (one per distribution). bf16: 4 bytes and 2
  exp per element: memory-bound (~1.2e12 elements/s of memory against ~2.1e12 of MUFU). A two-pass max then
  sum would read twice; the plain online update (`rows.online_update`) takes 2 exp per distribution, 4 in all,
  which at bf16 would make the MUFU the bound (4 exp per 4 bytes > 0.9 per byte).
- terms:  reads 2b. "forward" 1 exp (p), + 1 exp (q) and a write of b with the gradient: 2 exp per 3b;
  "reverse" 1 exp (q); "jsd" 2 exp (p, q) + 1 exp (`expm1`) + 1 log (`log1p`) = 4 MUFU per 2b: at bf16 (4
  bytes) about at the MUFU bound, at fp32 (8 bytes) memory-bound.
- grad:   reads 2b, writes b. "reverse" 1 exp (q); "jsd" 1 exp (q) + 1 exp + 1 log (the mixture again, rather
  than keep it from the terms pass: recomputing is cheaper than storing and re-reading it, 4b per element).
The row statistics `(rows, 2)` are read once per program; rows that are all -inf (masked ids) cost the same reads.
Forward KL with the student's gradient is therefore two launches over the slice (stats; terms + gradient), 4
reads and 1 write per element; reverse KL and JSD three (stats, terms, grad), 6 reads and 1 write.

Registers (the static compile, `fastkd.triton.static._stand_in`, Triton 3.8's ptxas, sm_80 and sm_90; fp32, bf16,
fp16; V = 1024 (4 warps) and 8192 (blocks of 2048, 8 warps), contiguous and strided rows; measured 2026-11-30):
at most stats 64, terms 48 (forward / reverse), 70 (forward with the gradient), 82 (jsd), grad 42 (reverse),
55 (jsd); no spills; 128-bit loads (LDG.E.128) for contiguous columns. The kernels hold only a few per-lane
accumulators across blocks, so the 8-warp cap of 128 registers (`rows.row_maxnreg`) never binds.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import rows as _rows
from .jsd import load_block, mixture_log_ratios
from .rows import exp_diff, row_layout, row_start, row_maxnreg, row_warps, row_weight, store_row

KINDS = {"forward": 0, "reverse": 1, "jsd": 2}


@triton.jit
def _stats_update(m, z, x):
    """One online max/sum step per lane with a single exponential: `exp(-|x - m|)` is the rescale of the old
    sum when x raises the max and the new term otherwise. A NaN (in x or already in m) stays NaN in m and z."""
    nan = (x != x) | (m != m)
    m_new = tl.where(nan, x + m, tl.maximum(m, x))
    up = x > m
    t = tl.exp(tl.where(up, m, x) - m_new)
    t = tl.where(m_new == float("-inf"), 0.0, t)  # nothing but -inf seen: -inf - -inf kept out
    return m_new, tl.where(up, z * t + 1.0, z + t)


@triton.jit
def _lanes_total(m, z):
    """`(M, Z)`: the lanes' max and `sum z exp(m - M)` (lanes that saw only -inf count 0)."""
    big = tl.max(m, 0)
    return big, tl.sum(tl.where(m == float("-inf"), 0.0, z * tl.exp(m - big)), 0)


@triton.jit
def vocab_stats_kernel(x_ptr, y_ptr, max_ptr, sum_ptr, V, inner_size, x_outer, x_inner, x_col, y_outer, y_inner,
                       y_col, inv_temperature, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = row_start(x_ptr, row, inner_size, x_outer, x_inner)
    y_row = row_start(y_ptr, row, inner_size, y_outer, y_inner)
    cols = tl.arange(0, BLOCK_V)
    mx = tl.full([BLOCK_V], float("-inf"), tl.float32)
    my = mx
    zx = tl.zeros([BLOCK_V], tl.float32)
    zy = zx
    for start in range(0, V, BLOCK_V):
        offs = (start + cols).to(tl.int64)
        x, y = load_block(x_row, y_row, offs, offs < V, x_col, y_col, inv_temperature)
        mx, zx = _stats_update(mx, zx, x)
        my, zy = _stats_update(my, zy, y)
    m_x, z_x = _lanes_total(mx, zx)
    m_y, z_y = _lanes_total(my, zy)
    tl.store(max_ptr + 2 * row, m_x)
    tl.store(max_ptr + 2 * row + 1, m_y)
    tl.store(sum_ptr + 2 * row, z_x)
    tl.store(sum_ptr + 2 * row + 1, z_y)


@triton.jit
def _log_probs(x, y, shift_s, shift_t, lt_s, lt_t):
    """`(log q, log p)`: `(x - shift) - log_total`, as `vocab_parallel.log_probs`."""
    return (x - shift_s) - lt_s, (y - shift_t) - lt_t


@triton.jit
def _row_numbers(shift_ptr, shift_stride, shift_col, lt_ptr, lt_stride, lt_col, row):
    shift_s = tl.load(shift_ptr + row * shift_stride)
    shift_t = tl.load(shift_ptr + row * shift_stride + shift_col)
    lt_s = tl.load(lt_ptr + row * lt_stride)
    lt_t = tl.load(lt_ptr + row * lt_stride + lt_col)
    return shift_s, shift_t, lt_s, lt_t


@triton.jit
def vocab_terms_kernel(x_ptr, y_ptr, shift_ptr, lt_ptr, w_ptr, part_ptr, dx_ptr,
                       V, inner_size, x_outer, x_inner, x_col, y_outer, y_inner, y_col,
                       shift_stride, shift_col, lt_stride, lt_col, w_stride, inv_temperature, beta, one_minus_beta,
                       KIND: tl.constexpr, X_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = row_start(x_ptr, row, inner_size, x_outer, x_inner)
    y_row = row_start(y_ptr, row, inner_size, y_outer, y_inner)
    shift_s, shift_t, lt_s, lt_t = _row_numbers(shift_ptr, shift_stride, shift_col, lt_ptr, lt_stride, lt_col, row)
    g = 0.0
    if X_GRAD:
        g = tl.load(w_ptr + row * w_stride) * inv_temperature
    cols = tl.arange(0, BLOCK_V)
    acc0 = tl.zeros([BLOCK_V], tl.float32)
    acc1 = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = (start + cols).to(tl.int64)
        mask = offs < V
        x, y = load_block(x_row, y_row, offs, mask, x_col, y_col, inv_temperature)
        log_q, log_p = _log_probs(x, y, shift_s, shift_t, lt_s, lt_t)
        if KIND == 0:  # forward: KL(p || q)
            p = tl.exp(log_p)
            acc0 += p * tl.where(p > 0, log_p - log_q, 0.0)
            if X_GRAD:
                q = tl.exp(log_q)
                dx = exp_diff(log_q, log_p, q, p) * g
                store_row(dx_ptr, row, V, offs, dx, mask)
        elif KIND == 1:  # reverse: KL(q || p)
            q = tl.exp(log_q)
            acc0 += q * tl.where(q > 0, log_q - log_p, 0.0)
        else:  # jsd: KL(p || m), KL(q || m)
            p = tl.exp(log_p)
            q = tl.exp(log_q)
            lp_m, lq_m = mixture_log_ratios(log_q, log_p, 0.0, beta, one_minus_beta)
            acc0 += p * tl.where(p > 0, lp_m, 0.0)
            acc1 += q * tl.where(q > 0, lq_m, 0.0)
    tl.store(part_ptr + 2 * row, tl.sum(acc0, 0))
    tl.store(part_ptr + 2 * row + 1, tl.sum(acc1, 0))


@triton.jit
def vocab_grad_kernel(x_ptr, y_ptr, shift_ptr, lt_ptr, kl_ptr, w_ptr, dx_ptr,
                      V, inner_size, x_outer, x_inner, x_col, y_outer, y_inner, y_col,
                      shift_stride, shift_col, lt_stride, lt_col, kl_stride, w_stride, inv_temperature, beta,
                      one_minus_beta, KIND: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = row_start(x_ptr, row, inner_size, x_outer, x_inner)
    y_row = row_start(y_ptr, row, inner_size, y_outer, y_inner)
    shift_s, shift_t, lt_s, lt_t = _row_numbers(shift_ptr, shift_stride, shift_col, lt_ptr, lt_stride, lt_col, row)
    kl = tl.load(kl_ptr + row * kl_stride)
    g = tl.load(w_ptr + row * w_stride) * inv_temperature
    if KIND == 2:
        g = g * one_minus_beta
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = (start + cols).to(tl.int64)
        mask = offs < V
        x, y = load_block(x_row, y_row, offs, mask, x_col, y_col, inv_temperature)
        log_q, log_p = _log_probs(x, y, shift_s, shift_t, lt_s, lt_t)
        q = tl.exp(log_q)
        if KIND == 1:  # reverse: d = log q - log p
            d = tl.where(q > 0, log_q - log_p, 0.0)
        else:  # jsd: d = log q - log m
            _, lq_m = mixture_log_ratios(log_q, log_p, 0.0, beta, one_minus_beta)
            d = tl.where(q > 0, lq_m, 0.0)
        dx = q * (d - kl) * g
        store_row(dx_ptr, row, V, offs, dx, mask)


# --- launchers ---------------------------------------------------------------------------------------------

def _block(V: int) -> int:
    """The streaming block: the slice's width rounded up to a power of 2, at most `rows.STREAM_BLOCK_V` (and
    `rows.MAX_BLOCK_V`, which the tests set small to run short slices through several blocks)."""
    return min(triton.next_power_of_2(max(V, 1)), _rows.STREAM_BLOCK_V, _rows.MAX_BLOCK_V)


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, name: str) -> tuple[int, int]:
    if student.shape != teacher.shape:
        raise ValueError(f"{name}: student and teacher slices must have one shape, got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    if student.dim() == 0:
        raise ValueError(f"{name}: the slices need a vocabulary dimension")
    return math.prod(student.shape[:-1]), student.shape[-1]


def _check_kind(kind: str, beta: float, name: str) -> int:
    if kind not in KINDS:
        raise ValueError(f"{name}: kind must be one of {tuple(KINDS)}, got {kind!r}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"{name}: kind 'jsd' needs 0 < beta < 1, got {beta}")
    return KINDS[kind]


def _row_pair(t: torch.Tensor, rows: int, what: str) -> tuple[torch.Tensor, int, int]:
    """`(tensor, row stride, column stride)` of a float32 `(rows, 2)` per-row pair, any strides."""
    if t.shape != (rows, 2):
        raise ValueError(f"{what} must have shape ({rows}, 2), got {tuple(t.shape)}")
    t = t.float()
    return t, t.stride(0), t.stride(1)


def _launch_layout(student, teacher):
    x, x_outer, x_inner, x_col, inner = row_layout(student)
    y, y_outer, y_inner, y_col, _ = row_layout(teacher)
    return (x, y), (inner, x_outer, x_inner, x_col, y_outer, y_inner, y_col)


def vocab_row_stats(student: torch.Tensor, teacher: torch.Tensor,
                    inv_temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of this rank's slices `(..., V_local)`: `maxima` and `sums`, float32 `(rows, 2)` (column 0 the
    student, 1 the teacher): `m = max x` and `z = sum exp(x - m)` over the slice, for `x = logits * inv_temperature`
    (m = -inf, z = 0 where the slice row is all -inf)."""
    rows, V = _check_pair(student, teacher, "vocab_row_stats")
    maxima = torch.empty((rows, 2), dtype=torch.float32, device=student.device)
    sums = torch.empty((rows, 2), dtype=torch.float32, device=student.device)
    if rows == 0:
        return maxima, sums
    if V == 0:
        return maxima.fill_(float("-inf")), sums.zero_()
    (x, y), layout = _launch_layout(student, teacher)
    block = _block(V)
    vocab_stats_kernel[(rows,)](x, y, maxima, sums, V, *layout, inv_temperature, BLOCK_V=block,
                                num_warps=row_warps(block), maxnreg=row_maxnreg(block))
    return maxima, sums


def vocab_row_terms(student: torch.Tensor, teacher: torch.Tensor, inv_temperature: float, shift: torch.Tensor,
                    log_total: torch.Tensor, kind: str, beta: float, weight: torch.Tensor | None,
                    student_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """This slice's partial sums `(rows, 2)` float32 of the divergence `kind` ("forward": `[KL(p || q), 0]`,
    "reverse": `[KL(q || p), 0]`, "jsd": `[KL(p || m), KL(q || m)]`, m = beta p + (1 - beta) q), from the global
    `shift` and `log_total` (`(rows, 2)`, column 0 the student, 1 the teacher); and with `student_grad` (kind
    "forward" only) the student's gradient `weight_r (q - p) * inv_temperature`, in the student's dtype and
    shape (contiguous), else an empty `(0,)` tensor. `weight`: float32 `(rows,)`, any stride; None reads as 1."""
    rows, V = _check_pair(student, teacher, "vocab_row_terms")
    code = _check_kind(kind, beta, "vocab_row_terms")
    if student_grad and kind != "forward":
        raise ValueError("vocab_row_terms: the gradient is made here for kind 'forward' only (the others need the "
                         f"global row KL: vocab_row_grad), got kind {kind!r}")
    partial = torch.zeros((rows, 2), dtype=torch.float32, device=student.device)
    grad = torch.empty(student.shape if student_grad else (0,), dtype=student.dtype, device=student.device)
    if rows == 0 or V == 0:
        return partial, grad
    shift, shift_stride, shift_col = _row_pair(shift, rows, "shift")
    log_total, lt_stride, lt_col = _row_pair(log_total, rows, "log_total")
    w, w_stride = row_weight(weight, partial) if student_grad else (partial, 0)
    (x, y), layout = _launch_layout(student, teacher)
    block = _block(V)
    vocab_terms_kernel[(rows,)](x, y, shift, log_total, w, partial, grad, V, *layout, shift_stride, shift_col,
                                lt_stride, lt_col, w_stride, inv_temperature, beta, 1.0 - beta,
                                KIND=code, X_GRAD=student_grad, BLOCK_V=block, num_warps=row_warps(block),
                                maxnreg=row_maxnreg(block))
    return partial, grad


def vocab_row_grad(student: torch.Tensor, teacher: torch.Tensor, inv_temperature: float, shift: torch.Tensor,
                   log_total: torch.Tensor, kind: str, beta: float, row_kl: torch.Tensor,
                   weight: torch.Tensor | None) -> torch.Tensor:
    """The student slice's gradient (its dtype and shape, contiguous) for kind "reverse",
    `weight_r q (d - KL_r) * inv_temperature` with `d = where(q > 0, log q - log p, 0)`, or "jsd",
    `weight_r (1 - beta) q (d - KL_s,r) * inv_temperature` with `d = where(q > 0, log q - log m, 0)`; `row_kl`
    float32 `(rows,)` (any stride) the GLOBAL row KL (reverse) or KL(q || m) (jsd), the partials summed over the
    ranks; `shift`, `log_total` and `weight` as `vocab_row_terms`."""
    rows, V = _check_pair(student, teacher, "vocab_row_grad")
    code = _check_kind(kind, beta, "vocab_row_grad")
    if kind == "forward":
        raise ValueError("vocab_row_grad: kind 'forward' has its gradient from vocab_row_terms(student_grad=True)")
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    if rows == 0 or V == 0:
        return grad
    if row_kl.shape != (rows,):
        raise ValueError(f"row_kl must have shape ({rows},), got {tuple(row_kl.shape)}")
    shift, shift_stride, shift_col = _row_pair(shift, rows, "shift")
    log_total, lt_stride, lt_col = _row_pair(log_total, rows, "log_total")
    kl, kl_stride = row_weight(row_kl, grad)
    w, w_stride = row_weight(weight, grad)
    (x, y), layout = _launch_layout(student, teacher)
    block = _block(V)
    vocab_grad_kernel[(rows,)](x, y, shift, log_total, kl, w, grad, V, *layout, shift_stride, shift_col,
                               lt_stride, lt_col, kl_stride, w_stride, inv_temperature, beta, 1.0 - beta,
                               KIND=code, BLOCK_V=block, num_warps=row_warps(block),
                               maxnreg=row_maxnreg(block))
    return grad
