// RKD (relational KD) kernels: direct squared distances, and the angle term's Huber sum over all B^3 triples
// with its gradient to the student's Gram and squared-distance matrices. CUDA twins of fastkd/triton/rkd.py
// (same formulas, same operand order, same zeros); see that module's docstring for the maths:
//   N_ijk = G_jk - G_ij - G_ik + G_ii,  r_ij = 1 / max(sqrt(Q_ij), 1e-12) (0 where Q_ij <= 0),
//   A_ijk = N_ijk r_ij r_ik,  L = sum_ijk Huber(A^s_ijk - A^t_ijk) (beta 1),
//   c_ijk = clamp(A^s - A^t, -1, 1),  S_ij = r_ij sum_k c_ijk r_ik,  E_ij = -r_ij^2 sum_k c_ijk A^s_ijk
//   (0 where sqrt(Q_ij) <= 1e-12),  U_jk = sum_i c_ijk r_ij r_ik,  dG = U - 2 S + diag(rowsum S).
// The B^3 triples are produced and consumed on chip: a block holds a 32 x 32 tile of two indices (16 x 16
// threads, 2 x 2 pairs each) and loops over the third, staging rows of G and of r = inv_norm(Q) through shared
// memory. Matrices are float32, B x B, read as contiguous (the launchers call .contiguous(), as Triton's do).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "device.cuh"

namespace fastkd_rkd {

constexpr int kTile = 32;     // pairs per tile side
constexpr int kChunk = 32;    // third indices staged in shared memory per step
constexpr int kThreads = 256; // 16 x 16 threads, each 2 x 2 pairs of the 32 x 32 tile
constexpr int kSide = 16;
constexpr int kMinSlice = 8;  // forward: the fewest k per block when the k range is split over blocks

// 1 / max(sqrt(d2), 1e-12); 0 where d2 <= 0 (a zero difference vector, as for i = j) -- Triton's _inv_norm.
// Round-to-nearest sqrt and reciprocal whatever --use_fast_math says.
__device__ __forceinline__ float inv_norm(float d2) {
  const float n = __fsqrt_rn(fmaxf(d2, 0.0f));
  return d2 > 0.0f ? __frcp_rn(fmaxf(n, 1e-12f)) : 0.0f;
}

__device__ __forceinline__ float huber(float d) {
  const float ad = fabsf(d);
  return ad < 1.0f ? 0.5f * d * d : ad - 0.5f;
}

__device__ __forceinline__ float clamp1(float d) { return fminf(fmaxf(d, -1.0f), 1.0f); }

// Sum over the block (kThreads threads); the result is valid in thread 0.
__device__ __forceinline__ float block_sum(float v, float* warp_sums) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  float total = 0.0f;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  }
  return total;
}

// d2_ij = sum_d (x_di - x_dj)^2 directly, x given transposed (D, B). A 64 x 64 tile per block, 4 x 4 per
// thread. Exactly symmetric with an exactly zero diagonal: (i, j) and (j, i) accumulate the same squares
// (x_i - x_j and x_j - x_i differ only in sign) in the same order d = 0, 1, ..., with the same fma.
constexpr int kDistTile = 64;
constexpr int kDistChunk = 16;

__global__ void __launch_bounds__(kThreads) sq_dist_kernel(const float* __restrict__ xt, float* __restrict__ out,
                                                           int64_t B, int64_t D) {
  __shared__ float sx_i[kDistChunk][kDistTile];
  __shared__ float sx_j[kDistChunk][kDistTile];
  const int tid = threadIdx.x, tx = tid % kSide, ty = tid / kSide;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kDistTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kDistTile;
  float acc[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b] = 0.0f;
  for (int64_t d0 = 0; d0 < D; d0 += kDistChunk) {
    for (int e = tid; e < kDistChunk * kDistTile; e += kThreads) {
      const int dd = e / kDistTile, c = e % kDistTile;
      const int64_t d = d0 + dd, i = i0 + c, j = j0 + c;
      sx_i[dd][c] = (d < D && i < B) ? xt[d * B + i] : 0.0f;
      sx_j[dd][c] = (d < D && j < B) ? xt[d * B + j] : 0.0f;
    }
    __syncthreads();
    const int steps = static_cast<int>(std::min<int64_t>(kDistChunk, D - d0));
    for (int dd = 0; dd < steps; ++dd) {
      float xi[4], xj[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) xi[a] = sx_i[dd][ty + kSide * a];
#pragma unroll
      for (int b = 0; b < 4; ++b) xj[b] = sx_j[dd][tx + kSide * b];
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const float diff = xi[a] - xj[b];
          acc[a][b] = __fmaf_rn(diff, diff, acc[a][b]);
        }
    }
    __syncthreads();
  }
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int64_t i = i0 + ty + kSide * a;
    if (i >= B) continue;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int64_t j = j0 + tx + kSide * b;
      if (j < B) out[i * B + j] = acc[a][b];
    }
  }
}

