"""Which implementation of a loss runs: the table of implementations and the resolution rule.

Every loss has its reference (`fastkd.reference`), the "torch" backend. A kernel backend is a module
(`fastkd.triton`, `fastkd.cuda`) exposing `KERNELS` (its `fastkd.kernel_ops.KernelSet`) and
`unavailable_reason(device) -> str | None`; the losses it runs are those `fastkd.kernel_losses.LOSSES` composes
from its operators. The public functions in `fastkd.functional` only call `resolve`.

Resolution of `backend`:
- None: the `FASTKD_BACKEND` environment variable, else "auto".
- "auto": on a CUDA tensor, the backend `AUTO_PREFERENCE` names for the loss on that GPU generation if
  it can run, else the first of `AUTO_ORDER` that has a kernel for the loss (every operator it needs:
  `kernel_losses.missing_ops`) and can run here (the CUDA extension only once built: "auto" never starts a
  compiler); on any other device, "torch" (the Triton interpreter is for checking kernels, not for speed).
  The rule between Triton and CUDA C++ is what the benchmark suite measured faster per loss and GPU
  generation; until a GPU run has filled `AUTO_PREFERENCE`, Triton comes first.
- a name: that backend, or `BackendUnavailableError` saying why it cannot run.
Inputs in a dtype the kernels do not take (float64) run the reference whatever the backend: decided here, once.
"""
from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import kernel_losses, kernel_ops, reference

BACKENDS = ("torch", "triton", "cuda")
AUTO_ORDER = ("triton", "cuda", "torch")
# (loss, GPU major version) -> backend measured fastest there by bench/; empty: nothing measured yet.
AUTO_PREFERENCE: dict[tuple[str, int], str] = {}
ENV_VAR = "FASTKD_BACKEND"

# The module of each kernel backend: imported on first use, for its `KERNELS` and `unavailable_reason`.
_KERNEL_MODULES = {"triton": "fastkd.triton", "cuda": "fastkd.cuda"}
_KERNEL_NAMES = {"triton": "Triton", "cuda": "CUDA C++"}

_modules: dict[str, object | None] = {}
_import_errors: dict[str, str] = {}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run this loss on this input."""


@dataclass(frozen=True)
class BackendStatus:
    available: bool
    reason: str


def _kernel_module(backend: str):
    """Import a kernel backend once; None when this version or this machine does not have it."""
    if backend not in _modules:
        name = _KERNEL_MODULES[backend]
        try:
            _modules[backend] = importlib.import_module(name)
        except ModuleNotFoundError as err:
            _modules[backend] = None
            if err.name == name:
                _import_errors[backend] = f"this version of fastkd does not ship {_KERNEL_NAMES[backend]} kernels yet"
            else:
                _import_errors[backend] = f"importing {name} failed: {err}"
        except ImportError as err:
            _modules[backend] = None
            _import_errors[backend] = f"importing {name} failed: {err}"
    return _modules[backend]


def _unavailable_reason(backend: str, device: torch.device | None, build: bool = False) -> str | None:
    """Why `backend` cannot run on `device` (None: it can). `build`: the backend was named, so it may
    compile itself first (the CUDA extension just in time); "auto" never waits for a compiler."""
    if backend == "torch":
        return None
    module = _kernel_module(backend)
    if module is None:
        return _import_errors[backend]
    if build and backend == "cuda":
        return module.unavailable_reason(device, build=True)
    return module.unavailable_reason(device)


def available_backends() -> dict[str, BackendStatus]:
    """Each backend's status on this machine: available, or the reason it is not."""
    statuses = {}
    for backend in BACKENDS:
        reason = _unavailable_reason(backend, None)
        if reason is None:
            statuses[backend] = BackendStatus(True, f"available for {_loss_count(backend)} losses")
        else:
            statuses[backend] = BackendStatus(False, reason)
    return statuses


