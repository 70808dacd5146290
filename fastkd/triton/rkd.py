"""RKD (relational KD, Park et al. 2019) from `B x B` matrices: distance and angle losses.

Maths. Inputs are flattened to `(B, D)` in float32 (bf16/fp16 upcast, as the reference does) and centred:
`Xc = X - mean_batch(X)`. Distances and angles are translation invariant, so the centring changes nothing
in exact arithmetic; it keeps `|x_i|^2 + |x_j|^2 - 2 x_i.x_j` and `G_jk - G_ij - G_ik + G_ii` from cancelling
catastrophically when the batch sits far from the origin (a common offset). `G = Xc Xc^T` by `torch.mm`,
which follows PyTorch's TF32 flags on CUDA exactly as the reference's `x @ x.T` does, then
`G <- (G + G^T) / 2` so the kernels may read rows only.
Distance term (as the reference, which also uses the Gram form): `d2_ij = G_ii + G_jj - 2 G_ij`, then the
reference's clamp(eps)-then-sqrt, zero diagonal, mean-of-positive normaliser (carrying gradient) and Huber,
as plain PyTorch on `B x B` tensors, with autograd through them and through the Gram product.
Angle term, with `Q_ij = |x_i - x_j|^2` computed directly by a Triton kernel (`sum_d (x_di - x_dj)^2`:
exact zeros on the diagonal and no Gram cancellation; the Gram form lost ~1e-3 relative accuracy on the
gradient of rows 1e-2 apart):
    N_ijk = G_jk - G_ij - G_ik + G_ii                    (= (x_j - x_i).(x_k - x_i))
    r_ij  = 1 / max(sqrt(Q_ij), 1e-12), and 0 where Q_ij = 0 (i = j, exact duplicates: F.normalize's zero
            vector, so A = 0 as in the reference)
    A_ijk = N_ijk r_ij r_ik                              (= e_ij . e_ik of F.normalize)
    L     = sum_ijk h(A^s_ijk - A^t_ijk) / B^3           (Huber h, beta 1)
The `B^3` triples are produced and consumed on chip: each program holds a tile of two indices and loops over
the third, loading one row of G and of Q per step; the forward writes one partial sum per tile.
Backward, with `c_ijk = clamp(A^s - A^t, -1, 1)` and `P_ijk = c_ijk r_ij r_ik` (A symmetric in j, k):
    U_jk  = sum_i P_ijk                                  (kernel: tile (j, k), loop over i)
    S_ij  = sum_k P_ijk,  T_ij = sum_k c_ijk A^s_ijk     (kernel: tile (i, j), loop over k)
    dL/dG = (U - 2 S + diag(rowsum S)) / B^3
    dL/dQ_ij = -r_ij^2 T_ij / B^3 where sqrt(Q_ij) > 1e-12 (else 0: the clamp of F.normalize)
and `dL/dX` by matmuls: through `G = Xc Xc^T` ((dG + dG^T) Xc, autograd) and through Q
(`2 (diag(rowsum W) - W) Xc` with `W = dQ + dQ^T`), then the centring. The teacher is detached.

Memory above the inputs: O(B^2 + B D) (G and Q per side, a few `B x B` buffers in backward, Xc and a
transposed copy for the distance kernel); the reference builds `(B, B, D)` differences and `B^3` angles.
Offsets are int32: B up to 46340 (B^2 < 2^31).

Known differences from the reference: the angle gradient of exact duplicate rows is 0 here and scaled by
1/1e-12 there (F.normalize's clamp on a zero vector: meaningless either way); where the exact gradient is 0
by cancellation (D = 1, B = 2) the Gram form leaves float32 rounding noise, growing like 1/gap^2 for close rows.
"""
from __future__ import annotations

from functools import partial

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import kernel_autograd as AG


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
def rkd_sq_dist_kernel(xt_ptr, out_ptr, B, D, BLOCK: tl.constexpr):
    """d2_ij = sum_d (x_di - x_dj)^2 directly (no Gram cancellation), x given transposed `(D, B)`.

    Exactly symmetric with an exactly zero diagonal: both orders compute the same squares in the same order.
    """
    offs_i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mi = offs_i < B
    mj = offs_j < B
    acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    for d in range(0, D):
        x_i = tl.load(xt_ptr + d * B + offs_i, mask=mi, other=0.0)
        x_j = tl.load(xt_ptr + d * B + offs_j, mask=mj, other=0.0)
        diff = x_i[:, None] - x_j[None, :]
        acc += diff * diff
    tl.store(out_ptr + offs_i[:, None] * B + offs_j[None, :], acc, mask=mi[:, None] & mj[None, :])


