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
// gradient is exactly 0), times the row's weights tckd_weight / T and nckd_weight / T, read per row only when the
// gradient pass runs.
// Temperature: the float T, or row r's own T_r = temperature_rows[r] (any stride; read once per row, inverted
// correctly rounded; not > 0 or NaN: NaN terms and gradients). d_T (temperature_grad): TCKD and NCKD are functions
// of x, y over the whole row (the target's column included) that a constant added to a row does not change, so with
// GX, GY the weighted gradients by the raw logits (both computed whichever are written; the target column's too),
//   d_T = -sum_j (GX_j a_j + GY_j b_j),  a_j = x_j - M_x, b_j = y_j - M_y for every column j, the target's included
// (M the maxima of the rest: any shift common to the row gives the same sum). The target column's term is added
// once per row (0 where its gradient is exactly 0); a rest column's, with GX_j = q_factor q_j - g_n p_j and
// GY_j = p_factor p_j + g_n p_j ((b_j - a_j) - Ebar), is formed from exp(a_j), exp(b_j) and the row factors
// q_factor / Z_x, 1 / Z_y (no per-element division, so the d_T sum adds no division call to the loop):
//   exp(a_j) (q_factor / Z_x) a_j + exp(b_j) / Z_y (p_factor b_j + g_n (((b_j - a_j) - Ebar) b_j - a_j)),
// each part 0 where its exp is 0 (a masked logit: no 0 * -inf).
//
// Design: one block per row, one launch: pass 1 the maxima of the rest, pass 2 the sums against them, and when a
// gradient is asked for pass 3 the gradient, from the statistics every thread of the block holds (nothing per row
// written to global memory and read back). Pass 1 stages the row pair in shared memory where it fits (kl.cu says
// how long a row that is), and the later passes read the copy; a longer row is re-read in each pass. Element
// traffic per call, N rows of C classes, g gradients: staged, reads 2 x N x C; re-read, 4 x N x C (passes 1 and
// 2) and, with a gradient, 2 x N x C more (pass 3; passes 2 and 3 mostly from L2); plus x_g, y_g; writes g x N x
// C. In bytes, staged: (2 + g) x N x C x 2 for bf16/fp16, x 4 for fp32; re-read: (6 + g) x N x C x 2 (x 4) with
// a gradient, 4 x N x C x 2 (x 4) without. Exponentials per element: pass 2 two `exp_accurate`
// and the series of `exp_diff`; pass 3 two and 2 correctly rounded divisions. d_T: with both gradients written,
// two multiply-adds per element and one block sum per row more (and a float per row written); asked for alone,
// pass 3 runs for it (the 2 x N x C re-read, no N x C write), and with one gradient the other side's is computed
// too, not stored. Precision: see common.cuh.
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
  float inv_temperature, m_x, m_y, z_x, z_y, e_bar, g_n, dx_target, q_factor, dy_target, p_factor, tq, tp, r_x, r_y;
};

