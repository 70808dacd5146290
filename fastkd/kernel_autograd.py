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


def sq_distances_backward(grad: Tensor, x: Tensor) -> Tensor:
    """d/dx of `sum grad_ij |x_i - x_j|^2` = 2 (diag(rowsum W) - W) x with W = grad + grad^T (a matmul)."""
    w = grad + grad.T
    return 2.0 * (w.sum(1, keepdim=True) * x - w @ x)


def sq_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def sq_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return sq_distances_backward(grad, x) if ctx.needs_input_grad[0] else None


def angle_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def angle_backward(ctx, grad, *, backward):
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return None, None, None, None
    d_gram, d_d2 = backward(grad, *ctx.saved_tensors)
    return (d_gram if ctx.needs_input_grad[0] else None, d_d2 if ctx.needs_input_grad[1] else None, None, None)


def map_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.p = inputs[1]


def map_backward(ctx, grad, *, backward):
    (f,) = ctx.saved_tensors
    return (backward(grad, f, ctx.p) if ctx.needs_input_grad[0] else None), None
