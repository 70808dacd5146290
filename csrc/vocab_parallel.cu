// Vocabulary-parallel (tensor-parallel) divergences, the per-slice kernels between the collectives: the CUDA C++
// version of fastkd/triton/vocab_parallel.py (the specification: the maths, its docstring; the semantics, the plain
// torch `fastkd.distributed.vocab_parallel._StudentDivergence` / `_kl_partial`), same formulation.
//
// Each rank holds the same rows and a slice of the vocabulary of the student's logits S and the teacher's Tl
// (`(..., V_local)`, any row strides, fp32/bf16/fp16, each its own dtype); float32 maths on x = S * (1/T),
// y = Tl * (1/T) (`inv_temperature` the float 1/T, rounded once per element by `scaled`, as every row kernel).
// Per-row pairs are float32 `(rows, 2)`, any strides, column 0 the student, 1 the teacher.
//
// 1. vocab_row_stats -> maxima, sums: per slice row m = max x, z = sum exp(x - m) (a row all -inf: m = -inf,
//    z = 0: the sums taken against finite_or_zero(m)), for both sides. The caller forms the global M = max m,
//    Z = sum z exp(m - M) over the ranks and hands back shift = M (0 where not finite) and log_total = log Z.
//    Two passes, as every row kernel here (common.cuh): the maxima, then the sums against them (no rescaling,
//    so no rescaling error; the Triton twin's one-pass online update shares one exponential between the rescale
//    and the new term instead). Pass 1 stages the row pair in shared memory where it fits (`first_pass`: a slice
//    of V_local = 16K bf16, a 128K vocabulary over 8 ranks, is a 64 KiB pair) and pass 2 reads the copy.
// 2. vocab_row_terms -> partial, d_student: with log q_j = (x_j - shift_s) - log_total_s and log p_j =
//    (y_j - shift_t) - log_total_t (that order of operations, as `vocab_parallel.log_probs`), the slice's sums
//      "forward": [sum p (log p - log q), 0],  "reverse": [sum q (log q - log p), 0],
//      "jsd" (0 < beta < 1): [sum p (log p - log m), sum q (log q - log m)],  m = beta p + (1 - beta) q,
//    each term `l * where(l > 0, log l - log r, 0)` for its left probability l (`_kl_partial`: 0 where l = 0, also
//    against -inf; +inf for l > 0 against r = 0; a NaN passes); log p - log m and log q - log m from
//    delta = log p - log q without cancellation (common.cuh `mixture_log_ratios`, with L = 0). Forward KL's
//    student gradient needs no global row sum, so with `student_grad` the same pass writes
//      d/dS_j = weight_r (q_j - p_j) / T       (`exp_diff(log q, log p, q, p)`: relative accuracy, 0 for q = p)
//    in the student's dtype, contiguous, its shape (rounded once at the store). One pass, nothing staged.
// 3. vocab_row_grad -> d_student for the kinds whose gradient needs the GLOBAL row KL (`row_kl`, float32 (rows,),
//    any stride: the partials summed over the ranks; the student part KL(q || m) for "jsd"):
//      "reverse": weight_r q_j (d_j - KL_r) / T,              d_j = where(q_j > 0, log q_j - log p_j, 0)
//      "jsd":     weight_r (1 - beta) q_j (d_j - KL_r) / T,   d_j = where(q_j > 0, log q_j - log m_j, 0)
//    One pass, nothing staged.
//
// Design and bounds: one block per row (threads_for(V_local)), `visit_row`'s 16-byte vector loads where the rows
// are contiguous, block reductions; the per-row numbers (shift, log_total, weight, row_kl) read once per block.
// Per element of the slice, b = 2 bytes for bf16/fp16, 4 for fp32 (the same element count for both sides):
// - stats: staged, reads 2b (S and Tl once); re-read (a slice pair beyond the shared memory), 4b (pass 2 mostly
//   from L2); writes nothing N x V. 2 `exp_accurate` (one per side; one MUFU ex2 each): memory-bound at bf16 on
//   an H200 (~4.8 TB/s against ~4.2e12 ex2/s: 2 ex2 per 4 bytes is under the ~0.9 per byte budget).
// - terms: reads 2b; "forward" 1 exp (p), with the gradient 1 exp more (q) and a write of b (2 exp per 3b);
//   "reverse" 1 exp (q); "jsd" 2 exp (p, q) + 1 `expm1_accurate` (an exp beyond |t| = 1/2) + 1 log1pf = 4 MUFU
//   per 2b: at bf16 about at the MUFU bound, at fp32 memory-bound.
// - grad: reads 2b, writes b; "reverse" 1 exp (q); "jsd" 1 exp + 1 expm1 + 1 log1pf (the mixture recomputed
//   rather than stored by the terms pass: storing and re-reading it would move 8 bytes more per element).
// No per-element division anywhere (the normalisers are logs here, subtracted). Forward KL with the student's
// gradient is two launches over the slice (stats; terms + gradient), reads 4b (staged stats) and writes b per
// element; reverse KL and JSD three (stats, terms, grad), reads 6b, writes b. Precision: see common.cuh.
#include "common.cuh"

