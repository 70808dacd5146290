// What the CUDA kernels share. For the row kernels (the CUDA counterpart of fastkd/triton/rows.py): addressing
// the rows of `(..., V)` views by strides, row statistics kept apart (the max M and the sum Z = sum exp(x - M),
// never lse = M + log Z), the accurate element-wise helpers of rows.py (`exp_diff`, `expm1_small`,
// `log_ratio`), a row visitor with 16-byte vector loads. For every kernel file: block reductions, and the host
// side of an operator call: checks, grid limits, the launch context (`Launch`; `RowLaunch` and `RowCall` for the
// row operators, with their per-row weights `RowWeights`) and the dispatch of dtypes and flags to template
// arguments.
//
// One thread block per row, one launch per call. The logit kernels take the row maxima first (pass 1: a
// per-thread max, then a block max), then read the row again for the sums against the final maxima (no rescaling,
// so no rescaling error): each thread sums over the columns it visits, and the per-thread sums are added across
// the block (every thread gets them). Pass 1 copies the row pair into shared memory where it fits (`first_pass`),
// and the later passes re-read the copy (`rows_to_read`); a longer row is re-read from global memory. Where a
// gradient is asked for, a last pass reads the row again and writes the gradient, weighted, from those statistics
// (`write_row_gradients`); the backward only scales it (rows.cu). The temperature
// is the float one or a per-row tensor (`RowTemperature`), and where its gradient d_T is asked for (a runtime flag,
// not a template argument: no kernel instance more) the gradient pass also runs without an input gradient, computes
// both sides' gradients and sums -(GX a + GY b) over the row (`temperature_term`, one more block sum).
//
// Precision under nvcc's --use_fast_math (which maps expf/logf/x/y to __expf/__logf/__fdividef and flushes
// subnormals to zero): every rounding that the accuracy analysis of rows.py relies on is made explicit here.
// `exp_accurate` (~2.5 ulp on the whole range, vs __expf's 2 + 1.2|x| ulp), `log_rn` (double log, then
// rounded: correctly rounded but for rare double roundings), log1pf and expm1f (libdevice, <= 1 ulp; not
// affected by --use_fast_math), __fdiv_rn and __fmul_rn (correctly rounded, never contracted into an FMA).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include "device.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

namespace fastkd {

// ------------------------------------------------------------------------------------------------------
// Device helpers
// ------------------------------------------------------------------------------------------------------

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fffffff); }

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);  // round to nearest even for half and bfloat16, as Triton's .to()
}

// exp(x) to ~2.5 ulp over float32's whole range: Cody-Waite reduction x = k ln2 + r (k an integer,
// |r| <= ln2 / 2, r to u |r| through a two-part ln2 and FMAs), then 2^k __expf(r), where __expf's error is
// 2 ulp plus the rounding of r log2(e) (<= 0.5 ulp for |r| <= 0.35). __expf(x) alone rounds x log2(e) first,
// an error of |x| u relative (100 ulp at x = -87). 0 at -inf and below -104 (also the subnormals that
// --use_fast_math flushes on the GPU: x < -87.3 gives 0 there, a subnormal in the stand-in); NaN stays NaN.
__device__ __forceinline__ float exp_accurate(float x) {
  if (!(x > -104.0f)) return x != x ? x : 0.0f;
  if (x > 89.0f) return pos_inf();
  const float k = rintf(__fmul_rn(x, 1.44269504f));
  float r = __fmaf_rn(k, -6.93145752e-1f, x);  // ln2's leading 16 bits: k * hi is exact, and x - k hi too
  r = __fmaf_rn(k, -1.42860677e-6f, r);        // ln2 - hi
  const int ki = static_cast<int>(k);          // in [-150, 129]
  const int k1 = ki / 2;
  const int k2 = ki - k1;  // 2^k1 and 2^k2 are normal floats: one rounding, in the last multiply
  return __expf(r) * __int_as_float((k1 + 127) << 23) * __int_as_float((k2 + 127) << 23);
}

// log(x) of a per-row scalar, in double and rounded to float (correctly rounded but for rare double roundings;
// --use_fast_math does not touch double precision). log(0) = -inf, log of a negative or NaN is NaN.
__device__ __forceinline__ float log_rn(float x) { return static_cast<float>(log(static_cast<double>(x))); }

