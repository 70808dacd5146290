"""RKD (relational KD, Park et al. 2019) kernels: direct squared distances, their gradient by direct
differences, and the angle term's Huber sum over all `B^3` triples with its gradient.

Why this design: accuracy on the batches training produces. Two augmentations of one image, or features
collapsing into tight clusters, give rows a relative gap of 1e-2 to 1e-5 apart. Eager float32 (the
reference) forms `x_j - x_i` directly, which is exact for close rows (Sterbenz), so its angles stay
accurate to a few ulp. A float32 Gram form `G_jk - G_ij - G_ik + G_ii` cancels there: each `G` carries an
error of `eps |x|^2`, the numerator is `~ |x_j - x_i| |x|`, so the angle error grows like
`eps |x| / gap` and its gradient like `eps |x| / gap^2` (60% at gap 1e-4). Forming `B^2` difference vectors
is what this kernel avoids (`B^3 D` work, `B^2 D` memory), so it keeps the Gram form and removes each
source of cancellation:

1. Squared distances `Q_ij = sum_d (x_di - x_dj)^2` directly, from the *uncentred* rows: every difference is
   exact or correctly rounded, so `Q` and `r_ij = 1 / max(sqrt(Q_ij), 1e-12)` are accurate to a few ulp
   relative, however close the rows (`rkd_sq_dist_kernel`).
2. The Gram matrix exact to float32^2: `G = Xc Xc^T` of the rows centred in float64, by one float64 product
   (`B^2 D` multiply-adds, on tensor cores on A100/H100; see the cost note below), stored as float32 pairs
   `G = Gh + Gl` (`Gh` = G rounded to float32, `Gl` = the remainder), so `|G - Gh - Gl| <~ eps64 D |x|^2`.
3. The numerator from the pairs, in the order that cannot cancel:
       N_ijk = (Gh_jk - Gh_ik) + (Gh_ii - Gh_ij) + lo      if Q_ik >= Q_ij   (x_j the nearer to x_i)
             = (Gh_jk - Gh_ij) + (Gh_ii - Gh_ik) + lo      otherwise
       lo    = (Gl_jk - Gl_ik) + (Gl_ii - Gl_ij)
   With `x_j` the nearer row, `Gh_jk - Gh_ik = x_k.(x_j - x_i) + O(eps^2 |x|^2)` and
   `Gh_ii - Gh_ij = x_i.(x_i - x_j) + ...` are each either exact (their operands lie within a factor 2 of
   each other whenever `|x_k|` or `|x_i|` is large against `|x_k - x_i|`: Sterbenz) or off by at most
   `eps |x_k| |x_j - x_i| <= 2 eps |x_j - x_i| |x_k - x_i|`. Their sum is then rounded once, relative to `N`.
   Error bound, with `u = 2^-24` and `R` the largest centred row norm:
       |A_ijk - fl(A_ijk)| <~ 8 u + c D eps64 R^2 / (|x_j - x_i| |x_k - x_i|)
   i.e. float32 accuracy (as eager) unless all three rows sit within ~1e-6 R of each other.
4. The gradient by direct differences too: `dL/dx_m = sum_k W_mk (x_m - x_k)` (`rkd_weighted_diff_kernel`).
   Through `Q`: `W = 2 (dQ + dQ^T)`. Through `G`: the angle depends on `G` only through `N`, which is
   translation invariant, so `(dG + dG^T)` has zero row sums and `(dG + dG^T) Xc = -weighted_diff(dG + dG^T)`
   exactly; with weights of size `1/gap^2` at close rows, the matmul form `W Xc` would cancel again.

Angle maths (A symmetric in j, k; `c = clamp(A^s - A^t, -1, 1)`, `w_ijk = c_ijk r_ij r_ik`):
    A_ijk = N_ijk r_ij r_ik    (r = 0 where Q = 0: F.normalize's zero vector at i = j and exact duplicates)
    L     = sum_{i, j != k} h(A^s_ijk - A^t_ijk)   (Huber h, beta 1; the j = k triples, A = 1, are added by
            the caller from Q alone, `fastkd.kernel_autograd.angle_diagonal`)
    S_ij  = sum_k w_ijk,   T_ij = sum_k c_ijk A^s_ijk,   U_jk = sum_i w_ijk                   (k != j)
    dL/dQ_ij = -r_ij^2 T_ij (0 where sqrt(Q_ij) <= 1e-12, the clamp), symmetrised over (i, j) and (j, i)
    dL/dx_m  = sum_k V_mk (x_k - x_m),  V = 2 U - 2 (S + S^T)    (the G route, derived beside
               `fastkd.kernel_autograd.AngleSum`)
At D = 1 every angle is exactly +-1 (`UNIT`: the sign of N) and the gradient is exactly 0.

Cost against the previous all-float32 Gram design (per triple, both sides): the forward loops over `k > j`
only (the sum is symmetric in j, k: half the triples) at ~25 float32 operations instead of ~17 for all;
the row kernel does ~28 instead of ~17 for all triples; the column kernel half the tiles (U is symmetric)
at ~27. All together ~55 against ~50 operations per triple, forward + backward, plus per-k loads of 5 rows
per side instead of 3 (amortised over a BLOCK^2 tile: the kernels are bound by the FP32 pipe, ~B^3 * 55 / 2
flop/s-limited; a B = 4096 step is ~1.9e12 operations). Above the Gram: the float64 product (`B^2 D`
multiply-adds; 67 TFLOP/s on H100 tensor cores, but 1/64 of the float32 rate on consumer GPUs, where it can
cost as much as the angle kernels at small B) and two `B^2 D` direct-difference kernels (distances,
gradient: `2 B^2 D` float32 operations each). Memory above the inputs: O(B^2 + B D) (Q, Gh, Gl per side,
S, E, U in backward); the reference builds `(B, B, D)` differences and `B^3` angles. Offsets are int32:
B up to 46340.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


def _block(B: int) -> int:
    return max(16, min(64, triton.next_power_of_2(B)))


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
def _angle(gh_jk, gl_jk, gh_ij, gl_ij, gh_ik, gl_ik, gh_ii, gl_ii, q_ij, q_ik, r_ij, r_ik, UNIT: tl.constexpr):
    """A_ijk from the hi/lo Gram pairs, differenced in the order that cannot cancel (module doc, step 3)."""
    p1 = (gh_jk - gh_ik) + (gh_ii - gh_ij)
    p2 = (gh_jk - gh_ij) + (gh_ii - gh_ik)
    lo = (gl_jk - gl_ik) + (gl_ii - gl_ij)
    n = tl.where(q_ik >= q_ij, p1, p2) + lo
    if UNIT:
        live = (r_ij > 0.0) & (r_ik > 0.0)
        return tl.where(live & (n > 0.0), 1.0, tl.where(live & (n < 0.0), -1.0, 0.0))
    return n * r_ij * r_ik


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
def rkd_angle_forward_kernel(ghs_ptr, gls_ptr, qs_ptr, ght_ptr, glt_ptr, qt_ptr, out_ptr, B, n_blocks,
                             BLOCK: tl.constexpr, UNIT_S: tl.constexpr, UNIT_T: tl.constexpr):
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
    diag = offs_i * (B + 1)
    # Lanes past B contribute nothing: their r is 0 (loaded Q = 0), so their A is 0 on both sides.
    sh_ij = tl.load(ghs_ptr + tile, mask=mt, other=0.0)
    sl_ij = tl.load(gls_ptr + tile, mask=mt, other=0.0)
    sq_ij = tl.load(qs_ptr + tile, mask=mt, other=0.0)
    th_ij = tl.load(ght_ptr + tile, mask=mt, other=0.0)
    tl_ij = tl.load(glt_ptr + tile, mask=mt, other=0.0)
    tq_ij = tl.load(qt_ptr + tile, mask=mt, other=0.0)
    sh_ii = tl.load(ghs_ptr + diag, mask=mi, other=0.0)[:, None]
    sl_ii = tl.load(gls_ptr + diag, mask=mi, other=0.0)[:, None]
    th_ii = tl.load(ght_ptr + diag, mask=mi, other=0.0)[:, None]
    tl_ii = tl.load(glt_ptr + diag, mask=mi, other=0.0)[:, None]
    sr_ij = _inv_norm(sq_ij)
    tr_ij = _inv_norm(tq_ij)
    acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    for k in range(pid_j * BLOCK, B):
        row_i = k * B + offs_i
        row_j = k * B + offs_j
        sq_ik = tl.load(qs_ptr + row_i, mask=mi, other=0.0)[:, None]
        tq_ik = tl.load(qt_ptr + row_i, mask=mi, other=0.0)[:, None]
        a_s = _angle(tl.load(ghs_ptr + row_j, mask=mj, other=0.0)[None, :],
                     tl.load(gls_ptr + row_j, mask=mj, other=0.0)[None, :], sh_ij, sl_ij,
                     tl.load(ghs_ptr + row_i, mask=mi, other=0.0)[:, None],
                     tl.load(gls_ptr + row_i, mask=mi, other=0.0)[:, None], sh_ii, sl_ii,
                     sq_ij, sq_ik, sr_ij, _inv_norm(sq_ik), UNIT_S)
        a_t = _angle(tl.load(ght_ptr + row_j, mask=mj, other=0.0)[None, :],
                     tl.load(glt_ptr + row_j, mask=mj, other=0.0)[None, :], th_ij, tl_ij,
                     tl.load(ght_ptr + row_i, mask=mi, other=0.0)[:, None],
                     tl.load(glt_ptr + row_i, mask=mi, other=0.0)[:, None], th_ii, tl_ii,
                     tq_ij, tq_ik, tr_ij, _inv_norm(tq_ik), UNIT_T)
        acc += tl.where((offs_j < k)[None, :], _huber(a_s - a_t), 0.0)
    tl.store(out_ptr + pid_i * n_blocks + pid_j, tl.sum(tl.sum(acc, 1), 0))


@triton.jit
def rkd_angle_rows_kernel(ghs_ptr, gls_ptr, qs_ptr, ght_ptr, glt_ptr, qt_ptr, s_ptr, e_ptr, B,
                          BLOCK: tl.constexpr, UNIT_T: tl.constexpr):
    """Tile (i, j), loop over k != j: S_ij = r_ij sum_k c r_ik and E_ij = -r_ij^2 sum_k c A^s (module doc)."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_i = pid_i * BLOCK + tl.arange(0, BLOCK)
    offs_j = pid_j * BLOCK + tl.arange(0, BLOCK)
    mi = offs_i < B
    mj = offs_j < B
    tile = offs_i[:, None] * B + offs_j[None, :]
    mt = mi[:, None] & mj[None, :]
    diag = offs_i * (B + 1)
    sh_ij = tl.load(ghs_ptr + tile, mask=mt, other=0.0)
    sl_ij = tl.load(gls_ptr + tile, mask=mt, other=0.0)
    sq_ij = tl.load(qs_ptr + tile, mask=mt, other=0.0)
    th_ij = tl.load(ght_ptr + tile, mask=mt, other=0.0)
    tl_ij = tl.load(glt_ptr + tile, mask=mt, other=0.0)
    tq_ij = tl.load(qt_ptr + tile, mask=mt, other=0.0)
    sh_ii = tl.load(ghs_ptr + diag, mask=mi, other=0.0)[:, None]
    sl_ii = tl.load(gls_ptr + diag, mask=mi, other=0.0)[:, None]
    th_ii = tl.load(ght_ptr + diag, mask=mi, other=0.0)[:, None]
    tl_ii = tl.load(glt_ptr + diag, mask=mi, other=0.0)[:, None]
    sr_ij = _inv_norm(sq_ij)
    tr_ij = _inv_norm(tq_ij)
    acc_s = tl.zeros([BLOCK, BLOCK], tl.float32)
    acc_t = tl.zeros([BLOCK, BLOCK], tl.float32)
    for k in range(0, B):
        row_i = k * B + offs_i
        row_j = k * B + offs_j
        sq_ik = tl.load(qs_ptr + row_i, mask=mi, other=0.0)[:, None]
        tq_ik = tl.load(qt_ptr + row_i, mask=mi, other=0.0)[:, None]
        sr_ik = _inv_norm(sq_ik)
        a_s = _angle(tl.load(ghs_ptr + row_j, mask=mj, other=0.0)[None, :],
                     tl.load(gls_ptr + row_j, mask=mj, other=0.0)[None, :], sh_ij, sl_ij,
                     tl.load(ghs_ptr + row_i, mask=mi, other=0.0)[:, None],
                     tl.load(gls_ptr + row_i, mask=mi, other=0.0)[:, None], sh_ii, sl_ii,
                     sq_ij, sq_ik, sr_ij, sr_ik, False)
        a_t = _angle(tl.load(ght_ptr + row_j, mask=mj, other=0.0)[None, :],
                     tl.load(glt_ptr + row_j, mask=mj, other=0.0)[None, :], th_ij, tl_ij,
                     tl.load(ght_ptr + row_i, mask=mi, other=0.0)[:, None],
                     tl.load(glt_ptr + row_i, mask=mi, other=0.0)[:, None], th_ii, tl_ii,
                     tq_ij, tq_ik, tr_ij, _inv_norm(tq_ik), UNIT_T)
        c = tl.where((offs_j != k)[None, :], tl.minimum(tl.maximum(a_s - a_t, -1.0), 1.0), 0.0)
        acc_s += c * sr_ik
        acc_t += c * a_s
    live = tl.sqrt(tl.maximum(sq_ij, 0.0)) > 1e-12  # beyond F.normalize's clamp: the norm carries gradient
    tl.store(s_ptr + tile, acc_s * sr_ij, mask=mt)
    tl.store(e_ptr + tile, tl.where(live, -(sr_ij * sr_ij) * acc_t, 0.0), mask=mt)