@triton.jit
def _angle_tile(g_ptr, q_ptr, g_ij, r_ij, g_i, offs_i, offs_j, mi, mj, k, B):
    """A_ijk over a tile (i, j) for one k: N_ijk r_ij r_ik, with rows of G and D2 loaded at row k."""
    g_ik = tl.load(g_ptr + k * B + offs_i, mask=mi, other=0.0)
    g_jk = tl.load(g_ptr + k * B + offs_j, mask=mj, other=0.0)
    r_ik = _inv_norm(tl.load(q_ptr + k * B + offs_i, mask=mi, other=0.0))
    return (((g_jk[None, :] - g_ij) - g_ik[:, None]) + g_i[:, None]) * r_ij * r_ik[:, None], r_ik


@triton.jit
def rkd_angle_forward_kernel(gs_ptr, qs_ptr, gt_ptr, qt_ptr, out_ptr, B, n_blocks, BLOCK: tl.constexpr):
    """Tile (i, j), loop over k; writes the tile's sum of Huber terms to out[pid]."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_i = pid_i * BLOCK + tl.arange(0, BLOCK)
    offs_j = pid_j * BLOCK + tl.arange(0, BLOCK)
    mi = offs_i < B
    mj = offs_j < B
    tile = offs_i[:, None] * B + offs_j[None, :]
    mt = mi[:, None] & mj[None, :]
    s_ij = tl.load(gs_ptr + tile, mask=mt, other=0.0)
    t_ij = tl.load(gt_ptr + tile, mask=mt, other=0.0)
    s_i = tl.load(gs_ptr + offs_i * (B + 1), mask=mi, other=0.0)
    t_i = tl.load(gt_ptr + offs_i * (B + 1), mask=mi, other=0.0)
    # Lanes past B contribute nothing: their r_ij is 0 (loaded d2 = 0).
    rs_ij = _inv_norm(tl.load(qs_ptr + tile, mask=mt, other=0.0))
    rt_ij = _inv_norm(tl.load(qt_ptr + tile, mask=mt, other=0.0))
    acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    for k in range(0, B):
        a_s, _ = _angle_tile(gs_ptr, qs_ptr, s_ij, rs_ij, s_i, offs_i, offs_j, mi, mj, k, B)
        a_t, _ = _angle_tile(gt_ptr, qt_ptr, t_ij, rt_ij, t_i, offs_i, offs_j, mi, mj, k, B)
        acc += _huber(a_s - a_t)
    tl.store(out_ptr + pid_i * n_blocks + pid_j, tl.sum(tl.sum(acc, 1), 0))


@triton.jit
def rkd_angle_rows_kernel(gs_ptr, qs_ptr, gt_ptr, qt_ptr, s_ptr, e_ptr, B, BLOCK: tl.constexpr):
    """Tile (i, j), loop over k: S_ij = sum_k c r_ij r_ik and E_ij = -r_ij^2 sum_k c A^s (see the module doc)."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_i = pid_i * BLOCK + tl.arange(0, BLOCK)
    offs_j = pid_j * BLOCK + tl.arange(0, BLOCK)
    mi = offs_i < B
    mj = offs_j < B
    tile = offs_i[:, None] * B + offs_j[None, :]
    mt = mi[:, None] & mj[None, :]
    s_ij = tl.load(gs_ptr + tile, mask=mt, other=0.0)
    t_ij = tl.load(gt_ptr + tile, mask=mt, other=0.0)
    s_i = tl.load(gs_ptr + offs_i * (B + 1), mask=mi, other=0.0)
    t_i = tl.load(gt_ptr + offs_i * (B + 1), mask=mi, other=0.0)
    qs_ij = tl.load(qs_ptr + tile, mask=mt, other=0.0)
    rs_ij = _inv_norm(qs_ij)
    rt_ij = _inv_norm(tl.load(qt_ptr + tile, mask=mt, other=0.0))
    acc_s = tl.zeros([BLOCK, BLOCK], tl.float32)
    acc_t = tl.zeros([BLOCK, BLOCK], tl.float32)
    for k in range(0, B):
        a_s, rs_ik = _angle_tile(gs_ptr, qs_ptr, s_ij, rs_ij, s_i, offs_i, offs_j, mi, mj, k, B)
        a_t, _ = _angle_tile(gt_ptr, qt_ptr, t_ij, rt_ij, t_i, offs_i, offs_j, mi, mj, k, B)
        c = tl.minimum(tl.maximum(a_s - a_t, -1.0), 1.0)
        acc_s += c * rs_ik[:, None]
        acc_t += c * a_s
    live = tl.sqrt(tl.maximum(qs_ij, 0.0)) > 1e-12  # beyond F.normalize's clamp: the norm carries gradient
    e = tl.where(live, -(rs_ij * rs_ij) * acc_t, 0.0)
    tl.store(s_ptr + tile, acc_s * rs_ij, mask=mt)
    tl.store(e_ptr + tile, e, mask=mt)


