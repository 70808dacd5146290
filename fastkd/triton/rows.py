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

# The logit row kernels (kl, jsd, dkd) hold a row of V <= MAX_BLOCK_V on chip: one block of
# next_power_of_2(V) lanes, loaded once and kept in registers from the maxima to the gradient ("one block").
# A longer row streams in blocks of STREAM_BLOCK_V lanes (8 warps), read once per pass. Tests set MAX_BLOCK_V
# small (tests/conftest.py `block_columns`) to run short rows through the passes; the streaming block is then
# MAX_BLOCK_V too. Warps (`row_warps`): 8 lanes per thread for each per-lane value, at least 4 warps.
#
# MAX_BLOCK_V is the longest one block that compiles without register spills for sm_90 (H100/H200) in every
# kernel and dtype. Measured 2026-11-30 with the static compile (fastkd.triton.static's stand-in driver, Triton
# 3.8's ptxas, no GPU): the launchers called under `static._stand_in("9.0", ...)` with MAX_BLOCK_V and the warps
# set per row, V = the block, for fp32, bf16 and fp16 and four flag sets each: labels + CE (kl), both input
# gradients + d_T with a per-row temperature (the most registers), the student's gradient + d_T, the student's
# gradient, no gradient. Registers per thread, the most over dtypes and flag sets; spills = the most stack +
# local bytes (0: none in any dtype or flag set):
#     block  warps   kl_rows           jsd_rows          dkd_rows
#     2048     8      80                128               90
#     4096     8     164, spills 8     255, spills 32    141, spills 8
#     4096    16      95                128               86        <- MAX_BLOCK_V
#     8192    16     128               128, spills 264   128
#     8192    32      64                64, spills 160    64, spills 8
#    16384    32      64, spills 384    64, spills 672    64, spills 352   (fp32, bf16; fp16 not run)
# A thread may hold 65536 / (32 x warps) registers (128 at 16 warps, 64 at 32), and ptxas spills past that:
# 8 lanes per thread is what jsd holds (128 registers at 2048 / 8 and 4096 / 16 alike), so 4096 over 16 warps
# is the longest row every kernel holds. The table was measured with 1/T_r divided in the kernel and jsd's
# d_T on a, b; the code since forms 1/T_r outside the kernel (`row_temperature`), takes jsd's shifts from
# exp(a), exp(b) and caps 16-warp kernels at 128 registers (`row_maxnreg`): with these, the final static plan
# (V = 1024, 4096 one block; 8192 streaming; with and without d_T; sm_80 and sm_90) compiles every one-block
# case without spills, at most kl 91, jsd 128, dkd 96 registers. The streaming passes (8 warps) are capped at
# 128 registers too, two programs per SM: left to itself ptxas aimed higher (three, 80 registers) and spilled
# 8 bytes in dkd with d_T (fp16 sm_90). jsd's streaming passes need more than 128 (143 measured before the cap,
# 147 with d_T) and are allowed 168, one program per SM; capped at 128 they spilled 8 to 32 bytes (fp16).
# kl and dkd also compile spill-free at 8192 (kl 16 or 32 warps, dkd 16), squeezed to the register cap;
# one limit per kernel (and bench/traffic.py's model of it) is left for a GPU to time.
MAX_BLOCK_V = 4096
STREAM_BLOCK_V = 2048


def block_size(V: int) -> int:
    """The block of a logit row kernel for rows of V: the whole row (`V <= block`: one block) up to
    MAX_BLOCK_V, else the streaming block (`V > block`: the passes)."""
    if V <= MAX_BLOCK_V:
        return triton.next_power_of_2(V)
    return min(STREAM_BLOCK_V, MAX_BLOCK_V)


def row_warps(block: int) -> int:
    """Warps of a logit row kernel: 8 lanes per thread (2048: 8 warps, 4096: 16), at least 4."""
    return max(4, min(16, block // 256))


def row_maxnreg(block: int, wide: bool = False) -> int | None:
    """ptxas' register cap for a logit row kernel. At 16 warps the hardware's own, 65536 / 512 = 128: left to
    itself ptxas aimed at two 512-thread programs per SM, 64 registers, and spilled one register to reach it
    (kl, fp32, both gradients, 4096 lanes, sm_90: 8 bytes of stack). At 8 warps (the streaming passes) 128, two
    programs per SM, or 168 for a kernel that needs more (`wide`: jsd). None below 8 warps, where the
    kernels compile without spills as they are (the measurements above)."""
    warps = row_warps(block)
    if warps == 16:
        return 128
    if warps == 8:
        return 168 if wide else 128
    return None


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


def row_temperature(temperature: float, temperature_rows: torch.Tensor | None, rows: int,
                    like: torch.Tensor) -> tuple[float, torch.Tensor, int]:
    """`(inv_temperature, inv_rows, stride)` for a row kernel: the float's `1 / temperature` when there is no
    per-row temperature (`inv_rows` then a placeholder, never read; stride 0), else a placeholder 1.0 and
    `1 / T_r` per row, float32 `(rows,)`, NaN where T_r is not > 0 or is NaN (so that the row's terms and
    gradients are NaN); the float is then ignored, and may be anything.

    `1 / T_r` is made here, on the device, by PyTorch (no host sync: `temperature_rows` is float32 `(rows,)`,
    any stride, an expanded 0-stride view included): its correctly rounded division, as the float path's
    host `1/T` rounded to float32. In the kernel a correctly rounded `div.rn.f32` compiles to a call to a
    slow-path subroutine whose calling convention spilled 8 bytes (2 registers) to the stack in the long-row
    passes (dkd, sm_90) and in jsd's 4096-lane block (sm_80)."""
    if temperature_rows is None:
        return 1.0 / temperature, like, 0
    if temperature_rows.dim() != 1 or temperature_rows.shape[0] != rows:
        raise ValueError(f"temperature_rows must have shape ({rows},), got {tuple(temperature_rows.shape)}")
    t = temperature_rows.float()
    inv = torch.where(t > 0.0, t.reciprocal(), float("nan"))
    return 1.0, inv, inv.stride(0)


@triton.jit
def row_inv_temperature(inv_t_ptr, row, inv_t_stride):
    """Row r's `1 / T_r` (`row_temperature`: NaN where T_r is not > 0)."""
    return tl.load(inv_t_ptr + row * inv_t_stride)


@triton.jit
def grad_times_shift(g, a):
    """`g * a`, 0 where g is exactly 0 whatever a is (-inf included: an entry with no gradient counts nothing);
    a NaN g passes. The terms of `d_T = -sum_j (GX_j a_j + GY_j b_j)`."""
    return tl.where(g != 0.0, g * a, 0.0)


@triton.jit
def store_row(ptr, row, V, offs, values, mask):
    """`values` into columns `offs` of row `row` of a contiguous `N x V` output (a gradient), in its dtype."""
    tl.store(ptr + row * V + offs, values.to(ptr.dtype.element_ty), mask=mask)


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