#include <limits>
#include <string>
#include <vector>

namespace fastkd {
namespace {

enum class Kind : int { kForward = 0, kReverse = 1, kJsd = 2 };

// A float32 (rows, 2) per-row pair, any strides: row r's student number at data[r * row], teacher's at
// data[r * row + col].
struct RowPairInput {
  const float* data;
  int64_t row, col;

  __device__ __forceinline__ float student(int64_t r) const { return data[r * row]; }
  __device__ __forceinline__ float teacher(int64_t r) const { return data[r * row + col]; }
};

// The global normalisers of a row: log q = (x - shift_s) - lt_s, log p = (y - shift_t) - lt_t.
struct Normalisers {
  float shift_s, shift_t, lt_s, lt_t;

  __device__ __forceinline__ Normalisers(const RowPairInput& shift, const RowPairInput& log_total, int64_t row)
      : shift_s(shift.student(row)), shift_t(shift.teacher(row)), lt_s(log_total.student(row)),
        lt_t(log_total.teacher(row)) {}

  __device__ __forceinline__ float log_q(float x_raw, float inv_temperature) const {
    return (scaled(x_raw, inv_temperature) - shift_s) - lt_s;
  }
  __device__ __forceinline__ float log_p(float y_raw, float inv_temperature) const {
    return (scaled(y_raw, inv_temperature) - shift_t) - lt_t;
  }
};

// `l * where(l > 0, d, 0)`: a term of KL whose left probability is l (`vocab_parallel._kl_partial`).
__device__ __forceinline__ float kl_term(float l, float d) { return l * (l > 0.0f ? d : 0.0f); }

template <typename TX, typename TY>
__global__ void __launch_bounds__(kMaxThreads)
    vocab_stats_kernel(const TX* __restrict__ x_base, const TY* __restrict__ y_base, float* __restrict__ max_out,
                       float* __restrict__ sum_out, int64_t V, RowLayout xl, RowLayout yl, float inv_temperature) {
  const int64_t row = blockIdx.x;
  const TX* x_row = x_base + row_offset(row, xl);
  const TY* y_row = y_base + row_offset(row, yl);

  // Pass 1: the maxima (and the copy of the row pair, where it fits).
  const Floats<2> m = pair_maxima(x_row, xl.col, y_row, yl.col, V, row, V, inv_temperature);
  const float m_x = finite_or_zero(m.v[0]);
  const float m_y = finite_or_zero(m.v[1]);

  // Pass 2: the sums against the final maxima (0 for a row all -inf: exp(-inf - 0)).
  Floats<2> z;
  z.v[0] = 0.0f;
  z.v[1] = 0.0f;
  const RowPair<TX, TY> in2 = rows_to_read(x_row, xl.col, y_row, yl.col, V, row, V);
  visit_row(in2.x, in2.x_col, in2.y, in2.y_col, V, [&](int64_t, float x_raw, float y_raw, float&, float&) {
    z.v[0] += exp_accurate(scaled(x_raw, inv_temperature) - m_x);
    z.v[1] += exp_accurate(scaled(y_raw, inv_temperature) - m_y);
  });
  z = block_sum<2>(z);
  if (threadIdx.x != 0) return;
  max_out[2 * row] = m.v[0];
  max_out[2 * row + 1] = m.v[1];
  sum_out[2 * row] = z.v[0];
  sum_out[2 * row + 1] = z.v[1];
}

template <typename TX, typename TY, Kind KIND, bool X_GRAD>
__global__ void __launch_bounds__(kMaxThreads)
    vocab_terms_kernel(const TX* __restrict__ x_base, const TY* __restrict__ y_base, RowPairInput shift,
                       RowPairInput log_total, RowWeights weights, float* __restrict__ part_out,
                       TX* __restrict__ dx_base, int64_t V, RowLayout xl, RowLayout yl, float inv_temperature,
                       float beta, float one_minus_beta) {
  const int64_t row = blockIdx.x;
  const TX* x_row = x_base + row_offset(row, xl);
  const TY* y_row = y_base + row_offset(row, yl);
  const Normalisers n(shift, log_total, row);
  const float g = X_GRAD ? weights.at(0, row) * inv_temperature : 0.0f;

  Floats<2> acc;
  acc.v[0] = 0.0f;
  acc.v[1] = 0.0f;
  visit_row<X_GRAD, false>(x_row, xl.col, y_row, yl.col, X_GRAD ? dx_base + row * V : nullptr,
                           static_cast<float*>(nullptr), V,
                           [&](int64_t, float x_raw, float y_raw, float& gx, float&) {
    const float log_q = n.log_q(x_raw, inv_temperature);
    const float log_p = n.log_p(y_raw, inv_temperature);
    if constexpr (KIND == Kind::kForward) {
      const float p = exp_accurate(log_p);
      acc.v[0] += kl_term(p, log_p - log_q);
      if constexpr (X_GRAD) gx = exp_diff(log_q, log_p, exp_accurate(log_q), p) * g;
    } else if constexpr (KIND == Kind::kReverse) {
      acc.v[0] += kl_term(exp_accurate(log_q), log_q - log_p);
    } else {
      const MixtureLogRatios r = mixture_log_ratios(log_q, log_p, 0.0f, beta, one_minus_beta);
      acc.v[0] += kl_term(exp_accurate(log_p), r.lp_m);
      acc.v[1] += kl_term(exp_accurate(log_q), r.lq_m);
    }
  });
  acc = block_sum<2>(acc);
  if (threadIdx.x != 0) return;
  part_out[2 * row] = acc.v[0];
  part_out[2 * row + 1] = acc.v[1];
}

// weights: slot 0 the row's weight (1 where not given), slot 1 the global row KL.
template <typename TX, typename TY, Kind KIND>
__global__ void __launch_bounds__(kMaxThreads)
    vocab_grad_kernel(const TX* __restrict__ x_base, const TY* __restrict__ y_base, RowPairInput shift,
                      RowPairInput log_total, RowWeights weights, TX* __restrict__ dx_base, int64_t V, RowLayout xl,
                      RowLayout yl, float inv_temperature, float beta, float one_minus_beta) {
  const int64_t row = blockIdx.x;
  const TX* x_row = x_base + row_offset(row, xl);
  const TY* y_row = y_base + row_offset(row, yl);
  const Normalisers n(shift, log_total, row);
  const float kl = weights.at(1, row);
  float g = weights.at(0, row) * inv_temperature;
  if constexpr (KIND == Kind::kJsd) g = g * one_minus_beta;
  visit_row<true, false>(x_row, xl.col, y_row, yl.col, dx_base + row * V, static_cast<float*>(nullptr), V,
                         [&](int64_t, float x_raw, float y_raw, float& gx, float&) {
    const float log_q = n.log_q(x_raw, inv_temperature);
    const float log_p = n.log_p(y_raw, inv_temperature);
    const float q = exp_accurate(log_q);
    float d;
    if constexpr (KIND == Kind::kReverse) {
      d = log_q - log_p;
    } else {
      d = mixture_log_ratios(log_q, log_p, 0.0f, beta, one_minus_beta).lq_m;
    }
    gx = q * ((q > 0.0f ? d : 0.0f) - kl) * g;
  });
}

// --- host side ----------------------------------------------------------------------------------------------------

// The kind's code, checked as the Triton launchers check it (a ValueError).
Kind parse_kind(const char* op, const std::string& kind, double beta) {
  Kind k;
  if (kind == "forward") {
    k = Kind::kForward;
  } else if (kind == "reverse") {
    k = Kind::kReverse;
  } else if (kind == "jsd") {
    k = Kind::kJsd;
  } else {
    TORCH_CHECK_VALUE(false, op, ": kind must be one of ('forward', 'reverse', 'jsd'), got '", kind, "'");
  }
  TORCH_CHECK_VALUE(k != Kind::kJsd || (beta > 0.0 && beta < 1.0), op, ": kind 'jsd' needs 0 < beta < 1, got ",
                    beta);
  return k;
}

// Calls f.template operator()<KIND>() with the kind as a template argument.
template <typename F>
void dispatch_kind(Kind k, F&& f) {
  switch (k) {
    case Kind::kForward:
      f.template operator()<Kind::kForward>();
      break;
    case Kind::kReverse:
      f.template operator()<Kind::kReverse>();
      break;
    case Kind::kJsd:
      f.template operator()<Kind::kJsd>();
      break;
  }
}

// The rows of a slice pair `(..., V_local)`: the checks of check_logits but for an empty slice (V_local = 0: a
// rank whose slice of the vocabulary is empty), which the launchers answer without a launch.
int64_t slice_rows(const char* op, const at::Tensor& student, const at::Tensor& teacher) {
  TORCH_CHECK_VALUE(student.sizes() == teacher.sizes(), op, ": student and teacher slices must have one shape, got ",
                    student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK_VALUE(student.dim() >= 1, op, ": the slices need a vocabulary dimension");
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < student.dim(); ++d) rows *= student.size(d);
  return rows;
}

// A (rows, 2) per-row pair of float numbers on the logits' device, as float32 (converted only where it is not),
// any strides; the returned tensor must outlive the launch.
at::Tensor row_pair(const char* op, const char* name, const at::Tensor& t, const at::Tensor& logits, int64_t rows) {
  check_same_device(op, name, t, "the logits", logits);
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == 2, op, ": ", name, " must have shape (", rows,
                    ", 2), got ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be float32, got ", t.scalar_type());
  return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
}

RowPairInput pair_input(const at::Tensor& t) { return RowPairInput{data_of<float>(t), t.stride(0), t.stride(1)}; }

// The row call of a slice operator: 1/T is the float `inv_temperature` itself (RowLaunch's own, from a temperature,
// is not used: 1 / (1 / invT) need not round back to invT).
struct SliceCall : RowCall {
  float inv_t;
  SliceCall(const char* op, const at::Tensor& student, const at::Tensor& teacher, double inv_temperature,
            bool student_grad)
      : RowCall(op, student, teacher, 1.0, std::nullopt, /*x_student=*/true, student_grad, false, false),
        inv_t(static_cast<float>(inv_temperature)) {}

