// Fused decoupled KD (DKD): the target-class (TCKD) and non-target-class (NCKD) KL of two rows of logits: the
// CUDA C++ version of fastkd/triton/dkd.py (the specification; the maths and the error analysis are in its
// docstring), same formulation, same semantics.
//
// Target g, student x = S * (1/T), teacher y = T_logits * (1/T), over the rest c != g (maxima kept apart from
// the sums; a max of -inf is taken as 0): a = x - M_x, b = y - M_y, Z_x = sum exp(a), Z_y = sum exp(b).
//   TCKD = KL(b_t || b_s) over the binary split [target, rest], from the log-odds u_s = (x_g - M_x) - log Z_x,
//   u_t = (y_g - M_y) - log Z_y: log b_g = -softplus(-u), log b_r = -softplus(u);
//   NCKD = Ebar - log(Z_y / Z_x), Ebar = sum exp(b)(b - a) / Z_y, the log-ratio from D = sum exp_diff(b, a);
//   a teacher term against x_c = -inf makes NCKD = +inf; no non-target teacher mass gives NCKD = 0.
// An out-of-range target gives NaN (never an out-of-bounds read); a NaN anywhere in the row makes both NaN.
// stats (rows, 8) float32: M_x, Z_x, M_y, Z_y, u_s, u_t (NaN for an out-of-range target), TCKD, Ebar.
// The backward recomputes the binary split from u_s, u_t with the same code and uses the forward's TCKD and
// Ebar: for a one-hot teacher the teacher's gradient is exactly 0.
//
// Design: one block per row, the row re-read rather than staged (any C): the forward reads both rows twice
// (pass 1 the maxima of the rest, pass 2 the sums against them; the second mostly from L2),
// 2 x 2 x C x sizeof(logit) bytes, plus x_g, y_g; the backward reads them once and writes each requested
// gradient once. Per element: forward 2 `exp_accurate` and the series of `exp_diff`; backward 2 and 2
// correctly rounded divisions. Precision: see common.cuh.
#include "common.cuh"

