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
with the per-element log-ratios exactly those the divergences summed (the same code, in the same program),
and d/dS = d/dx / T, d/dT_logits = d/dy / T.
A per-row temperature (`temperature_rows`, constexpr `ROW_T`: a learnable or per-token T_r, read on the device;
the float is then ignored): `x = S * (1/T_r)` with `1/T_r` correctly rounded in float32 on the device by the
launcher (`rows.row_temperature`; the same numbers as the float path for the same T), NaN where T_r is not
> 0 or is NaN: the whole row NaN. Its gradient (`temperature_grad`, `T_GRAD`), the row's weight w held constant: the
JSD is a function of x and y that does not change when a constant is added to x (or to y), so each side's
gradient sums to 0 and, with the weighted raw-logit gradients GX_j = w dJSD/dS_j = (w/T) dJSD/dx_j, GY_j
likewise,
    d_T = w dJSD/dT = -sum_j (GX_j x_j + GY_j y_j) = -sum_j (GX_j a_j + GY_j b_j)
        = -(w/T) sum_j ((1 - beta) q_j ((log q_j - log m_j) - KL(q || m)) a_j
                        + beta p_j ((log p_j - log m_j) - KL(p || m)) b_j),
both sides' per-element gradients (stored or not) times the shifted logits the kernel already has (a, b, not
x, y: no u |M| from an offset). A product whose gradient is exactly 0 counts 0 (`rows.grad_times_shift`: a
probability of 0 against a logit of -inf). An ignored token: 0.

