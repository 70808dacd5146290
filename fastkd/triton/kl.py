"""Fused KL divergence between two rows of logits, with an optional cross-entropy on the student.

Covers `kd_loss` (forward KL, T^2 applied outside, CE on the raw student logits) and `kl_div_loss`
(forward or reverse, masked tokens). The kernels are written for `KL(P || Q)` with P from logits X and
Q from logits Y, both divided by T: forward KL is X = teacher, Y = student; reverse swaps them.

Maths, per row, with `x = X / T`, `y = Y / T`, `A = lse(x)`, `B = lse(y)`, `p = exp(x - A)`, `q = exp(y - B)`:
    KL = sum p (x - A - y + B) = sum p (x - y) - A + B                  (sum p = 1)
so one streaming pass over the row accumulates `lse(x)`, `lse(y)` and `W = sum exp(x - m)(x - y)`
(rescaled like the lse sum), and `KL = W / Z_x - A + B`. Terms with p = 0 are 0 (also against y = -inf);
a term with p > 0 against y = -inf makes KL = +inf, tracked by the largest such x rather than summed,
so that rescaling never meets `inf * 0`.
Gradients (d/dX = d/dx / T):
    dKL/dy_j = q_j - p_j
    dKL/dx_j = p_j ((x_j - A) - (y_j - B) - KL)          (0 where p_j = 0)
    CE = lse(s) - s_target on the raw student s, dCE/ds_j = softmax(s)_j - [j = target].

Design: the forward pass reads X and Y once and saves per-row statistics (A, B, KL, lse(s)); the backward
re-reads X and Y and writes the gradient. That is 5 x N x V element reads and writes for forward and
backward, against 3 for a gradient computed in the forward pass. We take the re-read because the gradient
then follows `grad_output` exactly (any per-row weight, a second backward, reduction "none") without an
N x V buffer held from forward to backward or an extra scaling pass, and an inference-only forward costs
2 reads. Peak memory above the inputs is the gradient itself plus O(N).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import block_size, flat_index, lane_weights, num_warps, online_update, row_layout, row_start

STATS = 4  # per row: A = lse(x), B = lse(y), KL, lse of the raw student (for CE)


@triton.jit
def kl_forward_kernel(
    x_ptr, y_ptr, labels_ptr, target_ptr, kl_ptr, ce_ptr, stats_ptr,
    V, inner_size, x_outer, x_inner, x_col, y_outer, y_inner, y_col,
    inv_temperature, ignore_index,
    HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = row_start(x_ptr, row, inner_size, x_outer, x_inner)
    y_row = row_start(y_ptr, row, inner_size, y_outer, y_inner)
    n_cols = V
    if HAS_LABELS:
        active = tl.load(labels_ptr + row) != ignore_index
        n_cols = tl.where(active, V, 0)  # an ignored token reads nothing

    neg_inf = tl.full([BLOCK_V], float("-inf"), tl.float32)
    zeros = tl.zeros([BLOCK_V], tl.float32)
    m_x, z_x, w, inf_x = neg_inf, zeros, zeros, neg_inf
    m_y, z_y = neg_inf, zeros
    m_s, z_s = neg_inf, zeros
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, n_cols, BLOCK_V):
        offs = (start + cols).to(tl.int64)
        mask = offs < n_cols
        x = tl.load(x_row + offs * x_col, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
        y_raw = tl.load(y_row + offs * y_col, mask=mask, other=float("-inf")).to(tl.float32)
        y = y_raw * inv_temperature
        m_x, z_x, rescale, e = online_update(m_x, z_x, x)
        diff = x - y
        w = w * rescale + tl.where((e > 0) & (diff != float("inf")), e * diff, 0.0)
        inf_x = tl.maximum(inf_x, tl.where(diff == float("inf"), x, float("-inf")))
        m_y, z_y, _, _ = online_update(m_y, z_y, y)
        if HAS_CE:
            m_s, z_s, _, _ = online_update(m_s, z_s, y_raw)

    big_x, weight_x = lane_weights(m_x)
    sum_x = tl.sum(z_x * weight_x, 0)
    lse_x = big_x + tl.log(sum_x)
    big_y, weight_y = lane_weights(m_y)
    lse_y = big_y + tl.log(tl.sum(z_y * weight_y, 0))
    # Subtracting the lse difference last makes KL exactly 0 for one class and for identical rows.
    kl = tl.sum(w * weight_x, 0) / sum_x - (lse_x - lse_y)
    kl = tl.where(tl.exp(tl.max(inf_x, 0) - lse_x) > 0, float("inf"), kl)
    lse_s = 0.0
    if HAS_CE:
        big_s, weight_s = lane_weights(m_s)
        lse_s = big_s + tl.log(tl.sum(z_s * weight_s, 0))
        target = tl.load(target_ptr + row).to(tl.int64)
        valid = (target >= 0) & (target < V)  # out of range: NaN, never an out-of-bounds read
        y_target = tl.load(y_row + target * y_col, mask=valid, other=0.0).to(tl.float32)
        tl.store(ce_ptr + row, tl.where(valid, lse_s - y_target, float("nan")))
    if HAS_LABELS:
        kl = tl.where(active, kl, 0.0)
    tl.store(kl_ptr + row, kl)
    tl.store(stats_ptr + row * 4 + 0, lse_x)
    tl.store(stats_ptr + row * 4 + 1, lse_y)
    tl.store(stats_ptr + row * 4 + 2, kl)
    tl.store(stats_ptr + row * 4 + 3, lse_s)


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
    lse_x = tl.load(stats_ptr + row * 4 + 0)
    lse_y = tl.load(stats_ptr + row * 4 + 1)
    kl = tl.load(stats_ptr + row * 4 + 2)
    lse_s = tl.load(stats_ptr + row * 4 + 3)
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
        x = tl.load(x_row + offs * x_col, mask=mask & active, other=float("-inf")).to(tl.float32) * inv_temperature
        y_raw = tl.load(y_row + offs * y_col, mask=mask & active, other=float("-inf")).to(tl.float32)
        y = y_raw * inv_temperature
        p = tl.exp(x - lse_x)
        if Y_GRAD:
            dy = (tl.exp(y - lse_y) - p) * g_kl
            if HAS_CE:
                dy += g_ce * (tl.exp(y_raw - lse_s) - tl.where(offs == target, 1.0, 0.0))
            dy = tl.where(active, dy, 0.0)
            tl.store(dy_ptr + row * V + offs, dy.to(dy_ptr.dtype.element_ty), mask=mask)
        if X_GRAD:
            dx = tl.where(p > 0, p * ((x - lse_x) - (y - lse_y) - kl), 0.0) * g_kl
            dx = tl.where(active, dx, 0.0)
            tl.store(dx_ptr + row * V + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _layouts(student, teacher, reverse):
    x, y = (student, teacher) if reverse else (teacher, student)
    return row_layout(x), row_layout(y)


def kl_forward(student, teacher, temperature, reverse, target, labels, ignore_index):
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
        HAS_LABELS=labels is not None, HAS_CE=target is not None, BLOCK_V=block, num_warps=num_warps(block))
    return kl, ce, stats


def kl_backward(grad_kl, grad_ce, student, teacher, stats, temperature, reverse, target, labels, ignore_index,
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