def _loss_count(backend: str) -> int:
    """How many losses `backend` runs: the reference all; Triton launches every declared operator, the CUDA C++
    extension all but `kernel_ops.TRITON_ONLY` (known without loading it)."""
    if backend == "torch":
        return len(reference.IMPLEMENTATIONS)
    absent = set() if backend == "triton" else set(kernel_ops.TRITON_ONLY)
    return sum(not absent & set(kernel_losses.NEEDS.get(loss, ())) for loss in kernel_losses.LOSSES)


def default_backend() -> str:
    """The backend used when none is named: `FASTKD_BACKEND`, else "auto"."""
    return check_backend_name(os.environ.get(ENV_VAR, "auto"), source=ENV_VAR)


def check_backend_name(backend: object, source: str = "backend") -> str:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"{source} must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return backend


def _runs(loss: str, backend: str, device: torch.device) -> bool:
    return (loss in kernel_losses.LOSSES and _unavailable_reason(backend, device) is None
            and not kernel_losses.missing_ops(loss, _kernel_module(backend).KERNELS))


def resolve(loss: str, backend: str | None, *inputs: torch.Tensor) -> Callable:
    """The implementation of `loss` for its floating-point `inputs`: called with the reference's arguments."""
    name = default_backend() if backend is None else check_backend_name(backend)
    device = inputs[0].device
    if name == "auto":
        if device.type != "cuda":
            return reference.IMPLEMENTATIONS[loss]
        preferred = AUTO_PREFERENCE.get((loss, torch.cuda.get_device_capability(device)[0])) if AUTO_PREFERENCE else None
        name = next((b for b in ((preferred,) if preferred else ()) + AUTO_ORDER if b == "torch" or _runs(loss, b, device)))
    elif name != "torch":
        reason = _unavailable_reason(name, device, build=True)
        if reason is not None:
            raise BackendUnavailableError(f"backend {name!r} is not available: {reason}")
        if loss not in kernel_losses.LOSSES:
            raise BackendUnavailableError(
                f"backend {name!r} has no kernel for {loss}; kernel backends run {sorted(kernel_losses.LOSSES)}")
        missing = kernel_losses.missing_ops(loss, _kernel_module(name).KERNELS)
        if missing:
            raise BackendUnavailableError(
                f"backend {name!r} has no kernel for {loss}: it does not have the operator(s) {missing} yet; "
                f"backend='triton' runs it, and 'auto' picks a backend that can")
    if name == "torch" or any(t.dtype not in kernel_losses.KERNEL_DTYPES for t in inputs):
        return reference.IMPLEMENTATIONS[loss]
    return functools.partial(kernel_losses.LOSSES[loss], _kernel_module(name).KERNELS)


def resolve_kernel_set(what: str, ops: tuple[str, ...], backend: str | None, *inputs: torch.Tensor):
    """For a loss that calls the operators `ops` itself (the vocabulary-parallel losses of `fastkd.distributed`,
    named `what` in messages) rather than through `kernel_losses`: the KernelSet that runs them for `inputs` by
    `resolve`'s rule, or None for the reference's arithmetic."""
    name = default_backend() if backend is None else check_backend_name(backend)
    device = inputs[0].device

    def missing(b: str) -> list[str]:
        return [op for op in ops if not hasattr(_kernel_module(b).KERNELS, op)]

    if name == "auto":
        if device.type != "cuda":
            return None
        name = next(b for b in AUTO_ORDER if b == "torch" or (_unavailable_reason(b, device) is None and not missing(b)))
    elif name != "torch":
        reason = _unavailable_reason(name, device, build=True)
        if reason is not None:
            raise BackendUnavailableError(f"backend {name!r} is not available: {reason}")
        if missing(name):
            raise BackendUnavailableError(
                f"backend {name!r} has no kernel for {what}: it does not have the operator(s) {missing(name)} yet; "
                f"backend='torch' runs it, and 'auto' picks a backend that can")
    if name == "torch" or any(t.dtype not in kernel_losses.KERNEL_DTYPES for t in inputs):
        return None
    return _kernel_module(name).KERNELS
