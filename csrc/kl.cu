// Fused KL divergence between two rows of logits, with an optional cross-entropy on the Y rows, and its weighted
// gradient made in the same launch: the CUDA C++ version of fastkd/triton/kl.py (the specification; the maths
// and the error analysis are in its docstring), same formulation, same semantics.
//
// KL(P || Q) with P from logits X and Q from logits Y, both divided by T: forward KL is X = teacher,
// Y = student; reverse swaps them. Per row, with x = X * (1/T), y = Y * (1/T), the maxima kept apart from the
// sums (never lse = M + log Z):
//   a = x - M_x, b = y - M_y, Z_x = sum exp(a), Z_y = sum exp(b), Ebar = sum exp(a)(a - b) / Z_x,
//   D = Z_x - Z_y = sum exp_diff(a, b),  L = log(Z_x / Z_y) = log_ratio(Z_x, Z_y, D),  KL = Ebar - L;
// a term with p > 0 against y = -inf makes KL = +inf (a flag, never summed); a row max of -inf is taken as 0.
// CE = (M_s - s_target) + log Z_s on the raw Y logits s (NaN for a target outside [0, V)).
// Gradient: dKL/dy_j = q_j - p_j, dKL/dx_j = p_j ((a_j - b_j) - Ebar) (the row's own Ebar: exactly 0 for a
// one-hot p), dCE/ds_j = exp(s_j - M_s) / Z_s - [j = target]; times the row's weight (kl_weight / T,
// ce_weight), read per row only when the gradient pass runs.
// Temperature: the float T, or row r's own T_r = temperature_rows[r] (any stride; read once per row, inverted
// correctly rounded: the float T's bits for the same value; not > 0 or NaN: 1/T = NaN, so NaN terms and gradients).
// d_T (temperature_grad): KL is a function of x = X / T and y = Y / T that a constant added to a row does not change,
// so with GX_j = g_kl p_j ((a_j - b_j) - Ebar), GY_j = g_kl (q_j - p_j) the weighted gradients by the raw logits
// (g_kl = kl_weight / T; both computed whichever are written; CE excluded: it has no T),
//   d_T = d(kl_weight KL)/dT = -(1/T) sum_j (GX_j X_j + GY_j Y_j) = -sum_j (GX_j a_j + GY_j b_j),
// a term with GX_j (GY_j) exactly 0 adding 0 (also against a = -inf); an ignored token gets 0. Formed per element
// from exp(a_j), exp(b_j) and the row factors g_kl / Z_x, g_kl / Z_y (no per-element division, so the d_T sum adds
// no division call to the loop): exp(a_j) (g_kl / Z_x) (((a_j - b_j) - Ebar) a_j - b_j) + exp(b_j) (g_kl / Z_y) b_j,
// each part 0 where its exp is 0.
//
// Design: one block per row, one launch. Pass 1 the maxima, pass 2 the sums against them (no rescaling), and,
// when a gradient is asked for, pass 3 the gradient from the statistics the block holds in registers (every
// thread has the block sums): nothing per row is written to global memory and read back. Pass 1 stages the row
// pair in shared memory where it fits (common.cuh `first_pass`: (V + 8) x 4 bytes for a bf16/fp16 pair, (V + 4)
// x 8 for fp32, within the device's opt-in limit per block less the kernel's static shared memory: V up to ~57K
// for bf16 on an H100/H200's 227 KiB, ~41K on an A100's 163 KiB; fp32 half that), and passes 2 and 3 read the
// copy; a longer row is re-read from global memory (mostly L2) in each pass. Element traffic per call, N rows of
// V, g gradients asked for (0, 1 or 2): staged, reads 2 x N x V (X and Y once) with or without a gradient; re-read,
// 4 x N x V (passes 1 and 2) and, with a gradient, 2 x N x V more (pass 3); writes g x N x V. In bytes, staged:
// (2 + g) x N x V x 2 for bf16/fp16, x 4 for fp32; re-read: (6 + g) x N x V x 2 (x 4) with a gradient, 4 x N x V
// x 2 (x 4) without. Plus per row the weights, the label and the target logit (CE). A staged row of 32000 bf16
// logits takes 128 KB: one block per SM, whose loads are not overlapped with another block's exponentials;
// FASTKD_CUDA_STAGE_BYTES caps the staged bytes (0: never), so a GPU run can time both.
// Exponentials per element: pass 2 two `exp_accurate` (three with CE) and the series of `exp_diff`; pass 3 two
// (three with CE) and one correctly rounded division per probability. d_T costs nothing more where both gradients
// are written but two multiply-adds per element and one block sum per row (plus a float written per row); asked
// for alone, pass 3 runs to compute it (the 2 x N x V re-read above, no N x V write), and with one gradient the
// other side's values are computed too (not stored). Precision: see common.cuh.
#include "common.cuh"

