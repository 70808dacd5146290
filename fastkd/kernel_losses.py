"""The losses a kernel backend runs, composed from its operators (a `fastkd.kernel_ops.KernelSet`).

Each function takes the backend's `kernels` first, then exactly the arguments `fastkd.functional` passes to
the reference of the same name (validated, every option given: the defaults are the public functions').
What sits around the kernels is the same for every backend and is plain PyTorch on O(rows) or `B x B`
tensors: the references' reductions, RKD's distance term, the normalisation of attention maps. `LOSSES` is
the table `fastkd._dispatch` reads: which losses have kernels (`NEEDS`: those that need an operator not every
backend has). Inputs in a dtype the kernels do not take (float64) never reach these functions:
`fastkd._dispatch.resolve` sends them to the reference.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import fused_linear, rkd_autograd
from .reference.attention import match_spatial
from .reference.logits import compute_dtype, masked_reduce, reduce_rows
from .reference.relational import distances_from_squared, flat_features, mean_normalized
from .reference.sparse import items_count, reduce_tokens
from .reference.sparse import sparse_kd_loss as reference_sparse_kd_loss

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --- The logit losses: the gradient made in the forward pass -------------------------------------------------
#
# KD, KL, JSD, DKD and sparse-teacher KD share one autograd.Function, `_RowLoss`. Its forward knows, from the
# reduction, the weight of every row's term in the loss (a device tensor: a masked batchmean divides by the
# count of kept tokens without a host sync), hands these weights to the backend's row operator with the flags
# of the gradients wanted, and gets back the per-row terms and the weighted gradient(s), made in the same kernel
# pass as the terms (fastkd/triton/kl.py: one read of each input and one write per gradient for rows that fit a
# block).
# The loss value is the same PyTorch reduction of the per-row terms as the reference's. Only the gradient
# buffers are saved, never the logits; the backward scales them in place by grad_output
# (`kernels.scale_rows_`, which reads and writes nothing where grad_output is exactly 1, decided on the
# device) and returns them. A tensor temperature (learnable, or one per row) goes to the kernels as float32
# `(rows,)`; they make its gradient through the logits in the same pass (one more row sum), and the weights'
# own T^2 (KD, DKD) is differentiated here, on O(rows) numbers. The loss is differentiable once: a second
# backward through the same graph (retain_graph=True) is refused, as the buffers have been scaled already, and
# there is no double backward (create_graph=True). Any backend's KernelSet with the declared `kl_rows`,
# `jsd_rows`, `dkd_rows` and `scale_rows_` runs these (and sparse-teacher KD with `sparse_kd_rows`, below).

SECOND_BACKWARD = ("this fastkd loss is once-differentiable: its gradient was made in the forward pass and "
                   "scaled in place by the first backward, so it cannot be backpropagated through a second "
                   "time (retain_graph=True); compute the loss again instead")


def _rows(x: Tensor) -> int:
    return x.numel() // x.shape[-1]


def _per_row_weight(factor, rows: int, device) -> Tensor:
    """A row weight as float32 `(rows,)`: one for every row (a Python number or a 0-dim device tensor) as an
    expanded 0-stride view of one number, or a `(rows,)` tensor already (a per-row temperature's T^2)."""
    if not isinstance(factor, Tensor):
        factor = torch.full((), factor, dtype=torch.float32, device=device)
    if factor.dim() == 1:
        return factor.to(torch.float32)
    return factor.to(torch.float32).reshape(1).expand(rows)


def _reduction_weight(reduction: str, count, classes: int):
    """d reduce_rows(per_row, reduction, count, classes) / d per_row_r: 1/count (batchmean), 1/(count*classes)
    (mean), 1 (sum, none; "none" gets grad_output per row in the backward)."""
    if reduction == "batchmean":
        return 1.0 / count
    if reduction == "mean":
        return 1.0 / (count * classes)
    return 1.0


def _masked_weight(labels, ignore_index: int, reduction: str, rows: int, classes: int):
    """The row weight of `masked_reduce`: with labels, the count is that of kept tokens (at least 1), on the
    device. It is not zeroed on ignored rows: the kernels write a zero gradient there whatever the weight."""
    if labels is None:
        return _reduction_weight(reduction, rows, classes)
    count = (labels != ignore_index).sum().clamp(min=1)
    return _reduction_weight(reduction, count, classes)


def _squared(temperature, t_rows):
    """T^2 per row (t_rows given) or as one number."""
    return t_rows * t_rows if t_rows is not None else temperature * temperature


def _kd_rows(kernels, student, teacher, target, t_rows, grads, temperature, reduction, ce_weight, kd_weight):
    with_ce = target is not None and ce_weight != 0.0
    rows_shape, classes = student.shape[:-1], student.shape[-1]
    rows = _rows(student)
    ce_reduction = "batchmean" if reduction == "mean" else reduction
    squared = _squared(temperature, t_rows)
    kl_w = ce_w = None
    if any(grads):
        kl_w = _per_row_weight((kd_weight * squared) * _reduction_weight(reduction, rows, classes), rows,
                               student.device)
        if with_ce:
            ce_w = _per_row_weight(ce_weight * _reduction_weight(ce_reduction, rows, classes), rows, student.device)
    kl, ce, d_student, d_teacher, d_temperature = kernels.kl_rows(
        student, teacher, temperature, t_rows, False, target if with_ce else None, None, -100, kl_w, ce_w, *grads)
    if t_rows is None:
        loss = (kd_weight * squared) * reduce_rows(kl.view(rows_shape), reduction, rows, classes)
    else:
        loss = reduce_rows((kd_weight * squared * kl).view(rows_shape), reduction, rows, classes)
        if grads[2]:
            # The kernel differentiates through the logits; the weight's own T_r^2 adds 2 w_r KL_r / T_r.
            d_temperature = d_temperature + 2.0 * kl_w * kl / t_rows
    if with_ce:
        loss = loss + ce_weight * reduce_rows(ce.view(rows_shape), ce_reduction, rows, classes)
    return loss, d_student, d_teacher, d_temperature


def _divergence_rows(kernels, student, teacher, labels, t_rows, grads, temperature, beta, ignore_index, reduction):
    """KL (beta 0: forward, 1: reverse, as the reference) or JSD (0 < beta < 1), masked and reduced."""
    weight = None
    if any(grads):
        weight = _per_row_weight(_masked_weight(labels, ignore_index, reduction, _rows(student), student.shape[-1]),
                                 _rows(student), student.device)
    if beta == 0.0 or beta == 1.0:
        per_row, _, d_student, d_teacher, d_temperature = kernels.kl_rows(
            student, teacher, temperature, t_rows, beta == 1.0, None, labels, ignore_index, weight, None, *grads)
    else:
        per_row, d_student, d_teacher, d_temperature = kernels.jsd_rows(
            student, teacher, float(beta), temperature, t_rows, labels, ignore_index, weight, *grads)
    loss = masked_reduce(per_row.view(student.shape[:-1]), labels, ignore_index, reduction, student.shape[-1])
    return loss, d_student, d_teacher, d_temperature


def _dkd_rows(kernels, student, teacher, target, t_rows, grads, temperature, alpha, beta):
    rows, classes = student.shape
    squared = _squared(temperature, t_rows)
    # With one class NCKD is left out of the loss, as in the reference.
    nckd_factor = beta if classes > 1 else 0.0
    tckd_w = nckd_w = None
    if any(grads):
        tckd_w = _per_row_weight(alpha * squared / rows, rows, student.device)
        nckd_w = _per_row_weight(nckd_factor * squared / rows, rows, student.device)
    tckd, nckd, d_student, d_teacher, d_temperature = kernels.dkd_rows(
        student, teacher, target, temperature, t_rows, tckd_w, nckd_w, *grads)
    if t_rows is not None:
        per_row = alpha * tckd + beta * nckd if classes > 1 else alpha * tckd
        if grads[2]:
            # The weights' own T_r^2: 2 (w_tckd TCKD + w_nckd NCKD) / T_r.
            d_temperature = d_temperature + 2.0 * (tckd_w * tckd + nckd_w * nckd) / t_rows
        return (per_row * squared).sum() / rows, d_student, d_teacher, d_temperature
    # The reference's order of operations.
    loss = alpha * tckd.sum()
    if classes > 1:
        loss = loss + beta * nckd.sum()
    return loss * (temperature * temperature / rows), d_student, d_teacher, d_temperature


class _RowLoss(torch.autograd.Function):
    """A logit loss whose gradient is made in the forward pass: `rows_loss(kernels, student, teacher, index,
    t_rows, grads, *options) -> (loss, d_student, d_teacher, d_temperature)` computes the loss and the
    gradients of the loss for a grad_output of 1 (`d_temperature` per row, for a tensor temperature `t_rows`);
    the backward scales them by grad_output (per row for a per-row loss)."""

    @staticmethod
    def forward(ctx, kernels, rows_loss, grads, options, student, teacher, index, t_rows):
        loss, d_student, d_teacher, d_temperature = rows_loss(kernels, student, teacher, index, t_rows, grads,
                                                              *options)
        ctx.kernels = kernels
        ctx.rows = _rows(student)
        ctx.spent = False
        ctx.save_for_backward(d_student, d_teacher, d_temperature)  # only the gradients: never the logits
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if ctx.spent:
            raise RuntimeError(SECOND_BACKWARD)
        ctx.spent = True
        d_student, d_teacher, d_temperature = ctx.saved_tensors
        # grad_output per row, as float32 (rows,): one number expanded (stride 0) for a reduced loss.
        scale = grad.to(torch.float32).reshape(-1)
        if scale.numel() == 1:
            scale = scale.expand(ctx.rows)
        wanted = []
        for needed, d in zip(ctx.needs_input_grad[4:6], (d_student, d_teacher)):
            if needed:
                ctx.kernels.scale_rows_(d, scale)
            wanted.append(d if needed else None)
        d_t = d_temperature * scale if ctx.needs_input_grad[7] else None
        return None, None, None, None, wanted[0], wanted[1], None, d_t


def _row_loss(kernels, rows_loss, student, teacher, index, temperature, *options):
    """`temperature`: a number, or a tensor shaped as the rows (fastkd._checks.check_temperature), handed to
    the kernels as float32 `(rows,)` (a view where it is one expanded number)."""
    t_rows = None
    if isinstance(temperature, Tensor):
        t_rows = temperature.to(torch.float32).reshape(-1)
        temperature = 1.0  # unused by the kernels when t_rows is given
    # The flags are read here: grad mode is off inside the Function's forward.
    enabled = torch.is_grad_enabled()
    grads = (enabled and student.requires_grad, enabled and teacher.requires_grad,
             enabled and t_rows is not None and t_rows.requires_grad)
    return _RowLoss.apply(kernels, rows_loss, grads, (temperature, *options), student, teacher, index, t_rows)


def kd_loss(kernels, student_logits, teacher_logits, temperature, *, reduction, target, ce_weight, kd_weight):
    return _row_loss(kernels, _kd_rows, student_logits, teacher_logits, target, temperature, reduction, ce_weight,
                     kd_weight)


def kl_div_loss(kernels, student_logits, teacher_logits, temperature, *, direction, labels, ignore_index, reduction):
    return _row_loss(kernels, _divergence_rows, student_logits, teacher_logits, labels, temperature,
                     1.0 if direction == "reverse" else 0.0, ignore_index, reduction)


def jsd_loss(kernels, student_logits, teacher_logits, *, beta, temperature, labels, ignore_index, reduction):
    # beta 0 and 1 are exactly forward and reverse KL, as in the reference (the KL kernel runs them).
    return _row_loss(kernels, _divergence_rows, student_logits, teacher_logits, labels, temperature, float(beta),
                     ignore_index, reduction)


def dkd_loss(kernels, student_logits, teacher_logits, target, *, alpha, beta, temperature):
    return _row_loss(kernels, _dkd_rows, student_logits, teacher_logits, target, temperature, alpha, beta)


# --- Sparse-teacher KD: the teacher as k (id, log-probability) slots per row ---------------------------------
#
# The same Function: the backend's `sparse_kd_rows` writes the per-token terms and the student's weighted gradient
# in one pass (fastkd/triton/sparse.py), and the loss is the reference's own reduction of the terms
# (`reference.sparse.reduce_tokens`). The kernels make no gradient for the teacher's log-probabilities: where
# they need one (grad mode on and `requires_grad`: a teacher trained alongside, not a cache), the loss is the
# reference's, whose autograd reaches both sides. Not every backend has the operator yet (`NEEDS`).

def _sparse_rows(kernels, student, teacher_logprobs, teacher_indices, t_rows, grads, temperature, tail, labels,
                 ignore_index, num_items_in_batch, reduction):
    rows, vocab = _rows(student), student.shape[-1]
    weight = None
    if grads[0]:
        if num_items_in_batch is not None:  # d (kept sum / n) / d term_r = 1 / n
            factor = 1.0 / items_count(num_items_in_batch, torch.float32, student.device)
        else:
            factor = _masked_weight(labels, ignore_index, reduction, rows, vocab)
        weight = _per_row_weight(factor, rows, student.device)
    per_token, d_student = kernels.sparse_kd_rows(student, teacher_indices, teacher_logprobs, tail, temperature,
                                                  labels, ignore_index, weight, grads[0])
    loss = reduce_tokens(per_token.view(student.shape[:-1]), labels, ignore_index, num_items_in_batch, reduction,
                         vocab)
    return loss, d_student, None, None


def sparse_kd_loss(kernels, student_logits, teacher_indices, teacher_logprobs, labels, *, tail, temperature,
                   ignore_index, num_items_in_batch, reduction):
    if torch.is_grad_enabled() and teacher_logprobs.requires_grad:
        return reference_sparse_kd_loss(student_logits, teacher_indices, teacher_logprobs, labels, tail=tail,
                                        temperature=temperature, ignore_index=ignore_index,
                                        num_items_in_batch=num_items_in_batch, reduction=reduction)
    return _row_loss(kernels, _sparse_rows, student_logits, teacher_logprobs, teacher_indices, temperature, tail,
                     labels, ignore_index, num_items_in_batch, reduction)


def fused_linear_distill_terms(kernels, student_hidden, student_weight, teacher_hidden, teacher_weight, labels, *,
                               loss, beta, temperature, ignore_index, ce_weight, kd_weight, student_bias,
                               teacher_bias, teacher_logits, teacher_topk, tail, student_softcap, teacher_softcap,
                               vocab_mismatch, num_items_in_batch, chunk_size):
    # The chunk loop of fastkd.fused_linear, each chunk's rows by this backend's row operators (a sparse teacher's
    # by its `sparse_kd_rows` where it has one: fused_linear.sparse_kernel_rows).
    return fused_linear.fused_linear_distill_terms(
        fused_linear.kernel_rows(kernels), student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
        loss=loss, beta=beta, temperature=temperature, ignore_index=ignore_index, ce_weight=ce_weight,
        kd_weight=kd_weight, student_bias=student_bias, teacher_bias=teacher_bias, teacher_logits=teacher_logits,
        teacher_topk=teacher_topk, tail=tail, student_softcap=student_softcap, teacher_softcap=teacher_softcap,
        vocab_mismatch=vocab_mismatch, num_items_in_batch=num_items_in_batch, chunk_size=chunk_size)


def fused_linear_distill_loss(kernels, student_hidden, student_weight, teacher_hidden, teacher_weight, labels, *,
                              loss, beta, temperature, ignore_index, ce_weight, kd_weight, student_bias,
                              teacher_bias, teacher_logits, teacher_topk, tail, student_softcap, teacher_softcap,
                              vocab_mismatch, num_items_in_batch, chunk_size):
    return fused_linear_distill_terms(
        kernels, student_hidden, student_weight, teacher_hidden, teacher_weight, labels, loss=loss, beta=beta,
        temperature=temperature, ignore_index=ignore_index, ce_weight=ce_weight, kd_weight=kd_weight,
        student_bias=student_bias, teacher_bias=teacher_bias, teacher_logits=teacher_logits,
        teacher_topk=teacher_topk, tail=tail, student_softcap=student_softcap, teacher_softcap=teacher_softcap,
        vocab_mismatch=vocab_mismatch, num_items_in_batch=num_items_in_batch, chunk_size=chunk_size)[0]


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


LOSSES = {fn.__name__: fn for fn in (kd_loss, kl_div_loss, jsd_loss, dkd_loss, sparse_kd_loss,
                                     fused_linear_distill_loss, fused_linear_distill_terms, rkd_distance_loss,
                                     rkd_angle_loss, rkd_loss, attention_map, at_loss)}

# The operators a loss needs that not every kernel backend has (`fastkd.kernel_ops.TRITON_ONLY`): a backend whose
# KernelSet lacks one does not run that loss (`fastkd._dispatch`). Every other loss runs on every backend.
NEEDS = {"sparse_kd_loss": ("sparse_kd_rows",)}


def missing_ops(loss: str, kernels) -> list[str]:
    """The operators `loss` needs that the KernelSet `kernels` does not have (empty: it runs there)."""
    return [op for op in NEEDS.get(loss, ()) if not hasattr(kernels, op)]


def backend_losses(kernels) -> list[str]:
    """The losses the KernelSet `kernels` runs, sorted."""
    return sorted(name for name in LOSSES if not missing_ops(name, kernels))
