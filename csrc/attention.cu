// Attention transfer: a_bs = (1/C) sum_c f_bcs^p as a float32 (B, H*W) map, and its gradient
// df_bcs = p f_bcs^(p-1) / C * grad_bs broadcast over channels -- the CUDA twins of fastkd/triton/attention.py.
// The map is addressed by its strides (no copy): for channels-last maps the channel is the unit-stride, fast
// dimension of the thread block; otherwise the spatial position is. One pass over the channels per
// (sample, block of positions); float32 arithmetic.
//
// The power, as Triton's `_pow2` (see its module docstring, "Pow"): x^q (q = p forward, q = p - 1 backward) is an
// unnormalised float32 pair (h, l), h + l = x^q to well below an ulp, rounded once (fl(h + l), or h where l is
// NaN): torch.pow's correctly rounded value but in rare near-ties for integer and half-integer q (measured on
// the CPU stand-in: <= 0.99 u, u = 2^-24, and bit for bit the Triton interpreter's results where x^q >= 2^-100),
// a few u for other q (below). torch.pow's
// special values: no abs() for integer q (odd q keeps the sign), NaN for -inf < x < 0 under a non-integer q,
// (-inf)^q = inf^q, 0^q = inf for q < 0, x^0 = 1 (0, inf and NaN too); a non-finite p is a ValueError.
// - Exact product errors: TwoProd, err(a, b, ab) = fmaf(a, b, -ab) (a true fused multiply-add on the GPU). The
//   products whose rounding the pair records are __fmul_rn, which nvcc never contracts into an FMA (a
//   contraction of fl(a b) + c would count err(a b) twice). Pair product (ah, al)(bh, bl) = (h, err(ah bh, h) +
//   (ah bl + al bh)), h = ah bh.
// - Integer |q| = N (the kernel argument npow, up to 2^62): binary exponentiation in pairs, b = (x, 0) squared
//   for every bit of N after the lowest, multiplied into the result for every set bit (the lowest set bit
//   initialises it); x^0 = (1, 0). Cost: floor(log2 N) + popcount(N) - 1 pair products, no exp/log. The
//   division, reciprocal and square roots are __fdiv_rn, __frcp_rn, __fsqrt_rn: --use_fast_math would make
//   '/' and sqrtf approximate.
// - |q| = N + 1/2 (FRAC 1): z = |x|^(1/2) = (s, ((|x| - s s) - err(s s)) / (2 s)), s = __fsqrt_rn (correction 0
//   at s = 0, inf), times |x|^N as a pair; for |q| = 1/2 s = sqrt_rn(x), so sqrt(-0) = -0, sqrt(-inf) = NaN.
// - Other fractions (FRAC 2), |q| = N + fr: z = (|x|^fr, 0) with |x| = m 2^e (m in [sqrt(1/2), sqrt(2)) from the
//   bits), t = fr_hi e (exact), k = floor(t + 0.5), r = (t - k) + (fr_lo e + fr log2(m)) (|r| <= 0.76),
//   |x|^fr = (exp2(r) 2^k1) 2^k2, k1 = floor(k / 2), k2 = k - k1; fr, fr_hi (fr to a multiple of 2^-15) and
//   fr_lo (frac|q| - fr_hi) are the host's float32 constants of Triton's _pow_args. exp2 and log2 are the
//   hardware approximations, as in Triton's compiled kernel: exp2f is ex2.approx.ftz.f32 (max 2 ulp) with or
//   without fast math, and log2f is lg2.approx.ftz.f32 under --use_fast_math (absolute error <= 2^-22 on
//   [0.5, 2]). A more accurate exp2/log2 in software (polynomials in pairs) would cost ~20-40 more instructions
//   per element for ~2-3 u of the bound; the twin keeps Triton's route, so both share one error bound: ~|r| u
//   from r, <= 2 ulp (<= 4 u) from exp2 and fr ln2 2^-22 (<= 2.8 u) from log2, within the Triton tests' 8 u on
//   the GPU (an estimate from the instructions' documented errors, not measured here), at every magnitude of
//   x and p (exp(p log|x|) errs by ~u |p log x|). The CPU stand-in uses libm's exp2f/log2f: <= 2.3 u measured.
// - q < 0: 1 / (h + l) as the pair (r, r ((1 - h r) - err(h r) - l r)), r = __frcp_rn(h) (correction 0 where r
//   is 0 or inf).
// - Gradient: p (h + l) rounded once, fl(p h + (err(p h) + p l)); 0 for p = 0, as torch (times the incoming
//   gradient, as Triton's kernel).
// --use_fast_math also flushes float32 subnormals to zero (--ftz=true), which the Triton kernel does not: the
// classification (zero, inf, NaN, sign) reads the bits, and a subnormal |x| under a fractional power is taken
// from its integer mantissa (exact), so (1e-40)^0.3 and sqrt(1e-40) keep their values; what remains flushed
// is a subnormal value or result itself (1e-40 to the power 1 in the map, a result below 2^-126, or 1/h for a
// subnormal h = x^|q| in (2^-128, 2^-126)): absolute errors below 2^-126 but the last case, inf for a result
// in (2^126, 2^128). The CPU stand-in does not flush.
// Accuracy below ~2^-100: the pair's low part is subnormal (flushed on the GPU), so the result is about fl(h),
// within a few ulp (or a few 2^-149 for subnormal results); as in Triton.
// Registers (nvcc 13.0, sm_80 and sm_90, -O3 --use_fast_math): 29-40 per thread, no spills, in all 48 kernels.
#include <ATen/Dispatch.h>

