"""The losses composed from a kernel backend's fused operators, shared by every kernel backend.

A kernel backend (Triton in `fastkd.triton`, CUDA C++ in `fastkd.cuda`) provides six operators with
autograd, a `KernelSet`; `register_backend(name, kernels)` registers every loss below for it. What sits
around the kernels is the same for all backends and is plain PyTorch on O(rows) or `B x B` tensors:
the references' reductions, RKD's centring, Gram product and distance term, and the normalisation of
attention maps. float64 inputs, which the kernels do not take, fall back to the reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import _dispatch, reference
from .reference.attention import match_spatial
from .reference.logits import compute_dtype, masked_reduce, reduce_rows
from .reference.relational import distances_from_squared, flat_features, mean_normalized

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class KernelSet:
    """A backend's fused operators, each with autograd (see the Triton modules for their maths)."""
    kl_rows: Callable  # (student, teacher, T, reverse, target, labels, ignore_index) -> (kl, ce, stats) per row
    jsd_rows: Callable  # (student, teacher, beta, T, labels, ignore_index) -> (jsd, stats) per row, 0 < beta < 1
    dkd_rows: Callable  # (student, teacher, target, T) -> (tckd, nckd, stats) per row
    pairwise_sq: Callable  # (x (B, D) float32) -> Q = |x_i - x_j|^2, (B, B)
    angle_sum: Callable  # (x_s, x_t) (B, D) float32 -> sum over all B^3 triples of Huber(A_s - A_t)
    channel_mean_pow: Callable  # (f (B, C, H, W), p) -> mean_c f^p, (B, H*W) float32


def kernel_dtypes(*tensors: Tensor) -> bool:
    return all(t.dtype in KERNEL_DTYPES for t in tensors)


def as_4d(f: Tensor) -> Tensor:
    """Maps `(B, C, *spatial)` as `(B, C, H, W)` for the channel-reduction kernels."""
    if f.dim() == 3:
        return f.unsqueeze(2)
    if f.dim() != 4:
        return f.reshape(f.shape[0], f.shape[1], 1, -1)
    return f