__host__ __device__ __forceinline__ int64_t cdiv_device(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A row max to subtract: 0 where the row is all -inf, so that `x - m` stays -inf, never NaN (rows.py).
__device__ __forceinline__ float finite_or_zero(float m) { return m == neg_inf() ? 0.0f : m; }

// exp(t) - 1 for |t| <= 1/2: the Taylor series to t^9 in Horner form (rows.py `expm1_small`: truncation
// < 6e-10 relative, a few u of rounding), multiplies and adds only (FMA contraction only helps here).
__device__ __forceinline__ float expm1_small(float t) {
  float r = 1.0f + t * (1.0f / 9.0f);
  r = 1.0f + t * (1.0f / 8.0f) * r;
  r = 1.0f + t * (1.0f / 7.0f) * r;
  r = 1.0f + t * (1.0f / 6.0f) * r;
  r = 1.0f + t * (1.0f / 5.0f) * r;
  r = 1.0f + t * (1.0f / 4.0f) * r;
  r = 1.0f + t * (1.0f / 3.0f) * r;
  r = 1.0f + t * 0.5f * r;
  return t * r;
}

// exp(x) - 1 to a few u relative for every x (rows.py `expm1`): the series where |x| <= 1/2, exp(x) - 1
// elsewhere (no cancellation there); -1 at -inf, NaN at NaN.
__device__ __forceinline__ float expm1_accurate(float x) {
  return fabsf(x) <= 0.5f ? expm1_small(x) : exp_accurate(x) - 1.0f;
}

// `exp(a) - exp(b)` given ea = exp(a), eb = exp(b), to a few u relative (rows.py `exp_diff`):
// eb expm1(a - b) where |a - b| <= 1/2, ea - eb elsewhere; 0 where both are -inf (a - b is NaN there).
__device__ __forceinline__ float exp_diff(float a, float b, float ea, float eb) {
  const float t = a - b;
  return fabsf(t) <= 0.5f ? eb * expm1_small(t) : ea - eb;
}

// log(z_num / z_den) from the two sums and their accurately summed difference d = z_num - z_den (rows.py
// `log_ratio`): log1p(d / z_den) when |d| <= z_den / 2 (an absolute error of a few u |d| / z_den: log1pf is
// 1 ulp, the division correctly rounded), the correctly rounded log of the ratio elsewhere.
__device__ __forceinline__ float log_ratio(float z_num, float z_den, float d) {
  return fabsf(d) <= 0.5f * z_den ? log1pf(__fdiv_rn(d, z_den)) : log_rn(__fdiv_rn(z_num, z_den));
}

struct MixtureLogRatios {
  float lp_m, lq_m;  // log p - log m, log q - log m; each meaningful only where its own probability is > 0
};

// jsd.py `mixture_log_ratios`: from a = x - M_x, b = y - M_y and L = log(Z_y / Z_x), with m = beta p + (1 - beta) q
// and delta = (b - a) - L = log p - log q: l_hi = log hi - log m = -log1p(w_lo expm1(-|delta|)) for the larger hi of
// p, q and the weight w_lo of the smaller (reference.logits.log_mixture without rounding log m itself). Used by
// jsd.cu and vocab_parallel.cu (which passes log q, log p and L = 0).
__device__ __forceinline__ MixtureLogRatios mixture_log_ratios(float a, float b, float l_yx, float beta,
                                                               float one_minus_beta) {
  const float delta = (b - a) - l_yx;
  const bool p_hi = delta >= 0.0f;
  const float t = p_hi ? -delta : delta;
  // log1pf: 1 ulp (libdevice, not affected by --use_fast_math); expm1_accurate: a few u relative.
  const float l_hi = -log1pf((p_hi ? one_minus_beta : beta) * expm1_accurate(t));
  return MixtureLogRatios{p_hi ? l_hi : l_hi + delta, p_hi ? l_hi - delta : l_hi};
}

// e / z for a per-element e in [0, 1] and a row sum z >= 1 (or 0, NaN), given the row's rz = __frcp_rn(z): RN(e / z),
// the same float as __fdiv_rn(e, z) (Markstein: q0 = RN(e rz) is faithful, the remainder e - z q0 is exact in one
// FMA, and RN(q0 + rem rz) is the correctly rounded quotient), but for quotients below ~2^-100 (the remainder
// underflows: a faithful one there); NaN where z is 0 or NaN. Multiplies and FMAs only: no slow-path call per
// element, whose saved registers gave some kernels a stack frame.
__device__ __forceinline__ float div_by_row(float e, float z, float rz) {
  const float q0 = __fmul_rn(e, rz);
  return __fmaf_rn(__fmaf_rn(-z, q0, e), rz, q0);
}

// The elements of a row divided by the temperature, x = X * (1/T) rounded once (as Triton's `x * inv_t`):
// __fmul_rn is never contracted with the `- M` that follows, so `x - M` is the same in every pass and kernel.
__device__ __forceinline__ float scaled(float raw, float inv_temperature) { return __fmul_rn(raw, inv_temperature); }

// N floats reduced together across a block.
template <int N>
struct Floats {
  float v[N];
};

template <int N>
__device__ __forceinline__ Floats<N> shfl_xor(const Floats<N>& s, int offset) {
  Floats<N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = __shfl_xor_sync(0xffffffffu, s.v[i], offset);
  return r;
}

// Combines every thread's state with `op` (associative and commutative up to rounding) and returns the
// result to every thread. blockDim.x must be a multiple of 32 and at most 1024. Contains __syncthreads():
// every thread of the block must call it.
template <int N, typename Op>
__device__ __forceinline__ Floats<N> block_reduce(Floats<N> s, Op op) {
  __shared__ Floats<N> shared[32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) s = op(s, shfl_xor(s, offset));
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  if (lane == 0) shared[warp] = s;
  __syncthreads();
  if (warp == 0) {
    // Lanes beyond the warp count start from warp 0's state: combining a state with itself is not neutral,
    // so they are dropped by folding only over the real ones (the shuffle below reads them, the select
    // discards them).
    Floats<N> t = shared[lane < warps ? lane : 0];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      Floats<N> other = shfl_xor(t, offset);
      const int src = lane ^ offset;
      if (src < warps && lane < warps) t = op(t, other);
    }
    if (lane == 0) shared[0] = t;
  }
  __syncthreads();
  Floats<N> result = shared[0];
  __syncthreads();  // the buffer may be reused by the next call
  return result;
}

// r.v[i] = op(a.v[i], b.v[i]).
template <int N, typename Op>
__device__ __forceinline__ Floats<N> elementwise(const Floats<N>& a, const Floats<N>& b, Op op) {
  Floats<N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = op(a.v[i], b.v[i]);
  return r;
}

// Sums of N floats across a block.
template <int N>
__device__ __forceinline__ Floats<N> block_sum(Floats<N> s) {
  return block_reduce<N>(s, [](const Floats<N>& a, const Floats<N>& b) {
    return elementwise(a, b, [](float x, float y) { return x + y; });
  });
}

// Maxima of N floats across a block (fmaxf: a NaN element is dropped here, and reaches the sums instead).
template <int N>
__device__ __forceinline__ Floats<N> block_max(Floats<N> s) {
  return block_reduce<N>(s, [](const Floats<N>& a, const Floats<N>& b) {
    return elementwise(a, b, [](float x, float y) { return fmaxf(x, y); });
  });
}

// The sum of one float over a block of THREADS threads, in thread 0 only (0 in the others): the warps' sums by
// shuffles, then thread 0 adds them in warp order. One barrier and no broadcast, for a result that one thread
// writes; not block_sum's order of additions. `warp_sums`: THREADS / 32 floats of shared memory.
template <int THREADS>
__device__ __forceinline__ float block_sum_to_thread0(float v, float* warp_sums) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  float total = 0.0f;
  if (threadIdx.x == 0) {
    for (int w = 0; w < THREADS / 32; ++w) total += warp_sums[w];
  }
  return total;
}

// Row r of a `(..., V)` view starts at (r / inner_size) * outer + (r % inner_size) * inner (rows.py).
struct RowLayout {
  int64_t outer;
  int64_t inner;
  int64_t col;
  int64_t inner_size;
};

__device__ __forceinline__ int64_t row_offset(int64_t row, const RowLayout& layout) {
  const int64_t outer = row / layout.inner_size;
  return outer * layout.outer + (row - outer * layout.inner_size) * layout.inner;
}

