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
A per-row temperature (`temperature_rows`, constexpr `ROW_T`: a learnable or per-token T_r, read on the device;
the float is then ignored): `x = X * (1/T_r)` with `1/T_r` correctly rounded in float32, made by the launcher
on the device (`rows.row_temperature`: no host sync, no division in the kernel), as the float path's host
`1/T` rounded to float32 (but for rare double roundings), so the same numbers as the float path; NaN where
T_r is not > 0 or is NaN: the whole row (terms, gradients, d_T) NaN. Its gradient (`temperature_grad`, `T_GRAD`),
the row's weight w held constant, CE excluded (no T in it): KL is a function of x = X/T and y = Y/T that does
not change when a constant is added to x (or to y), so `sum_j dKL/dx_j = sum_j dKL/dy_j = 0`; with the
weighted gradients of the raw logits GX_j = w dKL/dX_j = (w/T) dKL/dx_j, GY_j likewise,
    d_T = w dKL/dT = sum_j w dKL/dx_j (-X_j / T^2) + w dKL/dy_j (-Y_j / T^2) = -sum_j (GX_j x_j + GY_j y_j)
        = -sum_j (GX_j a_j + GY_j b_j)        (subtracting M_x sum_j GX_j = 0 and M_y sum_j GY_j = 0)
        = -(w/T) sum_j (p_j (e_j - Ebar) a_j + (q_j - p_j) b_j),
the gradient's own per-element values (both sides, whether or not they are stored) times the shifted
logits the kernel already has: `a`, `b` rather than x, y keep u |M| (logits offset by 1e3) out of the sum.
A product whose gradient is exactly 0 counts 0 (`rows.grad_times_shift`: p_j = 0 against a_j = -inf, both 0
against b_j = -inf; p_j > 0 against b_j = -inf has an infinite KL and an infinite d_T). An ignored token: 0.

Why this formulation (u = 2^-24): `lse = M + log Z` and `x - lse` carry an absolute error u |M| into every
log-probability, the whole KL for logits offset by 1e3, at T = 0.05, or near float16's 6e4. Here
`a = x - M` is exact for the entries that carry the mass (x within a factor 2 of M), and `log Z <= log V`.
`L` is a difference of two row constants: as `log Z_x - log Z_y` (or `log(Z_x / Z_y)`) it carries
u log V (u) absolute, against a KL that is ~1e-3 of log V for near rows (T = 100); from `D`, summed from
per-element differences computed without cancellation, its error is u |D| / Z_y, the size of the KL's
own terms. The teacher's gradient uses `e_j - Ebar` with `Ebar` from the forward's own sum of the same
`exp(a_j) e_j`: for a one-hot p (logits of 1e4) it is exactly 0, as it must be, and the `L` shared by the
per-element log-ratio and the KL cancels out of it exactly instead of leaving u log V behind.

Design and cost: the gradient is made in the forward pass. One program per row computes the statistics
(maxima, sums, Ebar, L) and, in the same program, writes `dKL/dX`, `dKL/dY` (and `dCE/dY`) with the formulas
above, each row's gradient already multiplied by its weight in the loss (`kl_weight_r`, `ce_weight_r`, known
at forward time: `fastkd.kernel_losses`; read when any of the three gradient flags is set). Nothing else is
kept for the backward pass, which only scales the stored gradient by grad_output (`rows.scale_rows_`: no N x V
traffic when grad_output is exactly 1). Without a gradient flag (inference) the kernel writes no N x V tensor.
d_T is made where the input gradients are (the same per-element GX, GY): the gradient step runs when any of
`student_grad`, `teacher_grad`, `temperature_grad` is set, and stores only the gradients asked for. Its cost:
one more per-lane multiply-add (two products) and one row sum, a scalar load of 1/T_r and a store of d_T per
row; no exponential more per element, and the same element traffic (below) as a gradient pass that writes
nothing; with d_T alone, g = 0 (nothing N x V written), but a long row still reads X and Y a third time.
- A row that fits one block (V <= `rows.MAX_BLOCK_V`, 4096: 16 warps, 8 lanes per thread; the longest
  that compiles without spills, table in fastkd/triton/rows.py) is loaded once and stays in registers: the
  statistics and then the gradient come from that one read. Element traffic per call: 2 x N x V reads
  (X and Y once) + 1 x N x V write per gradient asked for; in bytes, (2 + g) x N x V x 2 for bf16/fp16 and
  x 4 for fp32 (g = number of gradients, 0, 1 or 2). Exponentials per element: 2 (exp(a), exp(b)), 3 with
  CE (exp(s - M_s)); the gradient reuses them. Plus ~10 multiply-adds for D (`expm1_small`), 2 divisions
  per gradient.
