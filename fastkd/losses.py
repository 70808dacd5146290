"""The losses as `torch.nn.Module`s: constructor arguments are the options of `fastkd.functional`."""
from __future__ import annotations

from numbers import Integral
from typing import Sequence

import torch
from torch import nn

from . import _checks as checks
from . import functional as KF
from ._dispatch import check_backend_name

__all__ = [
    "KDLoss", "KLDivLoss", "KLDistillationLoss", "JSDLoss", "DKDLoss", "SparseKDLoss", "FusedLinearDistillLoss",
    "MutualLearningLoss", "RKDLoss",
    "AttentionTransferLoss", "SimilarityLoss", "FSPLoss", "PKTLoss", "NSTLoss", "CCLoss", "HintLoss",
    "ConvRegressor",
]


def backend_option(backend: str | None) -> str | None:
    """A module's backend, checked when it is built; None defers to FASTKD_BACKEND at each call."""
    return None if backend is None else check_backend_name(backend)


def set_temperature(module: nn.Module, temperature) -> None:
    """`module.temperature`: a number; an `nn.Parameter` (learned with the model); another tensor as a buffer, so
    that `module.to(device)` moves it with the module."""
    temperature = checks.check_temperature_setting(temperature)
    if isinstance(temperature, torch.Tensor) and not isinstance(temperature, nn.Parameter):
        module.register_buffer("temperature", temperature)
    else:
        module.temperature = temperature


class KDLoss(nn.Module):
    """Hinton KD with an optional hard-label term; `forward(student_logits, teacher_logits, target=None)`.

    `KDLoss(4.0)` is RepDistiller's `DistillKL(4)`; `KDLoss(4.0, ce_weight=0.1, kd_weight=0.9)` is its
    default training mix, called with the target. A learnable temperature (CTKD) is a parameter of the module:
    `KDLoss(nn.Parameter(torch.tensor(4.0)))` (any logit loss module here takes a tensor temperature).
    """

    def __init__(self, temperature: float | torch.Tensor = 4.0, *, reduction: str = "batchmean", ce_weight: float = 0.0,
                 kd_weight: float = 1.0, process_group=None, vocab_range=None, backend: str | None = None):
        super().__init__()
        set_temperature(self, temperature)
        self.reduction = checks.check_choice("reduction", reduction, checks.LOGIT_REDUCTIONS)
        self.ce_weight = checks.check_number("ce_weight", ce_weight)
        self.kd_weight = checks.check_number("kd_weight", kd_weight)
        self.process_group, self.vocab_range = process_group, vocab_range
        self.backend = backend_option(backend)

    def forward(self, student_logits, teacher_logits, target=None):
        return KF.kd_loss(student_logits, teacher_logits, self.temperature, reduction=self.reduction,
                          target=target, ce_weight=self.ce_weight, kd_weight=self.kd_weight,
                          process_group=self.process_group, vocab_range=self.vocab_range, backend=self.backend)

    def extra_repr(self):
        return (f"temperature={self.temperature}, reduction={self.reduction!r}, ce_weight={self.ce_weight}, "
                f"kd_weight={self.kd_weight}")


class KLDivLoss(nn.Module):
    """Drop-in for `torch.nn.KLDivLoss`: same constructor, `forward(input, target)` with `input` log-probs.

    Differs where PyTorch returns NaN (a target probability of 0 contributes 0, even against -inf) and in
    the result's dtype: float32 for float16/bfloat16 inputs, as every fastkd loss.
    """

    def __init__(self, size_average=None, reduce=None, reduction: str = "mean", log_target: bool = False, *,
                 backend: str | None = None):
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = nn.modules.loss._Reduction.legacy_get_string(size_average, reduce)
        self.reduction = checks.check_choice("reduction", reduction, checks.LOGIT_REDUCTIONS)
        self.log_target, self.backend = log_target, backend_option(backend)

    def forward(self, input, target):
        return KF.kl_div(input, target, self.reduction, self.log_target, backend=self.backend)


