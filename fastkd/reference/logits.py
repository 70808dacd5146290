"""Reference logit losses in plain PyTorch: Hinton KD, KL both ways, generalized JSD, DKD, pointwise KL.

These are the definitions every kernel is checked against. Conventions shared by all of them:
- Logits are `(..., C)`; every leading position is a row (a sample, or a token of a language model).
- Arithmetic runs in the wider of the two inputs' dtypes and at least float32 (`compute_dtype`): float32
  for float16/bfloat16 inputs, float64 as soon as one input is float64. The student and the teacher may have
  different floating dtypes (a float32 student against a bfloat16 teacher computes in float32). The loss
  comes back in that dtype; gradients reach each input in its own dtype.
- A probability of exactly 0 contributes 0 to a divergence and a zero gradient, also where the other
  distribution's log-probability is -inf (masked vocabulary). PyTorch's pointwise `kl_div` is NaN there.
- The teacher is not detached: it gets a gradient when it requires one (mutual learning).
- The temperature is a number or a tensor shaped as the rows (`logits.shape[:-1]`): a learnable temperature
  (CTKD) expanded to the rows, or one per row. Each row divides by its own T; the `T^2` factors of KD and DKD
  become `T_r^2` per row. The gradient reaching a tensor temperature is autograd's; a row whose T is not > 0
  gets NaN (`temperature_column`), never a finite wrong loss.

KL and JSD (and KD's KL term) are defined per row by `divergence_rows`. When only the student needs a
gradient, the usual distillation, `row_divergence` computes the same rows and, in the same forward pass,
the student's gradient from its closed form (`(p_s - p_t) / T` for the forward KL), and keeps only that
for the backward pass: one `(rows, C)` tensor where autograd through the formula keeps the
log-probabilities, the probabilities and a mask. On a CPU that makes the reference no slower and no larger
than the plain formula (`python -m bench.cpu_reference`). That path is differentiable once (no double
backward through `create_graph`); a teacher that needs a gradient takes autograd through the formula.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

NEG_INF = float("-inf")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the arithmetic runs in: the widest of the inputs' floating dtypes, at least float32."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def temperature_column(temperature: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A tensor temperature (one per row, shaped as the rows) as a column `(..., 1)` in `dtype`; NaN where it is
    not > 0, so such a row's loss is NaN rather than a finite wrong number (read on the device, no sync)."""
    t = temperature.to(dtype)
    return torch.where(t > 0, t, float("nan")).unsqueeze(-1)


