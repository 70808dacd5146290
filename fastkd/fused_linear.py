"""Linear layer + distillation loss, fused by chunks of tokens: the `N x V` logits never exist.

`fused_linear_distill_loss(rows, ...)` computes, for hidden states `h (N, H)` and an output layer `W (V, H)`,
    z = softcap(h W^T + b),    softcap(z) = c tanh(z / c) when a cap c is given,
    loss = kd_weight * sum_tokens D(z_s, z_t) / n + ce_weight * sum_tokens CE(z_s, label) / n,
over the tokens whose label is not `ignore_index` (all tokens without labels), `n` their count (at least 1) or
`num_items_in_batch`. It walks the tokens in chunks of `chunk_size` rows: a chunk's logits are made by one
matrix product per side, turned into the chunk's loss and the gradient with respect to its student logits by
`rows` (the reference's closed forms, or a kernel backend's row operators, which make the gradient in the same
pass), and the gradient goes straight back through the layer:
    dL/dh_chunk = dz W,    dL/dW += dz^T h_chunk,    dL/db += sum_rows dz,
with `dz` first multiplied by the softcap's derivative `1 - (z / c)^2` (z after the cap: d c tanh(u / c)/du =
1 - tanh^2). So the gradients of the student's hidden states, weight and bias are made in the forward pass,
and the backward pass scales them by grad_output. The teacher gets no gradient.

Memory beyond the inputs and the gradients: one chunk's logits and logit gradient (`chunk x V`, a few of them
while a chunk is processed), and a float32 accumulator of `dL/dW` (`V x H`) when the weight is 16-bit (summing
the chunks' products in the weight's dtype would round once per chunk; float32 keeps the error of one product).
The default chunk (`default_chunk_size`) holds the chunk's logits to about the size of the hidden states,
`chunk ~ N / ceil(V / H)` (as Liger-Kernel's chunked losses do), and at least 64 rows, so the matrix products
stay large enough to run at speed: at N = 8192, H = 4096, V = 128256 it is 256 rows (256 x 128256 float32
logits: 131 MB, against 17 GB for all of them).

Vocabularies that differ (`vocab_mismatch="truncate"`): the divergence is taken over the first `min(V_s, V_t)`
ids of both sides (views, no copy; each distribution renormalised there), the student's CE over all of its own.

A sparse teacher (`teacher_topk=(ids, logprobs)`, `(N, k)` each, with a `tail`): the teacher side of a chunk is
its rows of ids and log-probabilities, no matrix product and no teacher logits, and `D(z_s, z_t)` is
`fastkd.reference.sparse.sparse_kd_rows`' loss of the row (a forward KL: "forward_kl", or "kd" times T^2). Its
gradient with respect to the chunk's student logits has a closed form
(`fastkd.reference.sparse.sparse_kd_rows_and_grad`): with `q = softmax(z_s / T)` and the slot masses `p_k`,
    dD/dz_j = (q_j sum_k p_k - sum_{k: i_k = j} p_k) / T,
plus, for tail "bucket", the tail outcome's `p_tail (q_j - [j not in the set] q_j / q_tail)`. A kernel backend
makes it with its `sparse_kd_rows` operator where its KernelSet has one (`kernel_rows`), else by the closed form
on the chunk (a few `chunk x V` tensors, as the chunk's logits: the memory bound holds either way).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

LOSSES = ("forward_kl", "reverse_kl", "jsd", "kd")
# The divergences a sparse teacher gives: its k log-probabilities define the forward KL's terms at those ids, while
# the reverse KL and the JSD weigh every id by the student's mass against the teacher's, unknown outside the k.
SPARSE_LOSSES = ("forward_kl", "kd")


@dataclass(frozen=True)
class Spec:
    """What the rows of a chunk compute; the per-token weights are 0-d device tensors (1 / n folded in)."""
    loss: str
    beta: float
    temperature: float
    ignore_index: int
    kd_weight: Tensor | None  # None: no divergence term
    ce_weight: Tensor | None  # None: no CE term
    vocab: int  # the ids the divergence runs over: min(V_s, V_t) (V_s for a sparse teacher)
    tail: str | None = None  # a sparse teacher's tail (fastkd.reference.sparse); None: the teacher is logits
    # Vocabulary parallel (fastkd.distributed.vocab_parallel.fused_rows): the weights are this rank's rows of the
    # output layers and the hidden states the same on every rank, so their gradient is the sum of every slice's.
    process_group: object = None


def default_chunk_size(rows: int, hidden: int, vocab: int) -> int:
    """A power of two near `rows / ceil(vocab / hidden)` (a chunk's logits about the size of the hidden states),
    at least 64, at most `rows` rounded up to a power of two."""
    chunk = 1 << max(0, math.ceil(math.log2(max(1, math.ceil(rows / math.ceil(vocab / hidden))))))
    return max(1, min(max(chunk, 64), 1 << math.ceil(math.log2(max(rows, 1)))))


def _softcap(z: Tensor, cap: float | None) -> Tensor:
    if cap is None:
        return z
    return (torch.tanh(z.to(_wide(z)) / cap) * cap).to(z.dtype)


def _wide(z: Tensor) -> torch.dtype:
    return torch.promote_types(z.dtype, torch.float32)


def _logits(h: Tensor, w: Tensor, b: Tensor | None, cap: float | None) -> Tensor:
    z = h @ w.t() if b is None else torch.addmm(b, h, w.t())
    return _softcap(z, cap)


def cross_entropy_rows(z: Tensor, labels: Tensor, ignore_index: int, weight: Tensor, grad: bool):
    """`sum_rows weight * CE(z_row, label)` over the kept rows, and its gradient with respect to `z` (float32 or
    wider): `weight * (softmax(z) - onehot(label))` on kept rows, 0 on ignored ones."""
    dtype = torch.promote_types(z.dtype, torch.float32)
    log_p = torch.log_softmax(z.to(dtype), dim=-1)
    keep = labels != ignore_index
    target = torch.where(keep, labels, 0).long()
    ce = torch.where(keep, -log_p.gather(-1, target[:, None]).squeeze(-1), 0.0)
    total = (ce * weight).sum()
    if not grad:
        return total, None
    d = log_p.exp_()
    d.scatter_add_(-1, target[:, None], torch.full_like(target[:, None], -1, dtype=dtype))
    return total, d.mul_(torch.where(keep, weight.to(dtype), 0.0)[:, None])


def _over_student_vocabulary(d: Tensor, vocab: int) -> Tensor:
    """The gradient `d` of the first `vocab` (shared) ids, zero-padded to the student's `vocab_s` columns when the
    teacher's vocabulary is the smaller (`vocab_mismatch="truncate"`); `d` itself otherwise."""
    if d.shape[-1] == vocab:
        return d
    full = d.new_zeros((d.shape[0], vocab))
    full[:, :d.shape[-1]] = d
    return full


def _sparse_divergence(z_s: Tensor, teacher: tuple[Tensor, Tensor], spec: Spec, grad: bool):
    """A chunk's sparse-teacher rows and, if `grad`, their gradients with respect to `z_s`, by the closed form."""
    from .reference.sparse import sparse_kd_rows, sparse_kd_rows_and_grad
    ids, logprobs = teacher
    if grad:
        return sparse_kd_rows_and_grad(z_s, ids, logprobs, spec.tail, spec.temperature)
    return sparse_kd_rows(z_s, ids, logprobs, spec.tail, spec.temperature), None


def reference_rows(z_s: Tensor, teacher, labels: Tensor | None, spec: Spec, grad: bool):
    """A chunk's weighted terms `[divergence, CE]` and the gradient of their sum with respect to `z_s` (or None),
    by the reference's closed forms (`fastkd.reference.logits._fused_rows`: `kl_div_loss` / `jsd_loss` per row;
    for a sparse teacher, `teacher` = the chunk's `(ids, logprobs)`, `sparse_kd_rows_and_grad`)."""
    from .reference.logits import _fused_rows
    kd_total = ce_total = z_s.new_zeros((), dtype=_wide(z_s))
    d_full = None
    if spec.kd_weight is not None:
        if spec.tail is not None:
            rows, d = _sparse_divergence(z_s, teacher, spec, grad)
        else:
            kind = {"forward_kl": "forward", "kd": "forward", "reverse_kl": "reverse"}.get(spec.loss, "jsd")
            if kind == "jsd" and spec.beta in (0.0, 1.0):  # TRL's ends: exactly the two KLs
                kind = "forward" if spec.beta == 0.0 else "reverse"
            rows, d = _fused_rows(z_s[:, :spec.vocab], teacher[:, :spec.vocab], spec.temperature, kind, spec.beta,
                                  grad)
        weight = spec.kd_weight.to(rows.dtype).expand(rows.shape)
        if labels is not None:
            weight = torch.where(labels != spec.ignore_index, weight, 0.0)
        kd_total = (torch.where(weight != 0, rows, 0.0) * weight).sum()
        if grad:
            # An ignored token's gradient is 0 whatever its logits (as the kernels', which do not read them).
            d = d.mul_(weight[:, None]).masked_fill_((weight == 0)[:, None], 0.0)
            d_full = _over_student_vocabulary(d, z_s.shape[-1])
    if spec.ce_weight is not None:
        ce_total, d = cross_entropy_rows(z_s, labels, spec.ignore_index, spec.ce_weight, grad)
        if grad:
            d_full = d if d_full is None else d_full.add_(d)
    return torch.stack([kd_total, ce_total]), d_full


def sparse_kernel_rows(kernels, z_s: Tensor, teacher: tuple[Tensor, Tensor], labels: Tensor | None, spec: Spec,
                       grad: bool):
    """`reference_rows` for a sparse teacher on a kernel backend: the one place where the fused loss meets a
    sparse-teacher kernel operator.

    A KernelSet without a `sparse_kd_rows` operator (a backend that does not launch it: `kernel_ops.TRITON_ONLY`
    ops are absent from the CUDA C++ one) gets the closed forms on the chunk (`reference_rows`): a few
    `chunk x V` float32 tensors, as the chunk's logits, so no `N x V` tensor either; only slower than one fused
    pass. With the operator, it is called as `fastkd.kernel_ops.sparse_kd_rows` declares it (the declaration was
    being written beside this code: if its schema changes, this call is the one to align):
    `(z_s, ids, logprobs, tail, T, labels, ignore_index, weight, student_grad) -> (per_row, d)`, `per_row` the
    unweighted loss of each row (0 where the label is `ignore_index`), `d` the weighted gradient
    `weight_r d row_r / d z_s` (0 on ignored rows; an empty tensor without `student_grad`), `weight` float32
    `(rows,)` (T^2 and 1 / n folded in). The CE term is `cross_entropy_rows`' in either case.
    """
    operator = getattr(kernels, "sparse_kd_rows", None)
    if operator is None or spec.kd_weight is None:
        return reference_rows(z_s, teacher, labels, spec, grad)
    ids, logprobs = teacher
    weight = spec.kd_weight.to(torch.float32).reshape(1).expand(z_s.shape[0])
    per_row, d_full = operator(z_s, ids, logprobs, spec.tail, spec.temperature, labels, spec.ignore_index, weight,
                               grad)
    kd_total = (per_row.float() * spec.kd_weight).sum()
    ce_total = torch.zeros_like(kd_total)
    if spec.ce_weight is not None:
        ce_total, d = cross_entropy_rows(z_s, labels, spec.ignore_index, spec.ce_weight, grad)
        if grad:
            d_full = d_full.float() + d
    return torch.stack([kd_total, ce_total]), (d_full if grad else None)


def kernel_rows(kernels):
    """The same as `reference_rows` by a kernel backend's row operators (`fastkd.kernel_ops`): the divergence and
    its gradient in one pass, the CE term in the same pass when the divergence is the forward KL over the
    student's whole vocabulary (else by `cross_entropy_rows`); a sparse teacher's by `sparse_kernel_rows`."""
    def rows(z_s: Tensor, z_t, labels: Tensor | None, spec: Spec, grad: bool):
        if spec.tail is not None:
            return sparse_kernel_rows(kernels, z_s, z_t, labels, spec, grad)
        n = z_s.shape[0]
        kd_total = ce_total = z_s.new_zeros((), dtype=torch.float32)
        d_full = None
        ce_in_kernel = (spec.ce_weight is not None and spec.loss in ("forward_kl", "kd")
                        and spec.vocab == z_s.shape[-1] and spec.kd_weight is not None)
        if spec.kd_weight is not None:
            s, t = z_s[:, :spec.vocab], z_t[:, :spec.vocab]
            weight = spec.kd_weight.to(torch.float32).reshape(1).expand(n)
            reverse = spec.loss == "reverse_kl" or (spec.loss == "jsd" and spec.beta == 1.0)
            if spec.loss == "jsd" and 0.0 < spec.beta < 1.0:
                per_row, d, _, _ = kernels.jsd_rows(s, t, spec.beta, spec.temperature, None, labels,
                                                   spec.ignore_index, weight, grad, False, False)
            else:
                target = ce_weight = None
                if ce_in_kernel:
                    target = torch.where(labels != spec.ignore_index, labels, 0)
                    ce_weight = spec.ce_weight.to(torch.float32).reshape(1).expand(n)
                per_row, ce, d, _, _ = kernels.kl_rows(s, t, spec.temperature, None, reverse, target, labels,
                                                       spec.ignore_index, weight, ce_weight, grad, False, False)
                if ce_in_kernel:
                    # An ignored token's CE is not computed (its logits are not read): left out here.
                    ce_total = (torch.where(labels != spec.ignore_index, ce, 0.0) * spec.ce_weight).sum()
            kd_total = (per_row * spec.kd_weight).sum()
            if grad:
                d_full = _over_student_vocabulary(d, z_s.shape[-1])
        if spec.ce_weight is not None and not ce_in_kernel:
            ce_total, d = cross_entropy_rows(z_s, labels, spec.ignore_index, spec.ce_weight, grad)
            if grad:
                d_full = d if d_full is None else (d_full.float() + d)
        return torch.stack([kd_total, ce_total]), d_full
    return rows


class _FusedLinearLoss(torch.autograd.Function):
    """The chunk loop: the loss, and its two weighted terms `[divergence, CE]` (not differentiable: for logging);
    the gradients of the student's hidden states, weight and bias are made in the forward pass and scaled by
    grad_output in the backward. Differentiable once, as the kernel losses."""

    @staticmethod
    def forward(ctx, rows, spec, chunk, softcaps, h_s, w_s, b_s, h_t, w_t, b_t, z_t, ids_t, lp_t, labels):
        want_h, want_w, want_b = ctx.needs_input_grad[4:7]
        grad = want_h or want_w or want_b
        n = h_s.shape[0]
        d_h = torch.empty_like(h_s) if want_h else None
        # A 16-bit weight's gradient sums in float32 (module docstring).
        d_w = torch.zeros(w_s.shape, dtype=torch.promote_types(w_s.dtype, torch.float32),
                          device=w_s.device) if want_w else None
        d_b = torch.zeros(b_s.shape, dtype=torch.promote_types(b_s.dtype, torch.float32),
                          device=b_s.device) if want_b else None
        parts = None
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            h = h_s[start:stop]
            z_s = _logits(h, w_s, b_s, softcaps[0])
            if ids_t is not None:  # a sparse teacher: its rows of ids and log-probabilities
                teacher = (ids_t[start:stop], lp_t[start:stop])
            elif z_t is not None:
                teacher = z_t[start:stop]
            else:
                teacher = _logits(h_t[start:stop], w_t, b_t, softcaps[1])
            part, dz = rows(z_s, teacher, None if labels is None else labels[start:stop], spec, grad)
            parts = part if parts is None else parts + part
            if not grad:
                continue
            if softcaps[0] is not None:
                dz = dz.to(_wide(dz)) * (1.0 - (z_s.to(_wide(z_s)) / softcaps[0]) ** 2)
            dz = dz.to(h.dtype)
            if want_h:
                torch.mm(dz, w_s, out=d_h[start:stop])
            if want_w:
                if d_w.dtype == dz.dtype:
                    d_w.addmm_(dz.t(), h)
                else:  # a 16-bit chunk product, rounded once, summed into the float32 accumulator
                    d_w.add_(dz.t() @ h)
            if want_b:
                d_b.add_(dz.sum(0))
        if spec.process_group is not None and want_h:
            # N x H numbers: the one collective of a vocabulary-parallel call beyond its per-row sums.
            import torch.distributed as dist
            dist.all_reduce(d_h, group=spec.process_group)
        ctx.spent = False
        ctx.save_for_backward(d_h, None if d_w is None else d_w.to(w_s.dtype),
                              None if d_b is None else d_b.to(b_s.dtype))
        ctx.mark_non_differentiable(parts)
        return parts.sum(), parts

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _):
        if ctx.spent:
            raise RuntimeError("fused_linear_distill_loss is once-differentiable: its gradients were made in the "
                               "forward pass and scaled by the first backward; compute the loss again instead")
        ctx.spent = True
        d_h, d_w, d_b = (None if d is None else d.mul_(grad.to(d.dtype)) for d in ctx.saved_tensors)
        return None, None, None, None, d_h, d_w, d_b, None, None, None, None, None, None, None