#include "common.cuh"

namespace fastkd {
namespace {

constexpr int kThreads = 256;
constexpr int kAbsMask = 0x7fffffff;
constexpr int kInfBits = 0x7f800000;
constexpr int kMinNormalBits = 0x00800000;

// The host's description of x^q (Triton's _pow_args): npow = floor(|q|) (or the next integer where frac|q|
// rounds to 1 in float32; at most 2^62), the fraction frac|q| as fr and fr_hi + fr_lo, recip = q < 0. The
// kind of fraction (0 none, 1 one half, 2 other) is the kernels' template parameter FRAC.
struct Pow {
  unsigned long long npow;
  float fr, fr_hi, fr_lo;
  int recip;
};

struct Pair {
  float h, l;
};

// a b - ab exactly for ab = fl(a b), barring underflow: TwoProd's error term.
__device__ __forceinline__ float prod_err(float a, float b, float ab) { return __fmaf_rn(a, b, -ab); }

// (ah + al)(bh + bl) to ~2u^2 relative (al bl dropped).
__device__ __forceinline__ Pair mul2(Pair a, Pair b) {
  const float h = __fmul_rn(a.h, b.h);
  return {h, prod_err(a.h, b.h, h) + (a.h * b.l + a.l * b.h)};
}

// fl(h + l); h itself where l is NaN (h infinite or NaN, or an overflowed error term).
__device__ __forceinline__ float round_pair(float h, float l) {
  const float y = __fadd_rn(h, l);
  return isnan(y) ? h : y;
}

// x^N as a pair, binary exponentiation low bits first (x^0 = 1, also for 0, inf and NaN). No abs().
__device__ __forceinline__ Pair int_pow2(float x, unsigned long long n) {
  Pair r{1.0f, 0.0f};
  Pair b{x, 0.0f};
  bool first = true;
  while (true) {
    if (n & 1ull) {
      if (first) {  // the lowest set bit: r = b, no product
        r = b;
        first = false;
      } else {
        r = mul2(r, b);
      }
    }
    n >>= 1;
    if (n == 0ull) break;
    b = mul2(b, b);
  }
  return r;
}

// |x|^fr for 0 < fr < 1 from abits, the bits of |x| (>= 0 or NaN): 2^k exp2(r) as above. A subnormal |x| is
// the integer mantissa (converted exactly to a normal float) times 2^-149, read without float arithmetic
// (which --use_fast_math flushes); it gives the m and e of Triton's |x| 2^24 scaling.
__device__ __forceinline__ float frac_pow(int abits, float fr, float fr_hi, float fr_lo) {
  const bool tiny = abits < kMinNormalBits;  // 0 or subnormal
  const int bits = tiny ? __float_as_int(static_cast<float>(abits)) : abits;
  int e = (bits >> 23) - 127 - (tiny ? 149 : 0);
  float m = __int_as_float((bits & 0x7fffff) | 0x3f800000);  // in [1, 2)
  if (m > 1.41421353816986083984375f) {                      // float32(sqrt 2)
    m = m * 0.5f;
    e += 1;
  }
  const float ef = static_cast<float>(e);
  const float t = fr_hi * ef;  // exact: 15 bits times 9
  const float k = floorf(t + 0.5f);
  const float r = (t - k) + (fr_lo * ef + fr * __log2f(m));
  const int ki = static_cast<int>(k);
  const int k1 = ki >> 1, k2 = ki - k1;
  const float y = (exp2f(r) * __int_as_float((k1 + 127) << 23)) * __int_as_float((k2 + 127) << 23);
  const bool special = abits == 0 || abits >= kInfBits;  // 0^fr = 0, inf^fr = inf, NaN stays
  return special ? __int_as_float(abits) : y;
}

// x^q as torch.pow, as a pair (Triton's _pow2).
template <int FRAC>
__device__ __forceinline__ Pair pow2(float x, const Pow& q) {
  Pair v;
  const int bits = __float_as_int(x);
  const int abits = bits & kAbsMask;
  if constexpr (FRAC == 0) {
    v = int_pow2(x, q.npow);
  } else {
    const float ax = __int_as_float(abits);
    Pair z;
    if constexpr (FRAC == 1) {
      // sqrt(|x|) = s + (|x| - s^2) / (2 s). A subnormal |x| = (2 mant) 2^-150, its root sqrt(2 mant) 2^-75,
      // computed on the exact normal float 2 mant and scaled back exactly.
      const bool sub = abits != 0 && abits < kMinNormalBits;
      const float rad = sub ? static_cast<float>(2 * abits) : ax;
      const float s = __fsqrt_rn(sub ? rad : (q.npow == 0ull ? x : ax));  // |q| = 1/2: sqrt(-0) = -0, sqrt(-inf) NaN
      const float sq = __fmul_rn(s, s);
      const float res = (rad - sq) - prod_err(s, s, sq);
      float sl = (s > 0.0f && s < __int_as_float(kInfBits)) ? __fdiv_rn(res, 2.0f * s) : 0.0f;
      const float scale = sub ? 2.6469779601696886e-23f : 1.0f;  // 2^-75
      z = {s * scale, sl * scale};
    } else {
      z = {frac_pow(abits, q.fr, q.fr_hi, q.fr_lo), 0.0f};
    }
    v = q.npow == 0ull ? z : mul2(int_pow2(ax, q.npow), z);
    if (bits < 0 && abits != 0 && abits < kInfBits) v.h = __int_as_float(0x7fc00000);  // -inf < x < 0: NaN
  }
  if (q.recip) {  // 1 / (h + l) = r + r (1 - h r - l r), 1 - h r exact but for one rounding
    const float r = __frcp_rn(v.h);
    const float hr = __fmul_rn(v.h, r);
    const float e = ((1.0f - hr) - prod_err(v.h, r, hr)) - v.l * r;
    v.l = (r != 0.0f && fabsf(r) < __int_as_float(kInfBits)) ? e * r : 0.0f;
    v.h = r;
  }
  return v;
}

// x^p rounded once from the pair.
template <int FRAC>
__device__ __forceinline__ float pow_value(float x, const Pow& q) {
  const Pair v = pow2<FRAC>(x, q);
  return round_pair(v.h, v.l);
}

// d(x^p)/dx = p x^(p-1) as torch's pow backward, rounded once from p (h + l); q describes p - 1. 0 for p = 0.
template <int FRAC>
__device__ __forceinline__ float pow_grad(float x, float p, bool zero, const Pow& q) {
  if (zero) return 0.0f;
  const Pair v = pow2<FRAC>(x, q);
  const float ph = __fmul_rn(p, v.h);
  return round_pair(ph, prod_err(v.h, p, ph) + p * v.l);
}

struct Geometry {
  int64_t C, HW, W;
  int64_t s_b, s_c, s_h, s_w;  // strides of f
  int64_t n_sblocks;           // blocks of positions per sample
};

// The thread block is (blockDim.x, blockDim.y) = (positions, channel groups) for !CL and (channel lanes,
// positions) for CL, so that consecutive threads read consecutive addresses in both layouts. The grid is 1-D:
// blockIdx.x = b * n_sblocks + block of positions.
template <bool CL>
struct Lanes {
  int64_t b, s;
  int cg, n_cg;
  __device__ __forceinline__ Lanes(const Geometry& g) {
    const int64_t blk = blockIdx.x;
    b = blk / g.n_sblocks;
    const int64_t sb = blk - b * g.n_sblocks;
    if constexpr (CL) {
      s = sb * blockDim.y + threadIdx.y;
      cg = threadIdx.x;
      n_cg = blockDim.x;
    } else {
      s = sb * blockDim.x + threadIdx.x;
      cg = threadIdx.y;
      n_cg = blockDim.y;
    }
  }
};

template <typename scalar_t, int FRAC, bool CL>
__global__ void __launch_bounds__(kThreads) map_forward_kernel(const scalar_t* __restrict__ f, float* __restrict__ a,
                                                               Geometry g, float inv_c, Pow q) {
  __shared__ float partial[kThreads];
  const Lanes<CL> l(g);
  const bool valid = l.s < g.HW;
  float acc = 0.0f;
  if (valid) {
    const int64_t h = l.s / g.W, w = l.s - h * g.W;
    const scalar_t* base = f + l.b * g.s_b + h * g.s_h + w * g.s_w;
#pragma unroll 4
    for (int64_t c = l.cg; c < g.C; c += l.n_cg) {
      acc += pow_value<FRAC>(static_cast<float>(base[c * g.s_c]), q);
    }
  }
  if constexpr (CL) {
    // The channel lanes of a position are blockDim.x (a power of 2, at most 32) consecutive lanes of a warp.
    for (int offset = static_cast<int>(blockDim.x) / 2; offset > 0; offset >>= 1) {
      acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    }
    if (valid && l.cg == 0) a[l.b * g.HW + l.s] = acc * inv_c;
  } else {
    partial[threadIdx.y * blockDim.x + threadIdx.x] = acc;
    __syncthreads();
    if (valid && threadIdx.y == 0) {
      float total = 0.0f;
      for (int y = 0; y < static_cast<int>(blockDim.y); ++y) total += partial[y * blockDim.x + threadIdx.x];
      a[l.b * g.HW + l.s] = total * inv_c;
    }
  }
}

template <typename scalar_t, int FRAC, bool CL>
__global__ void __launch_bounds__(kThreads) map_backward_kernel(const scalar_t* __restrict__ f,
                                                                const float* __restrict__ grad,
                                                                scalar_t* __restrict__ df, Geometry g, int64_t d_b,
                                                                int64_t d_c, int64_t d_h, int64_t d_w, float inv_c,
                                                                float p, int zero, Pow q) {
  const Lanes<CL> l(g);
  if (l.s >= g.HW) return;
  const int64_t h = l.s / g.W, w = l.s - h * g.W;
  const scalar_t* base = f + l.b * g.s_b + h * g.s_h + w * g.s_w;
  scalar_t* dbase = df + l.b * d_b + h * d_h + w * d_w;
  const float gs = grad[l.b * g.HW + l.s] * inv_c;
#pragma unroll 4
  for (int64_t c = l.cg; c < g.C; c += l.n_cg) {
    const float x = static_cast<float>(base[c * g.s_c]);
    dbase[c * d_c] = static_cast<scalar_t>(pow_grad<FRAC>(x, p, zero != 0, q) * gs);
  }
}

// --- host ----------------------------------------------------------------------------------------------------

// x^q as Triton's _pow_args: the kind of fraction (returned: 0 integer, 1 one half, 2 other) and the constants.
int pow_args(double q, Pow* out) {
  TORCH_CHECK_VALUE(std::isfinite(q), "attention transfer needs a finite power p, got ", q);
  const double a = std::fabs(q);
  double n = std::floor(a);
  float fr = static_cast<float>(a - n);  // a - n is exact in double
  if (fr == 1.0f) {                      // frac|q| rounds up to 1 in float32: |q| within 2^-25 of n + 1
    n += 1.0;
    fr = 0.0f;
  }
  constexpr double kMaxNpow = 4611686018427387904.0;  // 2^62: x^(2^62) over/underflows as x^q for |q| >= 2^53
  n = std::min(n, kMaxNpow);
  constexpr double kQuantum = 1.0 / 32768.0;  // fr_hi: fr to a multiple of 2^-15
  const double hi = std::floor(static_cast<double>(fr) / kQuantum + 0.5) * kQuantum;
  out->npow = static_cast<unsigned long long>(n);
  out->fr = fr;
  out->fr_hi = static_cast<float>(hi);
  out->fr_lo = static_cast<float>((a - n) - hi);  // |fr_lo| <= 2^-16: fr_hi + fr_lo = frac|q| to 2^-40
  out->recip = q < 0.0 ? 1 : 0;
  return fr == 0.0f ? 0 : (fr == 0.5f ? 1 : 2);
}

// As Triton's _channels_last: the channel stride is the unit one and the spatial one is not.
bool channels_last(const at::Tensor& f) {
  return f.stride(1) == 1 && f.size(1) > 1 && !(f.stride(3) == 1 && f.size(3) > 1);
}

int64_t next_pow2(int64_t v) {
  int64_t r = 1;
  while (r < v) r <<= 1;
  return r;
}

// Block shape (x, y) with x * y = kThreads; see Lanes.
dim3 block_shape(int64_t C, int64_t HW, bool cl) {
  if (cl) {
    const int64_t lanes = std::min<int64_t>(next_pow2(C), 32);  // channel lanes, a power of 2 within one warp
    return dim3(static_cast<unsigned>(lanes), static_cast<unsigned>(kThreads / lanes));
  }
  const int64_t positions = std::min<int64_t>(next_pow2(HW), 64);
  return dim3(static_cast<unsigned>(positions), static_cast<unsigned>(kThreads / positions));
}

Geometry geometry(const at::Tensor& f, const dim3& block, bool cl) {
  Geometry g;
  g.C = f.size(1);
  g.HW = f.size(2) * f.size(3);
  g.W = f.size(3);
  g.s_b = f.stride(0);
  g.s_c = f.stride(1);
  g.s_h = f.stride(2);
  g.s_w = f.stride(3);
  g.n_sblocks = cdiv(g.HW, cl ? block.y : block.x);
  return g;
}

// A map f (B, C, H, W) of any floating-point dtype the kernels can read. Returns f.
const at::Tensor& check_map(const char* op, const at::Tensor& f) {
  TORCH_CHECK(on_device(f), op, ": f must be a CUDA tensor");
  TORCH_CHECK(f.dim() == 4, op, ": f must be (B, C, H, W), got ", f.sizes());
  TORCH_CHECK(kernel_dtype(f.scalar_type()) || f.scalar_type() == at::kDouble, op,
              ": f must be a floating-point tensor, got ", f.scalar_type());
  return f;
}

// Calls f.template operator()<FRAC>() with the kind of fraction of pow_args.
template <typename F>
void dispatch_frac(int frac, F&& f) {
  switch (frac) {
    case 0:
      f.template operator()<0>();
      break;
    case 1:
      f.template operator()<1>();
      break;
    default:
      f.template operator()<2>();
  }
}

// A call of an attention-map operator on f, checked: the power its kernels raise f to (`power`: p forward,
// p - 1 backward), their block over channels and positions, and their grid of B * n_sblocks blocks.
struct MapLaunch : Launch {
  at::ScalarType dtype;
  Pow q;
  int frac;
  bool cl;
  dim3 block;
  Geometry g;
  int64_t B;
  float inv_c;