class KLDistillationLoss(nn.Module):
    """Token-level KL for LM distillation; `forward(student_logits, teacher_logits, labels=None)`.

    direction "forward" is `KL(p_t || p_s)`, "reverse" `KL(p_s || p_t)`; tokens labelled `ignore_index`
    are left out of the mean.
    """

    def __init__(self, temperature: float | torch.Tensor = 1.0, *, direction: str = "forward",
                 ignore_index: int = -100, reduction: str = "batchmean", process_group=None, vocab_range=None,
                 backend: str | None = None):
        super().__init__()
        set_temperature(self, temperature)
        self.process_group, self.vocab_range = process_group, vocab_range
        self.direction = checks.check_choice("direction", direction, KF.DIRECTIONS)
        self.reduction = checks.check_choice("reduction", reduction, checks.LOGIT_REDUCTIONS)
        self.ignore_index = checks.check_int("ignore_index", ignore_index)
        self.backend = backend_option(backend)

    def forward(self, student_logits, teacher_logits, labels=None):
        return KF.kl_div_loss(student_logits, teacher_logits, self.temperature, direction=self.direction,
                              labels=labels, ignore_index=self.ignore_index, reduction=self.reduction,
                              process_group=self.process_group, vocab_range=self.vocab_range, backend=self.backend)


class JSDLoss(nn.Module):
    """TRL's generalized JSD; `forward(student_logits, teacher_logits, labels=None)`."""

    def __init__(self, beta: float = 0.5, temperature: float | torch.Tensor = 1.0, *, ignore_index: int = -100,
                 reduction: str = "batchmean", process_group=None, vocab_range=None, backend: str | None = None):
        super().__init__()
        self.process_group, self.vocab_range = process_group, vocab_range
        self.beta = checks.check_unit_interval("beta", beta)
        set_temperature(self, temperature)
        self.reduction = checks.check_choice("reduction", reduction, checks.LOGIT_REDUCTIONS)
        self.ignore_index = checks.check_int("ignore_index", ignore_index)
        self.backend = backend_option(backend)

    def forward(self, student_logits, teacher_logits, labels=None):
        return KF.jsd_loss(student_logits, teacher_logits, beta=self.beta, temperature=self.temperature,
                           labels=labels, ignore_index=self.ignore_index, reduction=self.reduction,
                           process_group=self.process_group, vocab_range=self.vocab_range, backend=self.backend)


class SparseKDLoss(nn.Module):
    """KD against a sparse teacher (its top-k or sampled ids and their log-probabilities);
    `forward(student_logits, teacher_indices, teacher_logprobs, labels=None, *, num_items_in_batch=None)`.

    The options are `fastkd.functional.sparse_kd_loss`'s: `tail` "renormalize" (any temperature), "bucket" or
    "none" (temperature 1).
    """

    def __init__(self, tail: str = "renormalize", *, temperature: float = 1.0, ignore_index: int = -100,
                 reduction: str = "batchmean", process_group=None, vocab_range=None, backend: str | None = None):
        super().__init__()
        self.process_group, self.vocab_range = process_group, vocab_range
        self.tail = checks.check_choice("tail", tail, KF.SPARSE_TAILS)
        self.temperature = checks.check_sparse_temperature(temperature, tail)
        self.ignore_index = checks.check_int("ignore_index", ignore_index)
        self.reduction = checks.check_choice("reduction", reduction, checks.LOGIT_REDUCTIONS)
        self.backend = backend_option(backend)

    def forward(self, student_logits, teacher_indices, teacher_logprobs, labels=None, *, num_items_in_batch=None):
        return KF.sparse_kd_loss(student_logits, teacher_indices, teacher_logprobs, labels, tail=self.tail,
                                 temperature=self.temperature, ignore_index=self.ignore_index,
                                 num_items_in_batch=num_items_in_batch, reduction=self.reduction,
                                 process_group=self.process_group, vocab_range=self.vocab_range,
                                 backend=self.backend)

    def extra_repr(self):
        return f"tail={self.tail!r}, temperature={self.temperature}, reduction={self.reduction!r}"


