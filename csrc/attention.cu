// Attention transfer: a_bs = (1/C) sum_c f_bcs^p as a float32 (B, H*W) map, and its gradient
// df_bcs = p f_bcs^(p-1) / C * grad_bs broadcast over channels -- the CUDA twins of fastkd/triton/attention.py.
// The map is addressed by its strides (no copy): for channels-last maps the channel is the unit-stride, fast
// dimension of the thread block; otherwise the spatial position is. One pass over the channels per
// (sample, block of positions); float32 arithmetic; p = 1, 2, 3 are products, any other p is exp(p log|f|)
// with torch.pow's sign rules (odd integer p keeps the sign, non-integer p gives NaN for negative entries).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "device.cuh"

namespace fastkd_attention {

constexpr int kThreads = 256;

// PARITY: 1 odd integer, 2 even integer, 0 not an integer (Triton's _signed_pow).
__device__ __forceinline__ float signed_pow(float x, float q, int parity) {
  float m = __expf(q * __logf(fabsf(x)));
  if (parity == 1) {
    m = x < 0.0f ? -m : m;
  } else if (parity == 0) {
    m = x < 0.0f ? __int_as_float(0x7fc00000) : m;
  }
  return m;
}

// POW 1, 2, 3: products; 0: the general power with PARITY.
template <int POW>
__device__ __forceinline__ float pow_value(float x, float p, int parity) {
  if constexpr (POW == 1) {
    return x;
  } else if constexpr (POW == 2) {
    return x * x;
  } else if constexpr (POW == 3) {
    return x * x * x;
  } else {
    return signed_pow(x, p, parity);
  }
}

// d(x^p)/dx = p x^(p-1), as torch's pow backward; p - 1 has the other parity for integer p.
template <int POW>
__device__ __forceinline__ float pow_grad(float x, float p, int parity) {
  if constexpr (POW == 1) {
    return 1.0f;
  } else if constexpr (POW == 2) {
    return 2.0f * x;
  } else if constexpr (POW == 3) {
    return 3.0f * x * x;
  } else {
    return p * signed_pow(x, p - 1.0f, parity == 1 ? 2 : (parity == 2 ? 1 : 0));
  }
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

template <typename scalar_t, int POW, bool CL>
__global__ void __launch_bounds__(kThreads) map_forward_kernel(const scalar_t* __restrict__ f, float* __restrict__ a,
                                                               Geometry g, float inv_c, float p, int parity) {
  __shared__ float partial[kThreads];
  const Lanes<CL> l(g);
  const bool valid = l.s < g.HW;
  float acc = 0.0f;
  if (valid) {
    const int64_t h = l.s / g.W, w = l.s - h * g.W;
    const scalar_t* base = f + l.b * g.s_b + h * g.s_h + w * g.s_w;
#pragma unroll 4
    for (int64_t c = l.cg; c < g.C; c += l.n_cg) {
      acc += pow_value<POW>(static_cast<float>(base[c * g.s_c]), p, parity);
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

template <typename scalar_t, int POW, bool CL>
__global__ void __launch_bounds__(kThreads) map_backward_kernel(const scalar_t* __restrict__ f,
                                                                const float* __restrict__ grad,
                                                                scalar_t* __restrict__ df, Geometry g, int64_t d_b,
                                                                int64_t d_c, int64_t d_h, int64_t d_w, float inv_c,
                                                                float p, int parity) {
  const Lanes<CL> l(g);
  if (l.s >= g.HW) return;
  const int64_t h = l.s / g.W, w = l.s - h * g.W;
  const scalar_t* base = f + l.b * g.s_b + h * g.s_h + w * g.s_w;
  scalar_t* dbase = df + l.b * d_b + h * d_h + w * d_w;
  const float gs = grad[l.b * g.HW + l.s] * inv_c;
#pragma unroll 4
  for (int64_t c = l.cg; c < g.C; c += l.n_cg) {
    const float x = static_cast<float>(base[c * g.s_c]);
    dbase[c * d_c] = static_cast<scalar_t>(pow_grad<POW>(x, p, parity) * gs);
  }
}

// --- host ----------------------------------------------------------------------------------------------------

// (POW, PARITY) as Triton's _pow_mode: 1, 2, 3 are products; otherwise POW 0 with PARITY 1 (odd integer),
// 2 (even integer) or 0 (not an integer, inf and NaN included: Python's float.is_integer is False for them).
static void pow_mode(double p, int* pow, int* parity) {
  if (p == 1.0 || p == 2.0 || p == 3.0) {
    *pow = static_cast<int>(p);
    *parity = 0;
  } else if (std::isfinite(p) && std::floor(p) == p) {
    *pow = 0;
    *parity = std::fmod(p, 2.0) != 0.0 ? 1 : 2;  // fmod(-3, 2) = -1: odd, as Python's int(p) % 2 == 1
  } else {
    *pow = 0;
    *parity = 0;
  }
}

// As Triton's _channels_last: the channel stride is the unit one and the spatial one is not.
static bool channels_last(const at::Tensor& f) {
  return f.stride(1) == 1 && f.size(1) > 1 && !(f.stride(3) == 1 && f.size(3) > 1);
}

static int64_t next_pow2(int64_t v) {
  int64_t r = 1;
  while (r < v) r <<= 1;
  return r;
}

// Block shape (x, y) with x * y = kThreads; see Lanes.
static dim3 block_shape(int64_t C, int64_t HW, bool cl) {
  if (cl) {
    const int64_t lanes = std::min<int64_t>(next_pow2(C), 32);  // channel lanes, a power of 2 within one warp
    return dim3(static_cast<unsigned>(lanes), static_cast<unsigned>(kThreads / lanes));
  }
  const int64_t positions = std::min<int64_t>(next_pow2(HW), 64);
  return dim3(static_cast<unsigned>(positions), static_cast<unsigned>(kThreads / positions));
}

static Geometry geometry(const at::Tensor& f, const dim3& block, bool cl) {
  Geometry g;
  g.C = f.size(1);
  g.HW = f.size(2) * f.size(3);
  g.W = f.size(3);
  g.s_b = f.stride(0);
  g.s_c = f.stride(1);
  g.s_h = f.stride(2);
  g.s_w = f.stride(3);
  const int64_t per_block = cl ? block.y : block.x;
  g.n_sblocks = (g.HW + per_block - 1) / per_block;
  return g;
}

static unsigned grid_size(int64_t B, const Geometry& g, const char* op) {
  const int64_t blocks = B * g.n_sblocks;
  TORCH_CHECK(blocks <= 2147483647LL, op, ": the map is too large for the CUDA kernel's grid");
  return static_cast<unsigned>(blocks);
}

static void check_map(const at::Tensor& f, const char* op) {
  TORCH_CHECK(fastkd::on_device(f), op, ": f must be a CUDA tensor");
  TORCH_CHECK(f.dim() == 4, op, ": f must be (B, C, H, W), got ", f.sizes());
  TORCH_CHECK(f.scalar_type() == at::kFloat || f.scalar_type() == at::kHalf || f.scalar_type() == at::kBFloat16 ||
                  f.scalar_type() == at::kDouble,
              op, ": f must be a floating-point tensor, got ", f.scalar_type());
}

#define FASTKD_AT_POW_CASES(POW_VALUE, ...)        \
  switch (POW_VALUE) {                             \
    case 1: { constexpr int kPow = 1; __VA_ARGS__(); break; } \
    case 2: { constexpr int kPow = 2; __VA_ARGS__(); break; } \
    case 3: { constexpr int kPow = 3; __VA_ARGS__(); break; } \
    default: { constexpr int kPow = 0; __VA_ARGS__(); break; } \
  }

// mean_c f^p of a (B, C, H, W) map as a float32 (B, H*W) tensor (Triton's map_forward).
at::Tensor channel_mean_pow(const at::Tensor& f, double p) {
  check_map(f, "cuda_at_channel_mean_pow");
  const c10::cuda::CUDAGuard guard(f.device());
  const int64_t B = f.size(0), C = f.size(1), HW = f.size(2) * f.size(3);
  at::Tensor a = at::empty({B, HW}, f.options().dtype(at::kFloat));
  if (a.numel() == 0) return a;
  TORCH_CHECK(C > 0, "cuda_at_channel_mean_pow: the mean over channels of a map with no channels");
  const bool cl = channels_last(f);
  const dim3 block = block_shape(C, HW, cl);
  const Geometry g = geometry(f, block, cl);
  const unsigned grid = grid_size(B, g, "cuda_at_channel_mean_pow");
  int pw = 0, parity = 0;
  pow_mode(p, &pw, &parity);
  const float inv_c = static_cast<float>(1.0 / static_cast<double>(C));
  const float pf = static_cast<float>(p);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "cuda_at_channel_mean_pow", [&] {
    const scalar_t* fp = f.data_ptr<scalar_t>();
    float* ap = a.data_ptr<float>();
    FASTKD_AT_POW_CASES(pw, [&] {
      if (cl) {
        FASTKD_LAUNCH(grid, block, 0, stream, map_forward_kernel<scalar_t, kPow, true>)(
            fp, ap, g, inv_c, pf, parity);
      } else {
        FASTKD_LAUNCH(grid, block, 0, stream, map_forward_kernel<scalar_t, kPow, false>)(
            fp, ap, g, inv_c, pf, parity);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return a;
}

// p f^(p-1) / C * grad broadcast over channels, in f's dtype and layout (Triton's map_backward).
at::Tensor channel_mean_pow_backward(const at::Tensor& grad_in, const at::Tensor& f, double p) {
  check_map(f, "cuda_at_channel_mean_pow_backward");
  const int64_t B = f.size(0), C = f.size(1), HW = f.size(2) * f.size(3);
  TORCH_CHECK(fastkd::on_device(grad_in) && grad_in.device() == f.device(),
              "cuda_at_channel_mean_pow_backward: grad must be on f's device (", f.device(), "), got ",
              grad_in.device());
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == B && grad_in.size(1) == HW,
              "cuda_at_channel_mean_pow_backward: grad must be (B, H*W) = (", B, ", ", HW, "), got ",
              grad_in.sizes());
  TORCH_CHECK(at::isFloatingType(grad_in.scalar_type()),
              "cuda_at_channel_mean_pow_backward: grad must be floating point, got ", grad_in.scalar_type());
  const c10::cuda::CUDAGuard guard(f.device());
  at::Tensor df = at::empty_like(f);
  if (df.numel() == 0) return df;
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous();
  const bool cl = channels_last(f);
  const dim3 block = block_shape(C, HW, cl);
  const Geometry g = geometry(f, block, cl);
  const unsigned grid = grid_size(B, g, "cuda_at_channel_mean_pow_backward");
  int pw = 0, parity = 0;
  pow_mode(p, &pw, &parity);
  const float inv_c = static_cast<float>(1.0 / static_cast<double>(C));
  const float pf = static_cast<float>(p);
  const int64_t d_b = df.stride(0), d_c = df.stride(1), d_h = df.stride(2), d_w = df.stride(3);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "cuda_at_channel_mean_pow_backward", [&] {
    const scalar_t* fp = f.data_ptr<scalar_t>();
    const float* gp = grad.data_ptr<float>();
    scalar_t* dp = df.data_ptr<scalar_t>();
    FASTKD_AT_POW_CASES(pw, [&] {
      if (cl) {
        FASTKD_LAUNCH(grid, block, 0, stream, map_backward_kernel<scalar_t, kPow, true>)(
            fp, gp, dp, g, d_b, d_c, d_h, d_w, inv_c, pf, parity);
      } else {
        FASTKD_LAUNCH(grid, block, 0, stream, map_backward_kernel<scalar_t, kPow, false>)(
            fp, gp, dp, g, d_b, d_c, d_h, d_w, inv_c, pf, parity);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return df;
}

#undef FASTKD_AT_POW_CASES

}  // namespace fastkd_attention

TORCH_LIBRARY_IMPL(FASTKD_LIBRARY, FASTKD_DISPATCH_KEY, m) {
  m.impl("cuda_at_channel_mean_pow", &fastkd_attention::channel_mean_pow);
  m.impl("cuda_at_channel_mean_pow_backward", &fastkd_attention::channel_mean_pow_backward);
}