template <typename T, int K>
struct alignas(sizeof(T) * K) Chunk {
  T v[K];
};

// The 8- or 16-byte register type moving one Chunk in one vector load or store.
template <int BYTES>
struct RawVec;
template <>
struct RawVec<8> {
  using type = uint2;
};
template <>
struct RawVec<16> {
  using type = uint4;
};

template <typename T, int K>
__device__ __forceinline__ Chunk<T, K> load_chunk(const T* p) {
  using Raw = typename RawVec<sizeof(Chunk<T, K>)>::type;
  const Raw raw = *reinterpret_cast<const Raw*>(p);
  Chunk<T, K> c;
  memcpy(&c, &raw, sizeof(Raw));
  return c;
}

template <typename T, int K>
__device__ __forceinline__ void store_chunk(T* p, const Chunk<T, K>& c) {
  using Raw = typename RawVec<sizeof(Chunk<T, K>)>::type;
  Raw raw;
  memcpy(&raw, &c, sizeof(Raw));
  __stwb(reinterpret_cast<Raw*>(p), raw);  // one vector store (a plain assignment was split by the compiler)
}

// The same into shared memory (a generic pointer to it): a plain vector store (__stwb is a global-memory store).
template <typename T, int K>
__device__ __forceinline__ void store_chunk_shared(T* p, const Chunk<T, K>& c) {
  using Raw = typename RawVec<sizeof(Chunk<T, K>)>::type;
  Raw raw;
  memcpy(&raw, &c, sizeof(Raw));
  *reinterpret_cast<Raw*>(p) = raw;
}

template <typename T, int K>
__device__ __forceinline__ int phase(const T* p) {
  return static_cast<int>((reinterpret_cast<uintptr_t>(p) / sizeof(T)) % K);
}

template <size_t A, size_t B>
struct MaxSize {
  static constexpr size_t value = A > B ? A : B;
};

// How visit_row and visit_one_row split columns [0, n): with `vector` (every pointer contiguous and at the same
// element phase `ph` modulo K), a scalar head up to the first K-aligned column, `chunks` vector chunks of K
// columns, and a scalar tail; without it, `scalars` = n scalar columns.
template <int K>
struct RowSpan {
  int64_t head = 0;
  int64_t chunks = 0;
  int64_t body_end = 0;
  int64_t scalars = 0;
  __device__ __forceinline__ RowSpan(bool vector, int ph, int64_t n) {
    if (vector) {
      head = (K - ph) % K;
      if (head > n) head = n;
      chunks = (n - head) / K;
    }
    body_end = head + chunks * K;
    scalars = head + (n - body_end);
  }
  // The column of scalar visit i < scalars: the head's, then the tail's.
  __device__ __forceinline__ int64_t scalar_col(int64_t i) const { return i < head ? i : body_end + (i - head); }
};

// Visits columns [0, n) of a row pair, each exactly once, spread over the block's threads:
// `f(col, x, y, out_a, out_b)` gets the two elements as floats and, for each output that is written (WA, WB:
// contiguous rows `a`, `b`), sets the value stored at `a[col]`, `b[col]`.
// Vector path: when every pointer has column stride 1 and all of them sit at the same element phase modulo
// K (K elements of the widest type make 16 bytes), a scalar head brings them to a K-aligned column, the body
// moves K elements per pointer with one vector load or store (16 bytes for the widest type, 8 for a
// narrower one), and a scalar tail finishes. Otherwise every element is a scalar, strided access.
// TO_SHARED: the outputs are in shared memory (the vector stores are plain ones there).
template <bool WA, bool WB, bool TO_SHARED = false, typename TX, typename TY, typename TA, typename TB, typename F>
__device__ __forceinline__ void visit_row(const TX* __restrict__ x, int64_t x_col, const TY* __restrict__ y,
                                          int64_t y_col, TA* __restrict__ a, TB* __restrict__ b, int64_t n,
                                          F&& f) {
  constexpr size_t kWidest = MaxSize<MaxSize<sizeof(TX), sizeof(TY)>::value,
                                     MaxSize<WA ? sizeof(TA) : 1, WB ? sizeof(TB) : 1>::value>::value;
  constexpr int K = static_cast<int>(16 / kWidest);
  const int ph = phase<TX, K>(x);
  const RowSpan<K> span(x_col == 1 && y_col == 1 && phase<TY, K>(y) == ph && (!WA || phase<TA, K>(a) == ph) &&
                            (!WB || phase<TB, K>(b) == ph),
                        ph, n);
  for (int64_t i = threadIdx.x; i < span.scalars; i += blockDim.x) {
    const int64_t c = span.scalar_col(i);
    float out_a = 0.0f, out_b = 0.0f;
    f(c, to_float(x[c * x_col]), to_float(y[c * y_col]), out_a, out_b);
    if (WA) a[c] = from_float<TA>(out_a);
    if (WB) b[c] = from_float<TB>(out_b);
  }
  for (int64_t i = threadIdx.x; i < span.chunks; i += blockDim.x) {
    const int64_t c0 = span.head + i * K;
    const Chunk<TX, K> cx = load_chunk<TX, K>(x + c0);
    const Chunk<TY, K> cy = load_chunk<TY, K>(y + c0);
    Chunk<TA, K> ca;
    Chunk<TB, K> cb;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      float out_a = 0.0f, out_b = 0.0f;
      f(c0 + k, to_float(cx.v[k]), to_float(cy.v[k]), out_a, out_b);
      if (WA) ca.v[k] = from_float<TA>(out_a);
      if (WB) cb.v[k] = from_float<TB>(out_b);
    }
    if constexpr (WA) {
      if constexpr (TO_SHARED) store_chunk_shared<TA, K>(a + c0, ca); else store_chunk<TA, K>(a + c0, ca);
    }
    if constexpr (WB) {
      if constexpr (TO_SHARED) store_chunk_shared<TB, K>(b + c0, cb); else store_chunk<TB, K>(b + c0, cb);
    }
  }
}

// Reads only (forward passes).
template <typename TX, typename TY, typename F>
__device__ __forceinline__ void visit_row(const TX* __restrict__ x, int64_t x_col, const TY* __restrict__ y,
                                          int64_t y_col, int64_t n, F&& f) {
  visit_row<false, false, false, TX, TY, float, float>(x, x_col, y, y_col, nullptr, nullptr, n, f);
}