  // One block of `threads` per row, no staged rows (the single-pass kernels).
  template <typename... P, typename... A>
  void launch_unstaged(void (*kernel)(P...), A&&... args) const {
    Launch::launch(static_cast<unsigned>(rows), threads, kernel, std::forward<A>(args)...);
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> vocab_row_stats(const at::Tensor& student, const at::Tensor& teacher,
                                                   double inv_temperature) {
  const char* op = "fastkd::cuda_vocab_row_stats";
  const int64_t rows = slice_rows(op, student, teacher);
  if (student.size(-1) == 0) {
    const auto floats = student.options().dtype(at::kFloat);
    return {at::full({rows, 2}, -std::numeric_limits<float>::infinity(), floats), at::zeros({rows, 2}, floats)};
  }
  const RowLaunch L(op, student, teacher, 1.0, /*x_student=*/true);
  at::Tensor maxima = at::empty({L.rows, 2}, L.floats);
  at::Tensor sums = at::empty({L.rows, 2}, L.floats);
  if (L.idle()) return {maxima, sums};
  const float inv_t = static_cast<float>(inv_temperature);
  L.dispatch([&]<typename TX, typename TY>(const TX* x, const TY* y) {
    L.launch(vocab_stats_kernel<TX, TY>, x, y, mutable_data_of<float>(maxima), mutable_data_of<float>(sums), L.V,
             L.xl, L.yl, inv_t);
  });
  return {maxima, sums};
}

std::tuple<at::Tensor, at::Tensor> vocab_row_terms(const at::Tensor& student, const at::Tensor& teacher,
                                                   double inv_temperature, const at::Tensor& shift,
                                                   const at::Tensor& log_total, c10::string_view kind, double beta,
                                                   const std::optional<at::Tensor>& weight, bool student_grad) {
  const char* op = "fastkd::cuda_vocab_row_terms";
  const int64_t rows = slice_rows(op, student, teacher);
  const Kind k = parse_kind(op, std::string(kind.data(), kind.size()), beta);
  TORCH_CHECK_VALUE(!student_grad || k == Kind::kForward, op,
                    ": the gradient is made here for kind 'forward' only (the others need the global row KL: "
                    "vocab_row_grad), got kind '", std::string(kind.data(), kind.size()), "'");
  if (student.size(-1) == 0) {
    return {at::zeros({rows, 2}, student.options().dtype(at::kFloat)),
            at::empty(student_grad ? student.sizes().vec() : std::vector<int64_t>{0}, student.options())};
  }
  const SliceCall L(op, student, teacher, inv_temperature, student_grad);
  at::Tensor partial = at::empty({L.rows, 2}, L.floats);
  if (L.idle()) return {partial, L.d_student};
  const at::Tensor shift_f = row_pair(op, "shift", shift, L.x, L.rows);
  const at::Tensor log_total_f = row_pair(op, "log_total", log_total, L.x, L.rows);
  const RowWeights w = L.weights("weight", weight);  // all ones (unread) without the gradient
  const float beta_f = static_cast<float>(beta);
  const float one_minus_beta = static_cast<float>(1.0 - beta);
  L.dispatch([&]<typename TX, typename TY, bool X_GRAD, bool Y_GRAD>(const TX* x, const TY* y, TX* dx, TY*) {
    dispatch_kind(k, [&]<Kind KIND>() {
      if constexpr (!X_GRAD || KIND == Kind::kForward) {  // the other instances are refused above
        L.launch_unstaged(vocab_terms_kernel<TX, TY, KIND, X_GRAD>, x, y, pair_input(shift_f),
                          pair_input(log_total_f), w, mutable_data_of<float>(partial), dx, L.V, L.xl, L.yl, L.inv_t,
                          beta_f, one_minus_beta);
      }
    });
  });
  return {partial, L.d_student};
}

at::Tensor vocab_row_grad(const at::Tensor& student, const at::Tensor& teacher, double inv_temperature,
                          const at::Tensor& shift, const at::Tensor& log_total, c10::string_view kind, double beta,
                          const at::Tensor& row_kl, const std::optional<at::Tensor>& weight) {
  const char* op = "fastkd::cuda_vocab_row_grad";
  slice_rows(op, student, teacher);
  const Kind k = parse_kind(op, std::string(kind.data(), kind.size()), beta);
  TORCH_CHECK_VALUE(k != Kind::kForward, op,
                    ": kind 'forward' has its gradient from vocab_row_terms(student_grad=True)");
  if (student.size(-1) == 0) return at::empty(student.sizes(), student.options());
  const SliceCall L(op, student, teacher, inv_temperature, /*student_grad=*/true);
  if (L.idle()) return L.d_student;
  const at::Tensor shift_f = row_pair(op, "shift", shift, L.x, L.rows);
  const at::Tensor log_total_f = row_pair(op, "log_total", log_total, L.x, L.rows);
  const RowWeights w = L.weights("weight", weight, "row_kl", row_kl);
  const float beta_f = static_cast<float>(beta);
  const float one_minus_beta = static_cast<float>(1.0 - beta);
  L.dispatch([&]<typename TX, typename TY, bool X_GRAD, bool Y_GRAD>(const TX* x, const TY* y, TX* dx, TY*) {
    dispatch_kind(k, [&]<Kind KIND>() {
      if constexpr (X_GRAD && KIND != Kind::kForward) {  // always the student's gradient; forward refused above
        L.launch_unstaged(vocab_grad_kernel<TX, TY, KIND>, x, y, pair_input(shift_f), pair_input(log_total_f), w, dx,
                          L.V, L.xl, L.yl, L.inv_t, beta_f, one_minus_beta);
      }
    });
  });
  return L.d_student;
}

}  // namespace fastkd

TORCH_LIBRARY_IMPL(FASTKD_LIBRARY, FASTKD_DISPATCH_KEY, m) {
  m.impl("cuda_vocab_row_stats", &fastkd::vocab_row_stats);
  m.impl("cuda_vocab_row_terms", &fastkd::vocab_row_terms);
  m.impl("cuda_vocab_row_grad", &fastkd::vocab_row_grad);
}
