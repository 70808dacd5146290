"""Reference logit losses in plain PyTorch: Hinton KD, KL both ways, generalized JSD, DKD, pointwise KL.

These are the definitions every kernel is checked against. Conventions shared by all of them:
- Logits are `(..., C)`; every leading position is a row (a sample, or a token of a language model).
- Arithmetic runs in float32 for float16/bfloat16 inputs (float64 stays float64) and the loss comes back
  in that dtype; gradients reach the inputs in their own dtype.
- A probability of exactly 0 contributes 0 to a divergence and a zero gradient, also where the other
  distribution's log-probability is -inf (masked vocabulary). PyTorch's pointwise `kl_div` is NaN there.
- The teacher is not detached: it gets a gradient when it requires one (mutual learning).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`log_softmax(logits / T)` over the last dim, in float32 or wider."""
    return torch.log_softmax(logits.to(compute_dtype(logits)) / temperature, dim=-1)


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """`KL(p || q) = sum_c p_c (log p_c - log q_c)` per row, with `0 * log(0 / q) = 0` for any q.

    The difference is zeroed before the product, not after: `where` after a NaN product would still
    send NaN into the backward pass.
    """
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q, 0.0)
    return (p * diff).sum(-1)


def logsumexp_or_neg_inf(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`logsumexp` that is -inf with a zero (not NaN) gradient where every entry is -inf."""
    empty = (x == NEG_INF).all(dim, keepdim=True)
    total = torch.logsumexp(torch.where(empty, 0.0, x), dim)
    return torch.where(empty.squeeze(dim), NEG_INF, total)


def reduce_rows(per_row: torch.Tensor, reduction: str, count, classes: int) -> torch.Tensor:
    """Reduce per-row losses like `F.kl_div`: batchmean divides by the row (token) count, mean by
    count * classes (PyTorch's elementwise mean), none keeps the rows."""
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / count
    return total / (count * classes)


def masked_reduce(per_row: torch.Tensor, labels: torch.Tensor | None, ignore_index: int, reduction: str,
                  classes: int) -> torch.Tensor:
    """Token losses with `labels == ignore_index` set to 0 and left out of the count (at least 1)."""
    if labels is None:
        return reduce_rows(per_row, reduction, per_row.numel(), classes)
    keep = labels != ignore_index
    per_row = torch.where(keep, per_row, 0.0)
    return reduce_rows(per_row, reduction, keep.sum().clamp(min=1), classes)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0, *,
            reduction: str = "batchmean", target: torch.Tensor | None = None, ce_weight: float = 0.0,
            kd_weight: float = 1.0) -> torch.Tensor:
    """Hinton et al.'s distillation loss with an optional hard-label term.

    `loss = ce_weight * CE(z_s, y) + kd_weight * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`

    With the defaults this is RepDistiller's `DistillKL(T)`, mdistiller's `kd_loss` and
    Knowledge-Distillation-Zoo's `SoftTarget`: `T^2 / B * sum_{b,c} kl_div(log_softmax(z_s/T), softmax(z_t/T))`.
    RepDistiller's and mdistiller's training default adds the hard term as `ce_weight=0.1, kd_weight=0.9`.

    Shapes: logits `(..., C)`, target `(...)` class indices. Reductions apply to each term as PyTorch does:
    the KL term as `F.kl_div` ("batchmean": sum / rows, "mean": sum / (rows * C), "sum", "none": per row);
    the CE term as `F.cross_entropy` ("batchmean" and "mean" both average over rows).
    The CE term uses the raw student logits (no temperature), in float32 or wider.
    """
    rows = student_logits.numel() // student_logits.shape[-1]
    classes = student_logits.shape[-1]
    kl = kl_rows(log_probs(teacher_logits, temperature), log_probs(student_logits, temperature))
    loss = (kd_weight * temperature * temperature) * reduce_rows(kl, reduction, rows, classes)
    if target is not None and ce_weight != 0.0:
        logits = student_logits.to(compute_dtype(student_logits))
        ce = F.cross_entropy(logits.reshape(rows, classes), target.reshape(rows).long(), reduction="none")
        ce_reduction = "batchmean" if reduction == "mean" else reduction
        loss = loss + ce_weight * reduce_rows(ce.reshape(kl.shape), ce_reduction, rows, classes)
    return loss


def kl_div_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, *,
                direction: str = "forward", labels: torch.Tensor | None = None, ignore_index: int = -100,
                reduction: str = "batchmean") -> torch.Tensor:
    """KL divergence between the tempered distributions of two logit tensors, per token, masked.

    direction "forward": `KL(p_t || p_s)` (mean-seeking, the usual KD direction);
    direction "reverse": `KL(p_s || p_t)` (mode-seeking, as in MiniLLM / GKD).
    `p = softmax(logits / T)`; no `T^2` factor (TRL and torchtune apply none; `kd_loss` does).
    Tokens whose label equals `ignore_index` are left out; "batchmean" divides by the number of
    remaining tokens (at least 1), so an all-ignored batch gives 0 with a zero gradient.
    Teacher log-probabilities may be passed as logits: `log_softmax` leaves them unchanged.
    Unlike torchtune's `ForwardKLLoss`, which returns the cross-entropy `-sum p_t log p_s` (KL plus the
    teacher entropy), this is the KL itself; the gradients are the same.
    """
    log_ps = log_probs(student_logits, temperature)
    log_pt = log_probs(teacher_logits, temperature)
    per_token = kl_rows(log_pt, log_ps) if direction == "forward" else kl_rows(log_ps, log_pt)
    return masked_reduce(per_token, labels, ignore_index, reduction, student_logits.shape[-1])


