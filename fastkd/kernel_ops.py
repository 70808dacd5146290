"""Every kernel operator, declared once: its name, schema, fake, per-row statistics and autograd.

A kernel backend is one launcher per operator declared here, under the same name: Triton's in
`fastkd/triton/` (`kl.kl_rows`, `rkd.rkd_sq_distances`, ...), CUDA C++'s in csrc/ (`fastkd::kl_rows` in kl.cu,
...). `register` turns a backend's launchers into its `KernelSet`, and from each declaration come, for every
backend alike:
- the operator `<library>::<backend>_<name>` with the declared schema. Triton's is defined here
  (`torch.library.custom_op`); CUDA C++'s by csrc/ops.cpp, whose schema strings tests/test_kernel_ops.py
  checks against these (with the C++ statistics widths `k<Name>Stats`);
- its fake (shape-only) implementation, for torch.compile and `torch.library.opcheck`;
- its autograd, where the declaration pairs it with a backward operator (the RKD operators have none of
  their own: `fastkd.rkd_autograd` composes them);
- `stats`: the width of the float32 per-row statistics the forward saves for its backward.

One door, eager and compiled alike: the registered operator. An `autograd.Function` around the launchers
would skip the dispatcher, but it saves nothing measurable: `python -m bench.op_overhead` (host overhead of
one forward + backward call on the CPU, one thread, best of 7 x 2000 calls; a 2-core Xeon, 2026-11-30) gave
154 us for the registered op against 172 us for the Function under torch 2.14.1, and 160 us against 140 us
under torch 2.11.0: within 20 us either way, next to the loss's own PyTorch ops around the kernel and
nothing beside a training step. One door also means the eager path is the one torch.compile and opcheck test.
"""
from __future__ import annotations

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
    stats: int = 0  # width of the per-row float32 statistics output, if any
    backward: str | None = None  # the operator computing the gradient, if the op has autograd
    setup_context: Callable | None = None  # (ctx, inputs, output), as torch.library.register_autograd takes
    gradient: Callable | None = None  # (ctx, *grads, backward=<the backward operator>) -> input gradients


def _rows(x: Tensor) -> int:
    return x.numel() // x.shape[-1]


def _per_row(x: Tensor, width: int = 0) -> Tensor:
    return x.new_empty((_rows(x), width) if width else (_rows(x),), dtype=torch.float32)


def _input_gradients(student, teacher, student_grad, teacher_grad):
    # A gradient not asked for is an empty tensor (a schema's output cannot be None).
    return (student.new_empty(student.shape if student_grad else (0,)),
            teacher.new_empty(teacher.shape if teacher_grad else (0,)))


def _wanted(ctx, d_student, d_teacher, n_options):
    return (d_student if ctx.needs_input_grad[0] else None, d_teacher if ctx.needs_input_grad[1] else None,
            *[None] * n_options)


# --- KL (both directions) and KD's cross-entropy, per row ----------------------------------------------------

KL_STATS = 7  # per row: M_x, Z_x, M_y, Z_y, Ebar = sum p (a - b), M_s, Z_s (fastkd/triton/kl.py)


def _kl_rows_setup(ctx, inputs, output):
    student, teacher, temperature, reverse, target, labels, ignore_index = inputs
    ctx.save_for_backward(student, teacher, output[2], target, labels)
    ctx.options = (temperature, reverse, ignore_index)
    ctx.mark_non_differentiable(output[2])


def _kl_rows_gradient(ctx, grad_kl, grad_ce, _grad_stats, *, backward):
    student, teacher, stats, target, labels = ctx.saved_tensors
    temperature, reverse, ignore_index = ctx.options
    d_student, d_teacher = backward(grad_kl, grad_ce if target is not None else None, student, teacher, stats,
                                    temperature, reverse, target, labels, ignore_index, *ctx.needs_input_grad[:2])
    return _wanted(ctx, d_student, d_teacher, 5)


kl_rows = KernelOp(
    "kl_rows",
    "(Tensor student, Tensor teacher, float temperature, bool reverse, Tensor? target, Tensor? labels, "
    "int ignore_index) -> (Tensor, Tensor, Tensor)",
    lambda student, teacher, temperature, reverse, target, labels, ignore_index: (
        _per_row(student), student.new_empty((_rows(student) if target is not None else 0,), dtype=torch.float32),
        _per_row(student, KL_STATS)),
    stats=KL_STATS, backward="kl_rows_backward", setup_context=_kl_rows_setup, gradient=_kl_rows_gradient)

kl_rows_backward = KernelOp(
    "kl_rows_backward",
    "(Tensor grad_kl, Tensor? grad_ce, Tensor student, Tensor teacher, Tensor stats, float temperature, "
    "bool reverse, Tensor? target, Tensor? labels, int ignore_index, bool student_grad, bool teacher_grad) "
    "-> (Tensor, Tensor)",
    lambda grad_kl, grad_ce, student, teacher, stats, temperature, reverse, target, labels, ignore_index,
    student_grad, teacher_grad: _input_gradients(student, teacher, student_grad, teacher_grad))


# --- generalized JSD, 0 < beta < 1 (0 and 1 are KL), per row ------------------------------------------------

JSD_STATS = 7  # per row: M_x, Z_x, M_y, Z_y, L = log(Z_y / Z_x), KL(p || m), KL(q || m) (fastkd/triton/jsd.py)


def _jsd_rows_setup(ctx, inputs, output):
    student, teacher, beta, temperature, labels, ignore_index = inputs
    ctx.save_for_backward(student, teacher, output[1], labels)
    ctx.options = (beta, temperature, ignore_index)
    ctx.mark_non_differentiable(output[1])


