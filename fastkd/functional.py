"""The public loss functions: validate the inputs, pick a backend, run it.

Each function's maths is documented on its reference in `fastkd.reference`; the docstrings here say
what to pass. Every function takes `backend`: None (the `FASTKD_BACKEND` environment variable, else
"auto"), "auto", "torch", "triton" or "cuda" (see `fastkd.available_backends()`).
The loss is returned in float32 for float16/bfloat16 inputs (float64 for float64 inputs).

Temperature: the logit losses take a positive number or a floating tensor on the logits' device, 0-d (a
learnable temperature, e.g. an `nn.Parameter` as in CTKD) or broadcastable to the rows `logits.shape[:-1]` (one
per row, per sequence, ...). A tensor gets its gradient like any input; the kernel backends make it in the same
pass as the logits' gradient, and never read its value on the host. The `T^2` factors of KD and DKD are then
per row (`T_r^2 KL_r`). A row whose tensor temperature is not > 0 gets a NaN loss (a number is checked here).

Vocabularies of different sizes (a student and a teacher padded differently, e.g. Qwen2.5's 151936 and
152064): the logit losses raise a ValueError naming both sizes unless `vocab_mismatch="truncate"`, which distils
over the first min(V_s, V_t) ids of both (views, no copy; both distributions renormalised there); KD's
cross-entropy term keeps the student's whole vocabulary.

Mixed dtypes: the student and the teacher may have different floating dtypes (float16, bfloat16, float32,
float64), e.g. a float32 student against a bfloat16 teacher. The arithmetic then runs in the wider of the
two and at least float32 (`torch.promote_types(s.dtype, t.dtype, float32)`), the loss comes back in that
dtype and each input's gradient in its own dtype; every backend follows this rule (the kernels compute in
float32 and send a float64 input to the reference).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import _checks as checks
from . import fused_linear, reference
from ._dispatch import resolve

__all__ = [
    "kd_loss", "kl_div_loss", "jsd_loss", "dkd_loss", "sparse_kd_loss", "fused_linear_distill_loss", "kl_div",
    "mutual_learning_loss", "rkd_loss", "rkd_distance_loss", "rkd_angle_loss", "attention_map", "at_loss", "sp_loss",
    "fsp_matrix", "fsp_loss", "pkt_loss", "nst_loss", "cc_loss", "hint_loss",
]


def __dir__() -> list[str]:
    # dir() and tab completion list the public API, not this module's imports (torch, checks, resolve).
    return sorted(__all__)


DIRECTIONS = ("forward", "reverse")
AT_MODES = ("code", "paper")
SP_NORMS = ("l2", "l1")
SPARSE_TAILS = reference.sparse.TAILS


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float | torch.Tensor = 4.0, *,
            reduction: str = "batchmean", target: torch.Tensor | None = None, ce_weight: float = 0.0,
            kd_weight: float = 1.0, vocab_mismatch: str = "error", process_group=None, vocab_range=None,
            backend: str | None = None) -> torch.Tensor:
    """Hinton KD: `ce_weight * CE(z_s, target) + kd_weight * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))`.

    Logits `(..., C)`; `target` `(...)` class indices, needed when `ce_weight != 0`.
    reduction: "batchmean" (default, per row), "sum", "mean" (PyTorch's per element), "none" (per row).
    Defaults give RepDistiller's `DistillKL(4)`; its training mix is `ce_weight=0.1, kd_weight=0.9`.
    The logits may differ in floating dtype: computed in the wider and at least float32 (module docstring).
    Vocabularies of different sizes: module docstring (the CE term keeps the student's whole vocabulary).
    `process_group`, `vocab_range`: the logits split by vocabulary across the ranks (`_vocab_parallel`); `target`
    then holds global ids.
    """
    checks.check_logits(student_logits, teacher_logits, vocab_mismatch)
    temperature = checks.check_temperature(temperature, student_logits)
    checks.check_choice("reduction", reduction, checks.LOGIT_REDUCTIONS)
    ce_weight = checks.check_number("ce_weight", ce_weight)
    kd_weight = checks.check_number("kd_weight", kd_weight)
    where = _vocab_parallel(backend, process_group, vocab_range, student_logits, teacher_logits)
    if target is not None:
        checks.check_target("target", target, student_logits, None if where is None else where.total)
    elif ce_weight != 0.0:
        raise ValueError(f"ce_weight={ce_weight} needs target (the hard labels), got target=None")
    if where is not None:
        from .distributed import vocab_parallel
        return vocab_parallel.kd_loss(student_logits, teacher_logits, temperature, reduction=reduction, target=target,
                                      ce_weight=ce_weight, kd_weight=kd_weight, where=where, group=process_group,
                                      kernels=_vocab_kernels(backend, student_logits, teacher_logits))
    impl = resolve("kd_loss", backend, student_logits, teacher_logits)
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        s, t = _shared_vocabulary(student_logits, teacher_logits)
        loss = impl(s, t, temperature, reduction=reduction, target=None, ce_weight=0.0, kd_weight=kd_weight)
        if target is None or ce_weight == 0.0:
            return loss
        return loss + ce_weight * reference.logits.hard_label_term(student_logits, target, reduction, loss.dtype)
    return impl(student_logits, teacher_logits, temperature, reduction=reduction, target=target,
                ce_weight=ce_weight, kd_weight=kd_weight)


def _vocab_parallel(backend, process_group, vocab_range, student_logits: torch.Tensor,
                    teacher_logits: torch.Tensor | None, local_vocab: int | None = None):
    """A vocabulary-parallel call's slice of the vocabulary (`fastkd.distributed.VocabSlice`), or None without a
    `process_group`.

    With a group, the last dimension of the logits is this rank's slice of the vocabulary: rank r of W holds ids
    `[r * V_local, (r + 1) * V_local)` (equal slices), or `vocab_range=(start, end)` (given on every rank; the
    slices must tile the vocabulary in rank order). Every rank holds the same rows; targets, labels and a sparse
    teacher's ids are global ids. Every rank gets the loss of the whole vocabulary, and the gradient of its slice
    equals that slice of the single-process gradient. Only per-row numbers cross the network (normalisers and
    partial sums: `fastkd.distributed.vocab_parallel`); the logits are never gathered. The layout is checked on
    every rank first (one all-gather of four integers per rank), so a wrong one raises the same ValueError on every
    rank. The divergences run on a kernel backend's slice operators where `_vocab_kernels` finds them, else the
    reference's arithmetic (`fastkd.distributed.vocab_parallel`).
    """
    if process_group is None:
        if vocab_range is not None:
            raise ValueError("vocab_range says which slice of the vocabulary this rank's logits hold; it needs "
                             "process_group (the ranks that hold the other slices)")
        return None
    if teacher_logits is not None and student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"with process_group the student's and the teacher's logits must hold the same slice of the "
                         f"vocabulary, got {student_logits.shape[-1]} and {teacher_logits.shape[-1]} ids "
                         f"(vocab_mismatch='truncate' is not supported across ranks)")
    from .distributed import vocab_slice
    if local_vocab is not None:  # the fused loss: `student_logits` is the hidden states, (..., H)
        rows = student_logits.numel() // max(1, student_logits.shape[-1])
        return vocab_slice(process_group, local_vocab, vocab_range, rows, student_logits.device)
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have a class dimension, got a 0-d tensor")
    rows = student_logits.numel() // max(1, student_logits.shape[-1])
    return vocab_slice(process_group, student_logits.shape[-1], vocab_range, rows, student_logits.device)


def _vocab_kernels(backend, *inputs: torch.Tensor):
    """The KernelSet whose slice operators make a vocabulary-parallel divergence (`backend` resolved as for every
    loss: "auto" takes a kernel backend on CUDA tensors), or None for the reference's arithmetic."""
    from ._dispatch import resolve_kernel_set
    from .distributed.vocab_parallel import KERNEL_OPS
    return resolve_kernel_set("vocabulary-parallel divergences", KERNEL_OPS, backend, *inputs)


def _shared_vocabulary(student_logits: torch.Tensor, teacher_logits: torch.Tensor):
    """Both logit tensors over their first min(V_s, V_t) ids: views, no copy."""
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :vocab], teacher_logits[..., :vocab]


def _check_token_loss_args(student_logits, teacher_logits, temperature, labels, ignore_index, reduction,
                           vocab_mismatch):
    checks.check_logits(student_logits, teacher_logits, vocab_mismatch)
    checks.check_choice("reduction", reduction, checks.LOGIT_REDUCTIONS)
    checks.check_int("ignore_index", ignore_index)
    if labels is not None:
        checks.check_labels(labels, student_logits)
    return checks.check_temperature(temperature, student_logits)


def kl_div_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                temperature: float | torch.Tensor = 1.0, *,
                direction: str = "forward", labels: torch.Tensor | None = None, ignore_index: int = -100,
                reduction: str = "batchmean", vocab_mismatch: str = "error", process_group=None,
                vocab_range=None, backend: str | None = None) -> torch.Tensor:
    """Token-level KL for language-model distillation: forward `KL(p_t || p_s)` or reverse `KL(p_s || p_t)`.

    Logits `(..., V)`; `labels` `(...)`: tokens equal to `ignore_index` are left out, and "batchmean"
    is the mean over the remaining tokens (0 when none remain). No `T^2` factor.
    The logits may differ in floating dtype: computed in the wider and at least float32 (module docstring).
    `process_group`, `vocab_range`: the logits split by vocabulary across the ranks (`_vocab_parallel`).
    """
    temperature = _check_token_loss_args(student_logits, teacher_logits, temperature, labels, ignore_index,
                                         reduction, vocab_mismatch)
    checks.check_choice("direction", direction, DIRECTIONS)
    where = _vocab_parallel(backend, process_group, vocab_range, student_logits, teacher_logits)
    if where is not None:
        from .distributed import vocab_parallel
        return vocab_parallel.token_loss(student_logits, teacher_logits, temperature, kind=direction, beta=0.5,
                                         labels=labels, ignore_index=ignore_index, reduction=reduction, where=where,
                                         group=process_group,
                                         kernels=_vocab_kernels(backend, student_logits, teacher_logits))
    impl = resolve("kl_div_loss", backend, student_logits, teacher_logits)
    student_logits, teacher_logits = _shared_vocabulary(student_logits, teacher_logits)
    return impl(student_logits, teacher_logits, temperature, direction=direction, labels=labels,
                ignore_index=ignore_index, reduction=reduction)


def jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float = 0.5,
             temperature: float | torch.Tensor = 1.0, labels: torch.Tensor | None = None,
             ignore_index: int = -100, reduction: str = "batchmean", vocab_mismatch: str = "error",
             process_group=None, vocab_range=None, backend: str | None = None) -> torch.Tensor:
    """TRL's generalized JSD: beta 0 is `KL(p_t || p_s)`, beta 1 is `KL(p_s || p_t)`, 0.5 the symmetric JSD.

    Logits `(..., V)`; masking and reductions as in `kl_div_loss`.
    The logits may differ in floating dtype: computed in the wider and at least float32 (module docstring).
    `process_group`, `vocab_range`: the logits split by vocabulary across the ranks (`_vocab_parallel`).
    """
    temperature = _check_token_loss_args(student_logits, teacher_logits, temperature, labels, ignore_index,
                                         reduction, vocab_mismatch)
    beta = checks.check_unit_interval("beta", beta)
    where = _vocab_parallel(backend, process_group, vocab_range, student_logits, teacher_logits)
    if where is not None:
        from .distributed import vocab_parallel
        kind = "forward" if beta == 0.0 else "reverse" if beta == 1.0 else "jsd"
        return vocab_parallel.token_loss(student_logits, teacher_logits, temperature, kind=kind, beta=beta,
                                         labels=labels, ignore_index=ignore_index, reduction=reduction, where=where,
                                         group=process_group,
                                         kernels=_vocab_kernels(backend, student_logits, teacher_logits))
    impl = resolve("jsd_loss", backend, student_logits, teacher_logits)
    student_logits, teacher_logits = _shared_vocabulary(student_logits, teacher_logits)
    return impl(student_logits, teacher_logits, beta=beta, temperature=temperature, labels=labels,
                ignore_index=ignore_index, reduction=reduction)


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, *,
             alpha: float = 1.0, beta: float = 8.0, temperature: float | torch.Tensor = 4.0,
             vocab_mismatch: str = "error", backend: str | None = None) -> torch.Tensor:
    """Decoupled KD, mdistiller's `dkd_loss`: `alpha * TCKD + beta * NCKD`. Logits `(B, C)`, target `(B,)`.

    The logits may differ in floating dtype: computed in the wider and at least float32 (module docstring).
    """
    checks.check_logits(student_logits, teacher_logits, vocab_mismatch)
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be 2-d (batch, classes) for DKD, got shape "
                         f"{tuple(student_logits.shape)}")
    student_logits, teacher_logits = _shared_vocabulary(student_logits, teacher_logits)
    checks.check_target("target", target, student_logits)
    alpha = checks.check_number("alpha", alpha)
    beta = checks.check_number("beta", beta)
    temperature = checks.check_temperature(temperature, student_logits)
    impl = resolve("dkd_loss", backend, student_logits, teacher_logits)
    return impl(student_logits, teacher_logits, target, alpha=alpha, beta=beta, temperature=temperature)


