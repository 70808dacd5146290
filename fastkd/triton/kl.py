"""Fused KL divergence between two rows of logits, with an optional cross-entropy on the student.

Covers `kd_loss` (forward KL, T^2 applied outside, CE on the raw student logits) and `kl_div_loss`
(forward or reverse, masked tokens). The kernels are written for `KL(P || Q)` with P from logits X and
Q from logits Y, both divided by T: forward KL is X = teacher, Y = student; reverse swaps them.

Maths, per row, with `x = X / T`, `y = Y / T` (float32, `x = X * (1/T)`):
    M_x = max x,  a_j = x_j - M_x,  Z_x = sum exp(a),  p_j = exp(a_j) / Z_x      (likewise M_y, b, Z_y, q)
    e_j = a_j - b_j                       (so log p_j - log q_j = e_j - L)
    E = sum_j exp(a_j) e_j,  Ebar = E / Z_x = sum p e
    D = Z_x - Z_y = sum_j (exp(a_j) - exp(b_j)), each term by `rows.exp_diff`
    L = log(Z_x / Z_y) = log1p(D / Z_y) if |D| <= Z_y / 2, else log(Z_x / Z_y)      (`rows.log_ratio`)
    KL = sum p (log p - log q) = Ebar - L
Terms with p_j = 0 are 0 (also against y = -inf: `E` sums `exp(a) e` only where exp(a) > 0 and b > -inf);
a term with p_j > 0 (in float32) against y_j = -inf makes KL = +inf (a flag, never summed). A row max of
-inf (a row of -inf) is replaced by 0 before subtracting (`rows.finite_or_zero`): a = -inf, never NaN.
Gradients (d/dX = d/dx / T):
    dKL/dy_j = q_j - p_j
    dKL/dx_j = p_j ((log p_j - log q_j) - KL) = p_j (e_j - Ebar)       (0 where p_j = 0; L cancels)
    CE = (M_s - s_target) + log Z_s on the raw student s (M_s = max s, Z_s = sum exp(s - M_s)),
    dCE/ds_j = exp(s_j - M_s) / Z_s - [j = target].

Why this formulation (u = 2^-24): `lse = M + log Z` and `x - lse` carry an absolute error u |M| into every
log-probability, the whole KL for logits offset by 1e3, at T = 0.05, or near float16's 6e4. Here
`a = x - M` is exact for the entries that carry the mass (x within a factor 2 of M), and `log Z <= log V`.
`L` is a difference of two row constants: as `log Z_x - log Z_y` (or `log(Z_x / Z_y)`) it carries
u log V (u) absolute, against a KL that is ~1e-3 of log V for near rows (T = 100); from `D`, summed from
per-element differences computed without cancellation, its error is u |D| / Z_y, the size of the KL's
own terms. The teacher's gradient uses `e_j - Ebar` with `Ebar` from the forward's own sum of the same
`exp(a_j) e_j`: for a one-hot p (logits of 1e4) it is exactly 0, as it must be, and the `L` shared by the
per-element log-ratio and the KL cancels out of it exactly instead of leaving u log V behind.

Design and cost: the sums need the final maxima. A row that fits one block (V <= `rows.MAX_BLOCK_V`) is
loaded once and kept in registers: the forward reads each row once. A longer row is read twice: pass 1
takes the maxima, pass 2 all the sums (no rescaling, so no rescaling error). The forward saves per-row
statistics (M_x, Z_x, M_y, Z_y, Ebar, M_s, Z_s); the backward re-reads X and Y and writes the gradient.
Element traffic, forward plus backward with one gradient: 2 + 2 reads + 1 write = 5 x N x V for V <= 2048,
4 + 2 + 1 = 7 x N x V beyond (the second forward read is often served from L2), against 3 for a gradient
computed in the forward pass. We take the re-read because the gradient then follows `grad_output` exactly
(any per-row weight, a second backward, reduction "none") without an N x V buffer held from forward to
backward, and an inference-only forward costs 2 reads. Per element: forward 2 exp (3 with CE) plus the
multiply-adds of `expm1_small` for D; backward 2 exp (3 with CE). On a GPU the kernels are bound by memory
traffic at these counts (an exp is one MUFU op; the Taylor series is ~10 FMAs). Peak memory above the
inputs is the gradient itself plus O(N).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..kernel_ops import KL_STATS
from .rows import block_size, exp_diff, finite_or_zero, flat_index, log_ratio, num_warps, row_layout, row_start

# The per-row statistics, as wide as the op's declaration says (fastkd.kernel_ops):
# M_x, Z_x, M_y, Z_y, Ebar = sum p (a - b), M_s, Z_s (M_s, Z_s: the raw student, for CE)
STATS = tl.constexpr(KL_STATS)


@triton.jit
def load_block(x_row, y_row, offs, mask, x_col, y_col, inv_temperature):
    """`(x, y, y_raw)` of one block, -inf outside the row."""
    x = tl.load(x_row + offs * x_col, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
    y_raw = tl.load(y_row + offs * y_col, mask=mask, other=float("-inf")).to(tl.float32)
    return x, y_raw * inv_temperature, y_raw


@triton.jit
def kl_terms(x, y, m_x, m_y):
    """Per element: `exp(a)`, `exp(b)`, `exp(a) e` (0 where p = 0 or q = 0), `exp(a) - exp(b)`, and whether
    p > 0 meets y = -inf; `m_x`, `m_y` are the row maxima made finite."""
    a = x - m_x
    b = y - m_y
    ea = tl.exp(a)
    eb = tl.exp(b)
    y_masked = b == float("-inf")
    w = tl.where((ea > 0) & ~y_masked, ea * (a - b), 0.0)
    return ea, eb, w, exp_diff(a, b, ea, eb), (ea > 0) & y_masked


@triton.jit
def kl_forward_kernel(
    x_ptr, y_ptr, labels_ptr, target_ptr, kl_ptr, ce_ptr, stats_ptr,
    V, inner_size, x_outer, x_inner, x_col, y_outer, y_inner, y_col,
    inv_temperature, ignore_index,
    HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, BLOCK_V: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = row_start(x_ptr, row, inner_size, x_outer, x_inner)
    y_row = row_start(y_ptr, row, inner_size, y_outer, y_inner)
    n_cols = V
    if HAS_LABELS:
        active = tl.load(labels_ptr + row) != ignore_index
        n_cols = tl.where(active, V, 0)  # an ignored token reads nothing

    cols = tl.arange(0, BLOCK_V)
    zeros = tl.zeros([BLOCK_V], tl.float32)
    if ONE_BLOCK:
        # The whole row in registers: maxima, then every sum, from one read.
        offs = cols.to(tl.int64)
        x, y, y_raw = load_block(x_row, y_row, offs, offs < n_cols, x_col, y_col, inv_temperature)
        m_x = finite_or_zero(tl.max(x, 0))
        m_y = finite_or_zero(tl.max(y, 0))
        ea, eb, w, d, inf_term = kl_terms(x, y, m_x, m_y)
        z_x = tl.sum(ea, 0)
        z_y = tl.sum(eb, 0)
        e_sum = tl.sum(w, 0)
        d_sum = tl.sum(d, 0)
        any_inf = tl.max(inf_term.to(tl.int32), 0) > 0
        m_s = 0.0
        z_s = 0.0
        if HAS_CE:
            m_s = finite_or_zero(tl.max(y_raw, 0))
            z_s = tl.sum(tl.exp(y_raw - m_s), 0)
    else:
        # Pass 1: the maxima.
        mx_lane = tl.full([BLOCK_V], float("-inf"), tl.float32)
        my_lane = mx_lane
        ms_lane = mx_lane
        for start in range(0, n_cols, BLOCK_V):
            offs = (start + cols).to(tl.int64)
            x, y, y_raw = load_block(x_row, y_row, offs, offs < n_cols, x_col, y_col, inv_temperature)
            mx_lane = tl.maximum(mx_lane, x)
            my_lane = tl.maximum(my_lane, y)
            if HAS_CE:
                ms_lane = tl.maximum(ms_lane, y_raw)
        m_x = finite_or_zero(tl.max(mx_lane, 0))
        m_y = finite_or_zero(tl.max(my_lane, 0))
        m_s = finite_or_zero(tl.max(ms_lane, 0))
        # Pass 2: the sums, against the final maxima (no rescaling).
        zx_lane, zy_lane, zs_lane, e_lane, d_lane = zeros, zeros, zeros, zeros, zeros
        inf_lane = tl.zeros([BLOCK_V], tl.int32)
        for start in range(0, n_cols, BLOCK_V):
            offs = (start + cols).to(tl.int64)
            x, y, y_raw = load_block(x_row, y_row, offs, offs < n_cols, x_col, y_col, inv_temperature)
            ea, eb, w, d, inf_term = kl_terms(x, y, m_x, m_y)
            zx_lane += ea
            zy_lane += eb
            e_lane += w
            d_lane += d
            inf_lane = tl.maximum(inf_lane, inf_term.to(tl.int32))
            if HAS_CE:
                zs_lane += tl.exp(y_raw - m_s)
        z_x = tl.sum(zx_lane, 0)
        z_y = tl.sum(zy_lane, 0)
        e_sum = tl.sum(e_lane, 0)
        d_sum = tl.sum(d_lane, 0)
        any_inf = tl.max(inf_lane, 0) > 0
        z_s = tl.sum(zs_lane, 0)

    e_bar = e_sum / z_x
    kl = e_bar - log_ratio(z_x, z_y, d_sum)
    kl = tl.where(any_inf, float("inf"), kl)
    if HAS_CE:
        target = tl.load(target_ptr + row).to(tl.int64)
        valid = (target >= 0) & (target < V)  # out of range: NaN, never an out-of-bounds read
        s_target = tl.load(y_row + target * y_col, mask=valid, other=0.0).to(tl.float32)
        tl.store(ce_ptr + row, tl.where(valid, (m_s - s_target) + tl.log(z_s), float("nan")))
    if HAS_LABELS:
        # An ignored token's statistics are 0 (its sums are empty: 0 / 0 must not reach the saved tensor).
        kl = tl.where(active, kl, 0.0)
        m_x, z_x, e_bar = tl.where(active, m_x, 0.0), tl.where(active, z_x, 0.0), tl.where(active, e_bar, 0.0)
        m_y, z_y = tl.where(active, m_y, 0.0), tl.where(active, z_y, 0.0)
        m_s, z_s = tl.where(active, m_s, 0.0), tl.where(active, z_s, 0.0)
    tl.store(kl_ptr + row, kl)
    tl.store(stats_ptr + row * STATS + 0, m_x)
    tl.store(stats_ptr + row * STATS + 1, z_x)
    tl.store(stats_ptr + row * STATS + 2, m_y)
    tl.store(stats_ptr + row * STATS + 3, z_y)
    tl.store(stats_ptr + row * STATS + 4, e_bar)
    tl.store(stats_ptr + row * STATS + 5, m_s)
    tl.store(stats_ptr + row * STATS + 6, z_s)


@triton.jit
def kl_backward_kernel(
    x_ptr, y_ptr, labels_ptr, target_ptr, stats_ptr, grad_kl_ptr, grad_ce_ptr, dx_ptr, dy_ptr,
    V, inner_size, x_outer, x_inner, x_col, y_outer, y_inner, y_col,
    inv_temperature, ignore_index,
    HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, X_GRAD: tl.constexpr, Y_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = row_start(x_ptr, row, inner_size, x_outer, x_inner)
    y_row = row_start(y_ptr, row, inner_size, y_outer, y_inner)
    m_x = tl.load(stats_ptr + row * STATS + 0)
    z_x = tl.load(stats_ptr + row * STATS + 1)
    m_y = tl.load(stats_ptr + row * STATS + 2)
    z_y = tl.load(stats_ptr + row * STATS + 3)
    e_bar = tl.load(stats_ptr + row * STATS + 4)
    m_s = tl.load(stats_ptr + row * STATS + 5)
    z_s = tl.load(stats_ptr + row * STATS + 6)
    # d/dX = d/dx / T: the 1/T rides on the incoming gradient.
    g_kl = tl.load(grad_kl_ptr + row) * inv_temperature
    active = True
    if HAS_LABELS:
        active = tl.load(labels_ptr + row) != ignore_index
    g_ce = 0.0
    target = -1
    if HAS_CE:
        g_ce = tl.load(grad_ce_ptr + row)
        target = tl.load(target_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = (start + cols).to(tl.int64)
        mask = offs < V
        # An ignored token reads nothing and gets a zero gradient.
        x, y, y_raw = load_block(x_row, y_row, offs, mask & active, x_col, y_col, inv_temperature)
        a = x - m_x
        b = y - m_y
        ea = tl.exp(a)
        p = ea / z_x
        if Y_GRAD:
            dy = (tl.exp(b) / z_y - p) * g_kl
            if HAS_CE:
                dy += g_ce * (tl.exp(y_raw - m_s) / z_s - tl.where(offs == target, 1.0, 0.0))
            dy = tl.where(active, dy, 0.0)
            tl.store(dy_ptr + row * V + offs, dy.to(dy_ptr.dtype.element_ty), mask=mask)
        if X_GRAD:
            # The same `a - b` as the forward's `E`: exactly 0 for a one-hot p.
            dx = tl.where(ea > 0, p * ((a - b) - e_bar), 0.0) * g_kl
            dx = tl.where(active, dx, 0.0)
            tl.store(dx_ptr + row * V + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _layouts(student, teacher, reverse):
    x, y = (student, teacher) if reverse else (teacher, student)
    return row_layout(x), row_layout(y)


def kl_rows(student, teacher, temperature, reverse, target, labels, ignore_index):
    """Per-row `(KL, CE, stats)`: KL(p_t || p_s) (or reverse) and CE(student, target) (empty without target)."""
    V = student.shape[-1]
    rows = student.numel() // V
    (x, x_outer, x_inner, x_col, inner), (y, y_outer, y_inner, y_col, _) = _layouts(student, teacher, reverse)
    kl = torch.empty(rows, dtype=torch.float32, device=student.device)
    ce = torch.empty(rows if target is not None else 0, dtype=torch.float32, device=student.device)
    stats = torch.empty(rows, STATS, dtype=torch.float32, device=student.device)
    labels, target = flat_index(labels), flat_index(target)
    block = block_size(V)
    kl_forward_kernel[(rows,)](
        x, y, labels if labels is not None else kl, target if target is not None else kl, kl, ce, stats,
        V, inner, x_outer, x_inner, x_col, y_outer, y_inner, y_col, 1.0 / temperature, ignore_index,
        HAS_LABELS=labels is not None, HAS_CE=target is not None, BLOCK_V=block, ONE_BLOCK=V <= block,
        num_warps=num_warps(block))
    return kl, ce, stats


def kl_rows_backward(grad_kl, grad_ce, student, teacher, stats, temperature, reverse, target, labels, ignore_index,
                student_grad, teacher_grad):
    """`(d student, d teacher)` in the inputs' dtypes and shapes; an empty tensor for a gradient not asked for."""
    V = student.shape[-1]
    rows = student.numel() // V
    (x, x_outer, x_inner, x_col, inner), (y, y_outer, y_inner, y_col, _) = _layouts(student, teacher, reverse)
    d_student = torch.empty(student.shape if student_grad else 0, dtype=student.dtype, device=student.device)
    d_teacher = torch.empty(teacher.shape if teacher_grad else 0, dtype=teacher.dtype, device=teacher.device)
    dx, dy = (d_student, d_teacher) if reverse else (d_teacher, d_student)
    x_grad, y_grad = (student_grad, teacher_grad) if reverse else (teacher_grad, student_grad)
    labels, target = flat_index(labels), flat_index(target)
    block = block_size(V)
    kl_backward_kernel[(rows,)](
        x, y, labels if labels is not None else stats, target if target is not None else stats, stats,
        grad_kl.contiguous(), grad_ce.contiguous() if grad_ce is not None else stats, dx, dy,
        V, inner, x_outer, x_inner, x_col, y_outer, y_inner, y_col, 1.0 / temperature, ignore_index,
        HAS_LABELS=labels is not None, HAS_CE=target is not None, X_GRAD=x_grad, Y_GRAD=y_grad,
        BLOCK_V=block, num_warps=num_warps(block))
    return d_student, d_teacher