// A row pair staged in shared memory: the block's dynamic shared memory holds the row of x, then the row of y,
// each as V + K elements of its type (K = 16 / the wider type's size, the vector width of visit_row) starting K
// elements past the region's 16-byte aligned start, minus the column phase (row * V) % K that a contiguous
// (rows, V) buffer's row r has: so a staged row sits at the phase of its global row (contiguous inputs) and of the
// gradient rows, and every pass over it takes visit_row's vector path with them. The x region is rounded up to 16
// bytes. The same layout on the host (RowLaunch::stage_bytes) and the device (first_pass).
__host__ __device__ __forceinline__ int64_t staged_region_bytes(int64_t V, int64_t size, int64_t k) {
  return (V + k) * size;
}

__host__ __device__ __forceinline__ int64_t staged_bytes(int64_t V, int64_t size_x, int64_t size_y) {
  const int64_t k = 16 / (size_x > size_y ? size_x : size_y);
  return cdiv_device(staged_region_bytes(V, size_x, k), 16) * 16 + staged_region_bytes(V, size_y, k);
}

// The row pair a pass reads: pointers and column strides.
template <typename TX, typename TY>
struct RowPair {
  const TX* x;
  int64_t x_col;
  const TY* y;
  int64_t y_col;
};

// The copies of row `row` (of V columns) in the block's dynamic shared memory, laid out as above.
template <typename TX, typename TY>
__device__ __forceinline__ RowPair<TX, TY> staged_rows(int64_t row, int64_t V) {
  FASTKD_DYNAMIC_SHARED(stage);
  constexpr int64_t K = 16 / MaxSize<sizeof(TX), sizeof(TY)>::value;
  const int64_t shift = (row * V) % K;  // the column phase of the gradient row, and of a contiguous input's
  const int64_t y_start = cdiv_device(staged_region_bytes(V, sizeof(TX), K), 16) * 16;
  return RowPair<TX, TY>{reinterpret_cast<TX*>(stage) + shift, 1, reinterpret_cast<TY*>(stage + y_start) + shift, 1};
}

// Whether the block's rows are staged: the launch gave it dynamic shared memory (RowLaunch::launch: the row pair
// fits) and the row has columns to read (n = 0, an ignored token: nothing is copied).
__device__ __forceinline__ bool rows_staged(int64_t n) { return dynamic_shared_bytes() != 0 && n != 0; }

// Pass 1 of a row kernel: visits columns [0, n) of the row pair (x, x_col), (y, y_col) in global memory once, as
// visit_row, and where the rows are staged (rows_staged) also copies both into shared memory (an exact round trip
// through float: the values, -inf and NaN stay what they were), so that every later pass reads the copy
// (`rows_to_read`) and each logit is read from global memory once. The copies' first reader must come after a
// __syncthreads() (pass 1's block reduction has one).
template <typename TX, typename TY, typename F>
__device__ __forceinline__ void first_pass(const TX* x, int64_t x_col, const TY* y, int64_t y_col, int64_t n,
                                           int64_t row, int64_t V, F&& f) {
  if (!rows_staged(n)) {
    visit_row(x, x_col, y, y_col, n, f);
    return;
  }
  const RowPair<TX, TY> copy = staged_rows<TX, TY>(row, V);
  visit_row</*WA=*/true, /*WB=*/true, /*TO_SHARED=*/true>(
      x, x_col, y, y_col, const_cast<TX*>(copy.x), const_cast<TY*>(copy.y), n,
      [&](int64_t c, float x_raw, float y_raw, float& out_x, float& out_y) {
        f(c, x_raw, y_raw, out_x, out_y);
        out_x = x_raw;
        out_y = y_raw;
      });
}

// The row pair a later pass reads: the shared-memory copies where pass 1 staged them, else the global rows.
// Recomputed at each pass (from the special register of the dynamic shared memory's size, read anew each time)
// rather than kept live across the kernel: the registers it would hold gave some kernels a stack frame.
template <typename TX, typename TY>
__device__ __forceinline__ RowPair<TX, TY> rows_to_read(const TX* x, int64_t x_col, const TY* y, int64_t y_col,
                                                        int64_t n, int64_t row, int64_t V) {
  return rows_staged(n) ? staged_rows<TX, TY>(row, V) : RowPair<TX, TY>{x, x_col, y, y_col};
}

// --- One staged row (kernels with one dense operand: sparse.cu) ---------------------------------------------------
// The single-row counterparts of visit_row / first_pass / rows_to_read above, which they leave unchanged. The copy
// of the row takes V + K elements of T (K = 16 / sizeof(T)) at byte `offset` of the block's dynamic shared memory (a
// multiple of 16: what the kernel keeps before it, e.g. a bitmap), shifted by the phase (row * V) % K as
// staged_rows, so that it shares the phase of the contiguous gradient row. The row is staged where the launch gave
// more dynamic shared memory than `offset` (the host adds the copy only where it fits) and the row has columns.

// visit_row for one operand: `f(col, x, out)`, `out` stored at a[col] where WA (a contiguous row). The same vector
// path (x with column stride 1 and a at the same phase: 16-byte loads, or 8 for a narrower type) and fallbacks.
template <bool WA, bool TO_SHARED = false, typename TX, typename TA, typename F>
__device__ __forceinline__ void visit_one_row(const TX* __restrict__ x, int64_t x_col, TA* __restrict__ a, int64_t n,
                                              F&& f) {
  constexpr size_t kWidest = MaxSize<sizeof(TX), WA ? sizeof(TA) : 1>::value;
  constexpr int K = static_cast<int>(16 / kWidest);
  const int ph = phase<TX, K>(x);
  const RowSpan<K> span(x_col == 1 && (!WA || phase<TA, K>(a) == ph), ph, n);
  for (int64_t i = threadIdx.x; i < span.scalars; i += blockDim.x) {
    const int64_t c = span.scalar_col(i);
    float out = 0.0f;
    f(c, to_float(x[c * x_col]), out);
    if (WA) a[c] = from_float<TA>(out);
  }
  for (int64_t i = threadIdx.x; i < span.chunks; i += blockDim.x) {
    const int64_t c0 = span.head + i * K;
    const Chunk<TX, K> cx = load_chunk<TX, K>(x + c0);
    Chunk<TA, K> ca;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      float out = 0.0f;
      f(c0 + k, to_float(cx.v[k]), out);
      if (WA) ca.v[k] = from_float<TA>(out);
    }
    if constexpr (WA) {
      if constexpr (TO_SHARED) store_chunk_shared<TA, K>(a + c0, ca); else store_chunk<TA, K>(a + c0, ca);
    }
  }
}