def sparse_kd_loss(student_logits: torch.Tensor, teacher_indices: torch.Tensor, teacher_logprobs: torch.Tensor,
                   labels: torch.Tensor | None = None, *, tail: str = "renormalize", temperature: float = 1.0,
                   ignore_index: int = -100, num_items_in_batch=None, reduction: str = "batchmean",
                   process_group=None, vocab_range=None, backend: str | None = None) -> torch.Tensor:
    """Token-level KD against a sparse teacher: its top-k (or sampled) ids and their log-probabilities.

    `student_logits` `(..., V)`; `teacher_indices` `(..., k)` integer ids and `teacher_logprobs` `(..., k)` the
    teacher's log-probabilities of those ids (normalised over its full vocabulary), -inf in an unused slot (its
    id is then ignored). With `log q = log_softmax(student_logits / T)`, per token:
    - tail "renormalize": `KL(p || q)` over the k ids with `p = softmax(teacher_logprobs / T)`; with k = V it is
      `kl_div_loss(student_logits, teacher_logits, T)`. Sampled ids go here, as `log(count / n)`, merged.
    - tail "bucket": the KL over the k ids plus one outcome for all other ids, `1 - sum p_k` against
      `1 - sum q_{i_k}`; needs `temperature=1`.
    - tail "none": `sum_k p_k (log p_k - log q_{i_k})`, `p_k = exp(teacher_logprobs)` (the truncated KL); needs
      `temperature=1`.
    `labels` `(...)`: tokens equal to `ignore_index` are left out; reductions as `kl_div_loss` ("batchmean" the
    mean over the remaining tokens, "sum", "mean", "none"). `num_items_in_batch` (a number or a one-element
    tensor, "batchmean" only): divide the sum by it instead of the token count (gradient accumulation).
    Rows whose slots are all unused give 0; ids should be distinct in a row (merge duplicates); a used id outside
    [0, V) raises a ValueError on CPU tensors and makes its row NaN on a GPU. The exact definitions:
    `fastkd/reference/sparse.py`. `temperature`: a positive number (no tensor temperature yet).
    Backends: the reference, and Triton's kernel (`fastkd/triton/sparse.py`: one read of the student's logits and
    its gradient written in the same pass); the CUDA C++ backend has no kernel for it yet (naming "cuda" raises a
    BackendUnavailableError; "auto" on CUDA tensors runs Triton). Log-probabilities that require a gradient get
    the reference on any backend (the kernel makes the student's gradient only).
    `process_group`, `vocab_range`: the student's logits split by vocabulary across the ranks
    (`_vocab_parallel`); `teacher_indices` hold global ids and are the same on every rank.
    """
    checks.check_float_tensor("student_logits", student_logits)
    where = _vocab_parallel(backend, process_group, vocab_range, student_logits, None)
    checks.check_sparse_teacher(student_logits, teacher_indices, teacher_logprobs,
                                None if where is None else where.total)
    checks.check_choice("tail", tail, SPARSE_TAILS)
    temperature = checks.check_sparse_temperature(temperature, tail)
    checks.check_choice("reduction", reduction, checks.LOGIT_REDUCTIONS)
    checks.check_int("ignore_index", ignore_index)
    if labels is not None:
        checks.check_labels(labels, student_logits)
    checks.check_num_items_in_batch(num_items_in_batch)
    if num_items_in_batch is not None and reduction != "batchmean":
        raise ValueError(f"num_items_in_batch replaces the token count of reduction='batchmean'; it cannot be "
                         f"combined with reduction={reduction!r}")
    if where is not None:
        from .distributed import vocab_parallel
        if backend in ("triton", "cuda"):
            from ._dispatch import BackendUnavailableError
            raise BackendUnavailableError(f"backend {backend!r} has no vocabulary-parallel kernel for sparse_kd_loss: "
                                          f"with process_group it runs the reference's arithmetic (backend=None or "
                                          f"'torch')")
        return vocab_parallel.sparse_kd_loss(student_logits, teacher_indices, teacher_logprobs, labels, tail=tail,
                                             temperature=temperature, ignore_index=ignore_index,
                                             num_items_in_batch=num_items_in_batch, reduction=reduction,
                                             where=where, group=process_group)
    impl = resolve("sparse_kd_loss", backend, student_logits, teacher_logprobs)
    return impl(student_logits, teacher_indices, teacher_logprobs, labels, tail=tail, temperature=temperature,
                ignore_index=ignore_index, num_items_in_batch=num_items_in_batch, reduction=reduction)


