// A CPU stand-in for the CUDA runtime: with it, csrc/*.cu compile as plain C++ (g++, -DFASTKD_STANDIN; see
// csrc/device.cuh) and their kernels run on CPU tensors, so that the device code is tested against the
// reference on machines without a GPU (fastkd/cuda/standin.py builds it, tests/test_cuda_standin.py runs it).
//
// Execution model. A launch runs the blocks of its grid one after another (x fastest, then y, then z); a block
// runs one std::thread per CUDA thread, all at once. __syncthreads() is a barrier of the block; a thread that
// returns from the kernel drops out of it (and out of its warp's), as an exited CUDA thread no longer counts at
// a barrier. Warps are lanes 32w..32w+31 of the linear thread index, as on the GPU; a warp shuffle is exact:
// every lane writes its value to the warp's exchange buffer, a warp barrier, every lane reads its source lane
// (same source-lane and out-of-segment rules as CUDA); consecutive shuffles alternate two buffers. Only
// whole-warp shuffles are emulated, as csrc/ uses: a mask other than the warp's live lanes (a lane named
// that does not exist or has returned, or a partial-warp shuffle) aborts. __shared__ is
// `static`: one copy per kernel (or device function), which the block's threads share; launches are serialised
// by a mutex, so only one block uses it at a time. Kernel arguments are copied once per launch, as CUDA copies
// them. Launch configurations beyond CUDA's limits (block > 1024 threads, grid.y or grid.z > 65535) throw, as
// the launch check would on the GPU. The intrinsics are correctly rounded CPU functions (exp and log computed
// in double, then rounded); half and bfloat16 convert through c10's types, round to nearest even, as the CUDA
// build does.
//
// What it cannot see:
// - timing, occupancy, coalescing, shared-memory bank conflicts, register limits and spills, __launch_bounds__
//   (ignored here: a block larger than the bound would fail to launch on the GPU) and the 48 KiB limit on
//   static shared memory;
// - races that need the GPU's concurrency or its weak memory ordering: the threads here do run concurrently
//   (a missing __syncthreads in a block reduction was caught in most runs, not all), but the barriers order
//   memory sequentially and x86 orders stores strongly, so a missing fence or a rarely lost race may pass;
// - the exact ulp errors of the fast-math intrinsics and of nvcc's --use_fast_math division, square root and
//   FMA contraction: results here are correctly rounded, so agreement within a tolerance says the algorithm
//   is right, not that the GPU's rounding is;
// - reads of uninitialised shared memory (they see the previous block's values here, garbage on the GPU) and
//   out-of-bounds accesses to global memory (use compute-sanitizer on a GPU). The build (fastkd/cuda/standin.py)
//   does stop on misaligned vector loads and stores and on indices outside fixed-size arrays (UBSan);
// - the other intrinsics: only what csrc/ uses is here. Atomics: `atomicOr` on an unsigned word (shared or global
//   memory alike), a sequentially consistent std::atomic_ref fetch_or: the GPU's is relaxed, which the kernels
//   may rely on only up to a __syncthreads() (a barrier here orders everything).
//
// Dynamic shared memory (FASTKD_DYNAMIC_SHARED in csrc/device.cuh) is a buffer of the launch's size per block, filled
// with 0xff bytes (NaN in every float format) so that a read of a byte the kernel never wrote shows; the kernel reads
// its size with `dynamic_shared_bytes()`. As on the GPU, a launch may ask for more than 48 KiB only after
// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) raised the kernel's limit, and never
// for more than the device's opt-in limit (an H100's 227 KiB here); a kernel's static __shared__ counts as 0 bytes.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
// The vector types of 16- and 8-byte loads and stores, with CUDA's alignment.
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
using cudaStream_t = struct CUstream_st*;

// CUDA's isnan is a global function.
using std::isnan;

