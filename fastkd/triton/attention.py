"""Attention transfer (Zagoruyko & Komodakis 2017): the channel reduction `mean_c f^p` as Triton kernels.

Maths. For a map `f` of shape `(B, C, H, W)`, `a_bs = (1/C) sum_c f_bcs^p` (float32 arithmetic), then
`at(f) = a / max(||a_b||, 1e-12)` per sample, and the loss on the two normalised `(B, H*W)` maps (mode "code":
mean of squared differences; "paper": `sum_b ||diff_b|| / B`). The pow follows `torch.pow`: no `abs()`, so
odd integer p keeps the sign, a non-integer p gives NaN for negative entries. p = 1, 2, 3 are products;
any other p is `exp(p log|f|)` with the sign rule (a few float32 ulps from `torch.pow`).
Gradient: `dL/df_bcs = p f_bcs^(p-1) / C * dL/da_bs`, broadcast over channels.

Design. The only passes over the big tensor are the forward reduction (one read of f) and the backward
(one read of f, one write of df in f's dtype and memory layout); the normalisation and the difference run
in PyTorch on the small `(B, H*W)` maps, with autograd. The kernels address f by its strides, so a
channels-last map needs no copy: a constexpr flag orients the tile so the unit-stride dimension (spatial
for contiguous maps, channels for channels-last) is the fast one. Maps of different spatial sizes are
pooled first with the reference's `match_spatial` (PyTorch's adaptive average pooling).
Memory above the inputs: O(B H W) for the maps; the gradient itself in backward.
"""
from __future__ import annotations

from functools import partial

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import kernel_autograd as AG

# POW: 1, 2, 3 use products; 0 is the general exp(p log|f|) with PARITY 1 (odd integer p), 2 (even), 0 (other).


def _pow_mode(p: float) -> tuple[int, int]:
    if p in (1.0, 2.0, 3.0):
        return int(p), 0
    if float(p).is_integer():
        return 0, 1 if int(p) % 2 == 1 else 2
    return 0, 0


@triton.jit
def _signed_pow(x, q, PARITY: tl.constexpr):
    """x^q as torch.pow for float q: PARITY 1 odd integer, 2 even integer, 0 non-integer (NaN for x < 0)."""
    m = tl.exp(q * tl.log(tl.abs(x)))
    if PARITY == 1:
        m = tl.where(x < 0, -m, m)
    elif PARITY == 0:
        m = tl.where(x < 0, float("nan"), m)
    return m


@triton.jit
def _pow(x, p, POW: tl.constexpr, PARITY: tl.constexpr):
    if POW == 1:
        return x
    elif POW == 2:
        return x * x
    elif POW == 3:
        return x * x * x
    else:
        return _signed_pow(x, p, PARITY)


@triton.jit
def _pow_grad(x, p, POW: tl.constexpr, PARITY: tl.constexpr):
    """d(x^p)/dx = p x^(p-1), as torch's pow backward."""
    if POW == 1:
        return tl.full(x.shape, 1.0, tl.float32)
    elif POW == 2:
        return 2.0 * x
    elif POW == 3:
        return 3.0 * x * x
    else:
        # p - 1 has the other parity for integer p.
        if PARITY == 1:
            return p * _signed_pow(x, p - 1.0, 2)
        elif PARITY == 2:
            return p * _signed_pow(x, p - 1.0, 1)
        else:
            return p * _signed_pow(x, p - 1.0, 0)