def fused_linear_distill_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                              teacher_hidden: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None,
                              labels: torch.Tensor | None = None, *, loss: str = "forward_kl", beta: float = 0.5,
                              temperature: float = 1.0, ignore_index: int = -100, ce_weight: float = 0.0,
                              kd_weight: float = 1.0, student_bias: torch.Tensor | None = None,
                              teacher_bias: torch.Tensor | None = None, teacher_logits: torch.Tensor | None = None,
                              teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None, tail: str = "renormalize",
                              student_softcap: float | None = None, teacher_softcap: float | None = None,
                              vocab_mismatch: str = "error", num_items_in_batch=None, chunk_size: int | None = None,
                              process_group=None, vocab_range=None, backend: str | None = None) -> torch.Tensor:
    """Output layer + distillation loss for language models, fused by chunks of tokens: the `N x V` logits of
    either side never exist (`fastkd.fused_linear`).

    Hidden states `(..., H)`, weights `(V, H)` as in `nn.Linear` (biases `(V,)`), labels `(...)` token ids. With
    `z = softcap(hidden @ weight.T + bias)` (`softcap(z) = c * tanh(z / c)` when given, as Gemma's final logits),
    the value is exactly that of the unfused composition
        kd_weight * D(z_s, z_t) + ce_weight * CE(z_s, labels),
    D per token by `loss`: "forward_kl" / "reverse_kl" (`kl_div_loss`), "jsd" (`jsd_loss`, TRL's beta), "kd"
    (forward KL times T^2); CE on the raw (capped, untempered) student logits. Both are sums over the tokens whose
    label is not `ignore_index` (every token without labels), divided by their count (at least 1), or by
    `num_items_in_batch` when given (gradient accumulation: the count of the whole accumulated batch, a number or
    a 0-d tensor). The teacher comes as hidden states and weight (and bias), or as precomputed `teacher_logits`
    `(..., V_t)`; it gets no gradient. The student's hidden states, weight and bias get theirs.
    `vocab_mismatch`: as the logit losses ("truncate": the divergence over the first min(V_s, V_t) ids, CE over
    the student's whole vocabulary). `chunk_size`: tokens per chunk (default `fused_linear.default_chunk_size`).
    Differentiable once (the gradients are made in the forward pass).

    A sparse teacher (a teacher cache): `teacher_topk=(teacher_indices, teacher_logprobs)`, `(..., k)` each, the
    ids of the teacher's top-k (or sampled) tokens and their log-probabilities (normalised over the teacher's
    full vocabulary, -inf in an unused slot), instead of teacher_hidden/teacher_weight/teacher_logits; so neither
    side's logits exist. D per token is then `sparse_kd_loss`'s, with its `tail` ("renormalize", "bucket",
    "none"; the last two need `temperature=1`) and its rules for unused slots, rows with none and duplicate ids;
    the ids index the student's vocabulary (a used id outside [0, V_s) raises on CPU tensors, makes its token's
    loss NaN on a GPU; `vocab_mismatch` has no teacher vocabulary to compare). `loss` must be "forward_kl" or
    "kd" (times T^2): the k log-probabilities give the forward KL only. The teacher's log-probabilities get no
    gradient. `tail` applies to `teacher_topk` only.

    Past one GPU:
    - Tensor parallel (`process_group`, `vocab_range`): `student_weight` (and `teacher_weight`, biases,
      `teacher_logits`) are this rank's rows `[start, end)` of the output layers, split by vocabulary as
      `_vocab_parallel` says (Megatron's vocabulary-parallel output layer); the hidden states, labels and a sparse
      teacher's ids (global) are the same on every rank. Every rank gets the loss of the whole vocabulary; its
      weight's gradient is its rows of the single-process one, and the hidden states' gradient is all-reduced here
      (the one `N x H` collective; do not also all-reduce it in a "copy to tensor-parallel region" before this
      call). Per chunk only per-row numbers cross the network; no logit does.
    - FSDP2: a `student_weight` (or `teacher_weight`) that is a `DTensor` sharded over its mesh is gathered once per
      call (`fastkd.distributed.dtensor.full_weight`); its gradient goes back as a reduce-scatter averaged over the
      mesh, as FSDP2 averages every other parameter's. Each rank's tokens are its own (data parallel).
    """
    return _fused_linear_distill(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, loss=loss,
                                 beta=beta, temperature=temperature, ignore_index=ignore_index, ce_weight=ce_weight,
                                 kd_weight=kd_weight, student_bias=student_bias, teacher_bias=teacher_bias,
                                 teacher_logits=teacher_logits, student_softcap=student_softcap,
                                 teacher_softcap=teacher_softcap, vocab_mismatch=vocab_mismatch,
                                 num_items_in_batch=num_items_in_batch, chunk_size=chunk_size, backend=backend,
                                 teacher_topk=teacher_topk, tail=tail, process_group=process_group,
                                 vocab_range=vocab_range)