__host__ __device__ __forceinline__ int64_t staged_row_bytes(int64_t V, int64_t size) {
  return staged_region_bytes(V, size, 16 / size);
}

// A row a pass reads: pointer and column stride.
template <typename T>
struct OneRow {
  const T* x;
  int64_t col;
};

__device__ __forceinline__ bool row_staged(int64_t n, unsigned offset) { return dynamic_shared_bytes() > offset && n != 0; }

template <typename T>
__device__ __forceinline__ T* staged_row(int64_t row, int64_t V, unsigned offset) {
  FASTKD_DYNAMIC_SHARED(stage);
  constexpr int64_t K = 16 / sizeof(T);
  return reinterpret_cast<T*>(stage + offset) + (row * V) % K;
}

// Pass 1 over one row: visits columns [0, n) of (x, x_col) once (`f(col, x, out)`, `out` unused) and, where the row
// is staged, copies it to shared memory (exactly). The copy's first reader must come after a __syncthreads().
template <typename T, typename F>
__device__ __forceinline__ void first_pass_row(const T* x, int64_t x_col, int64_t n, int64_t row, int64_t V,
                                               unsigned offset, F&& f) {
  if (!row_staged(n, offset)) {
    visit_one_row<false>(x, x_col, static_cast<float*>(nullptr), n, f);
    return;
  }
  visit_one_row</*WA=*/true, /*TO_SHARED=*/true>(x, x_col, staged_row<T>(row, V, offset), n,
                                                 [&](int64_t c, float x_raw, float& out) {
    f(c, x_raw, out);
    out = x_raw;
  });
}

// The row a later pass reads: the copy where pass 1 staged it, else the global row (recomputed per pass, as
// rows_to_read).
template <typename T>
__device__ __forceinline__ OneRow<T> row_to_read(const T* x, int64_t x_col, int64_t n, int64_t row, int64_t V,
                                                 unsigned offset) {
  return row_staged(n, offset) ? OneRow<T>{staged_row<T>(row, V, offset), 1} : OneRow<T>{x, x_col};
}

// Writes zeros over a contiguous row (the gradient of an ignored token).
template <typename T>
__device__ __forceinline__ void zero_row(T* __restrict__ out, int64_t n) {
  for (int64_t c = threadIdx.x; c < n; c += blockDim.x) out[c] = from_float<T>(0.0f);
}

// Pass 1 of a row kernel, one column: the running maxima of x = X * (1/T) and y = Y * (1/T) in m.v[0], m.v[1].
template <int N>
__device__ __forceinline__ void max_scaled(Floats<N>& m, float x_raw, float y_raw, float inv_temperature) {
  m.v[0] = fmaxf(m.v[0], scaled(x_raw, inv_temperature));
  m.v[1] = fmaxf(m.v[1], scaled(y_raw, inv_temperature));
}

// Pass 1 of a row kernel over the whole row pair: the block's maxima of x = X * (1/T) and y = Y * (1/T) (-inf for
// a row of -inf: the caller takes `finite_or_zero`), the pair copied to shared memory where it fits (`first_pass`).
template <typename TX, typename TY>
__device__ __forceinline__ Floats<2> pair_maxima(const TX* x_row, int64_t x_col, const TY* y_row, int64_t y_col,
                                                 int64_t n_cols, int64_t row, int64_t V, float inv_temperature) {
  Floats<2> m;
  m.v[0] = neg_inf();
  m.v[1] = neg_inf();
  first_pass(x_row, x_col, y_row, y_col, n_cols, row, V, [&](int64_t, float x_raw, float y_raw, float&, float&) {
    max_scaled(m, x_raw, y_raw, inv_temperature);
  });
  return block_max<2>(m);
}

// Pass 2 of KL(P || Q) between the softmaxes of a row pair, one column: with the shifted logits a = x - M_x,
// b = y - M_y (P the x row where P_IS_X, else the y row), adds to s = [Z_x, Z_y, E, D, ..., n_inf]: e^a, e^b, the
// P-weighted log-ratio e^p (p - q) (0 where e^p = 0 or q = -inf), exp_diff(p, q); then runs `more` (the
// caller's other sums of the column), then counts in n_inf a term with e^p > 0 against q = -inf (KL = +inf).
template <bool P_IS_X, int N, typename More>
__device__ __forceinline__ void add_kl_terms(Floats<N>& s, float a, float b, More&& more) {
  const float ea = exp_accurate(a);
  const float eb = exp_accurate(b);
  const float p = P_IS_X ? a : b, q = P_IS_X ? b : a;
  const float ep = P_IS_X ? ea : eb, eq = P_IS_X ? eb : ea;
  const bool q_masked = q == neg_inf();
  s.v[0] += ea;
  s.v[1] += eb;
  s.v[2] += (ep > 0.0f && !q_masked) ? ep * (p - q) : 0.0f;
  s.v[3] += exp_diff(p, q, ep, eq);
  more();
  s.v[N - 1] += (ep > 0.0f && q_masked) ? 1.0f : 0.0f;
}

// The per-row weights of a row operator's gradient (float32, any stride: often an expanded 0-stride view of one
// number): weight i of row r is data[i][r * stride[i]], 1 where data[i] is nullptr (not given). Read by a block
// only in its gradient pass (a gradient written, or the temperature's asked for).
struct RowWeights {
  const float* data[2];
  int64_t stride[2];

  __device__ __forceinline__ float at(int i, int64_t row) const {
    return data[i] == nullptr ? 1.0f : data[i][row * stride[i]];
  }
};

// The temperature of a row operator: the float one (`data` nullptr: `inv` = 1/T, rounded once on the host), or
// row r's own T_r = data[r * stride] (float32, any stride: often an expanded 0-stride view), inverted here once
// per row: __frcp_rn(T_r), correctly rounded, so the same float as the host's float(1.0 / T) for a T that is a
// float. A row temperature that is not > 0 (or NaN) gives 1/T = NaN: NaN terms and gradients for the row.
struct RowTemperature {
  const float* data;
  int64_t stride;
  float inv;

