// Sparse-teacher KD: the student's row of V logits against k teacher slots (ids, log-probabilities), the per-row
// loss and the weighted student gradient in one launch: the CUDA C++ version of fastkd/triton/sparse.py (the
// specification: the maths of the three tails, the gradient's derivation, the bucket tail with its far-tail rule
// TAIL_FAR, duplicates, NaN rows, ignored tokens are in its docstring), same formulation, same semantics.
//
// In short, per row with x = s * (1/T), M = max x, a = x - M, Z = sum exp(a), log q_j = a_j - log Z:
//   loss = sum_k p_k [p_k > 0] (log p_k - log q_{i_k})  (+ bucket: p_tail [p_tail > 0] (log p_tail - log q_tail)),
//   dloss/dx_j = q_j P_tot - c_j - [j not in S] p_tail r_j,  c_j = sum_{k: i_k = j} p_k,
// times the row's weight / T. A used id outside [0, V) makes the row NaN with a zero gradient (the id is never
// read as an index); an unused slot (l = -inf) has its id never read; an ignored token reads nothing (loss 0, zero
// gradient).
//
// Design: one block per row (threads_for(V)), one launch; the ids converted on the host to int64 and the
// log-probabilities to float32, contiguous (rows, k) (O(N k)).
// - Slot passes (threads over the k slots): S1 the max of the used l / T, whether an id is out of range, whether
//   the set is empty, and (bucket) each readable id's bit in the membership bitmap; S2 z_u and P = sum p.
// - Student pass 1: the max M, and (bucket) the max outside the set M_o and |S|, in one block reduction; the row is
//   copied to shared memory where it fits (common.cuh `first_pass_row`: (V + K) x s bytes, K = 16 / s, s the
//   student's element size: up to ~116K bf16 or ~58K fp32 logits on an H100/H200's 227 KiB, less the bitmap; capped
//   by FASTKD_CUDA_STAGE_BYTES as the row pairs: 0 never stages), and the later passes read the copy.
//   Pass 2: Z and (bucket) the tail's Z_t = sum_{j not in S} exp(x_j - M_t), directly (never Z - sum_S).
//   Then thread 0 alone makes the row's scalars (log Z, the tail, the gradient's row factors) and hands them to the
//   block through shared memory; the statistics read only late (the slots', the tail's) wait there too, not in
//   registers: held across the passes, nvcc spilled some of them to a stack frame.
//   Pass 3 (with the gradient): every column written as if outside S, weighted; then, after a __syncthreads()
//   (the block's own global stores, visible to the block after the barrier), slot pass S3 overwrites the columns of
//   S with (q_j P_tot - c_j) g and sums the loss terms. c_j for duplicates: each slot compares its id with the k
//   slots' (k^2 / threads integer compares per thread, from L1; an exponential only per matching slot: one per
//   slot without duplicates), summed in slot order, so every slot of an id writes the same value.
// - Membership (bucket only): a bitmap of V bits, ceil(V / 32) words in the block's dynamic shared memory before the
//   staged row (V / 8 bytes: 16 KB at V = 128K), zeroed by the block, set with one shared-memory atomicOr per
//   readable slot, read back in passes 1 and 2 as a shift and a mask per element (the 32 lanes of a warp read one
//   word: a broadcast, no bank conflict). Where V / 8 bytes exceed the kernel's shared memory (V above ~1.8M) the
//   bitmap is a zeroed global scratch of N x V / 8 bytes (its memset and reads from L1/L2 added). Pass 3 needs no
//   membership: S3 overwrites the set's columns. The alternatives cost more per element: comparing each column with
//   the k ids (k compares), or binary search in the sorted ids (log2 k dependent shared loads, plus a sort per row).
// Traffic per element, N rows of V, s bytes per student element, g = 1 with the gradient: staged, s reads and g x s
// writes (the floor: the teacher is k values per row); re-read (row too long or staging off), (2 + g) x s reads and
// g x s writes. The bitmap: no global traffic (shared memory: a zeroing write of V / 8 bytes, V / 32 atomics at
// most, 2 word reads per 32 elements). Per row: k x 12 bytes of slots read by S1, S2, S3 and k more times by the
// duplicate compares (L1), k gathered student logits, k scattered gradient entries (also written densely first).
// Exponentials per element: pass 2 one `exp_accurate` (two for a far bucket tail: exp(x - M_o) too), pass 3 the
// same; none in pass 1. Per slot 2 to 3 exponentials; per row 4 logarithms (log Z, log z_u, log(Z_t / Z), log1mexp).
// Precision as kl.cu (see common.cuh): exp_accurate, log_rn, correctly rounded per-row divisions, no per-element
// division.
#include "common.cuh"