def _fused_linear_distill(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, *, loss, beta,
                          temperature, ignore_index, ce_weight, kd_weight, student_bias, teacher_bias,
                          teacher_logits, student_softcap, teacher_softcap, vocab_mismatch, num_items_in_batch,
                          chunk_size, backend, return_terms=False, teacher_topk=None, tail="renormalize",
                          process_group=None, vocab_range=None):
    """`fused_linear_distill_loss`, validated and dispatched; `return_terms`: `(loss, terms)`, the terms
    `[kd_weight * D, ce_weight * CE]` not differentiable (for the Liger drop-in's `return_soft_hard_loss`)."""
    from .distributed.dtensor import full_weight, is_dtensor
    if is_dtensor(student_weight) or is_dtensor(teacher_weight):
        if process_group is not None:
            raise ValueError("pass the output weight either as a DTensor (FSDP2: gathered once per call) or as this "
                             "rank's vocabulary rows with process_group (tensor parallel), not both")
        student_weight = full_weight(student_weight)
        teacher_weight = None if teacher_weight is None else full_weight(teacher_weight.detach())
    checks.check_float_tensor("student_hidden", student_hidden)
    checks.check_float_tensor("student_weight", student_weight)
    if student_hidden.dim() < 1 or student_hidden.numel() == 0:
        raise ValueError(f"student_hidden must be (..., hidden) with at least one token, got shape "
                         f"{tuple(student_hidden.shape)}")
    rows_shape = student_hidden.shape[:-1]
    _check_layer("student", student_hidden, student_weight, student_bias)
    where = _vocab_parallel(backend, process_group, vocab_range, student_hidden, None,
                            local_vocab=student_weight.shape[0])
    vocab = student_weight.shape[0] if where is None else where.total
    checks.check_choice("tail", tail, SPARSE_TAILS)
    teacher_logprobs = None
    if teacher_topk is not None:
        teacher_logprobs = _check_teacher_topk(teacher_topk, student_hidden, student_weight, teacher_hidden,
                                               teacher_weight, teacher_logits, teacher_bias, teacher_softcap, loss,
                                               vocab)
        teacher_vocab = student_weight.shape[0]  # the ids index the student's vocabulary
    elif tail != "renormalize":
        raise ValueError(f"tail={tail!r} applies to a sparse teacher (teacher_topk) only, and teacher_topk is None")
    elif teacher_logits is not None:
        if teacher_hidden is not None or teacher_weight is not None:
            raise ValueError("pass the teacher either as teacher_hidden and teacher_weight or as teacher_logits, "
                             "not both")
        checks.check_float_tensor("teacher_logits", teacher_logits)
        checks.check_same_device(teacher_logits=teacher_logits, student_hidden=student_hidden)
        if teacher_logits.shape[:-1] != rows_shape or teacher_logits.dim() != student_hidden.dim():
            raise ValueError(f"teacher_logits must have shape {tuple(rows_shape)} + (V_t,) (one row per token of "
                             f"student_hidden), got {tuple(teacher_logits.shape)}")
        if teacher_softcap is not None or teacher_bias is not None:
            raise ValueError("teacher_softcap and teacher_bias apply to logits made from teacher_hidden; "
                             "precomputed teacher_logits are taken as the teacher's final logits")
        teacher_vocab = teacher_logits.shape[-1]
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("the teacher is missing: pass teacher_hidden and teacher_weight, or teacher_logits, or "
                             "teacher_topk")
        checks.check_float_tensor("teacher_hidden", teacher_hidden)
        checks.check_float_tensor("teacher_weight", teacher_weight)
        if teacher_hidden.shape[:-1] != rows_shape:
            raise ValueError(f"teacher_hidden must have the tokens of student_hidden, shape {tuple(rows_shape)} + "
                             f"(H_t,), got {tuple(teacher_hidden.shape)}")
        _check_layer("teacher", teacher_hidden, teacher_weight, teacher_bias)
        checks.check_same_device(teacher_hidden=teacher_hidden, student_hidden=student_hidden)
        teacher_vocab = teacher_weight.shape[0]
    checks.check_choice("loss", loss, fused_linear.LOSSES)
    beta = checks.check_unit_interval("beta", beta)
    if isinstance(temperature, torch.Tensor):
        raise TypeError("fused_linear_distill_loss takes temperature as a positive Python number; a tensor "
                        "(learnable) temperature is supported by kd_loss, kl_div_loss, jsd_loss and dkd_loss, "
                        "not by the fused loss yet")
    temperature = checks.check_positive("temperature", temperature)
    if teacher_topk is not None:
        checks.check_sparse_temperature(temperature, tail)
    checks.check_int("ignore_index", ignore_index)
    ce_weight = checks.check_number("ce_weight", ce_weight)
    kd_weight = checks.check_number("kd_weight", kd_weight)
    softcaps = [None if c is None else checks.check_positive(name, c)
                for name, c in (("student_softcap", student_softcap), ("teacher_softcap", teacher_softcap))]
    checks.check_vocab_sizes(student_weight.shape[0], teacher_vocab, vocab_mismatch,
                             " (student_weight rows against the teacher's)")
    if where is not None and student_weight.shape[0] != teacher_vocab:
        raise ValueError(f"with process_group the student's and the teacher's output layers must hold the same "
                         f"slice of the vocabulary, got {student_weight.shape[0]} and {teacher_vocab} rows "
                         f"(vocab_mismatch='truncate' is not supported across ranks)")
    if labels is not None:
        checks.check_index_tensor("labels", labels)
        checks.check_same_device(labels=labels, student_hidden=student_hidden)
        if labels.shape != rows_shape:
            raise ValueError(f"labels must have shape {tuple(rows_shape)} (one per token), got {tuple(labels.shape)}")
        if labels.device.type == "cpu" and not torch.compiler.is_compiling():
            kept = labels[labels != ignore_index]
            if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= vocab):
                raise ValueError(f"labels holds token ids outside [0, {vocab}) that are not "
                                 f"ignore_index={ignore_index}: min {int(kept.min())}, max {int(kept.max())}")
    elif ce_weight != 0.0:
        raise ValueError(f"ce_weight={ce_weight} needs labels (the next-token ids), got labels=None")
    checks.check_num_items_in_batch(num_items_in_batch)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (tokens per chunk), got {chunk_size!r}")
    floats = [student_hidden, student_weight] + [t for t in (teacher_hidden, teacher_weight, teacher_logits,
                                                             teacher_logprobs) if t is not None]
    name = "fused_linear_distill_terms" if return_terms else "fused_linear_distill_loss"
    if where is not None:
        from .distributed import vocab_parallel
        out = fused_linear.fused_linear_distill_terms(
            vocab_parallel.fused_rows(where, process_group, None if teacher_topk is not None else _vocab_kernels(
                backend, *floats)), student_hidden, student_weight, teacher_hidden,
            teacher_weight, labels, loss=loss, beta=beta, temperature=temperature, ignore_index=ignore_index,
            ce_weight=ce_weight, kd_weight=kd_weight, student_bias=student_bias, teacher_bias=teacher_bias,
            teacher_logits=teacher_logits, teacher_topk=None if teacher_topk is None else tuple(teacher_topk),
            tail=tail, student_softcap=softcaps[0], teacher_softcap=softcaps[1], vocab_mismatch=vocab_mismatch,
            num_items_in_batch=num_items_in_batch, chunk_size=chunk_size, process_group=process_group)
        return out if return_terms else out[0]
    impl = resolve(name, backend, *floats)
    return impl(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, loss=loss, beta=beta,
                temperature=temperature, ignore_index=ignore_index, ce_weight=ce_weight, kd_weight=kd_weight,
                student_bias=student_bias, teacher_bias=teacher_bias, teacher_logits=teacher_logits,
                teacher_topk=None if teacher_topk is None else tuple(teacher_topk), tail=tail,
                student_softcap=softcaps[0], teacher_softcap=softcaps[1], vocab_mismatch=vocab_mismatch,
                num_items_in_batch=num_items_in_batch, chunk_size=chunk_size)