@triton.jit
def rkd_angle_cols_kernel(ghs_ptr, gls_ptr, qs_ptr, ght_ptr, glt_ptr, qt_ptr, u_ptr, B, BLOCK: tl.constexpr,
                          UNIT_T: tl.constexpr):
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
    sh_jk = tl.load(ghs_ptr + tile, mask=mt, other=0.0)
    sl_jk = tl.load(gls_ptr + tile, mask=mt, other=0.0)
    th_jk = tl.load(ght_ptr + tile, mask=mt, other=0.0)
    tl_jk = tl.load(glt_ptr + tile, mask=mt, other=0.0)
    acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    for i in range(0, B):
        row_j = i * B + offs_j
        row_k = i * B + offs_k
        sq_ij = tl.load(qs_ptr + row_j, mask=mj, other=0.0)[:, None]
        sq_ik = tl.load(qs_ptr + row_k, mask=mk, other=0.0)[None, :]
        tq_ij = tl.load(qt_ptr + row_j, mask=mj, other=0.0)[:, None]
        tq_ik = tl.load(qt_ptr + row_k, mask=mk, other=0.0)[None, :]
        sr_ij = _inv_norm(sq_ij)
        sr_ik = _inv_norm(sq_ik)
        a_s = _angle(sh_jk, sl_jk, tl.load(ghs_ptr + row_j, mask=mj, other=0.0)[:, None],
                     tl.load(gls_ptr + row_j, mask=mj, other=0.0)[:, None],
                     tl.load(ghs_ptr + row_k, mask=mk, other=0.0)[None, :],
                     tl.load(gls_ptr + row_k, mask=mk, other=0.0)[None, :],
                     tl.load(ghs_ptr + i * (B + 1)), tl.load(gls_ptr + i * (B + 1)),
                     sq_ij, sq_ik, sr_ij, sr_ik, False)
        a_t = _angle(th_jk, tl_jk, tl.load(ght_ptr + row_j, mask=mj, other=0.0)[:, None],
                     tl.load(glt_ptr + row_j, mask=mj, other=0.0)[:, None],
                     tl.load(ght_ptr + row_k, mask=mk, other=0.0)[None, :],
                     tl.load(glt_ptr + row_k, mask=mk, other=0.0)[None, :],
                     tl.load(ght_ptr + i * (B + 1)), tl.load(glt_ptr + i * (B + 1)),
                     tq_ij, tq_ik, _inv_norm(tq_ij), _inv_norm(tq_ik), UNIT_T)
        c = tl.minimum(tl.maximum(a_s - a_t, -1.0), 1.0)
        acc += c * (sr_ij * sr_ik)
    acc = tl.where(offs_j[:, None] == offs_k[None, :], 0.0, acc)
    tl.store(u_ptr + tile, acc, mask=mt)
    tl.store(u_ptr + offs_k[None, :] * B + offs_j[:, None], acc, mask=mt)