#include <string_view>

namespace fastkd {
namespace {

constexpr int kRenormalize = 0, kBucket = 1, kNone = 2;
// How far below M the largest logit outside the set may sit before the tail's sum takes its own shift (sparse.py).
constexpr float kTailFar = 32.0f;

// A slot: its l, whether used (l != -inf), readable (used and its id in [0, V): the id read only where used), and
// bad (used with an id out of range: the row is NaN). The id is 0 where not readable.
struct Slot {
  int64_t id;
  float l;
  bool used, readable, bad;
};

__device__ __forceinline__ Slot load_slot(const int64_t* __restrict__ ids, const float* __restrict__ lp, int64_t k,
                                          int64_t V) {
  Slot s;
  s.l = lp[k];
  s.used = s.l != neg_inf();
  const int64_t raw = s.used ? ids[k] : 0;
  const bool in_range = raw >= 0 && raw < V;
  s.readable = s.used && in_range;
  s.bad = s.used && !in_range;
  s.id = s.readable ? raw : 0;
  return s;
}

// p of a slot, and log p in `log_p`: the tempered softmax over the used slots (renormalize), else the stored
// log-probability as it is. 0 and -inf for an unused slot.
template <int TAIL>
__device__ __forceinline__ float teacher_prob(float l, bool used, float inv_temperature, float m_u, float log_z_u,
                                              float& log_p) {
  if (TAIL == kRenormalize) {
    log_p = used ? (__fmul_rn(l, inv_temperature) - m_u) - log_z_u : neg_inf();
  } else {
    log_p = l;
  }
  return exp_accurate(log_p);
}

// log(1 - e^x) for x < 0 without cancellation, -inf for x >= 0 (Maechler's split, as the reference's log1mexp).
__device__ __forceinline__ float log1mexp(float x) {
  if (!(x < 0.0f)) return x != x ? x : neg_inf();
  return x > -0.6931471805599453f ? log_rn(-expm1f(x)) : log1pf(-exp_accurate(x));
}

// 1 / z correctly rounded for a z whose reciprocal is normal (here Z in [1, V] and Z_t >= e^-32 where used): the
// approximate reciprocal (MUFU.RCP, <= 1 ulp) refined by one Newton step in FMAs, as rcp.rn's fast path, without
// __frcp_rn's slow-path call for the other z (whose saved registers gave this kernel a stack frame). 0 and NaN
// give NaN.
__device__ __forceinline__ float rcp_normal(float z) {
  const float r0 = __fdividef(1.0f, z);
  return __fmaf_rn(r0, __fmaf_rn(-z, r0, 1.0f), r0);
}

// Whether column c is in the row's set: its bit in the bitmap.
__device__ __forceinline__ bool member(const unsigned* bits, int64_t c) {
  return ((bits[c >> 5] >> static_cast<unsigned>(c & 31)) & 1u) != 0;
}

// The bytes the bitmap takes before the staged row in dynamic shared memory: ceil(V / 32) words, rounded up to 16
// bytes (so the staged row starts 16-byte aligned); 0 where the bitmap is global (or not needed).
__host__ __device__ __forceinline__ int64_t bitmap_bytes(int64_t V) { return cdiv_device(cdiv_device(V, 32) * 4, 16) * 16; }

template <typename T, int TAIL, bool S_GRAD>
__global__ void __launch_bounds__(kMaxThreads)
    sparse_kd_rows_kernel(const T* __restrict__ s_base, const int64_t* __restrict__ ids_base,
                          const float* __restrict__ lp_base, const int64_t* __restrict__ labels,
                          float* __restrict__ loss_out, T* __restrict__ ds_base, unsigned* __restrict__ bits_global,
                          RowWeights weights, int64_t V, int64_t K, RowLayout sl, float inv_temperature,
                          int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const T* s_row = s_base + row_offset(row, sl);
  const int64_t* ids = ids_base + row * K;
  const float* lp = lp_base + row * K;
  // An ignored token reads nothing: 0 columns and 0 slots (V >= 1, so `n_cols != 0` says the token is active; a
  // separate flag, live across the kernel, takes a register that nvcc spilled, as in kl.cu).
  const int64_t n_cols = labels != nullptr && labels[row] == ignore_index ? 0 : V;
  const int64_t n_slots = n_cols != 0 ? K : 0;
  // Bucket: the bitmap, in shared memory (first in the dynamic region, the staged row after it) or global.
  FASTKD_DYNAMIC_SHARED(dynamic);
  unsigned* bits = nullptr;
  unsigned offset = 0;  // where the staged row starts in dynamic shared memory
  if (TAIL == kBucket) {
    const int64_t words = cdiv_device(V, 32);
    if (bits_global != nullptr) {
      bits = bits_global + row * words;  // zeroed by the host
    } else {
      bits = reinterpret_cast<unsigned*>(dynamic);
      offset = static_cast<unsigned>(bitmap_bytes(V));
      for (int64_t w = threadIdx.x; w < words; w += blockDim.x) bits[w] = 0u;
      __syncthreads();  // zeroed before any bit is set
    }
  }

  // Slots, pass S1: [max of the used u = l / T, a bad id, a readable one] (maxima); bucket: the set's bits.
  Floats<3> f;
  f.v[0] = neg_inf(); f.v[1] = 0.0f; f.v[2] = 0.0f;
  for (int64_t k = threadIdx.x; k < n_slots; k += blockDim.x) {
    const Slot s = load_slot(ids, lp, k, V);
    if (s.used) f.v[0] = fmaxf(f.v[0], __fmul_rn(s.l, inv_temperature));
    if (s.bad) f.v[1] = 1.0f;
    if (s.readable) {
      f.v[2] = 1.0f;
      if (TAIL == kBucket) atomicOr(bits + (s.id >> 5), 1u << static_cast<unsigned>(s.id & 31));
    }
  }
  f = block_max<3>(f);  // its barriers also order the atomics before the reads of the bitmap
  // The slots' statistics that are read only after the student's passes (bad: by the gradient pass and the loss;
  // m_u, log z_u, P, nonempty: by the tail and the slot pass S3) are kept in shared memory, written by thread 0 and
  // read back where used (the block reductions between order them): held in registers across the student's
  // passes, nvcc spilled some of them to a stack frame.
  __shared__ bool bad_row, nonempty, covers_all;
  __shared__ float slot_stats[3];  // m_u, log z_u, P
  const float m_u = finite_or_zero(f.v[0]);
  if (threadIdx.x == 0) {
    bad_row = f.v[1] > 0.0f;
    nonempty = f.v[2] > 0.0f;
  }

  // Slots, pass S2: [z_u (renormalize: of l / T; bucket: the log-sum-exp's of l), P = sum p (bucket, none)].
  Floats<2> z2;
  z2.v[0] = 0.0f; z2.v[1] = 0.0f;
  for (int64_t k = threadIdx.x; k < n_slots; k += blockDim.x) {
    const float l = lp[k];
    if (TAIL == kRenormalize) {
      z2.v[0] += l != neg_inf() ? exp_accurate(__fmul_rn(l, inv_temperature) - m_u) : 0.0f;
    } else {
      z2.v[1] += exp_accurate(l);
      if (TAIL == kBucket) z2.v[0] += exp_accurate(l - m_u);
    }
  }
  z2 = block_sum<2>(z2);
  const float z_u = z2.v[0];
  if (threadIdx.x == 0) {
    slot_stats[0] = m_u;
    slot_stats[1] = TAIL == kNone ? 0.0f : log_rn(z_u);
    slot_stats[2] = TAIL == kRenormalize ? (z_u > 0.0f ? 1.0f : z_u) : z2.v[1];  // P: 1 over a non-empty row
  }

  // Student pass 1 (staging the row where it fits): [M, M_o (bucket), |S| (bucket)], maxima and a count.
  Floats<3> m3;
  m3.v[0] = neg_inf(); m3.v[1] = neg_inf(); m3.v[2] = 0.0f;
  first_pass_row(s_row, sl.col, n_cols, row, V, offset, [&](int64_t c, float raw, float&) {
    const float x = scaled(raw, inv_temperature);
    m3.v[0] = fmaxf(m3.v[0], x);
    if (TAIL == kBucket) {
      if (member(bits, c)) {
        m3.v[2] += 1.0f;  // exact: V < 2^24
      } else {
        m3.v[1] = fmaxf(m3.v[1], x);
      }
    }
  });
  m3 = block_reduce<3>(m3, [](const Floats<3>& a, const Floats<3>& b) {
    Floats<3> r;
    r.v[0] = fmaxf(a.v[0], b.v[0]);
    r.v[1] = fmaxf(a.v[1], b.v[1]);
    r.v[2] = a.v[2] + b.v[2];
    return r;
  });
  const float m = finite_or_zero(m3.v[0]);
  const float m_o = finite_or_zero(m3.v[1]);
  const bool far = TAIL == kBucket && m - m_o > kTailFar;
  if (TAIL == kBucket && threadIdx.x == 0) covers_all = m3.v[2] == static_cast<float>(V);  // no id outside S: no tail

  // Pass 2: [Z, Z_t] against the final maxima (no rescaling).
  Floats<2> z;
  z.v[0] = 0.0f; z.v[1] = 0.0f;
  {
    const OneRow<T> in = row_to_read(s_row, sl.col, n_cols, row, V, offset);
    visit_one_row<false>(in.x, in.col, static_cast<float*>(nullptr), n_cols, [&](int64_t c, float raw, float&) {
      const float x = scaled(raw, inv_temperature);
      const float ea = exp_accurate(x - m);
      z.v[0] += ea;
      if (TAIL == kBucket && !member(bits, c)) z.v[1] += far ? exp_accurate(x - m_o) : ea;
    });
  }
  z = block_sum<2>(z);

  // The row's scalars after the sums, by thread 0 (its logarithms' code out of the other threads', as kl.cu's
  // terms), to every thread through shared memory: log Z (for S3), q_scale and t_scale (the gradient's: q_j P_tot =
  // exp(a_j) q_scale, p_tail r_j = e_t t_scale), and (bucket) p_tail, log p_tail and the parts of log q_tail, whose
  // logarithm thread 0 takes at the end with the loss (in this section, more values live beside its double-precision
  // logarithms took stack slots). P_tot = P + p_tail where the tail has a gradient (p_tail > 0, S not empty, Z_t > 0),
  // else P. The divisions correctly rounded by div_by_row (multiplies and FMAs: __fdiv_rn's and __frcp_rn's
  // slow-path calls gave the kernel a stack frame; Z >= 1, and Z_t > 0 where used).
  __shared__ float row_scalars[7];  // log Z, q_scale, t_scale, and (bucket) p_tail, log q_tail's parts, log p_tail
  if (threadIdx.x == 0) {
    const float z_s = z.v[0], z_t = z.v[1];
    const float log_z = log_rn(z_s);
    float p_tot = slot_stats[2], t_scale = 0.0f;
    if (TAIL == kBucket) {
      // log p_tail = log(1 - sum_k p_k) (no tail where the set covers [0, V)).
      const float log_p_tail = covers_all ? neg_inf() : log1mexp(slot_stats[0] + slot_stats[1]);
      const float p_tail = exp_accurate(log_p_tail);
      row_scalars[6] = log_p_tail;
      if (p_tail > 0.0f && nonempty && z_t > 0.0f) {
        p_tot += p_tail;
        t_scale = div_by_row(p_tail, z_t, rcp_normal(z_t));
      }
      // For the loss, at the end: p_tail, and log q_tail = (M_t - M) + log(Z_t / Z) (0 for an empty set) as its
      // shift and the ratio, correctly rounded (Z_t / Z >= e^-32 / V where it is not 0).
      row_scalars[3] = p_tail;
      row_scalars[4] = nonempty ? (far ? m_o : m) - m : 0.0f;
      row_scalars[5] = nonempty ? div_by_row(z_t, z_s, rcp_normal(z_s)) : 1.0f;
    }
    row_scalars[0] = log_z;
    row_scalars[1] = div_by_row(p_tot, z_s, rcp_normal(z_s));
    row_scalars[2] = t_scale;
  }
  __syncthreads();
  const bool live = n_cols != 0 && !bad_row;  // rows whose gradient is not 0

  float g_w = 0.0f, q_scale = 0.0f;
  if (S_GRAD) {
    T* ds_row = ds_base + row * V;
    if (!live) {
      zero_row(ds_row, V);
    } else {
      g_w = weights.at(0, row) * inv_temperature;  // the row's weight, and d/ds = d/dx / T
      q_scale = row_scalars[1];
      const float t_scale = row_scalars[2];
      // Pass 3: every column as if outside S (the set's columns overwritten below: inf - inf there is harmless).
      const OneRow<T> in = row_to_read(s_row, sl.col, n_cols, row, V, offset);
      visit_one_row<true>(in.x, in.col, ds_row, V, [&](int64_t, float raw, float& out) {
        const float x = scaled(raw, inv_temperature);
        const float ea = exp_accurate(x - m);
        float dense = ea * q_scale;
        if (TAIL == kBucket) dense -= (far ? exp_accurate(x - m_o) : ea) * t_scale;
        out = dense * g_w;
      });
    }
    __syncthreads();  // the row's stores before the slot pass's overwrites
  }

  // Slots, pass S3: the terms p_k (log p_k - log q_{i_k}); with the gradient, the columns of S.
  const float m_u3 = slot_stats[0], log_z_u = slot_stats[1], log_z = row_scalars[0];
  float loss_part = 0.0f;
  for (int64_t k = threadIdx.x; k < n_slots; k += blockDim.x) {
    const Slot s = load_slot(ids, lp, k, V);
    float log_p;
    const float p = teacher_prob<TAIL>(s.l, s.used, inv_temperature, m_u3, log_z_u, log_p);
    const float a_i = s.readable ? scaled(to_float(s_row[s.id * sl.col]), inv_temperature) - m : neg_inf();
    loss_part += p * (p > 0.0f ? log_p - (a_i - log_z) : 0.0f);
    if (S_GRAD && s.readable && live) {
      // c: the mass of every slot holding this id (itself included), summed in slot order: the same value from
      // each slot of a duplicated id.
      float c = 0.0f;
#pragma unroll 1  // unrolled, its trip count and copies took a stack slot; it is L1-bound, not issue-bound
      for (int64_t j = 0; j < n_slots; ++j) {
        const float l_j = lp[j];
        if (l_j != neg_inf() && ids[j] == s.id) {
          float unused;
          c += teacher_prob<TAIL>(l_j, true, inv_temperature, m_u3, log_z_u, unused);
        }
      }
      ds_base[row * V + s.id] = from_float<T>((exp_accurate(a_i) * q_scale - c) * g_w);
    }
  }
  Floats<1> lsum;
  lsum.v[0] = loss_part;
  lsum = block_sum<1>(lsum);
  if (threadIdx.x == 0) {
    float loss = lsum.v[0];
    if (TAIL == kBucket) {
      // The tail's term p_tail (log p_tail - log q_tail), 0 where p_tail = 0 (log p_tail = -inf).
      const float p_tail = row_scalars[3];
      const float log_q_tail = row_scalars[4] + log_rn(row_scalars[5]);
      loss += p_tail * (p_tail > 0.0f ? row_scalars[6] - log_q_tail : 0.0f);
    }
    if (bad_row) loss = quiet_nan();
    if (n_cols == 0) loss = 0.0f;
    loss_out[row] = loss;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sparse_kd_rows(const at::Tensor& student, const at::Tensor& teacher_indices,
                                                  const at::Tensor& teacher_logprobs, c10::string_view tail,
                                                  double temperature, const std::optional<at::Tensor>& labels,
                                                  int64_t ignore_index, const std::optional<at::Tensor>& weight,
                                                  bool student_grad) {
  const char* op = "fastkd::cuda_sparse_kd_rows";
  const std::string_view t(tail.data(), tail.size());
  const int tail_id = t == "renormalize" ? kRenormalize : t == "bucket" ? kBucket : t == "none" ? kNone : -1;
  TORCH_CHECK_VALUE(tail_id >= 0, op, ": tail must be 'renormalize', 'bucket' or 'none', got '", t, "'");
  TORCH_CHECK(on_device(student) && on_device(teacher_indices) && on_device(teacher_logprobs), op,
              ": student_logits, teacher_indices and teacher_logprobs must be CUDA tensors");
  check_same_device(op, "teacher_indices", teacher_indices, "student", student);
  check_same_device(op, "teacher_logprobs", teacher_logprobs, "student", student);
  TORCH_CHECK_TYPE(kernel_dtype(student.scalar_type()), op, ": student logits must be float32, float16 or bfloat16, got ",
                   student.scalar_type());
  TORCH_CHECK_TYPE(at::isIntegralType(teacher_indices.scalar_type(), /*includeBool=*/false), op,
                   ": teacher_indices must be an integer tensor, got ", teacher_indices.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(teacher_logprobs.scalar_type()), op,
                   ": teacher_logprobs must be a float tensor, got ", teacher_logprobs.scalar_type());
  TORCH_CHECK(student.dim() >= 1 && student.size(-1) > 0, op, ": the student needs a non-empty class dimension");
  TORCH_CHECK(teacher_indices.sizes() == teacher_logprobs.sizes() && teacher_indices.dim() == student.dim() &&
                  teacher_indices.sizes().slice(0, student.dim() - 1) == student.sizes().slice(0, student.dim() - 1),
              op, ": teacher_indices and teacher_logprobs must be (..., k) with the student's leading dims, got ",
              teacher_indices.sizes(), ", ", teacher_logprobs.sizes(), " for ", student.sizes());
  const int64_t V = student.size(-1);
  const int64_t K = teacher_indices.size(-1);
  const int64_t rows = student.numel() / V;
  grid_x(op, rows);
  const Launch L(op, student);
  at::Tensor loss = at::empty({rows}, student.options().dtype(at::kFloat));
  at::Tensor d_student = student_grad ? at::empty(student.sizes(), student.options()) : at::empty({0}, student.options());
  if (rows == 0) return {loss, d_student};

  at::Tensor s;  // the student's row view (kept alive until the launch), and its layout
  RowLayout sl{};
  std::tie(s, sl) = row_layout(student);
  // The slots as contiguous (rows, k) int64 ids and float32 log-probabilities (a copy only where they are not).
  const at::Tensor ids = teacher_indices.reshape({rows, K}).to(at::kLong).contiguous();
  const at::Tensor lp = teacher_logprobs.reshape({rows, K}).to(at::kFloat).contiguous();
  at::Tensor labels_v;
  if (labels.has_value()) {
    check_same_device(op, "labels", *labels, "student", student);
    TORCH_CHECK_TYPE(at::isIntegralType(labels->scalar_type(), /*includeBool=*/false), op,
                     ": labels must be an integer tensor, got ", labels->scalar_type());
    TORCH_CHECK(labels->numel() == rows, op, ": labels must have one entry per row (", rows, "), got ",
                labels->numel());
    labels_v = labels->reshape({-1}).to(at::kLong).contiguous();
  }
  RowWeights w{{nullptr, nullptr}, {0, 0}};
  at::Tensor weight_v;
  if (weight.has_value() && student_grad) {
    check_same_device(op, "weight", *weight, "student", student);
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == rows, op, ": weight must have shape (", rows, "), got ",
                weight->sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(weight->scalar_type()), op, ": weight must be float32, got ",
                     weight->scalar_type());
    weight_v = weight->scalar_type() == at::kFloat ? *weight : weight->to(at::kFloat);
    w.data[0] = data_of<float>(weight_v);
    w.stride[0] = weight_v.stride(0);
  }

  dispatch_kernel_dtype(s.scalar_type(), [&]<typename T>() {
    auto run = [&]<int TAIL, bool S_GRAD>() {
      auto kernel = sparse_kd_rows_kernel<T, TAIL, S_GRAD>;
      const int64_t limit = dynamic_shared_limit(reinterpret_cast<const void*>(kernel));
      // Dynamic shared memory: the bucket's bitmap where it fits (else a zeroed global scratch), then the staged
      // row where it fits too and FASTKD_CUDA_STAGE_BYTES allows it.
      int64_t shared = TAIL == kBucket ? bitmap_bytes(V) : 0;
      at::Tensor scratch;
      if (shared > limit) {
        scratch = at::zeros({rows, cdiv(V, 32)}, student.options().dtype(at::kInt));
        shared = 0;
      }
      const int64_t stage = staged_row_bytes(V, static_cast<int64_t>(sizeof(T)));
      if (stage <= stage_bytes_cap() && shared + stage <= limit) shared += stage;
      L.launch_with_shared(static_cast<unsigned>(rows), threads_for(V), static_cast<size_t>(shared), kernel,
                           data_of<T>(s), data_of<int64_t>(ids), data_of<float>(lp), data_or_null<int64_t>(labels_v),
                           mutable_data_of<float>(loss), student_grad ? mutable_data_of<T>(d_student) : nullptr,
                           scratch.defined() ? static_cast<unsigned*>(scratch.data_ptr()) : nullptr, w, V, K, sl,
                           static_cast<float>(1.0 / temperature), ignore_index);
    };
    dispatch_bool(student_grad, [&]<bool S_GRAD>() {
      if (tail_id == kRenormalize) {
        run.template operator()<kRenormalize, S_GRAD>();
      } else if (tail_id == kBucket) {
        run.template operator()<kBucket, S_GRAD>();
      } else {
        run.template operator()<kNone, S_GRAD>();
      }
    });
  });
  return {loss, d_student};
}

}  // namespace fastkd

TORCH_LIBRARY_IMPL(FASTKD_LIBRARY, FASTKD_DISPATCH_KEY, m) {
  m.impl("cuda_sparse_kd_rows", &fastkd::sparse_kd_rows);
}
