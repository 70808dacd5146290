// RKD (relational KD) kernels: direct squared distances and their gradient by direct differences, and the
// angle term's Huber sum over the B^3 triples with the weights of its gradient. CUDA twins of
// fastkd/triton/rkd.py (same formulas, same operand order, same zeros); that module's docstring has the
// maths, the accuracy argument and the error bound. In short, per side, from the float32 pairs Qh + Ql of
// the squared distances computed directly in float64:
//   2 N_ijk = (max(Qh_ij, Qh_ik) - Qh_jk) + min(Qh_ij, Qh_ik) + ((Ql_ij + Ql_ik) - Ql_jk)   (law of cosines),
//   r_ij = 1 / max(sqrt(Qh_ij), 1e-12) (0 where Qh_ij <= 0),  A_ijk = N_ijk r_ij r_ik (UNIT, D = 1: the sign),
//   L = sum_{i, j != k} Huber(A^s - A^t) (beta 1),  c_ijk = clamp(A^s - A^t, -1, 1) (0 at j = k),
//   S_ij = r_ij sum_k c_ijk r_ik,  E_ij = -r_ij^2 sum_k c A^s (0 where sqrt(Q_ij) <= 1e-12),
//   U_jk = sum_i c_ijk r_ij r_ik,  W = 2 ((E + E^T) + (S + S^T) - U),  dL/dx_m = sum_k W_mk (x_m - x_k).
// The B^3 triples are produced and consumed on chip: a block holds a 32 x 32 tile of two indices (16 x 16
// threads, 2 x 2 pairs each) and loops over the third, staging rows of Qh, Ql and r through shared memory.
// The forward visits k > j only (the sum is symmetric in j, k; the launcher doubles it), the column pass only
// tiles with k's block >= j's (U is symmetric). Matrices are float32, B x B, symmetric and contiguous.
#include "common.cuh"

