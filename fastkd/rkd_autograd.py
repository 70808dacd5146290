"""RKD's squared distances and angle sum with autograd, composed from a backend's four RKD operators
(`rkd_sq_distances`, `rkd_weighted_diff`, `rkd_angle_sum`, `rkd_angle_weights`; the maths and the error
bounds are in fastkd/triton/rkd.py)."""
from __future__ import annotations

import torch
from torch import Tensor


def sq_hi_lo(x: Tensor) -> tuple[Tensor, Tensor]:
    """Squared distances `|x_i - x_j|^2` of float32 rows, computed directly in float64, as float32 pairs
    `(hi, lo)` with `hi + lo` equal to them to ~float32^2 (fastkd/triton/rkd.py, step 1). No gradient."""
    x64 = x.detach().double()
    q = torch.cdist(x64, x64, compute_mode="donot_use_mm_for_euclid_dist").square_()
    q = (q + q.T).mul_(0.5)  # exactly symmetric whatever the cdist kernel's order of summation
    hi = q.float()
    return hi, q.sub_(hi.double()).float()


def angle_diagonal(q_s: Tensor, q_t: Tensor) -> Tensor:
    """`sum_{i, j} Huber(A^s_ijj - A^t_ijj)`: the triples the angle kernels leave out, where
    `A_ijj = |e_ij|^2 = Q_ij / max(Q_ij, 1e-24)`: 1 on distinct rows, and below F.normalize's clamp
    (rows less than 1e-12 apart) what the reference computes. Constant wherever the rows are more than 1e-12
    apart, so its gradient is taken as 0."""
    return torch.nn.functional.smooth_l1_loss((q_s * 1e24).clamp(max=1.0), (q_t * 1e24).clamp(max=1.0),
                                              reduction="sum")


class _SqDistances(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, x):
        ctx.kernels = kernels
        ctx.save_for_backward(x)
        return kernels.rkd_sq_distances(x)

    @staticmethod
    def backward(ctx, grad):
        # d/dx_m sum_ij g_ij |x_i - x_j|^2 = sum_k 2 (g + g^T)_mk (x_m - x_k), by direct differences.
        (x,) = ctx.saved_tensors
        return None, ctx.kernels.rkd_weighted_diff(2.0 * (grad + grad.T), x)


class _AngleSum(torch.autograd.Function):
    """The gradient through the numerators N_ijk = (x_j - x_i).(x_k - x_i), with w_ijk = dL/dN_ijk:
        dL/dx_m = sum_ik w_imk (x_k - x_i) + sum_ij w_ijm (x_j - x_i) - sum_jk w_mjk ((x_k - x_m) + (x_j - x_m))
                = sum_k (2 U_mk - 2 S_km - 2 S_mk) (x_k - x_m)     (w symmetric in its last two indices)
    with S_ij = sum_k w_ijk and U_jk = sum_i w_ijk; through the norms, dL/dQ_ij = E_ij read at (i, j) and
    at its mirror; both are weights of direct differences (the kernels' `rkd_angle_weights`)."""

    @staticmethod
    def forward(ctx, kernels, x_s, x_t):
        qh_s, ql_s = sq_hi_lo(x_s)
        qh_t, ql_t = sq_hi_lo(x_t)
        # At D = 1 every angle is +-1 exactly: the kernels take the sign of N, and the gradient is 0.
        ctx.kernels, ctx.unit_s, ctx.unit_t = kernels, x_s.shape[1] == 1, x_t.shape[1] == 1
        ctx.save_for_backward(x_s, qh_s, ql_s, qh_t, ql_t)
        return kernels.rkd_angle_sum(qh_s, ql_s, qh_t, ql_t, ctx.unit_s, ctx.unit_t) + angle_diagonal(qh_s, qh_t)

    @staticmethod
    def backward(ctx, grad):
        x_s, qh_s, ql_s, qh_t, ql_t = ctx.saved_tensors
        if ctx.unit_s:
            return None, torch.zeros_like(x_s), None
        k = ctx.kernels
        return None, k.rkd_weighted_diff(k.rkd_angle_weights(qh_s, ql_s, qh_t, ql_t, ctx.unit_t), x_s) * grad, None


def sq_distances(kernels, x: Tensor) -> Tensor:
    """`Q_ij = |x_i - x_j|^2` of float32 rows `(B, D)`, `(B, B)` float32, with its gradient."""
    return _SqDistances.apply(kernels, x)


def angle_sum(kernels, x_s: Tensor, x_t: Tensor) -> Tensor:
    """`sum_ijk Huber(A^s_ijk - A^t_ijk)` over all `B^3` triples of the float32 rows, with its gradient to the
    student's rows `x_s` (the teacher gets none)."""
    return _AngleSum.apply(kernels, x_s, x_t)