# --- launchers ---------------------------------------------------------------------------------------------

def sq_distances(x: Tensor) -> Tensor:
    """`Q_ij = |x_i - x_j|^2`, `B x B` float32, from float32 `(B, D)` rows, computed directly."""
    x = x.contiguous()
    B, D = x.shape
    block = min(_block(B), 32)
    n = triton.cdiv(B, block)
    out = torch.empty(B, B, dtype=torch.float32, device=x.device)
    rkd_sq_dist_kernel[(n, n)](x, out, B, D, BLOCK=block, BLOCK_D=8, num_warps=4)
    return out


def weighted_diff(w: Tensor, x: Tensor) -> Tensor:
    """`out_m = sum_k w_mk (x_m - x_k)`, `(B, D)` float32, for a symmetric float32 `w`."""
    w, x = w.contiguous(), x.contiguous()
    B, D = x.shape
    block_d = max(16, min(64, triton.next_power_of_2(D)))
    out = torch.empty(B, D, dtype=torch.float32, device=x.device)
    rkd_weighted_diff_kernel[(triton.cdiv(B, 16), triton.cdiv(D, block_d))](w, x, out, B, D, BLOCK=16, BLOCK_K=8,
                                                                             BLOCK_D=block_d, num_warps=4)
    return out


def angle_sum(gh_s: Tensor, gl_s: Tensor, q_s: Tensor, gh_t: Tensor, gl_t: Tensor, q_t: Tensor,
              unit_s: bool, unit_t: bool) -> Tensor:
    """`sum_{i, j != k} Huber(A^s_ijk - A^t_ijk)` (0-d float32) from each side's Gram pair and distances."""
    B = q_s.shape[0]
    block = _block(B)
    n = triton.cdiv(B, block)
    partial = torch.empty(n * n, dtype=torch.float32, device=q_s.device)
    rkd_angle_forward_kernel[(n, n)](gh_s, gl_s, q_s, gh_t, gl_t, q_t, partial, B, n, BLOCK=block, UNIT_S=unit_s, UNIT_T=unit_t,
                                     num_warps=4)
    return 2.0 * partial.sum()


