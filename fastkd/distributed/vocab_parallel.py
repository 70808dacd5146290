"""Vocabulary-parallel logit losses: the logits split by vocabulary across the ranks of a group, every rank
computing the loss of the whole vocabulary.

Each rank holds the same rows (tokens) and the columns `[start, end)` of the vocabulary (`layout.vocab_slice`).
Every quantity of the single-process reference (`fastkd.reference.logits`, `fastkd.reference.sparse`) that is a
sum or a logsumexp over the vocabulary is taken as this rank's partial over its slice, then summed over the
ranks; everything else is elementwise (per id: on the slice that holds it) or per row (the same on every rank):

    log p_j  = z_j / T - lse,   lse = m + log sum_r sum_{j in slice r} exp(z_j / T - m),   m = max_r max_j z_j / T
    KL_row   = sum_r [sum_{j in slice r} p_j (log p_j - log q_j)]                (forward, reverse, JSD alike)
    CE_row   = -log p_label                (the label's log-probability, from the one rank whose slice holds it)

So per row and per call the forward pass carries: a max and a sum per distribution (the normalisers), the
divergence's partial sum (a sparse teacher's: the partial sum of its slots' terms), and for the CE term one more
sum; with `reduction="none"` rows of these numbers, never a logit. In the backward pass the sums' gradient is the
identity (`collectives.sum_over_ranks`), so rank r's gradient is exactly the columns `[start, end)` of the
single-process gradient, with one addition: a per-row number that every rank holds whole and that feeds every
slice's terms (the normaliser `lse` of each distribution, a tensor temperature) enters them through
`copy_to_ranks`, so its gradient is summed over the slices in the backward (an all-reduce of O(rows) numbers per
such quantity).

This is the reference arithmetic, under autograd: it keeps the slice's log-probabilities for the backward pass,
`rows x V / W` per distribution, as the single-process reference keeps `rows x V`. For language-model sizes use
`fused_linear_distill_loss(..., process_group=...)`, whose chunks never hold more than `chunk x V / W` logits.
"""
from __future__ import annotations

import torch
from torch import Tensor

from torch.autograd.function import once_differentiable

from ..reference.logits import (NEG_INF, compute_dtype, divergence_rows, kl_rows, log_mixture, masked_reduce,
                                reduce_rows, rows_times_grad, temperature_column)
from ..reference.sparse import log1mexp, log_softmax_or_neg_inf, logsumexp_or_neg_inf, reduce_tokens
from .collectives import copy_to_ranks, max_over_ranks, sum_over_ranks
from .layout import VocabSlice


def shifted_logsumexp(x: Tensor, group) -> tuple[Tensor, Tensor]:
    """`(m, s)` with `logsumexp = m + log s` over the last dim of every rank's slice of `x`: `m` the row maximum
    over the ranks (0 where it is not finite), no gradient; `s = sum exp(x - m)`, 0 where every entry is -inf."""
    shift, total = shifted_logsumexps([x], group)
    return shift[0], total[0]


def shifted_logsumexps(xs: list[Tensor], group) -> tuple[Tensor, Tensor]:
    """`shifted_logsumexp` of each of `xs` (tensors of the same shape and dtype), stacked: the maxima of all in one
    all-reduce and the sums in another, so two distributions cost two collectives of 2 x N, not four of N."""
    local_max = torch.stack([x.detach().amax(-1) if x.shape[-1] else x.new_full(x.shape[:-1], NEG_INF) for x in xs])
    shift = global_shift(local_max, group)
    total = sum_over_ranks(torch.stack([torch.exp(x - m.unsqueeze(-1)).sum(-1) for x, m in zip(xs, shift)]), group)
    return shift, total


def global_shift(local_max: Tensor, group) -> Tensor:
    """The row maximum over the ranks of each rank's `local_max`, 0 where it is not finite: the shift that keeps
    `exp` in range (a logsumexp does not depend on it, so it carries no gradient)."""
    shift = max_over_ranks(local_max, group)
    return torch.where(torch.isfinite(shift), shift, 0.0)