def _check_teacher_topk(teacher_topk, student_hidden, student_weight, teacher_hidden, teacher_weight,
                        teacher_logits, teacher_bias, teacher_softcap, loss, vocab: int) -> torch.Tensor:
    """A sparse teacher for the fused loss: a pair `(ids, logprobs)` of `(..., k)` tensors for the tokens of
    `student_hidden`, alone as the teacher, with a forward-KL `loss`. Returns the log-probabilities."""
    if isinstance(teacher_topk, torch.Tensor) or not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
        raise TypeError(f"teacher_topk must be a pair (teacher_indices, teacher_logprobs) of (..., k) tensors, got "
                        f"{type(teacher_topk).__name__}" + (f" of length {len(teacher_topk)}"
                                                            if isinstance(teacher_topk, (tuple, list)) else ""))
    given = [name for name, t in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                                  ("teacher_logits", teacher_logits)) if t is not None]
    if given:
        raise ValueError(f"pass the teacher either as teacher_topk or as teacher_hidden and teacher_weight or as "
                         f"teacher_logits, not several: got teacher_topk and {' and '.join(given)}")
    if teacher_softcap is not None or teacher_bias is not None:
        raise ValueError("teacher_softcap and teacher_bias apply to logits made from teacher_hidden; a sparse "
                         "teacher (teacher_topk) is given as its log-probabilities")
    checks.check_choice("loss", loss, fused_linear.LOSSES)
    if loss not in fused_linear.SPARSE_LOSSES:
        raise ValueError(f"a sparse teacher (teacher_topk) gives the forward KL only: loss must be one of "
                         f"{fused_linear.SPARSE_LOSSES}, got {loss!r} (the reverse KL and the JSD need the "
                         f"teacher's probability of every id, not only of its k)")
    teacher_indices, teacher_logprobs = teacher_topk
    rows_shape = student_hidden.shape[:-1]
    checks.check_sparse_slots(teacher_indices, teacher_logprobs, rows_shape, vocab,
                              f"student_hidden {tuple(student_hidden.shape)}", student_hidden=student_hidden)
    return teacher_logprobs


def _check_layer(side: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """An output layer `(V, H)` (and bias `(V,)`) that the hidden states `(..., H)` multiply, in their dtype."""
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"{side}_weight must be (vocabulary, hidden) = (V, {hidden.shape[-1]}) as nn.Linear's "
                         f"weight for {side}_hidden of shape {tuple(hidden.shape)}, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{side}_weight ({weight.dtype}) and {side}_hidden ({hidden.dtype}) must have the same dtype")
    checks.check_same_device(**{f"{side}_hidden": hidden, f"{side}_weight": weight})
    if bias is not None:
        checks.check_float_tensor(f"{side}_bias", bias)
        checks.check_same_device(**{f"{side}_bias": bias, f"{side}_weight": weight})
        if bias.shape != weight.shape[:1] or bias.dtype != weight.dtype:
            raise ValueError(f"{side}_bias must be ({weight.shape[0]},) in {weight.dtype}, got "
                             f"{tuple(bias.shape)} in {bias.dtype}")


def kl_div(input: torch.Tensor, target: torch.Tensor, reduction: str = "mean", log_target: bool = False, *,
           backend: str | None = None) -> torch.Tensor:
    """`torch.nn.functional.kl_div(input, target, reduction, log_target)` with 0 (not NaN) where target is 0.

    `input` holds log-probabilities, `target` probabilities (log-probabilities with `log_target=True`);
    shapes broadcast as in PyTorch. Arithmetic and result in float32 or wider.
    """
    checks.check_float_tensor("input", input)
    checks.check_float_tensor("target", target)
    checks.check_same_device(input=input, target=target)
    checks.check_choice("reduction", reduction, checks.LOGIT_REDUCTIONS)
    try:
        torch.broadcast_shapes(input.shape, target.shape)
    except RuntimeError:
        raise ValueError(f"input and target must have broadcastable shapes, got {tuple(input.shape)} and "
                         f"{tuple(target.shape)}") from None
    if input.numel() == 0:
        raise ValueError(f"input is empty: shape {tuple(input.shape)}")
    impl = resolve("kl_div", backend, input)
    return impl(input, target, reduction=reduction, log_target=bool(log_target))


