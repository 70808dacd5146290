"""RepDistiller's loss classes, backed by fastkd.

Change `from distiller_zoo import DistillKL, HintLoss, Attention, ...` to
`from fastkd.compat.repdistiller import DistillKL, HintLoss, Attention, ...` and a RepDistiller-style
training script gets the same losses and gradients: same constructor arguments, same call, same return
types (lists where RepDistiller returns lists). Each class takes an extra keyword `backend`.

Differences, all where RepDistiller returns NaN or fails: teacher probabilities that underflow to 0
contribute 0; PKT gives a NaN loss (not a finite one) for NaN/Inf features and a zero gradient for an
all-zero feature row; NST uses a batched product instead of a `(B, C, C, HW)` broadcast.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .. import functional as KF
from ..losses import ConvRegressor

__all__ = ["DistillKL", "HintLoss", "Attention", "Similarity", "RKDLoss", "PKT", "FSP", "NSTLoss", "Correlation",
           "ConvReg"]


class DistillKL(nn.Module):
    """`DistillKL(T)(y_s, y_t) = T^2 / B * sum KL(softmax(y_t/T) || softmax(y_s/T))`.

    As RepDistiller, classes are dim 1 and the sum is divided by `y_s.shape[0]`, also for `(B, C, ...)`.
    """

    def __init__(self, T, *, backend=None):
        super().__init__()
        self.T, self.backend = T, backend

    def forward(self, y_s, y_t):
        if y_s.dim() <= 2:
            return KF.kd_loss(y_s, y_t, self.T, backend=self.backend)
        total = KF.kd_loss(y_s.movedim(1, -1), y_t.movedim(1, -1), self.T, reduction="sum", backend=self.backend)
        return total / y_s.shape[0]


class HintLoss(nn.Module):
    """FitNets: `HintLoss()(f_s, f_t)` is the MSE of already-regressed student features and the teacher's."""

    def __init__(self, *, backend=None):
        super().__init__()
        self.backend = backend

    def forward(self, f_s, f_t):
        return KF.hint_loss(f_s, f_t, backend=self.backend)


class Attention(nn.Module):
    """`Attention(p=2)(g_s, g_t)` returns a list: one attention-transfer loss per pair of maps."""

    def __init__(self, p=2, *, backend=None):
        super().__init__()
        self.p, self.backend = p, backend

    def forward(self, g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [KF.at_loss(f_s, f_t, p=self.p, backend=self.backend) for f_s, f_t in zip(g_s, g_t)]


class Similarity(nn.Module):
    """`Similarity()(g_s, g_t)` returns a list of shape-(1,) losses, one per pair, as RepDistiller does."""

    def __init__(self, *, backend=None):
        super().__init__()
        self.backend = backend

    def forward(self, g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [KF.sp_loss(f_s, f_t, backend=self.backend).reshape(1) for f_s, f_t in zip(g_s, g_t)]


class RKDLoss(nn.Module):
    """`RKDLoss(w_d=25, w_a=50)(f_s, f_t)`."""

    def __init__(self, w_d=25, w_a=50, *, backend=None):
        super().__init__()
        self.w_d, self.w_a, self.backend = w_d, w_a, backend

    def forward(self, f_s, f_t):
        return KF.rkd_loss(f_s, f_t, distance_weight=self.w_d, angle_weight=self.w_a, backend=self.backend)


class PKT(nn.Module):
    """`PKT()(f_s, f_t)`: probabilistic knowledge transfer with eps 1e-7."""

    def __init__(self, *, backend=None):
        super().__init__()
        self.backend = backend

    def forward(self, f_s, f_t):
        return KF.pkt_loss(f_s, f_t, backend=self.backend)


class FSP(nn.Module):
    """`FSP(s_shapes, t_shapes)(g_s, g_t)` returns a list: one loss per consecutive layer pair.

    As RepDistiller, the constructor checks that student and teacher channel counts match per layer.
    """

    def __init__(self, s_shapes, t_shapes, *, backend=None):
        super().__init__()
        if len(s_shapes) != len(t_shapes):
            raise ValueError(f"s_shapes and t_shapes must have the same length, got {len(s_shapes)} and "
                             f"{len(t_shapes)}")
        for i, (s, t) in enumerate(zip(s_shapes, t_shapes)):
            if s[1] != t[1]:
                raise ValueError(f"layer {i}: student and teacher channels must match for FSP, got {s[1]} and {t[1]}")
        self.backend = backend

    def forward(self, g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        # Each pair is validated by the loss itself; the list form needs the per-pair terms.
        return [KF.fsp_loss([g_s[i], g_s[i + 1]], [g_t[i], g_t[i + 1]], backend=self.backend)
                for i in range(len(g_s) - 1)]


class NSTLoss(nn.Module):
    """`NSTLoss()(g_s, g_t)` returns a list: one neuron-selectivity-transfer loss per pair of maps."""

    def __init__(self, *, backend=None):
        super().__init__()
        self.backend = backend

    def forward(self, g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [KF.nst_loss(f_s, f_t, backend=self.backend) for f_s, f_t in zip(g_s, g_t)]


class Correlation(nn.Module):
    """`Correlation()(f_s, f_t)`: correlation congruence on embeddings."""

    def __init__(self, *, backend=None):
        super().__init__()
        self.backend = backend

    def forward(self, f_s, f_t):
        return KF.cc_loss(f_s, f_t, backend=self.backend)


class ConvReg(ConvRegressor):
    """`ConvReg(s_shape, t_shape, use_relu=True)`: the FitNets regressor."""
