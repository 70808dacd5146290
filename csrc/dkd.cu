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
// Gradient (the binary split and TCKD, Ebar as this block computed them: for a one-hot teacher the teacher's
// gradient is exactly 0), times the row's weights tckd_weight / T and nckd_weight / T, read per row only when a
// gradient is written.
//
// Design: one block per row, one launch, the row re-read rather than staged (any C; the longest row held on
// chip: none): pass 1 the maxima of the rest, pass 2 the sums against them, and when a gradient is asked for
// pass 3 the gradient, from the statistics every thread of the block holds (nothing per row written to global
// memory and read back). Element traffic per call, N rows of C classes, g gradients: reads 4 x N x C (both rows
// in passes 1 and 2) and, with a gradient, 2 x N x C more (pass 3; passes 2 and 3 mostly from L2), plus x_g,
// y_g; writes g x N x C. In bytes: (6 + g) x N x C x 2 for bf16/fp16, x 4 for fp32, with a gradient; 4 x N x C
// x 2 (x 4) without (no N x C write). Exponentials per element: pass 2 two `exp_accurate`
// and the series of `exp_diff`; pass 3 two and 2 correctly rounded divisions. Precision: see common.cuh.
#include "common.cuh"

namespace fastkd {
namespace {

// log(1 + e^z) (dkd.py `softplus`): inf at +inf, 0 at -inf; log1pf is 1 ulp, exp_accurate ~2.5 ulp.
__device__ __forceinline__ float softplus(float z) { return fmaxf(z, 0.0f) + log1pf(exp_accurate(-fabsf(z))); }

struct BinarySplit {
  float log_bs_g, log_bs_r, log_bt_g, log_bt_r;
};

// The student's and teacher's [target, rest] split in log space from the log-odds (dkd.py `binary_split`).
__device__ __forceinline__ BinarySplit binary_split(float u_s, float u_t) {
  return BinarySplit{-softplus(-u_s), -softplus(u_s), -softplus(-u_t), -softplus(u_t)};
}

// The row constants of the gradient pass.
struct DkdGradientRow {
  float m_x, m_y, z_x, z_y, e_bar, g_n, dx_target, q_factor, dy_target, p_factor;
};

template <typename TX, typename TY, bool X_GRAD, bool Y_GRAD>
__global__ void __launch_bounds__(kMaxThreads)
    dkd_rows_kernel(const TX* __restrict__ x_base, const TY* __restrict__ y_base, const int64_t* __restrict__ target,
                    float* __restrict__ tckd_out, float* __restrict__ nckd_out, TX* __restrict__ dx_base,
                    TY* __restrict__ dy_base, RowWeights weights, int64_t V, RowLayout xl, RowLayout yl,
                    float inv_temperature) {
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
  s = block_sum<5>(s);  // every thread gets the same sums, hence the same statistics

  const float x_g = valid ? scaled(to_float(x_row[t * xl.col]), inv_temperature) : 0.0f;
  const float y_g = valid ? scaled(to_float(y_row[t * yl.col]), inv_temperature) : 0.0f;
  const float z_x = s.v[0];
  const float z_y = s.v[1];
  const bool has_rest = z_y > 0.0f;
  const float e_bar = __fdiv_rn(s.v[2], has_rest ? z_y : 1.0f);

  const float u_s = valid ? (x_g - m_x) - log_rn(z_x) : quiet_nan();
  const float u_t = valid ? (y_g - m_y) - log_rn(z_y) : quiet_nan();
  const BinarySplit split = binary_split(u_s, u_t);
  const float bt_g = exp_accurate(split.log_bt_g);
  const float bt_r = exp_accurate(split.log_bt_r);
  const float tckd = (bt_g > 0.0f ? bt_g * (split.log_bt_g - split.log_bs_g) : 0.0f) +
                     (bt_r > 0.0f ? bt_r * (split.log_bt_r - split.log_bs_r) : 0.0f);

  // The terms, by thread 0, before the gradient pass: nothing of them stays live across it.
  if (threadIdx.x == 0) {
    float nckd = e_bar - log_ratio(z_y, z_x, s.v[3]);
    if (s.v[4] > 0.0f) nckd = pos_inf();
    if (!has_rest) nckd = 0.0f;  // no non-target teacher mass (one class): nothing to transfer
    // A NaN anywhere in the row makes both terms NaN: the zero-mass guards above would otherwise hide it.
    const bool nan_in_row = isnan(z_x) || isnan(z_y) || isnan(x_g) || isnan(y_g);
    const bool defined = valid && !nan_in_row;
    tckd_out[row] = defined ? tckd : quiet_nan();
    nckd_out[row] = defined ? nckd : quiet_nan();
  }

  // Pass 3 (re-read), when a gradient is asked for: the weighted gradient from the statistics above.
  if constexpr (X_GRAD || Y_GRAD) {
    // d/dS = d/dx / T: the 1/T rides on the row's weights.
    const float g_t = weights.at(0, row) * inv_temperature;
    const float g_n = weights.at(1, row) * inv_temperature;
    const float bs_g = exp_accurate(split.log_bs_g);
    const float bs_r = exp_accurate(split.log_bs_r);
    // Student: the target column, and the factor of q~ on the others.
    float dx_target = g_t * (bs_g - bt_g);
    float q_factor = g_t * (bs_r - bt_r) + g_n;
    // Teacher: the target column, and the factor of p~ (through R_y) on the others.
    float dy_target = g_t * (bt_g > 0.0f ? bt_g * ((split.log_bt_g - split.log_bs_g) - tckd) : 0.0f);
    float p_factor = g_t * (bt_r > 0.0f ? bt_r * ((split.log_bt_r - split.log_bs_r) - tckd) : 0.0f);
    // An out-of-range target: a NaN gradient, through the factors (NaN times any p~, q~, 0 included; no column
    // is the target), so that the loop below carries no flag.
    if (!valid) dx_target = q_factor = dy_target = p_factor = quiet_nan();
    // The loop's row constants, from shared memory: nvcc reloads them there after each division's slow-path call
    // instead of keeping them live across it (which took a stack frame for some instances).
    __shared__ DkdGradientRow k;
    if (threadIdx.x == 0) {
      k = DkdGradientRow{m_x, m_y, z_x, z_y, e_bar, g_n, dx_target, q_factor, dy_target, p_factor};
    }
    __syncthreads();
    write_row_gradients<X_GRAD, Y_GRAD>(x_row, xl.col, y_row, yl.col, X_GRAD ? dx_base + row * V : nullptr,
                                        Y_GRAD ? dy_base + row * V : nullptr, V, /*active=*/true,
                                        [&](int64_t c, float x_raw, float y_raw, float& gx, float& gy) {
      const bool is_target = c == t;
      // The non-target distributions; 0 on the target column and where a logit is -inf (also when Z = 0,
      // where exp(a) / Z would be NaN).
      const float a = is_target ? neg_inf() : scaled(x_raw, inv_temperature) - k.m_x;
      const float b = is_target ? neg_inf() : scaled(y_raw, inv_temperature) - k.m_y;
      const float ea = exp_accurate(a);
      const float eb = exp_accurate(b);
      const float q = ea > 0.0f ? __fdiv_rn(ea, k.z_x) : 0.0f;
      const float p = eb > 0.0f ? __fdiv_rn(eb, k.z_y) : 0.0f;
      if (X_GRAD) gx = is_target ? k.dx_target : k.q_factor * q - k.g_n * p;
      if (Y_GRAD) {
        // The same `b - a` as the sum behind Ebar: exactly 0 for a one-hot p~.
        const float nckd_term = p > 0.0f ? p * ((b - a) - k.e_bar) : 0.0f;
        gy = is_target ? k.dy_target : k.p_factor * p + k.g_n * nckd_term;
      }
    });
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dkd_rows(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& target, double temperature,
    const std::optional<at::Tensor>& tckd_weight, const std::optional<at::Tensor>& nckd_weight, bool student_grad,
    bool teacher_grad) {
  const RowCall L("fastkd::cuda_dkd_rows", student, teacher, temperature, /*x_student=*/true, student_grad,
                  teacher_grad);
  at::Tensor tckd = at::empty({L.rows}, L.floats);
  at::Tensor nckd = at::empty({L.rows}, L.floats);
  if (L.idle()) return {tckd, nckd, L.d_student, L.d_teacher};
  const at::Tensor target_v = L.indices("target", target);
  const RowWeights w = L.weights("tckd_weight", tckd_weight, "nckd_weight", nckd_weight);
  L.dispatch([&]<typename TX, typename TY, bool X_GRAD, bool Y_GRAD>(const TX* x, const TY* y, TX* dx, TY* dy) {
    L.launch(dkd_rows_kernel<TX, TY, X_GRAD, Y_GRAD>, x, y, data_of<int64_t>(target_v), mutable_data_of<float>(tckd),
             mutable_data_of<float>(nckd), dx, dy, w, L.V, L.xl, L.yl, L.inv_temperature);
  });
  return {tckd, nckd, L.d_student, L.d_teacher};
}

}  // namespace fastkd

TORCH_LIBRARY_IMPL(FASTKD_LIBRARY, FASTKD_DISPATCH_KEY, m) {
  m.impl("cuda_dkd_rows", &fastkd::dkd_rows);
}
