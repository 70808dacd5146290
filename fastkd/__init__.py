"""fastkd: knowledge-distillation losses as fused kernels, each verified against a plain PyTorch reference.

- `fastkd.functional`: the losses as functions (`kd_loss`, `kl_div_loss`, `jsd_loss`, `dkd_loss`,
  `sparse_kd_loss`, `rkd_loss`, ...).
- `fastkd.losses`: the same as `torch.nn.Module`s (`KDLoss`, `KLDivLoss`, `JSDLoss`, `SparseKDLoss`,
  `RKDLoss`, ...).
- `fastkd.compat.repdistiller`: RepDistiller's classes, for a one-line migration.
- `fastkd.reference`: the plain PyTorch definitions every kernel is checked against.
- `fastkd.available_backends()`: which backends run here, and why not the others.
"""
__version__ = "0.1.0"

from . import reference  # registers the "torch" backend
from . import functional, losses
from ._dispatch import BACKENDS, BackendStatus, BackendUnavailableError, available_backends, default_backend

__all__ = ["functional", "losses", "reference", "available_backends", "default_backend", "BackendStatus",
           "BackendUnavailableError", "BACKENDS", "__version__"]
