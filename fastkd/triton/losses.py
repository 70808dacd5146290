"""The logit losses on the Triton kernels, with the references' signatures, registered as backend "triton".

The kernels produce per-row losses; the reductions are the references' own (O(N) work in PyTorch).
float64 inputs, which the kernels do not take, fall back to the reference.
"""
from __future__ import annotations

import torch

from .. import _dispatch
from .. import reference
from ..reference.logits import masked_reduce, reduce_rows
from .ops import dkd_rows, jsd_rows, kl_rows

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernel_dtypes(*tensors: torch.Tensor) -> bool:
    return all(t.dtype in KERNEL_DTYPES for t in tensors)


def kd_loss(student_logits, teacher_logits, temperature=4.0, *, reduction="batchmean", target=None,
            ce_weight=0.0, kd_weight=1.0):
    if not _kernel_dtypes(student_logits, teacher_logits):
        return reference.kd_loss(student_logits, teacher_logits, temperature, reduction=reduction, target=target,
                                 ce_weight=ce_weight, kd_weight=kd_weight)
    with_ce = target is not None and ce_weight != 0.0
    kl, ce, _ = kl_rows(student_logits, teacher_logits, temperature, False, target if with_ce else None)
    rows_shape, classes = student_logits.shape[:-1], student_logits.shape[-1]
    rows = kl.numel()
    loss = (kd_weight * temperature * temperature) * reduce_rows(kl.view(rows_shape), reduction, rows, classes)
    if with_ce:
        ce_reduction = "batchmean" if reduction == "mean" else reduction
        loss = loss + ce_weight * reduce_rows(ce.view(rows_shape), ce_reduction, rows, classes)
    return loss


def kl_div_loss(student_logits, teacher_logits, temperature=1.0, *, direction="forward", labels=None,
                ignore_index=-100, reduction="batchmean"):
    if not _kernel_dtypes(student_logits, teacher_logits):
        return reference.kl_div_loss(student_logits, teacher_logits, temperature, direction=direction,
                                     labels=labels, ignore_index=ignore_index, reduction=reduction)
    kl, _, _ = kl_rows(student_logits, teacher_logits, temperature, direction == "reverse", None, labels,
                       ignore_index)
    return masked_reduce(kl.view(student_logits.shape[:-1]), labels, ignore_index, reduction,
                         student_logits.shape[-1])


def jsd_loss(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, labels=None, ignore_index=-100,
             reduction="batchmean"):
    if not _kernel_dtypes(student_logits, teacher_logits):
        return reference.jsd_loss(student_logits, teacher_logits, beta=beta, temperature=temperature,
                                  labels=labels, ignore_index=ignore_index, reduction=reduction)
    if beta == 0.0 or beta == 1.0:
        # Exactly forward (beta 0) or reverse (beta 1) KL, as in the reference.
        per_row, _, _ = kl_rows(student_logits, teacher_logits, temperature, beta == 1.0, None, labels,
                                ignore_index)
    else:
        per_row, _ = jsd_rows(student_logits, teacher_logits, float(beta), temperature, labels, ignore_index)
    return masked_reduce(per_row.view(student_logits.shape[:-1]), labels, ignore_index, reduction,
                         student_logits.shape[-1])


def dkd_loss(student_logits, teacher_logits, target, *, alpha=1.0, beta=8.0, temperature=4.0):
    if not _kernel_dtypes(student_logits, teacher_logits):
        return reference.dkd_loss(student_logits, teacher_logits, target, alpha=alpha, beta=beta,
                                  temperature=temperature)
    rows, classes = student_logits.shape
    tckd, nckd, _ = dkd_rows(student_logits, teacher_logits, target, temperature)
    # The reference's order of operations; with one class NCKD is left out, as there.
    loss = alpha * tckd.sum()
    if classes > 1:
        loss = loss + beta * nckd.sum()
    return loss * (temperature * temperature / rows)


for _name, _fn in {"kd_loss": kd_loss, "kl_div_loss": kl_div_loss, "jsd_loss": jsd_loss,
                   "dkd_loss": dkd_loss}.items():
    _dispatch.register(_name, "triton", _fn)
