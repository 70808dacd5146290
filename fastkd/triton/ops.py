"""The Triton kernels as PyTorch operators, with autograd, in two doors to the same launchers:

- `torch.ops.fastkd.*`: registered with `torch.library.custom_op`, a fake (shape-only) implementation and
  `register_autograd`, so `torch.compile(fullgraph=True)` keeps them in one graph, forward and backward;
- an `autograd.Function` per op for eager calls, which skips the dispatcher's per-call overhead
  (tens of microseconds, as much as a small kernel takes).

`rows_op(...)` picks the registered op while compiling and the Function otherwise.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dkd, jsd, kl


def _empty_like_rows(x: Tensor, *shape: int) -> Tensor:
    return x.new_empty(shape, dtype=torch.float32)


# --- KL (and KD's CE) ---------------------------------------------------------------------------------

@torch.library.custom_op("fastkd::kl_rows", mutates_args=())
def kl_rows_op(student: Tensor, teacher: Tensor, temperature: float, reverse: bool, target: Optional[Tensor],
               labels: Optional[Tensor], ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    return kl.kl_forward(student, teacher, temperature, reverse, target, labels, ignore_index)


@kl_rows_op.register_fake
def _(student, teacher, temperature, reverse, target, labels, ignore_index):
    rows = student.numel() // student.shape[-1]
    return (_empty_like_rows(student, rows), _empty_like_rows(student, rows if target is not None else 0),
            _empty_like_rows(student, rows, kl.STATS))


@torch.library.custom_op("fastkd::kl_rows_backward", mutates_args=())
def kl_rows_backward_op(grad_kl: Tensor, grad_ce: Optional[Tensor], student: Tensor, teacher: Tensor, stats: Tensor,
                        temperature: float, reverse: bool, target: Optional[Tensor], labels: Optional[Tensor],
                        ignore_index: int, student_grad: bool, teacher_grad: bool) -> tuple[Tensor, Tensor]:
    return kl.kl_backward(grad_kl, grad_ce, student, teacher, stats, temperature, reverse, target, labels,
                          ignore_index, student_grad, teacher_grad)


@kl_rows_backward_op.register_fake
def _(grad_kl, grad_ce, student, teacher, stats, temperature, reverse, target, labels, ignore_index,
      student_grad, teacher_grad):
    return (student.new_empty(student.shape if student_grad else (0,)),
            teacher.new_empty(teacher.shape if teacher_grad else (0,)))


def _kl_setup(ctx, inputs, output):
    student, teacher, temperature, reverse, target, labels, ignore_index = inputs
    ctx.save_for_backward(student, teacher, output[2], target, labels)
    ctx.options = (temperature, reverse, ignore_index)


def _kl_backward(ctx, grad_kl, grad_ce, _grad_stats, backward=kl_rows_backward_op):
    student, teacher, stats, target, labels = ctx.saved_tensors
    temperature, reverse, ignore_index = ctx.options
    student_grad, teacher_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    d_student, d_teacher = backward(grad_kl, grad_ce if target is not None else None, student, teacher, stats,
                                    temperature, reverse, target, labels, ignore_index, student_grad, teacher_grad)
    return (d_student if student_grad else None, d_teacher if teacher_grad else None,
            None, None, None, None, None)


kl_rows_op.register_autograd(_kl_backward, setup_context=_kl_setup)


class KLRows(torch.autograd.Function):
    """The eager door to `fastkd::kl_rows`: the same launchers, no dispatcher."""

    @staticmethod
    def forward(student, teacher, temperature, reverse, target, labels, ignore_index):
        return kl.kl_forward(student, teacher, temperature, reverse, target, labels, ignore_index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _kl_setup(ctx, inputs, output)
        ctx.mark_non_differentiable(output[2])

    @staticmethod
    def backward(ctx, grad_kl, grad_ce, grad_stats):
        return _kl_backward(ctx, grad_kl, grad_ce, grad_stats, backward=kl.kl_backward)


def kl_rows(student: Tensor, teacher: Tensor, temperature: float, reverse: bool = False,
            target: Tensor | None = None, labels: Tensor | None = None, ignore_index: int = -100):
    """Per-row `(KL, CE, stats)` with autograd; see `fastkd.triton.kl`."""
    if torch.compiler.is_compiling():
        return kl_rows_op(student, teacher, temperature, reverse, target, labels, ignore_index)
    return KLRows.apply(student, teacher, temperature, reverse, target, labels, ignore_index)


# --- JSD (0 < beta < 1; beta 0 and 1 are KL) ----------------------------------------------------------

@torch.library.custom_op("fastkd::jsd_rows", mutates_args=())
def jsd_rows_op(student: Tensor, teacher: Tensor, beta: float, temperature: float, labels: Optional[Tensor],
                ignore_index: int) -> tuple[Tensor, Tensor]:
    return jsd.jsd_forward(student, teacher, beta, temperature, labels, ignore_index)


@jsd_rows_op.register_fake
def _(student, teacher, beta, temperature, labels, ignore_index):
    rows = student.numel() // student.shape[-1]
    return _empty_like_rows(student, rows), _empty_like_rows(student, rows, jsd.STATS)


@torch.library.custom_op("fastkd::jsd_rows_backward", mutates_args=())
def jsd_rows_backward_op(grad_loss: Tensor, student: Tensor, teacher: Tensor, stats: Tensor, beta: float,
                         temperature: float, labels: Optional[Tensor], ignore_index: int, student_grad: bool,
                         teacher_grad: bool) -> tuple[Tensor, Tensor]:
    return jsd.jsd_backward(grad_loss, student, teacher, stats, beta, temperature, labels, ignore_index,
                            student_grad, teacher_grad)


@jsd_rows_backward_op.register_fake
def _(grad_loss, student, teacher, stats, beta, temperature, labels, ignore_index, student_grad, teacher_grad):
    return (student.new_empty(student.shape if student_grad else (0,)),
            teacher.new_empty(teacher.shape if teacher_grad else (0,)))


def _jsd_setup(ctx, inputs, output):
    student, teacher, beta, temperature, labels, ignore_index = inputs
    ctx.save_for_backward(student, teacher, output[1], labels)
    ctx.options = (beta, temperature, ignore_index)


def _jsd_backward(ctx, grad_loss, _grad_stats, backward=jsd_rows_backward_op):
    student, teacher, stats, labels = ctx.saved_tensors
    beta, temperature, ignore_index = ctx.options
    student_grad, teacher_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    d_student, d_teacher = backward(grad_loss, student, teacher, stats, beta, temperature, labels, ignore_index,
                                    student_grad, teacher_grad)
    return (d_student if student_grad else None, d_teacher if teacher_grad else None, None, None, None, None)


jsd_rows_op.register_autograd(_jsd_backward, setup_context=_jsd_setup)


class JSDRows(torch.autograd.Function):
    """The eager door to `fastkd::jsd_rows`: the same launchers, no dispatcher."""

    @staticmethod
    def forward(student, teacher, beta, temperature, labels, ignore_index):
        return jsd.jsd_forward(student, teacher, beta, temperature, labels, ignore_index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _jsd_setup(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        return _jsd_backward(ctx, grad_loss, grad_stats, backward=jsd.jsd_backward)


def jsd_rows(student: Tensor, teacher: Tensor, beta: float, temperature: float, labels: Tensor | None = None,
             ignore_index: int = -100):
    """Per-row `(JSD, stats)` with autograd for 0 < beta < 1 (0 and 1 are `kl_rows`); see `fastkd.triton.jsd`."""
    if torch.compiler.is_compiling():
        return jsd_rows_op(student, teacher, beta, temperature, labels, ignore_index)
    return JSDRows.apply(student, teacher, beta, temperature, labels, ignore_index)


# --- DKD ----------------------------------------------------------------------------------------------

@torch.library.custom_op("fastkd::dkd_rows", mutates_args=())
def dkd_rows_op(student: Tensor, teacher: Tensor, target: Tensor, temperature: float
                ) -> tuple[Tensor, Tensor, Tensor]:
    return dkd.dkd_forward(student, teacher, target, temperature)


@dkd_rows_op.register_fake
def _(student, teacher, target, temperature):
    rows = student.numel() // student.shape[-1]
    return (_empty_like_rows(student, rows), _empty_like_rows(student, rows),
            _empty_like_rows(student, rows, dkd.STATS))


@torch.library.custom_op("fastkd::dkd_rows_backward", mutates_args=())
def dkd_rows_backward_op(grad_tckd: Tensor, grad_nckd: Tensor, student: Tensor, teacher: Tensor, stats: Tensor,
                         target: Tensor, temperature: float, student_grad: bool, teacher_grad: bool
                         ) -> tuple[Tensor, Tensor]:
    return dkd.dkd_backward(grad_tckd, grad_nckd, student, teacher, stats, target, temperature, student_grad,
                            teacher_grad)


@dkd_rows_backward_op.register_fake
def _(grad_tckd, grad_nckd, student, teacher, stats, target, temperature, student_grad, teacher_grad):
    return (student.new_empty(student.shape if student_grad else (0,)),
            teacher.new_empty(teacher.shape if teacher_grad else (0,)))


def _dkd_setup(ctx, inputs, output):
    student, teacher, target, temperature = inputs
    ctx.save_for_backward(student, teacher, output[2], target)
    ctx.options = (temperature,)


def _dkd_backward(ctx, grad_tckd, grad_nckd, _grad_stats, backward=dkd_rows_backward_op):
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


dkd_rows_op.register_autograd(_dkd_backward, setup_context=_dkd_setup)


class DKDRows(torch.autograd.Function):
    """The eager door to `fastkd::dkd_rows`: the same launchers, no dispatcher."""

    @staticmethod
    def forward(student, teacher, target, temperature):
        return dkd.dkd_forward(student, teacher, target, temperature)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _dkd_setup(ctx, inputs, output)
        ctx.mark_non_differentiable(output[2])

    @staticmethod
    def backward(ctx, grad_tckd, grad_nckd, grad_stats):
        return _dkd_backward(ctx, grad_tckd, grad_nckd, grad_stats, backward=dkd.dkd_backward)


def dkd_rows(student: Tensor, teacher: Tensor, target: Tensor, temperature: float):
    """Per-row `(TCKD, NCKD, stats)` with autograd; see `fastkd.triton.dkd`."""
    if torch.compiler.is_compiling():
        return dkd_rows_op(student, teacher, target, temperature)
    return DKDRows.apply(student, teacher, target, temperature)
