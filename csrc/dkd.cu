// Fused decoupled KD (DKD): the target-class (TCKD) and non-target-class (NCKD) KL of two rows of logits: the
// CUDA C++ version of fastkd/triton/dkd.py (the specification; the maths are in its docstring), same semantics.
//
// Target g, student x = S / T, teacher y = T_logits / T, R_x = lse_{c != g} x_c, R_y = lse_{c != g} y_c:
//   TCKD = KL(b_t || b_s) over the binary split [target, rest] (log b = [z_g - lse, R - lse]);
//   NCKD = W / Z - (R_y - R_x), W = sum_{c != g} exp(y_c - m)(y_c - x_c) streamed with lse(y) over c != g;
//   a teacher term against x_c = -inf makes NCKD = +inf; no non-target teacher mass gives NCKD = 0.
// An out-of-range target gives NaN (never an out-of-bounds read).
// stats (rows, 6) float32: R_x, R_y, x_g, y_g (NaN for an out-of-range target), TCKD, NCKD.
#include "common.cuh"

namespace fastkd {
namespace {

constexpr int kStats = 6;

struct BinarySplit {
  float log_bs_g, log_bs_r, log_bt_g, log_bt_r;
};

// The student's and teacher's [target, rest] split in log space (dkd.py `binary_split`).
__device__ __forceinline__ BinarySplit binary_split(float r_x, float r_y, float x_g, float y_g) {
  const float a = logaddexp(r_x, x_g);
  const float b = logaddexp(r_y, y_g);
  return BinarySplit{x_g - a, r_x - a, y_g - b, r_y - b};
}

template <typename TX, typename TY>
__global__ void __launch_bounds__(kMaxThreads)
    dkd_forward_kernel(const TX* __restrict__ x_base, const TY* __restrict__ y_base,
                       const int64_t* __restrict__ target, float* __restrict__ tckd_out,
                       float* __restrict__ nckd_out, float* __restrict__ stats, int64_t V, RowLayout xl,
                       RowLayout yl, float inv_temperature) {
  const int64_t row = blockIdx.x;
  const TX* x_row = x_base + row_offset(row, xl);
  const TY* y_row = y_base + row_offset(row, yl);
  const int64_t t = target[row];
  const bool valid = t >= 0 && t < V;  // out of range: NaN, never an out-of-bounds read

  // Per thread: [m_x, z_x, m_y, z_y, w, inf_y] over the non-target columns.
  Floats<6> s;
  s.v[0] = neg_inf(); s.v[1] = 0.0f;
  s.v[2] = neg_inf(); s.v[3] = 0.0f;
  s.v[4] = 0.0f; s.v[5] = neg_inf();
  visit_row(x_row, xl.col, y_row, yl.col, V, [&](int64_t c, float x_raw, float y_raw, float&, float&) {
    const bool is_target = c == t;
    const float x = is_target ? neg_inf() : x_raw * inv_temperature;
    const float y = is_target ? neg_inf() : y_raw * inv_temperature;
    online_update(s.v[0], s.v[1], x);
    float rescale, e;
    online_update(s.v[2], s.v[3], y, rescale, e);
    const float diff = y - x;
    s.v[4] = s.v[4] * rescale + ((e > 0.0f && diff != pos_inf()) ? e * diff : 0.0f);
    s.v[5] = fmaxf(s.v[5], diff == pos_inf() ? y : neg_inf());
  });
  const Floats<6> r = block_reduce<6>(s, [](const Floats<6>& a, const Floats<6>& b) {
    Floats<6> c;
    float wa, wb;
    combine_lse(c, a, b, 0, wa, wb);
    combine_lse(c, a, b, 2, wa, wb);
    c.v[4] = a.v[4] * wa + b.v[4] * wb;  // W is weighted like z_y
    c.v[5] = fmaxf(a.v[5], b.v[5]);
    return c;
  });
  if (threadIdx.x != 0) return;

  const float x_g = valid ? to_float(x_row[t * xl.col]) * inv_temperature : 0.0f;
  const float y_g = valid ? to_float(y_row[t * yl.col]) * inv_temperature : 0.0f;
  const float r_x = r.v[0] + __logf(r.v[1]);
  const float sum_y = r.v[3];
  const float r_y = r.v[2] + __logf(sum_y);
  // NCKD: subtracting the lse difference last makes it exactly 0 for identical rows.
  const bool has_rest = sum_y > 0.0f;
  float nckd = r.v[4] / (has_rest ? sum_y : 1.0f) - (r_y - r_x);
  if (__expf(r.v[5] - r_y) > 0.0f) nckd = pos_inf();
  if (!has_rest) nckd = 0.0f;  // no non-target teacher mass (one class): nothing to transfer

  const BinarySplit split = binary_split(r_x, r_y, x_g, y_g);
  const float bt_g = __expf(split.log_bt_g);
  const float bt_r = __expf(split.log_bt_r);
  float tckd = (bt_g > 0.0f ? bt_g * (split.log_bt_g - split.log_bs_g) : 0.0f) +
               (bt_r > 0.0f ? bt_r * (split.log_bt_r - split.log_bs_r) : 0.0f);
  // A NaN anywhere in the row makes both terms NaN: the zero-mass guards above would otherwise hide it.
  const bool nan_in_row = isnan(r_x) || isnan(r_y) || isnan(x_g) || isnan(y_g);
  if (!valid || nan_in_row) {
    tckd = quiet_nan();
    nckd = quiet_nan();
  }
  tckd_out[row] = tckd;
  nckd_out[row] = nckd;
  stats[row * kStats + 0] = r_x;
  stats[row * kStats + 1] = r_y;
  stats[row * kStats + 2] = valid ? x_g : quiet_nan();
  stats[row * kStats + 3] = valid ? y_g : quiet_nan();
  stats[row * kStats + 4] = tckd;
  stats[row * kStats + 5] = nckd;
}

template <typename TX, typename TY, bool X_GRAD, bool Y_GRAD>
__global__ void __launch_bounds__(kMaxThreads)
    dkd_backward_kernel(const TX* __restrict__ x_base, const TY* __restrict__ y_base,
                        const int64_t* __restrict__ target, const float* __restrict__ stats,
                        const float* __restrict__ grad_tckd, const float* __restrict__ grad_nckd,
                        TX* __restrict__ dx_base, TY* __restrict__ dy_base, int64_t V, RowLayout xl, RowLayout yl,
                        float inv_temperature) {
  const int64_t row = blockIdx.x;
  TX* dx = X_GRAD ? dx_base + row * V : nullptr;
  TY* dy = Y_GRAD ? dy_base + row * V : nullptr;
  const TX* x_row = x_base + row_offset(row, xl);
  const TY* y_row = y_base + row_offset(row, yl);
  const float r_x = stats[row * kStats + 0];
  const float r_y = stats[row * kStats + 1];
  const float x_g = stats[row * kStats + 2];
  const float y_g = stats[row * kStats + 3];
  const float tckd = stats[row * kStats + 4];
  const float nckd = stats[row * kStats + 5];
  const int64_t t = target[row];
  const bool valid = t >= 0 && t < V;
  // d/dS = d/dx / T: the 1/T rides on the incoming gradients.
  const float g_t = grad_tckd[row] * inv_temperature;
  const float g_n = grad_nckd[row] * inv_temperature;

  const BinarySplit split = binary_split(r_x, r_y, x_g, y_g);
  const float bs_g = __expf(split.log_bs_g);
  const float bs_r = __expf(split.log_bs_r);
  const float bt_g = __expf(split.log_bt_g);
  const float bt_r = __expf(split.log_bt_r);
  // Student: the target column, and the factor of q~ on the others.
  const float dx_target = g_t * (bs_g - bt_g);
  const float q_factor = g_t * (bs_r - bt_r) + g_n;
  // Teacher: the target column, and the factor of p~ (through R_y) on the others.
  const float dy_target = g_t * (bt_g > 0.0f ? bt_g * ((split.log_bt_g - split.log_bs_g) - tckd) : 0.0f);
  const float p_factor = g_t * (bt_r > 0.0f ? bt_r * ((split.log_bt_r - split.log_bs_r) - tckd) : 0.0f);

  visit_row<X_GRAD, Y_GRAD>(x_row, xl.col, y_row, yl.col, dx, dy, V,
                            [&](int64_t c, float x_raw, float y_raw, float& gx, float& gy) {
    const float x = x_raw * inv_temperature;
    const float y = y_raw * inv_temperature;
    const bool is_target = c == t;
    // The non-target distributions; 0 on the target column and where a logit is -inf (also when R = -inf,
    // where x - R would be NaN).
    const float log_q = x - r_x;
    const float log_p = y - r_y;
    const float q = (is_target || x == neg_inf()) ? 0.0f : __expf(log_q);
    const float p = (is_target || y == neg_inf()) ? 0.0f : __expf(log_p);
    if (X_GRAD) {
      const float d = is_target ? dx_target : q_factor * q - g_n * p;
      gx = valid ? d : quiet_nan();
    }
    if (Y_GRAD) {
      const float nckd_term = p > 0.0f ? p * ((log_p - log_q) - nckd) : 0.0f;
      const float d = is_target ? dy_target : p_factor * p + g_n * nckd_term;
      gy = valid ? d : quiet_nan();
    }
  });
}

template <typename TX, typename TY, bool X_GRAD, bool Y_GRAD>
void launch_dkd_backward(int64_t rows, int threads, cudaStream_t stream, const at::Tensor& x, const at::Tensor& y,
                         const at::Tensor& target, const at::Tensor& stats, const at::Tensor& grad_tckd,
                         const at::Tensor& grad_nckd, const at::Tensor& dx, const at::Tensor& dy, int64_t V,
                         const RowLayout& xl, const RowLayout& yl, float inv_temperature) {
  FASTKD_LAUNCH(static_cast<unsigned>(rows), threads, 0, stream, dkd_backward_kernel<TX, TY, X_GRAD, Y_GRAD>)(
      data_of<TX>(x), data_of<TY>(y), data_of<int64_t>(target), data_of<float>(stats), data_of<float>(grad_tckd),
      data_of<float>(grad_nckd), X_GRAD ? mutable_data_of<TX>(dx) : nullptr,
      Y_GRAD ? mutable_data_of<TY>(dy) : nullptr, V, xl, yl, inv_temperature);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dkd_rows_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                             const at::Tensor& target, double temperature) {
  constexpr const char* op = "fastkd::cuda_dkd_rows";
  check_logits(op, student, teacher);
  const at::cuda::CUDAGuard guard(student.device());
  const int64_t V = student.size(-1);
  const int64_t rows = row_count(student);
  const auto options = student.options().dtype(at::kFloat);
  at::Tensor tckd = at::empty({rows}, options);
  at::Tensor nckd = at::empty({rows}, options);
  at::Tensor stats = at::empty({rows, kStats}, options);
  if (rows == 0) return {tckd, nckd, stats};
  at::Tensor target_v = index_vector(op, "target", target, student, rows);
  const auto x_layout = row_layout(student);
  const auto y_layout = row_layout(teacher);
  const at::Tensor& x = x_layout.first;
  const at::Tensor& y = y_layout.first;
  const RowLayout xl = x_layout.second;
  const RowLayout yl = y_layout.second;
  const float inv_temperature = static_cast<float>(1.0 / temperature);
  const int threads = threads_for(V);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FASTKD_DISPATCH_FLOATING(x.scalar_type(), "cuda_dkd_rows", [&] {
    using TX = scalar_t;
    FASTKD_DISPATCH_FLOATING(y.scalar_type(), "cuda_dkd_rows", [&] {
      using TY = scalar_t;
      FASTKD_LAUNCH(static_cast<unsigned>(rows), threads, 0, stream, dkd_forward_kernel<TX, TY>)(
          data_of<TX>(x), data_of<TY>(y), data_of<int64_t>(target_v), mutable_data_of<float>(tckd),
          mutable_data_of<float>(nckd), mutable_data_of<float>(stats), V, xl, yl, inv_temperature);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {tckd, nckd, stats};
}

std::tuple<at::Tensor, at::Tensor> dkd_rows_backward_cuda(const at::Tensor& grad_tckd, const at::Tensor& grad_nckd,
                                                          const at::Tensor& student, const at::Tensor& teacher,
                                                          const at::Tensor& stats, const at::Tensor& target,
                                                          double temperature, bool student_grad,
                                                          bool teacher_grad) {
  constexpr const char* op = "fastkd::cuda_dkd_rows_backward";
  check_logits(op, student, teacher);
  const at::cuda::CUDAGuard guard(student.device());
  const int64_t V = student.size(-1);
  const int64_t rows = row_count(student);
  at::Tensor d_student = input_gradient(student, student_grad);
  at::Tensor d_teacher = input_gradient(teacher, teacher_grad);
  if (rows == 0 || !(student_grad || teacher_grad)) return {d_student, d_teacher};
  at::Tensor stats_c = stats_matrix(op, stats, student, rows, kStats);
  at::Tensor target_v = index_vector(op, "target", target, student, rows);
  at::Tensor grad_tckd_v = row_vector(op, "grad_tckd", grad_tckd, student, rows);
  at::Tensor grad_nckd_v = row_vector(op, "grad_nckd", grad_nckd, student, rows);
  const auto x_layout = row_layout(student);
  const auto y_layout = row_layout(teacher);
  const at::Tensor& x = x_layout.first;
  const at::Tensor& y = y_layout.first;
  const RowLayout xl = x_layout.second;
  const RowLayout yl = y_layout.second;
  const float inv_temperature = static_cast<float>(1.0 / temperature);
  const int threads = threads_for(V);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FASTKD_DISPATCH_FLOATING(x.scalar_type(), "cuda_dkd_rows_backward", [&] {
    using TX = scalar_t;
    FASTKD_DISPATCH_FLOATING(y.scalar_type(), "cuda_dkd_rows_backward", [&] {
      using TY = scalar_t;
      if (student_grad && teacher_grad) {
        launch_dkd_backward<TX, TY, true, true>(rows, threads, stream, x, y, target_v, stats_c, grad_tckd_v,
                                                grad_nckd_v, d_student, d_teacher, V, xl, yl, inv_temperature);
      } else if (student_grad) {
        launch_dkd_backward<TX, TY, true, false>(rows, threads, stream, x, y, target_v, stats_c, grad_tckd_v,
                                                 grad_nckd_v, d_student, d_teacher, V, xl, yl, inv_temperature);
      } else {
        launch_dkd_backward<TX, TY, false, true>(rows, threads, stream, x, y, target_v, stats_c, grad_tckd_v,
                                                 grad_nckd_v, d_student, d_teacher, V, xl, yl, inv_temperature);
      }
    });
  });
  return {d_student, d_teacher};
}

}  // namespace
}  // namespace fastkd

TORCH_LIBRARY_IMPL(FASTKD_LIBRARY, FASTKD_DISPATCH_KEY, m) {
  m.impl("cuda_dkd_rows", &fastkd::dkd_rows_cuda);
  m.impl("cuda_dkd_rows_backward", &fastkd::dkd_rows_backward_cuda);
}
