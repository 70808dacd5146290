"""Reference attention transfer (Zagoruyko & Komodakis 2017) in plain PyTorch.

Code mode is RepDistiller's `Attention(p)` and mdistiller's `at_loss`; paper mode is torchdistill's
`ATLoss(mode='paper')`. Arithmetic in float32 or wider.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .logits import compute_dtype


def match_spatial(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the map with the larger height to the other's `(H, W)`.

    RepDistiller pools to `(H, H)` (it assumes square maps); for square maps the two agree, and for
    non-square maps pooling to `(H, W)` is the one that yields maps of equal size.
    """
    if f_s.shape[2:] == f_t.shape[2:]:
        return f_s, f_t
    if f_s.shape[2] > f_t.shape[2]:
        return F.adaptive_avg_pool2d(f_s, tuple(f_t.shape[2:])), f_t
    return f_s, F.adaptive_avg_pool2d(f_t, tuple(f_s.shape[2:]))


def attention_map(f: torch.Tensor, p: float = 2) -> torch.Tensor:
    """`normalize(mean_c f^p)`: `(B, C, ...)` to `(B, prod(...))`, unit L2 norm per sample (eps 1e-12).

    No `abs()`, as in RepDistiller: for odd p the sign survives.
    """
    a = f.to(compute_dtype(f)).pow(p).mean(1).reshape(f.shape[0], -1)
    return F.normalize(a, dim=1)


def at_loss(f_s: torch.Tensor, f_t: torch.Tensor, *, p: float = 2, mode: str = "code") -> torch.Tensor:
    """Attention transfer between one student map and one teacher map, `(B, C, H, W)` each.

    mode "code": `mean((at(f_s) - at(f_t))^2)` over batch and positions (RepDistiller, mdistiller).
    mode "paper": `sum_b ||at(f_s)_b - at(f_t)_b||_2 / B` with `at(f) = normalize(sum_c f^p)`
    (torchdistill); the sum and the mean over channels give the same normalised map.
    Channel counts may differ; differing spatial sizes are pooled to the smaller (see `match_spatial`).
    """
    f_s, f_t = match_spatial(f_s, f_t)
    diff = attention_map(f_s, p) - attention_map(f_t, p)
    if mode == "code":
        return diff.pow(2).mean()
    return torch.linalg.vector_norm(diff, dim=1).sum() / f_s.shape[0]