  __device__ __forceinline__ float inverse(int64_t row) const {
    if (data == nullptr) return inv;
    const float t = data[row * stride];
    return t > 0.0f ? __frcp_rn(t) : quiet_nan();
  }
};

// One element's part of d_T = -sum_j (GX_j a_j + GY_j b_j) (the row's weighted gradients GX, GY with respect to
// the raw logits, a and b the shifted scaled logits): g a, and 0 where g is exactly 0 (also against a = -inf,
// where the product would be NaN); a NaN g stays NaN.
__device__ __forceinline__ float temperature_term(float g, float a) { return g != 0.0f ? g * a : 0.0f; }

// The gradient pass of a row kernel (after its statistics, which every thread holds): re-reads the row pair
// (mostly from L2: the block has just read it) and writes the contiguous gradient rows dx, dy asked for
// (X_GRAD, Y_GRAD). `f(col, x, y, gx, gy, T_GRAD)` is visit_row's with a last argument, std::bool_constant<T_GRAD>:
// with T_GRAD it computes both sides' gradients (whichever are written) and returns the element's temperature sum
// GX_j a_j + GY_j b_j; without, only the gradients written (its return value unused). The pass runs where a
// gradient is written or the temperature's is asked for (`d_t`, the row's d_T output, non-null: a runtime flag,
// the same for the whole launch, so no kernel instance more; the row loop is compiled twice, with and without
// T_GRAD, so that the loop without it is the one without d_T, registers included); with d_t, thread 0 stores
// d_T = -(block sum) at d_t (one more block reduction), its own sum starting from `t_first` (a term the kernel
// adds once per row). An ignored token (`active` false) reads nothing and gets zero gradients and d_T = 0.
template <bool X_GRAD, bool Y_GRAD, typename TX, typename TY, typename F>
__device__ __forceinline__ void write_row_gradients(const TX* __restrict__ x, int64_t x_col, const TY* __restrict__ y,
                                                    int64_t y_col, TX* __restrict__ dx, TY* __restrict__ dy,
                                                    int64_t V, bool active, float* __restrict__ d_t, float t_first,
                                                    F&& f) {
  if (!X_GRAD && !Y_GRAD && d_t == nullptr) return;
  if (!active) {
    if constexpr (X_GRAD) zero_row(dx, V);
    if constexpr (Y_GRAD) zero_row(dy, V);
    if (d_t != nullptr && threadIdx.x == 0) *d_t = 0.0f;
    return;
  }
  if (d_t == nullptr) {
    if constexpr (X_GRAD || Y_GRAD) {
      visit_row<X_GRAD, Y_GRAD>(x, x_col, y, y_col, dx, dy, V,
                                [&](int64_t c, float x_raw, float y_raw, float& gx, float& gy) {
        f(c, x_raw, y_raw, gx, gy, std::false_type{});
      });
    }
    return;
  }
  float t_sum = threadIdx.x == 0 ? t_first : 0.0f;
  visit_row<X_GRAD, Y_GRAD>(x, x_col, y, y_col, dx, dy, V,
                            [&](int64_t c, float x_raw, float y_raw, float& gx, float& gy) {
    t_sum += f(c, x_raw, y_raw, gx, gy, std::true_type{});
  });
  Floats<1> s;
  s.v[0] = t_sum;
  s = block_sum<1>(s);
  if (threadIdx.x == 0) *d_t = -s.v[0];
}

// ------------------------------------------------------------------------------------------------------
// Host helpers
// ------------------------------------------------------------------------------------------------------

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid extents within CUDA's limits: 2^31 - 1 blocks along x, 65535 along y and z.
inline unsigned grid_x(const char* op, int64_t blocks) {
  TORCH_CHECK(blocks <= INT32_MAX, op, ": too large for one launch: ", blocks, " blocks along x (at most ",
              INT32_MAX, ")");
  return static_cast<unsigned>(blocks);
}

inline unsigned grid_yz(const char* op, int64_t blocks) {
  TORCH_CHECK(blocks <= 65535, op, ": too large for one launch: ", blocks, " blocks along y or z (at most 65535)");
  return static_cast<unsigned>(blocks);
}

// A float32 tensor the kernels can read.
inline void check_float32(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(on_device(t), op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* other_name,
                              const at::Tensor& other) {
  TORCH_CHECK(t.device() == other.device(), op, ": ", name, " is on ", t.device(), ", ", other_name, " on ",
              other.device());
}

template <typename T>
inline const T* data_of(const at::Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}

template <typename T>
inline T* mutable_data_of(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

// An optional input: nullptr when not given (an undefined tensor).
template <typename T>
inline const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? data_of<T>(t) : nullptr;
}

// Calls f.template operator()<B>() with the runtime flag b as a template argument.
template <typename F>
void dispatch_bool(bool b, F&& f) {
  if (b) {
    f.template operator()<true>();
  } else {
    f.template operator()<false>();
  }
}

// Calls f.template operator()<X_GRAD, Y_GRAD>() for the gradients a row kernel writes: the flags are template
// arguments, so each kernel writes what it must without a branch per element (neither: statistics only).
template <typename F>
void dispatch_grads(bool x_grad, bool y_grad, F&& f) {
  if (x_grad && y_grad) {
    f.template operator()<true, true>();
  } else if (x_grad) {
    f.template operator()<true, false>();
  } else if (y_grad) {
    f.template operator()<false, true>();
  } else {
    f.template operator()<false, false>();
  }
}

// Calls f.template operator()<T>() with the kernel type of a float32, float16 or bfloat16 dtype (no double:
// the checks reject it, and every kernel would be instantiated for it).
template <typename F>
void dispatch_kernel_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat:
      f.template operator()<float>();
      break;
    case at::kHalf:
      f.template operator()<at::Half>();
      break;
    case at::kBFloat16:
      f.template operator()<at::BFloat16>();
      break;
    default:
      TORCH_CHECK_TYPE(false, "fastkd: no kernel for ", t);
  }
}

// Calls f.template operator()<TX, TY>() with the kernel types of two operands, which may differ.
template <typename F>
void dispatch_kernel_dtypes(at::ScalarType x, at::ScalarType y, F&& f) {
  dispatch_kernel_dtype(x, [&]<typename TX>() {
    dispatch_kernel_dtype(y, [&]<typename TY>() { f.template operator()<TX, TY>(); });
  });
}

// One operator call: its device guard and stream, and its kernel launches, each checked.
struct Launch {
  const char* op;
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;

