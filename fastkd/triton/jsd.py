"""Fused generalized Jensen-Shannon divergence (TRL's `generalized_jsd_loss`) between two rows of logits.

Covers `jsd_loss` for 0 < beta < 1; beta = 0 and beta = 1 are exactly forward and reverse KL and run on the
KL kernels (`fastkd.triton.kl`), as the reference switches to them.

Maths, per row, with the student `x = S / T` and the teacher `y = T_logits / T` (float32, times 1/T):
    M_x = max x,  a_j = x_j - M_x,  Z_x = sum exp(a),  q_j = exp(a_j) / Z_x     (student)
    M_y = max y,  b_j = y_j - M_y,  Z_y = sum exp(b),  p_j = exp(b_j) / Z_y     (teacher)
    D = Z_y - Z_x = sum_j (exp(b_j) - exp(a_j)), each term by `rows.exp_diff`
    L = log(Z_y / Z_x) from D (`rows.log_ratio`)
    delta_j = log p_j - log q_j = (b_j - a_j) - L
and the mixture `m = beta p + (1 - beta) q` enters only through `delta`: with `hi` the larger of p, q,
`w_lo` the weight of the smaller (1 - beta if p is larger, i.e. delta >= 0, else beta) and
`t = -|delta|`,
    l_hi = log hi - log m = -log1p(w_lo * expm1(t))                  (>= 0; `rows.log1p`, `rows.expm1`)
    log p - log m = l_hi           (delta >= 0),   l_hi + delta   (delta < 0)
    log q - log m = l_hi - delta   (delta >= 0),   l_hi           (delta < 0)
    KL(p || m) = sum p (log p - log m),   KL(q || m) = sum q (log q - log m)
    JSD = beta KL(p || m) + (1 - beta) KL(q || m)
The sums are formed without first-order cancellation. As `sum (p - q) = 0` and
`p (log p - log m) = p h(w) + (1 - beta)(p - q)`, `q (log q - log m) = q h(v) - beta (p - q)` with
`w = (1 - beta) expm1(-delta)`, `v = beta expm1(delta)`, `h(w) = w - log1p(w) >= 0` (`x_minus_log1p_x`,
a series in `s = w / (2 + w)`), per element:
    |delta| <= 1/2:  P_j = p_j h(w_j),   Q_j = q_j h(v_j),   C_j = 0       (expm1 by `rows.expm1_small`)
    otherwise:       P_j = p_j (log p_j - log m_j),  Q_j = q_j (log q_j - log m_j)  (0 where p_j, q_j = 0),
                     C_j = p_j - q_j
    KL(p || m) = sum P - (1 - beta) sum C,   KL(q || m) = sum Q + beta sum C
For close rows (T = 100) every element is in the first case: a sum of non-negative second-order terms.
This is the reference's `log_mixture` (`log m = hi + log1p(w_lo expm1(lo - hi))`) with `hi - lo = |delta|`.
Identical rows give D = 0, L = 0, delta = 0, h(0) = 0: a JSD of exactly 0. Where q = 0 (delta = +inf)
`l_hi = -log(beta)`, where p = 0, `-log(1 - beta)`; a term whose probability is 0 contributes 0 (and its
log-ratio, -inf or NaN, is never used), so no divergence here is infinite. For one-hot rows (disjoint
supports) `sum C` is exactly 0 and the KLs are the plain sums the gradient subtracts.
Gradients: treating q as free (dm_i/dq_i = 1 - beta),
    dJSD/dq_i = -beta p_i (1 - beta) / m_i + (1 - beta)(log q_i - log m_i + 1 - q_i (1 - beta) / m_i)
              = (1 - beta)(log q_i - log m_i + 1 - (beta p_i + (1 - beta) q_i) / m_i) = (1 - beta)(log q_i - log m_i)
and through the softmax `dq_i/dx_j = q_i ([i = j] - q_j)`, with `sum_i q_i (log q_i - log m_i) = KL(q || m)`
(the teacher side likewise, weight beta):
    dJSD/dx_j = (1 - beta) q_j ((log q_j - log m_j) - KL(q || m))        (0 where q_j = 0)
    dJSD/dy_j = beta p_j ((log p_j - log m_j) - KL(p || m))              (0 where p_j = 0)
with the per-element log-ratios recomputed exactly as the forward summed them, and d/dS = d/dx / T,
d/dT_logits = d/dy / T.

Why this formulation (u = 2^-24): `x - lse(x)` carries an absolute error u |lse|, the whole loss for logits
offset by 1e3, at T = 0.05 or near float16's 6e4 (there `log m` came out wrong by O(1) and the gradient
100x off). `a = x - M` is exact for the entries carrying the mass, and the two rows meet only through
`b - a` and `L`; `L` from the accurately summed `D` has an error of u |D| / Z_x, not u log V. For close rows
the terms `p (log p - log m)` are first order in delta and their sum second order (T = 100: ~1e-2 of the
terms), which the `h` form never subtracts. (`rows.expm1` is a series near 0 and `exp - 1` elsewhere:
Kahan's `(u - 1) x / log u` loses its bits once exp(x) is subnormal, x < -87, as at T = 0.05.)

Design and cost: `delta` needs L, known only after the sums, which need the maxima. A row that fits one
block (V <= `rows.MAX_BLOCK_V`) is read once and kept in registers. A longer row is read three times in the
same program: pass 1 the maxima, pass 2 Z_x, Z_y, D (against the final maxima, no rescaling), pass 3 the
two divergences (the re-reads are often served from L2). The forward saves per-row statistics
(M_x, Z_x, M_y, Z_y, L, KL(p||m), KL(q||m)); the backward re-reads both rows and recomputes `delta`.
Element traffic, forward plus backward with the student's gradient only: 2 + 2 reads + 1 write = 5 x N x V
for V <= 2048, 6 + 2 + 1 = 9 x N x V beyond, with O(N) memory besides the gradient. Per element: forward
2 exp, 1 exp (`expm1` away from 0) and 1 log (`log1p`) for `log m`, and ~40 multiply-adds and 2 divisions
(the series of `exp_diff`, `expm1_small`, `h`); backward 2 exp, 1 exp and 1 log. Compute stays below the
memory time on a GPU at these counts (MUFU exp/log, FMA pipes for the series); the series could be skipped
where no element has |delta| <= 1/2 if profiling ever says otherwise. Keeping long rows on chip between the
passes would cap V; streaming keeps any V up to 262144 on one program.
Tokens whose label is `ignore_index` read nothing, get loss 0 and a zero gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..kernel_ops import JSD_STATS
from .rows import (block_size, exp_diff, expm1, expm1_small, finite_or_zero, flat_index, log1p, log_ratio,
                   num_warps, row_layout, row_start)

# The per-row statistics, as wide as the op's declaration says (fastkd.kernel_ops):
# M_x, Z_x, M_y, Z_y, L = log(Z_y / Z_x), KL(p || m), KL(q || m)
STATS = tl.constexpr(JSD_STATS)


@triton.jit
def load_block(x_row, y_row, offs, mask, x_col, y_col, inv_temperature):
    """`(x, y)` of one block, -inf outside the row."""
    x = tl.load(x_row + offs * x_col, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
    y = tl.load(y_row + offs * y_col, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
    return x, y


@triton.jit
def mixture_log_ratios(a, b, log_ratio_yx, beta, one_minus_beta):
    """`(log p - log m, log q - log m)` from `a = x - M_x`, `b = y - M_y` and `L = log(Z_y / Z_x)`; each is
    meaningful only where its own probability is > 0 (the caller masks)."""
    delta = (b - a) - log_ratio_yx
    p_hi = delta >= 0.0
    t = tl.where(p_hi, -delta, delta)
    l_hi = -log1p(tl.where(p_hi, one_minus_beta, beta) * expm1(t))
    return tl.where(p_hi, l_hi, l_hi + delta), tl.where(p_hi, l_hi - delta, l_hi)


@triton.jit
def x_minus_log1p_x(w):
    """`h(w) = w - log1p(w) >= 0` to a few u relative for |w| <= 0.65 (where the difference cancels): with
    `s = w / (2 + w)`, `log1p(w) = 2 atanh(s)` and `w = 2s / (1 - s)`, so
    `h = 2 s^2 / (1 - s) - 2 (s^3/3 + s^5/5 + ... + s^15/15)`, both parts of one sign (|s| <= 0.25:
    truncation < 1e-9 relative)."""
    s = w / (2.0 + w)
    s2 = s * s
    r = 1.0 / 13.0 + s2 * (1.0 / 15.0)
    r = 1.0 / 11.0 + s2 * r
    r = 1.0 / 9.0 + s2 * r
    r = 1.0 / 7.0 + s2 * r
    r = 1.0 / 5.0 + s2 * r
    r = 1.0 / 3.0 + s2 * r
    return 2.0 * s2 / (1.0 - s) - 2.0 * (s2 * s) * r


@triton.jit
def jsd_terms(a, b, ea, eb, z_x, z_y, log_ratio_yx, beta, one_minus_beta):
    """Per element `(p (log p - log m) or its second-order part, the same for q, p - q where not small)`:
    where |delta| <= 1/2, `p h((1 - beta) expm1(-delta))` and `q h(beta expm1(delta))`, whose sums are
    KL(p || m) + (1 - beta) C and KL(q || m) - beta C with `C = sum_{|delta| > 1/2} (p - q)`
    (as `sum (p - q) = 0`); elsewhere `p (log p - log m)`, `q (log q - log m)` and `p - q` (for C)."""
    p = eb / z_y
    q = ea / z_x
    lp_m, lq_m = mixture_log_ratios(a, b, log_ratio_yx, beta, one_minus_beta)
    delta = (b - a) - log_ratio_yx
    small = tl.abs(delta) <= 0.5
    d = tl.where(small, delta, 0.0)
    term_p = tl.where(small, p * x_minus_log1p_x(one_minus_beta * expm1_small(-d)),
                      tl.where(p > 0, p * lp_m, 0.0))
    term_q = tl.where(small, q * x_minus_log1p_x(beta * expm1_small(d)), tl.where(q > 0, q * lq_m, 0.0))
    return term_p, term_q, tl.where(small, 0.0, p - q)


@triton.jit
def jsd_forward_kernel(
    x_ptr, y_ptr, labels_ptr, loss_ptr, stats_ptr,
    V, inner_size, x_outer, x_inner, x_col, y_outer, y_inner, y_col,
    inv_temperature, beta, one_minus_beta, ignore_index,
    HAS_LABELS: tl.constexpr, BLOCK_V: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = row_start(x_ptr, row, inner_size, x_outer, x_inner)
    y_row = row_start(y_ptr, row, inner_size, y_outer, y_inner)
    n_cols = V
    if HAS_LABELS:
        active = tl.load(labels_ptr + row) != ignore_index
        n_cols = tl.where(active, V, 0)  # an ignored token reads nothing

    zeros = tl.zeros([BLOCK_V], tl.float32)
    cols = tl.arange(0, BLOCK_V)
    if ONE_BLOCK:
        # The whole row in registers, read once.
        offs = cols.to(tl.int64)
        x, y = load_block(x_row, y_row, offs, offs < n_cols, x_col, y_col, inv_temperature)
        m_x = finite_or_zero(tl.max(x, 0))
        m_y = finite_or_zero(tl.max(y, 0))
        a = x - m_x
        b = y - m_y
        ea = tl.exp(a)
        eb = tl.exp(b)
        z_x = tl.sum(ea, 0)
        z_y = tl.sum(eb, 0)
        l_yx = log_ratio(z_y, z_x, tl.sum(exp_diff(b, a, eb, ea), 0))
        term_p, term_q, c = jsd_terms(a, b, ea, eb, z_x, z_y, l_yx, beta, one_minus_beta)
        sum_p = tl.sum(term_p, 0)
        sum_q = tl.sum(term_q, 0)
        c_sum = tl.sum(c, 0)
    else:
        # Pass 1: the maxima.
        mx_lane = tl.full([BLOCK_V], float("-inf"), tl.float32)
        my_lane = mx_lane
        for start in range(0, n_cols, BLOCK_V):
            offs = (start + cols).to(tl.int64)
            x, y = load_block(x_row, y_row, offs, offs < n_cols, x_col, y_col, inv_temperature)
            mx_lane = tl.maximum(mx_lane, x)
            my_lane = tl.maximum(my_lane, y)
        m_x = finite_or_zero(tl.max(mx_lane, 0))
        m_y = finite_or_zero(tl.max(my_lane, 0))
        # Pass 2: the sums and their difference, against the final maxima.
        zx_lane, zy_lane, d_lane = zeros, zeros, zeros
        for start in range(0, n_cols, BLOCK_V):
            offs = (start + cols).to(tl.int64)
            x, y = load_block(x_row, y_row, offs, offs < n_cols, x_col, y_col, inv_temperature)
            a = x - m_x
            b = y - m_y
            ea = tl.exp(a)
            eb = tl.exp(b)
            zx_lane += ea
            zy_lane += eb
            d_lane += exp_diff(b, a, eb, ea)
        z_x = tl.sum(zx_lane, 0)
        z_y = tl.sum(zy_lane, 0)
        l_yx = log_ratio(z_y, z_x, tl.sum(d_lane, 0))
        # Pass 3: both divergences against the mixture.
        p_lane, q_lane, c_lane = zeros, zeros, zeros
        for start in range(0, n_cols, BLOCK_V):
            offs = (start + cols).to(tl.int64)
            x, y = load_block(x_row, y_row, offs, offs < n_cols, x_col, y_col, inv_temperature)
            a = x - m_x
            b = y - m_y
            ea = tl.exp(a)
            eb = tl.exp(b)
            term_p, term_q, c = jsd_terms(a, b, ea, eb, z_x, z_y, l_yx, beta, one_minus_beta)
            p_lane += term_p
            q_lane += term_q
            c_lane += c
        sum_p = tl.sum(p_lane, 0)
        sum_q = tl.sum(q_lane, 0)
        c_sum = tl.sum(c_lane, 0)
    kl_p = sum_p - one_minus_beta * c_sum
    kl_q = sum_q + beta * c_sum
    loss = beta * kl_p + one_minus_beta * kl_q
    if HAS_LABELS:
        # An ignored token's statistics are 0 (its sums are empty: 0 / 0 must not reach the saved tensor).
        loss = tl.where(active, loss, 0.0)
        m_x, z_x, m_y, z_y = (tl.where(active, m_x, 0.0), tl.where(active, z_x, 0.0), tl.where(active, m_y, 0.0),
                              tl.where(active, z_y, 0.0))
        l_yx, kl_p, kl_q = tl.where(active, l_yx, 0.0), tl.where(active, kl_p, 0.0), tl.where(active, kl_q, 0.0)
    tl.store(loss_ptr + row, loss)
    tl.store(stats_ptr + row * STATS + 0, m_x)
    tl.store(stats_ptr + row * STATS + 1, z_x)
    tl.store(stats_ptr + row * STATS + 2, m_y)
    tl.store(stats_ptr + row * STATS + 3, z_y)
    tl.store(stats_ptr + row * STATS + 4, l_yx)
    tl.store(stats_ptr + row * STATS + 5, kl_p)
    tl.store(stats_ptr + row * STATS + 6, kl_q)


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
    m_x = tl.load(stats_ptr + row * STATS + 0)
    z_x = tl.load(stats_ptr + row * STATS + 1)
    m_y = tl.load(stats_ptr + row * STATS + 2)
    z_y = tl.load(stats_ptr + row * STATS + 3)
    l_yx = tl.load(stats_ptr + row * STATS + 4)
    kl_p = tl.load(stats_ptr + row * STATS + 5)
    kl_q = tl.load(stats_ptr + row * STATS + 6)
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
        x, y = load_block(x_row, y_row, offs, mask & active, x_col, y_col, inv_temperature)
        a = x - m_x
        b = y - m_y
        lp_m, lq_m = mixture_log_ratios(a, b, l_yx, beta, one_minus_beta)
        if X_GRAD:
            ea = tl.exp(a)
            dx = tl.where(ea > 0, (ea / z_x) * (lq_m - kl_q), 0.0) * g_x
            dx = tl.where(active, dx, 0.0)
            tl.store(dx_ptr + row * V + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if Y_GRAD:
            eb = tl.exp(b)
            dy = tl.where(eb > 0, (eb / z_y) * (lp_m - kl_p), 0.0) * g_y
            dy = tl.where(active, dy, 0.0)
            tl.store(dy_ptr + row * V + offs, dy.to(dy_ptr.dtype.element_ty), mask=mask)


def _check_beta(beta):
    if not 0.0 < beta < 1.0:
        raise ValueError(f"the JSD kernels take 0 < beta < 1 (0 and 1 are the KL kernels), got beta={beta}")


def jsd_rows(student, teacher, beta, temperature, labels, ignore_index):
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
        HAS_LABELS=labels is not None, BLOCK_V=block, ONE_BLOCK=V <= block,
        num_warps=num_warps(block))
    return loss, stats


def jsd_rows_backward(grad_loss, student, teacher, stats, beta, temperature, labels, ignore_index, student_grad,
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
