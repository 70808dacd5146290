"""Reference relational KD (Park et al. 2019): RKD distance and angle losses in plain PyTorch.

The maths is that of RepDistiller, mdistiller, torchdistill and the authors' code. Inputs are
flattened to `(B, D)`; arithmetic runs in float32 or wider. The teacher side is detached, as those
implementations compute it under `torch.no_grad()`.

The angle term builds `(B, B, D)` differences and a `(B, B, B)` tensor, exactly as those implementations
do: this is the definition, kept readable; the kernels compute the same from the `B x B` Gram matrix.
`x @ x.T` follows PyTorch's TF32 flags on CUDA (`torch.backends.cuda.matmul.allow_tf32`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .logits import compute_dtype


def flat_features(f: torch.Tensor) -> torch.Tensor:
    return f.reshape(f.shape[0], -1).to(compute_dtype(f))


def pairwise_distances(x: torch.Tensor, squared: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """`D_ij = sqrt(clamp(|x_i|^2 + |x_j|^2 - 2 x_i.x_j, min=eps))` (squared: no sqrt), `D_ii = 0`."""
    sq_norms = x.pow(2).sum(1)
    return distances_from_squared(sq_norms[:, None] + sq_norms[None, :] - 2.0 * (x @ x.T), squared, eps)


def distances_from_squared(d2: torch.Tensor, squared: bool, eps: float) -> torch.Tensor:
    """`sqrt(clamp(d2, min=eps))` (squared: no sqrt) with a zero diagonal.

    Clamp-then-sqrt, as every RKD implementation: off-diagonal distances are at least sqrt(eps).
    """
    d2 = d2.clamp(min=eps)
    d = d2 if squared else d2.sqrt()
    eye = torch.eye(d.shape[0], dtype=torch.bool, device=d.device)
    return d.masked_fill(eye, 0.0)


def mean_normalized(d: torch.Tensor) -> torch.Tensor:
    """Distances divided by the mean of the positive ones (the off-diagonal ones).

    `sum(d) / count(d > 0)` equals RKD's `d[d > 0].mean()`, gradient included (d >= 0, and the zeros
    contribute nothing), without a data-dependent shape.
    """
    return d / (d.sum() / (d > 0).sum())


def normalized_distances(x: torch.Tensor, squared: bool, eps: float) -> torch.Tensor:
    """The pairwise distances of the rows, divided by the mean of the positive ones."""
    return mean_normalized(pairwise_distances(x, squared, eps))


def rkd_distance_loss(f_s: torch.Tensor, f_t: torch.Tensor, *, squared: bool = False,
                      eps: float = 1e-12) -> torch.Tensor:
    """`smooth_l1(D_s / mean(D_s), D_t / mean(D_t))` averaged over all `B^2` entries, diagonal included.

    The student's normaliser carries gradient; the teacher is detached. Huber with beta 1.
    """
    t = normalized_distances(flat_features(f_t).detach(), squared, eps)
    s = normalized_distances(flat_features(f_s), squared, eps)
    return F.smooth_l1_loss(s, t)


def angles(x: torch.Tensor) -> torch.Tensor:
    """`A_ijk = e_ij . e_ik` with `e_ij = normalize(x_j - x_i)` (the zero vector when i = j), `(B, B, B)`."""
    e = F.normalize(x[None, :, :] - x[:, None, :], p=2, dim=2)
    return torch.bmm(e, e.transpose(1, 2))


def rkd_angle_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """`smooth_l1(A_s, A_t)` averaged over all `B^3` triples; the teacher is detached."""
    return F.smooth_l1_loss(angles(flat_features(f_s)), angles(flat_features(f_t).detach()))


def rkd_loss(f_s: torch.Tensor, f_t: torch.Tensor, *, distance_weight: float = 25.0, angle_weight: float = 50.0,
             squared: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """`distance_weight * L_distance + angle_weight * L_angle` (RepDistiller's `RKDLoss(w_d=25, w_a=50)`).

    A weight of 0 skips its term, as torchdistill does.
    """
    loss = f_s.new_zeros((), dtype=compute_dtype(f_s))
    if distance_weight != 0.0:
        loss = loss + distance_weight * rkd_distance_loss(f_s, f_t, squared=squared, eps=eps)
    if angle_weight != 0.0:
        loss = loss + angle_weight * rkd_angle_loss(f_s, f_t)
    return loss