def angle_grads(gh_s: Tensor, gl_s: Tensor, q_s: Tensor, gh_t: Tensor, gl_t: Tensor, q_t: Tensor,
                unit_t: bool) -> tuple[Tensor, Tensor]:
    """`(V, E)` of the module doc: the G-route weights `2 U - 2 (S + S^T)` and `dL/dQ` before symmetrising."""
    B = q_s.shape[0]
    block = _block(B)
    n = triton.cdiv(B, block)
    s = torch.empty_like(q_s)
    e = torch.empty_like(q_s)
    u = torch.empty_like(q_s)
    rkd_angle_rows_kernel[(n, n)](gh_s, gl_s, q_s, gh_t, gl_t, q_t, s, e, B, BLOCK=block, UNIT_T=unit_t, num_warps=4)
    rkd_angle_cols_kernel[(n, n)](gh_s, gl_s, q_s, gh_t, gl_t, q_t, u, B, BLOCK=block, UNIT_T=unit_t, num_warps=4)
    return 2.0 * (u - s - s.T), e


# --- the operators (no autograd of their own: fastkd.kernel_autograd composes them) --------------------------

@torch.library.custom_op("fastkd::rkd_sq_distances", mutates_args=())
def sq_distances_op(x: Tensor) -> Tensor:
    return sq_distances(x)


