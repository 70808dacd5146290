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
// ce_weight), read per row only when a gradient is written.
//
// Design: one block per row, one launch, the row re-read rather than staged (no shared-memory staging, so any
// V; the longest row held on chip: none). Pass 1 the maxima, pass 2 the sums against them (no rescaling), and,
// when a gradient is asked for, pass 3 the gradient from the statistics the block holds in registers (every
// thread has the block sums): nothing per row is written to global memory and read back. Element traffic per
// call, N rows of V, g gradients asked for (0, 1 or 2): reads 4 x N x V (X and Y in passes 1 and 2) and, with a
// gradient, 2 x N x V more (pass 3; passes 2 and 3 mostly served from L2, a block's row being at most a few
// hundred KB), writes g x N x V. In bytes: (6 + g) x N x V x 2 for bf16/fp16, x 4 for fp32, with a gradient;
// 4 x N x V x 2 (x 4) without (no N x V write). Plus per row the weights, the label and the target logit (CE).
// Exponentials per element: pass 2 two `exp_accurate` (three with CE) and the series of `exp_diff`; pass 3 two
// (three with CE) and one correctly rounded division per probability. Precision: see common.cuh.
#include "common.cuh"

namespace fastkd {
namespace {

template <typename TX, typename TY, bool X_GRAD, bool Y_GRAD>
__global__ void __launch_bounds__(kMaxThreads)
    kl_rows_kernel(const TX* __restrict__ x_base, const TY* __restrict__ y_base, const int64_t* __restrict__ labels,
                   const int64_t* __restrict__ target, float* __restrict__ kl_out, float* __restrict__ ce_out,
                   TX* __restrict__ dx_base, TY* __restrict__ dy_base, RowWeights weights, int64_t V,
                   RowLayout xl, RowLayout yl, float inv_temperature, int64_t ignore_index) {
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
  const float m_x = finite_or_zero(m.v[0]);
  const float m_y = finite_or_zero(m.v[1]);
  const float m_s = has_ce ? finite_or_zero(m.v[2]) : 0.0f;

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
  s = block_sum<6>(s);  // every thread gets the same sums, hence the same statistics
  const float z_x = s.v[0], z_y = s.v[1], z_s = s.v[4];
  const float e_bar = __fdiv_rn(s.v[2], z_x);
  const int64_t t = has_ce ? target[row] : -1;

  // Pass 3 (re-read), when a gradient is asked for: the weighted gradient from the statistics above.
  if constexpr (X_GRAD || Y_GRAD) {
    // d/dX = d/dx / T: the 1/T rides on the KL weight.
    const float g_kl = weights.at(0, row) * inv_temperature;
    const float g_ce = has_ce ? weights.at(1, row) : 0.0f;
    write_row_gradients<X_GRAD, Y_GRAD>(x_row, xl.col, y_row, yl.col, X_GRAD ? dx_base + row * V : nullptr,
                                        Y_GRAD ? dy_base + row * V : nullptr, V, active,
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
      // The same `a - b` as the sum E: exactly 0 for a one-hot p. 0 where p = 0 (`ea != 0` lets a NaN through:
      // a NaN logit gives a NaN gradient, as the reference's).
      if (X_GRAD) gx = (ea != 0.0f ? p * ((a - b) - e_bar) : 0.0f) * g_kl;
    });
  }
  if (threadIdx.x != 0) return;

  float kl = e_bar - log_ratio(z_x, z_y, s.v[3]);
  if (s.v[5] > 0.0f) kl = pos_inf();
  if (has_ce) {
    const bool valid = t >= 0 && t < V;  // out of range: NaN, never an out-of-bounds read
    const float s_target = valid ? to_float(y_row[t * yl.col]) : 0.0f;
    ce_out[row] = valid ? (m_s - s_target) + log_rn(z_s) : quiet_nan();
  }
  if (!active) kl = 0.0f;  // an ignored token (its sums are empty: 0 / 0)
  kl_out[row] = kl;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kl_rows(
    const at::Tensor& student, const at::Tensor& teacher, double temperature, bool reverse,
    const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& labels, int64_t ignore_index,
    const std::optional<at::Tensor>& kl_weight, const std::optional<at::Tensor>& ce_weight, bool student_grad,
    bool teacher_grad) {
  const RowCall L("fastkd::cuda_kl_rows", student, teacher, temperature, /*x_student=*/reverse, student_grad,
                  teacher_grad);
  at::Tensor kl = at::empty({L.rows}, L.floats);
  at::Tensor ce = at::empty({target.has_value() ? L.rows : 0}, L.floats);
  if (L.idle()) return {kl, ce, L.d_student, L.d_teacher};
  const at::Tensor target_v = L.indices("target", target);
  const at::Tensor labels_v = L.indices("labels", labels);
  const RowWeights w = L.weights("kl_weight", kl_weight, "ce_weight", ce_weight);
  L.dispatch([&]<typename TX, typename TY, bool X_GRAD, bool Y_GRAD>(const TX* x, const TY* y, TX* dx, TY* dy) {
    L.launch(kl_rows_kernel<TX, TY, X_GRAD, Y_GRAD>, x, y, data_or_null<int64_t>(labels_v),
             data_or_null<int64_t>(target_v), mutable_data_of<float>(kl),
             target_v.defined() ? mutable_data_of<float>(ce) : nullptr, dx, dy, w, L.V, L.xl, L.yl,
             L.inv_temperature, ignore_index);
  });
  return {kl, ce, L.d_student, L.d_teacher};
}

}  // namespace fastkd

TORCH_LIBRARY_IMPL(FASTKD_LIBRARY, FASTKD_DISPATCH_KEY, m) {
  m.impl("cuda_kl_rows", &fastkd::kl_rows);
}