  Launch(const char* op_name, const at::Tensor& on) : op(op_name), guard(on.device()),
                                                       stream(at::cuda::getCurrentCUDAStream()) {}

  template <typename... P, typename... A>
  void launch(dim3 grid, dim3 block, void (*kernel)(P...), A&&... args) const {
    launch_with_shared(grid, block, 0, kernel, std::forward<A>(args)...);
  }

  // The same with `shared` bytes of dynamic shared memory per block (within the kernel's limit:
  // dynamic_shared_limit).
  template <typename... P, typename... A>
  void launch_with_shared(dim3 grid, dim3 block, size_t shared, void (*kernel)(P...), A&&... args) const {
    FASTKD_LAUNCH(grid, block, shared, stream, kernel)(std::forward<A>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// The most dynamic shared memory `kernel` can take per block on the current device: the device's opt-in limit less
// the kernel's static shared memory. Asked of the runtime once per kernel and device, when the kernel's limit is also
// raised to it (a launch above 48 KiB needs that); after that, a lookup under a mutex.
inline int64_t dynamic_shared_limit(const void* kernel) {
  static std::mutex mutex;
  static std::vector<std::tuple<int, const void*, int64_t>> known;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  for (const auto& [d, k, limit] : known) {
    if (d == device && k == kernel) return limit;
  }
  cudaFuncAttributes attributes{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  const int64_t limit = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin) -
                        static_cast<int64_t>(attributes.sharedSizeBytes);
  if (limit > 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(limit)));
  }
  known.emplace_back(device, kernel, std::max<int64_t>(limit, 0));
  return std::max<int64_t>(limit, 0);
}

// The cap the environment puts on a staged row pair's bytes: FASTKD_CUDA_STAGE_BYTES (0: never stage; unset: no cap
// but the device's), read at every call, so that a benchmark can compare staging against re-reading at any V.
inline int64_t stage_bytes_cap() {
  const char* value = std::getenv("FASTKD_CUDA_STAGE_BYTES");
  if (value == nullptr || *value == '\0') return INT64_MAX;
  char* end = nullptr;
  const long long cap = std::strtoll(value, &end, 10);
  TORCH_CHECK_VALUE(end != value && *end == '\0' && cap >= 0,
                    "FASTKD_CUDA_STAGE_BYTES must be a number of bytes >= 0 (0: never stage rows), got '", value, "'");
  return cap;
}

// Threads per row block: enough to keep a vocabulary-sized row's loads in flight, few for short rows.
inline int threads_for(int64_t V) {
  if (V <= 1024) return 128;
  if (V <= 8192) return 256;
  return 512;
}
constexpr int kMaxThreads = 512;

inline bool kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Student and teacher logits: CUDA tensors on one device, float32/float16/bfloat16 (each may differ), the
// same shape (..., V) with V > 0. Returns the student.
inline const at::Tensor& check_logits(const char* op, const at::Tensor& student, const at::Tensor& teacher) {
  TORCH_CHECK(on_device(student) && on_device(teacher), op, ": student and teacher must be CUDA tensors");
  TORCH_CHECK(student.device() == teacher.device(), op, ": student and teacher must be on the same device");
  TORCH_CHECK_TYPE(kernel_dtype(student.scalar_type()) && kernel_dtype(teacher.scalar_type()), op,
                   ": logits must be float32, float16 or bfloat16, got ", student.scalar_type(), " and ",
                   teacher.scalar_type());
  TORCH_CHECK(student.dim() >= 1, op, ": logits need a class dimension");
  TORCH_CHECK(student.sizes() == teacher.sizes(), op, ": student and teacher shapes differ: ", student.sizes(),
              " and ", teacher.sizes());
  TORCH_CHECK(student.size(-1) > 0, op, ": the class dimension is empty");
  return student;
}

// The view and layout addressing the rows of `(..., V)` (rows.py `row_layout`): one or two leading dims by
// their strides (`logits[:, :-1]` is not copied), more merged by reshape (a copy only where the strides
// cannot be merged). The returned tensor must outlive the launch.
inline std::pair<at::Tensor, RowLayout> row_layout(const at::Tensor& input) {
  at::Tensor x = input;
  if (x.dim() == 1) x = x.unsqueeze(0);
  if (x.dim() > 3) x = x.reshape({-1, x.size(-2), x.size(-1)});
  if (x.dim() == 2) return {x, RowLayout{0, x.stride(0), x.stride(1), std::max<int64_t>(x.size(0), 1)}};
  return {x, RowLayout{x.stride(0), x.stride(1), x.stride(2), std::max<int64_t>(x.size(1), 1)}};
}

// A call of a row operator over a student's and a teacher's logits (..., V) at a temperature, one block per
// row. The kernels take the two as x and y (`x_student`: the student is x, else the teacher is); `x`, `y` are
// their row views, made only where the call has rows (`idle()` false), and kept alive by the launch context.
struct RowLaunch : Launch {
  int64_t V, rows;
  int threads;
  at::TensorOptions floats;  // float32 on the logits' device
  float inv_temperature;     // 1/T rounded once: the kernels take x = X * (1/T)
  bool x_is_student;
  at::Tensor x, y;
  RowLayout xl{}, yl{};

  RowLaunch(const char* op_name, const at::Tensor& student, const at::Tensor& teacher, double temperature,
            bool x_student)
      : Launch(op_name, check_logits(op_name, student, teacher)),
        V(student.size(-1)),
        rows(student.numel() / V),
        threads(threads_for(V)),
        floats(student.options().dtype(at::kFloat)),
        inv_temperature(static_cast<float>(1.0 / temperature)),
        x_is_student(x_student) {
    grid_x(op, rows);
    if (rows == 0) return;
    std::tie(x, xl) = row_layout(x_is_student ? student : teacher);
    std::tie(y, yl) = row_layout(x_is_student ? teacher : student);
  }

  bool idle() const { return !x.defined(); }

  // Per-row class indices (targets, labels) of any integer dtype as one contiguous int64 vector; O(rows).
  at::Tensor indices(const char* name, const at::Tensor& t) const {
    check_same_device(op, name, t, "the logits", x);
    TORCH_CHECK_TYPE(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), op, ": ", name,
                     " must be an integer tensor, got ", t.scalar_type());
    TORCH_CHECK(t.numel() == rows, op, ": ", name, " must have one entry per row (", rows, "), got ", t.numel());
    return t.reshape({-1}).to(at::kLong).contiguous();
  }