class FusedLinearDistillLoss(nn.Module):
    """The student's output layer and a distillation loss fused by chunks of tokens (no `N x V` logits):
    `forward(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None, *,
    student_bias=None, teacher_bias=None, teacher_logits=None, teacher_topk=None, num_items_in_batch=None)`.

    The options are `fastkd.functional.fused_linear_distill_loss`'s. Typical use with Hugging Face models: the
    hidden states of the last layer (`output_hidden_states=True`, shifted as the labels) and
    `model.lm_head.weight` of both models, the labels shifted by one token. With a teacher cache, pass
    `teacher_topk=(ids, logprobs)` to forward instead of the teacher; `tail` is then the sparse teacher's (a
    module with a `tail` other than "renormalize" takes sparse teachers only).
    """

    def __init__(self, loss: str = "forward_kl", *, beta: float = 0.5, temperature: float = 1.0,
                 ignore_index: int = -100, ce_weight: float = 0.0, kd_weight: float = 1.0,
                 student_softcap: float | None = None, teacher_softcap: float | None = None,
                 vocab_mismatch: str = "error", chunk_size: int | None = None, tail: str = "renormalize",
                 process_group=None, vocab_range=None, backend: str | None = None):
        super().__init__()
        self.process_group, self.vocab_range = process_group, vocab_range
        self.loss = checks.check_choice("loss", loss, KF.fused_linear.LOSSES)
        self.beta = checks.check_unit_interval("beta", beta)
        self.temperature = checks.check_positive("temperature", temperature)
        self.tail = checks.check_choice("tail", tail, KF.SPARSE_TAILS)
        if tail != "renormalize":  # a module for sparse teachers only: what the call would refuse, refused now
            checks.check_sparse_temperature(self.temperature, tail)
            if loss not in KF.fused_linear.SPARSE_LOSSES:
                raise ValueError(f"tail={tail!r} is for a sparse teacher, which gives the forward KL only: loss must "
                                 f"be one of {KF.fused_linear.SPARSE_LOSSES}, got {loss!r}")
        self.ignore_index = checks.check_int("ignore_index", ignore_index)
        self.ce_weight = checks.check_number("ce_weight", ce_weight)
        self.kd_weight = checks.check_number("kd_weight", kd_weight)
        self.student_softcap, self.teacher_softcap = student_softcap, teacher_softcap
        self.vocab_mismatch = checks.check_choice("vocab_mismatch", vocab_mismatch, checks.VOCAB_MISMATCH)
        self.chunk_size = chunk_size
        self.backend = backend_option(backend)

    def forward(self, student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None, *,
                student_bias=None, teacher_bias=None, teacher_logits=None, teacher_topk=None, num_items_in_batch=None):
        return KF.fused_linear_distill_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, loss=self.loss, beta=self.beta,
            temperature=self.temperature, ignore_index=self.ignore_index, ce_weight=self.ce_weight,
            kd_weight=self.kd_weight, student_bias=student_bias, teacher_bias=teacher_bias,
            teacher_logits=teacher_logits, teacher_topk=teacher_topk, tail=self.tail,
            student_softcap=self.student_softcap,
            teacher_softcap=self.teacher_softcap, vocab_mismatch=self.vocab_mismatch,
            num_items_in_batch=num_items_in_batch, chunk_size=self.chunk_size, process_group=self.process_group,
            vocab_range=self.vocab_range, backend=self.backend)

    def extra_repr(self):
        return (f"loss={self.loss!r}, beta={self.beta}, temperature={self.temperature}, ce_weight={self.ce_weight}, "
                f"kd_weight={self.kd_weight}" + ("" if self.tail == "renormalize" else f", tail={self.tail!r}"))


class DKDLoss(nn.Module):
    """Decoupled KD; `forward(student_logits, teacher_logits, target, epoch=None)`.

    With `warmup > 0` and an `epoch`, the loss is scaled by `min(epoch / warmup, 1)` as mdistiller's
    trainer does (its CIFAR default: warmup 20).
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float | torch.Tensor = 4.0, *,
                 warmup: int = 0, backend: str | None = None):
        super().__init__()
        set_temperature(self, temperature)
        self.alpha, self.beta = checks.check_number("alpha", alpha), checks.check_number("beta", beta)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be a non-negative int (epochs), got {warmup!r}")
        self.warmup, self.backend = warmup, backend_option(backend)

    def forward(self, student_logits, teacher_logits, target, epoch: float | None = None):
        loss = KF.dkd_loss(student_logits, teacher_logits, target, alpha=self.alpha, beta=self.beta,
                           temperature=self.temperature, backend=self.backend)
        if self.warmup > 0 and epoch is not None:
            loss = loss * min(epoch / self.warmup, 1.0)
        return loss


class MutualLearningLoss(nn.Module):
    """Deep mutual learning over a cohort; `forward(logits_list, target=None)` returns the cohort's sum."""

    def __init__(self, temperature: float | torch.Tensor = 1.0, *, ce_weight: float = 1.0, kl_weight: float = 1.0,
                 backend: str | None = None):
        super().__init__()
        set_temperature(self, temperature)
        self.ce_weight = checks.check_number("ce_weight", ce_weight)
        self.kl_weight = checks.check_number("kl_weight", kl_weight)
        self.backend = backend_option(backend)

    def forward(self, logits: Sequence[torch.Tensor], target=None):
        return KF.mutual_learning_loss(logits, target, temperature=self.temperature, ce_weight=self.ce_weight,
                                       kl_weight=self.kl_weight, backend=self.backend)


