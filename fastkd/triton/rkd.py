"""RKD (relational KD, Park et al. 2019) kernels: direct squared distances, their gradient by direct
differences, and the angle term's Huber sum over all `B^3` triples with its gradient.

Why this design: accuracy on the batches training produces. Two augmentations of one image, or features
collapsing into tight clusters, put rows a relative gap of 1e-2 to 1e-5 apart. Eager float32 (the
reference) forms `x_j - x_i` directly, which is exact for close rows (Sterbenz), so its angles stay accurate
to a few ulp. A float32 Gram form `G_jk - G_ij - G_ik + G_ii` cancels there: each `G` carries an error of
`eps |x|^2`, the numerator is `~ |x_j - x_i| |x|`, so the angle error grows like `eps |x| / gap` and its
gradient like `eps |x| / gap^2` (60% at gap 1e-4). Forming the `B^2` difference vectors is what the kernels
avoid (`B^3 D` work, `B^2 D` memory). Instead:

1. Squared distances in float64, directly: `Q_ij = sum_d (x_id - x_jd)^2` (torch.cdist without the matmul
   form, `B^2 D` float64 operations, no gradient). For float32 rows each difference is exact in float64, so
   `Q` is accurate to ~`sqrt(D) eps64` *relative*, however close the rows. Stored as float32 pairs
   `Q = Qh + Ql` (`Qh` = Q rounded, `Ql` = the remainder); `r_ij = 1 / max(sqrt(Qh_ij), 1e-12)`.
2. The angle numerator by the law of cosines, `2 N_ijk = Q_ij + Q_ik - Q_jk` (`N = (x_j - x_i).(x_k - x_i)`),
   with the larger of `Q_ij, Q_ik` differenced first:
       2N = (max(Qh_ij, Qh_ik) - Qh_jk) + min(Qh_ij, Qh_ik) + ((Ql_ij + Ql_ik) - Ql_jk)
   Say `Q_ik >= Q_ij`. `|Q_ik - Q_jk| = |(x_j - x_i).(2 x_k - x_i - x_j)| <= 3 sqrt(Q_ij Q_ik)`, so the first
   difference is off by at most `3 u sqrt(Q_ij Q_ik)` (one rounding of its exact value, `u = 2^-24`), and the
   next sum by `4 u sqrt(Q_ij Q_ik)`; the pairs' own error is `~eps64 Q_max <= 4 eps64 Q_ik`. With
   `A = N / sqrt(Q_ij Q_ik)`:
       |fl(A_ijk) - A_ijk| <~ 8 u + 4 sqrt(D) eps64 sqrt(Q_ik / Q_ij)
   uniformly: near-duplicate pairs, tight clusters, common offsets, any scale within float32's range.
3. The gradient by direct differences too: `dL/dx_m = sum_k W_mk (x_m - x_k)` (`rkd_weighted_diff_kernel`).
   Every route of the loss to `x` goes through the pairwise differences, and with weights of size `1/gap^2`
   at close rows the matmul form `rowsum(W)_m x_m - (W x)_m` would cancel again.

Angle maths (A symmetric in j, k; `c = clamp(A^s - A^t, -1, 1)`, `w_ijk = c_ijk r_ij r_ik = dL/dN_ijk`):
    A_ijk = N_ijk r_ij r_ik    (r = 0 where Q = 0: F.normalize's zero vector at i = j and exact duplicates)
    L     = sum_{i, j != k} h(A^s_ijk - A^t_ijk)   (Huber h, beta 1; the j = k triples, where A = 1 on
            distinct rows, are added by the caller: `fastkd.rkd_autograd.angle_diagonal`)
    S_ij  = sum_k w_ijk,   T_ij = sum_k c_ijk A^s_ijk,   U_jk = sum_i w_ijk                  (k != j)
    E_ij  = dL/dQ_ij through r = -r_ij^2 T_ij (0 where sqrt(Q_ij) <= 1e-12, the clamp)
    dL/dx_m = sum_k W_mk (x_m - x_k),  W = 2 (E + E^T) - V,  V = 2 U - 2 (S + S^T)   (the N route, derived
              beside `fastkd.rkd_autograd`)
At D = 1 every angle is exactly +-1 (`UNIT`: the sign of N) and the gradient is exactly 0.

Cost per triple, both sides, in float32 operations: the forward ~23 (two numerators of 9, the Huber term),
visiting k > j only since the sum is symmetric in j, k; the row kernel ~26 over all k; the column kernel
~23 over half the tiles (U is symmetric). That is ~(23 + 2 * 26 + 23) / 2 = 49 per triple, against ~50 for
the previous all-float32 Gram design, which visited every triple in all three kernels. Per k step a tile
loads 4 rows per side (Qh, Ql at i and at j), amortised over BLOCK^2 triples: the kernels are bound by the
float32 pipe (B = 4096: ~1.7e12 operations, forward + backward). Outside the B^3 work: the float64
distances (`3 B^2 D` float64 operations: ~3 ms at B = 4096, D = 2048 on an H100's 34 TFLOP/s, but 1/64 of
the float32 rate on consumer GPUs) and `2 B^2 D` float32 for the gradient's direct differences. Memory above
the inputs: O(B^2 + B D) (Qh, Ql per side, float64 Q transiently, S, E, U in backward); the reference
builds `(B, B, D)` differences and `B^3` angles. Offsets are int32: B up to 46340.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


def _block(B: int) -> int:
    """The side of the angle kernels' (and distances') tiles. 32 with 4 warps: compiled for sm_80/sm_90 they
    use 113-167 registers and spill nothing; 64 spills even with 8 warps (the row kernel holds 8 tiles)."""
    return max(16, min(32, triton.next_power_of_2(B)))


@triton.jit
def _inv_norm(d2):
    """1 / max(sqrt(d2), 1e-12); 0 where d2 <= 0 (a zero difference vector, as for i = j)."""
    n = tl.sqrt(tl.maximum(d2, 0.0))
    return tl.where(d2 > 0.0, 1.0 / tl.maximum(n, 1e-12), 0.0)


@triton.jit
def _huber(d):
    ad = tl.abs(d)
    return tl.where(ad < 1.0, 0.5 * d * d, ad - 0.5)


@triton.jit
def _angle(qh_jk, ql_jk, qh_ij, ql_ij, qh_ik, ql_ik, half_r_ij, r_ik, UNIT: tl.constexpr):
    """A_ijk from the hi/lo distance pairs, the larger of Q_ij, Q_ik differenced first (module doc, step 2)."""
    hi = (tl.maximum(qh_ij, qh_ik) - qh_jk) + tl.minimum(qh_ij, qh_ik)
    n2 = hi + ((ql_ij + ql_ik) - ql_jk)
    if UNIT:
        live = (half_r_ij > 0.0) & (r_ik > 0.0)
        return tl.where(live & (n2 > 0.0), 1.0, tl.where(live & (n2 < 0.0), -1.0, 0.0))
    return n2 * half_r_ij * r_ik


@triton.jit
def rkd_sq_dist_kernel(x_ptr, out_ptr, B, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Q_ij = sum_d (x_id - x_jd)^2 from row-major `(B, D)` float32 rows, a chunk of D at a time.

    Exactly symmetric with an exactly zero diagonal: (i, j) and (j, i) square the same differences (up to
    sign) and reduce them in the same order.
    """
    offs_i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mi = offs_i < B
    mj = offs_j < B
    acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        md = offs_d < D
        x_i = tl.load(x_ptr + offs_i[:, None] * D + offs_d[None, :], mask=mi[:, None] & md[None, :], other=0.0)
        x_j = tl.load(x_ptr + offs_j[:, None] * D + offs_d[None, :], mask=mj[:, None] & md[None, :], other=0.0)
        diff = x_i[:, None, :] - x_j[None, :, :]
        acc += tl.sum(diff * diff, 2)
    tl.store(out_ptr + offs_i[:, None] * B + offs_j[None, :], acc, mask=mi[:, None] & mj[None, :])