def log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight_q: float) -> torch.Tensor:
    """`log((1 - w) p + w q)` from log-probabilities, for 0 < w < 1; -inf where both are -inf.

    With `hi`/`lo` the larger/smaller of `log p`, `log q` and `w_lo` the weight of the smaller,
    `m = e^hi (1 + w_lo (e^(lo - hi) - 1))`, so `log m = hi + log1p(w_lo * expm1(lo - hi))`: exactly
    `log p` when p = q (a JSD of exactly 0), and `hi + log(1 - w_lo)` when lo = -inf.
    Positions where both are -inf are replaced by 0 first, where `lo - hi` would be NaN in the
    backward pass; their value is never used, as p = q = 0 contributes nothing to the divergences.
    """
    both_zero = (log_p == NEG_INF) & (log_q == NEG_INF)
    log_p = torch.where(both_zero, 0.0, log_p)
    log_q = torch.where(both_zero, 0.0, log_q)
    p_is_lo = log_p < log_q
    hi = torch.where(p_is_lo, log_q, log_p)
    lo = torch.where(p_is_lo, log_p, log_q)
    weight_lo = torch.where(p_is_lo, hi.new_tensor(1.0 - weight_q), hi.new_tensor(weight_q))
    mixed = hi + torch.log1p(weight_lo * torch.expm1(lo - hi))
    return torch.where(both_zero, NEG_INF, mixed)


def jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float = 0.5,
             temperature: float = 1.0, labels: torch.Tensor | None = None, ignore_index: int = -100,
             reduction: str = "batchmean") -> torch.Tensor:
    """TRL's generalized Jensen-Shannon divergence, per token, masked.

    `m = beta * p_t + (1 - beta) * p_s`, `JSD = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)`,
    `p = softmax(logits / T)`. As in TRL's `generalized_jsd_loss`, beta = 0 is exactly `KL(p_t || p_s)`
    and beta = 1 exactly `KL(p_s || p_t)` (the formula above tends to 0 at both ends; TRL switches).
    Masking and reductions as in `kl_div_loss`; "batchmean" is the mean over unmasked tokens, which is
    TRL's for 3-d logits. Finite for every beta, also when both probabilities underflow to 0.
    """
    log_ps = log_probs(student_logits, temperature)
    log_pt = log_probs(teacher_logits, temperature)
    if beta == 0.0:
        per_token = kl_rows(log_pt, log_ps)
    elif beta == 1.0:
        per_token = kl_rows(log_ps, log_pt)
    else:
        log_m = log_mixture(log_ps, log_pt, beta)
        per_token = beta * kl_rows(log_pt, log_m) + (1.0 - beta) * kl_rows(log_ps, log_m)
    return masked_reduce(per_token, labels, ignore_index, reduction, student_logits.shape[-1])


