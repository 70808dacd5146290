"""What every row kernel shares: addressing rows of `(..., V)` views by strides, block sizes, and the
online (streaming) log-sum-exp over blocks of a row.

Online log-sum-exp, per lane: each of the BLOCK_V lanes keeps a running max `m` and `z = sum exp(x - m)`
over the elements it has seen; a new element x gives `m' = max(m, x)`, `z' = z exp(m - m') + exp(x - m')`.
At the end the lanes are combined: `M = max_lanes m`, `Z = sum_lanes z exp(m - M)`, `lse = M + log Z`.
A lane (or a row) that has seen only -inf keeps `m = -inf, z = 0`; the `where`s keep `-inf - -inf` out.
Anything weighted like `z` (a running `sum exp(x - m) * f(x)`) is rescaled and combined the same way.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Largest block of a row that one program loads at once: 2048 lanes over 8 warps is 8 per thread for each
# of the up to 8 running per-lane sums a kernel keeps (untuned: no GPU was at hand when this was written).
MAX_BLOCK_V = 2048


def block_size(V: int) -> int:
    return min(triton.next_power_of_2(V), MAX_BLOCK_V)


def num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8


def row_layout(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int]:
    """`(view, outer_stride, inner_stride, column_stride, inner_size)` addressing the rows of `(..., V)`.

    Row r sits at `(r // inner_size) * outer_stride + (r % inner_size) * inner_stride`: one or two leading
    dimensions are addressed by their strides, so `logits[:, :-1]` needs no copy. More leading dimensions
    are merged with `reshape`, which copies only when the strides cannot be merged.
    """
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() > 3:
        x = x.reshape(-1, x.shape[-2], x.shape[-1])
    if x.dim() == 2:
        return x, 0, x.stride(0), x.stride(1), max(x.shape[0], 1)
    return x, x.stride(0), x.stride(1), x.stride(2), x.shape[1]


def flat_index(t: torch.Tensor | None) -> torch.Tensor | None:
    """Per-row integer tensors (targets, labels) as one contiguous vector."""
    return None if t is None else t.reshape(-1).contiguous()


def row_weight(w: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`(tensor, stride)` of a per-row weight: float32 `(rows,)`, any stride (an expanded 0-stride view of one
    number is read through its stride 0); None reads as 1 for every row."""
    if w is None:
        return torch.ones(1, dtype=torch.float32, device=like.device), 0
    if w.dtype != torch.float32:
        w = w.float()
    return w, w.stride(0)


@triton.jit
def row_start(ptr, row, inner_size, outer_stride, inner_stride):
    outer = row // inner_size
    return ptr + outer * outer_stride + (row - outer * inner_size) * inner_stride


@triton.jit
def online_update(m, z, x):
    """One step of the per-lane online log-sum-exp; also returns the rescale of old sums and exp(x - m')."""
    # tl.maximum may drop a NaN (PTX max does); carrying it makes the sums NaN, as they must be.
    m_new = tl.where(x != x, x, tl.maximum(m, x))
    seen = m_new != float("-inf")
    rescale = tl.where(seen, tl.exp(m - m_new), 0.0)
    e = tl.where(seen, tl.exp(x - m_new), 0.0)
    return m_new, z * rescale + e, rescale, e


@triton.jit
def lane_weights(m):
    """The max over lanes and each lane's weight `exp(m - M)` (0 for lanes that saw only -inf)."""
    big = tl.max(m, 0)
    return big, tl.where(m == float("-inf"), 0.0, tl.exp(m - big))


@triton.jit
def log1p(x):
    """log(1 + x), accurate for small x (Kahan's trick: the rounding of 1 + x cancels in the ratio)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


# --- Row statistics kept apart: the max M and the sum Z = sum exp(x - M) -------------------------------
#
# The divergence kernels never form `lse = M + log Z` and subtract it from a logit: in float32 that costs an
# absolute error of u |M| (u = 2^-24) in every log-probability, which is the whole loss once the logits are
# large (an offset of 1e3, a temperature of 0.05, float16 logits near 6e4). They use instead
#     a = x - M          (exact for the entries near M that carry the mass: Sterbenz)
#     log p = a - log Z, p = exp(a) / Z
# and compare two rows through `log(Z_x / Z_y)` computed from the accurately summed difference
# `D = Z_x - Z_y = sum (exp(a_x) - exp(a_y))` (`exp_diff`, `log_ratio`).


@triton.jit
def finite_or_zero(m):
    """A row max to subtract: 0 where the row (or lane) is all -inf, so that `x - m` stays -inf, never NaN."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def expm1_small(t):
    """exp(t) - 1 for |t| <= 1/2: its Taylor series to t^9 in Horner form (truncation < 6e-10 relative,
    a few u of rounding), multiplies and adds only."""
    r = 1.0 + t * (1.0 / 9.0)
    r = 1.0 + t * (1.0 / 8.0) * r
    r = 1.0 + t * (1.0 / 7.0) * r
    r = 1.0 + t * (1.0 / 6.0) * r
    r = 1.0 + t * (1.0 / 5.0) * r
    r = 1.0 + t * (1.0 / 4.0) * r
    r = 1.0 + t * (1.0 / 3.0) * r
    r = 1.0 + t * 0.5 * r
    return t * r


