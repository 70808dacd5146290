"""The CUDA C++ backend: the fused kernels of csrc/, loaded as the `fastkd::cuda_<name>` operators.

`KERNELS`, once loaded, is its `fastkd.kernel_ops.KernelSet`: the operators csrc/ops.cpp defines, one per op
declared in `fastkd.kernel_ops` (same schema), with that declaration's fake and autograd.

Where the extension comes from, first found first used:
1. `fastkd._C`, built ahead of time by `FASTKD_BUILD_CUDA=1 pip install -e .`;
2. a just-in-time build (`fastkd.cuda.build`), done on the first call that names `backend="cuda"`:
   it says that it is compiling, caches the library (torch's extension cache), and a failure raises
   `BackendUnavailableError` carrying the compiler's message.
`backend="auto"` never compiles: it uses these kernels only once they are loaded (see `fastkd._dispatch`).
"""
from __future__ import annotations

import importlib
import sys

import torch

from .. import kernel_ops

_loaded = False
_load_error: str | None = None


def _load(build: bool) -> str | None:
    """Load the operators (building them if `build` and no prebuilt library exists); None on success."""
    global _loaded, _load_error
    if _loaded:
        return None
    if _load_error is not None:
        return _load_error
    try:
        importlib.import_module("fastkd._C")
    except ImportError:
        from . import build as builder
        try:
            # A library that `python -m fastkd build-cuda` or an earlier backend="cuda" call left in torch's
            # extension cache: load it without a compiler before calling the extension "not built".
            cached = builder.load_cached()
        except OSError as err:
            _load_error = f"loading the cached CUDA extension failed: {err}"
            return _load_error
        if cached is None:
            if not build:
                return ("the CUDA extension is not built: name backend='cuda' once to compile it just in time, run "
                        "`python -m fastkd build-cuda`, or install with FASTKD_BUILD_CUDA=1")
            print("fastkd: compiling the CUDA extension for this GPU (once; cached afterwards)...", file=sys.stderr)
            try:
                builder.build()
            except Exception as err:  # the compiler's output is in the message
                _load_error = f"building the CUDA extension failed: {err}"
                return _load_error
    register()
    return None


def register() -> None:
    """Make the loaded extension's operators the backend's `KERNELS`, with the declared fakes and autograd."""
    global KERNELS, _loaded
    KERNELS = kernel_ops.register("cuda")
    _loaded = True


def unavailable_reason(device: torch.device | None, build: bool = False) -> str | None:
    """None if the CUDA kernels can run on tensors on `device` (None: on this machine)."""
    if torch.version.cuda is None:
        return "this PyTorch is a CPU-only build"
    if device is None:
        return None if torch.cuda.is_available() else "no CUDA device"
    if device.type != "cuda":
        return f"the CUDA C++ kernels run on CUDA tensors, not {device.type} tensors"
    return _load(build)