// The per-tile state of a kernel over tiles (i, j) looping over k: G_ij, r_ij, G_ii of both sides (0 past B,
// as Triton's masked loads, which makes every A of those lanes 0).
struct PairTile {
  float gs_ij[2][2], gt_ij[2][2], rs_ij[2][2], rt_ij[2][2], qs_ij[2][2];
  float gs_ii[2], gt_ii[2];
};

__device__ __forceinline__ void load_pair_tile(PairTile& t, const float* __restrict__ gs, const float* __restrict__ qs,
                                               const float* __restrict__ gt, const float* __restrict__ qt, int64_t B,
                                               int64_t i0, int64_t j0, int tx, int ty) {
#pragma unroll
  for (int a = 0; a < 2; ++a) {
    const int64_t i = i0 + ty + kSide * a;
    const bool iv = i < B;
    t.gs_ii[a] = iv ? gs[i * (B + 1)] : 0.0f;
    t.gt_ii[a] = iv ? gt[i * (B + 1)] : 0.0f;
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const int64_t j = j0 + tx + kSide * b;
      const bool v = iv && j < B;
      const int64_t o = i * B + j;
      t.gs_ij[a][b] = v ? gs[o] : 0.0f;
      t.gt_ij[a][b] = v ? gt[o] : 0.0f;
      t.qs_ij[a][b] = v ? qs[o] : 0.0f;
      t.rs_ij[a][b] = inv_norm(t.qs_ij[a][b]);
      t.rt_ij[a][b] = inv_norm(v ? qt[o] : 0.0f);
    }
  }
}

// Shared rows for k in [k0, k0 + kChunk): G[k, i], G[k, j], r[k, i] per side (Triton's _angle_tile loads).
struct RowStage {
  float gs_i[kChunk][kTile], gs_j[kChunk][kTile], rs_i[kChunk][kTile];
  float gt_i[kChunk][kTile], gt_j[kChunk][kTile], rt_i[kChunk][kTile];
};

__device__ __forceinline__ void stage_rows(RowStage& st, const float* __restrict__ gs, const float* __restrict__ qs,
                                           const float* __restrict__ gt, const float* __restrict__ qt, int64_t B,
                                           int64_t i0, int64_t j0, int64_t k0, int64_t k_end) {
  for (int e = threadIdx.x; e < kChunk * kTile; e += kThreads) {
    const int kk = e / kTile, c = e % kTile;
    const int64_t k = k0 + kk, i = i0 + c, j = j0 + c;
    const bool kin = k < k_end;
    const bool vi = kin && i < B, vj = kin && j < B;
    const int64_t oi = k * B + i, oj = k * B + j;
    st.gs_i[kk][c] = vi ? gs[oi] : 0.0f;
    st.rs_i[kk][c] = inv_norm(vi ? qs[oi] : 0.0f);
    st.gt_i[kk][c] = vi ? gt[oi] : 0.0f;
    st.rt_i[kk][c] = inv_norm(vi ? qt[oi] : 0.0f);
    st.gs_j[kk][c] = vj ? gs[oj] : 0.0f;
    st.gt_j[kk][c] = vj ? gt[oj] : 0.0f;
  }
}