def _jsd_rows_gradient(ctx, grad_loss, _grad_stats, *, backward):
    student, teacher, stats, labels = ctx.saved_tensors
    beta, temperature, ignore_index = ctx.options
    d_student, d_teacher = backward(grad_loss, student, teacher, stats, beta, temperature, labels, ignore_index,
                                    *ctx.needs_input_grad[:2])
    return _wanted(ctx, d_student, d_teacher, 4)


jsd_rows = KernelOp(
    "jsd_rows",
    "(Tensor student, Tensor teacher, float beta, float temperature, Tensor? labels, int ignore_index) "
    "-> (Tensor, Tensor)",
    lambda student, teacher, beta, temperature, labels, ignore_index: (
        _per_row(student), _per_row(student, JSD_STATS)),
    stats=JSD_STATS, backward="jsd_rows_backward", setup_context=_jsd_rows_setup, gradient=_jsd_rows_gradient)

jsd_rows_backward = KernelOp(
    "jsd_rows_backward",
    "(Tensor grad_loss, Tensor student, Tensor teacher, Tensor stats, float beta, float temperature, "
    "Tensor? labels, int ignore_index, bool student_grad, bool teacher_grad) -> (Tensor, Tensor)",
    lambda grad_loss, student, teacher, stats, beta, temperature, labels, ignore_index, student_grad,
    teacher_grad: _input_gradients(student, teacher, student_grad, teacher_grad))


# --- DKD's two parts, per row ---------------------------------------------------------------------------------

DKD_STATS = 8  # per row: M_x, Z_x, M_y, Z_y, u_s, u_t, TCKD, Ebar (NCKD's) (fastkd/triton/dkd.py)


def _dkd_rows_setup(ctx, inputs, output):
    student, teacher, target, temperature = inputs
    ctx.save_for_backward(student, teacher, output[2], target)
    ctx.options = (temperature,)
    ctx.mark_non_differentiable(output[2])


def _dkd_rows_gradient(ctx, grad_tckd, grad_nckd, _grad_stats, *, backward):
    student, teacher, stats, target = ctx.saved_tensors
    (temperature,) = ctx.options
    # An output left out of the loss (NCKD with one class) may come back as None.
    if grad_tckd is None:
        grad_tckd = torch.zeros_like(stats[:, 0])
    if grad_nckd is None:
        grad_nckd = torch.zeros_like(stats[:, 0])
    d_student, d_teacher = backward(grad_tckd, grad_nckd, student, teacher, stats, target, temperature,
                                    *ctx.needs_input_grad[:2])
    return _wanted(ctx, d_student, d_teacher, 2)


dkd_rows = KernelOp(
    "dkd_rows",
    "(Tensor student, Tensor teacher, Tensor target, float temperature) -> (Tensor, Tensor, Tensor)",
    lambda student, teacher, target, temperature: (
        _per_row(student), _per_row(student), _per_row(student, DKD_STATS)),
    stats=DKD_STATS, backward="dkd_rows_backward", setup_context=_dkd_rows_setup, gradient=_dkd_rows_gradient)

dkd_rows_backward = KernelOp(
    "dkd_rows_backward",
    "(Tensor grad_tckd, Tensor grad_nckd, Tensor student, Tensor teacher, Tensor stats, Tensor target, "
    "float temperature, bool student_grad, bool teacher_grad) -> (Tensor, Tensor)",
    lambda grad_tckd, grad_nckd, student, teacher, stats, target, temperature, student_grad, teacher_grad:
    _input_gradients(student, teacher, student_grad, teacher_grad))


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
    kl_rows, kl_rows_backward, jsd_rows, jsd_rows_backward, dkd_rows, dkd_rows_backward,
    rkd_sq_distances, rkd_weighted_diff, rkd_angle_sum, rkd_angle_weights,
    at_channel_mean_pow, at_channel_mean_pow_backward)}


class KernelSet:
    """A backend's registered operators, one attribute per declared op (`kernels.kl_rows(...)`), each with its
    autograd; `fastkd.kernel_losses` composes the losses from them."""

    def __init__(self, backend: str, ops: dict[str, Callable]):
        self.backend = backend
        self.__dict__.update(ops)

    def __repr__(self) -> str:
        return f"KernelSet({self.backend!r})"


def register(backend: str, launchers: dict[str, Callable] | None = None, library: str = "fastkd",
             names: tuple[str, ...] | None = None) -> KernelSet:
    """The `KernelSet` of `backend`: its operators `<library>::<backend>_<name>` with fakes and autograd.

    `launchers`: the Python launcher of every declared op by name, defined here as operators with the declared
    schemas (Triton); None: the operators are defined already with those schemas (by a C++ extension).
    `names`: only these ops (a partial build of the CPU stand-in); default all.
    """
    names = tuple(OPS) if names is None else names
    if launchers is not None and set(launchers) != set(names):
        raise ValueError(f"backend {backend!r} must launch every declared op: missing "
                         f"{sorted(set(names) - set(launchers))}, undeclared {sorted(set(launchers) - set(names))}")
    namespace = getattr(torch.ops, library)
    for name in names:
        qualname = f"{library}::{backend}_{name}"
        if launchers is not None:
            torch.library.custom_op(qualname, launchers[name], mutates_args=(), schema=OPS[name].schema)
        torch.library.register_fake(qualname, OPS[name].fake)
    ops = {name: getattr(namespace, f"{backend}_{name}").default for name in names}
    for name in names:
        op = OPS[name]
        if op.backward is not None:
            torch.library.register_autograd(f"{library}::{backend}_{name}",
                                            partial(op.gradient, backward=ops[op.backward]),
                                            setup_context=op.setup_context)
    return KernelSet(backend, ops)