namespace fastkd {
namespace {

constexpr int kTile = 32;     // pairs per tile side
constexpr int kChunk = 16;    // third indices staged in shared memory per step (2 x 6 rows: 24 KB)
constexpr int kThreads = 256; // 16 x 16 threads, each 2 x 2 pairs of the 32 x 32 tile
constexpr int kSide = 16;
constexpr int kMinBlocks = 3; // angle kernels: up to 85 registers (ptxas otherwise caps some at 64 and spills)
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

// A_ijk from the hi/lo distance pairs, the larger of Q_ij, Q_ik differenced first (Triton's _angle). Plain
// additions: nvcc neither reassociates them nor contracts them into an fma, even under --use_fast_math.
template <bool UNIT>
__device__ __forceinline__ float angle(float qh_jk, float ql_jk, float qh_ij, float ql_ij, float qh_ik, float ql_ik,
                                       float half_r_ij, float r_ik) {
  const float hi = (fmaxf(qh_ij, qh_ik) - qh_jk) + fminf(qh_ij, qh_ik);
  const float n2 = hi + ((ql_ij + ql_ik) - ql_jk);
  if (UNIT) {
    const bool live = half_r_ij > 0.0f && r_ik > 0.0f && n2 != 0.0f;
    return live ? copysignf(1.0f, n2) : 0.0f;
  }
  return n2 * half_r_ij * r_ik;
}

// A block's 16 x 16 threads over a tile: thread (tx, ty) holds the R x R elements (i0 + ty + 16 a, j0 + tx + 16 b).
// Calls f(a, b, i, j, inside) for each, inside: (i, j) in [0, n_i) x [0, n_j); where INSIDE_ONLY (the stores of
// a tile's results), for the inside ones only.
template <int R, bool INSIDE_ONLY, typename F>
__device__ __forceinline__ void for_each_element(int64_t i0, int64_t j0, int64_t n_i, int64_t n_j, int tx, int ty,
                                                 F&& f) {
#pragma unroll
  for (int a = 0; a < R; ++a) {
    const int64_t i = i0 + ty + kSide * a;
    if (INSIDE_ONLY && i >= n_i) continue;
#pragma unroll
    for (int b = 0; b < R; ++b) {
      const int64_t j = j0 + tx + kSide * b;
      if (!INSIDE_ONLY) {
        f(a, b, i, j, i < n_i && j < n_j);
      } else if (j < n_j) {
        f(a, b, i, j, true);
      }
    }
  }
}

// Calls f(r, c) for each element of a ROWS x COLS stage in shared memory, spread over the block's threads.
template <int ROWS, int COLS, typename F>
__device__ __forceinline__ void for_each_staged(F&& f) {
  for (int e = threadIdx.x; e < ROWS * COLS; e += kThreads) f(e / COLS, e % COLS);
}

// A row-major float32 matrix: element (r, c) at p[r * ld + c], read as 0 outside rows x cols.
struct Matrix {
  const float* __restrict__ p;
  int64_t ld, rows, cols;
};

// Rows row0 + [0, ROWS) of two matrices staged in shared memory, columns a_col0 + [0, COLS) of a and b_col0 +
// [0, COLS) of b.
template <int ROWS, int COLS>
__device__ __forceinline__ void stage_tiles(float (&sa)[ROWS][COLS], Matrix a, int64_t a_col0,
                                            float (&sb)[ROWS][COLS], Matrix b, int64_t b_col0, int64_t row0) {
  for_each_staged<ROWS, COLS>([&](int r, int c) {
    const int64_t k = row0 + r, ca = a_col0 + c, cb = b_col0 + c;
    sa[r][c] = (k < a.rows && ca < a.cols) ? a.p[k * a.ld + ca] : 0.0f;
    sb[r][c] = (k < b.rows && cb < b.cols) ? b.p[k * b.ld + cb] : 0.0f;
  });
}

// A loop over [begin, end) in chunks of CHUNK staged in shared memory: stage(k0) fills the stage for the chunk at
// k0, then body(k0, steps) reads its steps = min(CHUNK, end - k0) entries, a barrier on either side. The bounds
// must be the same for the whole block (the barriers).
template <int CHUNK, typename Stage, typename Body>
__device__ __forceinline__ void over_chunks(int64_t begin, int64_t end, Stage&& stage, Body&& body) {
  for (int64_t k0 = begin; k0 < end; k0 += CHUNK) {
    stage(k0);
    __syncthreads();
    body(k0, static_cast<int>(std::min<int64_t>(CHUNK, end - k0)));
    __syncthreads();
  }
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
  float acc[4][4] = {};
  const Matrix xt_m{xt, B, D, B};
  over_chunks<kDistChunk>(0, D, [&](int64_t d0) { stage_tiles(sx_i, xt_m, i0, sx_j, xt_m, j0, d0); },
                          [&](int64_t, int steps) {
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
  });
  for_each_element<4, true>(i0, j0, B, B, tx, ty, [&](int a, int b, int64_t i, int64_t j, bool) {
    out[i * B + j] = acc[a][b];
  });
}

// out_md = sum_k W_mk (x_md - x_kd), the differences formed first (the matmul form rowsum(W) x - W x cancels
// where a large weight joins two close rows). x row-major (B, D); W symmetric (B, B), so its row k is read
// for the column. A 32 (m) x 32 (d) tile per block, 2 x 2 per thread; k staged kChunk at a time.
__global__ void __launch_bounds__(kThreads) weighted_diff_kernel(const float* __restrict__ w,
                                                                 const float* __restrict__ x,
                                                                 float* __restrict__ out, int64_t B, int64_t D) {
  __shared__ float sw[kChunk][kTile];  // W[k, m] = W[m, k]
  __shared__ float sx[kChunk][kTile];  // x[k, d]
  const int tid = threadIdx.x, tx = tid % kSide, ty = tid / kSide;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t d0 = static_cast<int64_t>(blockIdx.x) * kTile;
  float xm[2][2], acc[2][2];
  for_each_element<2, false>(m0, d0, B, D, tx, ty, [&](int a, int b, int64_t m, int64_t d, bool inside) {
    xm[a][b] = inside ? x[m * D + d] : 0.0f;
    acc[a][b] = 0.0f;
  });
  const Matrix w_m{w, B, B, B}, x_m{x, D, B, D};
  over_chunks<kChunk>(0, B, [&](int64_t k0) { stage_tiles(sw, w_m, m0, sx, x_m, d0, k0); }, [&](int64_t, int steps) {
    for (int kk = 0; kk < steps; ++kk) {
#pragma unroll
      for (int a = 0; a < 2; ++a) {
        const float wk = sw[kk][ty + kSide * a];
#pragma unroll
        for (int b = 0; b < 2; ++b) acc[a][b] = __fmaf_rn(wk, xm[a][b] - sx[kk][tx + kSide * b], acc[a][b]);
      }
    }
  });
  for_each_element<2, true>(m0, d0, B, D, tx, ty, [&](int a, int b, int64_t m, int64_t d, bool) {
    out[m * D + d] = acc[a][b];
  });
}

// One side's matrices.
struct Side {
  const float* __restrict__ qh;
  const float* __restrict__ ql;
};

// The per-tile state of a kernel over tiles (i, j) looping over k, for one side: Qh_ij, Ql_ij, r_ij (0 past B,
// as Triton's masked loads, which makes every A of those lanes 0).
struct PairTile {
  float qh_ij[2][2], ql_ij[2][2], r_ij[2][2];
};

__device__ __forceinline__ void load_pair_tile(PairTile& t, Side m, int64_t B, int64_t i0, int64_t j0, int tx,
                                               int ty) {
  for_each_element<2, false>(i0, j0, B, B, tx, ty, [&](int a, int b, int64_t i, int64_t j, bool v) {
    const int64_t o = i * B + j;
    t.qh_ij[a][b] = v ? m.qh[o] : 0.0f;
    t.ql_ij[a][b] = v ? m.ql[o] : 0.0f;
    t.r_ij[a][b] = inv_norm(t.qh_ij[a][b]);
  });
}

// Qh, Ql of one side at offset o into staged arrays at [s][c], 0 where not valid.
__device__ __forceinline__ void stage_pair(float (&qh)[kChunk][kTile], float (&ql)[kChunk][kTile], int s, int c, Side m,
                                           bool valid, int64_t o) {
  qh[s][c] = valid ? m.qh[o] : 0.0f;
  ql[s][c] = valid ? m.ql[o] : 0.0f;
}

// Shared rows k in [k0, k0 + kChunk) of one side: Qh[k, i], Ql[k, i], r[k, i], Qh[k, j], Ql[k, j] (row k of a
// symmetric matrix stands for its column k).
struct RowStage {
  float qh_i[kChunk][kTile], ql_i[kChunk][kTile], r_i[kChunk][kTile];
  float qh_j[kChunk][kTile], ql_j[kChunk][kTile];
};

__device__ __forceinline__ void stage_rows(RowStage& st, Side m, int64_t B, int64_t i0, int64_t j0, int64_t k0,
                                           int64_t k_end) {
  for_each_staged<kChunk, kTile>([&](int kk, int c) {
    const int64_t k = k0 + kk, i = i0 + c, j = j0 + c;
    const bool kin = k < k_end;
    const bool vi = kin && i < B, vj = kin && j < B;
    const int64_t oi = k * B + i, oj = k * B + j;
    stage_pair(st.qh_i, st.ql_i, kk, c, m, vi, oi);
    st.r_i[kk][c] = inv_norm(st.qh_i[kk][c]);
    stage_pair(st.qh_j, st.ql_j, kk, c, m, vj, oj);
  });
}

// j0 - k0 as an int that compares with the staged steps kk in [0, kChunk) exactly as the 64-bit j - k would,
// for every column j0 + c, c in [0, kTile): clamped to [-kTile, kChunk].
__device__ __forceinline__ int relative_step(int64_t j0, int64_t k0) {
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(j0 - k0, -kTile), kChunk));
}