// Forward: tile (i, j) = (blockIdx.y, blockIdx.x), k in the block's slice [z k_per, (z + 1) k_per) of [0, B);
// writes the block's sum of Huber terms to partial[(z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x].
__global__ void __launch_bounds__(kThreads) angle_forward_kernel(const float* __restrict__ gs, const float* __restrict__ qs,
                                                                 const float* __restrict__ gt, const float* __restrict__ qt,
                                                                 float* __restrict__ partial, int64_t B, int64_t k_per) {
  __shared__ RowStage st;
  __shared__ float warp_sums[kThreads / 32];
  const int tid = threadIdx.x, tx = tid % kSide, ty = tid / kSide;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * k_per;
  const int64_t k_end = std::min<int64_t>(B, k_begin + k_per);
  PairTile t;
  load_pair_tile(t, gs, qs, gt, qt, B, i0, j0, tx, ty);
  float acc = 0.0f;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kChunk) {
    stage_rows(st, gs, qs, gt, qt, B, i0, j0, k0, k_end);
    __syncthreads();
    const int steps = static_cast<int>(std::min<int64_t>(kChunk, k_end - k0));
    for (int kk = 0; kk < steps; ++kk) {
      float gs_jk[2], gt_jk[2];
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        gs_jk[b] = st.gs_j[kk][tx + kSide * b];
        gt_jk[b] = st.gt_j[kk][tx + kSide * b];
      }
#pragma unroll
      for (int a = 0; a < 2; ++a) {
        const float gs_ik = st.gs_i[kk][ty + kSide * a], rs_ik = st.rs_i[kk][ty + kSide * a];
        const float gt_ik = st.gt_i[kk][ty + kSide * a], rt_ik = st.rt_i[kk][ty + kSide * a];
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          const float a_s = (((gs_jk[b] - t.gs_ij[a][b]) - gs_ik) + t.gs_ii[a]) * t.rs_ij[a][b] * rs_ik;
          const float a_t = (((gt_jk[b] - t.gt_ij[a][b]) - gt_ik) + t.gt_ii[a]) * t.rt_ij[a][b] * rt_ik;
          acc += huber(a_s - a_t);
        }
      }
    }
    __syncthreads();
  }
  const float total = block_sum(acc, warp_sums);
  if (tid == 0) {
    const int64_t slot = (static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    partial[slot] = total;
  }
}

// Backward pass 1, tile (i, j), loop over k: S_ij = r_ij sum_k c r_ik, E_ij = -r_ij^2 sum_k c A^s (0 where
// sqrt(Q_ij) <= 1e-12: F.normalize's clamp, beyond which the norm carries no gradient).
__global__ void __launch_bounds__(kThreads) angle_rows_kernel(const float* __restrict__ gs, const float* __restrict__ qs,
                                                              const float* __restrict__ gt, const float* __restrict__ qt,
                                                              float* __restrict__ s_out, float* __restrict__ e_out,
                                                              int64_t B) {
  __shared__ RowStage st;
  const int tid = threadIdx.x, tx = tid % kSide, ty = tid / kSide;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  PairTile t;
  load_pair_tile(t, gs, qs, gt, qt, B, i0, j0, tx, ty);
  float acc_s[2][2], acc_t[2][2];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b) acc_s[a][b] = acc_t[a][b] = 0.0f;
  for (int64_t k0 = 0; k0 < B; k0 += kChunk) {
    stage_rows(st, gs, qs, gt, qt, B, i0, j0, k0, B);
    __syncthreads();
    const int steps = static_cast<int>(std::min<int64_t>(kChunk, B - k0));
    for (int kk = 0; kk < steps; ++kk) {
      float gs_jk[2], gt_jk[2];
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        gs_jk[b] = st.gs_j[kk][tx + kSide * b];
        gt_jk[b] = st.gt_j[kk][tx + kSide * b];
      }
#pragma unroll
      for (int a = 0; a < 2; ++a) {
        const float gs_ik = st.gs_i[kk][ty + kSide * a], rs_ik = st.rs_i[kk][ty + kSide * a];
        const float gt_ik = st.gt_i[kk][ty + kSide * a], rt_ik = st.rt_i[kk][ty + kSide * a];
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          const float a_s = (((gs_jk[b] - t.gs_ij[a][b]) - gs_ik) + t.gs_ii[a]) * t.rs_ij[a][b] * rs_ik;
          const float a_t = (((gt_jk[b] - t.gt_ij[a][b]) - gt_ik) + t.gt_ii[a]) * t.rt_ij[a][b] * rt_ik;
          const float c = clamp1(a_s - a_t);
          acc_s[a][b] += c * rs_ik;
          acc_t[a][b] += c * a_s;
        }
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int a = 0; a < 2; ++a) {
    const int64_t i = i0 + ty + kSide * a;
    if (i >= B) continue;
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const int64_t j = j0 + tx + kSide * b;
      if (j >= B) continue;
      const float r = t.rs_ij[a][b];
      const bool live = __fsqrt_rn(fmaxf(t.qs_ij[a][b], 0.0f)) > 1e-12f;
      s_out[i * B + j] = acc_s[a][b] * r;
      e_out[i * B + j] = live ? -(r * r) * acc_t[a][b] : 0.0f;
    }
  }
}