// The built-in variables, per thread.
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace fastkd_standin {

[[noreturn]] inline void fail(const char* what, unsigned a, unsigned b) {
  std::fprintf(stderr, "fastkd CUDA stand-in: %s (%#x, %#x) at block (%u, %u, %u), thread (%u, %u, %u)\n", what,
               a, b, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
  std::abort();  // as a device-side assert: the kernel cannot go on, and its barriers would hang
}

struct Warp {
  explicit Warp(int lanes) : sync(lanes), alive(lanes == 32 ? ~0u : (1u << lanes) - 1) {}
  std::barrier<> sync;
  std::atomic<unsigned> alive;  // lanes that exist and have not returned
  uint64_t slot[2][32];         // shuffles alternate between the two (see shuffle)
};

struct Block {
  explicit Block(unsigned threads) : sync(threads) {
    for (unsigned first = 0; first < threads; first += 32) {
      warps.push_back(std::make_unique<Warp>(static_cast<int>(std::min(32u, threads - first))));
    }
  }
  std::barrier<> sync;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local Block* this_block = nullptr;
inline thread_local unsigned char* dynamic_shared = nullptr;  // the block's dynamic shared memory
inline thread_local unsigned dynamic_shared_size = 0;         // its size in bytes
inline thread_local unsigned this_thread = 0;  // the linear thread index in the block
inline thread_local unsigned shuffles = 0;     // how many this thread has done

inline void syncthreads() { this_block->sync.arrive_and_wait(); }

// Every lane of the warp gives `value` and gets the value of lane `src`. Consecutive shuffles use the two
// halves of the buffer in turn: a lane writes a half again two shuffles later, after a barrier that every
// lane reaches only once it has read, so one barrier per shuffle suffices.
template <typename T>
T shuffle(unsigned mask, T value, unsigned src) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(uint64_t), "a 4- or 8-byte shuffle");
  Warp& warp = *this_block->warps[this_thread / 32];
  const unsigned alive = warp.alive.load();
  if (mask != alive) fail("shuffle mask is not the warp's live lanes", mask, alive);
  uint64_t* slot = warp.slot[shuffles++ % 2];
  std::memcpy(&slot[this_thread % 32], &value, sizeof(T));
  warp.sync.arrive_and_wait();
  T out;
  std::memcpy(&out, &slot[src], sizeof(T));
  return out;
}

// A lane may read within its own segment of `width` lanes or an earlier one; a later one gives its own value.
template <typename T>
T shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  const unsigned lane = this_thread % 32;
  unsigned src = lane ^ static_cast<unsigned>(lane_mask);
  if (src >= (lane / width + 1) * width) src = lane;
  return shuffle(mask, value, src);
}

// Lane l reads lane l + delta of its segment; the top `delta` lanes of a segment keep their own value.
template <typename T>
T shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  const unsigned lane = this_thread % 32;
  const unsigned src = lane % width + delta < static_cast<unsigned>(width) ? lane + delta : lane;
  return shuffle(mask, value, src);
}

inline float expf_rn(float x) { return static_cast<float>(std::exp(static_cast<double>(x))); }
inline float logf_rn(float x) { return static_cast<float>(std::log(static_cast<double>(x))); }
inline float sqrtf_rn(float x) { return std::sqrt(x); }
inline float rcpf_rn(float x) { return 1.0f / x; }
inline float fdiv_rn(float a, float b) { return a / b; }
inline float fmul_rn(float a, float b) { return a * b; }
inline float fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float fadd_rn(float a, float b) { return a + b; }
inline float log2f_approx(float x) { return std::log2(x); }  // libm's log2f, not the GPU's lg2.approx
inline float int_as_float(int v) { return std::bit_cast<float>(v); }
inline float int_as_float(unsigned v) { return std::bit_cast<float>(v); }
inline int float_as_int(float v) { return std::bit_cast<int>(v); }
template <typename T>
inline void stwb(T* p, T v) { *p = v; }

inline std::mutex launch_mutex;

// An H100's (and H200's) opt-in limit of shared memory per block: 227 KiB.
inline constexpr size_t kSharedPerBlockOptin = 232448;
inline constexpr size_t kSharedPerBlockDefault = 48 * 1024;

// The dynamic shared memory each kernel may take (cudaFuncSetAttribute), where raised above the default.
inline std::mutex attribute_mutex;
inline std::vector<std::pair<const void*, size_t>> dynamic_shared_limits;

inline size_t dynamic_shared_limit(const void* kernel) {
  const std::lock_guard<std::mutex> lock(attribute_mutex);
  for (const auto& [k, bytes] : dynamic_shared_limits) {
    if (k == kernel) return bytes;
  }
  return kSharedPerBlockDefault;
}

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;

  template <typename... A>
  void operator()(A&&... args) const {
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    const std::lock_guard<std::mutex> lock(launch_mutex);
    const unsigned threads = block.x * block.y * block.z;
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          Block b(threads);
          // 16-byte aligned, as the GPU's; 0xff bytes: a read of a byte never written is NaN.
          std::unique_ptr<uint4[]> shared(new uint4[(smem + 15) / 16]);
          std::memset(shared.get(), 0xff, (smem + 15) / 16 * 16);
          std::vector<std::thread> pool;
          pool.reserve(threads);
          for (unsigned t = 0; t < threads; ++t) {
            pool.emplace_back([&, t] {
              threadIdx = dim3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
              blockIdx = dim3(bx, by, bz);
              blockDim = block;
              gridDim = grid;
              this_block = &b;
              this_thread = t;
              dynamic_shared = smem != 0 ? reinterpret_cast<unsigned char*>(shared.get()) : nullptr;
              dynamic_shared_size = static_cast<unsigned>(smem);
              std::apply(kernel, params);
              // Returned: no longer awaited at the block's or the warp's barriers, nor a shuffle source.
              Warp& warp = *b.warps[t / 32];
              warp.alive.fetch_and(~(1u << (t % 32)));
              warp.sync.arrive_and_drop();
              b.sync.arrive_and_drop();
            });
          }
          for (std::thread& th : pool) th.join();
        }
  }
};