def log_of_total(total: Tensor) -> Tensor:
    """`log s` of a combined sum of exponentials; NaN where `s = 0` (a row -inf everywhere), as
    `torch.log_softmax` gives there."""
    return torch.where(total == 0, float("nan"), torch.log(total))


def logsumexp_over_ranks(x: Tensor, group) -> Tensor:
    """`logsumexp` over the last dim of every rank's slice of `x`: -inf, with a zero gradient, where every entry
    of the row is -inf (as `logsumexp_or_neg_inf`)."""
    shift, total = shifted_logsumexp(x, group)
    empty = total == 0
    return torch.where(empty, NEG_INF, shift + torch.log(torch.where(empty, 1.0, total)))


def scaled_logits(logits: Tensor, temperature, dtype: torch.dtype, group) -> Tensor:
    """`logits / T` in `dtype`, a -inf logit kept -inf for a tensor T (as `reference.logits.log_probs`)."""
    logits = logits.to(dtype)
    if not isinstance(temperature, Tensor):
        return logits if temperature == 1.0 else logits / temperature
    masked = logits == NEG_INF
    column = temperature_column(copy_to_ranks(temperature, group), dtype)
    return torch.where(masked, NEG_INF, torch.where(masked, 0.0, logits) / column)


def log_probs(logits: Tensor, temperature, dtype: torch.dtype, group) -> Tensor:
    """This slice of `log_softmax(logits / T)` over the whole vocabulary. A row that is -inf everywhere is NaN,
    as `torch.log_softmax` makes it in one process."""
    return log_probs_of([logits], temperature, dtype, group)[0]


def log_probs_of(logits: list[Tensor], temperature, dtype: torch.dtype, group) -> list[Tensor]:
    """`log_probs` of each of `logits` (slices of the same shape), their normalisers taken together
    (`shifted_logsumexps`)."""
    scaled = [scaled_logits(x, temperature, dtype, group) for x in logits]
    shift, total = shifted_logsumexps(scaled, group)
    log_total = log_of_total(total)
    # `(z - m) - log s`, as torch.log_softmax: `z - (m + log s)` would round `m + log s` first, an error of an ulp
    # of the logits' size (0.002 at 1e4 in float32). Every slice's terms depend on `log s`: its gradient is the sum
    # of every slice's part.
    log_total = copy_to_ranks(log_total, group)
    return [(x - m.unsqueeze(-1)) - s.unsqueeze(-1) for x, m, s in zip(scaled, shift, log_total)]


def pick(values: Tensor, ids: Tensor, where: VocabSlice, group) -> Tensor:
    """`values[..., ids]` for global `ids (..., k)` (ids in range), each read on the rank whose slice holds it and
    summed over the ranks: the others add 0."""
    local = ids - where.start
    mine = (local >= 0) & (local < values.shape[-1])
    got = values.gather(-1, torch.where(mine, local, 0)) if values.shape[-1] else values.new_zeros(ids.shape)
    return sum_over_ranks(torch.where(mine, got, 0.0), group)


def divergence(student: Tensor, teacher: Tensor, temperature, kind: str, beta: float, group,
               kernels=None) -> Tensor:
    """`reference.logits.divergence_rows` of the two slices' log-probabilities: a sum over ids per row, so the
    slices' partial rows summed over the ranks. As the single-process reference (`row_divergence`), a student that
    needs a gradient against a teacher that does not, at a number temperature, takes the closed forms
    (`_StudentDivergence`), by a kernel backend's operators when `kernels` is its KernelSet (`kernel_rows`); a
    teacher that needs a gradient, or a tensor temperature, autograd through the formula."""
    closed_form = not teacher.requires_grad and not isinstance(temperature, Tensor)
    if closed_form and torch.is_grad_enabled() and student.requires_grad:
        return _StudentDivergence.apply(student, teacher, temperature, kind, beta, group, kernels)
    if closed_form and kernels is not None:
        return kernel_rows(kernels, student, teacher, temperature, kind, beta, group, grad=False)[0]
    log_ps, log_pt = log_probs_of([student, teacher], temperature, compute_dtype(student, teacher), group)
    return sum_over_ranks(divergence_rows(log_ps, log_pt, kind, beta), group)


