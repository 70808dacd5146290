"""Fused decoupled KD (DKD, mdistiller's `dkd_loss`): the target-class and non-target-class KL of two rows.

Maths, per row with target class g, student `x = S / T`, teacher `y = T_logits / T` (float32, times 1/T);
the non-target classes c != g are the "rest":
    M_x = max_{c != g} x_c,  a_c = x_c - M_x,  Z_x = sum_{c != g} exp(a_c),  q~_c = exp(a_c) / Z_x  (student)
    M_y = max_{c != g} y_c,  b_c = y_c - M_y,  Z_y = sum_{c != g} exp(b_c),  p~_c = exp(b_c) / Z_y  (teacher)
(a max of -inf, no rest at all, is replaced by 0 before subtracting: `rows.finite_or_zero`).
- TCKD = KL(b_t || b_s) over the binary split `b = [p_g, sum_{c != g} p_c]`, from the log-odds of target
  against rest, `u_s = (x_g - M_x) - log Z_x`, `u_t = (y_g - M_y) - log Z_y`:
      log b_g = -softplus(-u),  log b_r = -softplus(u),  softplus(z) = max(z, 0) + log1p(exp(-|z|))
      TCKD = sum_{k in g, r} b_t,k (log b_t,k - log b_s,k)
  (a part with b_t = 0 contributes 0; b_t > 0 against b_s = 0 gives +inf, as in the reference).
- NCKD = KL(p~ || q~) as in `fastkd.triton.kl` (P = the teacher's rest, Q = the student's):
      e_c = b_c - a_c,  Ebar = sum_{c != g} p~_c e_c,
      D = Z_y - Z_x = sum_{c != g} (exp(b_c) - exp(a_c))   (`rows.exp_diff`),
      NCKD = Ebar - log(Z_y / Z_x)                            (`rows.log_ratio` from D)
  A teacher term p~_c > 0 against x_c = -inf makes NCKD = +inf (a flag, never summed).
- The loss `T^2 / rows * sum_rows (alpha TCKD + beta NCKD)` is formed in PyTorch from the per-row terms.
x_g and y_g are one scalar load each. An out-of-range target gives NaN (never an out-of-bounds read).
With one class there is no non-target class: both terms are 0 (the reference leaves NCKD out). When every
non-target teacher logit is -inf (but C > 1) the reference's NCKD is NaN (`log_softmax` of a row of -inf);
here it is 0, as a teacher putting no mass on the non-target classes has nothing to transfer there.
A NaN anywhere in the row makes both terms NaN.

Gradients (d/dS = d/dx / T; g_t and g_n are the row's weights of TCKD and NCKD in the loss, given to the kernel):
- student, through `log b_s = log_softmax([x_g, R_x])` (R_x = M_x + log Z_x), `dR_x/dx_c = q~_c`, and
  NCKD's softmax gradient:
      d/dx_g = g_t (b_s,g - b_t,g)
      d/dx_c = (g_t (b_s,r - b_t,r) + g_n) q~_c - g_n p~_c                     (c != g; r = the rest part)
- teacher, from `dKL(P || Q)/dz_i = P_i ((log P_i - log Q_i) - KL)` for P = softmax(z): TCKD with
  z = [y_g, R_y], `dR_y/dy_c = p~_c`; NCKD with z = the non-target teacher logits, where
  `log p~_c - log q~_c - NCKD = e_c - Ebar` (the log-ratio of the sums cancels):
      d/dy_g = g_t b_t,g ((log b_t,g - log b_s,g) - TCKD)
      d/dy_c = g_t b_t,r ((log b_t,r - log b_s,r) - TCKD) p~_c + g_n p~_c (e_c - Ebar)
  each product 0 where its teacher probability is 0.
- A per-row temperature (`temperature_rows`, constexpr `ROW_T`: a learnable T_r, read on the device; the float
  is then ignored): `x = S * (1/T_r)` with `1/T_r` correctly rounded in float32 on the device by the launcher
  (`rows.row_temperature`; the same numbers as the float path for the same T), NaN where T_r is not > 0 or
  is NaN: the whole row NaN. Its gradient (`temperature_grad`, `T_GRAD`), the weights g_t, g_n held constant
  (the caller adds the d/dT of their T^2): TCKD and NCKD depend on x only through softmax(x) over all C
  classes (the binary split) and over the rest, both unchanged when a constant is added to every x_c, so the
  student's weighted gradient GX (above, all C columns) sums to 0, the teacher's GY likewise, and any common
  shift may be subtracted; with the rest's maxima M_x, M_y as the shifts (a, b above; x_g - M_x, y_g - M_y
  on the target column),
      d_T = d/dT (g_t TCKD + g_n NCKD) = -sum_c (GX_c x_c + GY_c y_c)
          = -[sum_{c != g} (GX_c a_c + GY_c b_c) + GX_g (x_g - M_x) + GY_g (y_g - M_y)]
  with GX_g = d/dx_g, GX_c = d/dx_c (c != g) of the formulas above (times 1/T, as they are stored), GY
  likewise: both sides' gradients whether or not they are stored. A product whose gradient is exactly 0
  counts 0 (`rows.grad_times_shift`: q~_c = p~_c = 0 against a_c = -inf). NaN for a target out of range.

Why this formulation (u = 2^-24): `R = M + log Z` and `x - R`, `x_g - logaddexp(R, x_g)` carry an absolute
error u |M| (logits offset by 1e3, T = 0.05, float16 logits near 6e4); `a = x - M` and `x_g - M` are exact
for the entries that carry the mass, and `log Z <= log C`. NCKD is formed as in `fastkd.triton.kl`. The
gradient uses the binary split, TCKD and Ebar of the same program: for a one-hot teacher (logits of 1e4) the
teacher's gradient is exactly 0, as it must be.

Design and cost: the gradient is made in the forward pass. One program per row computes the statistics and,
in the same program, writes the student's and/or the teacher's gradient with the formulas above, each row's
already weighted by its TCKD and NCKD weights in the loss (`tckd_weight_r`, `nckd_weight_r`, known at forward
time: alpha T^2 / rows and beta T^2 / rows, `fastkd.kernel_losses`); the binary split, TCKD and Ebar the
gradient needs are this program's own values, kept in registers; the weights are read when any of the three
gradient flags is set. Nothing else is kept for the backward pass, which only scales the stored gradient by
grad_output (`rows.scale_rows_`: no N x C traffic when grad_output is exactly 1). Without a gradient flag
(inference) the kernel writes no N x C tensor. d_T is made where the input gradients are (the same
per-element GX, GY): the gradient step runs when any of `student_grad`, `teacher_grad`, `temperature_grad` is
set and stores only the gradients asked for. Its cost: one more per-lane multiply-add (two products) and one
row sum, a scalar load of 1/T_r and a store of d_T per row; no exponential more per element, and the element
traffic of a gradient step that writes nothing (g = 0 with d_T alone; a long row still reads a third time).
DKD's rows are image-classifier logits (C up to a few thousand):
- one block per row (C <= `rows.MAX_BLOCK_V`, 4096: 16 warps, 8 lanes per thread; the longest that compiles
  without spills, table in fastkd/triton/rows.py), read once and kept in registers: element traffic
  2 x N x C reads + 1 x N x C write per gradient (g = 0, 1 or 2), (2 + g) x N x C x 2 bytes for bf16/fp16,
  x 4 for fp32; per element 2 exp (the gradient reuses them) plus ~10 multiply-adds for D;
- a longer row streams in blocks of `rows.STREAM_BLOCK_V` (2048, 8 warps), in three passes of the same
  program (the maxima, the sums against them, the gradient): 6 x N x C reads (the later passes often served
  from L2) + 1 x N x C write per gradient, (6 + g) x N x C x 2 (bf16/fp16) or x 4 (fp32) bytes, 4 exp per
  element; 4 reads without any gradient flag (d_T's included).
Per row besides: the scalar loads of x_g, y_g, of the weights and of 1/T_r (per-row temperature), a store of
d_T. Against the earlier forward + backward pair (5 x N x C for one gradient), one block moves 3 x N x C in
one launch; the gradient buffer is held from forward to backward instead of the inputs, and a second backward
through the graph is refused.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import (block_size, exp_diff, finite_or_zero, flat_index, grad_times_shift, log1p, log_ratio,
                   row_inv_temperature, row_layout, row_start, row_maxnreg, row_temperature, row_warps,
                   row_weight, store_row)


@triton.jit
def softplus(z):
    """`log(1 + e^z)`; inf at +inf, 0 at -inf."""
    return tl.maximum(z, 0.0) + log1p(tl.exp(-tl.abs(z)))


@triton.jit
def binary_split(u_s, u_t):
    """`(log b_s,g, log b_s,r, log b_t,g, log b_t,r)`: the [target, rest] split from the log-odds u."""
    return -softplus(-u_s), -softplus(u_s), -softplus(-u_t), -softplus(u_t)


@triton.jit
def load_rest(x_row, y_row, offs, mask, is_target, x_col, y_col, inv_temperature):
    """`(x, y)` of one block with the target column and the lanes outside the row at -inf."""
    x = tl.load(x_row + offs * x_col, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
    y = tl.load(y_row + offs * y_col, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
    return tl.where(is_target, float("-inf"), x), tl.where(is_target, float("-inf"), y)


@triton.jit
def nckd_terms(a, b):
    """Per element, from `a = x - M_x`, `b = y - M_y`: `exp(a)`, `exp(b)`, `exp(b) (b - a)` (0 where p~ = 0
    or q~ = 0), `exp(b) - exp(a)`, and whether p~ > 0 meets x = -inf."""
    ea = tl.exp(a)
    eb = tl.exp(b)
    x_masked = a == float("-inf")
    w = tl.where((eb > 0) & ~x_masked, eb * (b - a), 0.0)
    return ea, eb, w, exp_diff(b, a, eb, ea), (eb > 0) & x_masked


@triton.jit
def store_gradients(dx_ptr, dy_ptr, row, offs, V, is_target, valid, a, b, ea, eb, r_x, r_y, e_bar, g_n,
                    dx_target, q_factor, dy_target, p_factor, X_GRAD: tl.constexpr, Y_GRAD: tl.constexpr,
                    T_GRAD: tl.constexpr):
    """The weighted gradients of one block, stored where asked for. The non-target distributions are 0 on the
    target column and where a logit is -inf (also when Z = 0, where exp(a) / Z would be NaN). Returns, with
    `T_GRAD`, the block's `GX a + GY b` over the non-target columns (both sides, stored or not; the target
    column's is the caller's), the lanes of `-d_T`; else 0. `r_x = 1 / Z_x`, `r_y = 1 / Z_y`: a multiply per
    element, not a division (a correctly rounded division per element brings ptxas' out-of-line slow path,
    whose call saved registers on the stack in the long-row pass with d_T: 8 bytes, fp32, sm_80)."""
    mask = offs < V
    q = tl.where(ea > 0, ea * r_x, 0.0)
    p = tl.where(eb > 0, eb * r_y, 0.0)
    dt = 0.0
    if X_GRAD or T_GRAD:
        dx = tl.where(is_target, dx_target, q_factor * q - g_n * p)
        dx = tl.where(valid, dx, float("nan"))
        if X_GRAD:
            store_row(dx_ptr, row, V, offs, dx, mask)
    if Y_GRAD or T_GRAD:
        # The same `b - a` as the sum behind Ebar: exactly 0 for a one-hot p~.
        nckd_term = tl.where(p > 0, p * ((b - a) - e_bar), 0.0)
        dy = tl.where(is_target, dy_target, p_factor * p + g_n * nckd_term)
        dy = tl.where(valid, dy, float("nan"))
        if Y_GRAD:
            store_row(dy_ptr, row, V, offs, dy, mask)
    if T_GRAD:
        dt = tl.where(is_target, 0.0, grad_times_shift(dx, a) + grad_times_shift(dy, b))
    return dt


@triton.jit
def dkd_rows_kernel(
    x_ptr, y_ptr, target_ptr, tckd_ptr, nckd_ptr, tckd_w_ptr, nckd_w_ptr, dx_ptr, dy_ptr, t_ptr, dt_ptr,
    V, inner_size, x_outer, x_inner, x_col, y_outer, y_inner, y_col, tckd_w_stride, nckd_w_stride, t_stride,
    inv_temperature,
    X_GRAD: tl.constexpr, Y_GRAD: tl.constexpr, ROW_T: tl.constexpr, T_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = row_start(x_ptr, row, inner_size, x_outer, x_inner)
    y_row = row_start(y_ptr, row, inner_size, y_outer, y_inner)
    if ROW_T:  # the row's own 1/T (NaN where T is not > 0: rows.row_temperature)
        inv_temperature = row_inv_temperature(t_ptr, row, t_stride)
    target = tl.load(target_ptr + row).to(tl.int64)
    valid = (target >= 0) & (target < V)  # out of range: NaN, never an out-of-bounds read
    x_g = tl.load(x_row + target * x_col, mask=valid, other=0.0).to(tl.float32) * inv_temperature
    y_g = tl.load(y_row + target * y_col, mask=valid, other=0.0).to(tl.float32) * inv_temperature

    zeros = tl.zeros([BLOCK_V], tl.float32)
    cols = tl.arange(0, BLOCK_V)
    if ONE_BLOCK:
        offs = cols.to(tl.int64)
        is_target = offs == target
        x, y = load_rest(x_row, y_row, offs, offs < V, is_target, x_col, y_col, inv_temperature)
        m_x = finite_or_zero(tl.max(x, 0))
        m_y = finite_or_zero(tl.max(y, 0))
        a = x - m_x
        b = y - m_y
        ea, eb, w, d, inf_term = nckd_terms(a, b)
        z_x = tl.sum(ea, 0)
        z_y = tl.sum(eb, 0)
        e_sum = tl.sum(w, 0)
        d_sum = tl.sum(d, 0)
        any_inf = tl.max(inf_term.to(tl.int32), 0) > 0
    else:
        # Pass 1: the maxima of the rest.
        mx_lane = tl.full([BLOCK_V], float("-inf"), tl.float32)
        my_lane = mx_lane
        for start in range(0, V, BLOCK_V):
            offs = (start + cols).to(tl.int64)
            x, y = load_rest(x_row, y_row, offs, offs < V, offs == target, x_col, y_col, inv_temperature)
            mx_lane = tl.maximum(mx_lane, x)
            my_lane = tl.maximum(my_lane, y)
        m_x = finite_or_zero(tl.max(mx_lane, 0))
        m_y = finite_or_zero(tl.max(my_lane, 0))
        # Pass 2: the sums against the final maxima.
        zx_lane, zy_lane, e_lane, d_lane = zeros, zeros, zeros, zeros
        inf_lane = tl.zeros([BLOCK_V], tl.int32)
        for start in range(0, V, BLOCK_V):
            offs = (start + cols).to(tl.int64)
            x, y = load_rest(x_row, y_row, offs, offs < V, offs == target, x_col, y_col, inv_temperature)
            ea, eb, w, d, inf_term = nckd_terms(x - m_x, y - m_y)
            zx_lane += ea
            zy_lane += eb
            e_lane += w
            d_lane += d
            inf_lane = tl.maximum(inf_lane, inf_term.to(tl.int32))
        z_x = tl.sum(zx_lane, 0)
        z_y = tl.sum(zy_lane, 0)
        e_sum = tl.sum(e_lane, 0)
        d_sum = tl.sum(d_lane, 0)
        any_inf = tl.max(inf_lane, 0) > 0

    has_rest = z_y > 0
    e_bar = e_sum / tl.where(has_rest, z_y, 1.0)
    nckd = e_bar - log_ratio(z_y, z_x, d_sum)
    nckd = tl.where(any_inf, float("inf"), nckd)
    nckd = tl.where(has_rest, nckd, 0.0)  # no non-target teacher mass (one class): nothing to transfer

    u_s = tl.where(valid, (x_g - m_x) - tl.log(z_x), float("nan"))
    u_t = tl.where(valid, (y_g - m_y) - tl.log(z_y), float("nan"))
    log_bs_g, log_bs_r, log_bt_g, log_bt_r = binary_split(u_s, u_t)
    bt_g = tl.exp(log_bt_g)
    bt_r = tl.exp(log_bt_r)
    tckd = (tl.where(bt_g > 0, bt_g * (log_bt_g - log_bs_g), 0.0)
            + tl.where(bt_r > 0, bt_r * (log_bt_r - log_bs_r), 0.0))

    # A NaN anywhere in the row makes both terms NaN: the zero-mass guards above would otherwise hide it.
    nan_in_row = (z_x != z_x) | (z_y != z_y) | (x_g != x_g) | (y_g != y_g)
    tckd = tl.where(valid & ~nan_in_row, tckd, float("nan"))
    nckd = tl.where(valid & ~nan_in_row, nckd, float("nan"))
    tl.store(tckd_ptr + row, tckd)
    tl.store(nckd_ptr + row, nckd)

    if X_GRAD or Y_GRAD or T_GRAD:
        # The row's weights in the loss; d/dS = d/dx / T rides on them.
        g_t = tl.load(tckd_w_ptr + row * tckd_w_stride) * inv_temperature
        g_n = tl.load(nckd_w_ptr + row * nckd_w_stride) * inv_temperature
        bs_g = tl.exp(log_bs_g)
        bs_r = tl.exp(log_bs_r)
        # Student: the target column, and the factor of q~ on the others.
        dx_target = g_t * (bs_g - bt_g)
        q_factor = g_t * (bs_r - bt_r) + g_n
        # Teacher: the target column, and the factor of p~ (through R_y) on the others.
        dy_target = g_t * tl.where(bt_g > 0, bt_g * ((log_bt_g - log_bs_g) - tckd), 0.0)
        p_factor = g_t * tl.where(bt_r > 0, bt_r * ((log_bt_r - log_bs_r) - tckd), 0.0)
        r_x = 1.0 / z_x
        r_y = 1.0 / z_y
        if ONE_BLOCK:
            dt = store_gradients(dx_ptr, dy_ptr, row, offs, V, is_target, valid, a, b, ea, eb, r_x, r_y, e_bar,
                                 g_n, dx_target, q_factor, dy_target, p_factor, X_GRAD, Y_GRAD, T_GRAD)
            if T_GRAD:
                d_t = tl.sum(dt, 0)
        else:
            # Pass 3: the gradient.
            dt_lane = zeros
            for start in range(0, V, BLOCK_V):
                offs = (start + cols).to(tl.int64)
                is_target = offs == target
                x, y = load_rest(x_row, y_row, offs, offs < V, is_target, x_col, y_col, inv_temperature)
                a = x - m_x
                b = y - m_y
                dt = store_gradients(dx_ptr, dy_ptr, row, offs, V, is_target, valid, a, b, tl.exp(a), tl.exp(b),
                                     r_x, r_y, e_bar, g_n, dx_target, q_factor, dy_target, p_factor, X_GRAD, Y_GRAD,
                                     T_GRAD)
                if T_GRAD:
                    dt_lane += dt
            if T_GRAD:
                d_t = tl.sum(dt_lane, 0)
        if T_GRAD:
            # The target column, against the same shifts M_x, M_y as the rest (any shift will do: each side's
            # gradient sums to 0); NaN for a target out of range, as the terms.
            d_t += grad_times_shift(dx_target, x_g - m_x) + grad_times_shift(dy_target, y_g - m_y)
            tl.store(dt_ptr + row, tl.where(valid, -d_t, float("nan")))


def dkd_rows(student, teacher, target, temperature, temperature_rows, tckd_weight, nckd_weight, student_grad,
             teacher_grad, temperature_grad):
    """Per-row `(TCKD, NCKD, d_student, d_teacher, d_T)`, the terms without the `T^2 / rows` factor and the
    weights (NaN for a target outside [0, C)); when `student_grad` / `teacher_grad`,
    `sum_r tckd_weight_r dTCKD_r/d input + nckd_weight_r dNCKD_r/d input` in the input's dtype and shape
    (contiguous), else an empty tensor. The weights: float32 `(rows,)`, any stride (None: 1). The temperature
    is `temperature`, or row r's `temperature_rows[r]` when given (float32 `(rows,)`, any stride; not > 0: NaN
    terms and gradients); with `temperature_grad`, `d_T[r] = d/dT_r (tckd_weight_r TCKD_r + nckd_weight_r
    NCKD_r)`, the weights held constant (float32 `(rows,)`), else an empty tensor."""
    V = student.shape[-1]
    rows = student.numel() // V
    device = student.device
    x, x_outer, x_inner, x_col, inner = row_layout(student)
    y, y_outer, y_inner, y_col, _ = row_layout(teacher)
    tckd = torch.empty(rows, dtype=torch.float32, device=device)
    nckd = torch.empty(rows, dtype=torch.float32, device=device)
    d_student = torch.empty(student.shape if student_grad else 0, dtype=student.dtype, device=device)
    d_teacher = torch.empty(teacher.shape if teacher_grad else 0, dtype=teacher.dtype, device=device)
    d_temperature = torch.empty(rows if temperature_grad else 0, dtype=torch.float32, device=device)
    (t_w, t_stride), (n_w, n_stride) = ((row_weight(tckd_weight, tckd), row_weight(nckd_weight, tckd))
                                        if student_grad or teacher_grad or temperature_grad
                                        else ((tckd, 0), (tckd, 0)))
    inv_temperature, t_rows, temp_stride = row_temperature(temperature, temperature_rows, rows, tckd)
    block = block_size(V)
    dkd_rows_kernel[(rows,)](
        x, y, flat_index(target), tckd, nckd, t_w, n_w, d_student, d_teacher, t_rows, d_temperature,
        V, inner, x_outer, x_inner, x_col, y_outer, y_inner, y_col, t_stride, n_stride, temp_stride,
        inv_temperature,
        X_GRAD=student_grad, Y_GRAD=teacher_grad, ROW_T=temperature_rows is not None, T_GRAD=temperature_grad,
        BLOCK_V=block, ONE_BLOCK=V <= block, num_warps=row_warps(block),
        maxnreg=row_maxnreg(block))
    return tckd, nckd, d_student, d_teacher, d_temperature
