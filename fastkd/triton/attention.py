"""Attention transfer (Zagoruyko & Komodakis 2017): the channel reduction `mean_c f^p` as Triton kernels.

Maths. For a map `f` of shape `(B, C, H, W)`, `a_bs = (1/C) sum_c f_bcs^p` (float32 arithmetic), then
`at(f) = a / max(||a_b||, 1e-12)` per sample, and the loss on the two normalised `(B, H*W)` maps (mode "code":
mean of squared differences; "paper": `sum_b ||diff_b|| / B`). The pow follows `torch.pow`: no `abs()`, so
odd integer p keeps the sign, a non-integer p gives NaN for negative entries.
Gradient: `dL/df_bcs = p f_bcs^(p-1) / C * dL/da_bs`, broadcast over channels (0 for p = 0, as torch).

Pow. `x^q` (q = p forward, q = p - 1 backward) is computed as an unnormalised float32 pair `(h, l)`,
`h + l = x^q` to well below an ulp, rounded once (`fl(h + l)`, or `h` where `l` is NaN): the result is
torch.pow's correctly rounded value but in rare near-ties, at most ~1 ulp for integer and half-integer q
(measured: the same error distribution as torch.pow on CPU, max 0.5 ulp), ~1 ulp for other q. Exact
products: `TwoProd(a, b) = (a*b, fma(a, b, -a*b))` (compiled kernels, and the CUDA twin; the interpreter, whose fma
rounds twice, uses Dekker's product on Veltkamp's split `c = 4097 a; a_hi = c - (c - a); a_lo = a - a_hi`). Pair
product `(ah, al)(bh, bl) = (h, err(ah bh) + (ah bl + al bh))` with `h = ah bh`.
- Integer |q| = N (constexpr): binary exponentiation in pairs, `b = (x, 0)`, squared for every bit of N
  after the lowest, multiplied into the result for every set bit (the lowest set bit initialises it);
  `x^0 = 1` (also 0, inf, NaN). Sign, 0, inf, NaN follow from the products (no abs()).
- Non-integer q, |q| = N + fr with 0 < fr < 1: `|x|^N * z`, z = |x|^fr as a pair, NaN where `-inf < x < 0`
  (-inf behaves as +inf, as C's pow).
  fr = 1/2: `s = sqrt_rn(|x|)`, `z = (s, ((|x| - s*s) - err(s*s)) / (2 s))` (correction 0 at s = 0, inf);
  for |q| = 1/2 exactly s = sqrt_rn(x), so sqrt(-0) = -0 and sqrt(-inf) = NaN as torch's sqrt/rsqrt path.
  Other fr: `z = (y, 0)`, y to ~1 ulp at every magnitude: |x| = m 2^e from the bits (subnormals scaled by 2^24,
  e -= 24; m in [1, 2) from the mantissa, halved with e += 1 if m > float32(sqrt 2)); fr is passed as
  fr (float32 of frac|q|), fr_hi = fr rounded to a multiple of 2^-15, fr_lo = float32((frac|q| in float64) -
  fr_hi); t = fr_hi * e (exact), k = floor(t + 0.5), r = (t - k) + (fr_lo * e + fr * log2(m)) (|r| <= 0.76),
  y = (exp2(r) * 2^k1) * 2^k2 with k1 = floor(k / 2), k2 = k - k1, 2^j built as the bits (j + 127) << 23;
  y = |x| where |x| is 0, inf or NaN. Its error, ~|r| u from r plus exp2's and fr ln2 times log2's absolute
  error, does not grow with |log x| or with p (exp(p log|x|) errs by ~u |p log x|).
- q < 0: `1 / (h + l)` as the pair `(r, r ((1 - h r) - err(h r) - l r))`, r = div_rn(1, h) (correction 0
  where r is 0 or inf). 0^q = inf, (-0)^q = -inf for odd q.
- Gradient: `p (h + l)` rounded once: `fl(p h + (err(p h) + p l))`.
Cost per element, forward and backward alike (the backward with q = p - 1): integer N: floor(log2 N) +
popcount(N) - 1 pair products (3 multiply/fma each), no exp/log; fr = 1/2: one sqrt_rn and one division
more; other fr: one log2 and one exp2 (plus ~20 integer/float ops); q < 0: one div_rn more. Accuracy of
the general-fraction route on a GPU rests on Triton's exp2 (PTX ex2.approx.ftz.f32, ~2 ulp on |r| <= 0.76)
and log2; the interpreter uses NumPy's. Below ~2^-100 the pair's low part is subnormal: results there lose the
extra accuracy (measured up to ~10 u near 2^-126 for q = 6.77), as do subnormal results themselves.

Design. The only passes over the big tensor are the forward reduction (one read of f: B C H W elements of
f's dtype, plus 4 B H W bytes written for the map) and the backward (one read of f, one write of df in f's
dtype and memory layout, plus 4 B H W bytes of the map's gradient read); the normalisation and the
difference run in PyTorch on the small `(B, H*W)` maps, with autograd. The kernels address f by its strides,
so a channels-last map needs no copy: a constexpr flag orients the tile so the unit-stride dimension (spatial
for contiguous maps, channels for channels-last) is the fast one. Maps of different spatial sizes are
pooled first with the reference's `match_spatial` (PyTorch's adaptive average pooling).
Memory above the inputs: O(B H W) for the maps; the gradient itself in backward.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor


# The power x^q as torch.pow (module docstring, "Pow"), specialised by three constexprs: NPOW = floor(|q|),
# FRAC = 0 (q an integer), 1 (frac(|q|) = 1/2: a square root), 2 (any other fraction: exp2/log2), RECIP = q < 0;
# and three float32 arguments: fr = frac(|q|), fr_hi = fr rounded to a multiple of 2^-15,
# fr_lo = frac(|q|) - fr_hi (from float64).
_FRAC_HI_QUANTUM = 2.0 ** -15
# fma is fused in compiled kernels; Triton's interpreter (decided, as by triton.jit, at import) rounds twice.
_EXACT_FMA = os.environ.get("TRITON_INTERPRET") != "1"
_MAX_NPOW = 2 ** 62  # any float |q| >= 2^53 is an even integer; x^(2^62) over/underflows exactly as x^q does


def _pow_args(q: float) -> tuple[dict, tuple[float, float, float]]:
    """The constexpr flags and the float arguments of `_pow` for the exponent q."""
    q = float(q)
    if not math.isfinite(q):
        raise ValueError(f"attention transfer needs a finite power p, got {q}")
    a = abs(q)
    n = math.floor(a)
    fr = float(torch.tensor(a - n, dtype=torch.float32))  # a - n is exact in float64
    if fr == 1.0:  # frac(|q|) rounds up to 1 in float32: |q| is within 2^-25 of the next integer
        n, fr = n + 1, 0.0
    n = min(n, _MAX_NPOW)
    frac = 0 if fr == 0.0 else 1 if fr == 0.5 else 2
    hi = math.floor(fr / _FRAC_HI_QUANTUM + 0.5) * _FRAC_HI_QUANTUM
    lo = float(torch.tensor((a - n) - hi, dtype=torch.float32))  # |lo| <= 2^-16: hi + lo = frac(|q|) to 2^-40
    return dict(NPOW=n, FRAC=frac, RECIP=q < 0), (fr, hi, lo)


@triton.jit
def _prod_err(a, b, ab, EXACT_FMA: tl.constexpr):
    """a * b - ab exactly, for ab = fl(a * b) (barring under/overflow): fma(a, b, -ab) where fma is fused (a
    compiled kernel); Dekker's product on Veltkamp's 12/12-bit split otherwise (Triton's interpreter evaluates
    fma as a rounded product plus a rounded sum; a factor above 2^96 is scaled by 2^-32 for its split, and
    the error scaled back)."""
    if EXACT_FMA:
        return tl.fma(a, b, -ab)
    else:
        sa = tl.where(tl.abs(a) > 7.922816251426434e28, 2.3283064365386963e-10, 1.0)
        sb = tl.where(tl.abs(b) > 7.922816251426434e28, 2.3283064365386963e-10, 1.0)
        a = a * sa
        b = b * sb
        ab = (ab * sa) * sb
        ca = a * 4097.0
        a_hi = ca - (ca - a)
        a_lo = a - a_hi
        cb = b * 4097.0
        b_hi = cb - (cb - b)
        b_lo = b - b_hi
        return (((a_hi * b_hi - ab) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo) / (sa * sb)


@triton.jit
def _mul2(ah, al, bh, bl, EXACT_FMA: tl.constexpr):
    """(ah + al)(bh + bl) as an unnormalised pair (h, l), to ~2u^2 relative (al bl dropped)."""
    h = ah * bh
    return h, _prod_err(ah, bh, h, EXACT_FMA) + (ah * bl + al * bh)


@triton.jit
def _round(h, l):
    """fl(h + l); h itself where l is NaN (h infinite or NaN, or an overflowed split)."""
    y = h + l
    return tl.where(y != y, h, y)


@triton.jit
def _int_pow2(x, N: tl.constexpr, EXACT_FMA: tl.constexpr):
    """x^N as a pair (h, l), h + l = x^N to ~(N - 1) 2u^2, for a constexpr integer N >= 0, by binary
    exponentiation in pair arithmetic: the squarings x^2, x^4, ... and a product with each whose bit is set in
    N, low bits first (x^0 = 1, also for 0, inf and NaN, as torch.pow). No abs(): odd N keeps the sign."""
    rh = tl.full(x.shape, 1.0, tl.float32)
    rl = tl.zeros(x.shape, tl.float32)
    bh = x
    bl = tl.zeros(x.shape, tl.float32)
    for i in tl.static_range(63):
        if (N >> i) > 0:
            if i > 0:
                bh, bl = _mul2(bh, bl, bh, bl, EXACT_FMA)
            if (N >> i) & 1:
                if (N & ((1 << i) - 1)) == 0:  # the lowest set bit: r = b, no product
                    rh = bh
                    rl = bl
                else:
                    rh, rl = _mul2(rh, rl, bh, bl, EXACT_FMA)
    return rh, rl


@triton.jit
def _frac_pow(ax, fr, fr_hi, fr_lo):
    """ax^fr for ax >= 0 (or NaN) and 0 < fr < 1, to a few ulp at any magnitude of ax.

    ax = m 2^e exactly (m in [sqrt(1/2), sqrt(2)), from the bits; subnormals scaled by 2^24 first), so
    fr log2(ax) = fr_hi e + fr_lo e + fr log2(m), where fr_hi e is exact (15 bits times 9) and is split as
    k + (fr_hi e - k) with k = round(fr_hi e) (the difference exact). ax^fr = 2^k * exp2(r) with
    r = (fr_hi e - k) + (fr_lo e + fr log2(m)), |r| <= ~0.76; 2^k is applied as 2^k1 * 2^k2 (k1 = floor(k/2),
    k2 = k - k1, both built from their bits), so no intermediate leaves the normal range."""
    tiny = ax < 1.1754943508222875e-38  # subnormal (or 0): scale into the normal range
    axs = tl.where(tiny, ax * 16777216.0, ax)
    bits = axs.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)  # in [1, 2)
    up = m > 1.41421353816986083984375  # float32(sqrt 2)
    m = tl.where(up, m * 0.5, m)
    e = e + tl.where(up, 1, 0) - tl.where(tiny, 24, 0)
    ef = e.to(tl.float32)
    t = fr_hi * ef
    k = tl.floor(t + 0.5)
    r = (t - k) + (fr_lo * ef + fr * tl.log2(m))
    ki = k.to(tl.int32)
    k1 = ki >> 1
    k2 = ki - k1
    s1 = ((k1 + 127) << 23).to(tl.float32, bitcast=True)
    s2 = ((k2 + 127) << 23).to(tl.float32, bitcast=True)
    y = (tl.exp2(r) * s1) * s2
    special = (ax == 0.0) | (ax == float("inf")) | (ax != ax)  # 0^fr = 0, inf^fr = inf, NaN stays
    return tl.where(special, ax, y)


@triton.jit
def _pow2(x, fr, fr_hi, fr_lo, NPOW: tl.constexpr, FRAC: tl.constexpr, RECIP: tl.constexpr,
          EXACT_FMA: tl.constexpr):
    """x^q as torch.pow (see `_pow_args`), as a pair (h, l): NaN for x < 0 and non-integer q; 0^0 = 1;
    0^q = inf for q < 0."""
    if FRAC == 0:
        h, l = _int_pow2(x, NPOW, EXACT_FMA)
    else:
        ax = tl.abs(x)
        if FRAC == 1:  # sqrt(ax) = s + (ax - s^2) / (2 s), the residual ax - s^2 exact but for one rounding
            if NPOW == 0:  # |q| = 1/2: torch.pow's sqrt/rsqrt, so sqrt(-0) = -0 and sqrt(-inf) = NaN
                zh = tl.sqrt_rn(x)
            else:
                zh = tl.sqrt_rn(ax)
            sq = zh * zh
            res = (ax - sq) - _prod_err(zh, zh, sq, EXACT_FMA)
            zl = tl.where((zh > 0.0) & (zh < float("inf")), res / (2.0 * zh), 0.0)
        else:
            zh = _frac_pow(ax, fr, fr_hi, fr_lo)
            zl = tl.zeros(x.shape, tl.float32)
        if NPOW == 0:
            h = zh
            l = zl
        else:
            ih, il = _int_pow2(ax, NPOW, EXACT_FMA)
            h, l = _mul2(ih, il, zh, zl, EXACT_FMA)
        h = tl.where((x < 0.0) & (x > float("-inf")), float("nan"), h)  # (-inf)^q = inf^q, as C's pow
    if RECIP:  # 1 / (h + l) = r + r (1 - h r - l r), with 1 - h r exact but for one rounding
        r = tl.div_rn(tl.full(x.shape, 1.0, tl.float32), h)
        hr = h * r
        e = ((1.0 - hr) - _prod_err(h, r, hr, EXACT_FMA)) - l * r
        l = tl.where((r != 0.0) & (tl.abs(r) < float("inf")), e * r, 0.0)
        h = r
    return h, l


@triton.jit
def _pow(x, fr, fr_hi, fr_lo, NPOW: tl.constexpr, FRAC: tl.constexpr, RECIP: tl.constexpr,
         EXACT_FMA: tl.constexpr):
    """x^q as torch.pow, rounded once from the pair."""
    h, l = _pow2(x, fr, fr_hi, fr_lo, NPOW, FRAC, RECIP, EXACT_FMA)
    return _round(h, l)


@triton.jit
def _pow_grad(x, p, fr, fr_hi, fr_lo, NPOW: tl.constexpr, FRAC: tl.constexpr, RECIP: tl.constexpr,
              ZERO: tl.constexpr, EXACT_FMA: tl.constexpr):
    """d(x^p)/dx = p x^(p-1) as torch's pow backward (0 everywhere for p = 0), rounded once from the pair
    p (h + l); the flags and floats are those of q = p - 1."""
    if ZERO:
        return tl.zeros(x.shape, tl.float32)
    else:
        h, l = _pow2(x, fr, fr_hi, fr_lo, NPOW, FRAC, RECIP, EXACT_FMA)
        ph = p * h
        return _round(ph, _prod_err(h, p + tl.zeros(x.shape, tl.float32), ph, EXACT_FMA) + p * l)


@triton.jit
def _spatial_offsets(offs_s, W, s_h, s_w, FLAT: tl.constexpr):
    """Element offsets of flat spatial positions. FLAT (s_h = W s_w, the usual case): one multiply, which keeps
    the addresses visibly contiguous when s_w = 1, so the loads vectorise (128 bits); else via (h, w)."""
    if FLAT:
        return offs_s.to(tl.int64) * s_w
    h = offs_s // W
    return h.to(tl.int64) * s_h + (offs_s - h * W).to(tl.int64) * s_w


@triton.jit
def at_map_forward_kernel(
    f_ptr, a_ptr, C, HW, W, s_b, s_c, s_h, s_w, inv_c, fr, fr_hi, fr_lo,
    NPOW: tl.constexpr, FRAC: tl.constexpr, RECIP: tl.constexpr, EXACT_FMA: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, FLAT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    ms = offs_s < HW
    sp = _spatial_offsets(offs_s, W, s_h, s_w, FLAT)
    base = f_ptr + b * s_b
    cols = tl.arange(0, BLOCK_C)
    if CHANNELS_LAST:
        acc = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + cols
            mask = ms[:, None] & (offs_c < C)[None, :]
            x = tl.load(base + sp[:, None] + offs_c.to(tl.int64)[None, :] * s_c, mask=mask, other=0.0)
            acc += tl.where(mask, _pow(x.to(tl.float32), fr, fr_hi, fr_lo, NPOW, FRAC, RECIP, EXACT_FMA), 0.0)
        a = tl.sum(acc, 1)
    else:
        acc = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + cols
            mask = (offs_c < C)[:, None] & ms[None, :]
            x = tl.load(base + offs_c.to(tl.int64)[:, None] * s_c + sp[None, :], mask=mask, other=0.0)
            acc += tl.where(mask, _pow(x.to(tl.float32), fr, fr_hi, fr_lo, NPOW, FRAC, RECIP, EXACT_FMA), 0.0)
        a = tl.sum(acc, 0)
    tl.store(a_ptr + b * HW + offs_s, a * inv_c, mask=ms)


@triton.jit
def at_map_backward_kernel(
    f_ptr, g_ptr, df_ptr, C, HW, W, s_b, s_c, s_h, s_w, d_b, d_c, d_h, d_w, inv_c, p, fr, fr_hi, fr_lo,
    NPOW: tl.constexpr, FRAC: tl.constexpr, RECIP: tl.constexpr, ZERO: tl.constexpr, EXACT_FMA: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, FLAT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    ms = offs_s < HW
    sp = _spatial_offsets(offs_s, W, s_h, s_w, FLAT)
    dsp = _spatial_offsets(offs_s, W, d_h, d_w, FLAT)
    g = tl.load(g_ptr + b * HW + offs_s, mask=ms, other=0.0) * inv_c
    base = f_ptr + b * s_b
    dbase = df_ptr + b * d_b
    cols = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        offs_c = (c0 + cols).to(tl.int64)
        if CHANNELS_LAST:
            mask = ms[:, None] & (offs_c < C)[None, :]
            x = tl.load(base + sp[:, None] + offs_c[None, :] * s_c, mask=mask, other=0.0).to(tl.float32)
            df = _pow_grad(x, p, fr, fr_hi, fr_lo, NPOW, FRAC, RECIP, ZERO, EXACT_FMA) * g[:, None]
            tl.store(dbase + dsp[:, None] + offs_c[None, :] * d_c, df.to(df_ptr.dtype.element_ty), mask=mask)
        else:
            mask = (offs_c < C)[:, None] & ms[None, :]
            x = tl.load(base + offs_c[:, None] * s_c + sp[None, :], mask=mask, other=0.0).to(tl.float32)
            df = _pow_grad(x, p, fr, fr_hi, fr_lo, NPOW, FRAC, RECIP, ZERO, EXACT_FMA) * g[None, :]
            tl.store(dbase + offs_c[:, None] * d_c + dsp[None, :], df.to(df_ptr.dtype.element_ty), mask=mask)


def _flat(*tensors: Tensor) -> bool:
    """Whether each map's spatial dimensions merge into one (stride of H = W times stride of W)."""
    return all(t.stride(2) == t.shape[3] * t.stride(3) or t.shape[2] == 1 for t in tensors)


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


