"""TRL's generalized JSD loss on fastkd's kernels: `GKDTrainer.generalized_jsd_loss`, patched in with one line.

    from trl.experimental.gkd import GKDTrainer   # trl.GKDTrainer before TRL 0.29
    import fastkd.compat.trl
    GKDTrainer.generalized_jsd_loss = fastkd.compat.trl.generalized_jsd_loss

`generalized_jsd_loss` is a `staticmethod` object, as TRL's is (the trainer calls it on itself with keyword
arguments): assigned to the class it stays static, and it can be called directly too (Python >= 3.10).

It follows TRL 1.16 (`trl/experimental/gkd/gkd_trainer.py`): `p = softmax(logits / T)` on both sides, no T^2;
`m = beta p_t + (1 - beta) p_s`, `beta KL(p_t || m) + (1 - beta) KL(p_s || m)`; beta 0 exactly `KL(p_t || p_s)`,
beta 1 exactly `KL(p_s || p_t)`; tokens whose label is -100 are left out. Reductions:
- "batchmean": with labels, the sum over kept tokens / their count (at least 1); without labels, the sum
  / `student_logits.shape[0]`: the batch size for `(B, T, V)` logits, as TRL's `jsd.size(0)`.
- "sum": the sum. "mean": the sum / (kept tokens x V), TRL's elementwise mean (without labels, all tokens).
- `num_items_in_batch` (a number or tensor): the sum / it, whatever the reduction, as TRL.
Differences, each on purpose: the arithmetic runs in float32 (TRL's runs in the logits' dtype, bfloat16 in
training, and rounds beta to it) and the loss comes back in float32; "mean" with every token masked is 0 (TRL's
is the NaN mean of nothing); reduction "none" (TRL: the elementwise `(..., V)` divergences, which a fused kernel
never forms) raises a ValueError.
"""
from __future__ import annotations

from .. import functional as KF

REDUCTIONS = ("batchmean", "sum", "mean")


def _generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                          reduction="batchmean", num_items_in_batch=None):
    """`GKDTrainer.generalized_jsd_loss` on fastkd's kernels (module docstring)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS} in fastkd's generalized_jsd_loss, got {reduction!r} "
                         f"(TRL's 'none' returns the elementwise (..., V) divergences, which fastkd's fused kernels "
                         f"never form; sum them with reduction='sum', or use fastkd.functional.jsd_loss with "
                         f"reduction='none' for one divergence per token)")
    options = dict(beta=beta, temperature=temperature, labels=labels, ignore_index=-100)
    if num_items_in_batch is not None:
        return KF.jsd_loss(student_logits, teacher_logits, reduction="sum", **options) / num_items_in_batch
    if reduction == "batchmean" and labels is None:
        return KF.jsd_loss(student_logits, teacher_logits, reduction="sum", **options) / max(student_logits.shape[0], 1)
    return KF.jsd_loss(student_logits, teacher_logits, reduction=reduction, **options)


generalized_jsd_loss = staticmethod(_generalized_jsd_loss)