def _kl_partial(log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`p`, `d = where(p > 0, log p - log q, 0)` and this slice's part of `KL(p || q) = sum p d`."""
    p = log_p.exp()
    d = torch.where(p > 0, log_p - log_q, 0.0)
    return p, d, (p * d).sum(-1)


class _StudentDivergence(torch.autograd.Function):
    """The rows of `divergence` and, in the same forward pass, the student slice's gradient by the closed forms of
    `reference.logits._kl_rows_` / `_jsd_rows_`, with the row sums they subtract (the KL of the row) taken over the
    ranks: forward KL `(q - p) / T`; reverse KL `p_s (d - KL) / T`; JSD `(1 - beta) p_s (d_s - KL(p_s || m)) / T`."""

    @staticmethod
    def forward(ctx, student, teacher, temperature, kind, beta, group, kernels):
        ctx.student_dtype = student.dtype
        if kernels is not None:
            rows, grad = kernel_rows(kernels, student, teacher, temperature, kind, beta, group, grad=True)
            ctx.save_for_backward(grad)
            return rows
        log_ps, log_pt = log_probs_of([student, teacher], temperature, compute_dtype(student, teacher), group)
        if kind == "forward":
            p, _, part = _kl_partial(log_pt, log_ps)
            rows = sum_over_ranks(part, group)
            grad = (log_ps.exp() - p) / temperature
        elif kind == "reverse":
            p, d, part = _kl_partial(log_ps, log_pt)
            rows = sum_over_ranks(part, group)
            grad = p * (d - rows.unsqueeze(-1)) / temperature
        else:
            log_m = log_mixture(log_ps, log_pt, beta)
            p, d, part_s = _kl_partial(log_ps, log_m)
            _, _, part_t = _kl_partial(log_pt, log_m)
            kl_s, kl_t = sum_over_ranks(torch.stack([part_s, part_t]), group).unbind(0)
            rows = beta * kl_t + (1.0 - beta) * kl_s
            grad = (1.0 - beta) * p * (d - kl_s.unsqueeze(-1)) / temperature
        ctx.save_for_backward(grad)
        return rows

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows):
        grad, = ctx.saved_tensors
        return rows_times_grad(grad, grad_rows, ctx.student_dtype), None, None, None, None, None, None


# The operators of a kernel backend that make the rows of `_StudentDivergence` (fastkd/kernel_ops.py).
KERNEL_OPS = ("vocab_row_stats", "vocab_row_terms", "vocab_row_grad")


def kernel_rows(kernels, student: Tensor, teacher: Tensor, temperature: float, kind: str, beta: float, group,
                grad: bool) -> tuple[Tensor, Tensor | None]:
    """`_StudentDivergence`'s rows and (if `grad`) unweighted student gradient by a backend's kernels: the slice's
    maxima and sums of exponentials (`vocab_row_stats`), combined over the ranks into the normalisers (2 numbers
    per row and distribution); then the slice's partial divergences (`vocab_row_terms`, which also writes the
    forward KL's gradient `(q - p) / T` in the same pass), summed over the ranks; then, for the reverse KL and the
    JSD, whose gradients subtract the row's whole KL, the gradient (`vocab_row_grad`: one more read of the slice).
    Reads of each slice: two (forward KL), three (reverse KL, JSD); one write of the gradient."""
    lead = student.shape[:-1]
    inv_t = 1.0 / temperature
    maxima, sums = kernels.vocab_row_stats(student, teacher, inv_t)
    shift = global_shift(maxima, group)
    total = sum_over_ranks(torch.where(maxima == NEG_INF, 0.0, sums * torch.exp(maxima - shift)), group)
    log_total = log_of_total(total)
    forward_grad = grad and kind == "forward"
    partial, d = kernels.vocab_row_terms(student, teacher, inv_t, shift, log_total, kind, beta, None, forward_grad)
    part = sum_over_ranks(partial, group)
    if kind == "jsd":
        kl = part[:, 1]
        rows = beta * part[:, 0] + (1.0 - beta) * kl
    else:
        rows = kl = part[:, 0]
    if grad and not forward_grad:
        d = kernels.vocab_row_grad(student, teacher, inv_t, shift, log_total, kind, beta, kl.contiguous(), None)
    return rows.reshape(lead), (d if grad else None)