@sq_distances_op.register_fake
def _(x):
    return x.new_empty((x.shape[0], x.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fastkd::rkd_weighted_diff", mutates_args=())
def weighted_diff_op(w: Tensor, x: Tensor) -> Tensor:
    return weighted_diff(w, x)


@weighted_diff_op.register_fake
def _(w, x):
    return torch.empty_like(x, dtype=torch.float32)


@torch.library.custom_op("fastkd::rkd_angle_sum", mutates_args=())
def angle_sum_op(gh_s: Tensor, gl_s: Tensor, q_s: Tensor, gh_t: Tensor, gl_t: Tensor, q_t: Tensor,
                 unit_s: bool, unit_t: bool) -> Tensor:
    return angle_sum(gh_s, gl_s, q_s, gh_t, gl_t, q_t, unit_s, unit_t)


@angle_sum_op.register_fake
def _(gh_s, gl_s, q_s, gh_t, gl_t, q_t, unit_s, unit_t):
    return q_s.new_empty(())


@torch.library.custom_op("fastkd::rkd_angle_grads", mutates_args=())
def angle_grads_op(gh_s: Tensor, gl_s: Tensor, q_s: Tensor, gh_t: Tensor, gl_t: Tensor, q_t: Tensor,
                   unit_t: bool) -> tuple[Tensor, Tensor]:
    return angle_grads(gh_s, gl_s, q_s, gh_t, gl_t, q_t, unit_t)


@angle_grads_op.register_fake
def _(gh_s, gl_s, q_s, gh_t, gl_t, q_t, unit_t):
    return torch.empty_like(q_s), torch.empty_like(q_s)