def mutual_learning_loss(logits: Sequence[torch.Tensor], target: torch.Tensor | None = None, *,
                         temperature: float | torch.Tensor = 1.0, ce_weight: float = 1.0, kl_weight: float = 1.0,
                         backend: str | None = None) -> torch.Tensor:
    """Deep mutual learning (Zhang et al. 2018) over a cohort of K >= 2 students' logits `(..., C)` each.

    Student k's loss is `ce_weight * CE(z_k, target) + kl_weight * mean_{l != k} T^2 KL(p_l || p_k)`
    with each peer's `p_l` detached; the sum over the cohort is returned, so one backward trains all.
    """
    if isinstance(logits, torch.Tensor) or not isinstance(logits, Sequence):
        raise TypeError(f"logits must be a list or tuple of the students' logit tensors, got "
                        f"{type(logits).__name__}")
    if len(logits) < 2:
        raise ValueError(f"mutual learning needs at least 2 students, got {len(logits)}")
    for k, peer in enumerate(logits[1:], start=1):
        try:
            checks.check_logits(logits[0], peer)
        except (TypeError, ValueError) as err:
            raise type(err)(f"logits[0] and logits[{k}]: {err}") from None
    ce_weight = checks.check_number("ce_weight", ce_weight)
    if target is not None:
        checks.check_target("target", target, logits[0])
    elif ce_weight != 0.0:
        raise ValueError(f"ce_weight={ce_weight} needs target (the hard labels), got target=None")
    kl_scale = checks.check_number("kl_weight", kl_weight) / (len(logits) - 1)
    total = 0.0
    for k, own in enumerate(logits):
        peers = [peer for l, peer in enumerate(logits) if l != k]
        for j, peer in enumerate(peers):
            # The hard-label term rides on the first peer's fused pass.
            with_ce = j == 0 and ce_weight != 0.0
            total = total + kd_loss(own, peer.detach(), temperature, target=target if with_ce else None,
                                    ce_weight=ce_weight if with_ce else 0.0, kd_weight=kl_scale, backend=backend)
    return total


def _check_pair(f_s, f_t, **kwargs):
    checks.check_features("f_s", f_s, "f_t", f_t, **kwargs)


def global_batch(f_s: torch.Tensor, f_t: torch.Tensor, process_group):
    """The relational losses under data parallelism: with a `process_group`, the student's and the teacher's
    features of every rank, concatenated in rank order (ranks may hold different batch sizes), so the relations
    run over the global batch and every rank computes the same loss. The student's features are gathered with
    their gradient: the backward all-reduces it, so each rank gets W times the global loss's gradient of its
    own samples, which DDP's averaging over the W ranks divides back. One DDP step on W ranks is then one
    single-process step on the concatenated batch (with the rest of the loss a mean over each rank's samples,
    as usual under DDP). The teacher's features are gathered without a gradient. Crosses the network: the
    features of every rank (B x D per side), and their gradient in the backward; never more than the batch.
    Without a group: the features unchanged."""
    if process_group is None:
        return f_s, f_t
    from .distributed import gather_rows, check_group
    check_group(process_group)
    # The full checks run on the gathered batch: a rank may hold no sample.
    checks.check_float_tensor("f_s", f_s)
    checks.check_float_tensor("f_t", f_t)
    if f_s.dim() == 0 or f_t.dim() == 0 or f_s.shape[0] != f_t.shape[0]:
        raise ValueError(f"f_s and f_t must hold the same samples (batch first), got shapes {tuple(f_s.shape)} and "
                         f"{tuple(f_t.shape)}")
    return gather_rows(f_s, process_group), gather_rows(f_t.detach(), process_group)


def rkd_distance_loss(f_s: torch.Tensor, f_t: torch.Tensor, *, squared: bool = False, eps: float = 1e-12,
                      process_group=None, backend: str | None = None) -> torch.Tensor:
    """RKD distance loss on features `(B, ...)` flattened to `(B, D)`, B >= 2; D may differ.
    `process_group`: the relations over the global batch of every rank (`global_batch`)."""
    f_s, f_t = global_batch(f_s, f_t, process_group)
    _check_pair(f_s, f_t, min_batch=2)
    eps = checks.check_positive("eps", eps)
    return resolve("rkd_distance_loss", backend, f_s, f_t)(f_s, f_t, squared=bool(squared), eps=eps)


def rkd_angle_loss(f_s: torch.Tensor, f_t: torch.Tensor, *, process_group=None,
                   backend: str | None = None) -> torch.Tensor:
    """RKD angle loss on features `(B, ...)` flattened to `(B, D)`, B >= 2; D may differ.
    `process_group`: the relations over the global batch of every rank (`global_batch`)."""
    f_s, f_t = global_batch(f_s, f_t, process_group)
    _check_pair(f_s, f_t, min_batch=2)
    return resolve("rkd_angle_loss", backend, f_s, f_t)(f_s, f_t)


def rkd_loss(f_s: torch.Tensor, f_t: torch.Tensor, *, distance_weight: float = 25.0, angle_weight: float = 50.0,
             squared: bool = False, eps: float = 1e-12, process_group=None,
             backend: str | None = None) -> torch.Tensor:
    """RKD: `distance_weight * L_distance + angle_weight * L_angle` (RepDistiller's weights 25 and 50).
    `process_group`: the relations over the global batch of every rank (`global_batch`)."""
    f_s, f_t = global_batch(f_s, f_t, process_group)
    _check_pair(f_s, f_t, min_batch=2)
    distance_weight = checks.check_number("distance_weight", distance_weight)
    angle_weight = checks.check_number("angle_weight", angle_weight)
    eps = checks.check_positive("eps", eps)
    return resolve("rkd_loss", backend, f_s, f_t)(
        f_s, f_t, distance_weight=distance_weight, angle_weight=angle_weight, squared=bool(squared), eps=eps)


