"""The C++ operators (csrc/) made whole for PyTorch: fake implementations for torch.compile, autograd,
and the losses registered as backend "cuda" (the losses: `fastkd.kernel_losses`).

Importing this module requires the extension to be loaded (`fastkd.cuda._load`). Each operator has the
schema and the semantics of the Triton operator of the same name without the `cuda_` prefix, so the fakes
and the autograd are the Triton backend's (`fastkd.kernel_autograd`).
"""
from __future__ import annotations

from functools import partial

import torch

from .. import kernel_autograd as AG
from ..kernel_losses import KernelSet, register_backend

ops = torch.ops.fastkd
ROW_STATS = {"cuda_kl_rows": 7, "cuda_jsd_rows": 7, "cuda_dkd_rows": 8}


def _rows(x):
    return x.numel() // x.shape[-1]


def _per_row(x, *widths):
    return [x.new_empty((_rows(x), w) if w else (_rows(x),), dtype=torch.float32) for w in widths]


@torch.library.register_fake("fastkd::cuda_kl_rows")
def _(student, teacher, temperature, reverse, target, labels, ignore_index):
    kl, stats = _per_row(student, 0, ROW_STATS["cuda_kl_rows"])
    return kl, student.new_empty((_rows(student) if target is not None else 0,), dtype=torch.float32), stats


@torch.library.register_fake("fastkd::cuda_jsd_rows")
def _(student, teacher, beta, temperature, labels, ignore_index):
    return tuple(_per_row(student, 0, ROW_STATS["cuda_jsd_rows"]))


@torch.library.register_fake("fastkd::cuda_dkd_rows")
def _(student, teacher, target, temperature):
    return tuple(_per_row(student, 0, 0, ROW_STATS["cuda_dkd_rows"]))


def _input_gradients(student, teacher, student_grad, teacher_grad):
    return (student.new_empty(student.shape if student_grad else (0,)),
            teacher.new_empty(teacher.shape if teacher_grad else (0,)))


@torch.library.register_fake("fastkd::cuda_kl_rows_backward")
def _(grad_kl, grad_ce, student, teacher, stats, temperature, reverse, target, labels, ignore_index,
      student_grad, teacher_grad):
    return _input_gradients(student, teacher, student_grad, teacher_grad)


@torch.library.register_fake("fastkd::cuda_jsd_rows_backward")
def _(grad_loss, student, teacher, stats, beta, temperature, labels, ignore_index, student_grad, teacher_grad):
    return _input_gradients(student, teacher, student_grad, teacher_grad)


@torch.library.register_fake("fastkd::cuda_dkd_rows_backward")
def _(grad_tckd, grad_nckd, student, teacher, stats, target, temperature, student_grad, teacher_grad):
    return _input_gradients(student, teacher, student_grad, teacher_grad)


@torch.library.register_fake("fastkd::cuda_rkd_sq_distances")
def _(x):
    return x.new_empty((x.shape[0], x.shape[0]), dtype=torch.float32)


@torch.library.register_fake("fastkd::cuda_rkd_weighted_diff")
def _(w, x):
    return torch.empty_like(x, dtype=torch.float32)


@torch.library.register_fake("fastkd::cuda_rkd_angle_sum")
def _(qh_s, ql_s, qh_t, ql_t, unit_s, unit_t):
    return qh_s.new_empty(())


@torch.library.register_fake("fastkd::cuda_rkd_angle_weights")
def _(qh_s, ql_s, qh_t, ql_t, unit_t):
    return torch.empty_like(qh_s)


@torch.library.register_fake("fastkd::cuda_at_channel_mean_pow")
def _(f, p):
    return f.new_empty((f.shape[0], f.shape[2] * f.shape[3]), dtype=torch.float32)


@torch.library.register_fake("fastkd::cuda_at_channel_mean_pow_backward")
def _(grad, f, p):
    return torch.empty_like(f)


for _op, _backward, _setup in [
    ("cuda_kl_rows", partial(AG.kl_backward, backward=ops.cuda_kl_rows_backward), AG.kl_setup),
    ("cuda_jsd_rows", partial(AG.jsd_backward, backward=ops.cuda_jsd_rows_backward), AG.jsd_setup),
    ("cuda_dkd_rows", partial(AG.dkd_backward, backward=ops.cuda_dkd_rows_backward), AG.dkd_setup),
    ("cuda_at_channel_mean_pow", partial(AG.map_backward, backward=ops.cuda_at_channel_mean_pow_backward),
     AG.map_setup),
]:
    torch.library.register_autograd(f"fastkd::{_op}", _backward, setup_context=_setup)


pairwise_sq, angle_sum = AG.rkd_functions(ops.cuda_rkd_sq_distances, ops.cuda_rkd_weighted_diff,
                                          ops.cuda_rkd_angle_sum, ops.cuda_rkd_angle_weights)
KERNELS = KernelSet(kl_rows=ops.cuda_kl_rows, jsd_rows=ops.cuda_jsd_rows, dkd_rows=ops.cuda_dkd_rows,
                    pairwise_sq=pairwise_sq, angle_sum=angle_sum, channel_mean_pow=ops.cuda_at_channel_mean_pow)
LOSSES = register_backend("cuda", KERNELS)