namespace fastkd {
namespace {

constexpr int kDkdRowsStats = 8;

// log(1 + e^z) (dkd.py `softplus`): inf at +inf, 0 at -inf; log1pf is 1 ulp, exp_accurate ~2.5 ulp.
__device__ __forceinline__ float softplus(float z) { return fmaxf(z, 0.0f) + log1pf(exp_accurate(-fabsf(z))); }

struct BinarySplit {
  float log_bs_g, log_bs_r, log_bt_g, log_bt_r;
};

// The student's and teacher's [target, rest] split in log space from the log-odds (dkd.py `binary_split`).
__device__ __forceinline__ BinarySplit binary_split(float u_s, float u_t) {
  return BinarySplit{-softplus(-u_s), -softplus(u_s), -softplus(-u_t), -softplus(u_t)};
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

  // Pass 1: the maxima of the rest (the target column is -inf).
  Floats<2> m;
  m.v[0] = neg_inf();
  m.v[1] = neg_inf();
  visit_row(x_row, xl.col, y_row, yl.col, V, [&](int64_t c, float x_raw, float y_raw, float&, float&) {
    if (c == t) return;
    max_scaled(m, x_raw, y_raw, inv_temperature);
  });
  m = block_max<2>(m);
  const float m_x = finite_or_zero(m.v[0]);
  const float m_y = finite_or_zero(m.v[1]);

  // Pass 2 (re-read): per thread [Z_x, Z_y, E, D, number of p~ > 0 against x = -inf] over the rest.
  Floats<5> s;
#pragma unroll
  for (int i = 0; i < 5; ++i) s.v[i] = 0.0f;
  visit_row(x_row, xl.col, y_row, yl.col, V, [&](int64_t c, float x_raw, float y_raw, float&, float&) {
    if (c == t) return;
    const float a = scaled(x_raw, inv_temperature) - m_x;
    const float b = scaled(y_raw, inv_temperature) - m_y;
    add_kl_terms</*P_IS_X=*/false>(s, a, b, [] {});  // NCKD = KL(p~ || q~): P is the teacher, y
  });
  s = block_sum<5>(s);
  if (threadIdx.x != 0) return;

  const float x_g = valid ? scaled(to_float(x_row[t * xl.col]), inv_temperature) : 0.0f;
  const float y_g = valid ? scaled(to_float(y_row[t * yl.col]), inv_temperature) : 0.0f;
  const float z_x = s.v[0];
  const float z_y = s.v[1];
  const bool has_rest = z_y > 0.0f;
  const float e_bar = __fdiv_rn(s.v[2], has_rest ? z_y : 1.0f);
  float nckd = e_bar - log_ratio(z_y, z_x, s.v[3]);
  if (s.v[4] > 0.0f) nckd = pos_inf();
  if (!has_rest) nckd = 0.0f;  // no non-target teacher mass (one class): nothing to transfer

  const float u_s = (x_g - m_x) - log_rn(z_x);
  const float u_t = (y_g - m_y) - log_rn(z_y);
  const BinarySplit split = binary_split(u_s, u_t);
  const float bt_g = exp_accurate(split.log_bt_g);
  const float bt_r = exp_accurate(split.log_bt_r);
  float tckd = (bt_g > 0.0f ? bt_g * (split.log_bt_g - split.log_bs_g) : 0.0f) +
               (bt_r > 0.0f ? bt_r * (split.log_bt_r - split.log_bs_r) : 0.0f);
  // A NaN anywhere in the row makes both terms NaN: the zero-mass guards above would otherwise hide it.
  const bool nan_in_row = isnan(z_x) || isnan(z_y) || isnan(x_g) || isnan(y_g);
  if (!valid || nan_in_row) {
    tckd = quiet_nan();
    nckd = quiet_nan();
  }
  tckd_out[row] = tckd;
  nckd_out[row] = nckd;
  store_row<kDkdRowsStats>(stats, row, m_x, z_x, m_y, z_y, valid ? u_s : quiet_nan(), valid ? u_t : quiet_nan(), tckd,
                           e_bar);
}

template <typename TX, typename TY, bool X_GRAD, bool Y_GRAD>
__global__ void __launch_bounds__(kMaxThreads)
    dkd_backward_kernel(const TX* __restrict__ x_base, const TY* __restrict__ y_base,
                        const int64_t* __restrict__ target, const float* __restrict__ stats,
                        const float* __restrict__ grad_tckd, const float* __restrict__ grad_nckd,
                        TX* __restrict__ dx_base, TY* __restrict__ dy_base, int64_t V, RowLayout xl, RowLayout yl,
                        float inv_temperature) {
  // No labels: no ignored token.
  for_backward_row<kDkdRowsStats, X_GRAD, Y_GRAD>(x_base, y_base, stats, dx_base, dy_base, V, xl, yl, nullptr, 0,
                                                  [&](const BackwardRow<TX, TY>& r) {
    const float* st = r.stats;
    const float m_x = st[0], z_x = st[1], m_y = st[2], z_y = st[3], u_s = st[4], u_t = st[5], tckd = st[6];
    const float e_bar = st[7];
    const int64_t t = target[r.row];
    const bool valid = t >= 0 && t < V;
    // d/dS = d/dx / T: the 1/T rides on the incoming gradients.
    const float g_t = grad_tckd[r.row] * inv_temperature;
    const float g_n = grad_nckd[r.row] * inv_temperature;

    const BinarySplit split = binary_split(u_s, u_t);
    const float bs_g = exp_accurate(split.log_bs_g);
    const float bs_r = exp_accurate(split.log_bs_r);
    const float bt_g = exp_accurate(split.log_bt_g);
    const float bt_r = exp_accurate(split.log_bt_r);
    // Student: the target column, and the factor of q~ on the others.
    const float dx_target = g_t * (bs_g - bt_g);
    const float q_factor = g_t * (bs_r - bt_r) + g_n;
    // Teacher: the target column, and the factor of p~ (through R_y) on the others.
    const float dy_target = g_t * (bt_g > 0.0f ? bt_g * ((split.log_bt_g - split.log_bs_g) - tckd) : 0.0f);
    const float p_factor = g_t * (bt_r > 0.0f ? bt_r * ((split.log_bt_r - split.log_bs_r) - tckd) : 0.0f);

    visit_row<X_GRAD, Y_GRAD>(r.x, xl.col, r.y, yl.col, r.dx, r.dy, V,
                              [&](int64_t c, float x_raw, float y_raw, float& gx, float& gy) {
      const bool is_target = c == t;
      // The non-target distributions; 0 on the target column and where a logit is -inf (also when Z = 0,
      // where exp(a) / Z would be NaN).
      const float a = is_target ? neg_inf() : scaled(x_raw, inv_temperature) - m_x;
      const float b = is_target ? neg_inf() : scaled(y_raw, inv_temperature) - m_y;
      const float ea = exp_accurate(a);
      const float eb = exp_accurate(b);
      const float q = ea > 0.0f ? __fdiv_rn(ea, z_x) : 0.0f;
      const float p = eb > 0.0f ? __fdiv_rn(eb, z_y) : 0.0f;
      if (X_GRAD) {
        const float d = is_target ? dx_target : q_factor * q - g_n * p;
        gx = valid ? d : quiet_nan();
      }
      if (Y_GRAD) {
        // The same `b - a` as the forward's Ebar: exactly 0 for a one-hot p~.
        const float nckd_term = p > 0.0f ? p * ((b - a) - e_bar) : 0.0f;
        const float d = is_target ? dy_target : p_factor * p + g_n * nckd_term;
        gy = valid ? d : quiet_nan();
      }
    });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> dkd_rows(const at::Tensor& student, const at::Tensor& teacher,
                                                        const at::Tensor& target, double temperature) {
  const RowLaunch L("fastkd::cuda_dkd_rows", student, teacher, temperature, /*x_student=*/true);
  at::Tensor tckd = at::empty({L.rows}, L.floats);
  at::Tensor nckd = at::empty({L.rows}, L.floats);
  at::Tensor stats = at::empty({L.rows, kDkdRowsStats}, L.floats);
  if (L.idle()) return {tckd, nckd, stats};
  const at::Tensor target_v = L.indices("target", target);
  L.dispatch([&]<typename TX, typename TY>(const TX* x, const TY* y) {
    L.launch(dkd_forward_kernel<TX, TY>, x, y, data_of<int64_t>(target_v), mutable_data_of<float>(tckd),
             mutable_data_of<float>(nckd), mutable_data_of<float>(stats), L.V, L.xl, L.yl, L.inv_temperature);
  });
  return {tckd, nckd, stats};
}

std::tuple<at::Tensor, at::Tensor> dkd_rows_backward(const at::Tensor& grad_tckd, const at::Tensor& grad_nckd,
                                                     const at::Tensor& student, const at::Tensor& teacher,
                                                     const at::Tensor& stats, const at::Tensor& target,
                                                     double temperature, bool student_grad, bool teacher_grad) {
  const RowBackward L("fastkd::cuda_dkd_rows_backward", student, teacher, temperature, /*x_student=*/true, stats,
                      kDkdRowsStats, student_grad, teacher_grad);
  if (L.idle()) return L.gradients();
  const at::Tensor target_v = L.indices("target", target);
  const at::Tensor grad_tckd_v = L.per_row("grad_tckd", grad_tckd);
  const at::Tensor grad_nckd_v = L.per_row("grad_nckd", grad_nckd);
  L.dispatch([&]<typename TX, typename TY, bool X_GRAD, bool Y_GRAD>(const TX* x, const TY* y, TX* dx, TY* dy) {
    L.launch(dkd_backward_kernel<TX, TY, X_GRAD, Y_GRAD>, x, y, data_of<int64_t>(target_v), data_of<float>(L.stats),
             data_of<float>(grad_tckd_v), data_of<float>(grad_nckd_v), dx, dy, L.V, L.xl, L.yl, L.inv_temperature);
  });
  return L.gradients();
}

}  // namespace fastkd

TORCH_LIBRARY_IMPL(FASTKD_LIBRARY, FASTKD_DISPATCH_KEY, m) {
  m.impl("cuda_dkd_rows", &fastkd::dkd_rows);
  m.impl("cuda_dkd_rows_backward", &fastkd::dkd_rows_backward);
}