  MapLaunch(const char* op_name, const at::Tensor& f, double power)
      : Launch(op_name, check_map(op_name, f)),
        dtype(f.scalar_type()),
        frac(pow_args(power, &q)),  // first: a non-finite p is an error for any map, as Triton's
        cl(channels_last(f)),
        block(block_shape(f.size(1), f.size(2) * f.size(3), cl)),
        g(geometry(f, block, cl)),
        B(f.size(0)),
        inv_c(static_cast<float>(1.0 / static_cast<double>(g.C))) {}

  // Calls fn.template operator()<scalar_t, FRAC, CL>() with the kernels' template arguments.
  template <typename F>
  void dispatch(F&& fn) const {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastkd attention map", [&] {
      dispatch_frac(frac, [&]<int FRAC>() {
        dispatch_bool(cl, [&]<bool CL>() { fn.template operator()<scalar_t, FRAC, CL>(); });
      });
    });
  }

  template <typename... P, typename... A>
  void launch(void (*kernel)(P...), A&&... args) const {
    Launch::launch(grid_x(op, B * g.n_sblocks), block, kernel, std::forward<A>(args)...);
  }
};

}  // namespace

// mean_c f^p of a (B, C, H, W) map as a float32 (B, H*W) tensor (Triton's map_forward).
at::Tensor at_channel_mean_pow(const at::Tensor& f, double p) {
  const MapLaunch L("fastkd::cuda_at_channel_mean_pow", f, p);
  at::Tensor a = at::empty({L.B, L.g.HW}, f.options().dtype(at::kFloat));
  if (a.numel() == 0) return a;
  TORCH_CHECK(L.g.C > 0, L.op, ": the mean over channels of a map with no channels");
  L.dispatch([&]<typename scalar_t, int FRAC, bool CL>() {
    L.launch(map_forward_kernel<scalar_t, FRAC, CL>, data_of<scalar_t>(f), mutable_data_of<float>(a), L.g, L.inv_c,
             L.q);
  });
  return a;
}