def log_probs(logits: torch.Tensor, temperature, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`log_softmax(logits / T)` over the last dim, in `dtype` (default: float32 or wider). `temperature`: a
    number, or a tensor shaped as the rows `logits.shape[:-1]` (a learnable or per-row temperature)."""
    dtype = compute_dtype(logits) if dtype is None else dtype
    if isinstance(temperature, torch.Tensor):
        # A -inf logit (a masked class) divides as 0 and is put back: its d(x / T)/dT would be inf, times a zero
        # gradient NaN in T's gradient.
        logits = logits.to(dtype)
        masked = logits == NEG_INF
        scaled = torch.where(masked, 0.0, logits) / temperature_column(temperature, dtype)
        return torch.log_softmax(torch.where(masked, NEG_INF, scaled), dim=-1)
    if temperature == 1.0:
        # log_softmax upcasts as it reads: no float32 copy of 16-bit logits.
        return torch.log_softmax(logits, dim=-1, dtype=dtype)
    return torch.log_softmax(logits.to(dtype) / temperature, dim=-1)


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


def divergence_rows(log_ps: torch.Tensor, log_pt: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """The definition, per row, from log-probabilities: "forward" `KL(p_t || p_s)`, "reverse" `KL(p_s || p_t)`,
    "jsd" `beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)` with `m = beta p_t + (1 - beta) p_s`, 0 < beta < 1."""
    if kind == "forward":
        return kl_rows(log_pt, log_ps)
    if kind == "reverse":
        return kl_rows(log_ps, log_pt)
    log_m = log_mixture(log_ps, log_pt, beta)
    return beta * kl_rows(log_pt, log_m) + (1.0 - beta) * kl_rows(log_ps, log_m)


# The fused path: `divergence_rows` and the student's gradient in one forward pass, for the usual
# distillation (the teacher needs no gradient). Autograd through the formula keeps the log-probabilities,
# the probabilities and a mask for the backward pass; this keeps one (rows, C) tensor, the gradient, and
# works in place, dropping each full-size tensor (250 MB in float32 at 4 x 512 x 32000) once it is spent.
# The arithmetic of the value is the formula's, operation for operation.

def _log_mixture_(log_p: torch.Tensor, log_q: torch.Tensor, weight_q: float) -> torch.Tensor:
    """`log_mixture` without autograd, in fewer full-size temporaries; the same values."""
    p_is_lo = log_p < log_q
    hi = torch.maximum(log_p, log_q)
    mixed = torch.minimum(log_p, log_q).sub_(hi).expm1_()
    mixed.mul_(torch.where(p_is_lo, hi.new_tensor(1.0 - weight_q), hi.new_tensor(weight_q)))
    del p_is_lo
    # Where both are -inf, hi is -inf and lo - hi NaN: the mixture is -inf there.
    return mixed.log1p_().add_(hi).masked_fill_(hi == NEG_INF, NEG_INF)


def _kl_rows_(log_p: torch.Tensor, log_q: torch.Tensor, temperature: float, grad: str | None):
    """`kl_rows(log_p, log_q)`, overwriting `log_p` (and `log_q` for grad "q"), and the gradient asked for:
    with `d = where(p > 0, log p - log q, 0)`, `KL = sum_c p_c d_c`, `p = softmax(z_p / T)`, `q = softmax(z_q / T)`:

        grad "p": dKL/dz_p = p * (d - KL) / T;        grad "q": dKL/dz_q = (q - p) / T.
    """
    p = log_p.exp()
    d = log_p.sub_(log_q)
    d.masked_fill_(p == 0, 0.0)
    if grad != "p":
        kl = d.mul_(p).sum(-1)
        return kl, log_q.exp_().sub_(p).div_(temperature) if grad == "q" else None
    kl = (p * d).sum(-1)
    return kl, d.sub_(kl.unsqueeze(-1)).mul_(p).div_(temperature)


def _jsd_rows_(log_ps: torch.Tensor, log_pt: torch.Tensor, beta: float, temperature: float, grad: bool):
    """The JSD rows of `divergence_rows`, overwriting both arguments, and the student's gradient if `grad`.
    As `sum_c m_c = 1`, `dJSD/dp_s = (1 - beta) (log p_s - log m)`; through the softmax,

        dJSD/dz_s = (1 - beta) * p_s * (d_s - KL(p_s || m)) / T,   d_s = where(p_s > 0, log p_s - log m, 0).
    """
    log_m = _log_mixture_(log_ps, log_pt, beta)
    kl_s, dz_s = _kl_rows_(log_ps, log_m, temperature, "p" if grad else None)
    del log_ps  # without a gradient it is spent
    kl_t, _ = _kl_rows_(log_pt, log_m, temperature, None)
    return beta * kl_t + (1.0 - beta) * kl_s, None if dz_s is None else dz_s.mul_(1.0 - beta)


def _fused_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, kind: str,
                beta: float, grad: bool):
    """`divergence_rows` of the two logit tensors, and the student's gradient d(row)/d(z_s) if `grad`."""
    dtype = compute_dtype(student_logits, teacher_logits)
    # The log-probabilities go straight into the call, which then holds the only reference to each.
    if kind == "jsd":
        return _jsd_rows_(log_probs(student_logits, temperature, dtype), log_probs(teacher_logits, temperature, dtype),
                          beta, temperature, grad)
    if kind == "reverse":
        return _kl_rows_(log_probs(student_logits, temperature, dtype), log_probs(teacher_logits, temperature, dtype),
                         temperature, "p" if grad else None)
    return _kl_rows_(log_probs(teacher_logits, temperature, dtype), log_probs(student_logits, temperature, dtype),
                     temperature, "q" if grad else None)


class _StudentDivergence(torch.autograd.Function):
    """`_fused_rows` under autograd, for a student that needs a gradient and a teacher that does not."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature, kind, beta):
        rows, dz_s = _fused_rows(student_logits, teacher_logits, temperature, kind, beta, True)
        ctx.student_dtype = student_logits.dtype
        ctx.save_for_backward(dz_s)
        return rows

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows):
        dz_s, = ctx.saved_tensors
        return rows_times_grad(dz_s, grad_rows, ctx.student_dtype), None, None, None, None


def rows_times_grad(dz_s: torch.Tensor, grad_rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The saved gradient of each row's loss times the row's upstream gradient: rounded once into the student's
    `dtype`, with no second full-size temporary."""
    grad = torch.empty(dz_s.shape, dtype=dtype, device=dz_s.device)
    return torch.mul(dz_s, grad_rows.unsqueeze(-1), out=grad)


def row_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, kind: str,
                   beta: float = 0.5) -> torch.Tensor:
    """`divergence_rows` of `log_softmax(logits / T)` in `compute_dtype`, by the fused path unless the teacher
    needs a gradient too (a teacher that trains, a peer not detached) or the temperature is a tensor (it may
    need a gradient): autograd runs through the formula then."""
    grad = torch.is_grad_enabled()
    if isinstance(temperature, torch.Tensor) or (grad and teacher_logits.requires_grad):
        dtype = compute_dtype(student_logits, teacher_logits)
        return divergence_rows(log_probs(student_logits, temperature, dtype),
                               log_probs(teacher_logits, temperature, dtype), kind, beta)
    if grad and student_logits.requires_grad:
        return _StudentDivergence.apply(student_logits, teacher_logits, temperature, kind, beta)
    return _fused_rows(student_logits, teacher_logits, temperature, kind, beta, False)[0]


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
    kl = row_divergence(student_logits, teacher_logits, temperature, "forward")
    if isinstance(temperature, torch.Tensor):
        # One T^2 per row: T_r^2 KL_r, reduced.
        squared = temperature_column(temperature, kl.dtype).squeeze(-1) ** 2
        loss = reduce_rows(kd_weight * squared * kl, reduction, rows, classes)
    else:
        loss = (kd_weight * temperature * temperature) * reduce_rows(kl, reduction, rows, classes)
    if target is not None and ce_weight != 0.0:
        loss = loss + ce_weight * hard_label_term(student_logits, target, reduction, kl.dtype)
    return loss


