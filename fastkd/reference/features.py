"""Reference feature-based KD losses in plain PyTorch: FitNets hint, SP, FSP, PKT, NST, CC.

Each matches RepDistiller's formula (named in its docstring); arithmetic in float32 or wider.
Gram products replace RepDistiller's broadcasts where those build large tensors (NST), which changes
only the rounding.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .attention import match_spatial
from .logits import compute_dtype
from .relational import flat_features


def hint_loss(f_s: torch.Tensor, f_t: torch.Tensor, regressor: Callable | None = None) -> torch.Tensor:
    """FitNets (Romero et al. 2015): `mse(regressor(f_s), f_t)`; RepDistiller's `HintLoss` after `ConvReg`."""
    if regressor is not None:
        f_s = regressor(f_s)
    if f_s.shape != f_t.shape:
        raise ValueError(f"the (regressed) student features must have the teacher's shape "
                         f"{tuple(f_t.shape)}, got {tuple(f_s.shape)}")
    dtype = torch.promote_types(compute_dtype(f_s), f_t.dtype)
    return F.mse_loss(f_s.to(dtype), f_t.to(dtype))


def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor, *, norm: str = "l2") -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori 2019): `sum((G_t - G_s)^2) / B^2`, `G = normalize(f f^T)` by rows.

    norm "l2" is RepDistiller's `Similarity`; norm "l1" is torchdistill's `SPKDLoss`, whose
    `normalize(G, 1)` divides rows by their L1 norm.
    """
    p = 2.0 if norm == "l2" else 1.0
    s, t = flat_features(f_s), flat_features(f_t)
    g_s = F.normalize(s @ s.T, p=p, dim=1)
    g_t = F.normalize(t @ t.T, p=p, dim=1)
    return (g_t - g_s).pow(2).sum() / (s.shape[0] ** 2)


def fsp_matrix(bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Flow of solution procedure (Yim et al. 2017): `G[b] = F_top F_bottom^T / HW`, `(B, C_top, C_bottom)`.

    The map with the larger height is average-pooled to the other's size first (RepDistiller pools
    to `(H, H)`, the same for square maps).
    """
    bottom, top = match_spatial(bottom, top)
    bottom = bottom.to(compute_dtype(bottom)).flatten(2)
    top = top.to(compute_dtype(top)).flatten(2)
    return torch.bmm(top, bottom.transpose(1, 2)) / bottom.shape[2]


def fsp_loss(feats_s: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over consecutive layer pairs of `mean((G_s - G_t)^2)`; RepDistiller's `FSP` returns each term."""
    return sum(fsp_pair_losses(feats_s, feats_t))


def fsp_pair_losses(feats_s: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [(fsp_matrix(feats_s[i], feats_s[i + 1]) - fsp_matrix(feats_t[i], feats_t[i + 1])).pow(2).mean()
            for i in range(len(feats_s) - 1)]


def unit_rows(x: torch.Tensor, eps: float) -> torch.Tensor:
    """`x / (||x|| + eps)` per row. `vector_norm` has a zero subgradient at 0, where RepDistiller's
    `sqrt(sum x^2)` sends NaN back for an all-zero row."""
    return x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + eps)


def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, *, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas 2018), RepDistiller's `PKT`.

    Cosine similarities mapped to [0, 1], `S = (x x^T + 1) / 2`, rows made conditional distributions
    `P = S / rowsum(S)`; loss `mean(P_t * log((P_t + eps) / (P_s + eps)))`.
    RepDistiller also sets NaN entries of the normalised features to 0; that only happens for NaN or Inf
    inputs, and here such inputs give a NaN loss instead of a finite one.
    """
    s = unit_rows(flat_features(f_s), eps)
    t = unit_rows(flat_features(f_t), eps)
    sim_s = (s @ s.T + 1.0) / 2.0
    sim_t = (t @ t.T + 1.0) / 2.0
    p_s = sim_s / sim_s.sum(1, keepdim=True)
    p_t = sim_t / sim_t.sum(1, keepdim=True)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def nst_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Neuron selectivity transfer (Huang & Wang 2017) with the degree-2 polynomial kernel, RepDistiller's `NSTLoss`.

    Maps pooled to the smaller height, flattened to `(B, C, HW)`, each channel L2-normalised over HW;
    `K(a, b) = (b a^T)^2` elementwise, `(B, C_b, C_a)`; loss `mean K(t, t) + mean K(s, s) - 2 mean K(s, t)`
    with `K(t, t)` detached. RepDistiller broadcasts `(B, C, C, HW)`; the batched product is the same sum.
    """
    f_s, f_t = match_spatial(f_s, f_t)
    s = F.normalize(f_s.to(compute_dtype(f_s)).flatten(2), dim=2)
    t = F.normalize(f_t.to(compute_dtype(f_t)).flatten(2), dim=2)

    def poly_kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.bmm(b, a.transpose(1, 2)).pow(2).mean()

    return poly_kernel_mean(t, t).detach() + poly_kernel_mean(s, s) - 2.0 * poly_kernel_mean(s, t)


def cc_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Correlation congruence as RepDistiller's `Correlation`: `delta = |f_s - f_t|`,
    `mean_{i < B-1} sum_d delta_{i,d} * delta_{i+1,d}` (neighbouring samples in the batch)."""
    delta = (flat_features(f_s) - flat_features(f_t)).abs()
    return (delta[:-1] * delta[1:]).sum(1).mean()
