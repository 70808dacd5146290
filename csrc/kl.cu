// Fused KL divergence between two rows of logits, with an optional cross-entropy on the Y rows: the CUDA
// C++ version of fastkd/triton/kl.py (the specification; the maths are in its docstring), same semantics.
//
// KL(P || Q) with P from logits X and Q from logits Y, both divided by T: forward KL is X = teacher,
// Y = student; reverse swaps them. Per row, with x = X / T, y = Y / T, A = lse(x), B = lse(y):
//   KL = W / Z_x - (A - B),   W = sum exp(x - m)(x - y)  (streamed with lse(x))
// a term with p > 0 against y = -inf makes KL = +inf (tracked by the largest such x, never summed);
// CE = lse(Y) - Y_target on the raw Y logits (NaN for a target outside [0, V)).
// stats (rows, 4) float32: lse(x), lse(y), KL, lse(raw Y) (0 without a target).
#include "common.cuh"

namespace fastkd {
namespace {

constexpr int kStats = 4;

template <typename TX, typename TY>
__global__ void __launch_bounds__(kMaxThreads)
    kl_forward_kernel(const TX* __restrict__ x_base, const TY* __restrict__ y_base, const int64_t* __restrict__ labels,
                      const int64_t* __restrict__ target, float* __restrict__ kl_out, float* __restrict__ ce_out,
                      float* __restrict__ stats, int64_t V, RowLayout xl, RowLayout yl, float inv_temperature,
                      int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const TX* x_row = x_base + row_offset(row, xl);
  const TY* y_row = y_base + row_offset(row, yl);
  const bool has_ce = target != nullptr;
  bool active = true;
  if (labels != nullptr) active = labels[row] != ignore_index;
  const int64_t n_cols = active ? V : 0;  // an ignored token reads nothing

  // Per thread: [m_x, z_x, m_y, z_y, m_s, z_s, w, inf_x].
  Floats<8> s;
  s.v[0] = neg_inf(); s.v[1] = 0.0f;
  s.v[2] = neg_inf(); s.v[3] = 0.0f;
  s.v[4] = neg_inf(); s.v[5] = 0.0f;
  s.v[6] = 0.0f; s.v[7] = neg_inf();
  visit_row(x_row, xl.col, y_row, yl.col, n_cols, [&](int64_t, float x_raw, float y_raw, float&, float&) {
    const float x = x_raw * inv_temperature;
    const float y = y_raw * inv_temperature;
    float rescale, e;
    online_update(s.v[0], s.v[1], x, rescale, e);
    const float diff = x - y;
    s.v[6] = s.v[6] * rescale + ((e > 0.0f && diff != pos_inf()) ? e * diff : 0.0f);
    s.v[7] = fmaxf(s.v[7], diff == pos_inf() ? x : neg_inf());
    online_update(s.v[2], s.v[3], y);
    if (has_ce) online_update(s.v[4], s.v[5], y_raw);
  });
  const Floats<8> r = block_reduce<8>(s, [](const Floats<8>& a, const Floats<8>& b) {
    Floats<8> c;
    float wa, wb;
    combine_lse(c, a, b, 0, wa, wb);
    c.v[6] = a.v[6] * wa + b.v[6] * wb;  // W is weighted like z_x
    c.v[7] = fmaxf(a.v[7], b.v[7]);
    combine_lse(c, a, b, 2, wa, wb);
    combine_lse(c, a, b, 4, wa, wb);
    return c;
  });
  if (threadIdx.x != 0) return;

  const float sum_x = r.v[1];
  const float lse_x = r.v[0] + __logf(sum_x);
  const float lse_y = r.v[2] + __logf(r.v[3]);
  // Subtracting the lse difference last makes KL exactly 0 for one class and for identical rows.
  float kl = r.v[6] / sum_x - (lse_x - lse_y);
  if (__expf(r.v[7] - lse_x) > 0.0f) kl = pos_inf();
  float lse_s = 0.0f;
  if (has_ce) {
    lse_s = r.v[4] + __logf(r.v[5]);
    const int64_t t = target[row];
    const bool valid = t >= 0 && t < V;  // out of range: NaN, never an out-of-bounds read
    const float y_target = valid ? to_float(y_row[t * yl.col]) : 0.0f;
    ce_out[row] = valid ? lse_s - y_target : quiet_nan();
  }
  if (!active) kl = 0.0f;
  kl_out[row] = kl;
  stats[row * kStats + 0] = lse_x;
  stats[row * kStats + 1] = lse_y;
  stats[row * kStats + 2] = kl;
  stats[row * kStats + 3] = lse_s;
}

template <typename TX, typename TY, bool X_GRAD, bool Y_GRAD>
__global__ void __launch_bounds__(kMaxThreads)
    kl_backward_kernel(const TX* __restrict__ x_base, const TY* __restrict__ y_base,
                       const int64_t* __restrict__ labels, const int64_t* __restrict__ target,
                       const float* __restrict__ stats, const float* __restrict__ grad_kl,
                       const float* __restrict__ grad_ce, TX* __restrict__ dx_base, TY* __restrict__ dy_base,
                       int64_t V, RowLayout xl, RowLayout yl, float inv_temperature, int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  TX* dx = X_GRAD ? dx_base + row * V : nullptr;
  TY* dy = Y_GRAD ? dy_base + row * V : nullptr;
  if (labels != nullptr && labels[row] == ignore_index) {
    // An ignored token reads nothing and gets a zero gradient.
    if (X_GRAD) zero_row(dx, V);
    if (Y_GRAD) zero_row(dy, V);
    return;
  }
  const TX* x_row = x_base + row_offset(row, xl);
  const TY* y_row = y_base + row_offset(row, yl);
  const float lse_x = stats[row * kStats + 0];
  const float lse_y = stats[row * kStats + 1];
  const float kl = stats[row * kStats + 2];
  const float lse_s = stats[row * kStats + 3];
  // d/dX = d/dx / T: the 1/T rides on the incoming gradient.
  const float g_kl = grad_kl[row] * inv_temperature;
  const bool has_ce = grad_ce != nullptr;
  const float g_ce = has_ce ? grad_ce[row] : 0.0f;
  const int64_t t = has_ce ? target[row] : -1;
  visit_row<X_GRAD, Y_GRAD>(x_row, xl.col, y_row, yl.col, dx, dy, V,
                            [&](int64_t c, float x_raw, float y_raw, float& gx, float& gy) {
    const float x = x_raw * inv_temperature;
    const float y = y_raw * inv_temperature;
    const float p = __expf(x - lse_x);
    if (Y_GRAD) {
      float d = (__expf(y - lse_y) - p) * g_kl;
      if (has_ce) d += g_ce * (__expf(y_raw - lse_s) - (c == t ? 1.0f : 0.0f));
      gy = d;
    }
    if (X_GRAD) gx = (p > 0.0f ? p * ((x - lse_x) - (y - lse_y) - kl) : 0.0f) * g_kl;
  });
}

template <typename TX, typename TY, bool X_GRAD, bool Y_GRAD>
void launch_kl_backward(int64_t rows, int threads, cudaStream_t stream, const at::Tensor& x, const at::Tensor& y,
                        const int64_t* labels, const int64_t* target, const at::Tensor& stats,
                        const at::Tensor& grad_kl, const float* grad_ce, const at::Tensor& dx, const at::Tensor& dy,
                        int64_t V, const RowLayout& xl, const RowLayout& yl, float inv_temperature,
                        int64_t ignore_index) {
  FASTKD_LAUNCH(static_cast<unsigned>(rows), threads, 0, stream, kl_backward_kernel<TX, TY, X_GRAD, Y_GRAD>)(
      data_of<TX>(x), data_of<TY>(y), labels, target, data_of<float>(stats), data_of<float>(grad_kl), grad_ce,
      X_GRAD ? mutable_data_of<TX>(dx) : nullptr, Y_GRAD ? mutable_data_of<TY>(dy) : nullptr, V, xl, yl,
      inv_temperature, ignore_index);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_rows_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                            double temperature, bool reverse,
                                                            const std::optional<at::Tensor>& target,
                                                            const std::optional<at::Tensor>& labels,
                                                            int64_t ignore_index) {
  constexpr const char* op = "fastkd::cuda_kl_rows";
  check_logits(op, student, teacher);
  const at::cuda::CUDAGuard guard(student.device());
  const int64_t V = student.size(-1);
  const int64_t rows = row_count(student);
  const auto options = student.options().dtype(at::kFloat);
  at::Tensor kl = at::empty({rows}, options);
  at::Tensor ce = at::empty({target.has_value() ? rows : 0}, options);
  at::Tensor stats = at::empty({rows, kStats}, options);
  if (rows == 0) return {kl, ce, stats};
  at::Tensor target_v = target.has_value() ? index_vector(op, "target", *target, student, rows) : at::Tensor();
  at::Tensor labels_v = labels.has_value() ? index_vector(op, "labels", *labels, student, rows) : at::Tensor();
  const auto x_layout = row_layout(reverse ? student : teacher);
  const auto y_layout = row_layout(reverse ? teacher : student);
  const at::Tensor& x = x_layout.first;
  const at::Tensor& y = y_layout.first;
  const RowLayout xl = x_layout.second;
  const RowLayout yl = y_layout.second;
  const float inv_temperature = static_cast<float>(1.0 / temperature);
  const int threads = threads_for(V);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FASTKD_DISPATCH_FLOATING(x.scalar_type(), "cuda_kl_rows", [&] {
    using TX = scalar_t;
    FASTKD_DISPATCH_FLOATING(y.scalar_type(), "cuda_kl_rows", [&] {
      using TY = scalar_t;
      FASTKD_LAUNCH(static_cast<unsigned>(rows), threads, 0, stream, kl_forward_kernel<TX, TY>)(
          data_of<TX>(x), data_of<TY>(y), labels_v.defined() ? data_of<int64_t>(labels_v) : nullptr,
          target_v.defined() ? data_of<int64_t>(target_v) : nullptr, mutable_data_of<float>(kl),
          target_v.defined() ? mutable_data_of<float>(ce) : nullptr, mutable_data_of<float>(stats), V, xl, yl,
          inv_temperature, ignore_index);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {kl, ce, stats};
}

std::tuple<at::Tensor, at::Tensor> kl_rows_backward_cuda(
    const at::Tensor& grad_kl, const std::optional<at::Tensor>& grad_ce, const at::Tensor& student,
    const at::Tensor& teacher, const at::Tensor& stats, double temperature, bool reverse,
    const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& labels, int64_t ignore_index,
    bool student_grad, bool teacher_grad) {
  constexpr const char* op = "fastkd::cuda_kl_rows_backward";
  check_logits(op, student, teacher);
  const at::cuda::CUDAGuard guard(student.device());
  const int64_t V = student.size(-1);
  const int64_t rows = row_count(student);
  at::Tensor d_student = input_gradient(student, student_grad);
  at::Tensor d_teacher = input_gradient(teacher, teacher_grad);
  if (rows == 0 || !(student_grad || teacher_grad)) return {d_student, d_teacher};
  at::Tensor stats_c = stats_matrix(op, stats, student, rows, kStats);
  at::Tensor grad_kl_v = row_vector(op, "grad_kl", grad_kl, student, rows);
  // The CE term needs the target; without an incoming CE gradient it contributes nothing (a zero gradient).
  const bool has_ce = target.has_value() && grad_ce.has_value();
  at::Tensor target_v = has_ce ? index_vector(op, "target", *target, student, rows) : at::Tensor();
  at::Tensor grad_ce_v = has_ce ? row_vector(op, "grad_ce", *grad_ce, student, rows) : at::Tensor();
  at::Tensor labels_v = labels.has_value() ? index_vector(op, "labels", *labels, student, rows) : at::Tensor();
  const auto x_layout = row_layout(reverse ? student : teacher);
  const auto y_layout = row_layout(reverse ? teacher : student);
  const at::Tensor& x = x_layout.first;
  const at::Tensor& y = y_layout.first;
  const RowLayout xl = x_layout.second;
  const RowLayout yl = y_layout.second;
  const at::Tensor& dx = reverse ? d_student : d_teacher;
  const at::Tensor& dy = reverse ? d_teacher : d_student;
  const bool x_grad = reverse ? student_grad : teacher_grad;
  const bool y_grad = reverse ? teacher_grad : student_grad;
  const float inv_temperature = static_cast<float>(1.0 / temperature);
  const int threads = threads_for(V);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t* labels_p = labels_v.defined() ? data_of<int64_t>(labels_v) : nullptr;
  const int64_t* target_p = has_ce ? data_of<int64_t>(target_v) : nullptr;
  const float* grad_ce_p = has_ce ? data_of<float>(grad_ce_v) : nullptr;
  FASTKD_DISPATCH_FLOATING(x.scalar_type(), "cuda_kl_rows_backward", [&] {
    using TX = scalar_t;
    FASTKD_DISPATCH_FLOATING(y.scalar_type(), "cuda_kl_rows_backward", [&] {
      using TY = scalar_t;
      if (x_grad && y_grad) {
        launch_kl_backward<TX, TY, true, true>(rows, threads, stream, x, y, labels_p, target_p, stats_c, grad_kl_v,
                                               grad_ce_p, dx, dy, V, xl, yl, inv_temperature, ignore_index);
      } else if (x_grad) {
        launch_kl_backward<TX, TY, true, false>(rows, threads, stream, x, y, labels_p, target_p, stats_c,
                                                grad_kl_v, grad_ce_p, dx, dy, V, xl, yl, inv_temperature,
                                                ignore_index);
      } else {
        launch_kl_backward<TX, TY, false, true>(rows, threads, stream, x, y, labels_p, target_p, stats_c,
                                                grad_kl_v, grad_ce_p, dx, dy, V, xl, yl, inv_temperature,
                                                ignore_index);
      }
    });
  });
  return {d_student, d_teacher};
}

}  // namespace
}  // namespace fastkd

TORCH_LIBRARY_IMPL(FASTKD_LIBRARY, FASTKD_DISPATCH_KEY, m) {
  m.impl("cuda_kl_rows", &fastkd::kl_rows_cuda);
  m.impl("cuda_kl_rows_backward", &fastkd::kl_rows_backward_cuda);
}