Why this formulation (u = 2^-24): `x - lse(x)` carries an absolute error u |lse|, the whole loss for logits
offset by 1e3, at T = 0.05 or near float16's 6e4 (there `log m` came out wrong by O(1) and the gradient
100x off). `a = x - M` is exact for the entries carrying the mass, and the two rows meet only through
`b - a` and `L`; `L` from the accurately summed `D` has an error of u |D| / Z_x, not u log V. For close rows
the terms `p (log p - log m)` are first order in delta and their sum second order (T = 100: ~1e-2 of the
terms), which the `h` form never subtracts. (`rows.expm1` is a series near 0 and `exp - 1` elsewhere:
Kahan's `(u - 1) x / log u` loses its bits once exp(x) is subnormal, x < -87, as at T = 0.05.)

Design and cost: the gradient is made in the forward pass. `delta` needs L, known only after the sums, which
need the maxima, and the gradient needs the two divergences, known only after their sums; one program per row
does it all and writes `dJSD/dS` and/or `dJSD/dT_logits`, each row's already multiplied by its weight in the loss
(`weight_r`, known at forward time: `fastkd.kernel_losses`; read when any of the three gradient flags is set).
Nothing else is kept for the backward pass, which only scales the stored gradient by grad_output
(`rows.scale_rows_`: no N x V traffic when grad_output is exactly 1). Without a gradient flag (inference) the
kernel writes no N x V tensor. d_T is made where the input gradients are (the same per-element GX, GY): the
gradient step runs when any of `student_grad`, `teacher_grad`, `temperature_grad` is set and stores only the
gradients asked for. Its cost: one more per-lane multiply-add (two products) and one row sum, a scalar load
of 1/T_r and a store of d_T per row; no exponential more per element, and the element traffic of a gradient
step that writes nothing (g = 0 with d_T alone; a long row still reads S and T in pass 4). In one block the
shifted logits enter as `log(exp(a))`, `log(exp(b))` (2 logarithms per element, with d_T only): a and b
themselves would stay live to the gradient, 16 registers a thread at 4096 lanes, a spill on sm_80.
- A row that fits one block (V <= `rows.MAX_BLOCK_V`, 4096: 16 warps, 8 lanes per thread; the longest that
  compiles without spills, table in fastkd/triton/rows.py) is read once and stays in registers; the gradient
  reuses the per-element `p`, `q`, `log p - log m`, `log q - log m` of the divergences' sums. Element traffic
  per call: 2 x N x V reads + 1 x N x V write per gradient asked for (g = 0, 1 or 2): (2 + g) x N x V x 2
  bytes for bf16/fp16, x 4 for fp32. Per element: 2 exp, 1 exp (`expm1` away from 0) and 1 log (`log1p`)
  for `log m`, ~40 multiply-adds and 2 divisions (the series of `exp_diff`, `expm1_small`, `h`); the
  gradient adds a few multiplies.
- A longer row streams in blocks of `rows.STREAM_BLOCK_V` (2048, 8 warps) in the same program: pass 1 the
  maxima, pass 2 Z_x, Z_y, D (against the final
  maxima, no rescaling), pass 3 the two divergences, pass 4 the gradient (it needs the divergences, which
  pass 3 ends with). Element traffic: 8 x N x V reads (S and T four times; the re-reads are often served
  from L2) + 1 x N x V write per gradient, (8 + g) x N x V x 2 bytes (bf16/fp16) or x 4 (fp32); without any
  gradient flag (d_T's included) pass 4 is skipped: 6 reads. Per element: passes 2-4 each 2 exp, passes 3
  and 4 each 1 exp and 1 log more: 8 exp and 2 log.
Compute stays below the memory time on a GPU at these counts (MUFU exp/log, FMA pipes for the series); the
series could be skipped where no element has |delta| <= 1/2 if profiling ever says otherwise. Keeping long
rows on chip between the passes would cap V; streaming keeps any V up to 262144 on one program. Against the
earlier forward + backward pair (5 x N x V for one gradient), one block moves 3 x N x V in one launch; the
gradient buffer (N x V in the input dtype) is held from forward to backward instead of the inputs, and a
second backward through the graph is refused (the buffer is scaled in place).
Tokens whose label is `ignore_index` read nothing, get loss 0 and a zero gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import (block_size, exp_diff, expm1, expm1_small, finite_or_zero, flat_index, grad_times_shift, log1p,
                   log_ratio, row_inv_temperature, row_layout, row_start, row_maxnreg, row_temperature, row_warps,
                   row_weight, store_row)


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
    (as `sum (p - q) = 0`); elsewhere `p (log p - log m)`, `q (log q - log m)` and `p - q` (for C).
    Also `p`, `q`, `log p - log m`, `log q - log m`, which the gradient uses."""
    p = eb / z_y
    q = ea / z_x
    lp_m, lq_m = mixture_log_ratios(a, b, log_ratio_yx, beta, one_minus_beta)
    delta = (b - a) - log_ratio_yx
    small = tl.abs(delta) <= 0.5
    d = tl.where(small, delta, 0.0)
    term_p = tl.where(small, p * x_minus_log1p_x(one_minus_beta * expm1_small(-d)),
                      tl.where(p > 0, p * lp_m, 0.0))
    term_q = tl.where(small, q * x_minus_log1p_x(beta * expm1_small(d)), tl.where(q > 0, q * lq_m, 0.0))
    return term_p, term_q, tl.where(small, 0.0, p - q), p, q, lp_m, lq_m


@triton.jit
def store_gradients(dx_ptr, dy_ptr, row, offs, V, a, b, ea, eb, p, q, lp_m, lq_m, active, kl_p, kl_q, g_x, g_y,
                    X_GRAD: tl.constexpr, Y_GRAD: tl.constexpr, T_GRAD: tl.constexpr):
    """The weighted gradients of one block (`g_x = weight_r (1 - beta) / T`, `g_y = weight_r beta / T`); 0
    where the probability is 0 (`exp(a) != 0` lets a NaN through: a NaN logit gives a NaN gradient), stored
    where asked for. Returns, with `T_GRAD`, the block's `GX a + GY b` (both sides, stored or not), the lanes
    of `-d_T`; else 0."""
    mask = offs < V
    dt = 0.0
    if X_GRAD or T_GRAD:
        gx = tl.where(ea != 0, q * (lq_m - kl_q), 0.0) * g_x
        if X_GRAD:
            store_row(dx_ptr, row, V, offs, tl.where(active, gx, 0.0), mask)  # an ignored token: zeros
    if Y_GRAD or T_GRAD:
        gy = tl.where(eb != 0, p * (lp_m - kl_p), 0.0) * g_y
        if Y_GRAD:
            store_row(dy_ptr, row, V, offs, tl.where(active, gy, 0.0), mask)
    if T_GRAD:
        dt = grad_times_shift(gx, a) + grad_times_shift(gy, b)
    return dt


@triton.jit
def jsd_rows_kernel(
    x_ptr, y_ptr, labels_ptr, loss_ptr, w_ptr, dx_ptr, dy_ptr, t_ptr, dt_ptr,
    V, inner_size, x_outer, x_inner, x_col, y_outer, y_inner, y_col, w_stride, t_stride,
    inv_temperature, beta, one_minus_beta, ignore_index,
    HAS_LABELS: tl.constexpr, X_GRAD: tl.constexpr, Y_GRAD: tl.constexpr, ROW_T: tl.constexpr,
    T_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = row_start(x_ptr, row, inner_size, x_outer, x_inner)
    y_row = row_start(y_ptr, row, inner_size, y_outer, y_inner)
    n_cols = V
    active = True
    if HAS_LABELS:
        active = tl.load(labels_ptr + row) != ignore_index
        n_cols = tl.where(active, V, 0)  # an ignored token reads nothing
    if ROW_T:  # the row's own 1/T (NaN where T is not > 0: rows.row_temperature)
        inv_temperature = row_inv_temperature(t_ptr, row, t_stride)
    # The row's weight in the loss, read only when a gradient (of the inputs or of T) is made; the 1/T and the
    # mixture weights ride on it (d/dS = d/dx / T).
    g_x = 0.0
    g_y = 0.0
    if X_GRAD or Y_GRAD or T_GRAD:
        g = tl.load(w_ptr + row * w_stride) * inv_temperature
        g_x = g * one_minus_beta
        g_y = g * beta

    zeros = tl.zeros([BLOCK_V], tl.float32)
    cols = tl.arange(0, BLOCK_V)
    if ONE_BLOCK:
        # The whole row in registers, read once: the sums, the divergences and the gradient.
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
        term_p, term_q, c, p, q, lp_m, lq_m = jsd_terms(a, b, ea, eb, z_x, z_y, l_yx, beta, one_minus_beta)
        kl_p = tl.sum(term_p, 0) - one_minus_beta * tl.sum(c, 0)
        kl_q = tl.sum(term_q, 0) + beta * tl.sum(c, 0)
        if X_GRAD or Y_GRAD or T_GRAD:
            # d_T's shifted logits as log(exp(a)), log(exp(b)): a and b are dead by now and exp(a), exp(b) live
            # (keeping a, b costs 16 registers a thread at 4096 lanes: a spill on sm_80). The same to a few u
            # absolute (any common shift of a row gives the same d_T), and -inf only where the gradient is 0.
            shift_x = a
            shift_y = b
            if T_GRAD:
                shift_x = tl.log(ea)
                shift_y = tl.log(eb)
            dt = store_gradients(dx_ptr, dy_ptr, row, offs, V, shift_x, shift_y, ea, eb, p, q, lp_m, lq_m, active,
                                 kl_p, kl_q, g_x, g_y, X_GRAD, Y_GRAD, T_GRAD)
            if T_GRAD:
                d_t = -tl.sum(dt, 0)
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
            term_p, term_q, c, _p, _q, _lp_m, _lq_m = jsd_terms(a, b, tl.exp(a), tl.exp(b), z_x, z_y, l_yx, beta,
                                                              one_minus_beta)
            p_lane += term_p
            q_lane += term_q
            c_lane += c
        c_sum = tl.sum(c_lane, 0)
        kl_p = tl.sum(p_lane, 0) - one_minus_beta * c_sum
        kl_q = tl.sum(q_lane, 0) + beta * c_sum
        if X_GRAD or Y_GRAD or T_GRAD:
            # Pass 4: the gradient, over the whole row (an ignored token's is written as zeros, read from nothing).
            dt_lane = zeros
            for start in range(0, V, BLOCK_V):
                offs = (start + cols).to(tl.int64)
                x, y = load_block(x_row, y_row, offs, offs < n_cols, x_col, y_col, inv_temperature)
                a = x - m_x
                b = y - m_y
                ea = tl.exp(a)
                eb = tl.exp(b)
                lp_m, lq_m = mixture_log_ratios(a, b, l_yx, beta, one_minus_beta)
                dt = store_gradients(dx_ptr, dy_ptr, row, offs, V, a, b, ea, eb, eb / z_y, ea / z_x, lp_m, lq_m,
                                     active, kl_p, kl_q, g_x, g_y, X_GRAD, Y_GRAD, T_GRAD)
                if T_GRAD:
                    dt_lane += dt
            if T_GRAD:
                d_t = -tl.sum(dt_lane, 0)
    loss = beta * kl_p + one_minus_beta * kl_q
    if HAS_LABELS:
        loss = tl.where(active, loss, 0.0)
    tl.store(loss_ptr + row, loss)
    if T_GRAD:
        tl.store(dt_ptr + row, tl.where(active, d_t, 0.0))  # an ignored token: 0


def _check_beta(beta):
    if not 0.0 < beta < 1.0:
        raise ValueError(f"the JSD kernels take 0 < beta < 1 (0 and 1 are the KL kernels), got beta={beta}")


def jsd_rows(student, teacher, beta, temperature, temperature_rows, labels, ignore_index, weight, student_grad,
             teacher_grad, temperature_grad):
    """Per-row `(JSD, d_student, d_teacher, d_T)`: JSD 0 for tokens whose label is `ignore_index`; when
    `student_grad` / `teacher_grad`, `sum_r weight_r dJSD_r/d input` in the input's dtype and shape
    (contiguous; a zero gradient for an ignored token), else an empty tensor. `weight`: float32 `(rows,)`,
    any stride (None: 1). The temperature is `temperature`, or row r's `temperature_rows[r]` when given
    (float32 `(rows,)`, any stride; not > 0: NaN terms and gradients); with `temperature_grad`,
    `d_T[r] = weight_r dJSD_r/dT_r` (float32 `(rows,)`; 0 for an ignored token), else an empty tensor."""
    _check_beta(beta)
    V = student.shape[-1]
    rows = student.numel() // V
    device = student.device
    x, x_outer, x_inner, x_col, inner = row_layout(student)
    y, y_outer, y_inner, y_col, _ = row_layout(teacher)
    loss = torch.empty(rows, dtype=torch.float32, device=device)
    d_student = torch.empty(student.shape if student_grad else 0, dtype=student.dtype, device=device)
    d_teacher = torch.empty(teacher.shape if teacher_grad else 0, dtype=teacher.dtype, device=device)
    d_temperature = torch.empty(rows if temperature_grad else 0, dtype=torch.float32, device=device)
    w, w_stride = row_weight(weight, loss) if student_grad or teacher_grad or temperature_grad else (loss, 0)
    inv_temperature, t_rows, t_stride = row_temperature(temperature, temperature_rows, rows, loss)
    labels = flat_index(labels)
    block = block_size(V)
    jsd_rows_kernel[(rows,)](
        x, y, labels if labels is not None else loss, loss, w, d_student, d_teacher, t_rows, d_temperature,
        V, inner, x_outer, x_inner, x_col, y_outer, y_inner, y_col, w_stride, t_stride,
        inv_temperature, beta, 1.0 - beta, ignore_index,
        HAS_LABELS=labels is not None, X_GRAD=student_grad, Y_GRAD=teacher_grad,
        ROW_T=temperature_rows is not None, T_GRAD=temperature_grad,
        BLOCK_V=block, ONE_BLOCK=V <= block, num_warps=row_warps(block),
        maxnreg=row_maxnreg(block, wide=True))
    return loss, d_student, d_teacher, d_temperature
