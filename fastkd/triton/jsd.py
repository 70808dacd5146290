"""Fused generalized Jensen-Shannon divergence (TRL's `generalized_jsd_loss`) between two rows of logits.

Covers `jsd_loss` for 0 < beta < 1; beta = 0 and beta = 1 are exactly forward and reverse KL and run on the
KL kernels (`fastkd.triton.kl`), as the reference switches to them.

Maths, per row, with the student `x = S / T`, the teacher `y = T_logits / T`, `A = lse(x)`, `B = lse(y)`,
`q = exp(x - A)` (student), `p = exp(y - B)` (teacher) and the mixture `m = beta p + (1 - beta) q`:
    JSD = beta KL(p || m) + (1 - beta) KL(q || m)
`log m` is computed from `log q = x - A`, `log p = y - B` as the reference's `log_mixture` does: with
`hi`/`lo` the larger/smaller of the two and `w_lo` the weight of the smaller,
    log m = hi + log1p(w_lo * expm1(lo - hi))
which is exactly `log p` when `log p = log q` (identical rows give a JSD of exactly 0) and
`hi + log(1 - w_lo)` when `lo = -inf`. A term whose probability is 0 contributes 0; where p > 0 or q > 0,
m > 0, so `log m` is finite and no divergence here is infinite.
`log m` needs A and B, known only after the whole row: pass 1 streams the two online log-sum-exps
(`fastkd.triton.rows`), pass 2, in the same program, re-reads the row and sums `p (log p - log m)` and
`q (log q - log m)`; no rescaling is needed in pass 2.
Gradients: treating q as free (dm_i/dq_i = 1 - beta),
    dJSD/dq_i = -beta p_i (1 - beta) / m_i + (1 - beta)(log q_i - log m_i + 1 - q_i (1 - beta) / m_i)
              = (1 - beta)(log q_i - log m_i + 1 - (beta p_i + (1 - beta) q_i) / m_i) = (1 - beta)(log q_i - log m_i)
and through the softmax `dq_i/dx_j = q_i ([i = j] - q_j)`, with `sum_i q_i (log q_i - log m_i) = KL(q || m)`
(the teacher side likewise, weight beta):
    dJSD/dx_j = (1 - beta) q_j ((log q_j - log m_j) - KL(q || m))        (0 where q_j = 0)
    dJSD/dy_j = beta p_j ((log p_j - log m_j) - KL(p || m))              (0 where p_j = 0)
and d/dS = d/dx / T, d/dT_logits = d/dy / T.

Design: as for KL (see `fastkd.triton.kl`), the forward saves per-row statistics (A, B, KL(p||m), KL(q||m))
and the backward re-reads both rows and recomputes `log m`. The forward reads each row twice (the second
read of a row is often served from L2); with the student's gradient only, forward plus backward move
7 x N x V elements (4 reads forward, 2 reads and 1 write backward), with O(N) memory besides the gradient.
Keeping the rows on chip between the passes would cap V; streaming keeps any V up to 262144 on one program.
Tokens whose label is `ignore_index` read nothing, get loss 0 and a zero gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import (block_size, expm1, flat_index, lane_weights, log1p, num_warps, online_update, row_layout,
                   row_start)

STATS = 4  # per row: A = lse(x), B = lse(y), KL(p || m), KL(q || m)


@triton.jit
def log_mixture(log_q, log_p, beta, one_minus_beta):
    """`log(beta p + (1 - beta) q)` from `log q`, `log p` (the reference's `log_mixture`); finite (unused)
    where both are -inf, so that no NaN is computed even on the side of a `where` that is dropped."""
    both_zero = (log_q == float("-inf")) & (log_p == float("-inf"))
    q_is_lo = log_q < log_p
    hi = tl.where(both_zero, 0.0, tl.where(q_is_lo, log_p, log_q))
    lo = tl.where(both_zero, 0.0, tl.where(q_is_lo, log_q, log_p))
    weight_lo = tl.where(q_is_lo, one_minus_beta, beta)
    return hi + log1p(weight_lo * expm1(lo - hi))


@triton.jit
def jsd_forward_kernel(
    x_ptr, y_ptr, labels_ptr, loss_ptr, stats_ptr,
    V, inner_size, x_outer, x_inner, x_col, y_outer, y_inner, y_col,
    inv_temperature, beta, one_minus_beta, ignore_index,
    HAS_LABELS: tl.constexpr, BLOCK_V: tl.constexpr,
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
    cols = tl.arange(0, BLOCK_V)
    # Pass 1: the two log-sum-exps.
    m_x, z_x = neg_inf, zeros
    m_y, z_y = neg_inf, zeros
    for start in range(0, n_cols, BLOCK_V):
        offs = (start + cols).to(tl.int64)
        mask = offs < n_cols
        x = tl.load(x_row + offs * x_col, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
        y = tl.load(y_row + offs * y_col, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
        m_x, z_x, _, _ = online_update(m_x, z_x, x)
        m_y, z_y, _, _ = online_update(m_y, z_y, y)
    big_x, weight_x = lane_weights(m_x)
    lse_x = big_x + tl.log(tl.sum(z_x * weight_x, 0))
    big_y, weight_y = lane_weights(m_y)
    lse_y = big_y + tl.log(tl.sum(z_y * weight_y, 0))

    # Pass 2: both divergences against the mixture.
    acc_q = zeros
    acc_p = zeros
    for start in range(0, n_cols, BLOCK_V):
        offs = (start + cols).to(tl.int64)
        mask = offs < n_cols
        x = tl.load(x_row + offs * x_col, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
        y = tl.load(y_row + offs * y_col, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
        log_q = x - lse_x
        log_p = y - lse_y
        log_m = log_mixture(log_q, log_p, beta, one_minus_beta)
        q = tl.exp(log_q)
        p = tl.exp(log_p)
        acc_q += tl.where(q > 0, q * (log_q - log_m), 0.0)
        acc_p += tl.where(p > 0, p * (log_p - log_m), 0.0)
    kl_q = tl.sum(acc_q, 0)
    kl_p = tl.sum(acc_p, 0)
    loss = beta * kl_p + one_minus_beta * kl_q
    if HAS_LABELS:
        loss = tl.where(active, loss, 0.0)
    tl.store(loss_ptr + row, loss)
    tl.store(stats_ptr + row * 4 + 0, lse_x)
    tl.store(stats_ptr + row * 4 + 1, lse_y)
    tl.store(stats_ptr + row * 4 + 2, kl_p)
    tl.store(stats_ptr + row * 4 + 3, kl_q)


@triton.jit
def jsd_backward_kernel(
    x_ptr, y_ptr, labels_ptr, stats_ptr, grad_ptr, dx_ptr, dy_ptr,
    V, inner_size, x_outer, x_inner, x_col, y_outer, y_inner, y_col,
    inv_temperature, beta, one_minus_beta, ignore_index,
    HAS_LABELS: tl.constexpr, X_GRAD: tl.constexpr, Y_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = row_start(x_ptr, row, inner_size, x_outer, x_inner)
    y_row = row_start(y_ptr, row, inner_size, y_outer, y_inner)
    lse_x = tl.load(stats_ptr + row * 4 + 0)
    lse_y = tl.load(stats_ptr + row * 4 + 1)
    kl_p = tl.load(stats_ptr + row * 4 + 2)
    kl_q = tl.load(stats_ptr + row * 4 + 3)
    # d/dS = d/dx / T: the 1/T rides on the incoming gradient, and so do the mixture weights.
    g = tl.load(grad_ptr + row) * inv_temperature
    g_x = g * one_minus_beta
    g_y = g * beta
    active = True
    if HAS_LABELS:
        active = tl.load(labels_ptr + row) != ignore_index
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = (start + cols).to(tl.int64)
        mask = offs < V
        # An ignored token reads nothing and gets a zero gradient.
        x = tl.load(x_row + offs * x_col, mask=mask & active, other=float("-inf")).to(tl.float32) * inv_temperature
        y = tl.load(y_row + offs * y_col, mask=mask & active, other=float("-inf")).to(tl.float32) * inv_temperature
        log_q = x - lse_x
        log_p = y - lse_y
        log_m = log_mixture(log_q, log_p, beta, one_minus_beta)
        if X_GRAD:
            q = tl.exp(log_q)
            dx = tl.where(q > 0, q * ((log_q - log_m) - kl_q), 0.0) * g_x
            dx = tl.where(active, dx, 0.0)
            tl.store(dx_ptr + row * V + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if Y_GRAD:
            p = tl.exp(log_p)
            dy = tl.where(p > 0, p * ((log_p - log_m) - kl_p), 0.0) * g_y
            dy = tl.where(active, dy, 0.0)
            tl.store(dy_ptr + row * V + offs, dy.to(dy_ptr.dtype.element_ty), mask=mask)


def _check_beta(beta):
    if not 0.0 < beta < 1.0:
        raise ValueError(f"the JSD kernels take 0 < beta < 1 (0 and 1 are the KL kernels), got beta={beta}")


def jsd_forward(student, teacher, beta, temperature, labels, ignore_index):
    """Per-row `(JSD, stats)`; JSD is 0 for tokens whose label is `ignore_index`."""
    _check_beta(beta)
    V = student.shape[-1]
    rows = student.numel() // V
    x, x_outer, x_inner, x_col, inner = row_layout(student)
    y, y_outer, y_inner, y_col, _ = row_layout(teacher)
    loss = torch.empty(rows, dtype=torch.float32, device=student.device)
    stats = torch.empty(rows, STATS, dtype=torch.float32, device=student.device)
    labels = flat_index(labels)
    block = block_size(V)
    jsd_forward_kernel[(rows,)](
        x, y, labels if labels is not None else loss, loss, stats,
        V, inner, x_outer, x_inner, x_col, y_outer, y_inner, y_col,
        1.0 / temperature, beta, 1.0 - beta, ignore_index,
        HAS_LABELS=labels is not None, BLOCK_V=block, num_warps=num_warps(block))
    return loss, stats


def jsd_backward(grad_loss, student, teacher, stats, beta, temperature, labels, ignore_index, student_grad,
                 teacher_grad):
    """`(d student, d teacher)` in the inputs' dtypes and shapes; an empty tensor for a gradient not asked for."""
    _check_beta(beta)
    V = student.shape[-1]
    rows = student.numel() // V
    x, x_outer, x_inner, x_col, inner = row_layout(student)
    y, y_outer, y_inner, y_col, _ = row_layout(teacher)
    d_student = torch.empty(student.shape if student_grad else 0, dtype=student.dtype, device=student.device)
    d_teacher = torch.empty(teacher.shape if teacher_grad else 0, dtype=teacher.dtype, device=teacher.device)
    labels = flat_index(labels)
    block = block_size(V)
    jsd_backward_kernel[(rows,)](
        x, y, labels if labels is not None else stats, stats, grad_loss.contiguous(), d_student, d_teacher,
        V, inner, x_outer, x_inner, x_col, y_outer, y_inner, y_col,
        1.0 / temperature, beta, 1.0 - beta, ignore_index,
        HAS_LABELS=labels is not None, X_GRAD=student_grad, Y_GRAD=teacher_grad,
        BLOCK_V=block, num_warps=num_warps(block))
    return d_student, d_teacher