template <typename TX, typename TY, bool X_GRAD, bool Y_GRAD>
__global__ void __launch_bounds__(kMaxThreads)
    dkd_rows_kernel(const TX* __restrict__ x_base, const TY* __restrict__ y_base, const int64_t* __restrict__ target,
                    float* __restrict__ tckd_out, float* __restrict__ nckd_out, TX* __restrict__ dx_base,
                    TY* __restrict__ dy_base, float* __restrict__ dt_out, RowWeights weights, int64_t V,
                    RowLayout xl, RowLayout yl, RowTemperature temperature) {
  const int64_t row = blockIdx.x;
  const float inv_temperature = temperature.inverse(row);
  const TX* x_row = x_base + row_offset(row, xl);
  const TY* y_row = y_base + row_offset(row, yl);
  const int64_t t = target[row];
  const bool valid = t >= 0 && t < V;  // out of range: NaN, never an out-of-bounds read

  // Pass 1: the maxima of the rest (the target column is -inf).
  Floats<2> m;
  m.v[0] = neg_inf();
  m.v[1] = neg_inf();
  first_pass(x_row, xl.col, y_row, yl.col, V, row, V, [&](int64_t c, float x_raw, float y_raw, float&, float&) {
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
  const RowPair<TX, TY> in2 = rows_to_read(x_row, xl.col, y_row, yl.col, V, row, V);
  visit_row(in2.x, in2.x_col, in2.y, in2.y_col, V, [&](int64_t c, float x_raw, float y_raw, float&, float&) {
    if (c == t) return;
    const float a = scaled(x_raw, inv_temperature) - m_x;
    const float b = scaled(y_raw, inv_temperature) - m_y;
    add_kl_terms</*P_IS_X=*/false>(s, a, b, [] {});  // NCKD = KL(p~ || q~): P is the teacher, y
  });
  s = block_sum<5>(s);  // every thread gets the same sums, hence the same statistics

  const float z_x = s.v[0];
  const float z_y = s.v[1];
  const bool has_rest = z_y > 0.0f;
  const float e_bar = __fdiv_rn(s.v[2], has_rest ? z_y : 1.0f);
  // NCKD stored at once (NaN'd below if undefined): s.v[3], s.v[4] and it not live across what follows (a stack frame).
  if (threadIdx.x == 0) {
    float nckd = e_bar - log_ratio(z_y, z_x, s.v[3]);
    if (s.v[4] > 0.0f) nckd = pos_inf();
    if (!has_rest) nckd = 0.0f;  // no non-target teacher mass (one class): nothing to transfer
    nckd_out[row] = nckd;
  }

  const float x_g = valid ? scaled(to_float(x_row[t * xl.col]), inv_temperature) : 0.0f;
  const float y_g = valid ? scaled(to_float(y_row[t * yl.col]), inv_temperature) : 0.0f;

  const float u_s = valid ? (x_g - m_x) - log_rn(z_x) : quiet_nan();
  const float u_t = valid ? (y_g - m_y) - log_rn(z_y) : quiet_nan();
  const BinarySplit split = binary_split(u_s, u_t);
  const float bt_g = exp_accurate(split.log_bt_g);
  const float bt_r = exp_accurate(split.log_bt_r);
  const float tckd = (bt_g > 0.0f ? bt_g * (split.log_bt_g - split.log_bs_g) : 0.0f) +
                     (bt_r > 0.0f ? bt_r * (split.log_bt_r - split.log_bs_r) : 0.0f);

  // The terms, by thread 0, before the gradient pass: nothing of them stays live across it.
  if (threadIdx.x == 0) {
    // A NaN anywhere in the row makes both terms NaN: the zero-mass guards above would otherwise hide it.
    const bool nan_in_row = isnan(z_x) || isnan(z_y) || isnan(x_g) || isnan(y_g);
    const bool defined = valid && !nan_in_row;
    tckd_out[row] = defined ? tckd : quiet_nan();
    if (!defined) nckd_out[row] = quiet_nan();
  }

  // Pass 3 (re-read), when a gradient or d_T is asked for: the weighted gradient from the statistics above, and
  // d_T = -sum (GX a + GY b) over both sides' gradients (whichever are written), the target column included with
  // its own a = x_g - M_x, b = y_g - M_y (any shift common to a row's columns gives the same sum).
  float* const d_t = dt_out != nullptr ? dt_out + row : nullptr;
  const bool t_grad = d_t != nullptr;
  if (X_GRAD || Y_GRAD || t_grad) {
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
    // instead of keeping them live across it (which took a stack frame for some instances). 1/T too: a per-row
    // value now, no longer a kernel parameter (which nvcc reads from the constant bank).
    __shared__ DkdGradientRow k;
    if (threadIdx.x == 0) {
      // d_T's factors of exp(a) and exp(b) (below); a row division each, only where d_T is asked for.
      // (__fdividef: ~2 ulp, no slow-path call; Z <= C, and a Z of 0 is never used.)
      const float tq = t_grad ? __fdividef(q_factor, z_x) : 0.0f;
      const float tp = t_grad ? __fdividef(1.0f, z_y) : 0.0f;
      // The row reciprocals of q~ and p~'s divisions (div_by_row: per element a multiply and two FMAs, no call).
      k = DkdGradientRow{inv_temperature, m_x, m_y, z_x, z_y, e_bar, g_n, dx_target, q_factor, dy_target, p_factor,
                         tq, tp, __frcp_rn(z_x), __frcp_rn(z_y)};
    }
    __syncthreads();
    // d_T's target column, added once (thread 0's sum starts from it); the loop adds the other columns, so that it
    // needs no unmasked copy of a and b: a_g = x_g - M_x, b_g = y_g - M_y (M the maxima of the rest: any shift
    // common to the row gives the same sum). NaN for an invalid target, through the factors (tq too).
    const float t_target = t_grad && threadIdx.x == 0
                               ? temperature_term(dx_target, x_g - m_x) + temperature_term(dy_target, y_g - m_y)
                               : 0.0f;
    const RowPair<TX, TY> in3 = rows_to_read(x_row, xl.col, y_row, yl.col, V, row, V);
    write_row_gradients<X_GRAD, Y_GRAD>(in3.x, in3.x_col, in3.y, in3.y_col, X_GRAD ? dx_base + row * V : nullptr,
                                        Y_GRAD ? dy_base + row * V : nullptr, V, /*active=*/true, d_t, t_target,
                                        [&](int64_t c, float x_raw, float y_raw, float& gx, float& gy,
                                            auto t_grad_flag) {
      constexpr bool T_GRAD = decltype(t_grad_flag)::value;
      const bool is_target = c == t;
      // The non-target distributions; 0 on the target column and where a logit is -inf (also when Z = 0,
      // where exp(a) / Z would be NaN).
      const float a = is_target ? neg_inf() : scaled(x_raw, k.inv_temperature) - k.m_x;
      const float b = is_target ? neg_inf() : scaled(y_raw, k.inv_temperature) - k.m_y;
      const float ea = exp_accurate(a);
      const float eb = exp_accurate(b);
      // d_T's element of a non-target column, GX a + GY b with GX = q_factor q - g_n p, GY = p_factor p +
      // g_n p ((b - a) - Ebar), from exp(a), exp(b) rather than q, p (q = exp(a) tq / q_factor, p = exp(b) tp),
      // before the divisions: no value of it lives across their calls, and the loop without an input gradient
      // calls none. 0 where exp(a) (exp(b)) is 0: the target column (a = b = -inf here; its term is thread 0's
      // starting value) and the -inf logits.
      float t_term = 0.0f;
      if (T_GRAD) {
        const float from_q = ea > 0.0f ? (ea * k.tq) * a : 0.0f;
        const float from_p = eb > 0.0f ? (eb * k.tp) * ((k.p_factor * b + k.g_n * (((b - a) - k.e_bar) * b)) -
                                                          k.g_n * a) : 0.0f;
        t_term = from_q + from_p;
      }
      const float q = ea > 0.0f ? div_by_row(ea, k.z_x, k.r_x) : 0.0f;
      const float p = eb > 0.0f ? div_by_row(eb, k.z_y, k.r_y) : 0.0f;
      if (X_GRAD) gx = is_target ? k.dx_target : k.q_factor * q - k.g_n * p;
      if (Y_GRAD) {
        // The same `b - a` as the sum behind Ebar: exactly 0 for a one-hot p~.
        const float nckd_term = p > 0.0f ? p * ((b - a) - k.e_bar) : 0.0f;
        gy = is_target ? k.dy_target : k.p_factor * p + k.g_n * nckd_term;
      }
      return t_term;
    });
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dkd_rows(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& target, double temperature,
    const std::optional<at::Tensor>& temperature_rows, const std::optional<at::Tensor>& tckd_weight,
    const std::optional<at::Tensor>& nckd_weight, bool student_grad, bool teacher_grad, bool temperature_grad) {
  const RowCall L("fastkd::cuda_dkd_rows", student, teacher, temperature, temperature_rows, /*x_student=*/true,
                  student_grad, teacher_grad, temperature_grad);
  at::Tensor tckd = at::empty({L.rows}, L.floats);
  at::Tensor nckd = at::empty({L.rows}, L.floats);
  if (L.idle()) return {tckd, nckd, L.d_student, L.d_teacher, L.d_temperature};
  const at::Tensor target_v = L.indices("target", target);
  const RowWeights w = L.weights("tckd_weight", tckd_weight, "nckd_weight", nckd_weight);
  L.dispatch([&]<typename TX, typename TY, bool X_GRAD, bool Y_GRAD>(const TX* x, const TY* y, TX* dx, TY* dy) {
    L.launch(dkd_rows_kernel<TX, TY, X_GRAD, Y_GRAD>, x, y, data_of<int64_t>(target_v), mutable_data_of<float>(tckd),
             mutable_data_of<float>(nckd), dx, dy, L.d_temperature_data(), w, L.V, L.xl, L.yl, L.temperature());
  });
  return {tckd, nckd, L.d_student, L.d_teacher, L.d_temperature};
}

}  // namespace fastkd

TORCH_LIBRARY_IMPL(FASTKD_LIBRARY, FASTKD_DISPATCH_KEY, m) {
  m.impl("cuda_dkd_rows", &fastkd::dkd_rows);
}