// p f^(p-1) / C * grad broadcast over channels, in f's dtype and layout (Triton's map_backward).
at::Tensor at_channel_mean_pow_backward(const at::Tensor& grad_in, const at::Tensor& f, double p) {
  // The derivative p f^(p-1): the power q = p - 1 (p finite, checked).
  const MapLaunch L("fastkd::cuda_at_channel_mean_pow_backward", f, p - 1.0);
  check_same_device(L.op, "grad", grad_in, "f", f);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == L.B && grad_in.size(1) == L.g.HW, L.op,
              ": grad must be (B, H*W) = (", L.B, ", ", L.g.HW, "), got ", grad_in.sizes());
  TORCH_CHECK(at::isFloatingType(grad_in.scalar_type()), L.op, ": grad must be floating point, got ",
              grad_in.scalar_type());
  at::Tensor df = at::empty_like(f);
  if (df.numel() == 0) return df;
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous();
  const float pf = static_cast<float>(p);
  const int zero = p == 0.0 ? 1 : 0;
  L.dispatch([&]<typename scalar_t, int FRAC, bool CL>() {
    L.launch(map_backward_kernel<scalar_t, FRAC, CL>, data_of<scalar_t>(f), data_of<float>(grad),
             mutable_data_of<scalar_t>(df), L.g, df.stride(0), df.stride(1), df.stride(2), df.stride(3), L.inv_c, pf,
             zero, L.q);
  });
  return df;
}

}  // namespace fastkd

TORCH_LIBRARY_IMPL(FASTKD_LIBRARY, FASTKD_DISPATCH_KEY, m) {
  m.impl("cuda_at_channel_mean_pow", &fastkd::at_channel_mean_pow);
  m.impl("cuda_at_channel_mean_pow_backward", &fastkd::at_channel_mean_pow_backward);
}
