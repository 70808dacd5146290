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
#define FASTKD_DYNAMIC_SHARED(name) unsigned char* const name = ::fastkd_standin::dynamic_shared
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#define FASTKD_DISPATCH_KEY CUDA
// `FASTKD_LAUNCH(grid, block, smem, stream, kernel)(args...)` is `kernel<<<grid, block, smem, stream>>>(args...)`.
// The kernel comes last because a template kernel's name holds commas, which only the variadic part may take.
#define FASTKD_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
// `FASTKD_DYNAMIC_SHARED(name);` in a kernel: `name`, an unsigned char pointer to the block's dynamic shared memory
// (16-byte aligned; its size in bytes is `dynamic_shared_bytes()`).
#define FASTKD_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace fastkd {

// The size of the block's dynamic shared memory, as the launch gave it (0: none).
#ifdef FASTKD_STANDIN
inline unsigned dynamic_shared_bytes() { return ::fastkd_standin::dynamic_shared_size; }
#else
__device__ __forceinline__ unsigned dynamic_shared_bytes() {
  unsigned bytes;
  asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(bytes));  // volatile: read anew, not kept in a register
  return bytes;
}
#endif

// Tensors the kernels may read: CUDA tensors, or CPU tensors for the stand-in.
inline bool on_device(const at::Tensor& t) {
#ifdef FASTKD_STANDIN
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}

}  // namespace fastkd