@triton.jit
def rkd_angle_cols_kernel(gs_ptr, qs_ptr, gt_ptr, qt_ptr, u_ptr, B, BLOCK: tl.constexpr):
    """Tile (j, k), loop over the apex i: U_jk = sum_i c_ijk r_ij r_ik."""
    pid_j = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_j = pid_j * BLOCK + tl.arange(0, BLOCK)
    offs_k = pid_k * BLOCK + tl.arange(0, BLOCK)
    mj = offs_j < B
    mk = offs_k < B
    tile = offs_j[:, None] * B + offs_k[None, :]
    mt = mj[:, None] & mk[None, :]
    s_jk = tl.load(gs_ptr + tile, mask=mt, other=0.0)
    t_jk = tl.load(gt_ptr + tile, mask=mt, other=0.0)
    acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    for i in range(0, B):
        s_ij = tl.load(gs_ptr + i * B + offs_j, mask=mj, other=0.0)
        s_ik = tl.load(gs_ptr + i * B + offs_k, mask=mk, other=0.0)
        s_ii = tl.load(gs_ptr + i * (B + 1))
        t_ij = tl.load(gt_ptr + i * B + offs_j, mask=mj, other=0.0)
        t_ik = tl.load(gt_ptr + i * B + offs_k, mask=mk, other=0.0)
        t_ii = tl.load(gt_ptr + i * (B + 1))
        rs_ij = _inv_norm(tl.load(qs_ptr + i * B + offs_j, mask=mj, other=0.0))
        rs_ik = _inv_norm(tl.load(qs_ptr + i * B + offs_k, mask=mk, other=0.0))
        rt_ij = _inv_norm(tl.load(qt_ptr + i * B + offs_j, mask=mj, other=0.0))
        rt_ik = _inv_norm(tl.load(qt_ptr + i * B + offs_k, mask=mk, other=0.0))
        p_s = rs_ij[:, None] * rs_ik[None, :]
        a_s = (((s_jk - s_ij[:, None]) - s_ik[None, :]) + s_ii) * p_s
        a_t = (((t_jk - t_ij[:, None]) - t_ik[None, :]) + t_ii) * (rt_ij[:, None] * rt_ik[None, :])
        c = tl.minimum(tl.maximum(a_s - a_t, -1.0), 1.0)
        acc += c * p_s
    tl.store(u_ptr + tile, acc, mask=mt)


# --- launchers -----------------------------------------------------------------------------------------

def sq_distances(x: Tensor) -> Tensor:
    """`|x_i - x_j|^2`, `B x B` float32, from float32 `(B, D)` rows, computed directly."""
    B, D = x.shape
    xt = x.T.contiguous()
    block = _block(B)
    n = triton.cdiv(B, block)
    out = torch.empty(B, B, dtype=torch.float32, device=x.device)
    rkd_sq_dist_kernel[(n, n)](xt, out, B, D, BLOCK=block, num_warps=4)
    return out


def angle_forward(gram_s: Tensor, d2_s: Tensor, gram_t: Tensor, d2_t: Tensor) -> Tensor:
    """`sum_ijk Huber(A^s_ijk - A^t_ijk)` (0-d float32) from symmetric float32 Gram and squared-distance matrices."""
    gram_s, d2_s, gram_t, d2_t = (m.contiguous() for m in (gram_s, d2_s, gram_t, d2_t))
    B = gram_s.shape[0]
    block = _block(B)
    n = triton.cdiv(B, block)
    partial = torch.empty(n * n, dtype=torch.float32, device=gram_s.device)
    rkd_angle_forward_kernel[(n, n)](gram_s, d2_s, gram_t, d2_t, partial, B, n, BLOCK=block, num_warps=4)
    return partial.sum()