- A longer row streams in blocks of `rows.STREAM_BLOCK_V` (2048, 8 warps), in three passes of the same
  program: pass 1 the maxima, pass 2 all the sums against
  them (no rescaling, so no rescaling error), pass 3 the gradient. Element traffic: 6 x N x V reads (X and Y
  three times; passes 2 and 3 are often served from L2) + 1 x N x V write per gradient, in bytes
  (6 + g) x N x V x 2 (bf16/fp16) or x 4 (fp32); without any gradient flag (d_T's included) pass 3 is
  skipped: 4 reads.
  Exponentials per element: 4 (6 with CE), twice those of one pass.
Per row besides: a scalar load of the target logit (CE), of the weights and of 1/T_r (per-row temperature),
a store of d_T. Against the earlier
forward + backward pair (5 x N x V for one gradient), one block moves 3 x N x V and one launch. The cost of
the design: the gradient buffer (N x V in the input dtype) is held from forward to backward instead of the
inputs, which autograd holds anyway when the caller keeps them; a second backward through the graph is
refused (the buffer has been scaled in place), and per-row weights must be known at forward time.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import (block_size, exp_diff, finite_or_zero, flat_index, grad_times_shift, log_ratio,
                   row_inv_temperature, row_layout, row_start, row_maxnreg, row_temperature, row_warps,
                   row_weight, store_row)


@triton.jit
def load_block(x_row, y_row, offs, mask, x_col, y_col, inv_temperature):
    """`(x, y, y_raw)` of one block, -inf outside the row."""
    x = tl.load(x_row + offs * x_col, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
    y_raw = tl.load(y_row + offs * y_col, mask=mask, other=float("-inf")).to(tl.float32)
    return x, y_raw * inv_temperature, y_raw


@triton.jit
def kl_terms(a, b):
    """Per element, from `a = x - M_x`, `b = y - M_y` (the maxima made finite): `exp(a)`, `exp(b)`,
    `exp(a) e` (0 where p = 0 or q = 0), `exp(a) - exp(b)`, and whether p > 0 meets y = -inf."""
    ea = tl.exp(a)
    eb = tl.exp(b)
    y_masked = b == float("-inf")
    w = tl.where((ea > 0) & ~y_masked, ea * (a - b), 0.0)
    return ea, eb, w, exp_diff(a, b, ea, eb), (ea > 0) & y_masked


@triton.jit
def store_gradients(dx_ptr, dy_ptr, row, offs, V, a, b, ea, eb, es, active, z_x, z_y, e_bar, z_s, target,
                    g_kl, g_ce, HAS_CE: tl.constexpr, X_GRAD: tl.constexpr, Y_GRAD: tl.constexpr,
                    T_GRAD: tl.constexpr):
    """The weighted gradients of one block, from the statistics of this same program (`g_kl` the row's KL
    weight times 1/T, `g_ce` its CE weight; `es = exp(s - M_s)` for CE), stored where asked for. Returns,
    with `T_GRAD`, the block's `GX a + GY b` from the KL parts (CE excluded; both sides, stored or not), the
    lanes of `-d_T`; else 0."""
    mask = offs < V
    p = ea / z_x
    dt = 0.0
    if Y_GRAD or T_GRAD:
        gy = (eb / z_y - p) * g_kl
        if Y_GRAD:
            dy = gy
            if HAS_CE:
                dy += g_ce * (es / z_s - tl.where(offs == target, 1.0, 0.0))
            store_row(dy_ptr, row, V, offs, tl.where(active, dy, 0.0), mask)  # an ignored token: zeros
    if X_GRAD or T_GRAD:
        # The same `a - b` as the sum `E`: exactly 0 for a one-hot p. 0 where p = 0 (`ea != 0` lets a NaN
        # through: a NaN logit gives a NaN gradient, as the reference's).
        gx = tl.where(ea != 0, p * ((a - b) - e_bar), 0.0) * g_kl
        if X_GRAD:
            store_row(dx_ptr, row, V, offs, tl.where(active, gx, 0.0), mask)
    if T_GRAD:
        dt = grad_times_shift(gx, a) + grad_times_shift(gy, b)
    return dt


@triton.jit
def kl_rows_kernel(
    x_ptr, y_ptr, labels_ptr, target_ptr, kl_ptr, ce_ptr, kl_w_ptr, ce_w_ptr, dx_ptr, dy_ptr, t_ptr, dt_ptr,
    V, inner_size, x_outer, x_inner, x_col, y_outer, y_inner, y_col, kl_w_stride, ce_w_stride, t_stride,
    inv_temperature, ignore_index,
    HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, X_GRAD: tl.constexpr, Y_GRAD: tl.constexpr,
    ROW_T: tl.constexpr, T_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = row_start(x_ptr, row, inner_size, x_outer, x_inner)
    y_row = row_start(y_ptr, row, inner_size, y_outer, y_inner)
    n_cols = V
    active = True
    if HAS_LABELS:
        active = tl.load(labels_ptr + row) != ignore_index
        n_cols = tl.where(active, V, 0)  # an ignored token reads nothing
    target = -1
    if HAS_CE:
        target = tl.load(target_ptr + row).to(tl.int64)
    if ROW_T:  # the row's own 1/T (NaN where T is not > 0: rows.row_temperature)
        inv_temperature = row_inv_temperature(t_ptr, row, t_stride)
    # The row's weights in the loss, read only when a gradient (of the inputs or of T) is made; d/dX = d/dx / T
    # rides on g_kl.
    g_kl = 0.0
    g_ce = 0.0
    if X_GRAD or Y_GRAD or T_GRAD:
        g_kl = tl.load(kl_w_ptr + row * kl_w_stride) * inv_temperature
        if HAS_CE:
            g_ce = tl.load(ce_w_ptr + row * ce_w_stride)

    cols = tl.arange(0, BLOCK_V)
    zeros = tl.zeros([BLOCK_V], tl.float32)
    if ONE_BLOCK:
        # The whole row in registers: maxima, every sum and the gradient, from one read.
        offs = cols.to(tl.int64)
        x, y, y_raw = load_block(x_row, y_row, offs, offs < n_cols, x_col, y_col, inv_temperature)
        m_x = finite_or_zero(tl.max(x, 0))
        m_y = finite_or_zero(tl.max(y, 0))
        a = x - m_x
        b = y - m_y
        ea, eb, w, d, inf_term = kl_terms(a, b)
        z_x = tl.sum(ea, 0)
        z_y = tl.sum(eb, 0)
        e_sum = tl.sum(w, 0)
        d_sum = tl.sum(d, 0)
        any_inf = tl.max(inf_term.to(tl.int32), 0) > 0
        m_s = 0.0
        z_s = 0.0
        es = zeros
        if HAS_CE:
            m_s = finite_or_zero(tl.max(y_raw, 0))
            es = tl.exp(y_raw - m_s)
            z_s = tl.sum(es, 0)
        e_bar = e_sum / z_x
        if X_GRAD or Y_GRAD or T_GRAD:
            dt = store_gradients(dx_ptr, dy_ptr, row, offs, V, a, b, ea, eb, es, active, z_x, z_y, e_bar, z_s,
                                 target, g_kl, g_ce, HAS_CE, X_GRAD, Y_GRAD, T_GRAD)
            if T_GRAD:
                d_t = -tl.sum(dt, 0)
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
            ea, eb, w, d, inf_term = kl_terms(x - m_x, y - m_y)
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
        if X_GRAD or Y_GRAD or T_GRAD:
            # Pass 3: the gradient, over the whole row (an ignored token's is written as zeros, read from nothing).
            dt_lane = zeros
            for start in range(0, V, BLOCK_V):
                offs = (start + cols).to(tl.int64)
                x, y, y_raw = load_block(x_row, y_row, offs, offs < n_cols, x_col, y_col, inv_temperature)
                a = x - m_x
                b = y - m_y
                es = zeros
                if HAS_CE:
                    es = tl.exp(y_raw - m_s)
                dt = store_gradients(dx_ptr, dy_ptr, row, offs, V, a, b, tl.exp(a), tl.exp(b), es, active, z_x,
                                     z_y, e_bar, z_s, target, g_kl, g_ce, HAS_CE, X_GRAD, Y_GRAD, T_GRAD)
                if T_GRAD:
                    dt_lane += dt
            if T_GRAD:
                d_t = -tl.sum(dt_lane, 0)

    kl = e_bar - log_ratio(z_x, z_y, d_sum)
    kl = tl.where(any_inf, float("inf"), kl)
    if HAS_CE:
        valid = (target >= 0) & (target < V)  # out of range: NaN, never an out-of-bounds read
        s_target = tl.load(y_row + target * y_col, mask=valid, other=0.0).to(tl.float32)
        tl.store(ce_ptr + row, tl.where(valid, (m_s - s_target) + tl.log(z_s), float("nan")))
    if HAS_LABELS:
        kl = tl.where(active, kl, 0.0)
    tl.store(kl_ptr + row, kl)
    if T_GRAD:
        tl.store(dt_ptr + row, tl.where(active, d_t, 0.0))  # an ignored token: 0


def kl_rows(student, teacher, temperature, temperature_rows, reverse, target, labels, ignore_index, kl_weight,
            ce_weight, student_grad, teacher_grad, temperature_grad):
    """Per-row `(KL, CE, d_student, d_teacher, d_T)`: KL(p_t || p_s) (or reverse, `KL(p_s || p_t)`), CE(y, target)
    with y the second row of the KL (the student when not `reverse`; an empty tensor without target), and
    when `student_grad` / `teacher_grad`, `sum_r kl_weight_r dKL_r/d input + ce_weight_r dCE_r/d input` in the
    input's dtype and shape (contiguous), else an empty tensor. The weights are float32 `(rows,)` (any stride;
    None: 1). The temperature is `temperature`, or row r's `temperature_rows[r]` when given (float32 `(rows,)`,
    any stride; not > 0: NaN terms and gradients); with `temperature_grad`, `d_T[r] = kl_weight_r dKL_r/dT_r`
    (float32 `(rows,)`), else an empty tensor. A token whose label is `ignore_index` reads nothing and gets
    loss 0, a zero gradient and d_T 0."""
    V = student.shape[-1]
    rows = student.numel() // V
    device = student.device
    x_in, y_in = (student, teacher) if reverse else (teacher, student)
    x, x_outer, x_inner, x_col, inner = row_layout(x_in)
    y, y_outer, y_inner, y_col, _ = row_layout(y_in)
    kl = torch.empty(rows, dtype=torch.float32, device=device)
    ce = torch.empty(rows if target is not None else 0, dtype=torch.float32, device=device)
    d_student = torch.empty(student.shape if student_grad else 0, dtype=student.dtype, device=device)
    d_teacher = torch.empty(teacher.shape if teacher_grad else 0, dtype=teacher.dtype, device=device)
    d_temperature = torch.empty(rows if temperature_grad else 0, dtype=torch.float32, device=device)
    dx, dy = (d_student, d_teacher) if reverse else (d_teacher, d_student)
    x_grad, y_grad = (student_grad, teacher_grad) if reverse else (teacher_grad, student_grad)
    weights = x_grad or y_grad or temperature_grad
    (kl_w, kl_w_stride), (ce_w, ce_w_stride) = ((row_weight(kl_weight, kl), row_weight(ce_weight, kl)) if weights
                                                else ((kl, 0), (kl, 0)))
    inv_temperature, t_rows, t_stride = row_temperature(temperature, temperature_rows, rows, kl)
    labels, target = flat_index(labels), flat_index(target)
    block = block_size(V)
    kl_rows_kernel[(rows,)](
        x, y, labels if labels is not None else kl, target if target is not None else kl, kl, ce, kl_w, ce_w, dx, dy,
        t_rows, d_temperature,
        V, inner, x_outer, x_inner, x_col, y_outer, y_inner, y_col, kl_w_stride, ce_w_stride, t_stride,
        inv_temperature, ignore_index,
        HAS_LABELS=labels is not None, HAS_CE=target is not None, X_GRAD=x_grad, Y_GRAD=y_grad,
        ROW_T=temperature_rows is not None, T_GRAD=temperature_grad,
        BLOCK_V=block, ONE_BLOCK=V <= block, num_warps=row_warps(block),
        maxnreg=row_maxnreg(block))
    return kl, ce, d_student, d_teacher, d_temperature
