"""The Triton backend: fused kernels for the KD family (KD, KL both ways, JSD, DKD), RKD and attention maps.

Importing this module registers its kernels with fastkd's dispatch (`fastkd._dispatch`); the public
functions find them through `backend="triton"` or `"auto"` on CUDA tensors. Kernels run on CUDA tensors,
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
    from . import losses  # noqa: F401  (registers the kernels)


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