  // The same, or an undefined tensor where not given.
  at::Tensor indices(const char* name, const std::optional<at::Tensor>& t) const {
    return t.has_value() ? indices(name, *t) : at::Tensor();
  }

  // Calls f.template operator()<TX, TY>(x, y) with the operands' kernel types and data.
  template <typename F>
  void dispatch(F&& f) const {
    dispatch_kernel_dtypes(x.scalar_type(), y.scalar_type(), [&]<typename TX, typename TY>() {
      f.template operator()<TX, TY>(data_of<TX>(x), data_of<TY>(y));
    });
  }

  // The dynamic shared memory that stages a row pair (`staged_bytes`), where it fits in what `kernel` can take
  // (dynamic_shared_limit) and in FASTKD_CUDA_STAGE_BYTES; else 0: the kernel re-reads its rows.
  int64_t stage_bytes(const void* kernel) const {
    const int64_t bytes = staged_bytes(V, x.element_size(), y.element_size());
    return bytes <= stage_bytes_cap() && bytes <= dynamic_shared_limit(kernel) ? bytes : 0;
  }

  // One block of `threads` per row, with the row pair staged in shared memory where it fits (first_pass).
  template <typename... P, typename... A>
  void launch(void (*kernel)(P...), A&&... args) const {
    const int64_t shared = stage_bytes(reinterpret_cast<const void*>(kernel));
    Launch::launch_with_shared(static_cast<unsigned>(rows), threads, static_cast<size_t>(shared), kernel,
                               std::forward<A>(args)...);
  }
};

// A call of a row operator that writes the weighted gradient in the same pass: also the input gradients, each in
// its input's shape and dtype (contiguous) where asked for, else empty (0,) (the contract of every row operator,
// as of the Triton launchers), and the kernel's X_GRAD, Y_GRAD; the temperature (`temperature()`: the float, or
// the per-row `temperature_rows`) and d_T, float32 (rows,) where `temperature_grad`, else empty (0,).
struct RowCall : RowLaunch {
  at::Tensor d_student, d_teacher, d_temperature;
  bool x_grad, y_grad, t_grad;

  RowCall(const char* op_name, const at::Tensor& student, const at::Tensor& teacher, double temperature,
          const std::optional<at::Tensor>& temperature_rows, bool x_student, bool student_grad, bool teacher_grad,
          bool temperature_grad)
      : RowLaunch(op_name, student, teacher, temperature, x_student),
        d_student(gradient(student, student_grad)),
        d_teacher(gradient(teacher, teacher_grad)),
        d_temperature(at::empty({temperature_grad ? rows : 0}, floats)),
        x_grad(x_student ? student_grad : teacher_grad),
        y_grad(x_student ? teacher_grad : student_grad),
        t_grad(temperature_grad) {
    temperature_ = RowTemperature{nullptr, 0, inv_temperature};
    if (!temperature_rows.has_value() || idle()) return;
    kept_temperature_ = per_row("temperature_rows", *temperature_rows);
    temperature_.data = data_of<float>(kept_temperature_);
    temperature_.stride = kept_temperature_.stride(0);
  }

  // Whether the kernel runs its gradient pass: a gradient written, or d_T asked for.
  bool grads() const { return x_grad || y_grad || t_grad; }

  // The kernel's temperature: the float one, or row r's `temperature_rows[r]` (float32, any stride; another
  // float dtype converted, the copy kept alive by this context).
  RowTemperature temperature() const { return temperature_; }

  // Where the kernel writes d_T (row r at [r]): nullptr where not asked for (the kernel's runtime flag).
  float* d_temperature_data() const { return t_grad ? mutable_data_of<float>(d_temperature) : nullptr; }

  // The per-row weights of the kernel (float32 (rows,), any stride; other float dtypes converted, the copy kept
  // alive by this context): slot i is nullptr (weight 1) where not given or where the kernel runs no gradient
  // pass (it does not read it then).
  RowWeights weights(const char* name0, const std::optional<at::Tensor>& w0, const char* name1 = nullptr,
                     const std::optional<at::Tensor>& w1 = std::nullopt) const {
    RowWeights w{};
    const char* names[2] = {name0, name1};
    const std::optional<at::Tensor>* given[2] = {&w0, &w1};
    for (int i = 0; i < 2; ++i) {
      const std::optional<at::Tensor>& t = *given[i];
      if (!t.has_value() || !grads() || idle()) continue;
      kept_weights_[i] = per_row(names[i], *t);
      w.data[i] = data_of<float>(kept_weights_[i]);
      w.stride[i] = kept_weights_[i].stride(0);
    }
    return w;
  }

  // Calls f.template operator()<TX, TY, X_GRAD, Y_GRAD>(x, y, dx, dy): the operands' kernel types and data, and
  // the gradients written (nullptr for the others).
  template <typename F>
  void dispatch(F&& f) const {
    RowLaunch::dispatch([&]<typename TX, typename TY>(const TX* x_data, const TY* y_data) {
      dispatch_grads(x_grad, y_grad, [&]<bool X_GRAD, bool Y_GRAD>() {
        TX* dx = X_GRAD ? mutable_data_of<TX>(x_is_student ? d_student : d_teacher) : nullptr;
        TY* dy = Y_GRAD ? mutable_data_of<TY>(x_is_student ? d_teacher : d_student) : nullptr;
        f.template operator()<TX, TY, X_GRAD, Y_GRAD>(x_data, y_data, dx, dy);
      });
    });
  }

 private:
  RowTemperature temperature_{};
  at::Tensor kept_temperature_;
  mutable at::Tensor kept_weights_[2];

  // A per-row float input (weights, temperatures): on the logits' device, shape (rows,), any stride, a float
  // dtype; returned as float32 (converted only where it is not).
  at::Tensor per_row(const char* name, const at::Tensor& t) const {
    check_same_device(op, name, t, "the logits", x);
    TORCH_CHECK(t.dim() == 1 && t.size(0) == rows, op, ": ", name, " must have shape (", rows, "), got ",
                t.sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be float32, got ",
                     t.scalar_type());
    return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
  }

  static at::Tensor gradient(const at::Tensor& input, bool wanted) {
    return wanted ? at::empty(input.sizes(), input.options()) : at::empty({0}, input.options());
  }
};

}  // namespace fastkd
