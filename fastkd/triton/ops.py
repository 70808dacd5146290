"""The Triton kernels as PyTorch operators, with autograd, in two doors to the same launchers:

- `torch.ops.fastkd.*`: registered with `torch.library.custom_op`, a fake (shape-only) implementation and
  `register_autograd`, so `torch.compile(fullgraph=True)` keeps them in one graph, forward and backward;
- an `autograd.Function` per op for eager calls, which skips the dispatcher's per-call overhead
  (tens of microseconds, as much as a small kernel takes).

`rows_op(...)` picks the registered op while compiling and the Function otherwise.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from torch import Tensor

from .. import kernel_autograd as AG
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


kl_rows_op.register_autograd(partial(AG.kl_backward, backward=kl_rows_backward_op), setup_context=AG.kl_setup)


class KLRows(torch.autograd.Function):
    """The eager door to `fastkd::kl_rows`: the same launchers, no dispatcher."""

    @staticmethod
    def forward(student, teacher, temperature, reverse, target, labels, ignore_index):
        return kl.kl_forward(student, teacher, temperature, reverse, target, labels, ignore_index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        AG.kl_setup(ctx, inputs, output)
        ctx.mark_non_differentiable(output[2])

    @staticmethod
    def backward(ctx, grad_kl, grad_ce, grad_stats):
        return AG.kl_backward(ctx, grad_kl, grad_ce, grad_stats, backward=kl.kl_backward)


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


jsd_rows_op.register_autograd(partial(AG.jsd_backward, backward=jsd_rows_backward_op), setup_context=AG.jsd_setup)


class JSDRows(torch.autograd.Function):
    """The eager door to `fastkd::jsd_rows`: the same launchers, no dispatcher."""

    @staticmethod
    def forward(student, teacher, beta, temperature, labels, ignore_index):
        return jsd.jsd_forward(student, teacher, beta, temperature, labels, ignore_index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        AG.jsd_setup(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        return AG.jsd_backward(ctx, grad_loss, grad_stats, backward=jsd.jsd_backward)


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


dkd_rows_op.register_autograd(partial(AG.dkd_backward, backward=dkd_rows_backward_op), setup_context=AG.dkd_setup)


class DKDRows(torch.autograd.Function):
    """The eager door to `fastkd::dkd_rows`: the same launchers, no dispatcher."""

    @staticmethod
    def forward(student, teacher, target, temperature):
        return dkd.dkd_forward(student, teacher, target, temperature)

    @staticmethod
    def setup_context(ctx, inputs, output):
        AG.dkd_setup(ctx, inputs, output)
        ctx.mark_non_differentiable(output[2])

    @staticmethod
    def backward(ctx, grad_tckd, grad_nckd, grad_stats):
        return AG.dkd_backward(ctx, grad_tckd, grad_nckd, grad_stats, backward=dkd.dkd_backward)


def dkd_rows(student: Tensor, teacher: Tensor, target: Tensor, temperature: float):
    """Per-row `(TCKD, NCKD, stats)` with autograd; see `fastkd.triton.dkd`."""
    if torch.compiler.is_compiling():
        return dkd_rows_op(student, teacher, target, temperature)
    return DKDRows.apply(student, teacher, target, temperature)
