"""Liger-Kernel's fused linear + distillation losses on `fastkd.functional.fused_linear_distill_loss`.

Same constructors and calls as Liger-Kernel 0.8.5 (`liger_kernel.chunked_loss` and `liger_kernel.transformers`);
swap the import:

    from fastkd.compat.liger import LigerFusedLinearJSDLoss   # was: from liger_kernel.chunked_loss import ...

- `LigerFusedLinearJSDLoss` (chunked): `weight_hard_loss * CE + weight_soft_loss * JSD_beta`, both sums over the
  tokens whose label is not `ignore_index` / their count (at least 1); the JSD on `logits / T` (no T^2), the CE on
  the untempered student logits. Liger's beta: `m = beta p_t + (1 - beta) p_s`, `beta KL(p_t || m) + (1 - beta)
  KL(p_s || m)`, beta 0 exactly `KL(p_t || p_s)` and 1 exactly `KL(p_s || p_t)` (fastkd's "jsd", TRL's too).
  `return_soft_hard_loss=True` returns `(loss, soft, hard)` (soft and hard for logging: not differentiable).
- `LigerFusedLinearJSD` (Triton): the JSD alone, over kept tokens / their count, or / all tokens without labels.
- `LigerFusedLinearKLDivLoss` (Triton, Liger 0.8.4+): `KL(target || softmax(student / T))` with the teacher given
  as probabilities `(BT, V)` (not tempered), reduction "batchmean" (/ kept tokens), "mean" (/ kept tokens x V) or
  "sum".

Differences, each on purpose:
- The arithmetic runs in float32 for 16-bit inputs (Liger's chunked JSD runs in the input dtype); the results
  agree with Liger's float32 numbers, and are more accurate than its bfloat16 ones.
- Liger's `compiled`, `chunk_size` and `accum_dtype` are accepted; `chunk_size` is fastkd's tokens per chunk
  (Liger splits into `BT // chunk_size` chunks), which changes only rounding; the other two change nothing.
- Vocabularies of different sizes raise a ValueError: Liger pads the student with logits of 0 when the teacher's
  is larger (the padding gets probability mass) and fails when it is smaller; use
  `fastkd.functional.fused_linear_distill_loss(..., vocab_mismatch="truncate")` for the shared ids.
- `LigerFusedLinearKLDivLoss` renormalises the target (it is a distribution; Liger uses unnormalised rows as
  given), and with a temperature it forms `T log(target)` once (a `(BT, V)` tensor, the size of the target).
- Without labels the chunked loss takes every token (Liger's fails on `true_labels=None`).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _checks as checks
from .. import functional as KF

KL_REDUCTIONS = ("batchmean", "mean", "sum")


def _same_vocabulary(student_weight, teacher_vocab: int) -> None:
    if student_weight.shape[0] != teacher_vocab:
        raise ValueError(f"the student's vocabulary has {student_weight.shape[0]} ids and the teacher's "
                         f"{teacher_vocab}: Liger pads the student with logits of 0 (or fails), which this drop-in "
                         f"does not copy; call fastkd.functional.fused_linear_distill_loss with "
                         f"vocab_mismatch='truncate' to distil over the ids both share")


def _fused(student_input, student_weight, labels, **options):
    """`fastkd.functional._fused_linear_distill` with every option the drop-ins leave at fastkd's defaults."""
    defaults = dict(teacher_hidden=None, teacher_weight=None, loss="jsd", beta=0.5, temperature=1.0,
                    ignore_index=-100, ce_weight=0.0, kd_weight=1.0, student_bias=None, teacher_bias=None,
                    teacher_logits=None, student_softcap=None, teacher_softcap=None, vocab_mismatch="error",
                    num_items_in_batch=None, chunk_size=None, backend=None, return_terms=False)
    return KF._fused_linear_distill(student_input, student_weight, labels=labels, **{**defaults, **options})