def angle_backward(grad: Tensor, gram_s: Tensor, d2_s: Tensor, gram_t: Tensor, d2_t: Tensor) -> tuple[Tensor, Tensor]:
    """`grad * d(sum Huber)/dG_s` and `grad * d(sum Huber)/dD2_s`, each `B x B` float32."""
    gram_s, d2_s, gram_t, d2_t = (m.contiguous() for m in (gram_s, d2_s, gram_t, d2_t))
    B = gram_s.shape[0]
    block = _block(B)
    n = triton.cdiv(B, block)
    s = torch.empty_like(gram_s)
    e = torch.empty_like(gram_s)
    u = torch.empty_like(gram_s)
    rkd_angle_rows_kernel[(n, n)](gram_s, d2_s, gram_t, d2_t, s, e, B, BLOCK=block, num_warps=4)
    rkd_angle_cols_kernel[(n, n)](gram_s, d2_s, gram_t, d2_t, u, B, BLOCK=block, num_warps=4)
    d_gram = u - 2.0 * s
    d_gram.diagonal().add_(s.sum(1))
    return d_gram * grad, e * grad


# --- the operators, for torch.compile, and their eager doors -------------------------------------------------

@torch.library.custom_op("fastkd::rkd_sq_distances", mutates_args=())
def sq_distances_op(x: Tensor) -> Tensor:
    return sq_distances(x)


@sq_distances_op.register_fake
def _(x):
    return x.new_empty((x.shape[0], x.shape[0]), dtype=torch.float32)


sq_distances_op.register_autograd(AG.sq_backward, setup_context=AG.sq_setup)


class SqDistances(torch.autograd.Function):
    """The eager door to `fastkd::rkd_sq_distances`."""

    @staticmethod
    def forward(x):
        return sq_distances(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        AG.sq_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad):
        return AG.sq_backward(ctx, grad)


@torch.library.custom_op("fastkd::rkd_angle_sum", mutates_args=())
def rkd_angle_sum_op(gram_s: Tensor, d2_s: Tensor, gram_t: Tensor, d2_t: Tensor) -> Tensor:
    return angle_forward(gram_s, d2_s, gram_t, d2_t)


@rkd_angle_sum_op.register_fake
def _(gram_s, d2_s, gram_t, d2_t):
    return gram_s.new_empty((), dtype=torch.float32)


@torch.library.custom_op("fastkd::rkd_angle_sum_backward", mutates_args=())
def rkd_angle_sum_backward_op(grad: Tensor, gram_s: Tensor, d2_s: Tensor, gram_t: Tensor,
                              d2_t: Tensor) -> tuple[Tensor, Tensor]:
    return angle_backward(grad, gram_s, d2_s, gram_t, d2_t)


@rkd_angle_sum_backward_op.register_fake
def _(grad, gram_s, d2_s, gram_t, d2_t):
    B = gram_s.shape[0]
    return gram_s.new_empty((B, B), dtype=torch.float32), gram_s.new_empty((B, B), dtype=torch.float32)


rkd_angle_sum_op.register_autograd(partial(AG.angle_backward, backward=rkd_angle_sum_backward_op), setup_context=AG.angle_setup)


class RKDAngleSum(torch.autograd.Function):
    """The eager door to `fastkd::rkd_angle_sum`: the same launchers, no dispatcher."""

    @staticmethod
    def forward(gram_s, d2_s, gram_t, d2_t):
        return angle_forward(gram_s, d2_s, gram_t, d2_t)

    @staticmethod
    def setup_context(ctx, inputs, output):
        AG.angle_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad):
        return AG.angle_backward(ctx, grad, backward=angle_backward)


def pairwise_sq(x: Tensor) -> Tensor:
    """`|x_i - x_j|^2` computed directly, with autograd."""
    if torch.compiler.is_compiling():
        return sq_distances_op(x)
    return SqDistances.apply(x)


def angle_sum(gram_s: Tensor, d2_s: Tensor, gram_t: Tensor, d2_t: Tensor) -> Tensor:
    """`sum_ijk Huber(A^s - A^t)` with autograd to the student's G and D2 (the teacher's get none)."""
    if torch.compiler.is_compiling():
        return rkd_angle_sum_op(gram_s, d2_s, gram_t, d2_t)
    return RKDAngleSum.apply(gram_s, d2_s, gram_t, d2_t)