def fused_linear_distill_terms(rows, student_hidden, student_weight, teacher_hidden, teacher_weight, labels, *,
                               loss, beta, temperature, ignore_index, ce_weight, kd_weight, student_bias,
                               teacher_bias, teacher_logits, student_softcap, teacher_softcap, vocab_mismatch,
                               num_items_in_batch, chunk_size, teacher_topk=None,
                               tail="renormalize", process_group=None) -> tuple[Tensor, Tensor]:
    """The loss (module docstring) with the chunk's rows made by `rows` (`reference_rows` or `kernel_rows(...)`),
    and its terms `[kd_weight * divergence, ce_weight * CE]`, not differentiable (Liger's `return_soft_hard_loss`);
    arguments validated by `fastkd.functional.fused_linear_distill_loss`. `teacher_topk=(ids, logprobs)`: the
    sparse teacher with its `tail`, in place of the teacher's hidden states or logits (module docstring)."""
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    n = h_s.shape[0]
    h_t = None if teacher_hidden is None else teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    z_t = None if teacher_logits is None else teacher_logits.detach().reshape(n, -1)
    w_t = None if teacher_weight is None else teacher_weight.detach()
    b_t = None if teacher_bias is None else teacher_bias.detach()
    ids_t = lp_t = None
    if teacher_topk is not None:
        ids_t = teacher_topk[0].reshape(n, -1)
        lp_t = teacher_topk[1].detach().reshape(n, -1)
    flat_labels = None if labels is None else labels.reshape(-1)
    v_s = student_weight.shape[0]
    v_t = v_s if ids_t is not None else z_t.shape[-1] if z_t is not None else w_t.shape[0]
    dtype = _wide(h_s)
    if num_items_in_batch is not None:
        count = torch.as_tensor(num_items_in_batch, device=h_s.device).to(dtype).reshape(())
    elif flat_labels is not None:
        count = (flat_labels != ignore_index).sum().clamp(min=1).to(dtype)
    else:
        count = torch.tensor(float(n), dtype=dtype, device=h_s.device)
    factor = kd_weight * (temperature * temperature if loss == "kd" else 1.0)
    spec = Spec(loss, beta, temperature, ignore_index,
                kd_weight=None if kd_weight == 0.0 else factor / count,
                ce_weight=None if ce_weight == 0.0 else ce_weight / count,
                vocab=min(v_s, v_t), tail=None if teacher_topk is None else tail, process_group=process_group)
    chunk = chunk_size or default_chunk_size(n, h_s.shape[-1], max(v_s, v_t))
    return _FusedLinearLoss.apply(rows, spec, chunk, (student_softcap, teacher_softcap), h_s, student_weight,
                                  student_bias, h_t, w_t, b_t, z_t, ids_t, lp_t, flat_labels)