class RKDLoss(nn.Module):
    """Relational KD, distance and angle; `forward(f_s, f_t)` on `(B, ...)` features."""

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0, *, squared: bool = False,
                 eps: float = 1e-12, process_group=None, backend: str | None = None):
        super().__init__()
        self.process_group = process_group
        self.distance_weight = checks.check_number("distance_weight", distance_weight)
        self.angle_weight = checks.check_number("angle_weight", angle_weight)
        self.squared, self.eps = squared, checks.check_positive("eps", eps)
        self.backend = backend_option(backend)

    def forward(self, f_s, f_t):
        return KF.rkd_loss(f_s, f_t, distance_weight=self.distance_weight, angle_weight=self.angle_weight,
                           squared=self.squared, eps=self.eps, process_group=self.process_group, backend=self.backend)


def _as_pairs(feats_s, feats_t):
    """One tensor each, or equal-length lists of tensors."""
    if isinstance(feats_s, torch.Tensor) and isinstance(feats_t, torch.Tensor):
        return [feats_s], [feats_t]
    checks.check_feature_lists("feats_s", feats_s, "feats_t", feats_t)
    return feats_s, feats_t


def _reduce_pairs(losses: list[torch.Tensor], reduction: str) -> torch.Tensor:
    stacked = torch.stack(losses)
    return stacked if reduction == "none" else stacked.sum()


class _PairwiseFeatureLoss(nn.Module):
    """A loss applied to each (student, teacher) feature pair by the subclass's `pair_loss`;
    "sum" adds them, "none" stacks them."""

    def __init__(self, reduction: str = "sum", backend: str | None = None):
        super().__init__()
        self.reduction = checks.check_choice("reduction", reduction, ("sum", "none"))
        self.backend = backend_option(backend)

    def forward(self, feats_s, feats_t):
        feats_s, feats_t = _as_pairs(feats_s, feats_t)
        return _reduce_pairs([self.pair_loss(s, t) for s, t in zip(feats_s, feats_t)], self.reduction)


class AttentionTransferLoss(_PairwiseFeatureLoss):
    """Attention transfer over lists of maps (or one map each); `forward(feats_s, feats_t)`."""

    def __init__(self, p: float = 2, mode: str = "code", *, reduction: str = "sum", backend: str | None = None):
        super().__init__(reduction, backend)
        self.p, self.mode = checks.check_positive("p", p), checks.check_choice("mode", mode, KF.AT_MODES)

    def pair_loss(self, f_s, f_t):
        return KF.at_loss(f_s, f_t, p=self.p, mode=self.mode, backend=self.backend)


class SimilarityLoss(_PairwiseFeatureLoss):
    """Similarity-preserving KD over lists of features (or one each)."""

    def __init__(self, norm: str = "l2", *, reduction: str = "sum", process_group=None, backend: str | None = None):
        super().__init__(reduction, backend)
        self.norm = checks.check_choice("norm", norm, KF.SP_NORMS)
        self.process_group = process_group

    def pair_loss(self, f_s, f_t):
        return KF.sp_loss(f_s, f_t, norm=self.norm, process_group=self.process_group, backend=self.backend)


class NSTLoss(_PairwiseFeatureLoss):
    """Neuron selectivity transfer over lists of maps (or one each)."""

    def pair_loss(self, f_s, f_t):
        return KF.nst_loss(f_s, f_t, backend=self.backend)


class FSPLoss(nn.Module):
    """FSP over consecutive layers; `forward(feats_s, feats_t)` with lists of >= 2 maps each."""

    def __init__(self, *, backend: str | None = None):
        super().__init__()
        self.backend = backend_option(backend)

    def forward(self, feats_s, feats_t):
        return KF.fsp_loss(feats_s, feats_t, backend=self.backend)