def cross_entropy(student: Tensor, target: Tensor, where: VocabSlice, dtype: torch.dtype, group) -> Tensor:
    """`-log softmax(z)_target` per row, `target` global ids (in range)."""
    log_p = log_probs(student, 1.0, dtype, group)
    return -pick(log_p, target.long().unsqueeze(-1), where, group).squeeze(-1)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature, *, reduction: str, target, ce_weight: float,
            kd_weight: float, where: VocabSlice, group, kernels=None) -> Tensor:
    """`reference.logits.kd_loss` over the whole vocabulary (module docstring)."""
    rows = student_logits.numel() // student_logits.shape[-1]
    kl = divergence(student_logits, teacher_logits, temperature, "forward", 0.5, group, kernels)
    if isinstance(temperature, Tensor):
        # Applied to the whole rows, the same on every rank: its gradient is this rank's own (no copy_to_ranks).
        squared = temperature_column(temperature, kl.dtype).squeeze(-1) ** 2
        loss = reduce_rows(kd_weight * squared * kl, reduction, rows, where.total)
    else:
        loss = (kd_weight * temperature * temperature) * reduce_rows(kl, reduction, rows, where.total)
    if target is not None and ce_weight != 0.0:
        ce = cross_entropy(student_logits, target, where, kl.dtype, group)
        loss = loss + ce_weight * reduce_rows(ce, "batchmean" if reduction == "mean" else reduction, rows,
                                              where.total)
    return loss


def token_loss(student_logits: Tensor, teacher_logits: Tensor, temperature, *, kind: str, beta: float, labels,
               ignore_index: int, reduction: str, where: VocabSlice, group, kernels=None) -> Tensor:
    """`kl_div_loss` (kind "forward" / "reverse") and `jsd_loss` (kind "jsd" with `beta`) over the whole
    vocabulary, masked and reduced as they are."""
    per_token = divergence(student_logits, teacher_logits, temperature, kind, beta, group, kernels)
    return masked_reduce(per_token, labels, ignore_index, reduction, where.total)


def sparse_kd_rows(student_logits: Tensor, teacher_indices: Tensor, teacher_logprobs: Tensor, tail: str,
                   temperature: float, where: VocabSlice, group) -> Tensor:
    """`reference.sparse.sparse_kd_rows` with the student's logits split by vocabulary; the teacher's k ids (global)
    and log-probabilities are the same on every rank, so everything per slot is computed on every rank and only
    the student's side crosses the network: its normaliser, the slots' terms `p_k (log p_k - log q_{i_k})`
    summed on the rank that holds each id and then over the ranks (N numbers, not the N x k log-probabilities),
    and for the bucket tail the mass outside the set and the size of the set."""
    dtype = compute_dtype(student_logits, teacher_logprobs)
    l = teacher_logprobs.to(dtype)
    ids = teacher_indices.long()
    used = l != NEG_INF
    in_range = (ids >= 0) & (ids < where.total)
    bad_row = (used & ~in_range).any(-1)
    readable = used & in_range
    ids = torch.where(readable, ids, 0)

    log_q = log_probs(student_logits, temperature, dtype, group)
    local = ids - where.start
    mine = readable & (local >= 0) & (local < log_q.shape[-1])  # the slots whose id this slice holds
    log_q_mine = log_q.gather(-1, torch.where(mine, local, 0)) if log_q.shape[-1] else log_q.new_zeros(ids.shape)
    log_p = log_softmax_or_neg_inf(l / temperature) if tail == "renormalize" else l
    # `kl_rows` of the slots this slice holds (each slot is held by one rank; the others count p = 0 there, a
    # term of exactly 0), summed over the ranks: `divergence_rows` of the k slots, in another order.
    rows = sum_over_ranks(kl_rows(torch.where(mine, log_p, NEG_INF), torch.where(mine, log_q_mine, 0.0)), group)
    if tail == "bucket":
        # This slice's members of the set (a duplicated id once, as the reference's scatter_add).
        in_set = torch.zeros_like(log_q).scatter_add_(-1, torch.where(mine, local, 0), mine.to(dtype)) > 0
        outside = sum_over_ranks((~in_set).sum(-1).to(dtype), group)
        log_q_tail = logsumexp_over_ranks(log_q.masked_fill(in_set, NEG_INF), group)
        log_q_tail = torch.where(readable.any(-1), log_q_tail, 0.0)
        log_p_tail = log1mexp(logsumexp_or_neg_inf(l, -1))
        log_p_tail = torch.where(outside == 0, NEG_INF, log_p_tail)
        # The tail's outcome, the same on every rank.
        rows = rows + kl_rows(log_p_tail.unsqueeze(-1), log_q_tail.unsqueeze(-1))
    return torch.where(bad_row, float("nan"), rows)


