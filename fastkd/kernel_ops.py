"""Every kernel operator, declared once: its name, schema, fake, what it mutates, and its autograd if any.

A kernel backend is one launcher per operator declared here, under the same name: Triton's in
`fastkd/triton/` (`kl.kl_rows`, `rkd.rkd_sq_distances`, ...), CUDA C++'s in csrc/ (`fastkd::kl_rows` in kl.cu,
...). `register` turns a backend's launchers into its `KernelSet`, and from each declaration come, for every
backend alike:
- the operator `<library>::<backend>_<name>` with the declared schema. Triton's is defined here
  (`torch.library.custom_op`, with the declared `mutates_args`); CUDA C++'s by csrc/ops.cpp, whose schema
  strings tests/test_kernel_ops.py checks against these;
- its fake (shape-only) implementation, for torch.compile and `torch.library.opcheck` (None for an op that
  only mutates);
- its autograd, where the declaration pairs it with a backward operator (attention maps). The logit row
  operators (`kl_rows`, `jsd_rows`, `dkd_rows`, `sparse_kd_rows`) have none: they write the weighted gradient
  in the forward pass, their outputs are not differentiable, and the autograd is `fastkd.kernel_losses`' one
  Function, whose backward scales the stored gradient with `scale_rows_`; the RKD operators have none either
  (`fastkd.rkd_autograd` composes them).

One door, eager and compiled alike: the registered operator. An `autograd.Function` around the launchers
would skip the dispatcher, but it saves nothing measurable: `python -m bench.op_overhead` (host overhead of
one forward + backward call on the CPU, one thread, best of 7 x 2000 calls; a 2-core Xeon, 2026-11-30) gave
154 us for the registered op against 172 us for the Function under torch 2.14.1, and 160 us against 140 us
under torch 2.11.0: within 20 us either way, next to the loss's own PyTorch ops around the kernel and
nothing beside a training step. One door also means the eager path is the one torch.compile and opcheck test.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import Tensor


@dataclass(frozen=True)
class KernelOp:
    name: str
    schema: str  # "(arguments) -> outputs" in torch.library's schema language
    fake: Callable  # the launcher's signature; returns empty tensors of the outputs' shapes and dtypes
    mutates: tuple[str, ...] = ()  # the arguments it writes in place (marked `(a!)` in the schema)
    backward: str | None = None  # the operator computing the gradient, if the op has autograd
    setup_context: Callable | None = None  # (ctx, inputs, output), as torch.library.register_autograd takes
    gradient: Callable | None = None  # (ctx, *grads, backward=<the backward operator>) -> input gradients


def _rows(x: Tensor) -> int:
    return x.numel() // x.shape[-1]


def _per_row(x: Tensor) -> Tensor:
    return x.new_empty((_rows(x),), dtype=torch.float32)


def _temperature_gradient(x: Tensor, wanted: bool) -> Tensor:
    return x.new_empty((_rows(x) if wanted else 0,), dtype=torch.float32)


def _input_gradients(student, teacher, student_grad, teacher_grad):
    # A gradient not asked for is an empty tensor (a schema's output cannot be None); one asked for is
    # contiguous, in its input's shape and dtype.
    return (student.new_empty(student.shape if student_grad else (0,)),
            teacher.new_empty(teacher.shape if teacher_grad else (0,)))


# --- The logit row losses: per-row terms, and the gradient made in the same pass ------------------------------
#
# Each takes per-row weights (float32 `(rows,)`, any stride: often an expanded 0-stride view of one number;
# None reads as 1) and three flags: `student_grad` / `teacher_grad` ask for `sum_r weight_r d term_r / d input`,
# written in the forward pass (the input's dtype and shape, contiguous), else an empty `(0,)` tensor; without
# either flag nothing N x V is written. The outputs are not differentiable: `fastkd.kernel_losses` holds the
# autograd, and its backward scales the buffers by grad_output with `scale_rows_`.
#
# The temperature is the float `temperature`, or, when `temperature_rows` is given (float32 `(rows,)`, any
# stride), row r's own `temperature_rows[r]` (the float is then ignored): a learnable or per-token temperature,
# read on the device. A row whose temperature is not > 0 (or NaN) gets NaN terms and NaN gradients.
# `temperature_grad` (only with `temperature_rows`) asks for the float32 `(rows,)` output
#     d_T[r] = d/dT_r (weighted terms of row r), the weights held constant, the CE term excluded (no T in it),
# made in the gradient pass (one extra row sum): each term is a function of `X / T` and `Y / T` that does not
# change when a constant is added to a row, so with `GX`, `GY` the weighted gradients with respect to the raw
# logits (CE excluded) and `a = X / T - max(X / T)`, `b` likewise,
#     d_T[r] = -(1/T) sum_j (GX_j X_j + GY_j Y_j) = -sum_j (GX_j a_j + GY_j b_j),
# a term whose gradient is exactly 0 counting 0 (also where a or b is -inf). Both sides' gradients enter,
# whichever are written. An ignored token (labels) gets 0. Without the flag the output is an empty `(0,)`.
# (A weight that itself depends on T, the T^2 of KD and DKD, is differentiated by the caller.)

# KL (both directions) and KD's cross-entropy (fastkd/triton/kl.py): (KL, CE (empty without target), d_s, d_t, d_T).
kl_rows = KernelOp(
    "kl_rows",
    "(Tensor student, Tensor teacher, float temperature, Tensor? temperature_rows, bool reverse, Tensor? target, "
    "Tensor? labels, int ignore_index, Tensor? kl_weight, Tensor? ce_weight, bool student_grad, bool teacher_grad, "
    "bool temperature_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    lambda student, teacher, temperature, temperature_rows, reverse, target, labels, ignore_index, kl_weight,
    ce_weight, student_grad, teacher_grad, temperature_grad: (
        _per_row(student), student.new_empty((_rows(student) if target is not None else 0,), dtype=torch.float32),
        *_input_gradients(student, teacher, student_grad, teacher_grad),
        _temperature_gradient(student, temperature_grad)))

# Generalized JSD, 0 < beta < 1 (0 and 1 are KL) (fastkd/triton/jsd.py): (JSD, d_s, d_t, d_T).
jsd_rows = KernelOp(
    "jsd_rows",
    "(Tensor student, Tensor teacher, float beta, float temperature, Tensor? temperature_rows, Tensor? labels, "
    "int ignore_index, Tensor? weight, bool student_grad, bool teacher_grad, bool temperature_grad) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    lambda student, teacher, beta, temperature, temperature_rows, labels, ignore_index, weight, student_grad,
    teacher_grad, temperature_grad: (
        _per_row(student), *_input_gradients(student, teacher, student_grad, teacher_grad),
        _temperature_gradient(student, temperature_grad)))

# DKD's two parts (fastkd/triton/dkd.py): (TCKD, NCKD, d_s, d_t, d_T).
dkd_rows = KernelOp(
    "dkd_rows",
    "(Tensor student, Tensor teacher, Tensor target, float temperature, Tensor? temperature_rows, "
    "Tensor? tckd_weight, Tensor? nckd_weight, bool student_grad, bool teacher_grad, bool temperature_grad) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    lambda student, teacher, target, temperature, temperature_rows, tckd_weight, nckd_weight, student_grad,
    teacher_grad, temperature_grad: (
        _per_row(student), _per_row(student), *_input_gradients(student, teacher, student_grad, teacher_grad),
        _temperature_gradient(student, temperature_grad)))

# Sparse-teacher KD (fastkd/triton/sparse.py; the loss is fastkd/reference/sparse.py's): the student's logits
# `(..., V)` against k teacher slots per row, `teacher_indices` `(..., k)` (any integer dtype) and
# `teacher_logprobs` `(..., k)` (-inf: an unused slot, its id never read), `tail` one of "renormalize", "bucket",
# "none", `temperature` a positive float. Returns (per-row loss, d_student): the loss float32 `(rows,)`, NaN in a
# row with a used id outside [0, V) (never read: the gather is masked), 0 at an ignored token; d_student, with
# `student_grad`, `weight_r d loss_r / d student` in the student's dtype and shape (contiguous), else an empty
# `(0,)` tensor; weights and labels as the row losses above. The teacher gets no gradient here (the loss composes
# the reference when the log-probabilities need one).
sparse_kd_rows = KernelOp(
    "sparse_kd_rows",
    "(Tensor student, Tensor teacher_indices, Tensor teacher_logprobs, str tail, float temperature, Tensor? labels, "
    "int ignore_index, Tensor? weight, bool student_grad) -> (Tensor, Tensor)",
    lambda student, teacher_indices, teacher_logprobs, tail, temperature, labels, ignore_index, weight,
    student_grad: (_per_row(student), student.new_empty(student.shape if student_grad else (0,))))

# The backward of the row losses (fastkd/triton/rows.py): row r of the contiguous `(..., V)` gradient `d` times
# `scale[r]` (float32 `(rows,)`, any stride), in place; a row whose scale is exactly 1.0 is neither read nor
# written (decided on the device). A plain multiply otherwise: 0 times an infinite entry is NaN, as autograd.
scale_rows_ = KernelOp(
    "scale_rows_", "(Tensor(a!) d, Tensor scale) -> ()", lambda d, scale: None, mutates=("d",))


# --- Vocabulary-parallel divergences: per-slice kernels between collectives (fastkd/triton/vocab_parallel.py) -----
#
# `student`, `teacher`: this rank's slices `(..., V_local)` of the logits (any row strides, fp32/bf16/fp16),
# `inv_temperature` the float 1/T; per-row pairs `(rows, 2)` float32, column 0 the student, 1 the teacher.
# `vocab_row_stats` -> (maxima, sums): the slice's `m = max x`, `z = sum exp(x - m)` of `x = logits / T`.
# `vocab_row_terms` -> (partial (rows, 2), d_student): the slice's partial divergence sums from the global
# `shift` (the max over ranks, 0 where not finite) and `log_total` (log of the combined sum), `kind` "forward",
# "reverse" or "jsd" (0 < beta < 1); with `student_grad` (forward only) `weight_r (q - p) / T` in the student's
# dtype and shape, else an empty `(0,)` tensor. `vocab_row_grad` -> d_student for "reverse" / "jsd" from the
# global row KL (`row_kl (rows,)`). Weights float32 `(rows,)`, any stride, None reads as 1. Triton
# (fastkd/triton/vocab_parallel.py) and CUDA C++ (csrc/vocab_parallel.cu).

vocab_row_stats = KernelOp(
    "vocab_row_stats", "(Tensor student, Tensor teacher, float inv_temperature) -> (Tensor, Tensor)",
    lambda student, teacher, inv_temperature: (
        student.new_empty((math.prod(student.shape[:-1]), 2), dtype=torch.float32),
        student.new_empty((math.prod(student.shape[:-1]), 2), dtype=torch.float32)))

vocab_row_terms = KernelOp(
    "vocab_row_terms",
    "(Tensor student, Tensor teacher, float inv_temperature, Tensor shift, Tensor log_total, str kind, float beta, "
    "Tensor? weight, bool student_grad) -> (Tensor, Tensor)",
    lambda student, teacher, inv_temperature, shift, log_total, kind, beta, weight, student_grad: (
        student.new_empty((math.prod(student.shape[:-1]), 2), dtype=torch.float32),
        student.new_empty(student.shape if student_grad else (0,))))

vocab_row_grad = KernelOp(
    "vocab_row_grad",
    "(Tensor student, Tensor teacher, float inv_temperature, Tensor shift, Tensor log_total, str kind, float beta, "
    "Tensor row_kl, Tensor? weight) -> Tensor",
    lambda student, teacher, inv_temperature, shift, log_total, kind, beta, row_kl, weight:
    student.new_empty(student.shape))


# --- RKD (fastkd/triton/rkd.py; the autograd is fastkd.rkd_autograd's) ----------------------------------------

rkd_sq_distances = KernelOp(  # (B, D) float32 rows -> Q_ij = |x_i - x_j|^2, (B, B), computed directly
    "rkd_sq_distances", "(Tensor x) -> Tensor",
    lambda x: x.new_empty((x.shape[0], x.shape[0]), dtype=torch.float32))

rkd_weighted_diff = KernelOp(  # out_m = sum_k w_mk (x_m - x_k) for a symmetric w
    "rkd_weighted_diff", "(Tensor w, Tensor x) -> Tensor",
    lambda w, x: torch.empty_like(x, dtype=torch.float32))

rkd_angle_sum = KernelOp(  # sum over (i, j != k) of Huber(A^s_ijk - A^t_ijk), from float32 pairs qh + ql of Q
    "rkd_angle_sum",
    "(Tensor qh_s, Tensor ql_s, Tensor qh_t, Tensor ql_t, bool unit_s, bool unit_t) -> Tensor",
    lambda qh_s, ql_s, qh_t, ql_t, unit_s, unit_t: qh_s.new_empty(()))

rkd_angle_weights = KernelOp(  # W with d(angle sum)/dx_s = weighted_diff(W, x_s)
    "rkd_angle_weights", "(Tensor qh_s, Tensor ql_s, Tensor qh_t, Tensor ql_t, bool unit_t) -> Tensor",
    lambda qh_s, ql_s, qh_t, ql_t, unit_t: torch.empty_like(qh_s))


# --- attention maps: mean over channels of f^p (fastkd/triton/attention.py) -----------------------------------

def _at_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.p = inputs[1]


def _at_gradient(ctx, grad, *, backward):
    (f,) = ctx.saved_tensors
    return (backward(grad, f, ctx.p) if ctx.needs_input_grad[0] else None), None


at_channel_mean_pow = KernelOp(
    "at_channel_mean_pow", "(Tensor f, float p) -> Tensor",
    lambda f, p: f.new_empty((f.shape[0], f.shape[2] * f.shape[3]), dtype=torch.float32),
    backward="at_channel_mean_pow_backward", setup_context=_at_setup, gradient=_at_gradient)

at_channel_mean_pow_backward = KernelOp(
    "at_channel_mean_pow_backward", "(Tensor grad, Tensor f, float p) -> Tensor",
    lambda grad, f, p: torch.empty_like(f))


OPS: dict[str, KernelOp] = {op.name: op for op in (
    kl_rows, jsd_rows, dkd_rows, sparse_kd_rows, scale_rows_, vocab_row_stats, vocab_row_terms, vocab_row_grad,
    rkd_sq_distances, rkd_weighted_diff, rkd_angle_sum, rkd_angle_weights,
    at_channel_mean_pow, at_channel_mean_pow_backward)}


# Declared ops that only the Triton backend launches so far: csrc/ops.cpp does not define them (another engineer
# writes the CUDA C++ side later; tests/test_kernel_ops.py checks that csrc/ defines exactly the others). An
# extension's `register` leaves them out of its KernelSet, and a loss built on one of them does not run on that
# backend (`fastkd.kernel_losses.missing_ops`): `backend="cuda"` says so, "auto" picks Triton or the reference.
# None today (`sparse_kd_rows` was one until csrc/sparse.cu, the vocabulary-parallel slice ops until
# csrc/vocab_parallel.cu).
TRITON_ONLY: tuple[str, ...] = ()


class KernelSet:
    """A backend's registered operators, one attribute per declared op (`kernels.kl_rows(...)`), each with its
    autograd if declared; `fastkd.kernel_losses` composes the losses from them."""

    def __init__(self, backend: str, ops: dict[str, Callable]):
        self.backend = backend
        self.__dict__.update(ops)

    def __repr__(self) -> str:
        return f"KernelSet({self.backend!r})"


def register(backend: str, launchers: dict[str, Callable] | None = None, library: str = "fastkd",
             names: tuple[str, ...] | None = None) -> KernelSet:
    """The `KernelSet` of `backend`: its operators `<library>::<backend>_<name>` with fakes, and autograd where
    declared.

    `launchers`: the Python launcher of every declared op by name, defined here as operators with the declared
    schemas (Triton); None: the operators are defined already with those schemas (by a C++ extension).
    `names`: only these ops (a partial build of the CPU stand-in); default all, or for an extension all that
    csrc/ defines (every declared op but `TRITON_ONLY`).
    """
    if names is None:
        names = tuple(OPS) if launchers is not None else tuple(name for name in OPS if name not in TRITON_ONLY)
    if launchers is not None and set(launchers) != set(names):
        raise ValueError(f"backend {backend!r} must launch every declared op: missing "
                         f"{sorted(set(names) - set(launchers))}, undeclared {sorted(set(launchers) - set(names))}")
    namespace = getattr(torch.ops, library)
    for name in names:
        qualname = f"{library}::{backend}_{name}"
        if launchers is not None:
            torch.library.custom_op(qualname, launchers[name], mutates_args=OPS[name].mutates, schema=OPS[name].schema)
        torch.library.register_fake(qualname, OPS[name].fake)
    ops = {name: getattr(namespace, f"{backend}_{name}").default for name in names}
    for name in names:
        op = OPS[name]
        if op.backward is not None:
            torch.library.register_autograd(f"{library}::{backend}_{name}",
                                            partial(op.gradient, backward=ops[op.backward]),
                                            setup_context=op.setup_context)
    return KernelSet(backend, ops)