@triton.jit
def rkd_weighted_diff_kernel(w_ptr, x_ptr, out_ptr, B, D, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                             BLOCK_D: tl.constexpr):
    """out_md = sum_k W_mk (x_md - x_kd) with the differences formed first, W symmetric `(B, B)`.

    The matmul form `rowsum(W)_m x_m - (W x)_m` would cancel wherever a large weight joins two close rows.
    """
    offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mm = offs_m < B
    md = offs_d < D
    x_m = tl.load(x_ptr + offs_m[:, None] * D + offs_d[None, :], mask=mm[:, None] & md[None, :], other=0.0)
    acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    for k0 in range(0, B, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = offs_k < B
        w = tl.load(w_ptr + offs_m[:, None] * B + offs_k[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
        x_k = tl.load(x_ptr + offs_k[:, None] * D + offs_d[None, :], mask=mk[:, None] & md[None, :], other=0.0)
        acc += tl.sum(w[:, :, None] * (x_m[:, None, :] - x_k[None, :, :]), 1)
    tl.store(out_ptr + offs_m[:, None] * D + offs_d[None, :], acc, mask=mm[:, None] & md[None, :])


@triton.jit
def rkd_angle_forward_kernel(qhs_ptr, qls_ptr, qht_ptr, qlt_ptr, out_ptr, B, n_blocks, BLOCK: tl.constexpr,
                             UNIT_S: tl.constexpr, UNIT_T: tl.constexpr):
    """Tile (i, j), loop over k > j (the sum is symmetric in j, k; the caller doubles it): one partial sum
    of Huber terms per tile in out[pid]. Row k of a symmetric matrix stands for its column k."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_i = pid_i * BLOCK + tl.arange(0, BLOCK)
    offs_j = pid_j * BLOCK + tl.arange(0, BLOCK)
    mi = offs_i < B
    mj = offs_j < B
    tile = offs_i[:, None] * B + offs_j[None, :]
    mt = mi[:, None] & mj[None, :]
    # Lanes past B contribute nothing: their r is 0 (loaded Q = 0), so their A is 0 on both sides.
    sh_ij = tl.load(qhs_ptr + tile, mask=mt, other=0.0)
    sl_ij = tl.load(qls_ptr + tile, mask=mt, other=0.0)
    th_ij = tl.load(qht_ptr + tile, mask=mt, other=0.0)
    tl_ij = tl.load(qlt_ptr + tile, mask=mt, other=0.0)
    s_half_r_ij = 0.5 * _inv_norm(sh_ij)
    t_half_r_ij = 0.5 * _inv_norm(th_ij)
    acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    for k in range(pid_j * BLOCK, B):
        row_i = k * B + offs_i
        row_j = k * B + offs_j
        sh_ik = tl.load(qhs_ptr + row_i, mask=mi, other=0.0)[:, None]
        th_ik = tl.load(qht_ptr + row_i, mask=mi, other=0.0)[:, None]
        a_s = _angle(tl.load(qhs_ptr + row_j, mask=mj, other=0.0)[None, :],
                     tl.load(qls_ptr + row_j, mask=mj, other=0.0)[None, :], sh_ij, sl_ij,
                     sh_ik, tl.load(qls_ptr + row_i, mask=mi, other=0.0)[:, None], s_half_r_ij, _inv_norm(sh_ik),
                     UNIT_S)
        a_t = _angle(tl.load(qht_ptr + row_j, mask=mj, other=0.0)[None, :],
                     tl.load(qlt_ptr + row_j, mask=mj, other=0.0)[None, :], th_ij, tl_ij,
                     th_ik, tl.load(qlt_ptr + row_i, mask=mi, other=0.0)[:, None], t_half_r_ij, _inv_norm(th_ik),
                     UNIT_T)
        acc += tl.where((offs_j < k)[None, :], _huber(a_s - a_t), 0.0)
    tl.store(out_ptr + pid_i * n_blocks + pid_j, tl.sum(tl.sum(acc, 1), 0))


@triton.jit
def rkd_angle_rows_kernel(qhs_ptr, qls_ptr, qht_ptr, qlt_ptr, s_ptr, e_ptr, B, BLOCK: tl.constexpr,
                          UNIT_T: tl.constexpr):
    """Tile (i, j), loop over k != j: S_ij = r_ij sum_k c r_ik and E_ij = -r_ij^2 sum_k c A^s (module doc)."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_i = pid_i * BLOCK + tl.arange(0, BLOCK)
    offs_j = pid_j * BLOCK + tl.arange(0, BLOCK)
    mi = offs_i < B
    mj = offs_j < B
    tile = offs_i[:, None] * B + offs_j[None, :]
    mt = mi[:, None] & mj[None, :]
    sh_ij = tl.load(qhs_ptr + tile, mask=mt, other=0.0)
    sl_ij = tl.load(qls_ptr + tile, mask=mt, other=0.0)
    th_ij = tl.load(qht_ptr + tile, mask=mt, other=0.0)
    tl_ij = tl.load(qlt_ptr + tile, mask=mt, other=0.0)
    sr_ij = _inv_norm(sh_ij)
    t_half_r_ij = 0.5 * _inv_norm(th_ij)
    acc_s = tl.zeros([BLOCK, BLOCK], tl.float32)
    acc_t = tl.zeros([BLOCK, BLOCK], tl.float32)
    for k in range(0, B):
        row_i = k * B + offs_i
        row_j = k * B + offs_j
        sh_ik = tl.load(qhs_ptr + row_i, mask=mi, other=0.0)[:, None]
        th_ik = tl.load(qht_ptr + row_i, mask=mi, other=0.0)[:, None]
        sr_ik = _inv_norm(sh_ik)
        a_s = _angle(tl.load(qhs_ptr + row_j, mask=mj, other=0.0)[None, :],
                     tl.load(qls_ptr + row_j, mask=mj, other=0.0)[None, :], sh_ij, sl_ij,
                     sh_ik, tl.load(qls_ptr + row_i, mask=mi, other=0.0)[:, None], 0.5 * sr_ij, sr_ik, False)
        a_t = _angle(tl.load(qht_ptr + row_j, mask=mj, other=0.0)[None, :],
                     tl.load(qlt_ptr + row_j, mask=mj, other=0.0)[None, :], th_ij, tl_ij,
                     th_ik, tl.load(qlt_ptr + row_i, mask=mi, other=0.0)[:, None], t_half_r_ij, _inv_norm(th_ik),
                     UNIT_T)
        c = tl.where((offs_j != k)[None, :], tl.minimum(tl.maximum(a_s - a_t, -1.0), 1.0), 0.0)
        acc_s += c * sr_ik
        acc_t += c * a_s
    live = tl.sqrt(tl.maximum(sh_ij, 0.0)) > 1e-12  # beyond F.normalize's clamp: the norm carries gradient
    tl.store(s_ptr + tile, acc_s * sr_ij, mask=mt)
    tl.store(e_ptr + tile, tl.where(live, -(sr_ij * sr_ij) * acc_t, 0.0), mask=mt)


@triton.jit
def rkd_angle_cols_kernel(qhs_ptr, qls_ptr, qht_ptr, qlt_ptr, u_ptr, B, BLOCK: tl.constexpr, UNIT_T: tl.constexpr):
    """Tile (j, k) with k's block >= j's, loop over the apex i: U_jk = sum_i c_ijk r_ij r_ik, stored at
    (j, k) and (k, j) (U is symmetric); 0 on the diagonal j = k."""
    pid_j = tl.program_id(0)
    pid_k = tl.program_id(1)
    if pid_k < pid_j:
        return
    offs_j = pid_j * BLOCK + tl.arange(0, BLOCK)
    offs_k = pid_k * BLOCK + tl.arange(0, BLOCK)
    mj = offs_j < B
    mk = offs_k < B
    tile = offs_j[:, None] * B + offs_k[None, :]
    mt = mj[:, None] & mk[None, :]
    sh_jk = tl.load(qhs_ptr + tile, mask=mt, other=0.0)
    sl_jk = tl.load(qls_ptr + tile, mask=mt, other=0.0)
    th_jk = tl.load(qht_ptr + tile, mask=mt, other=0.0)
    tl_jk = tl.load(qlt_ptr + tile, mask=mt, other=0.0)
    acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    for i in range(0, B):
        row_j = i * B + offs_j
        row_k = i * B + offs_k
        sh_ij = tl.load(qhs_ptr + row_j, mask=mj, other=0.0)[:, None]
        sh_ik = tl.load(qhs_ptr + row_k, mask=mk, other=0.0)[None, :]
        th_ij = tl.load(qht_ptr + row_j, mask=mj, other=0.0)[:, None]
        th_ik = tl.load(qht_ptr + row_k, mask=mk, other=0.0)[None, :]
        sr_ij = _inv_norm(sh_ij)
        sr_ik = _inv_norm(sh_ik)
        a_s = _angle(sh_jk, sl_jk, sh_ij, tl.load(qls_ptr + row_j, mask=mj, other=0.0)[:, None],
                     sh_ik, tl.load(qls_ptr + row_k, mask=mk, other=0.0)[None, :], 0.5 * sr_ij, sr_ik, False)
        a_t = _angle(th_jk, tl_jk, th_ij, tl.load(qlt_ptr + row_j, mask=mj, other=0.0)[:, None],
                     th_ik, tl.load(qlt_ptr + row_k, mask=mk, other=0.0)[None, :], 0.5 * _inv_norm(th_ij),
                     _inv_norm(th_ik), UNIT_T)
        c = tl.minimum(tl.maximum(a_s - a_t, -1.0), 1.0)
        acc += c * (sr_ij * sr_ik)
    acc = tl.where(offs_j[:, None] == offs_k[None, :], 0.0, acc)
    tl.store(u_ptr + tile, acc, mask=mt)
    tl.store(u_ptr + offs_k[None, :] * B + offs_j[:, None], acc, mask=mt)


# --- launchers ---------------------------------------------------------------------------------------------

def rkd_sq_distances(x: Tensor) -> Tensor:
    """`Q_ij = |x_i - x_j|^2`, `B x B` float32, from float32 `(B, D)` rows, computed directly."""
    x = x.contiguous()
    B, D = x.shape
    block = _block(B)
    n = triton.cdiv(B, block)
    out = torch.empty(B, B, dtype=torch.float32, device=x.device)
    rkd_sq_dist_kernel[(n, n)](x, out, B, D, BLOCK=block, BLOCK_D=8, num_warps=4)
    return out


def rkd_weighted_diff(w: Tensor, x: Tensor) -> Tensor:
    """`out_m = sum_k w_mk (x_m - x_k)`, `(B, D)` float32, for a symmetric float32 `w`."""
    w, x = w.contiguous(), x.contiguous()
    B, D = x.shape
    block_d = max(16, min(64, triton.next_power_of_2(D)))
    out = torch.empty(B, D, dtype=torch.float32, device=x.device)
    rkd_weighted_diff_kernel[(triton.cdiv(B, 16), triton.cdiv(D, block_d))](w, x, out, B, D, BLOCK=16, BLOCK_K=8,
                                                                             BLOCK_D=block_d, num_warps=4)
    return out


def rkd_angle_sum(qh_s: Tensor, ql_s: Tensor, qh_t: Tensor, ql_t: Tensor, unit_s: bool, unit_t: bool) -> Tensor:
    """`sum_{i, j != k} Huber(A^s_ijk - A^t_ijk)` (0-d float32) from each side's float32 pairs of squared
    distances (symmetric, contiguous)."""
    B = qh_s.shape[0]
    block = _block(B)
    n = triton.cdiv(B, block)
    partial = torch.empty(n * n, dtype=torch.float32, device=qh_s.device)
    rkd_angle_forward_kernel[(n, n)](qh_s, ql_s, qh_t, ql_t, partial, B, n, BLOCK=block, UNIT_S=unit_s,
                                     UNIT_T=unit_t, num_warps=4)
    return 2.0 * partial.sum()


def rkd_angle_weights(qh_s: Tensor, ql_s: Tensor, qh_t: Tensor, ql_t: Tensor, unit_t: bool) -> Tensor:
    """`W` of the module doc, `(B, B)` float32: `dL/dx_s = rkd_weighted_diff(W, x_s)` for the sum's gradient."""
    B = qh_s.shape[0]
    block = _block(B)
    n = triton.cdiv(B, block)
    s = torch.empty_like(qh_s)
    e = torch.empty_like(qh_s)
    u = torch.empty_like(qh_s)
    rkd_angle_rows_kernel[(n, n)](qh_s, ql_s, qh_t, ql_t, s, e, B, BLOCK=block, UNIT_T=unit_t, num_warps=4)
    rkd_angle_cols_kernel[(n, n)](qh_s, ql_s, qh_t, ql_t, u, B, BLOCK=block, UNIT_T=unit_t, num_warps=4)
    w = e + e.T  # 2 ((E + E^T) + (S + S^T) - U), in place: B^2 buffers are what bound the memory at large B
    w += s
    w += s.T
    w -= u
    return w.mul_(2.0)