class PKTLoss(nn.Module):
    """Probabilistic knowledge transfer; `forward(f_s, f_t)`."""

    def __init__(self, eps: float = 1e-7, *, process_group=None, backend: str | None = None):
        super().__init__()
        self.eps, self.backend = checks.check_positive("eps", eps), backend_option(backend)
        self.process_group = process_group

    def forward(self, f_s, f_t):
        return KF.pkt_loss(f_s, f_t, eps=self.eps, process_group=self.process_group, backend=self.backend)


class CCLoss(nn.Module):
    """Correlation congruence (RepDistiller's `Correlation`); `forward(f_s, f_t)`."""

    def __init__(self, *, process_group=None, backend: str | None = None):
        super().__init__()
        self.backend = backend_option(backend)
        self.process_group = process_group

    def forward(self, f_s, f_t):
        return KF.cc_loss(f_s, f_t, process_group=self.process_group, backend=self.backend)


class HintLoss(nn.Module):
    """FitNets hint: `mse(regressor(f_s), f_t)`; the regressor (optional) is a submodule and trains with it."""

    def __init__(self, regressor: nn.Module | None = None, *, backend: str | None = None):
        super().__init__()
        self.regressor, self.backend = regressor, backend_option(backend)

    def forward(self, f_s, f_t):
        return KF.hint_loss(f_s, f_t, self.regressor, backend=self.backend)


class ConvRegressor(nn.Module):
    """Maps student maps `(B, C_s, H_s, W_s)` to the teacher's `(B, C_t, H_t, W_t)`: conv, batch norm, ReLU.

    The convolution is chosen as RepDistiller's `ConvReg`: stride 2 (3x3) when the student is twice the
    teacher's height, a transposed convolution when it is half, otherwise a valid convolution with a
    `(1 + H_s - H_t, 1 + W_s - W_t)` kernel (1x1 for equal sizes).

    Args:
        student_shape: the student maps' shape `(B, C_s, H_s, W_s)` (a `torch.Size` or any 4 ints; B is unused).
        teacher_shape: the teacher maps' shape `(B, C_t, H_t, W_t)`.
        use_relu: end with a ReLU (RepDistiller's default), or return the batch-normed convolution.
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int], use_relu: bool = True) -> None:
        super().__init__()
        _, c_s, h_s, w_s = _map_shape("student_shape", student_shape)
        _, c_t, h_t, w_t = _map_shape("teacher_shape", teacher_shape)
        if h_s == 2 * h_t:
            self.conv = nn.Conv2d(c_s, c_t, kernel_size=3, stride=2, padding=1)
        elif 2 * h_s == h_t:
            self.conv = nn.ConvTranspose2d(c_s, c_t, kernel_size=4, stride=2, padding=1)
        elif h_s >= h_t and w_s >= w_t:
            self.conv = nn.Conv2d(c_s, c_t, kernel_size=(1 + h_s - h_t, 1 + w_s - w_t))
        else:
            raise ValueError(f"no regressor maps student size {h_s}x{w_s} to teacher size {h_t}x{w_t}: the student "
                             f"must be twice, half, or at least the teacher's size")
        self.bn = nn.BatchNorm2d(c_t)
        self.use_relu = use_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Student maps `(B, C_s, H_s, W_s)` to `(B, C_t, H_t, W_t)`."""
        x = self.bn(self.conv(x))
        return torch.relu(x) if self.use_relu else x


def _map_shape(name: str, shape: object) -> tuple[int, int, int, int]:
    """A `(batch, channels, height, width)` shape of positive ints (a tensor's `.shape`, a tuple or a list)."""
    if isinstance(shape, torch.Tensor) or not isinstance(shape, Sequence) or len(shape) != 4:
        raise ValueError(f"{name} must be a 4-d map shape (batch, channels, height, width), got {shape!r}")
    if not all(isinstance(d, Integral) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ValueError(f"{name} must hold 4 positive ints (batch, channels, height, width), got {tuple(shape)}")
    return tuple(int(d) for d in shape)


def __dir__() -> list[str]:
    # dir() and tab completion list the public API, not this module's imports and helpers.
    return sorted(__all__)