def hard_label_term(student_logits: torch.Tensor, target: torch.Tensor, reduction: str,
                    dtype: torch.dtype) -> torch.Tensor:
    """KD's CE term: `F.cross_entropy` of the raw student logits in `dtype`, reduced as `kd_loss` says ("mean"
    and "batchmean" both average over rows)."""
    classes = student_logits.shape[-1]
    rows = student_logits.numel() // classes
    ce = F.cross_entropy(student_logits.to(dtype).reshape(rows, classes), target.reshape(rows).long(),
                         reduction="none")
    return reduce_rows(ce.reshape(student_logits.shape[:-1]), "batchmean" if reduction == "mean" else reduction,
                       rows, classes)


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
    per_token = row_divergence(student_logits, teacher_logits, temperature, direction)
    return masked_reduce(per_token, labels, ignore_index, reduction, student_logits.shape[-1])


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
    kind = "forward" if beta == 0.0 else "reverse" if beta == 1.0 else "jsd"
    per_token = row_divergence(student_logits, teacher_logits, temperature, kind, beta)
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
    dtype = compute_dtype(student_logits, teacher_logits)
    log_ps = log_probs(student_logits, temperature, dtype)
    log_pt = log_probs(teacher_logits, temperature, dtype)
    tckd = kl_rows(target_vs_rest_log_probs(log_pt, target, is_target),
                   target_vs_rest_log_probs(log_ps, target, is_target))
    nckd = None
    if classes > 1:
        # log_softmax over the non-target classes: the target's logit is removed exactly.
        rest_s = log_probs(student_logits.to(log_ps.dtype).masked_fill(is_target, NEG_INF), temperature)
        rest_t = log_probs(teacher_logits.to(log_pt.dtype).masked_fill(is_target, NEG_INF), temperature)
        nckd = kl_rows(rest_t, rest_s)
    if isinstance(temperature, torch.Tensor):
        # One T^2 per row.
        per_row = alpha * tckd if nckd is None else alpha * tckd + beta * nckd
        return (per_row * temperature_column(temperature, dtype).squeeze(-1) ** 2).sum() / rows
    loss = alpha * tckd.sum()
    if nckd is not None:
        loss = loss + beta * nckd.sum()
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
    dtype = compute_dtype(input, target)
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
