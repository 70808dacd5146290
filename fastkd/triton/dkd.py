"""Fused decoupled KD (DKD, mdistiller's `dkd_loss`): the target-class and non-target-class KL of two rows.

Maths, per row with target class g, student `x = S / T`, teacher `y = T_logits / T`:
    R_x = lse_{c != g} x_c,   R_y = lse_{c != g} y_c,   A = logaddexp(R_x, x_g) = lse(x),   B = lse(y)
- TCKD = KL(b_t || b_s) over the binary split `b = [p_g, sum_{c != g} p_c]`, in log space:
      log b_t = [y_g - B, R_y - B],   log b_s = [x_g - A, R_x - A]
  (a part with b_t = 0 contributes 0; b_t > 0 against b_s = 0 gives +inf, as in the reference).
- NCKD = KL(p~ || q~) over the non-target classes renormalised, `p~_c = exp(y_c - R_y)` (teacher),
  `q~_c = exp(x_c - R_x)` (student): as in `fastkd.triton.kl`,
      NCKD = sum_{c != g} p~_c (y_c - x_c) - (R_y - R_x) = W / Z - (R_y - R_x),
  `W = sum_{c != g} exp(y_c - m)(y_c - x_c)` streamed with the teacher's online log-sum-exp (`Z`, `m`).
  A teacher term against `x_c = -inf` makes NCKD = +inf (tracked, never summed).
- The loss `T^2 / rows * sum_rows (alpha TCKD + beta NCKD)` is formed in PyTorch from the per-row terms.
One streaming pass over the row, with the target column masked out, gives R_x, R_y and W; x_g and y_g are one
scalar load each. An out-of-range target gives NaN (never an out-of-bounds read).
With one class there is no non-target class: both terms are 0 (the reference leaves NCKD out). When every
non-target teacher logit is -inf (but C > 1) the reference's NCKD is NaN (`log_softmax` of a row of -inf);
here it is 0, as a teacher putting no mass on the non-target classes has nothing to transfer there.

Gradients (d/dS = d/dx / T, the per-row gradients g_t of TCKD and g_n of NCKD come from autograd):
- student, through `log b_s = log_softmax([x_g, R_x])`, `dR_x/dx_c = q~_c`, and NCKD's softmax gradient:
      d/dx_g = g_t (b_s,g - b_t,g)
      d/dx_c = (g_t (b_s,r - b_t,r) + g_n) q~_c - g_n p~_c                     (c != g; r = the rest part)
- teacher, from `dKL(P || Q)/dz_i = P_i ((log P_i - log Q_i) - KL)` for P = softmax(z): TCKD with
  z = [y_g, R_y], `dR_y/dy_c = p~_c`; NCKD with z = the non-target teacher logits:
      d/dy_g = g_t b_t,g ((log b_t,g - log b_s,g) - TCKD)
      d/dy_c = g_t b_t,r ((log b_t,r - log b_s,r) - TCKD) p~_c + g_n p~_c ((log p~_c - log q~_c) - NCKD)
  each product 0 where its teacher probability is 0.

Design: as for KL, the forward saves per-row statistics (R_x, R_y, x_g, y_g, TCKD, NCKD) and the backward
re-reads both rows; the teacher's gradient is computed only when asked for. DKD's rows are image-classifier
logits (C up to a few thousand): one block per row in practice, but any C streams.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import block_size, flat_index, lane_weights, log1p, num_warps, online_update, row_layout, row_start

STATS = 6  # per row: R_x, R_y, x_g, y_g (NaN for an out-of-range target), TCKD, NCKD


@triton.jit
def logaddexp(a, b):
    """`log(e^a + e^b)`; -inf when both are -inf."""
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    safe_hi = tl.where(hi == float("-inf"), 0.0, hi)
    return tl.where(hi == float("-inf"), float("-inf"), hi + log1p(tl.exp(lo - safe_hi)))


@triton.jit
def binary_split(r_x, r_y, x_g, y_g):
    """`(log b_s,g, log b_s,r, log b_t,g, log b_t,r)`: the student's and teacher's [target, rest] split."""
    a = logaddexp(r_x, x_g)
    b = logaddexp(r_y, y_g)
    return x_g - a, r_x - a, y_g - b, r_y - b


@triton.jit
def dkd_forward_kernel(
    x_ptr, y_ptr, target_ptr, tckd_ptr, nckd_ptr, stats_ptr,
    V, inner_size, x_outer, x_inner, x_col, y_outer, y_inner, y_col,
    inv_temperature,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = row_start(x_ptr, row, inner_size, x_outer, x_inner)
    y_row = row_start(y_ptr, row, inner_size, y_outer, y_inner)
    target = tl.load(target_ptr + row).to(tl.int64)
    valid = (target >= 0) & (target < V)  # out of range: NaN, never an out-of-bounds read
    x_g = tl.load(x_row + target * x_col, mask=valid, other=0.0).to(tl.float32) * inv_temperature
    y_g = tl.load(y_row + target * y_col, mask=valid, other=0.0).to(tl.float32) * inv_temperature

    neg_inf = tl.full([BLOCK_V], float("-inf"), tl.float32)
    zeros = tl.zeros([BLOCK_V], tl.float32)
    m_x, z_x = neg_inf, zeros
    m_y, z_y, w, inf_y = neg_inf, zeros, zeros, neg_inf
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = (start + cols).to(tl.int64)
        mask = offs < V
        x = tl.load(x_row + offs * x_col, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
        y = tl.load(y_row + offs * y_col, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
        is_target = offs == target
        x = tl.where(is_target, float("-inf"), x)
        y = tl.where(is_target, float("-inf"), y)
        m_x, z_x, _, _ = online_update(m_x, z_x, x)
        m_y, z_y, rescale, e = online_update(m_y, z_y, y)
        diff = y - x
        w = w * rescale + tl.where((e > 0) & (diff != float("inf")), e * diff, 0.0)
        inf_y = tl.maximum(inf_y, tl.where(diff == float("inf"), y, float("-inf")))

    big_x, weight_x = lane_weights(m_x)
    r_x = big_x + tl.log(tl.sum(z_x * weight_x, 0))
    big_y, weight_y = lane_weights(m_y)
    sum_y = tl.sum(z_y * weight_y, 0)
    r_y = big_y + tl.log(sum_y)
    # NCKD: subtracting the lse difference last makes it exactly 0 for identical rows.
    has_rest = sum_y > 0
    nckd = tl.sum(w * weight_y, 0) / tl.where(has_rest, sum_y, 1.0) - (r_y - r_x)
    nckd = tl.where(tl.exp(tl.max(inf_y, 0) - r_y) > 0, float("inf"), nckd)
    nckd = tl.where(has_rest, nckd, 0.0)  # no non-target teacher mass (one class): nothing to transfer

    log_bs_g, log_bs_r, log_bt_g, log_bt_r = binary_split(r_x, r_y, x_g, y_g)
    bt_g = tl.exp(log_bt_g)
    bt_r = tl.exp(log_bt_r)
    tckd = (tl.where(bt_g > 0, bt_g * (log_bt_g - log_bs_g), 0.0)
            + tl.where(bt_r > 0, bt_r * (log_bt_r - log_bs_r), 0.0))

    # A NaN anywhere in the row makes both terms NaN: the zero-mass guards above would otherwise hide it.
    nan_in_row = (r_x != r_x) | (r_y != r_y) | (x_g != x_g) | (y_g != y_g)
    tckd = tl.where(valid & ~nan_in_row, tckd, float("nan"))
    nckd = tl.where(valid & ~nan_in_row, nckd, float("nan"))
    tl.store(tckd_ptr + row, tckd)
    tl.store(nckd_ptr + row, nckd)
    tl.store(stats_ptr + row * 6 + 0, r_x)
    tl.store(stats_ptr + row * 6 + 1, r_y)
    tl.store(stats_ptr + row * 6 + 2, tl.where(valid, x_g, float("nan")))
    tl.store(stats_ptr + row * 6 + 3, tl.where(valid, y_g, float("nan")))
    tl.store(stats_ptr + row * 6 + 4, tckd)
    tl.store(stats_ptr + row * 6 + 5, nckd)


@triton.jit
def dkd_backward_kernel(
    x_ptr, y_ptr, target_ptr, stats_ptr, grad_tckd_ptr, grad_nckd_ptr, dx_ptr, dy_ptr,
    V, inner_size, x_outer, x_inner, x_col, y_outer, y_inner, y_col,
    inv_temperature,
    X_GRAD: tl.constexpr, Y_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = row_start(x_ptr, row, inner_size, x_outer, x_inner)
    y_row = row_start(y_ptr, row, inner_size, y_outer, y_inner)
    r_x = tl.load(stats_ptr + row * 6 + 0)
    r_y = tl.load(stats_ptr + row * 6 + 1)
    x_g = tl.load(stats_ptr + row * 6 + 2)
    y_g = tl.load(stats_ptr + row * 6 + 3)
    tckd = tl.load(stats_ptr + row * 6 + 4)
    nckd = tl.load(stats_ptr + row * 6 + 5)
    target = tl.load(target_ptr + row).to(tl.int64)
    valid = (target >= 0) & (target < V)
    # d/dS = d/dx / T: the 1/T rides on the incoming gradients.
    g_t = tl.load(grad_tckd_ptr + row) * inv_temperature
    g_n = tl.load(grad_nckd_ptr + row) * inv_temperature

    log_bs_g, log_bs_r, log_bt_g, log_bt_r = binary_split(r_x, r_y, x_g, y_g)
    bs_g = tl.exp(log_bs_g)
    bs_r = tl.exp(log_bs_r)
    bt_g = tl.exp(log_bt_g)
    bt_r = tl.exp(log_bt_r)
    # Student: the target column, and the factor of q~ on the others.
    dx_target = g_t * (bs_g - bt_g)
    q_factor = g_t * (bs_r - bt_r) + g_n
    # Teacher: the target column, and the factor of p~ (through R_y) on the others.
    dy_target = g_t * tl.where(bt_g > 0, bt_g * ((log_bt_g - log_bs_g) - tckd), 0.0)
    p_factor = g_t * tl.where(bt_r > 0, bt_r * ((log_bt_r - log_bs_r) - tckd), 0.0)

    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = (start + cols).to(tl.int64)
        mask = offs < V
        x = tl.load(x_row + offs * x_col, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
        y = tl.load(y_row + offs * y_col, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
        is_target = offs == target
        # The non-target distributions; 0 on the target column and where a logit is -inf (also when
        # R = -inf, where x - R would be NaN).
        log_q = x - r_x
        log_p = y - r_y
        q = tl.where(is_target | (x == float("-inf")), 0.0, tl.exp(log_q))
        p = tl.where(is_target | (y == float("-inf")), 0.0, tl.exp(log_p))
        if X_GRAD:
            dx = tl.where(is_target, dx_target, q_factor * q - g_n * p)
            dx = tl.where(valid, dx, float("nan"))
            tl.store(dx_ptr + row * V + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if Y_GRAD:
            nckd_term = tl.where(p > 0, p * ((log_p - log_q) - nckd), 0.0)
            dy = tl.where(is_target, dy_target, p_factor * p + g_n * nckd_term)
            dy = tl.where(valid, dy, float("nan"))
            tl.store(dy_ptr + row * V + offs, dy.to(dy_ptr.dtype.element_ty), mask=mask)


def dkd_forward(student, teacher, target, temperature):
    """Per-row `(TCKD, NCKD, stats)`, without the `T^2 / rows` factor and the weights; NaN for a target
    outside [0, C)."""
    V = student.shape[-1]
    rows = student.numel() // V
    x, x_outer, x_inner, x_col, inner = row_layout(student)
    y, y_outer, y_inner, y_col, _ = row_layout(teacher)
    tckd = torch.empty(rows, dtype=torch.float32, device=student.device)
    nckd = torch.empty(rows, dtype=torch.float32, device=student.device)
    stats = torch.empty(rows, STATS, dtype=torch.float32, device=student.device)
    block = block_size(V)
    dkd_forward_kernel[(rows,)](
        x, y, flat_index(target), tckd, nckd, stats,
        V, inner, x_outer, x_inner, x_col, y_outer, y_inner, y_col, 1.0 / temperature,
        BLOCK_V=block, num_warps=num_warps(block))
    return tckd, nckd, stats


def dkd_backward(grad_tckd, grad_nckd, student, teacher, stats, target, temperature, student_grad, teacher_grad):
    """`(d student, d teacher)` in the inputs' dtypes and shapes; an empty tensor for a gradient not asked for.
    A None gradient (an output that was not used) counts as zeros."""
    V = student.shape[-1]
    rows = student.numel() // V
    x, x_outer, x_inner, x_col, inner = row_layout(student)
    y, y_outer, y_inner, y_col, _ = row_layout(teacher)
    if grad_tckd is None:
        grad_tckd = stats.new_zeros(rows)
    if grad_nckd is None:
        grad_nckd = stats.new_zeros(rows)
    d_student = torch.empty(student.shape if student_grad else 0, dtype=student.dtype, device=student.device)
    d_teacher = torch.empty(teacher.shape if teacher_grad else 0, dtype=teacher.dtype, device=teacher.device)
    block = block_size(V)
    dkd_backward_kernel[(rows,)](
        x, y, flat_index(target), stats, grad_tckd.contiguous(), grad_nckd.contiguous(), d_student, d_teacher,
        V, inner, x_outer, x_inner, x_col, y_outer, y_inner, y_col, 1.0 / temperature,
        X_GRAD=student_grad, Y_GRAD=teacher_grad, BLOCK_V=block, num_warps=num_warps(block))
    return d_student, d_teacher
