"""Drop-in classes and functions that mirror other libraries' constructors, call shapes and return types.

- `fastkd.compat.repdistiller`: RepDistiller's loss classes (`DistillKL`, `HintLoss`, `Attention`, ...).
- `fastkd.compat.liger`: Liger-Kernel's fused linear + distillation losses (`LigerFusedLinearJSDLoss`,
  `LigerFusedLinearJSD`, `LigerFusedLinearKLDivLoss`), on `fastkd.functional.fused_linear_distill_loss`.
- `fastkd.compat.trl`: TRL's `GKDTrainer.generalized_jsd_loss`, on `fastkd.functional.jsd_loss`.

Each module's docstring says which version it follows and where it differs (always where the original loses
precision, returns NaN or fails).
"""