// Backward pass 2, tile (j, k) = (blockIdx.y, blockIdx.x), loop over the apex i: U_jk = sum_i c_ijk r_ij r_ik.
// Rows i of G and r are staged: G[i, j], r[i, j], G[i, k], r[i, k] per side, and the diagonals G_ii.
struct ApexStage {
  float gs_j[kChunk][kTile], rs_j[kChunk][kTile], gt_j[kChunk][kTile], rt_j[kChunk][kTile];
  float gs_k[kChunk][kTile], rs_k[kChunk][kTile], gt_k[kChunk][kTile], rt_k[kChunk][kTile];
  float gs_ii[kChunk], gt_ii[kChunk];
};

__global__ void __launch_bounds__(kThreads) angle_cols_kernel(const float* __restrict__ gs, const float* __restrict__ qs,
                                                              const float* __restrict__ gt, const float* __restrict__ qt,
                                                              float* __restrict__ u_out, int64_t B) {
  __shared__ ApexStage st;
  const int tid = threadIdx.x, tx = tid % kSide, ty = tid / kSide;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kTile;
  float s_jk[2][2], t_jk[2][2], acc[2][2];
#pragma unroll
  for (int a = 0; a < 2; ++a) {
    const int64_t j = j0 + ty + kSide * a;
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const int64_t k = k0 + tx + kSide * b;
      const bool v = j < B && k < B;
      s_jk[a][b] = v ? gs[j * B + k] : 0.0f;
      t_jk[a][b] = v ? gt[j * B + k] : 0.0f;
      acc[a][b] = 0.0f;
    }
  }
  for (int64_t i0 = 0; i0 < B; i0 += kChunk) {
    for (int e = tid; e < kChunk * kTile; e += kThreads) {
      const int ii = e / kTile, c = e % kTile;
      const int64_t i = i0 + ii, j = j0 + c, k = k0 + c;
      const bool vj = i < B && j < B, vk = i < B && k < B;
      const int64_t oj = i * B + j, ok = i * B + k;
      st.gs_j[ii][c] = vj ? gs[oj] : 0.0f;
      st.rs_j[ii][c] = inv_norm(vj ? qs[oj] : 0.0f);
      st.gt_j[ii][c] = vj ? gt[oj] : 0.0f;
      st.rt_j[ii][c] = inv_norm(vj ? qt[oj] : 0.0f);
      st.gs_k[ii][c] = vk ? gs[ok] : 0.0f;
      st.rs_k[ii][c] = inv_norm(vk ? qs[ok] : 0.0f);
      st.gt_k[ii][c] = vk ? gt[ok] : 0.0f;
      st.rt_k[ii][c] = inv_norm(vk ? qt[ok] : 0.0f);
    }
    if (tid < kChunk) {
      const int64_t i = i0 + tid;
      st.gs_ii[tid] = i < B ? gs[i * (B + 1)] : 0.0f;
      st.gt_ii[tid] = i < B ? gt[i * (B + 1)] : 0.0f;
    }
    __syncthreads();
    const int steps = static_cast<int>(std::min<int64_t>(kChunk, B - i0));
    for (int ii = 0; ii < steps; ++ii) {
      const float s_ii = st.gs_ii[ii], t_ii = st.gt_ii[ii];
      float gs_ik[2], rs_ik[2], gt_ik[2], rt_ik[2];
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        gs_ik[b] = st.gs_k[ii][tx + kSide * b];
        rs_ik[b] = st.rs_k[ii][tx + kSide * b];
        gt_ik[b] = st.gt_k[ii][tx + kSide * b];
        rt_ik[b] = st.rt_k[ii][tx + kSide * b];
      }
#pragma unroll
      for (int a = 0; a < 2; ++a) {
        const float gs_ij = st.gs_j[ii][ty + kSide * a], rs_ij = st.rs_j[ii][ty + kSide * a];
        const float gt_ij = st.gt_j[ii][ty + kSide * a], rt_ij = st.rt_j[ii][ty + kSide * a];
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          const float p_s = rs_ij * rs_ik[b];
          const float a_s = (((s_jk[a][b] - gs_ij) - gs_ik[b]) + s_ii) * p_s;
          const float a_t = (((t_jk[a][b] - gt_ij) - gt_ik[b]) + t_ii) * (rt_ij * rt_ik[b]);
          const float c = clamp1(a_s - a_t);
          acc[a][b] += c * p_s;
        }
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int a = 0; a < 2; ++a) {
    const int64_t j = j0 + ty + kSide * a;
    if (j >= B) continue;
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const int64_t k = k0 + tx + kSide * b;
      if (k < B) u_out[j * B + k] = acc[a][b];
    }
  }
}