def target_vs_rest_log_probs(log_p: torch.Tensor, target: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
    """`[log p_target, log sum_{c != target} p_c]` per row, `(rows, 2)`, computed in log space."""
    log_target = log_p.gather(-1, target[:, None]).squeeze(-1)
    log_rest = logsumexp_or_neg_inf(log_p.masked_fill(is_target, NEG_INF), -1)
    return torch.stack([log_target, log_rest], dim=-1)


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, *,
             alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022), as mdistiller's `dkd_loss(logits_s, logits_t, target, alpha, beta, T)`.

    With `p = softmax(z / T)` and the target class g of each row:
    - TCKD = KL over the binary split `b = [p_g, sum_{c != g} p_c]`: `T^2 / B * sum_rows KL(b_t || b_s)`;
    - NCKD = KL over the C - 1 non-target classes renormalised: `T^2 / B * sum_rows KL(p~_t || p~_s)`;
    - `loss = alpha * TCKD + beta * NCKD`. Logits `(B, C)`, target `(B,)`.

    Differences from mdistiller, both more accurate and equal up to rounding: `b` is computed in log
    space (mdistiller's `log(sum p*mask)` is -inf, then NaN, once the sum underflows), and the target class
    is removed exactly (mdistiller subtracts 1000 from its logit). With one class both terms are 0.
    The epoch warm-up factor `min(epoch / warmup, 1)` belongs to the trainer (`DKDLoss` offers it).
    """
    rows, classes = student_logits.shape
    target = target.long()
    is_target = F.one_hot(target, classes).bool()
    log_ps = log_probs(student_logits, temperature)
    log_pt = log_probs(teacher_logits, temperature)
    tckd = kl_rows(target_vs_rest_log_probs(log_pt, target, is_target),
                   target_vs_rest_log_probs(log_ps, target, is_target))
    loss = alpha * tckd.sum()
    if classes > 1:
        # log_softmax over the non-target classes: the target's logit is removed exactly.
        rest_s = log_probs(student_logits.to(log_ps.dtype).masked_fill(is_target, NEG_INF), temperature)
        rest_t = log_probs(teacher_logits.to(log_pt.dtype).masked_fill(is_target, NEG_INF), temperature)
        loss = loss + beta * kl_rows(rest_t, rest_s).sum()
    return loss * (temperature * temperature / rows)


def kl_div(input: torch.Tensor, target: torch.Tensor, *, reduction: str = "mean",
           log_target: bool = False) -> torch.Tensor:
    """`torch.nn.functional.kl_div` without its NaN: pointwise `t * (log t - input)`, 0 where t = 0.

    `input` holds log-probabilities; `target` probabilities (or log-probabilities with `log_target`).
    Reductions as PyTorch's: "mean" over all elements, "batchmean" sum / size(0), "sum", "none".
    PyTorch computes `xlogy(t, t) - t * input`, NaN when t = 0 and input = -inf (and, with `log_target`,
    for any input where t = 0); here that term is 0. A negative or NaN target, and a NaN or +inf input,
    still give NaN, as in PyTorch. Arithmetic in float32 or wider.
    """
    dtype = torch.promote_types(compute_dtype(input), target.dtype)
    input = input.to(dtype)
    if log_target:
        log_t = target.to(dtype)
        t = log_t.exp()
    else:
        t = target.to(dtype)
        log_t = torch.where(t == 0, 1.0, t).log()
    # A zero target zeroes its term for any input but NaN and +inf, which still give NaN.
    pointwise = t * torch.where((t == 0) & (input < float("inf")), 0.0, log_t - input)
    if reduction == "none":
        return pointwise
    if reduction == "sum":
        return pointwise.sum()
    if reduction == "batchmean":
        return pointwise.sum() / (input.shape[0] if input.dim() > 0 else 1)
    return pointwise.mean()