class LigerFusedLinearJSDLoss(nn.Module):
    """`liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`; `forward(student_input, student_weight,
    teacher_input, teacher_weight, true_labels, student_bias=None, teacher_bias=None)` (module docstring)."""

    def __init__(self, weight_hard_loss: float = 0.5, weight_soft_loss: float = 0.5, beta: float = 0.5,
                 ignore_index: int = -100, temperature: float = 1.0, compiled: bool = True, chunk_size: int = 1024,
                 return_soft_hard_loss: bool = False, *, backend: str | None = None):
        super().__init__()
        self.weight_hard_loss = checks.check_number("weight_hard_loss", weight_hard_loss)
        self.weight_soft_loss = checks.check_number("weight_soft_loss", weight_soft_loss)
        self.beta = checks.check_unit_interval("beta", beta)
        self.ignore_index = checks.check_int("ignore_index", ignore_index)
        self.temperature = checks.check_positive("temperature", temperature)
        self.compiled, self.chunk_size = compiled, chunk_size
        self.return_soft_hard_loss = return_soft_hard_loss
        self.backend = backend

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, true_labels,
                student_bias=None, teacher_bias=None):
        _same_vocabulary(student_weight, teacher_weight.shape[0])
        loss, terms = _fused(student_input, student_weight, true_labels, teacher_hidden=teacher_input,
                             teacher_weight=teacher_weight, beta=self.beta, temperature=self.temperature,
                             ignore_index=self.ignore_index, ce_weight=self.weight_hard_loss if true_labels is not None
                             else 0.0, kd_weight=self.weight_soft_loss, student_bias=student_bias,
                             teacher_bias=teacher_bias, chunk_size=self.chunk_size, backend=self.backend,
                             return_terms=True)
        if not self.return_soft_hard_loss:
            return loss
        # Liger reports the unweighted terms.
        soft = terms[0] / self.weight_soft_loss if self.weight_soft_loss else _unweighted(
            student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias, teacher_bias,
            self, "soft")
        hard = terms[1] / self.weight_hard_loss if self.weight_hard_loss else _unweighted(
            student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias, teacher_bias,
            self, "hard")
        return loss, soft, hard


def _unweighted(student_input, student_weight, teacher_input, teacher_weight, labels, student_bias, teacher_bias,
                module, which):
    """A term whose weight is 0, for `return_soft_hard_loss`: computed without gradients."""
    with torch.no_grad():
        _, terms = _fused(student_input, student_weight, labels, teacher_hidden=teacher_input,
                          teacher_weight=teacher_weight, beta=module.beta, temperature=module.temperature,
                          ignore_index=module.ignore_index, ce_weight=1.0 if which == "hard" else 0.0,
                          kd_weight=1.0 if which == "soft" else 0.0, student_bias=student_bias,
                          teacher_bias=teacher_bias, chunk_size=module.chunk_size, backend=module.backend,
                          return_terms=True)
    return terms[0] if which == "soft" else terms[1]


class LigerFusedLinearJSD(nn.Module):
    """`liger_kernel.transformers.LigerFusedLinearJSD`; `forward(student_input, student_weight, teacher_input,
    teacher_weight, shift_labels=None)` (module docstring)."""

    def __init__(self, jsd_beta: float = 0.5, ignore_index: int = -100, temperature: float = 1.0,
                 accum_dtype=None, *, backend: str | None = None):
        super().__init__()
        self.jsd_beta = checks.check_unit_interval("jsd_beta", jsd_beta)
        self.ignore_index = checks.check_int("ignore_index", ignore_index)
        self.temperature = checks.check_positive("temperature", temperature)
        self.accum_dtype, self.backend = accum_dtype, backend

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, shift_labels=None):
        _same_vocabulary(student_weight, teacher_weight.shape[0])
        return _fused(student_input, student_weight, shift_labels, teacher_hidden=teacher_input,
                      teacher_weight=teacher_weight, beta=self.jsd_beta, temperature=self.temperature,
                      ignore_index=self.ignore_index, backend=self.backend)


class LigerFusedLinearKLDivLoss(nn.Module):
    """`liger_kernel.transformers.LigerFusedLinearKLDivLoss`; `forward(student_input, student_weight, target,
    shift_labels=None)` with `target` the teacher's probabilities `(BT, V)` (module docstring)."""

    def __init__(self, reduction: str = "batchmean", ignore_index: int = -100, temperature: float = 1.0,
                 eps: float = 1e-10, accum_dtype=None, *, backend: str | None = None):
        super().__init__()
        self.reduction = checks.check_choice("reduction", reduction, KL_REDUCTIONS)
        self.ignore_index = checks.check_int("ignore_index", ignore_index)
        self.temperature = checks.check_positive("temperature", temperature)
        self.eps, self.accum_dtype, self.backend = eps, accum_dtype, backend

    def forward(self, student_input, student_weight, target, shift_labels=None):
        checks.check_float_tensor("target", target)
        _same_vocabulary(student_weight, target.shape[-1])
        # Liger tempers the student only: teacher logits T log(target) are divided by T back to log(target).
        teacher_logits = target.log()
        if self.temperature != 1.0:
            teacher_logits = teacher_logits * self.temperature
        rows = student_input.numel() // student_input.shape[-1]
        kept = (shift_labels != self.ignore_index).sum().clamp(min=1) if shift_labels is not None else rows
        denominator = {"batchmean": None, "sum": 1, "mean": kept * target.shape[-1]}[self.reduction]
        return _fused(student_input, student_weight, shift_labels, teacher_logits=teacher_logits.reshape(*student_input.shape[:-1], -1),
                      loss="forward_kl", temperature=self.temperature, ignore_index=self.ignore_index,
                      num_items_in_batch=denominator, backend=self.backend)