def _warps(block_c: int, block_s: int) -> int:
    """8 warps for tiles of 2048 elements or more: 4 left the fractional-power path at 255 registers with a
    few spills on sm_90 (16-bit channels-last maps); 8 keeps every tile at 16 elements a thread at most."""
    return 8 if block_c * block_s >= 2048 else 4


def at_channel_mean_pow(f: Tensor, p: float) -> Tensor:
    """`mean_c f^p` of a `(B, C, H, W)` map as a float32 `(B, H*W)` tensor."""
    B, C, H, W = f.shape
    HW = H * W
    a = torch.empty(B, HW, dtype=torch.float32, device=f.device)
    flags, fr = _pow_args(p)
    cl = _channels_last(f)
    block_c, block_s = _blocks(f, cl)
    at_map_forward_kernel[(B, triton.cdiv(HW, block_s))](
        f, a, C, HW, W, *f.stride(), 1.0 / C, *fr, **flags, EXACT_FMA=_EXACT_FMA, CHANNELS_LAST=cl,
        FLAT=_flat(f), BLOCK_C=block_c, BLOCK_S=block_s, num_warps=_warps(block_c, block_s))
    return a


def at_channel_mean_pow_backward(grad: Tensor, f: Tensor, p: float) -> Tensor:
    """`p f^(p-1) / C * grad` broadcast over channels, in f's dtype and layout."""
    B, C, H, W = f.shape
    HW = H * W
    df = torch.empty_like(f)
    grad = grad.to(torch.float32).contiguous()
    flags, fr = _pow_args(float(p) - 1.0)  # the derivative p f^(p-1): the power q = p - 1
    cl = _channels_last(f)
    block_c, block_s = _blocks(f, cl)
    at_map_backward_kernel[(B, triton.cdiv(HW, block_s))](
        f, grad, df, C, HW, W, *f.stride(), *df.stride(), 1.0 / C, float(p), *fr, **flags,
        ZERO=float(p) == 0.0, EXACT_FMA=_EXACT_FMA, CHANNELS_LAST=cl, FLAT=_flat(f, df),
        BLOCK_C=block_c, BLOCK_S=block_s, num_warps=_warps(block_c, block_s))
    return df