namespace fastkd {
namespace {

template <typename TX, typename TY, bool X_GRAD, bool Y_GRAD>
__global__ void __launch_bounds__(kMaxThreads)
    kl_rows_kernel(const TX* __restrict__ x_base, const TY* __restrict__ y_base, const int64_t* __restrict__ labels,
                   const int64_t* __restrict__ target, float* __restrict__ kl_out, float* __restrict__ ce_out,
                   TX* __restrict__ dx_base, TY* __restrict__ dy_base, float* __restrict__ dt_out,
                   RowWeights weights, int64_t V, RowLayout xl, RowLayout yl, RowTemperature temperature,
                   int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const float inv_temperature = temperature.inverse(row);
  const TX* x_row = x_base + row_offset(row, xl);
  const TY* y_row = y_base + row_offset(row, yl);
  const bool has_ce = target != nullptr;
  // An ignored token reads nothing: 0 columns (V >= 1, so `n_cols != 0` says the token is active; a separate flag,
  // live across the kernel, took a stack slot in one instance).
  const int64_t n_cols = labels != nullptr && labels[row] == ignore_index ? 0 : V;

  // Pass 1: the maxima of x, y and the raw s = Y (for CE).
  Floats<3> m;
  m.v[0] = neg_inf(); m.v[1] = neg_inf(); m.v[2] = neg_inf();
  first_pass(x_row, xl.col, y_row, yl.col, n_cols, row, V, [&](int64_t, float x_raw, float y_raw, float&, float&) {
    max_scaled(m, x_raw, y_raw, inv_temperature);
    m.v[2] = fmaxf(m.v[2], y_raw);
  });
  m = block_max<3>(m);
  const float m_x = finite_or_zero(m.v[0]);
  const float m_y = finite_or_zero(m.v[1]);
  const float m_s = has_ce ? finite_or_zero(m.v[2]) : 0.0f;

  // Pass 2 (re-read): per thread [Z_x, Z_y, E, D, Z_s, number of p > 0 against y = -inf].
  Floats<6> s;
#pragma unroll
  for (int i = 0; i < 6; ++i) s.v[i] = 0.0f;
  const RowPair<TX, TY> in2 = rows_to_read(x_row, xl.col, y_row, yl.col, n_cols, row, V);
  visit_row(in2.x, in2.x_col, in2.y, in2.y_col, n_cols, [&](int64_t, float x_raw, float y_raw, float&, float&) {
    const float a = scaled(x_raw, inv_temperature) - m_x;
    const float b = scaled(y_raw, inv_temperature) - m_y;
    // Z_s for CE. y_raw captured by value: by reference, it changed nvcc's register allocation of the kernel.
    add_kl_terms<true>(s, a, b, [&s, has_ce, y_raw, m_s] {
      if (has_ce) s.v[4] += exp_accurate(y_raw - m_s);
    });
  });
  s = block_sum<6>(s);  // every thread gets the same sums, hence the same statistics
  const float z_x = s.v[0], z_y = s.v[1], z_s = s.v[4];
  const float e_bar = __fdiv_rn(s.v[2], z_x);
  const int64_t t = has_ce ? target[row] : -1;

  // The terms, by thread 0, before the gradient pass (as dkd.cu): nothing of them stays live across it and its calls.
  if (threadIdx.x == 0) {
    float kl = e_bar - log_ratio(z_x, z_y, s.v[3]);
    if (s.v[5] > 0.0f) kl = pos_inf();
    if (has_ce) {
      const bool valid = t >= 0 && t < V;  // out of range: NaN, never an out-of-bounds read
      const float s_target = valid ? to_float(y_row[t * yl.col]) : 0.0f;
      ce_out[row] = valid ? (m_s - s_target) + log_rn(z_s) : quiet_nan();
    }
    if (n_cols == 0) kl = 0.0f;  // an ignored token (its sums are empty: 0 / 0)
    kl_out[row] = kl;
  }

  // Pass 3 (re-read), when a gradient or d_T is asked for: the weighted gradient from the statistics above, and
  // d_T = -sum (GX a + GY b) over the KL part of both sides' gradients (whichever are written; CE excluded).
  float* const d_t = dt_out != nullptr ? dt_out + row : nullptr;
  const bool t_grad = d_t != nullptr;
  if (X_GRAD || Y_GRAD || t_grad) {
    // d/dX = d/dx / T: the 1/T rides on the KL weight.
    const float g_kl = weights.at(0, row) * inv_temperature;
    const float g_ce = has_ce ? weights.at(1, row) : 0.0f;
    // d_T's row factors of exp(a) and exp(b) (below): g_kl / Z_x, g_kl / Z_y, where d_T is asked for (__fdividef:
    // ~2 ulp, no slow-path call; Z <= V, and a Z of 0 is never used).
    const float t_x = t_grad ? __fdividef(g_kl, z_x) : 0.0f;
    const float t_y = t_grad ? __fdividef(g_kl, z_y) : 0.0f;
    // The row reciprocals of the probabilities' divisions (div_by_row: per element a multiply and two FMAs, no call).
    const float r_x = __frcp_rn(z_x);
    const float r_y = Y_GRAD ? __frcp_rn(z_y) : 0.0f;
    const float r_s = Y_GRAD && has_ce ? __frcp_rn(z_s) : 0.0f;
    const RowPair<TX, TY> in3 = rows_to_read(x_row, xl.col, y_row, yl.col, n_cols, row, V);
    write_row_gradients<X_GRAD, Y_GRAD>(in3.x, in3.x_col, in3.y, in3.y_col, X_GRAD ? dx_base + row * V : nullptr,
                                        Y_GRAD ? dy_base + row * V : nullptr, V, n_cols != 0, d_t, 0.0f,
                                        [&](int64_t c, float x_raw, float y_raw, float& gx, float& gy,
                                            auto t_grad_flag) {
      constexpr bool T_GRAD = decltype(t_grad_flag)::value;
      const float a = scaled(x_raw, inv_temperature) - m_x;
      const float b = scaled(y_raw, inv_temperature) - m_y;
      const float ea = exp_accurate(a);
      // d_T's element GX a + GY b, with GX = g_kl p ((a - b) - Ebar), GY = g_kl (q - p), formed from exp(a), exp(b)
      // and the row factors rather than p, q: before the divisions, so that no value of it lives across their
      // calls, and none in the loop without an input gradient. Each part 0 where its exp is 0 (`!= 0` lets a NaN
      // through).
      float t_term = 0.0f;
      if (T_GRAD) {
        const float eb = exp_accurate(b);
        t_term = (ea != 0.0f ? (ea * t_x) * (((a - b) - e_bar) * a - b) : 0.0f) + (eb != 0.0f ? (eb * t_y) * b : 0.0f);
      }
      const float p = div_by_row(ea, z_x, r_x);
      if (Y_GRAD) {
        float d = (div_by_row(exp_accurate(b), z_y, r_y) - p) * g_kl;
        if (has_ce) d += g_ce * (div_by_row(exp_accurate(y_raw - m_s), z_s, r_s) - (c == t ? 1.0f : 0.0f));
        gy = d;
      }
      // The same `a - b` as the sum E: exactly 0 for a one-hot p. 0 where p = 0 (`ea != 0` lets a NaN through:
      // a NaN logit gives a NaN gradient, as the reference's).
      if (X_GRAD) gx = (ea != 0.0f ? p * ((a - b) - e_bar) : 0.0f) * g_kl;
      return t_term;
    });
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> kl_rows(
    const at::Tensor& student, const at::Tensor& teacher, double temperature,
    const std::optional<at::Tensor>& temperature_rows, bool reverse, const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& labels, int64_t ignore_index, const std::optional<at::Tensor>& kl_weight,
    const std::optional<at::Tensor>& ce_weight, bool student_grad, bool teacher_grad, bool temperature_grad) {
  const RowCall L("fastkd::cuda_kl_rows", student, teacher, temperature, temperature_rows, /*x_student=*/reverse,
                  student_grad, teacher_grad, temperature_grad);
  at::Tensor kl = at::empty({L.rows}, L.floats);
  at::Tensor ce = at::empty({target.has_value() ? L.rows : 0}, L.floats);
  if (L.idle()) return {kl, ce, L.d_student, L.d_teacher, L.d_temperature};
  const at::Tensor target_v = L.indices("target", target);
  const at::Tensor labels_v = L.indices("labels", labels);
  const RowWeights w = L.weights("kl_weight", kl_weight, "ce_weight", ce_weight);
  L.dispatch([&]<typename TX, typename TY, bool X_GRAD, bool Y_GRAD>(const TX* x, const TY* y, TX* dx, TY* dy) {
    L.launch(kl_rows_kernel<TX, TY, X_GRAD, Y_GRAD>, x, y, data_or_null<int64_t>(labels_v),
             data_or_null<int64_t>(target_v), mutable_data_of<float>(kl),
             target_v.defined() ? mutable_data_of<float>(ce) : nullptr, dx, dy, L.d_temperature_data(), w, L.V,
             L.xl, L.yl, L.temperature(), ignore_index);
  });
  return {kl, ce, L.d_student, L.d_teacher, L.d_temperature};
}

}  // namespace fastkd

TORCH_LIBRARY_IMPL(FASTKD_LIBRARY, FASTKD_DISPATCH_KEY, m) {
  m.impl("cuda_kl_rows", &fastkd::kl_rows);
}
