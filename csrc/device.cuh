// What differs between the CUDA build (nvcc) and the CPU stand-in (g++ with -DFASTKD_STANDIN, which runs the
// same kernels on CPU threads for the tests; see csrc/standin/cuda_standin.h): the CUDA headers, the kernel
// launch, which tensors are on the device, and the operator library and dispatch key the kernels register
// under. The stand-in registers under another library (fastkd_standin by default), so it never collides with
// the real extension in one process.
#pragma once

#include <ATen/ATen.h>

#include "library.h"

#ifdef FASTKD_STANDIN
#include "standin/cuda_standin.h"
#define FASTKD_DISPATCH_KEY CPU
#define FASTKD_LAUNCH(grid, block, smem, stream, ...) ::fastkd_standin::bind(__VA_ARGS__, grid, block, smem)
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#define FASTKD_DISPATCH_KEY CUDA
// `FASTKD_LAUNCH(grid, block, smem, stream, kernel)(args...)` is `kernel<<<grid, block, smem, stream>>>(args...)`.
// The kernel comes last because a template kernel's name holds commas, which only the variadic part may take.
#define FASTKD_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

namespace fastkd {

// Tensors the kernels may read: CUDA tensors, or CPU tensors for the stand-in.
inline bool on_device(const at::Tensor& t) {
#ifdef FASTKD_STANDIN
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}

}  // namespace fastkd
