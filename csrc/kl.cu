// Fused KL divergence between two rows of logits, with an optional cross-entropy on the Y rows: the CUDA
// C++ version of fastkd/triton/kl.py (the specification; the maths and the error analysis are in its
// docstring), same formulation, same semantics.
//
// KL(P || Q) with P from logits X and Q from logits Y, both divided by T: forward KL is X = teacher,
// Y = student; reverse swaps them. Per row, with x = X * (1/T), y = Y * (1/T), the maxima kept apart from the
// sums (never lse = M + log Z):
//   a = x - M_x, b = y - M_y, Z_x = sum exp(a), Z_y = sum exp(b), Ebar = sum exp(a)(a - b) / Z_x,
//   D = Z_x - Z_y = sum exp_diff(a, b),  L = log(Z_x / Z_y) = log_ratio(Z_x, Z_y, D),  KL = Ebar - L;
// a term with p > 0 against y = -inf makes KL = +inf (a flag, never summed); a row max of -inf is taken as 0.
// CE = (M_s - s_target) + log Z_s on the raw Y logits s (NaN for a target outside [0, V)).
// stats (rows, 7) float32: M_x, Z_x, M_y, Z_y, Ebar, M_s, Z_s (M_s, Z_s: 0 without a target); all 0 for an
// ignored token.
// Backward: dKL/dy_j = q_j - p_j, dKL/dx_j = p_j ((a_j - b_j) - Ebar) (the forward's own Ebar: exactly 0 for a
// one-hot p), dCE/ds_j = exp(s_j - M_s) / Z_s - [j = target]; times grad / T.
//
// Design: one block per row, the row re-read rather than staged (no shared-memory staging, so any V): the
// forward reads X and Y twice (pass 1 the maxima, pass 2 the sums against them; the second read is mostly
// served from L2, the row of one block being at most a few hundred KB), 2 x 2 x V x sizeof(logit) bytes;
// the backward reads them once and writes each requested gradient once. Per element: forward 2
// `exp_accurate` (3 with CE) and the series of `exp_diff`; backward 2 (3 with CE), one correctly rounded
// division per probability. Precision: see common.cuh.
#include "common.cuh"

namespace fastkd {
namespace {

constexpr int kKlRowsStats = 7;

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

  // Pass 1: the maxima of x, y and the raw s = Y (for CE).
  Floats<3> m;
  m.v[0] = neg_inf(); m.v[1] = neg_inf(); m.v[2] = neg_inf();
  visit_row(x_row, xl.col, y_row, yl.col, n_cols, [&](int64_t, float x_raw, float y_raw, float&, float&) {
    max_scaled(m, x_raw, y_raw, inv_temperature);
    m.v[2] = fmaxf(m.v[2], y_raw);
  });
  m = block_max<3>(m);
  float m_x = finite_or_zero(m.v[0]);
  float m_y = finite_or_zero(m.v[1]);
  float m_s = has_ce ? finite_or_zero(m.v[2]) : 0.0f;

  // Pass 2 (re-read): per thread [Z_x, Z_y, E, D, Z_s, number of p > 0 against y = -inf].
  Floats<6> s;
#pragma unroll
  for (int i = 0; i < 6; ++i) s.v[i] = 0.0f;
  visit_row(x_row, xl.col, y_row, yl.col, n_cols, [&](int64_t, float x_raw, float y_raw, float&, float&) {
    const float a = scaled(x_raw, inv_temperature) - m_x;
    const float b = scaled(y_raw, inv_temperature) - m_y;
    // Z_s for CE. y_raw captured by value: by reference, it changed nvcc's register allocation of the kernel.
    add_kl_terms<true>(s, a, b, [&s, has_ce, y_raw, m_s] {
      if (has_ce) s.v[4] += exp_accurate(y_raw - m_s);
    });
  });
  s = block_sum<6>(s);
  if (threadIdx.x != 0) return;