// The k loop of the kernels over tiles (i, j): both sides' rows k of [k_begin, k_end) staged kChunk at a time,
// body(rel, steps) for each chunk of `steps` staged rows (rel: relative_step of the chunk).
template <typename Body>
__device__ __forceinline__ void over_staged_rows(RowStage& st_s, RowStage& st_t, Side ms, Side mt, int64_t B,
                                                 int64_t i0, int64_t j0, int64_t k_begin, int64_t k_end,
                                                 Body&& body) {
  over_chunks<kChunk>(k_begin, k_end, [&](int64_t k0) {
    stage_rows(st_s, ms, B, i0, j0, k0, k_end);
    stage_rows(st_t, mt, B, i0, j0, k0, k_end);
  }, [&](int64_t k0, int steps) {
    body(relative_step(j0, k0), steps);
  });
}

// A of the pair (a, b) of this thread's 2 x 2 at staged step kk.
template <bool UNIT>
__device__ __forceinline__ float staged_angle(const RowStage& st, const PairTile& t, int kk, int a, int b, int tx,
                                              int ty) {
  const int ci = ty + kSide * a, cj = tx + kSide * b;
  return angle<UNIT>(st.qh_j[kk][cj], st.ql_j[kk][cj], t.qh_ij[a][b], t.ql_ij[a][b], st.qh_i[kk][ci], st.ql_i[kk][ci],
                     0.5f * t.r_ij[a][b], st.r_i[kk][ci]);
}