@triton.jit
def expm1(x):
    """exp(x) - 1 to a few u relative for every x: the Taylor series `expm1_small` where |x| <= 1/2, the plain
    `exp(x) - 1` elsewhere (no cancellation there); -1 at -inf. (Kahan's `(u - 1) x / log u` is not used: it
    breaks down once `u = exp(x)` is subnormal, x < -87, where `log u` has lost its bits.)"""
    return tl.where(tl.abs(x) <= 0.5, expm1_small(x), tl.exp(x) - 1.0)


@triton.jit
def exp_diff(a, b, ea, eb):
    """`exp(a) - exp(b)` (given `ea = exp(a)`, `eb = exp(b)`) to a few u relative: `eb * expm1(a - b)` where
    |a - b| <= 1/2 (the plain difference would cancel), `ea - eb` elsewhere (no cancellation: the two differ
    by a factor >= e^(1/2)). 0 where both are -inf (`a - b` is NaN there and the second branch is taken)."""
    t = a - b
    return tl.where(tl.abs(t) <= 0.5, eb * expm1_small(t), ea - eb)


@triton.jit
def log_ratio(z_num, z_den, d):
    """`log(z_num / z_den)` from the two sums and their accurately summed difference `d = z_num - z_den`:
    `log1p(d / z_den)` when the ratio is within [1/2, 3/2] (an absolute error of a few u times |d| / z_den,
    not u log V), the plain `log(z_num / z_den)` elsewhere (no cancellation there)."""
    small = tl.abs(d) <= 0.5 * z_den
    return tl.where(small, log1p(d / z_den), tl.log(z_num / z_den))


# --- Scaling a gradient made in the forward pass by the incoming gradient ---------------------------------
#
# The logit losses write their gradient in the forward pass, already multiplied by each row's weight in the
# loss (fastkd.kernel_losses). The backward only multiplies row r by grad_output_r, and in the usual case
# (`loss.backward()`, grad_output exactly 1) each program reads its scale, sees 1.0 and returns: no load and
# no store of the gradient, decided on the device with no host sync. Any other scale is a plain multiply in
# float32, rounded once to the gradient's dtype, as autograd's `grad_output * local_gradient`: a scale of 0
# against an infinite (or NaN) gradient entry gives NaN, as PyTorch does through the reference's formula.
# Traffic: rows scalar loads of the scale, plus 1 read + 1 write of N x V where the scale is not 1.

SCALE_BLOCK = 4096  # columns per program of the scale kernel (a long row is split over several programs)


@triton.jit
def scale_rows_kernel(d_ptr, scale_ptr, scale_stride, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr + row * scale_stride)
    if scale == 1.0:
        return  # the usual loss.backward(): the gradient is final as the forward wrote it
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < V
    d = tl.load(d_ptr + row * V + offs, mask=mask).to(tl.float32)
    tl.store(d_ptr + row * V + offs, (d * scale).to(d_ptr.dtype.element_ty), mask=mask)


def scale_rows_(d: torch.Tensor, scale: torch.Tensor) -> None:
    """Multiply each row of the contiguous `(..., V)` tensor `d` in place by `scale[r]` (float32, `(rows,)`,
    any stride: an expanded 0-stride view of one number is read as such); rows whose scale is exactly 1.0
    are neither read nor written."""
    if d.numel() == 0:
        return
    if not d.is_contiguous():
        raise ValueError("scale_rows_ takes a contiguous gradient buffer")
    V = d.shape[-1]
    rows = d.numel() // V
    if scale.dim() != 1 or scale.shape[0] != rows:
        raise ValueError(f"scale_rows_: scale must have shape ({rows},), got {tuple(scale.shape)}")
    if scale.dtype != torch.float32:
        scale = scale.float()
    block = min(triton.next_power_of_2(V), SCALE_BLOCK)
    scale_rows_kernel[(rows, triton.cdiv(V, block))](d, scale, scale.stride(0), V, BLOCK=block,
                                                     num_warps=num_warps(block))
