"""Autograd for the kernel backends' operators, shared by Triton and CUDA C++.

Each pair `*_setup(ctx, inputs, output)` / `*_backward(ctx, *grads, backward=...)` is what
`torch.library.register_autograd` takes (with `backward` bound to the backend's backward operator) and what
the eager `autograd.Function`s call (with `backward` bound to the launcher itself). The forward operators'
schemas are the same in both backends (see csrc/ops.cpp), so one setup and one backward serve both.
"""
from __future__ import annotations

import torch
from torch import Tensor


def kl_setup(ctx, inputs, output):
    student, teacher, temperature, reverse, target, labels, ignore_index = inputs
    ctx.save_for_backward(student, teacher, output[2], target, labels)
    ctx.options = (temperature, reverse, ignore_index)


def kl_backward(ctx, grad_kl, grad_ce, _grad_stats, *, backward):
    student, teacher, stats, target, labels = ctx.saved_tensors
    temperature, reverse, ignore_index = ctx.options
    student_grad, teacher_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    d_student, d_teacher = backward(grad_kl, grad_ce if target is not None else None, student, teacher, stats,
                                    temperature, reverse, target, labels, ignore_index, student_grad, teacher_grad)
    return (d_student if student_grad else None, d_teacher if teacher_grad else None,
            None, None, None, None, None)


def jsd_setup(ctx, inputs, output):
    student, teacher, beta, temperature, labels, ignore_index = inputs
    ctx.save_for_backward(student, teacher, output[1], labels)
    ctx.options = (beta, temperature, ignore_index)


def jsd_backward(ctx, grad_loss, _grad_stats, *, backward):
    student, teacher, stats, labels = ctx.saved_tensors
    beta, temperature, ignore_index = ctx.options
    student_grad, teacher_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    d_student, d_teacher = backward(grad_loss, student, teacher, stats, beta, temperature, labels, ignore_index,
                                    student_grad, teacher_grad)
    return (d_student if student_grad else None, d_teacher if teacher_grad else None, None, None, None, None)


def dkd_setup(ctx, inputs, output):
    student, teacher, target, temperature = inputs
    ctx.save_for_backward(student, teacher, output[2], target)
    ctx.options = (temperature,)


def dkd_backward(ctx, grad_tckd, grad_nckd, _grad_stats, *, backward):
    student, teacher, stats, target = ctx.saved_tensors
    (temperature,) = ctx.options
    student_grad, teacher_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    # An output left out of the loss (NCKD with one class) may come back as None.
    if grad_tckd is None:
        grad_tckd = torch.zeros_like(stats[:, 0])
    if grad_nckd is None:
        grad_nckd = torch.zeros_like(stats[:, 0])
    d_student, d_teacher = backward(grad_tckd, grad_nckd, student, teacher, stats, target, temperature,
                                    student_grad, teacher_grad)
    return d_student if student_grad else None, d_teacher if teacher_grad else None, None, None


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


def rkd_functions(sq_distances, weighted_diff, angle_sum, angle_weights):
    """`(pairwise_sq, angle_sum)` with autograd, from a backend's four RKD operators (fastkd/triton/rkd.py).

    `pairwise_sq(x) -> Q`, `Q_ij = |x_i - x_j|^2` in float32, with its gradient; `angle_sum(x_s, x_t)` is
    `sum_ijk Huber(A^s_ijk - A^t_ijk)` over all `B^3` triples of the float32 rows, with its gradient to the
    student's rows `x_s` (the teacher gets none).
    """

    class PairwiseSq(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return sq_distances(x)

        @staticmethod
        def backward(ctx, grad):
            # d/dx_m sum_ij g_ij |x_i - x_j|^2 = sum_k 2 (g + g^T)_mk (x_m - x_k), by direct differences.
            (x,) = ctx.saved_tensors
            return weighted_diff(2.0 * (grad + grad.T), x)

    class AngleSum(torch.autograd.Function):
        """The gradient through the numerators N_ijk = (x_j - x_i).(x_k - x_i), with w_ijk = dL/dN_ijk:
            dL/dx_m = sum_ik w_imk (x_k - x_i) + sum_ij w_ijm (x_j - x_i) - sum_jk w_mjk ((x_k - x_m) + (x_j - x_m))
                    = sum_k (2 U_mk - 2 S_km - 2 S_mk) (x_k - x_m)     (w symmetric in its last two indices)
        with S_ij = sum_k w_ijk and U_jk = sum_i w_ijk; through the norms, dL/dQ_ij = E_ij read at (i, j) and
        at its mirror; both are weights of direct differences (the kernels' `angle_weights`)."""

        @staticmethod
        def forward(ctx, x_s, x_t):
            qh_s, ql_s = sq_hi_lo(x_s)
            qh_t, ql_t = sq_hi_lo(x_t)
            # At D = 1 every angle is +-1 exactly: the kernels take the sign of N, and the gradient is 0.
            ctx.unit_s, ctx.unit_t = x_s.shape[1] == 1, x_t.shape[1] == 1
            ctx.save_for_backward(x_s, qh_s, ql_s, qh_t, ql_t)
            return angle_sum(qh_s, ql_s, qh_t, ql_t, ctx.unit_s, ctx.unit_t) + angle_diagonal(qh_s, qh_t)

        @staticmethod
        def backward(ctx, grad):
            x_s, qh_s, ql_s, qh_t, ql_t = ctx.saved_tensors
            if ctx.unit_s:
                return torch.zeros_like(x_s), None
            return weighted_diff(angle_weights(qh_s, ql_s, qh_t, ql_t, ctx.unit_t), x_s) * grad, None

    return PairwiseSq.apply, AngleSum.apply


def map_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.p = inputs[1]


def map_backward(ctx, grad, *, backward):
    (f,) = ctx.saved_tensors
    return (backward(grad, f, ctx.p) if ctx.needs_input_grad[0] else None), None