  float z_x = s.v[0], z_y = s.v[1], z_s = s.v[4];
  float e_bar = __fdiv_rn(s.v[2], z_x);
  float kl = e_bar - log_ratio(z_x, z_y, s.v[3]);
  if (s.v[5] > 0.0f) kl = pos_inf();
  if (has_ce) {
    const int64_t t = target[row];
    const bool valid = t >= 0 && t < V;  // out of range: NaN, never an out-of-bounds read
    const float s_target = valid ? to_float(y_row[t * yl.col]) : 0.0f;
    ce_out[row] = valid ? (m_s - s_target) + log_rn(z_s) : quiet_nan();
  }
  if (!active) {
    // An ignored token's statistics are 0 (its sums are empty: 0 / 0 must not reach the saved tensor).
    kl = m_x = z_x = m_y = z_y = e_bar = m_s = z_s = 0.0f;
  }
  kl_out[row] = kl;
  store_row<kKlRowsStats>(stats, row, m_x, z_x, m_y, z_y, e_bar, m_s, z_s);
}

template <typename TX, typename TY, bool X_GRAD, bool Y_GRAD>
__global__ void __launch_bounds__(kMaxThreads)
    kl_backward_kernel(const TX* __restrict__ x_base, const TY* __restrict__ y_base,
                       const int64_t* __restrict__ labels, const int64_t* __restrict__ target,
                       const float* __restrict__ stats, const float* __restrict__ grad_kl,
                       const float* __restrict__ grad_ce, TX* __restrict__ dx_base, TY* __restrict__ dy_base,
                       int64_t V, RowLayout xl, RowLayout yl, float inv_temperature, int64_t ignore_index) {
  for_backward_row<kKlRowsStats, X_GRAD, Y_GRAD>(x_base, y_base, stats, dx_base, dy_base, V, xl, yl, labels,
                                                 ignore_index, [&](const BackwardRow<TX, TY>& r) {
    const float* st = r.stats;
    const float m_x = st[0], z_x = st[1], m_y = st[2], z_y = st[3], e_bar = st[4], m_s = st[5], z_s = st[6];
    // d/dX = d/dx / T: the 1/T rides on the incoming gradient.
    const float g_kl = grad_kl[r.row] * inv_temperature;
    const bool has_ce = grad_ce != nullptr;
    const float g_ce = has_ce ? grad_ce[r.row] : 0.0f;
    const int64_t t = has_ce ? target[r.row] : -1;
    visit_row<X_GRAD, Y_GRAD>(r.x, xl.col, r.y, yl.col, r.dx, r.dy, V,
                              [&](int64_t c, float x_raw, float y_raw, float& gx, float& gy) {
      const float a = scaled(x_raw, inv_temperature) - m_x;
      const float b = scaled(y_raw, inv_temperature) - m_y;
      const float ea = exp_accurate(a);
      const float p = __fdiv_rn(ea, z_x);
      if (Y_GRAD) {
        float d = (__fdiv_rn(exp_accurate(b), z_y) - p) * g_kl;
        if (has_ce) d += g_ce * (__fdiv_rn(exp_accurate(y_raw - m_s), z_s) - (c == t ? 1.0f : 0.0f));
        gy = d;
      }
      // The same `a - b` as the forward's E: exactly 0 for a one-hot p.
      if (X_GRAD) gx = (ea > 0.0f ? p * ((a - b) - e_bar) : 0.0f) * g_kl;
    });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_rows(const at::Tensor& student, const at::Tensor& teacher,
                                                       double temperature, bool reverse,
                                                       const std::optional<at::Tensor>& target,
                                                       const std::optional<at::Tensor>& labels, int64_t ignore_index) {
  const RowLaunch L("fastkd::cuda_kl_rows", student, teacher, temperature, /*x_student=*/reverse);
  at::Tensor kl = at::empty({L.rows}, L.floats);
  at::Tensor ce = at::empty({target.has_value() ? L.rows : 0}, L.floats);
  at::Tensor stats = at::empty({L.rows, kKlRowsStats}, L.floats);
  if (L.idle()) return {kl, ce, stats};
  const at::Tensor target_v = L.indices("target", target);
  const at::Tensor labels_v = L.indices("labels", labels);
  L.dispatch([&]<typename TX, typename TY>(const TX* x, const TY* y) {
    L.launch(kl_forward_kernel<TX, TY>, x, y, data_or_null<int64_t>(labels_v), data_or_null<int64_t>(target_v),
             mutable_data_of<float>(kl), target_v.defined() ? mutable_data_of<float>(ce) : nullptr,
             mutable_data_of<float>(stats), L.V, L.xl, L.yl, L.inv_temperature, ignore_index);
  });
  return {kl, ce, stats};
}

std::tuple<at::Tensor, at::Tensor> kl_rows_backward(const at::Tensor& grad_kl, const std::optional<at::Tensor>& grad_ce,
                                                    const at::Tensor& student, const at::Tensor& teacher,
                                                    const at::Tensor& stats, double temperature, bool reverse,
                                                    const std::optional<at::Tensor>& target,
                                                    const std::optional<at::Tensor>& labels, int64_t ignore_index,
                                                    bool student_grad, bool teacher_grad) {
  const RowBackward L("fastkd::cuda_kl_rows_backward", student, teacher, temperature, /*x_student=*/reverse, stats,
                      kKlRowsStats, student_grad, teacher_grad);
  if (L.idle()) return L.gradients();
  const at::Tensor grad_kl_v = L.per_row("grad_kl", grad_kl);
  // The CE term needs the target; without an incoming CE gradient it contributes nothing (a zero gradient).
  const bool has_ce = target.has_value() && grad_ce.has_value();
  const at::Tensor target_v = has_ce ? L.indices("target", *target) : at::Tensor();
  const at::Tensor grad_ce_v = has_ce ? L.per_row("grad_ce", *grad_ce) : at::Tensor();
  const at::Tensor labels_v = L.indices("labels", labels);
  L.dispatch([&]<typename TX, typename TY, bool X_GRAD, bool Y_GRAD>(const TX* x, const TY* y, TX* dx, TY* dy) {
    L.launch(kl_backward_kernel<TX, TY, X_GRAD, Y_GRAD>, x, y, data_or_null<int64_t>(labels_v),
             data_or_null<int64_t>(target_v), data_of<float>(L.stats), data_of<float>(grad_kl_v),
             data_or_null<float>(grad_ce_v), dx, dy, L.V, L.xl, L.yl, L.inv_temperature, ignore_index);
  });
  return L.gradients();
}

}  // namespace fastkd

TORCH_LIBRARY_IMPL(FASTKD_LIBRARY, FASTKD_DISPATCH_KEY, m) {
  m.impl("cuda_kl_rows", &fastkd::kl_rows);
  m.impl("cuda_kl_rows_backward", &fastkd::kl_rows_backward);
}