def make_losses(k: KernelSet) -> dict[str, Callable]:
    """The losses of `fastkd.functional` on kernel set `k`, each with its reference's exact signature."""

    def kd_loss(student_logits, teacher_logits, temperature=4.0, *, reduction="batchmean", target=None,
                ce_weight=0.0, kd_weight=1.0):
        if not kernel_dtypes(student_logits, teacher_logits):
            return reference.kd_loss(student_logits, teacher_logits, temperature, reduction=reduction,
                                     target=target, ce_weight=ce_weight, kd_weight=kd_weight)
        with_ce = target is not None and ce_weight != 0.0
        kl, ce, _ = k.kl_rows(student_logits, teacher_logits, temperature, False, target if with_ce else None,
                              None, -100)
        rows_shape, classes = student_logits.shape[:-1], student_logits.shape[-1]
        rows = kl.numel()
        loss = (kd_weight * temperature * temperature) * reduce_rows(kl.view(rows_shape), reduction, rows, classes)
        if with_ce:
            ce_reduction = "batchmean" if reduction == "mean" else reduction
            loss = loss + ce_weight * reduce_rows(ce.view(rows_shape), ce_reduction, rows, classes)
        return loss

    def kl_div_loss(student_logits, teacher_logits, temperature=1.0, *, direction="forward", labels=None,
                    ignore_index=-100, reduction="batchmean"):
        if not kernel_dtypes(student_logits, teacher_logits):
            return reference.kl_div_loss(student_logits, teacher_logits, temperature, direction=direction,
                                         labels=labels, ignore_index=ignore_index, reduction=reduction)
        kl, _, _ = k.kl_rows(student_logits, teacher_logits, temperature, direction == "reverse", None, labels,
                             ignore_index)
        return masked_reduce(kl.view(student_logits.shape[:-1]), labels, ignore_index, reduction,
                             student_logits.shape[-1])

    def jsd_loss(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, labels=None, ignore_index=-100,
                 reduction="batchmean"):
        if not kernel_dtypes(student_logits, teacher_logits):
            return reference.jsd_loss(student_logits, teacher_logits, beta=beta, temperature=temperature,
                                      labels=labels, ignore_index=ignore_index, reduction=reduction)
        if beta == 0.0 or beta == 1.0:
            # Exactly forward (beta 0) or reverse (beta 1) KL, as in the reference.
            per_row, _, _ = k.kl_rows(student_logits, teacher_logits, temperature, beta == 1.0, None, labels,
                                      ignore_index)
        else:
            per_row, _ = k.jsd_rows(student_logits, teacher_logits, float(beta), temperature, labels, ignore_index)
        return masked_reduce(per_row.view(student_logits.shape[:-1]), labels, ignore_index, reduction,
                             student_logits.shape[-1])

    def dkd_loss(student_logits, teacher_logits, target, *, alpha=1.0, beta=8.0, temperature=4.0):
        if not kernel_dtypes(student_logits, teacher_logits):
            return reference.dkd_loss(student_logits, teacher_logits, target, alpha=alpha, beta=beta,
                                      temperature=temperature)
        rows, classes = student_logits.shape
        tckd, nckd, _ = k.dkd_rows(student_logits, teacher_logits, target, temperature)
        # The reference's order of operations; with one class NCKD is left out, as there.
        loss = alpha * tckd.sum()
        if classes > 1:
            loss = loss + beta * nckd.sum()
        return loss * (temperature * temperature / rows)

    def distance_term(q_s, q_t, squared, eps):
        # The reference's normalised distances, from the directly computed squared distances (the reference's
        # Gram form cancels for close rows; these do not).
        return torch.nn.functional.smooth_l1_loss(mean_normalized(distances_from_squared(q_s, squared, eps)),
                                                  mean_normalized(distances_from_squared(q_t, squared, eps)))

    def angle_term(x_s, x_t):
        return k.angle_sum(x_s, x_t) / float(x_s.shape[0]) ** 3

    def rkd_distance_loss(f_s, f_t, *, squared=False, eps=1e-12):
        if not kernel_dtypes(f_s, f_t):
            return reference.rkd_distance_loss(f_s, f_t, squared=squared, eps=eps)
        return distance_term(k.pairwise_sq(flat_features(f_s)), k.pairwise_sq(flat_features(f_t.detach())), squared, eps)

    def rkd_angle_loss(f_s, f_t):
        if not kernel_dtypes(f_s, f_t):
            return reference.rkd_angle_loss(f_s, f_t)
        return angle_term(flat_features(f_s), flat_features(f_t.detach()))

    def rkd_loss(f_s, f_t, *, distance_weight=25.0, angle_weight=50.0, squared=False, eps=1e-12):
        if not kernel_dtypes(f_s, f_t):
            return reference.rkd_loss(f_s, f_t, distance_weight=distance_weight, angle_weight=angle_weight,
                                      squared=squared, eps=eps)
        loss = f_s.new_zeros((), dtype=compute_dtype(f_s))
        if distance_weight == 0.0 and angle_weight == 0.0:
            return loss
        x_s, x_t = flat_features(f_s), flat_features(f_t.detach())
        if distance_weight != 0.0:
            loss = loss + distance_weight * distance_term(k.pairwise_sq(x_s), k.pairwise_sq(x_t), squared, eps)
        if angle_weight != 0.0:
            loss = loss + angle_weight * angle_term(x_s, x_t)
        return loss

    def attention_map(f, p=2):
        if not kernel_dtypes(f):
            return reference.attention_map(f, p)
        return torch.nn.functional.normalize(k.channel_mean_pow(as_4d(f), float(p)), dim=1)

    def at_loss(f_s, f_t, *, p=2, mode="code"):
        if not kernel_dtypes(f_s, f_t):
            return reference.at_loss(f_s, f_t, p=p, mode=mode)
        f_s, f_t = match_spatial(f_s, f_t)
        diff = attention_map(f_s, p) - attention_map(f_t, p)
        if mode == "code":
            return diff.pow(2).mean()
        return torch.linalg.vector_norm(diff, dim=1).sum() / f_s.shape[0]

    return {"kd_loss": kd_loss, "kl_div_loss": kl_div_loss, "jsd_loss": jsd_loss, "dkd_loss": dkd_loss,
            "rkd_distance_loss": rkd_distance_loss, "rkd_angle_loss": rkd_angle_loss, "rkd_loss": rkd_loss,
            "attention_map": attention_map, "at_loss": at_loss}


def register_backend(backend: str, kernels: KernelSet) -> dict[str, Callable]:
    """Register every loss of `make_losses(kernels)` as `backend`'s implementation; returns them by name."""
    losses = make_losses(kernels)
    for name, fn in losses.items():
        _dispatch.register(name, backend, fn)
    return losses
