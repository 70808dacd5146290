// The backward of the logit row operators: the CUDA C++ version of fastkd/triton/rows.py `scale_rows_`, the same
// semantics. The row kernels (kl.cu, jsd.cu, dkd.cu) write their gradient in the forward launch, each row already
// multiplied by its weight in the loss; the backward multiplies row r of that contiguous `(..., V)` buffer by
// scale[r] (float32 (rows,), any stride: an expanded 0-stride view of one number is read through stride 0), in
// place. A row whose scale is exactly 1.0 (the usual loss.backward()) is not touched: its block reads the scale
// and returns, decided on the device with no host sync. Otherwise a plain float32 multiply rounded once to d's
// dtype, as autograd's grad_output * local_gradient: 0 times an infinite (or NaN) entry is NaN.
//
// Design: one block per row. Traffic: one scalar load of the scale per row, plus 1 read + 1 write of the row
// (V x sizeof(d) bytes each way, 16-byte vector accesses where aligned) where the scale is not 1; no
// exponentials.
#include "common.cuh"

namespace fastkd {
namespace {

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    scale_rows_kernel(T* __restrict__ d_base, const float* __restrict__ scale, int64_t scale_stride, int64_t V) {
  const int64_t row = blockIdx.x;
  const float s = scale[row * scale_stride];
  if (s == 1.0f) return;  // the gradient is final as the forward wrote it: no read, no write
  T* d = d_base + row * V;
  // The row as both operand and output (visit_row reads it as x and y, and writes a): one element per visit.
  visit_row</*WA=*/true, /*WB=*/false>(d, 1, d, 1, d, static_cast<T*>(nullptr), V,
                                       [&](int64_t, float v, float, float& out, float&) { out = __fmul_rn(v, s); });
}

}  // namespace

void scale_rows_(const at::Tensor& d, const at::Tensor& scale) {
  constexpr const char* op = "fastkd::cuda_scale_rows_";
  if (d.numel() == 0) return;
  TORCH_CHECK(on_device(d), op, ": d must be a CUDA tensor");
  TORCH_CHECK(d.is_contiguous(), op, ": scale_rows_ takes a contiguous gradient buffer");
  TORCH_CHECK_TYPE(kernel_dtype(d.scalar_type()), op, ": d must be float32, float16 or bfloat16, got ",
                   d.scalar_type());
  const int64_t V = d.size(-1);
  const int64_t rows = d.numel() / V;
  check_same_device(op, "scale", scale, "d", d);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == rows, op, ": scale must have shape (", rows, "), got ",
              scale.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(scale.scalar_type()), op, ": scale must be float32, got ", scale.scalar_type());
  const at::Tensor s = scale.scalar_type() == at::kFloat ? scale : scale.to(at::kFloat);
  const Launch L(op, d);
  dispatch_kernel_dtype(d.scalar_type(), [&]<typename T>() {
    L.launch(grid_x(op, rows), threads_for(V), scale_rows_kernel<T>, mutable_data_of<T>(d), data_of<float>(s),
             s.stride(0), V);
  });
}

}  // namespace fastkd

TORCH_LIBRARY_IMPL(FASTKD_LIBRARY, FASTKD_DISPATCH_KEY, m) {
  m.impl("cuda_scale_rows_", &fastkd::scale_rows_);
}
