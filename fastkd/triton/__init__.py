"""The Triton backend: fused kernels for the KD family (KD, KL both ways, JSD, DKD, sparse-teacher KD), RKD and
attention maps.

`KERNELS` is its `fastkd.kernel_ops.KernelSet`: the operators `fastkd::triton_<name>`, one per declared op,
each the launcher of the same name in this package (`kl.kl_rows`, `rkd.rkd_sq_distances`, ...). The public
functions reach them through `backend="triton"` or `"auto"` on CUDA tensors (`fastkd._dispatch`). Kernels run on CUDA tensors,
and on CPU tensors when `TRITON_INTERPRET=1` was set before this module was first imported: Triton's
interpreter, which is how the tests check the kernels without a GPU (slow; never picked by "auto").
"""
from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

try:
    import triton  # noqa: F401
except ImportError as err:  # the package imports and works without Triton
    _import_error = f"the triton package is not installed ({err})"
else:
    _import_error = None
    from .. import kernel_ops
    from . import attention, dkd, jsd, kl, rkd, rows, sparse, vocab_parallel

    KERNELS = kernel_ops.register("triton", {launcher.__name__: launcher for launcher in (
        kl.kl_rows, jsd.jsd_rows, dkd.dkd_rows, sparse.sparse_kd_rows, rows.scale_rows_,
        vocab_parallel.vocab_row_stats, vocab_parallel.vocab_row_terms, vocab_parallel.vocab_row_grad,
        rkd.rkd_sq_distances, rkd.rkd_weighted_diff, rkd.rkd_angle_sum, rkd.rkd_angle_weights,
        attention.at_channel_mean_pow, attention.at_channel_mean_pow_backward)})


def _interpreter_index_fix() -> None:
    """Backport Triton 3.7's fix of the interpreter's `tensor.__index__` (triton-lang/triton#9172) to Triton < 3.7.

    The interpreter holds a scalar, such as a kernel's int argument, as a one-element 1-D NumPy array, and
    Triton <= 3.6 turns it into a Python int with `int(array)`, which NumPy >= 2.4 refuses ("only 0-dimensional
    arrays can be converted to Python scalars"). Every `range(0, V, BLOCK)` over a runtime bound needs that
    int. Only the interpreter is touched: compiled GPU kernels are unchanged.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_fastkd_index_fix", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._fastkd_index_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if INTERPRET and _import_error is None and tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7):
    _interpreter_index_fix()


def unavailable_reason(device: torch.device | None) -> str | None:
    """None if the kernels can run on tensors on `device` (None: on some device of this machine)."""
    if _import_error is not None:
        return _import_error
    if device is None:
        if INTERPRET or torch.cuda.is_available():
            return None
        return "no CUDA device, and TRITON_INTERPRET=1 was not set before fastkd.triton was imported"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if INTERPRET:
            return None
        return ("Triton kernels run on CUDA tensors; to run them on CPU tensors in Triton's interpreter, set "
                "TRITON_INTERPRET=1 before importing fastkd")
    return f"Triton kernels do not run on {device.type} tensors"