// Forward: tile (i, j) = (blockIdx.y, blockIdx.x), k in the block's slice [z k_per, (z + 1) k_per) of [0, B),
// only k > j; writes the block's sum of Huber terms to partial[(z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x].
template <bool UNIT_S, bool UNIT_T>
__global__ void __launch_bounds__(kThreads, kMinBlocks) angle_forward_kernel(Side ms, Side mt, float* __restrict__ partial,
                                                                 int64_t B, int64_t k_per) {
  __shared__ RowStage st_s, st_t;
  __shared__ float warp_sums[kThreads / 32];
  const int tid = threadIdx.x, tx = tid % kSide, ty = tid / kSide;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t k_begin = std::max<int64_t>(static_cast<int64_t>(blockIdx.z) * k_per, j0 + 1);
  const int64_t k_end = std::min<int64_t>(B, static_cast<int64_t>(blockIdx.z + 1) * k_per);
  PairTile ts, tt;
  load_pair_tile(ts, ms, B, i0, j0, tx, ty);
  load_pair_tile(tt, mt, B, i0, j0, tx, ty);
  float acc = 0.0f;
  over_staged_rows(st_s, st_t, ms, mt, B, i0, j0, k_begin, k_end, [&](int rel, int steps) {
    for (int kk = 0; kk < steps; ++kk) {
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          const float h = huber(staged_angle<UNIT_S>(st_s, ts, kk, a, b, tx, ty) -
                                staged_angle<UNIT_T>(st_t, tt, kk, a, b, tx, ty));
          acc += kk > rel + tx + kSide * b ? h : 0.0f;  // k > j only
        }
    }
  });
  const float total = block_sum_to_thread0<kThreads>(acc, warp_sums);
  if (tid == 0) {
    const int64_t slot = (static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    partial[slot] = total;
  }
}

// Backward pass 1, tile (i, j), loop over k != j: S_ij = r_ij sum_k c r_ik, E_ij = -r_ij^2 sum_k c A^s (0 where
// sqrt(Q_ij) <= 1e-12: F.normalize's clamp, beyond which the norm carries no gradient).
template <bool UNIT_T>
__global__ void __launch_bounds__(kThreads, kMinBlocks) angle_rows_kernel(Side ms, Side mt, float* __restrict__ s_out,
                                                              float* __restrict__ e_out, int64_t B) {
  __shared__ RowStage st_s, st_t;
  const int tid = threadIdx.x, tx = tid % kSide, ty = tid / kSide;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  PairTile ts, tt;
  load_pair_tile(ts, ms, B, i0, j0, tx, ty);
  load_pair_tile(tt, mt, B, i0, j0, tx, ty);
  float acc_s[2][2] = {}, acc_t[2][2] = {};
  over_staged_rows(st_s, st_t, ms, mt, B, i0, j0, 0, B, [&](int rel, int steps) {
    for (int kk = 0; kk < steps; ++kk) {
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          const float a_s = staged_angle<false>(st_s, ts, kk, a, b, tx, ty);
          const float a_t = staged_angle<UNIT_T>(st_t, tt, kk, a, b, tx, ty);
          const float c = kk == rel + tx + kSide * b ? 0.0f : clamp1(a_s - a_t);  // k = j: left out
          acc_s[a][b] += c * st_s.r_i[kk][ty + kSide * a];
          acc_t[a][b] += c * a_s;
        }
    }
  });
  for_each_element<2, true>(i0, j0, B, B, tx, ty, [&](int a, int b, int64_t i, int64_t j, bool) {
    const float r = ts.r_ij[a][b];
    const bool live = __fsqrt_rn(fmaxf(ts.qh_ij[a][b], 0.0f)) > 1e-12f;
    s_out[i * B + j] = acc_s[a][b] * r;
    e_out[i * B + j] = live ? -(r * r) * acc_t[a][b] : 0.0f;
  });
}