// `FASTKD_LAUNCH(grid, block, smem, stream, kernel)(args...)`: checks the configuration as the GPU would.
template <typename... P>
Launch<P...> bind(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  TORCH_CHECK(threads >= 1 && threads <= 1024 && block.x <= 1024 && block.y <= 1024 && block.z <= 64,
              "CUDA stand-in: invalid block (", block.x, ", ", block.y, ", ", block.z, ")");
  TORCH_CHECK(grid.x >= 1 && grid.x <= 2147483647u && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 &&
                  grid.z <= 65535,
              "CUDA stand-in: invalid grid (", grid.x, ", ", grid.y, ", ", grid.z, ")");
  const size_t limit = dynamic_shared_limit(reinterpret_cast<const void*>(kernel));
  TORCH_CHECK(smem <= limit, "CUDA stand-in: ", smem, " bytes of dynamic shared memory asked for, the kernel's ",
              "limit is ", limit, " (raise it with cudaFuncSetAttribute)");
  return Launch<P...>{kernel, grid, block, smem};
}

}  // namespace fastkd_standin

// The runtime functions csrc/ calls: one device; every call succeeds (a bad argument throws).
using cudaError_t = int;
inline constexpr cudaError_t cudaSuccess = 0;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaFuncAttributes {
  size_t sharedSizeBytes;  // static __shared__: not counted here (0)
};
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, const void*) {
  attributes->sharedSizeBytes = 0;
  return cudaSuccess;
}
inline cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attribute, int value) {
  TORCH_CHECK(attribute == cudaFuncAttributeMaxDynamicSharedMemorySize, "CUDA stand-in: unsupported attribute");
  TORCH_CHECK(value >= 0 && static_cast<size_t>(value) <= fastkd_standin::kSharedPerBlockOptin,
              "CUDA stand-in: a dynamic shared memory limit of ", value, " bytes is beyond the device's ",
              fastkd_standin::kSharedPerBlockOptin);
  const std::lock_guard<std::mutex> lock(fastkd_standin::attribute_mutex);
  for (auto& [k, bytes] : fastkd_standin::dynamic_shared_limits) {
    if (k == kernel) {
      bytes = static_cast<size_t>(value);
      return cudaSuccess;
    }
  }
  fastkd_standin::dynamic_shared_limits.emplace_back(kernel, static_cast<size_t>(value));
  return cudaSuccess;
}
#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, "CUDA stand-in: ", #expr, " failed")

// The host side of the CUDA ATen and c10 headers that csrc/ uses: one device, one stream, no errors to check
// after a launch (a bad configuration has thrown already).
namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
namespace at::cuda {
using c10::cuda::CUDAGuard;
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
struct DeviceProperties {
  int multiProcessorCount;
  size_t sharedMemPerBlockOptin;
};
// An H100's 132 SMs and 227 KiB of shared memory per block, so that launchers that size their grids by the SM count
// or their rows by the shared memory take the paths they take there.
inline const DeviceProperties* getCurrentDeviceProperties() {
  static const DeviceProperties properties{132, fastkd_standin::kSharedPerBlockOptin};
  return &properties;
}
}  // namespace at::cuda
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

// CUDA's atomicOr(unsigned*, unsigned): the old value, the word or-ed atomically.
inline unsigned atomicOr(unsigned* address, unsigned value) { return std::atomic_ref<unsigned>(*address).fetch_or(value); }

// Qualifiers and intrinsics, after every system header (glibc declares some of these names itself).
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __syncthreads ::fastkd_standin::syncthreads
#define __shfl_xor_sync ::fastkd_standin::shfl_xor_sync
#define __shfl_down_sync ::fastkd_standin::shfl_down_sync
#define __expf ::fastkd_standin::expf_rn
#define __logf ::fastkd_standin::logf_rn
#define __fsqrt_rn ::fastkd_standin::sqrtf_rn
#define __frcp_rn ::fastkd_standin::rcpf_rn
#define __fdiv_rn ::fastkd_standin::fdiv_rn
#define __fdividef ::fastkd_standin::fdiv_rn  // the GPU's is ~2 ulp
#define __fmul_rn ::fastkd_standin::fmul_rn
#define __fmaf_rn ::fastkd_standin::fmaf_rn
#define __fadd_rn ::fastkd_standin::fadd_rn
#define __log2f ::fastkd_standin::log2f_approx
#define __int_as_float ::fastkd_standin::int_as_float
#define __float_as_int ::fastkd_standin::float_as_int
#define __stwb ::fastkd_standin::stwb