// --- host ----------------------------------------------------------------------------------------------------

static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

static void check_grid(int64_t n, const char* what) {
  TORCH_CHECK(n <= 65535, what, ": the batch is too large for the CUDA kernels' grid (", n, " tiles per side)");
}

static void check_matrices(const at::Tensor& gram_s, const at::Tensor& d2_s, const at::Tensor& gram_t, const at::Tensor& d2_t,
                    const char* op) {
  const at::Tensor* all[] = {&gram_s, &d2_s, &gram_t, &d2_t};
  const char* names[] = {"gram_s", "d2_s", "gram_t", "d2_t"};
  TORCH_CHECK(gram_s.dim() == 2 && gram_s.size(0) == gram_s.size(1), op, ": gram_s must be a square matrix, got ",
              gram_s.sizes());
  for (int n = 0; n < 4; ++n) {
    const at::Tensor& m = *all[n];
    TORCH_CHECK(fastkd::on_device(m), op, ": ", names[n], " must be a CUDA tensor");
    TORCH_CHECK(m.device() == gram_s.device(), op, ": ", names[n], " is on ", m.device(), ", gram_s on ",
                gram_s.device());
    TORCH_CHECK(m.scalar_type() == at::kFloat, op, ": ", names[n], " must be float32, got ", m.scalar_type());
    TORCH_CHECK(m.sizes() == gram_s.sizes(), op, ": ", names[n], " has shape ", m.sizes(), ", gram_s ",
                gram_s.sizes());
  }
}

// |x_i - x_j|^2, B x B float32, from float32 rows (B, D), computed directly (Triton's sq_distances).
at::Tensor sq_distances(const at::Tensor& x) {
  TORCH_CHECK(fastkd::on_device(x), "cuda_rkd_sq_distances: x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2, "cuda_rkd_sq_distances: x must be (B, D), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "cuda_rkd_sq_distances: x must be float32, got ", x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), D = x.size(1);
  at::Tensor out = at::empty({B, B}, x.options());
  if (B == 0) return out;
  const at::Tensor xt = x.t().contiguous();  // (D, B): the tile's rows are contiguous
  const int64_t n = cdiv(B, kDistTile);
  check_grid(n, "cuda_rkd_sq_distances");
  const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(n));
  FASTKD_LAUNCH(grid, kThreads, 0, at::cuda::getCurrentCUDAStream(), sq_dist_kernel)(
      xt.data_ptr<float>(), out.data_ptr<float>(), B, D);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// sum_ijk Huber(A^s_ijk - A^t_ijk), a 0-d float32 tensor (Triton's angle_forward): one partial per block, summed