// Backward pass 2, tile (j, k) = (blockIdx.y, blockIdx.x) with k's block >= j's, loop over the apex i:
// U_jk = sum_i c_ijk r_ij r_ik, stored at (j, k) and (k, j), 0 at j = k. Rows i of each side are staged:
// Qh, Ql and r at columns j and k.
struct ApexStage {
  float qh_j[kChunk][kTile], ql_j[kChunk][kTile], r_j[kChunk][kTile];
  float qh_k[kChunk][kTile], ql_k[kChunk][kTile], r_k[kChunk][kTile];
};

__device__ __forceinline__ void stage_apexes(ApexStage& st, Side m, int64_t B, int64_t i0, int64_t j0,
                                             int64_t k0) {
  for_each_staged<kChunk, kTile>([&](int ii, int c) {
    const int64_t i = i0 + ii, j = j0 + c, k = k0 + c;
    const bool vj = i < B && j < B, vk = i < B && k < B;
    const int64_t oj = i * B + j, ok = i * B + k;
    stage_pair(st.qh_j, st.ql_j, ii, c, m, vj, oj);
    st.r_j[ii][c] = inv_norm(st.qh_j[ii][c]);
    stage_pair(st.qh_k, st.ql_k, ii, c, m, vk, ok);
    st.r_k[ii][c] = inv_norm(st.qh_k[ii][c]);
  });
}

template <bool UNIT>
__device__ __forceinline__ float apex_angle(const ApexStage& st, float qh_jk, float ql_jk, int ii, int cj, int ck) {
  return angle<UNIT>(qh_jk, ql_jk, st.qh_j[ii][cj], st.ql_j[ii][cj], st.qh_k[ii][ck], st.ql_k[ii][ck],
                     0.5f * st.r_j[ii][cj], st.r_k[ii][ck]);
}

template <bool UNIT_T>
__global__ void __launch_bounds__(kThreads, kMinBlocks) angle_cols_kernel(Side ms, Side mt, float* __restrict__ u_out, int64_t B) {
  if (blockIdx.x < blockIdx.y) return;  // the mirror tile writes this one
  __shared__ ApexStage st_s, st_t;
  const int tid = threadIdx.x, tx = tid % kSide, ty = tid / kSide;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kTile;
  float hs_jk[2][2], ls_jk[2][2], ht_jk[2][2], lt_jk[2][2], acc[2][2];
  for_each_element<2, false>(j0, k0, B, B, tx, ty, [&](int a, int b, int64_t j, int64_t k, bool v) {
    hs_jk[a][b] = v ? ms.qh[j * B + k] : 0.0f;
    ls_jk[a][b] = v ? ms.ql[j * B + k] : 0.0f;
    ht_jk[a][b] = v ? mt.qh[j * B + k] : 0.0f;
    lt_jk[a][b] = v ? mt.ql[j * B + k] : 0.0f;
    acc[a][b] = 0.0f;
  });
  over_chunks<kChunk>(0, B, [&](int64_t i0) {
    stage_apexes(st_s, ms, B, i0, j0, k0);
    stage_apexes(st_t, mt, B, i0, j0, k0);
  }, [&](int64_t, int steps) {
    for (int ii = 0; ii < steps; ++ii) {
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          const int cj = ty + kSide * a, ck = tx + kSide * b;
          const float a_s = apex_angle<false>(st_s, hs_jk[a][b], ls_jk[a][b], ii, cj, ck);
          const float a_t = apex_angle<UNIT_T>(st_t, ht_jk[a][b], lt_jk[a][b], ii, cj, ck);
          acc[a][b] += clamp1(a_s - a_t) * (st_s.r_j[ii][cj] * st_s.r_k[ii][ck]);
        }
    }
  });
  for_each_element<2, true>(j0, k0, B, B, tx, ty, [&](int a, int b, int64_t j, int64_t k, bool) {
    const float u = j == k ? 0.0f : acc[a][b];
    u_out[j * B + k] = u;
    u_out[k * B + j] = u;
  });
}