@triton.jit
def at_map_forward_kernel(
    f_ptr, a_ptr, C, HW, W, s_b, s_c, s_h, s_w, inv_c, p,
    POW: tl.constexpr, PARITY: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    ms = offs_s < HW
    h = offs_s // W
    sp = h.to(tl.int64) * s_h + (offs_s - h * W).to(tl.int64) * s_w
    base = f_ptr + b * s_b
    cols = tl.arange(0, BLOCK_C)
    if CHANNELS_LAST:
        acc = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + cols
            mask = ms[:, None] & (offs_c < C)[None, :]
            x = tl.load(base + sp[:, None] + offs_c.to(tl.int64)[None, :] * s_c, mask=mask, other=0.0)
            acc += tl.where(mask, _pow(x.to(tl.float32), p, POW, PARITY), 0.0)
        a = tl.sum(acc, 1)
    else:
        acc = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + cols
            mask = (offs_c < C)[:, None] & ms[None, :]
            x = tl.load(base + offs_c.to(tl.int64)[:, None] * s_c + sp[None, :], mask=mask, other=0.0)
            acc += tl.where(mask, _pow(x.to(tl.float32), p, POW, PARITY), 0.0)
        a = tl.sum(acc, 0)
    tl.store(a_ptr + b * HW + offs_s, a * inv_c, mask=ms)


@triton.jit
def at_map_backward_kernel(
    f_ptr, g_ptr, df_ptr, C, HW, W, s_b, s_c, s_h, s_w, d_b, d_c, d_h, d_w, inv_c, p,
    POW: tl.constexpr, PARITY: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    ms = offs_s < HW
    h = offs_s // W
    w = offs_s - h * W
    sp = h.to(tl.int64) * s_h + w.to(tl.int64) * s_w
    dsp = h.to(tl.int64) * d_h + w.to(tl.int64) * d_w
    g = tl.load(g_ptr + b * HW + offs_s, mask=ms, other=0.0) * inv_c
    base = f_ptr + b * s_b
    dbase = df_ptr + b * d_b
    cols = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        offs_c = (c0 + cols).to(tl.int64)
        if CHANNELS_LAST:
            mask = ms[:, None] & (offs_c < C)[None, :]
            x = tl.load(base + sp[:, None] + offs_c[None, :] * s_c, mask=mask, other=0.0).to(tl.float32)
            df = _pow_grad(x, p, POW, PARITY) * g[:, None]
            tl.store(dbase + dsp[:, None] + offs_c[None, :] * d_c, df.to(df_ptr.dtype.element_ty), mask=mask)
        else:
            mask = (offs_c < C)[:, None] & ms[None, :]
            x = tl.load(base + offs_c[:, None] * s_c + sp[None, :], mask=mask, other=0.0).to(tl.float32)
            df = _pow_grad(x, p, POW, PARITY) * g[None, :]
            tl.store(dbase + offs_c[:, None] * d_c + dsp[None, :], df.to(df_ptr.dtype.element_ty), mask=mask)


def _channels_last(f: Tensor) -> bool:
    """True when the channel stride is the unit one (and the spatial one is not): tile with channels fastest."""
    return f.stride(1) == 1 and f.shape[1] > 1 and not (f.stride(3) == 1 and f.shape[3] > 1)


def _blocks(f: Tensor, channels_last: bool) -> tuple[int, int]:
    C, HW = f.shape[1], f.shape[2] * f.shape[3]
    if channels_last:
        block_c = min(triton.next_power_of_2(C), 64)
        block_s = min(triton.next_power_of_2(HW), max(16, 4096 // block_c), 256)
    else:
        block_s = min(triton.next_power_of_2(HW), 256)
        block_c = min(triton.next_power_of_2(C), max(1, 4096 // block_s), 64)
    return block_c, block_s


def map_forward(f: Tensor, p: float) -> Tensor:
    """`mean_c f^p` of a `(B, C, H, W)` map as a float32 `(B, H*W)` tensor."""
    B, C, H, W = f.shape
    HW = H * W
    a = torch.empty(B, HW, dtype=torch.float32, device=f.device)
    pow_mode, parity = _pow_mode(p)
    cl = _channels_last(f)
    block_c, block_s = _blocks(f, cl)
    at_map_forward_kernel[(B, triton.cdiv(HW, block_s))](
        f, a, C, HW, W, *f.stride(), 1.0 / C, float(p),
        POW=pow_mode, PARITY=parity, CHANNELS_LAST=cl, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=4)
    return a


def map_backward(grad: Tensor, f: Tensor, p: float) -> Tensor:
    """`p f^(p-1) / C * grad` broadcast over channels, in f's dtype and layout."""
    B, C, H, W = f.shape
    HW = H * W
    df = torch.empty_like(f)
    grad = grad.to(torch.float32).contiguous()
    pow_mode, parity = _pow_mode(p)
    cl = _channels_last(f)
    block_c, block_s = _blocks(f, cl)
    at_map_backward_kernel[(B, triton.cdiv(HW, block_s))](
        f, grad, df, C, HW, W, *f.stride(), *df.stride(), 1.0 / C, float(p),
        POW=pow_mode, PARITY=parity, CHANNELS_LAST=cl,
        BLOCK_C=block_c, BLOCK_S=block_s, num_warps=4)
    return df


# --- the operator, for torch.compile, and its eager door ---------------------------------------------------

@torch.library.custom_op("fastkd::at_channel_mean_pow", mutates_args=())
def at_map_op(f: Tensor, p: float) -> Tensor:
    return map_forward(f, p)


@at_map_op.register_fake
def _(f, p):
    return f.new_empty((f.shape[0], f.shape[2] * f.shape[3]), dtype=torch.float32)


@torch.library.custom_op("fastkd::at_channel_mean_pow_backward", mutates_args=())
def at_map_backward_op(grad: Tensor, f: Tensor, p: float) -> Tensor:
    return map_backward(grad, f, p)


@at_map_backward_op.register_fake
def _(grad, f, p):
    return torch.empty_like(f)


at_map_op.register_autograd(partial(AG.map_backward, backward=at_map_backward_op), setup_context=AG.map_setup)


class ATMap(torch.autograd.Function):
    """The eager door to `fastkd::at_channel_mean_pow`: the same launchers, no dispatcher."""

    @staticmethod
    def forward(f, p):
        return map_forward(f, p)

    @staticmethod
    def setup_context(ctx, inputs, output):
        AG.map_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad):
        return AG.map_backward(ctx, grad, backward=map_backward)


def channel_mean_pow(f: Tensor, p: float) -> Tensor:
    """`mean_c f^p`, `(B, C, H, W)` to float32 `(B, H*W)`, with autograd."""
    p = float(p)
    if torch.compiler.is_compiling():
        return at_map_op(f, p)
    return ATMap.apply(f, p)