// by at::sum (deterministic). The k range is split over gridDim.z when the (i, j) tiles alone are too few.
at::Tensor angle_sum(const at::Tensor& gram_s_in, const at::Tensor& d2_s_in, const at::Tensor& gram_t_in,
                     const at::Tensor& d2_t_in) {
  check_matrices(gram_s_in, d2_s_in, gram_t_in, d2_t_in, "cuda_rkd_angle_sum");
  const c10::cuda::CUDAGuard guard(gram_s_in.device());
  const at::Tensor gram_s = gram_s_in.contiguous(), d2_s = d2_s_in.contiguous();
  const at::Tensor gram_t = gram_t_in.contiguous(), d2_t = d2_t_in.contiguous();
  const int64_t B = gram_s.size(0);
  if (B == 0) return at::zeros({}, gram_s.options());
  const int64_t n = cdiv(B, kTile);
  check_grid(n, "cuda_rkd_angle_sum");
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t max_split = cdiv(B, kMinSlice);
  const int64_t split = std::max<int64_t>(1, std::min<int64_t>(max_split, cdiv(2 * sms, n * n)));
  const int64_t k_per = cdiv(B, split);  // the last staged chunk of a slice may be partial
  const int64_t slices = cdiv(B, k_per);
  at::Tensor partial = at::empty({slices * n * n}, gram_s.options());
  const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(n), static_cast<unsigned>(slices));
  FASTKD_LAUNCH(grid, kThreads, 0, at::cuda::getCurrentCUDAStream(), angle_forward_kernel)(
      gram_s.data_ptr<float>(), d2_s.data_ptr<float>(), gram_t.data_ptr<float>(), d2_t.data_ptr<float>(),
      partial.data_ptr<float>(), B, k_per);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return at::sum(partial);
}

// grad * d(sum Huber)/dG_s and grad * d(sum Huber)/dD2_s, each B x B float32 (Triton's angle_backward).
std::tuple<at::Tensor, at::Tensor> angle_sum_backward(const at::Tensor& grad, const at::Tensor& gram_s_in,
                                                      const at::Tensor& d2_s_in, const at::Tensor& gram_t_in,
                                                      const at::Tensor& d2_t_in) {
  check_matrices(gram_s_in, d2_s_in, gram_t_in, d2_t_in, "cuda_rkd_angle_sum_backward");
  TORCH_CHECK(grad.dim() == 0, "cuda_rkd_angle_sum_backward: grad must be 0-d (the gradient of a sum), got ",
              grad.sizes());
  const c10::cuda::CUDAGuard guard(gram_s_in.device());
  const at::Tensor gram_s = gram_s_in.contiguous(), d2_s = d2_s_in.contiguous();
  const at::Tensor gram_t = gram_t_in.contiguous(), d2_t = d2_t_in.contiguous();
  const int64_t B = gram_s.size(0);
  at::Tensor s = at::empty({B, B}, gram_s.options());
  at::Tensor e = at::empty({B, B}, gram_s.options());
  at::Tensor u = at::empty({B, B}, gram_s.options());
  if (B > 0) {
    const int64_t n = cdiv(B, kTile);
    check_grid(n, "cuda_rkd_angle_sum_backward");
    const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(n));
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    FASTKD_LAUNCH(grid, kThreads, 0, stream, angle_rows_kernel)(gram_s.data_ptr<float>(), d2_s.data_ptr<float>(),
                                                              gram_t.data_ptr<float>(), d2_t.data_ptr<float>(),
                                                              s.data_ptr<float>(), e.data_ptr<float>(), B);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    FASTKD_LAUNCH(grid, kThreads, 0, stream, angle_cols_kernel)(gram_s.data_ptr<float>(), d2_s.data_ptr<float>(),
                                                              gram_t.data_ptr<float>(), d2_t.data_ptr<float>(),
                                                              u.data_ptr<float>(), B);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor d_gram = u - 2.0 * s;
  d_gram.diagonal().add_(s.sum(1));
  return std::make_tuple(d_gram * grad, e * grad);
}

}  // namespace fastkd_rkd

TORCH_LIBRARY_IMPL(FASTKD_LIBRARY, FASTKD_DISPATCH_KEY, m) {
  m.impl("cuda_rkd_sq_distances", &fastkd_rkd::sq_distances);
  m.impl("cuda_rkd_angle_sum", &fastkd_rkd::angle_sum);
  m.impl("cuda_rkd_angle_sum_backward", &fastkd_rkd::angle_sum_backward);
}