// --- host ----------------------------------------------------------------------------------------------------

// The four B x B matrices of the angle kernels (Qh, Ql of each side), checked and made contiguous, and the
// grid of their 32 x 32 tiles.
struct Matrices {
  at::Tensor m[4];
  int64_t B;
  unsigned tiles;  // per side
  Side side(int s) const { return Side{m[2 * s].data_ptr<float>(), m[2 * s + 1].data_ptr<float>()}; }
};

Matrices matrices(const char* op, const at::Tensor& qh_s, const at::Tensor& ql_s, const at::Tensor& qh_t,
                  const at::Tensor& ql_t) {
  const at::Tensor* all[] = {&qh_s, &ql_s, &qh_t, &ql_t};
  const char* names[] = {"qh_s", "ql_s", "qh_t", "ql_t"};
  TORCH_CHECK(qh_s.dim() == 2 && qh_s.size(0) == qh_s.size(1), op, ": qh_s must be a square matrix, got ",
              qh_s.sizes());
  Matrices out;
  for (int n = 0; n < 4; ++n) {
    const at::Tensor& m = *all[n];
    check_float32(op, names[n], m);
    check_same_device(op, names[n], m, "qh_s", qh_s);
    TORCH_CHECK(m.sizes() == qh_s.sizes(), op, ": ", names[n], " has shape ", m.sizes(), ", qh_s ", qh_s.sizes());
    out.m[n] = m.contiguous();
  }
  out.B = qh_s.size(0);
  out.tiles = grid_yz(op, cdiv(out.B, kTile));
  return out;
}

}  // namespace

// |x_i - x_j|^2, B x B float32, from float32 rows (B, D), computed directly (Triton's sq_distances).
at::Tensor rkd_sq_distances(const at::Tensor& x) {
  constexpr const char* op = "fastkd::cuda_rkd_sq_distances";
  check_float32(op, "x", x);
  TORCH_CHECK(x.dim() == 2, op, ": x must be (B, D), got ", x.sizes());
  const Launch L(op, x);
  const int64_t B = x.size(0), D = x.size(1);
  at::Tensor out = at::empty({B, B}, x.options());
  if (B == 0) return out;
  const at::Tensor xt = x.t().contiguous();  // (D, B): the tile's rows are contiguous
  const unsigned n = grid_yz(op, cdiv(B, kDistTile));
  L.launch(dim3(n, n), kThreads, sq_dist_kernel, data_of<float>(xt), mutable_data_of<float>(out), B, D);
  return out;
}

// out_m = sum_k w_mk (x_m - x_k), (B, D) float32, for a symmetric float32 w (Triton's weighted_diff).
at::Tensor rkd_weighted_diff(const at::Tensor& w_in, const at::Tensor& x_in) {
  constexpr const char* op = "fastkd::cuda_rkd_weighted_diff";
  check_float32(op, "w", w_in);
  check_float32(op, "x", x_in);
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be (B, D), got ", x_in.sizes());
  const int64_t B = x_in.size(0), D = x_in.size(1);
  TORCH_CHECK(w_in.dim() == 2 && w_in.size(0) == B && w_in.size(1) == B, op, ": w must be (", B, ", ", B,
              "), got ", w_in.sizes());
  check_same_device(op, "w", w_in, "x", x_in);
  const Launch L(op, x_in);
  const at::Tensor w = w_in.contiguous(), x = x_in.contiguous();
  at::Tensor out = at::empty({B, D}, x.options());
  if (B == 0 || D == 0) return out;
  const dim3 grid(grid_x(op, cdiv(D, kTile)), grid_yz(op, cdiv(B, kTile)));
  L.launch(grid, kThreads, weighted_diff_kernel, data_of<float>(w), data_of<float>(x), mutable_data_of<float>(out), B,
           D);
  return out;
}