def sparse_kd_loss(student_logits: Tensor, teacher_indices: Tensor, teacher_logprobs: Tensor, labels, *, tail: str,
                   temperature: float, ignore_index: int, num_items_in_batch, reduction: str, where: VocabSlice,
                   group) -> Tensor:
    """`reference.sparse.sparse_kd_loss` with the student's logits split by vocabulary."""
    per_token = sparse_kd_rows(student_logits, teacher_indices, teacher_logprobs, tail, temperature, where, group)
    return reduce_tokens(per_token, labels, ignore_index, num_items_in_batch, reduction, where.total)


def fused_rows(where: VocabSlice, group, kernels=None):
    """The chunk rows of `fastkd.fused_linear` (`reference_rows`' contract: the chunk's weighted terms
    `[divergence, CE]` and their gradient with respect to the chunk's logits) for logits split by vocabulary: the
    chunk's slice of the student's (and teacher's) logits in, the loss of the whole vocabulary and this slice's
    gradient out, by autograd through the formulas above on the chunk alone (`chunk x V / W` tensors)."""
    def rows(z_s: Tensor, teacher, labels, spec, grad: bool):
        with torch.enable_grad():
            z = z_s.detach().requires_grad_(grad)
            total_kd = total_ce = z.new_zeros((), dtype=compute_dtype(z))
            if spec.kd_weight is not None:
                if spec.tail is not None:
                    ids, logprobs = teacher
                    per_row = sparse_kd_rows(z, ids, logprobs, spec.tail, spec.temperature, where, group)
                else:
                    kind = {"forward_kl": "forward", "kd": "forward", "reverse_kl": "reverse"}.get(spec.loss, "jsd")
                    if kind == "jsd" and spec.beta in (0.0, 1.0):  # TRL's ends: exactly the two KLs
                        kind = "forward" if spec.beta == 0.0 else "reverse"
                    per_row = divergence(z, teacher, spec.temperature, kind, spec.beta, group, kernels)
                weight = spec.kd_weight.to(per_row.dtype).expand(per_row.shape)
                if labels is not None:
                    weight = torch.where(labels != spec.ignore_index, weight, 0.0)
                total_kd = (torch.where(weight != 0, per_row, 0.0) * weight).sum()
            if spec.ce_weight is not None:
                keep = labels != spec.ignore_index
                ce = cross_entropy(z, torch.where(keep, labels, 0), where, total_kd.dtype, group)
                total_ce = (torch.where(keep, ce, 0.0) * spec.ce_weight).sum()
            terms = torch.stack([total_kd, total_ce])
            if not grad:
                return terms.detach(), None
            dz, = torch.autograd.grad(terms.sum(), z)
        return terms.detach(), dz
    return rows
