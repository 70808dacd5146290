"""Sparse-teacher KD: the student's row of V logits against k teacher slots (ids and log-probabilities).

Covers `sparse_kd_loss` (its definition: fastkd/reference/sparse.py) for the three tails. The student's side is
dense (V logits, a softmax over all of them); the teacher's is k (id, log-probability) pairs per row, a slot
with l = -inf unused (its id never read).

Maths, per row, with `x = s / T` from the student's logits s (float32, `x = s * (1/T)`), kept apart as in kl.py:
    M = max x,  a_j = x_j - M,  Z = sum_j exp(a_j),  log q_j = a_j - log Z            (never `x - lse`)
The slots: `used_k = l_k != -inf`; a used id outside [0, V) makes the row's loss NaN (`bad`), and its id is not
read either (`readable_k = used_k & 0 <= i_k < V`, the gather masked). The set S = the readable ids.
    renormalize:  u_k = l_k / T,  m_u = max_used u,  z_u = sum_used exp(u - m_u),
                  log p_k = (u_k - m_u) - log z_u,  p_k = exp(log p_k)  (0 unused),  P = sum_k p_k = 1 (0: none used)
    none, bucket: log p_k = l_k,  p_k = exp(l_k),  P = sum_k p_k                    (T = 1)
    loss = sum_k p_k [p_k > 0] (log p_k - log q_{i_k})                              (each slot its own term)
    bucket adds   p_tail [p_tail > 0] (log p_tail - log q_tail):
                  log p_tail = log1mexp(m_u + log z_u)  (Maechler's split, as the reference), -inf when S is
                  all of [0, V);  log q_tail = (M_t - M) + log Z_t - log Z  with Z_t = sum_{j not in S}
                  exp(x_j - M_t): summed over the columns outside S directly, never `Z - sum_S`, which cancels
                  when the k ids hold almost all the student's mass; 0 when S is empty (q_tail = 1).
                  M_t = M, sharing exp(a_j), unless the largest logit outside S is more than TAIL_FAR = 32 below
                  M; then M_t = M_o = max_{j not in S} x_j and exp(x_j - M_o) is its own exponential (exp(a_j)
                  would underflow and take the tail's digits, or all of it, with it).
Gradient, from d(-log q_i)/dx_j = q_j - [i = j] and d(-log q_tail)/dx_j = q_j - [j not in S] q_j / q_tail:
    dloss/dx_j = q_j P_tot - c_j - [j not in S] p_tail r_j,
    c_j = sum_{k: i_k = j} p_k (duplicates add),  P_tot = P + p_tail,  r_j = q_j / q_tail = exp(x_j - M_t) / Z_t;
the tail's part (p_tail in P_tot and r) only where the reference's formula has a gradient: p_tail > 0, S not
empty and some logit outside S finite (Z_t > 0; else q_tail = 0, and the reference's masked log-sum-exp
passes no gradient). The gradient by the raw logits s is that times 1/T, the row's weight in the loss applied.
Rows that read nothing (an ignored token) get loss 0 and a zero gradient; a `bad` row loss NaN and a zero
gradient, as the reference (its `where(bad, NaN, loss)` passes none); a row with no used slot loss 0.

Membership (bucket only): a bitmap of the row's set, V bits as `ceil(V / 32)` int32 words per row in a zeroed
scratch buffer (`torch.zeros` in the launcher: N x V / 8 bytes of device memory for the call, 1/16 of the bf16
logits, and their memset), filled by the program with one `atomic_or` per readable slot, then, after a barrier,
read back as words beside the logits (`.cg`: from L2, where the atomics were made; 32 neighbouring lanes read
one word, one transaction). Cost per element: 1/8 byte of memset and 1/8 byte per pass that reads it, a shift
and a mask; per row, k atomics. The alternatives cost more: comparing every column with the k ids is k integer
operations per element (at k = 64 the kernel would be compute-bound several times over), and a histogram of
the ids (`tl.histogram`) holds 1/32 of the block's counters in every thread (128 registers for 4096 columns).
The gradient needs no membership: the pass over the row writes the non-set formula everywhere, and, after a
barrier (the same program's stores, ordered by bar.sync), the slot pass overwrites the columns of S with
`q_j P_tot - c_j` (also for duplicates: the same value from every slot of an id). `c_j` for duplicates is a
k x k comparison of the slots' ids in tiles of SLOT_BLOCK^2 (k^2 comparisons per row, k^2 / threads per thread:
for k = 256 and 8 warps 256 compare-adds per thread, next to V / 256 elements per thread of the row's passes).

Design and cost (s = the student's element size, 2 for bf16/fp16, 4 for fp32; g = 1 with the gradient, 0
without): the gradient is made in the forward pass, weighted (`weight_r`, known at forward time:
`fastkd.kernel_losses`), and the backward only scales it (`rows.scale_rows_`), as kl.py.
- A row that fits one block (V <= `rows.MAX_BLOCK_V`): the logits are read once and stay in registers, from the
  maxima to the gradient. Element traffic: 1 x N x V reads + g x N x V writes, (1 + g) x s bytes per element:
  the floor of this loss (the teacher is k values per row; docs/performance.md). Bucket adds the bitmap: 1/8
  byte of memset and 1/8 byte read per element. Exponentials per element: 1 (exp(a)), 2 for bucket when the tail is far
  (above); no logarithm.
- A longer row streams in blocks of `rows.STREAM_BLOCK_V`, in three passes: the maxima (bucket: also the max
  outside S, and |S|), the sums against them (no rescaling), the gradient. Element traffic: (2 + g) reads and
  g writes, (2 + 2g) x s bytes per element (pass 3 skipped without the gradient); bucket reads the bitmap in
  passes 1 and 2 (1/4 byte) besides its memset (1/8). Exponentials per element: 1 per pass after the first
  (2 and 2 for a far bucket tail).
Per row besides: the k slots (ids in their integer dtype and log-probabilities) read by three short slot passes
and once more per SLOT_BLOCK slots by the duplicate tiles (L1/L2; k x (id + l) bytes each), k gathered student
logits and k scattered gradient entries (their dense values written first, then overwritten), k atomics
(bucket); 2 to 4 exponentials per slot, and k / SLOT_BLOCK more in the duplicate tiles (each recomputes its
column block's p); 4 logarithms per row (log Z, log z_u, log Z_t, log1mexp). The teacher's log-probabilities
get no gradient here (`fastkd.kernel_losses` runs the reference when they need one).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import (block_size, expm1, finite_or_zero, flat_index, log1p, row_layout, row_maxnreg, row_start,
                   row_warps, row_weight, store_row)

TAILS = {"renormalize": 0, "bucket": 1, "none": 2}
RENORMALIZE = tl.constexpr(0)
BUCKET = tl.constexpr(1)
# The slot loops' block, and the side of the duplicate tiles (SLOT_BLOCK^2 comparisons each): a 32 x 32 tile is 8
# values per thread at 4 warps (rows of V <= 1024). Tiles of 64 x 64 took those rows to 128 registers and an 8-byte
# spill (fp16, sm_90, static compile); with 32 the kernel needs at most 90 registers and spills nothing (sm_80 and
# sm_90, every dtype, V = 1024, 4096, 8192, both tails, with and without the gradient: tests/test_static_compile.py).
SLOT_BLOCK = 32
# How far (in units of x) the largest logit outside the set may sit below the row's max before the tail's sum
# takes its own shift: exp(a) >= e^-32 for that logit, so terms flushed to 0 below float32's e^-87 are under
# e^-55 of the tail's largest, far below a rounding even summed over 2^20 columns.
TAIL_FAR = tl.constexpr(32.0)
LOG_HALF = tl.constexpr(-0.6931471805599453)


@triton.jit
def load_student(s_row, offs, mask, s_col, inv_temperature):
    """x = student / T at `offs`, -inf where masked."""
    return tl.load(s_row + offs * s_col, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature


@triton.jit
def load_logprobs(lp_row, k_offs, n_slots, l_col):
    """The slots' l as float32, -inf (unused) past the row's slots."""
    return tl.load(lp_row + k_offs * l_col, mask=k_offs < n_slots, other=float("-inf")).to(tl.float32)


@triton.jit
def load_slots(ids_row, lp_row, k_offs, n_slots, V, i_col, l_col):
    """One block of slots: `(ids, l, used, readable, bad)`. An id is read only for a used slot, and is 0 where
    not readable (unused, or out of range: `bad`, which makes the row NaN), so every gather stays in the row."""
    l = load_logprobs(lp_row, k_offs, n_slots, l_col)
    used = l != float("-inf")
    raw = tl.load(ids_row + k_offs * i_col, mask=used, other=0).to(tl.int64)
    in_range = (raw >= 0) & (raw < V)
    readable = used & in_range
    return tl.where(readable, raw, 0), l, used, readable, used & ~in_range


@triton.jit
def teacher_probs(l, used, inv_temperature, m_u, log_z_u, TAIL: tl.constexpr):
    """`(p, log p)` of a block of slots: the tempered softmax over the used slots (renormalize), or the stored
    log-probabilities as they are (bucket, none). 0 and -inf for an unused slot."""
    if TAIL == RENORMALIZE:
        log_p = tl.where(used, (l * inv_temperature - m_u) - log_z_u, float("-inf"))
        p = tl.where(used, tl.exp(log_p), 0.0)
    else:
        log_p = l
        p = tl.exp(l)
    return p, log_p


@triton.jit
def in_set(bits_row, offs, mask):
    """Whether each column is one of the row's readable ids: its bit in the row's bitmap (read from L2, where the
    atomics that set it were made)."""
    word = tl.load(bits_row + (offs >> 5), mask=mask, other=0, cache_modifier=".cg")
    return ((word >> (offs & 31).to(tl.int32)) & 1) != 0


@triton.jit
def tail_exp(x, ea, m_o, far):
    """exp(x - M_t), the terms of the tail's sum: the row's own exp(a) when the tail is near the max, else
    exp(x - M_o) (the max outside the set)."""
    if far:
        e = tl.exp(x - m_o)
    else:
        e = ea
    return e


@triton.jit
def log1mexp(x):
    """log(1 - e^x) for x < 0 without cancellation, -inf for x >= 0 (as the reference's `log1mexp`)."""
    near_one = x > LOG_HALF
    out = tl.where(near_one, tl.log(-expm1(x)), log1p(-tl.exp(x)))
    return tl.where(x < 0, out, float("-inf"))


@triton.jit
def duplicate_mass(ids, ids_row, lp_row, n_slots, V, i_col, l_col, inv_temperature, m_u, log_z_u,
                   TAIL: tl.constexpr, BLOCK_K: tl.constexpr):
    """c = sum of p over the slots that hold each slot's id (itself included): SLOT_BLOCK x SLOT_BLOCK tiles of
    comparisons over the row's slots."""
    slot_cols = tl.arange(0, BLOCK_K)
    c = tl.zeros([BLOCK_K], tl.float32)
    for start in range(0, n_slots, BLOCK_K):
        ids_b, l_b, used_b, readable_b, _ = load_slots(ids_row, lp_row, (start + slot_cols).to(tl.int64), n_slots,
                                                       V, i_col, l_col)
        p_b, _ = teacher_probs(l_b, used_b, inv_temperature, m_u, log_z_u, TAIL)
        same = (ids[:, None] == ids_b[None, :]) & readable_b[None, :]
        c += tl.sum(tl.where(same, p_b[None, :], 0.0), 1)
    return c


@triton.jit
def sparse_kd_rows_kernel(
    s_ptr, ids_ptr, lp_ptr, labels_ptr, loss_ptr, w_ptr, ds_ptr, bits_ptr,
    V, K, words, inner_size, s_outer, s_inner, s_col, i_outer, i_inner, i_col, l_outer, l_inner, l_col, w_stride,
    inv_temperature, ignore_index,
    TAIL: tl.constexpr, HAS_LABELS: tl.constexpr, S_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = row_start(s_ptr, row, inner_size, s_outer, s_inner)
    ids_row = row_start(ids_ptr, row, inner_size, i_outer, i_inner)
    lp_row = row_start(lp_ptr, row, inner_size, l_outer, l_inner)
    bits_row = bits_ptr + row * words
    n_cols = V
    n_slots = K
    active = True
    if HAS_LABELS:
        active = tl.load(labels_ptr + row) != ignore_index
        n_cols = tl.where(active, V, 0)  # an ignored token reads nothing
        n_slots = tl.where(active, K, 0)

    # Slots, pass 1: the max of the used u = l / T, whether an id is out of range, whether the set is empty;
    # bucket: each readable id's bit in the bitmap.
    slot_cols = tl.arange(0, BLOCK_K)
    mu_lane = tl.full([BLOCK_K], float("-inf"), tl.float32)
    bad_lane = tl.zeros([BLOCK_K], tl.int32)
    set_lane = tl.zeros([BLOCK_K], tl.int32)
    for start in range(0, n_slots, BLOCK_K):
        ids, l, used, readable, bad = load_slots(ids_row, lp_row, (start + slot_cols).to(tl.int64), n_slots, V,
                                                 i_col, l_col)
        mu_lane = tl.maximum(mu_lane, tl.where(used, l * inv_temperature, float("-inf")))
        bad_lane = tl.maximum(bad_lane, bad.to(tl.int32))
        set_lane = tl.maximum(set_lane, readable.to(tl.int32))
        if TAIL == BUCKET:
            tl.atomic_or(bits_row + (ids >> 5), (1 << (ids & 31)).to(tl.int32), mask=readable)
    m_u = finite_or_zero(tl.max(mu_lane, 0))
    bad_row = tl.max(bad_lane, 0) > 0
    nonempty = tl.max(set_lane, 0) > 0
    if TAIL == BUCKET:
        tl.debug_barrier()  # the bits set before any thread reads them

    # Slots, pass 2: z_u (renormalize; bucket: the log-sum-exp of l) and P = sum p.
    zu_lane = tl.zeros([BLOCK_K], tl.float32)
    pp_lane = tl.zeros([BLOCK_K], tl.float32)
    for start in range(0, n_slots, BLOCK_K):
        l = load_logprobs(lp_row, (start + slot_cols).to(tl.int64), n_slots, l_col)
        if TAIL == RENORMALIZE:
            zu_lane += tl.where(l != float("-inf"), tl.exp(l * inv_temperature - m_u), 0.0)
        else:
            pp_lane += tl.exp(l)
            if TAIL == BUCKET:
                zu_lane += tl.exp(l - m_u)
    z_u = tl.sum(zu_lane, 0)
    log_z_u = tl.log(z_u)
    if TAIL == RENORMALIZE:
        p_sum = tl.where(z_u > 0, 1.0, z_u)  # exactly 1 over a non-empty row (NaN passes)
    else:
        p_sum = tl.sum(pp_lane, 0)

    # The student's row: M, Z; bucket: the max outside the set, |S|, and the tail's sum Z_t.
    cols = tl.arange(0, BLOCK_V)
    zeros = tl.zeros([BLOCK_V], tl.float32)
    m_o = 0.0
    z_t = 0.0
    n_set = 0
    far = False
    if ONE_BLOCK:
        # The whole row in registers, from one read, to the gradient.
        offs = cols.to(tl.int64)
        x = load_student(s_row, offs, offs < n_cols, s_col, inv_temperature)
        m = finite_or_zero(tl.max(x, 0))
        ea = tl.exp(x - m)
        z = tl.sum(ea, 0)
        if TAIL == BUCKET:
            member = in_set(bits_row, offs, offs < n_cols)
            m_o = finite_or_zero(tl.max(tl.where(member, float("-inf"), x), 0))
            n_set = tl.sum(member.to(tl.int32), 0)
            far = m - m_o > TAIL_FAR
            e_t = tl.where(member, 0.0, tail_exp(x, ea, m_o, far))
            z_t = tl.sum(e_t, 0)
    else:
        # Pass 1: the maxima.
        m_lane = tl.full([BLOCK_V], float("-inf"), tl.float32)
        mo_lane = m_lane
        set_cols = tl.zeros([BLOCK_V], tl.int32)
        for start in range(0, n_cols, BLOCK_V):
            offs = (start + cols).to(tl.int64)
            x = load_student(s_row, offs, offs < n_cols, s_col, inv_temperature)
            m_lane = tl.maximum(m_lane, x)
            if TAIL == BUCKET:
                member = in_set(bits_row, offs, offs < n_cols)
                mo_lane = tl.maximum(mo_lane, tl.where(member, float("-inf"), x))
                set_cols += member.to(tl.int32)
        m = finite_or_zero(tl.max(m_lane, 0))
        if TAIL == BUCKET:
            m_o = finite_or_zero(tl.max(mo_lane, 0))
            n_set = tl.sum(set_cols, 0)
            far = m - m_o > TAIL_FAR
        # Pass 2: the sums, against the final maxima (no rescaling).
        z_lane = zeros
        zt_lane = zeros
        for start in range(0, n_cols, BLOCK_V):
            offs = (start + cols).to(tl.int64)
            x = load_student(s_row, offs, offs < n_cols, s_col, inv_temperature)
            ea = tl.exp(x - m)
            z_lane += ea
            if TAIL == BUCKET:
                member = in_set(bits_row, offs, offs < n_cols)
                zt_lane += tl.where(member, 0.0, tail_exp(x, ea, m_o, far))
        z = tl.sum(z_lane, 0)
        if TAIL == BUCKET:
            z_t = tl.sum(zt_lane, 0)
    log_z = tl.log(z)

    # The tail (bucket), and P_tot, the mass the student's gradient spreads as q_j P_tot.
    tail_term = 0.0
    p_tail = 0.0
    p_tot = p_sum
    tail_on = False
    if TAIL == BUCKET:
        log_p_tail = tl.where(n_set == V, float("-inf"), log1mexp(m_u + log_z_u))  # no id outside S: no tail
        p_tail = tl.exp(log_p_tail)
        shift_t = tl.where(far, m_o, m)
        log_q_tail = tl.where(nonempty, (shift_t - m) + tl.log(z_t) - log_z, 0.0)
        tail_term = p_tail * tl.where(p_tail > 0, log_p_tail - log_q_tail, 0.0)
        tail_on = (p_tail > 0) & nonempty & (z_t > 0)
        p_tot = p_sum + tl.where(tail_on, p_tail, 0.0)
    live = active & ~bad_row  # rows whose gradient is not 0

    g_w = 0.0
    q_scale = 0.0
    if S_GRAD:
        g_w = tl.load(w_ptr + row * w_stride) * inv_temperature  # the row's weight, and d/dZ = d/dx / T
        q_scale = p_tot / z  # q_j P_tot = exp(a_j) q_scale
        t_scale = 0.0
        if TAIL == BUCKET:
            t_scale = tl.where(tail_on, p_tail / z_t, 0.0)  # p_tail r_j = exp(x_j - M_t) t_scale
        # Every column as if outside S; the slot pass below overwrites the columns of S.
        if ONE_BLOCK:
            dense = ea * q_scale
            if TAIL == BUCKET:
                dense -= e_t * t_scale
            store_row(ds_ptr, row, V, offs, tl.where(live, dense * g_w, 0.0), offs < V)
        else:
            # Pass 3: the gradient, over the whole row (an ignored token's written as zeros, read from nothing).
            for start in range(0, V, BLOCK_V):
                offs = (start + cols).to(tl.int64)
                x = load_student(s_row, offs, offs < n_cols, s_col, inv_temperature)
                ea = tl.exp(x - m)
                dense = ea * q_scale
                if TAIL == BUCKET:
                    # A column of S may make inf - inf here: overwritten below.
                    dense -= tail_exp(x, ea, m_o, far) * t_scale
                store_row(ds_ptr, row, V, offs, tl.where(live, dense * g_w, 0.0), offs < V)
        tl.debug_barrier()  # the row's stores before the slot pass's overwrites

    # Slots, pass 3: the terms p_k (log p_k - log q_{i_k}); with the gradient, the columns of S.
    loss_lane = tl.zeros([BLOCK_K], tl.float32)
    for start in range(0, n_slots, BLOCK_K):
        ids, l, used, readable, _ = load_slots(ids_row, lp_row, (start + slot_cols).to(tl.int64), n_slots, V,
                                               i_col, l_col)
        p, log_p = teacher_probs(l, used, inv_temperature, m_u, log_z_u, TAIL)
        a_i = load_student(s_row, ids, readable, s_col, inv_temperature) - m
        # The reference's `p * where(p > 0, log p - log q, 0)`: 0 for p = 0 whatever log q, NaN for a NaN p.
        loss_lane += p * tl.where(p > 0, log_p - (a_i - log_z), 0.0)
        if S_GRAD:
            c = duplicate_mass(ids, ids_row, lp_row, n_slots, V, i_col, l_col, inv_temperature, m_u, log_z_u,
                               TAIL, BLOCK_K)
            g = (tl.exp(a_i) * q_scale - c) * g_w
            tl.store(ds_ptr + row * V + ids, g.to(ds_ptr.dtype.element_ty), mask=readable & live)
    loss = tl.sum(loss_lane, 0) + tail_term
    loss = tl.where(bad_row, float("nan"), loss)
    if HAS_LABELS:
        loss = tl.where(active, loss, 0.0)
    tl.store(loss_ptr + row, loss)


def sparse_kd_rows(student, teacher_indices, teacher_logprobs, tail, temperature, labels, ignore_index, weight,
                   student_grad):
    """Per-row `(loss, d_student)` of sparse-teacher KD (module docstring): `loss` float32 `(rows,)`; with
    `student_grad`, `weight_r d loss_r / d student` in the student's dtype and shape (contiguous), else an empty
    tensor. `weight` float32 `(rows,)`, any stride (None: 1). A token whose label is `ignore_index` reads
    nothing and gets loss 0 and a zero gradient."""
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {tuple(TAILS)}, got {tail!r}")
    V = student.shape[-1]
    K = teacher_indices.shape[-1]
    rows = student.numel() // V
    device = student.device
    s, s_outer, s_inner, s_col, inner = row_layout(student)
    ids, i_outer, i_inner, i_col, _ = row_layout(teacher_indices)
    lp, l_outer, l_inner, l_col, _ = row_layout(teacher_logprobs)
    loss = torch.empty(rows, dtype=torch.float32, device=device)
    d_student = torch.empty(student.shape if student_grad else 0, dtype=student.dtype, device=device)
    w, w_stride = row_weight(weight, loss) if student_grad else (loss, 0)
    words = triton.cdiv(V, 32)
    bits = (torch.zeros((rows, words), dtype=torch.int32, device=device) if tail == "bucket"
            else torch.empty(1, dtype=torch.int32, device=device))  # never read
    labels = flat_index(labels)
    block = block_size(V)
    sparse_kd_rows_kernel[(rows,)](
        s, ids, lp, labels if labels is not None else loss, loss, w, d_student, bits,
        V, K, words, inner, s_outer, s_inner, s_col, i_outer, i_inner, i_col, l_outer, l_inner, l_col, w_stride,
        1.0 / temperature, ignore_index,
        TAIL=TAILS[tail], HAS_LABELS=labels is not None, S_GRAD=student_grad, BLOCK_V=block,
        BLOCK_K=min(max(triton.next_power_of_2(K), 16), SLOT_BLOCK), ONE_BLOCK=V <= block,
        num_warps=row_warps(block), maxnreg=row_maxnreg(block))
    return loss, d_student