// sum_{i, j != k} Huber(A^s_ijk - A^t_ijk), a 0-d float32 tensor (Triton's angle_sum): one partial per block,
// summed by at::sum (deterministic) and doubled. The k range is split over gridDim.z when the (i, j) tiles alone
// are too few.
at::Tensor rkd_angle_sum(const at::Tensor& qh_s, const at::Tensor& ql_s, const at::Tensor& qh_t,
                         const at::Tensor& ql_t, bool unit_s, bool unit_t) {
  constexpr const char* op = "fastkd::cuda_rkd_angle_sum";
  const Matrices m = matrices(op, qh_s, ql_s, qh_t, ql_t);
  const Launch L(op, qh_s);
  const int64_t B = m.B, n = m.tiles;
  if (B == 0) return at::zeros({}, m.m[0].options());
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t max_split = cdiv(B, kMinSlice);
  const int64_t split = std::max<int64_t>(1, std::min<int64_t>(max_split, cdiv(2 * sms, n * n)));
  const int64_t k_per = cdiv(B, split);  // the last staged chunk of a slice may be partial
  const int64_t slices = cdiv(B, k_per);
  at::Tensor partial = at::empty({slices * n * n}, m.m[0].options());
  const dim3 grid(m.tiles, m.tiles, static_cast<unsigned>(slices));
  dispatch_bool(unit_s, [&]<bool UNIT_S>() {
    dispatch_bool(unit_t, [&]<bool UNIT_T>() {
      L.launch(grid, kThreads, angle_forward_kernel<UNIT_S, UNIT_T>, m.side(0), m.side(1),
               mutable_data_of<float>(partial), B, k_per);
    });
  });
  return 2.0 * at::sum(partial);
}

// W, (B, B) float32: the sum's gradient is weighted_diff(W, x_s) (Triton's angle_weights).
at::Tensor rkd_angle_weights(const at::Tensor& qh_s, const at::Tensor& ql_s, const at::Tensor& qh_t,
                             const at::Tensor& ql_t, bool unit_t) {
  constexpr const char* op = "fastkd::cuda_rkd_angle_weights";
  const Matrices m = matrices(op, qh_s, ql_s, qh_t, ql_t);
  const Launch L(op, qh_s);
  const int64_t B = m.B;
  at::Tensor s = at::empty({B, B}, m.m[0].options());
  at::Tensor e = at::empty({B, B}, m.m[0].options());
  at::Tensor u = at::empty({B, B}, m.m[0].options());
  if (B > 0) {
    const dim3 grid(m.tiles, m.tiles);
    dispatch_bool(unit_t, [&]<bool UNIT_T>() {
      L.launch(grid, kThreads, angle_rows_kernel<UNIT_T>, m.side(0), m.side(1), mutable_data_of<float>(s),
               mutable_data_of<float>(e), B);
      L.launch(grid, kThreads, angle_cols_kernel<UNIT_T>, m.side(0), m.side(1), mutable_data_of<float>(u), B);
    });
  }
  return 2.0 * ((e + e.t()) + (s + s.t()) - u);
}

}  // namespace fastkd

TORCH_LIBRARY_IMPL(FASTKD_LIBRARY, FASTKD_DISPATCH_KEY, m) {
  m.impl("cuda_rkd_sq_distances", &fastkd::rkd_sq_distances);
  m.impl("cuda_rkd_weighted_diff", &fastkd::rkd_weighted_diff);
  m.impl("cuda_rkd_angle_sum", &fastkd::rkd_angle_sum);
  m.impl("cuda_rkd_angle_weights", &fastkd::rkd_angle_weights);
}
