// Fused generalized Jensen-Shannon divergence (0 < beta < 1) between two rows of logits: the CUDA C++
// version of fastkd/triton/jsd.py (the specification; the maths and the error analysis are in its docstring),
// same formulation, same semantics.
//
// Student x = S * (1/T), teacher y = T_logits * (1/T), maxima kept apart from the sums (never lse):
//   a = x - M_x, b = y - M_y, q = exp(a) / Z_x, p = exp(b) / Z_y,
//   D = Z_y - Z_x = sum exp_diff(b, a),  L = log(Z_y / Z_x) = log_ratio(Z_y, Z_x, D),
//   delta = (b - a) - L = log p - log q, and the mixture m = beta p + (1 - beta) q only through delta:
//   l_hi = -log1p(w_lo expm1(-|delta|)),  log p - log m, log q - log m from l_hi and delta;
//   per element, |delta| <= 1/2: P = p h((1 - beta) expm1(-delta)), Q = q h(beta expm1(delta)), C = 0 with
//   h(w) = w - log1p(w) by its series; otherwise P = p (log p - log m), Q = q (log q - log m), C = p - q;
//   KL(p || m) = sum P - (1 - beta) sum C,  KL(q || m) = sum Q + beta sum C,
//   JSD = beta KL(p || m) + (1 - beta) KL(q || m).
// Gradient: dJSD/dx_j = (1 - beta) q_j ((log q_j - log m_j) - KL(q || m)), dJSD/dy_j = beta p_j ((log p_j -
// log m_j) - KL(p || m)), the log-ratios recomputed exactly as the divergences' sums formed them; times the
// row's weight / T, read per row only when the gradient pass runs. An ignored token: loss 0, gradient 0, d_T 0.
// Temperature: the float T, or row r's own T_r = temperature_rows[r] (any stride; read once per row, inverted
// correctly rounded; not > 0 or NaN: NaN terms and gradients). d_T (temperature_grad): JSD is a function of x, y
// that a constant added to a row does not change, so with GX_j = (weight / T) (1 - beta) q_j ((log q_j - log m_j)
// - KL(q || m)), GY_j = (weight / T) beta p_j ((log p_j - log m_j) - KL(p || m)) (both computed whichever are
// written),  d_T = d(weight JSD)/dT = -sum_j (GX_j x_j + GY_j y_j) = -sum_j (GX_j a_j + GY_j b_j), a term whose
// gradient is exactly 0 adding 0 (also against a = -inf).
//
// Design: one block per row, one launch: pass 1 the maxima, pass 2 Z_x, Z_y and D against them, pass 3 the two
// divergences against L, and when a gradient is asked for pass 4 the gradient, from the statistics every thread of
// the block holds (nothing per row written to global memory and read back). Pass 1 stages the row pair in shared
// memory where it fits (kl.cu says how long a row that is), and the later passes read the copy; a longer row is
// re-read in each pass. Element traffic per call, N rows of V, g gradients: staged, reads 2 x N x V; re-read,
// 6 x N x V (passes 1 to 3) and, with a gradient, 2 x N x V more (pass 4; passes 2 to 4 mostly from L2); writes
// g x N x V. In bytes, staged: (2 + g) x N x V x 2 for bf16/fp16, x 4 for fp32; re-read: (8 + g) x N x V x 2
// (x 4) with a gradient, 6 x N x V x 2 (x 4) without. Exponentials per element: pass 2
// two `exp_accurate`, pass 3 two, and where |delta| > 1/2 one more and one log1pf, plus the series (~40 FMAs)
// and 3 correctly rounded divisions; pass 4: 1 `expm1_accurate`, 1 log1pf and one `exp_accurate` per gradient.
// d_T: with both gradients written, two multiply-adds per element and one block sum per row more (and a float per
// row written); asked for alone, pass 4 runs for it (the 2 x N x V re-read, no N x V write), and with one gradient
// the other side's (one `exp_accurate` and a division per element) is computed too, not stored.
// Precision: see common.cuh.
#include "common.cuh"

