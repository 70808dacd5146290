// Fused generalized Jensen-Shannon divergence (0 < beta < 1) between two rows of logits: the CUDA C++
// version of fastkd/triton/jsd.py (the specification; the maths are in its docstring), same semantics.
//
// Student x = S / T, teacher y = T_logits / T, A = lse(x), B = lse(y), q = exp(x - A), p = exp(y - B),
// m = beta p + (1 - beta) q:   JSD = beta KL(p || m) + (1 - beta) KL(q || m).
// Forward: pass 1 streams the two log-sum-exps, pass 2 (same block) re-reads the row and sums the two
// divergences against log m. stats (rows, 4) float32: A, B, KL(p || m), KL(q || m).
// Backward: dJSD/dx_j = (1 - beta) q_j ((log q_j - log m_j) - KL(q || m)), dJSD/dy_j likewise with beta, p.
#include "common.cuh"

namespace fastkd {
namespace {

constexpr int kStats = 4;

// log(beta p + (1 - beta) q) from log q, log p (jsd.py `log_mixture`): hi + log1p(w_lo expm1(lo - hi));
// finite (unused) where both are -inf.
__device__ __forceinline__ float log_mixture(float log_q, float log_p, float beta, float one_minus_beta) {
  const bool both_zero = log_q == neg_inf() && log_p == neg_inf();
  const bool q_is_lo = log_q < log_p;
  const float hi = both_zero ? 0.0f : (q_is_lo ? log_p : log_q);
  const float lo = both_zero ? 0.0f : (q_is_lo ? log_q : log_p);
  const float weight_lo = q_is_lo ? one_minus_beta : beta;
  return hi + log1pf(weight_lo * expm1f(lo - hi));
}

template <typename TX, typename TY>
__global__ void __launch_bounds__(kMaxThreads)
    jsd_forward_kernel(const TX* __restrict__ x_base, const TY* __restrict__ y_base,
                       const int64_t* __restrict__ labels, float* __restrict__ loss_out, float* __restrict__ stats,
                       int64_t V, RowLayout xl, RowLayout yl, float inv_temperature, float beta,
                       float one_minus_beta, int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const TX* x_row = x_base + row_offset(row, xl);
  const TY* y_row = y_base + row_offset(row, yl);
  bool active = true;
  if (labels != nullptr) active = labels[row] != ignore_index;
  const int64_t n_cols = active ? V : 0;  // an ignored token reads nothing

  // Pass 1: the two log-sum-exps. Per thread: [m_x, z_x, m_y, z_y].
  Floats<4> s;
  s.v[0] = neg_inf(); s.v[1] = 0.0f;
  s.v[2] = neg_inf(); s.v[3] = 0.0f;
  visit_row(x_row, xl.col, y_row, yl.col, n_cols, [&](int64_t, float x_raw, float y_raw, float&, float&) {
    online_update(s.v[0], s.v[1], x_raw * inv_temperature);
    online_update(s.v[2], s.v[3], y_raw * inv_temperature);
  });
  const Floats<4> r = block_reduce<4>(s, [](const Floats<4>& a, const Floats<4>& b) {
    Floats<4> c;
    float wa, wb;
    combine_lse(c, a, b, 0, wa, wb);
    combine_lse(c, a, b, 2, wa, wb);
    return c;
  });
  const float lse_x = r.v[0] + __logf(r.v[1]);
  const float lse_y = r.v[2] + __logf(r.v[3]);

  // Pass 2: both divergences against the mixture. Per thread: [sum q (log q - log m), sum p (log p - log m)].
  Floats<2> acc;
  acc.v[0] = 0.0f;
  acc.v[1] = 0.0f;
  visit_row(x_row, xl.col, y_row, yl.col, n_cols, [&](int64_t, float x_raw, float y_raw, float&, float&) {
    const float log_q = x_raw * inv_temperature - lse_x;
    const float log_p = y_raw * inv_temperature - lse_y;
    const float log_m = log_mixture(log_q, log_p, beta, one_minus_beta);
    const float q = __expf(log_q);
    const float p = __expf(log_p);
    acc.v[0] += q > 0.0f ? q * (log_q - log_m) : 0.0f;
    acc.v[1] += p > 0.0f ? p * (log_p - log_m) : 0.0f;
  });
  const Floats<2> sums = block_sum<2>(acc);
  if (threadIdx.x != 0) return;
  const float kl_q = sums.v[0];
  const float kl_p = sums.v[1];
  float loss = beta * kl_p + one_minus_beta * kl_q;
  if (!active) loss = 0.0f;
  loss_out[row] = loss;
  stats[row * kStats + 0] = lse_x;
  stats[row * kStats + 1] = lse_y;
  stats[row * kStats + 2] = kl_p;
  stats[row * kStats + 3] = kl_q;
}

template <typename TX, typename TY, bool X_GRAD, bool Y_GRAD>
__global__ void __launch_bounds__(kMaxThreads)
    jsd_backward_kernel(const TX* __restrict__ x_base, const TY* __restrict__ y_base,
                        const int64_t* __restrict__ labels, const float* __restrict__ stats,
                        const float* __restrict__ grad, TX* __restrict__ dx_base, TY* __restrict__ dy_base,
                        int64_t V, RowLayout xl, RowLayout yl, float inv_temperature, float beta,
                        float one_minus_beta, int64_t ignore_index) {
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
  const float kl_p = stats[row * kStats + 2];
  const float kl_q = stats[row * kStats + 3];
  // d/dS = d/dx / T: the 1/T rides on the incoming gradient, and so do the mixture weights.
  const float g = grad[row] * inv_temperature;
  const float g_x = g * one_minus_beta;
  const float g_y = g * beta;
  visit_row<X_GRAD, Y_GRAD>(x_row, xl.col, y_row, yl.col, dx, dy, V,
                            [&](int64_t, float x_raw, float y_raw, float& gx, float& gy) {
    const float log_q = x_raw * inv_temperature - lse_x;
    const float log_p = y_raw * inv_temperature - lse_y;
    const float log_m = log_mixture(log_q, log_p, beta, one_minus_beta);
    if (X_GRAD) {
      const float q = __expf(log_q);
      gx = (q > 0.0f ? q * ((log_q - log_m) - kl_q) : 0.0f) * g_x;
    }
    if (Y_GRAD) {
      const float p = __expf(log_p);
      gy = (p > 0.0f ? p * ((log_p - log_m) - kl_p) : 0.0f) * g_y;
    }
  });
}

template <typename TX, typename TY, bool X_GRAD, bool Y_GRAD>
void launch_jsd_backward(int64_t rows, int threads, cudaStream_t stream, const at::Tensor& x, const at::Tensor& y,
                         const int64_t* labels, const at::Tensor& stats, const at::Tensor& grad,
                         const at::Tensor& dx, const at::Tensor& dy, int64_t V, const RowLayout& xl,
                         const RowLayout& yl, float inv_temperature, float beta, float one_minus_beta,
                         int64_t ignore_index) {
  FASTKD_LAUNCH(static_cast<unsigned>(rows), threads, 0, stream, jsd_backward_kernel<TX, TY, X_GRAD, Y_GRAD>)(
      data_of<TX>(x), data_of<TY>(y), labels, data_of<float>(stats), data_of<float>(grad),
      X_GRAD ? mutable_data_of<TX>(dx) : nullptr, Y_GRAD ? mutable_data_of<TY>(dy) : nullptr, V, xl, yl,
      inv_temperature, beta, one_minus_beta, ignore_index);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_beta(double beta) {
  TORCH_CHECK_VALUE(beta > 0.0 && beta < 1.0,
                    "the JSD kernels take 0 < beta < 1 (0 and 1 are the KL kernels), got beta=", beta);
}

std::tuple<at::Tensor, at::Tensor> jsd_rows_cuda(const at::Tensor& student, const at::Tensor& teacher, double beta,
                                                 double temperature, const std::optional<at::Tensor>& labels,
                                                 int64_t ignore_index) {
  constexpr const char* op = "fastkd::cuda_jsd_rows";
  check_beta(beta);
  check_logits(op, student, teacher);
  const at::cuda::CUDAGuard guard(student.device());
  const int64_t V = student.size(-1);
  const int64_t rows = row_count(student);
  const auto options = student.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({rows}, options);
  at::Tensor stats = at::empty({rows, kStats}, options);
  if (rows == 0) return {loss, stats};
  at::Tensor labels_v = labels.has_value() ? index_vector(op, "labels", *labels, student, rows) : at::Tensor();
  const auto x_layout = row_layout(student);
  const auto y_layout = row_layout(teacher);
  const at::Tensor& x = x_layout.first;
  const at::Tensor& y = y_layout.first;
  const RowLayout xl = x_layout.second;
  const RowLayout yl = y_layout.second;
  const float inv_temperature = static_cast<float>(1.0 / temperature);
  const float beta_f = static_cast<float>(beta);
  const float one_minus_beta = static_cast<float>(1.0 - beta);
  const int threads = threads_for(V);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FASTKD_DISPATCH_FLOATING(x.scalar_type(), "cuda_jsd_rows", [&] {
    using TX = scalar_t;
    FASTKD_DISPATCH_FLOATING(y.scalar_type(), "cuda_jsd_rows", [&] {
      using TY = scalar_t;
      FASTKD_LAUNCH(static_cast<unsigned>(rows), threads, 0, stream, jsd_forward_kernel<TX, TY>)(
          data_of<TX>(x), data_of<TY>(y), labels_v.defined() ? data_of<int64_t>(labels_v) : nullptr,
          mutable_data_of<float>(loss), mutable_data_of<float>(stats), V, xl, yl, inv_temperature, beta_f,
          one_minus_beta, ignore_index);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> jsd_rows_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& student,
                                                          const at::Tensor& teacher, const at::Tensor& stats,
                                                          double beta, double temperature,
                                                          const std::optional<at::Tensor>& labels,
                                                          int64_t ignore_index, bool student_grad,
                                                          bool teacher_grad) {
  constexpr const char* op = "fastkd::cuda_jsd_rows_backward";
  check_beta(beta);
  check_logits(op, student, teacher);
  const at::cuda::CUDAGuard guard(student.device());
  const int64_t V = student.size(-1);
  const int64_t rows = row_count(student);
  at::Tensor d_student = input_gradient(student, student_grad);
  at::Tensor d_teacher = input_gradient(teacher, teacher_grad);
  if (rows == 0 || !(student_grad || teacher_grad)) return {d_student, d_teacher};
  at::Tensor stats_c = stats_matrix(op, stats, student, rows, kStats);
  at::Tensor grad_v = row_vector(op, "grad_loss", grad_loss, student, rows);
  at::Tensor labels_v = labels.has_value() ? index_vector(op, "labels", *labels, student, rows) : at::Tensor();
  const auto x_layout = row_layout(student);
  const auto y_layout = row_layout(teacher);
  const at::Tensor& x = x_layout.first;
  const at::Tensor& y = y_layout.first;
  const RowLayout xl = x_layout.second;
  const RowLayout yl = y_layout.second;
  const float inv_temperature = static_cast<float>(1.0 / temperature);
  const float beta_f = static_cast<float>(beta);
  const float one_minus_beta = static_cast<float>(1.0 - beta);
  const int threads = threads_for(V);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t* labels_p = labels_v.defined() ? data_of<int64_t>(labels_v) : nullptr;
  FASTKD_DISPATCH_FLOATING(x.scalar_type(), "cuda_jsd_rows_backward", [&] {
    using TX = scalar_t;
    FASTKD_DISPATCH_FLOATING(y.scalar_type(), "cuda_jsd_rows_backward", [&] {
      using TY = scalar_t;
      if (student_grad && teacher_grad) {
        launch_jsd_backward<TX, TY, true, true>(rows, threads, stream, x, y, labels_p, stats_c, grad_v, d_student,
                                                d_teacher, V, xl, yl, inv_temperature, beta_f, one_minus_beta,
                                                ignore_index);
      } else if (student_grad) {
        launch_jsd_backward<TX, TY, true, false>(rows, threads, stream, x, y, labels_p, stats_c, grad_v,
                                                 d_student, d_teacher, V, xl, yl, inv_temperature, beta_f,
                                                 one_minus_beta, ignore_index);
      } else {
        launch_jsd_backward<TX, TY, false, true>(rows, threads, stream, x, y, labels_p, stats_c, grad_v,
                                                 d_student, d_teacher, V, xl, yl, inv_temperature, beta_f,
                                                 one_minus_beta, ignore_index);
      }
    });
  });
  return {d_student, d_teacher};
}

}  // namespace
}  // namespace fastkd

TORCH_LIBRARY_IMPL(FASTKD_LIBRARY, FASTKD_DISPATCH_KEY, m) {
  m.impl("cuda_jsd_rows", &fastkd::jsd_rows_cuda);
  m.impl("cuda_jsd_rows_backward", &fastkd::jsd_rows_backward_cuda);
}