def _check_power(p):
    return checks.check_positive("p", p)


def attention_map(f: torch.Tensor, p: float = 2, *, backend: str | None = None) -> torch.Tensor:
    """The spatial attention map `normalize(mean_c f^p)`: `(B, C, H, W)` to `(B, H*W)`."""
    checks.check_float_tensor("f", f)
    if f.dim() < 3 or f.numel() == 0:
        raise ValueError(f"f must be a non-empty (batch, channels, *spatial) tensor, got shape {tuple(f.shape)}")
    p = _check_power(p)
    return resolve("attention_map", backend, f)(f, p)


def _check_maps(f_s, f_t):
    _check_pair(f_s, f_t, min_dim=4)
    if f_s.dim() != 4 or f_t.dim() != 4:
        raise ValueError(f"f_s and f_t must be 4-d (batch, channels, height, width), got shapes "
                         f"{tuple(f_s.shape)} and {tuple(f_t.shape)}")


def at_loss(f_s: torch.Tensor, f_t: torch.Tensor, *, p: float = 2, mode: str = "code",
            backend: str | None = None) -> torch.Tensor:
    """Attention transfer between a student and a teacher map `(B, C, H, W)` (channels may differ;
    the larger map is pooled to the smaller). mode "code" (RepDistiller) or "paper" (torchdistill)."""
    _check_maps(f_s, f_t)
    p = _check_power(p)
    checks.check_choice("mode", mode, AT_MODES)
    return resolve("at_loss", backend, f_s, f_t)(f_s, f_t, p=p, mode=mode)


def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor, *, norm: str = "l2", process_group=None,
            backend: str | None = None) -> torch.Tensor:
    """Similarity-preserving KD on features `(B, ...)`; norm "l2" (RepDistiller) or "l1" (torchdistill).
    `process_group`: the similarities over the global batch of every rank (`global_batch`)."""
    f_s, f_t = global_batch(f_s, f_t, process_group)
    _check_pair(f_s, f_t)
    checks.check_choice("norm", norm, SP_NORMS)
    return resolve("sp_loss", backend, f_s, f_t)(f_s, f_t, norm=norm)


def fsp_matrix(bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """The FSP matrix `(B, C_top, C_bottom)` of two maps of one network."""
    checks.check_features("bottom", bottom, "top", top, min_dim=4)
    return reference.fsp_matrix(bottom, top)


def fsp_loss(feats_s: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor], *,
             backend: str | None = None) -> torch.Tensor:
    """FSP over consecutive layers: lists of >= 2 maps `(B, C_i, H_i, W_i)`, channel counts matching per layer."""
    checks.check_feature_lists("feats_s", feats_s, "feats_t", feats_t)
    if len(feats_s) < 2:
        raise ValueError(f"FSP needs at least 2 feature maps per network, got {len(feats_s)}")
    batch = feats_s[0].shape[0] if isinstance(feats_s[0], torch.Tensor) else None
    for i, (s, t) in enumerate(zip(feats_s, feats_t)):
        checks.check_features(f"feats_s[{i}]", s, f"feats_t[{i}]", t, min_dim=4)
        if s.shape[0] != batch:
            raise ValueError(f"every map must have the batch size of feats_s[0] ({batch}), "
                             f"got {s.shape[0]} for feats_s[{i}]")
        if s.shape[1] != t.shape[1]:
            raise ValueError(f"feats_s[{i}] and feats_t[{i}] must have the same number of channels for FSP, "
                             f"got {s.shape[1]} and {t.shape[1]}")
    return resolve("fsp_loss", backend, *feats_s, *feats_t)(feats_s, feats_t)


def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, *, eps: float = 1e-7, process_group=None,
             backend: str | None = None) -> torch.Tensor:
    """Probabilistic knowledge transfer on features `(B, ...)` (RepDistiller's `PKT`).
    `process_group`: the similarities over the global batch of every rank (`global_batch`)."""
    f_s, f_t = global_batch(f_s, f_t, process_group)
    _check_pair(f_s, f_t)
    eps = checks.check_positive("eps", eps)
    return resolve("pkt_loss", backend, f_s, f_t)(f_s, f_t, eps=eps)


def nst_loss(f_s: torch.Tensor, f_t: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Neuron selectivity transfer between maps `(B, C, H, W)` (channels may differ)."""
    _check_maps(f_s, f_t)
    return resolve("nst_loss", backend, f_s, f_t)(f_s, f_t)


def cc_loss(f_s: torch.Tensor, f_t: torch.Tensor, *, process_group=None,
            backend: str | None = None) -> torch.Tensor:
    """Correlation congruence (RepDistiller's `Correlation`) on embeddings `(B, D)` of equal shape, B >= 2.
    `process_group`: the correlations over the global batch of every rank (`global_batch`)."""
    f_s, f_t = global_batch(f_s, f_t, process_group)
    _check_pair(f_s, f_t, min_batch=2, same_shape=True)
    return resolve("cc_loss", backend, f_s, f_t)(f_s, f_t)


def hint_loss(f_s: torch.Tensor, f_t: torch.Tensor, regressor: Callable | None = None, *,
              backend: str | None = None) -> torch.Tensor:
    """FitNets hint: `mse(regressor(f_s), f_t)`; without a regressor the shapes must already match."""
    _check_pair(f_s, f_t, min_dim=1)
    if regressor is not None and not callable(regressor):
        raise TypeError(f"regressor must be a module or callable, got {type(regressor).__name__}")
    return resolve("hint_loss", backend, f_s, f_t)(f_s, f_t, regressor)