namespace fastkd {
namespace {

// h(w) = w - log1p(w) >= 0 to a few u relative for |w| <= 0.65 (jsd.py `x_minus_log1p_x`): with
// s = w / (2 + w), h = 2 s^2 / (1 - s) - 2 (s^3/3 + s^5/5 + ... + s^15/15); divisions correctly rounded.
__device__ __forceinline__ float x_minus_log1p_x(float w) {
  const float s = __fdiv_rn(w, 2.0f + w);
  const float s2 = s * s;
  float r = (1.0f / 13.0f) + s2 * (1.0f / 15.0f);
  r = (1.0f / 11.0f) + s2 * r;
  r = (1.0f / 9.0f) + s2 * r;
  r = (1.0f / 7.0f) + s2 * r;
  r = (1.0f / 5.0f) + s2 * r;
  r = (1.0f / 3.0f) + s2 * r;
  return __fdiv_rn(2.0f * s2, 1.0f - s) - 2.0f * (s2 * s) * r;
}

template <typename TX, typename TY, bool X_GRAD, bool Y_GRAD>
__global__ void __launch_bounds__(kMaxThreads)
    jsd_rows_kernel(const TX* __restrict__ x_base, const TY* __restrict__ y_base,
                    const int64_t* __restrict__ labels, float* __restrict__ loss_out, TX* __restrict__ dx_base,
                    TY* __restrict__ dy_base, float* __restrict__ dt_out, RowWeights weights, int64_t V,
                    RowLayout xl, RowLayout yl, RowTemperature temperature, float beta, float one_minus_beta,
                    int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const float inv_temperature = temperature.inverse(row);
  const TX* x_row = x_base + row_offset(row, xl);
  const TY* y_row = y_base + row_offset(row, yl);
  bool active = true;
  if (labels != nullptr) active = labels[row] != ignore_index;
  const int64_t n_cols = active ? V : 0;  // an ignored token reads nothing

  // Pass 1: the maxima.
  const Floats<2> m = pair_maxima(x_row, xl.col, y_row, yl.col, n_cols, row, V, inv_temperature);
  const float m_x = finite_or_zero(m.v[0]);
  const float m_y = finite_or_zero(m.v[1]);

  // Pass 2 (re-read): [Z_x, Z_y, D] against the final maxima.
  Floats<3> z;
  z.v[0] = 0.0f; z.v[1] = 0.0f; z.v[2] = 0.0f;
  const RowPair<TX, TY> in2 = rows_to_read(x_row, xl.col, y_row, yl.col, n_cols, row, V);
  visit_row(in2.x, in2.x_col, in2.y, in2.y_col, n_cols, [&](int64_t, float x_raw, float y_raw, float&, float&) {
    const float a = scaled(x_raw, inv_temperature) - m_x;
    const float b = scaled(y_raw, inv_temperature) - m_y;
    const float ea = exp_accurate(a);
    const float eb = exp_accurate(b);
    z.v[0] += ea;
    z.v[1] += eb;
    z.v[2] += exp_diff(b, a, eb, ea);
  });
  z = block_sum<3>(z);  // every thread gets the same sums, hence the same L
  const float z_x = z.v[0];
  const float z_y = z.v[1];
  const float l_yx = log_ratio(z_y, z_x, z.v[2]);

  // Pass 3 (re-read): [sum P, sum Q, sum C], both divergences against the mixture.
  Floats<3> acc;
  acc.v[0] = 0.0f; acc.v[1] = 0.0f; acc.v[2] = 0.0f;
  const RowPair<TX, TY> in3 = rows_to_read(x_row, xl.col, y_row, yl.col, n_cols, row, V);
  visit_row(in3.x, in3.x_col, in3.y, in3.y_col, n_cols, [&](int64_t, float x_raw, float y_raw, float&, float&) {
    const float a = scaled(x_raw, inv_temperature) - m_x;
    const float b = scaled(y_raw, inv_temperature) - m_y;
    const float p = __fdiv_rn(exp_accurate(b), z_y);
    const float q = __fdiv_rn(exp_accurate(a), z_x);
    const float delta = (b - a) - l_yx;
    if (fabsf(delta) <= 0.5f) {
      // Second-order terms only (jsd.py `jsd_terms`).
      acc.v[0] += p * x_minus_log1p_x(one_minus_beta * expm1_small(-delta));
      acc.v[1] += q * x_minus_log1p_x(beta * expm1_small(delta));
    } else {
      // Also where delta is +-inf or NaN (a probability of 0): its term is 0 and its log-ratio unused.
      const MixtureLogRatios r = mixture_log_ratios(a, b, l_yx, beta, one_minus_beta);
      acc.v[0] += p > 0.0f ? p * r.lp_m : 0.0f;
      acc.v[1] += q > 0.0f ? q * r.lq_m : 0.0f;
      acc.v[2] += p - q;
    }
  });
  acc = block_sum<3>(acc);  // every thread gets the same sums, hence the same divergences
  const float kl_p = acc.v[0] - one_minus_beta * acc.v[2];
  const float kl_q = acc.v[1] + beta * acc.v[2];

  // Pass 4 (re-read), when a gradient or d_T is asked for: the weighted gradient from the statistics above, and
  // d_T = -sum (GX a + GY b) over both sides' gradients (whichever are written).
  float* const d_t = dt_out != nullptr ? dt_out + row : nullptr;
  const bool t_grad = d_t != nullptr;
  if (X_GRAD || Y_GRAD || t_grad) {
    // d/dS = d/dx / T: the 1/T rides on the row's weight, and so do the mixture weights.
    const float g = weights.at(0, row) * inv_temperature;
    const float g_x = g * one_minus_beta;
    const float g_y = g * beta;
    const RowPair<TX, TY> in4 = rows_to_read(x_row, xl.col, y_row, yl.col, n_cols, row, V);
    write_row_gradients<X_GRAD, Y_GRAD>(in4.x, in4.x_col, in4.y, in4.y_col, X_GRAD ? dx_base + row * V : nullptr,
                                        Y_GRAD ? dy_base + row * V : nullptr, V, active, d_t, 0.0f,
                                        [&](int64_t, float x_raw, float y_raw, float& gx, float& gy,
                                            auto t_grad_flag) {
      constexpr bool T_GRAD = decltype(t_grad_flag)::value;
      const float a = scaled(x_raw, inv_temperature) - m_x;
      const float b = scaled(y_raw, inv_temperature) - m_y;
      const MixtureLogRatios r = mixture_log_ratios(a, b, l_yx, beta, one_minus_beta);
      // 0 where the probability is 0 (`!= 0` lets a NaN through: a NaN logit gives a NaN gradient).
      float gx_v = 0.0f, gy_v = 0.0f;
      if (X_GRAD || T_GRAD) {
        const float ea = exp_accurate(a);
        gx_v = (ea != 0.0f ? __fdiv_rn(ea, z_x) * (r.lq_m - kl_q) : 0.0f) * g_x;
      }
      if (Y_GRAD || T_GRAD) {
        const float eb = exp_accurate(b);
        gy_v = (eb != 0.0f ? __fdiv_rn(eb, z_y) * (r.lp_m - kl_p) : 0.0f) * g_y;
      }
      if (X_GRAD) gx = gx_v;
      if (Y_GRAD) gy = gy_v;
      return T_GRAD ? temperature_term(gx_v, a) + temperature_term(gy_v, b) : 0.0f;
    });
  }
  if (threadIdx.x != 0) return;
  // An ignored token: 0 (its sums are empty: 0 / 0).
  loss_out[row] = active ? beta * kl_p + one_minus_beta * kl_q : 0.0f;
}

void check_beta(double beta) {
  TORCH_CHECK_VALUE(beta > 0.0 && beta < 1.0,
                    "the JSD kernels take 0 < beta < 1 (0 and 1 are the KL kernels), got beta=", beta);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jsd_rows(
    const at::Tensor& student, const at::Tensor& teacher, double beta, double temperature,
    const std::optional<at::Tensor>& temperature_rows, const std::optional<at::Tensor>& labels, int64_t ignore_index,
    const std::optional<at::Tensor>& weight, bool student_grad, bool teacher_grad, bool temperature_grad) {
  check_beta(beta);
  const RowCall L("fastkd::cuda_jsd_rows", student, teacher, temperature, temperature_rows, /*x_student=*/true,
                  student_grad, teacher_grad, temperature_grad);
  at::Tensor loss = at::empty({L.rows}, L.floats);
  if (L.idle()) return {loss, L.d_student, L.d_teacher, L.d_temperature};
  const at::Tensor labels_v = L.indices("labels", labels);
  const RowWeights w = L.weights("weight", weight);
  const float beta_f = static_cast<float>(beta);
  const float one_minus_beta = static_cast<float>(1.0 - beta);
  L.dispatch([&]<typename TX, typename TY, bool X_GRAD, bool Y_GRAD>(const TX* x, const TY* y, TX* dx, TY* dy) {
    L.launch(jsd_rows_kernel<TX, TY, X_GRAD, Y_GRAD>, x, y, data_or_null<int64_t>(labels_v),
             mutable_data_of<float>(loss), dx, dy, L.d_temperature_data(), w, L.V, L.xl, L.yl, L.temperature(),
             beta_f, one_minus_beta, ignore_index);
  });
  return {loss, L.d_student, L.d_teacher, L.d_temperature};
}

}  // namespace fastkd

TORCH_LIBRARY_IMPL(FASTKD_LIBRARY, FASTKD_DISPATCH_KEY, m) {
  m.impl("cuda_jsd_rows", &fastkd::jsd_rows);
}
