"""The losses a kernel backend runs, composed from its operators (a `fastkd.kernel_ops.KernelSet`).

Each function takes the backend's `kernels` first, then exactly the arguments `fastkd.functional` passes to
the reference of the same name (validated, every option given: the defaults are the public functions').
What sits around the kernels is the same for every backend and is plain PyTorch on O(rows) or `B x B`
tensors: the references' reductions, RKD's distance term, the normalisation of attention maps. `LOSSES` is
the table `fastkd._dispatch` reads: which losses have kernels. Inputs in a dtype the kernels do not take
(float64) never reach these functions: `fastkd._dispatch.resolve` sends them to the reference.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import rkd_autograd
from .reference.attention import match_spatial
from .reference.logits import compute_dtype, masked_reduce, reduce_rows
from .reference.relational import distances_from_squared, flat_features, mean_normalized

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kd_loss(kernels, student_logits, teacher_logits, temperature, *, reduction, target, ce_weight, kd_weight):
    with_ce = target is not None and ce_weight != 0.0
    kl, ce, _ = kernels.kl_rows(student_logits, teacher_logits, temperature, False, target if with_ce else None,
                                None, -100)
    rows_shape, classes = student_logits.shape[:-1], student_logits.shape[-1]
    rows = kl.numel()
    loss = (kd_weight * temperature * temperature) * reduce_rows(kl.view(rows_shape), reduction, rows, classes)
    if with_ce:
        ce_reduction = "batchmean" if reduction == "mean" else reduction
        loss = loss + ce_weight * reduce_rows(ce.view(rows_shape), ce_reduction, rows, classes)
    return loss


def kl_div_loss(kernels, student_logits, teacher_logits, temperature, *, direction, labels, ignore_index, reduction):
    kl, _, _ = kernels.kl_rows(student_logits, teacher_logits, temperature, direction == "reverse", None, labels,
                               ignore_index)
    return masked_reduce(kl.view(student_logits.shape[:-1]), labels, ignore_index, reduction,
                         student_logits.shape[-1])


def jsd_loss(kernels, student_logits, teacher_logits, *, beta, temperature, labels, ignore_index, reduction):
    if beta == 0.0 or beta == 1.0:
        # Exactly forward (beta 0) or reverse (beta 1) KL, as in the reference.
        per_row, _, _ = kernels.kl_rows(student_logits, teacher_logits, temperature, beta == 1.0, None, labels,
                                        ignore_index)
    else:
        per_row, _ = kernels.jsd_rows(student_logits, teacher_logits, float(beta), temperature, labels, ignore_index)
    return masked_reduce(per_row.view(student_logits.shape[:-1]), labels, ignore_index, reduction,
                         student_logits.shape[-1])


def dkd_loss(kernels, student_logits, teacher_logits, target, *, alpha, beta, temperature):
    rows, classes = student_logits.shape
    tckd, nckd, _ = kernels.dkd_rows(student_logits, teacher_logits, target, temperature)
    # The reference's order of operations; with one class NCKD is left out, as there.
    loss = alpha * tckd.sum()
    if classes > 1:
        loss = loss + beta * nckd.sum()
    return loss * (temperature * temperature / rows)


def _distance_term(kernels, x_s, x_t, squared, eps):
    # The reference's normalised distances, from the directly computed squared distances (the reference's
    # Gram form cancels for close rows; these do not).
    d_s = distances_from_squared(rkd_autograd.sq_distances(kernels, x_s), squared, eps)
    d_t = distances_from_squared(rkd_autograd.sq_distances(kernels, x_t), squared, eps)
    return torch.nn.functional.smooth_l1_loss(mean_normalized(d_s), mean_normalized(d_t))


def _angle_term(kernels, x_s, x_t):
    return rkd_autograd.angle_sum(kernels, x_s, x_t) / float(x_s.shape[0]) ** 3


def rkd_distance_loss(kernels, f_s, f_t, *, squared, eps):
    return _distance_term(kernels, flat_features(f_s), flat_features(f_t.detach()), squared, eps)


def rkd_angle_loss(kernels, f_s, f_t):
    return _angle_term(kernels, flat_features(f_s), flat_features(f_t.detach()))


def rkd_loss(kernels, f_s, f_t, *, distance_weight, angle_weight, squared, eps):
    loss = f_s.new_zeros((), dtype=compute_dtype(f_s))
    if distance_weight == 0.0 and angle_weight == 0.0:
        return loss
    x_s, x_t = flat_features(f_s), flat_features(f_t.detach())
    if distance_weight != 0.0:
        loss = loss + distance_weight * _distance_term(kernels, x_s, x_t, squared, eps)
    if angle_weight != 0.0:
        loss = loss + angle_weight * _angle_term(kernels, x_s, x_t)
    return loss


def _as_4d(f: Tensor) -> Tensor:
    """Maps `(B, C, *spatial)` as `(B, C, H, W)` for the channel-reduction kernel."""
    if f.dim() == 3:
        return f.unsqueeze(2)
    if f.dim() != 4:
        return f.reshape(f.shape[0], f.shape[1], 1, -1)
    return f


def attention_map(kernels, f, p):
    return torch.nn.functional.normalize(kernels.at_channel_mean_pow(_as_4d(f), float(p)), dim=1)


def at_loss(kernels, f_s, f_t, *, p, mode):
    f_s, f_t = match_spatial(f_s, f_t)
    diff = attention_map(kernels, f_s, p) - attention_map(kernels, f_t, p)
    if mode == "code":
        return diff.pow(2).mean()
    return torch.linalg.vector_norm(diff, dim=1).sum() / f_s.shape[0]


LOSSES = {fn.__name__: fn for fn in (kd_loss, kl_div_loss, jsd_loss, dkd_loss, rkd_distance_loss, rkd_angle_loss,
                                     rkd_loss, attention_map, at_loss)}
