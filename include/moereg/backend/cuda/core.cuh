// The CUDA executor's common parts: the backend value, caller-owned workspace, the device
// status word, 16-bit loads and stores, deterministic reductions, host-side checks.
//
// Include <moereg/backend/cuda.hpp>, not this file. Compiled only by nvcc.
//
// Contract of every CUDA entry point (the same for every loss):
//   * A backend value `moereg::cuda{stream, workspace, workspace_bytes, value, status}`
//     selects the backend. Every view (inputs, gradients, masks, top-k, offsets, reduced
//     statistics, the statistics output) points to memory the device can read or write.
//   * Nothing is allocated and nothing synchronises: kernels are enqueued on `stream` and the
//     call returns. The whole call can therefore be captured in a CUDA graph.
//   * Workspace is the caller's, as in CUB: workspace_size(loss, inputs, backend) returns the
//     bytes a call needs (0 when none); the call carves it into sub-buffers aligned to 256
//     bytes (any base address works: the size includes the slack). A call with less
//     workspace than it needs throws moereg::error before launching anything.
//   * The loss value is written (not added) as a double to `*value` in device memory when
//     `value` is not null. The double the member functions return is then meaningless: it is
//     always a quiet NaN; read `*value` after the stream has reached it.
//   * Shapes are validated on the host before any launch (moereg::error, nothing written).
//     Contents (top-k indices, offsets, reduced statistics, layout maps) live on the device
//     and are validated there: an out-of-range or repeated index, inconsistent offsets or a
//     negative / non-finite reduced statistic sets bits of cuda_status in `*status`
//     (OR-ed in, so one status word can collect a whole step; clear it with
//     cuda_clear_status), makes the value NaN and writes NaN into the gradient entries the
//     bad index would have influenced. Kernels never read or write through an invalid index.
//   * Deterministic: no floating-point atomics. Each block reduces its rows in a fixed order
//     and writes a partial; a final pass combines the partials in a fixed order. The number
//     of blocks depends only on the problem size, so the same inputs give bitwise the same
//     value and gradient on every run (for a given build and GPU architecture).
//   * Storage types float, double, moereg::half and moereg::bfloat16 (Eigen's 16-bit types,
//     which have the memory layout of __half and __nv_bfloat16; device loads convert through
//     the raw bits). Arithmetic in float, or double for double.
#pragma once

#if !defined(__CUDACC__)
#error "moereg's CUDA backend must be compiled by nvcc: include <moereg/backend/cuda.hpp> from a .cu file"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "internal.cuh"  // refuses direct inclusion; core/config.hpp
#include "../../core/error.hpp"
#include "../../core/layouts.hpp"
#include "../../core/types.hpp"
#include "../../core/validate.hpp"
#include "../../core/views.hpp"
#include "../../math/reduce.hpp"
#include "../../math/router.hpp"

MOEREG_NAMESPACE_BEGIN

/// Selects the CUDA backend. All pointers are device pointers.
struct cuda {
  cudaStream_t stream = nullptr;    ///< stream every kernel of the call is enqueued on
  void* workspace = nullptr;        ///< caller-owned temporary storage (see workspace_size)
  std::size_t workspace_bytes = 0;  ///< its size in bytes
  double* value = nullptr;          ///< device: receives the loss value; null = not wanted
  int* status = nullptr;            ///< device, optional: cuda_status bits are OR-ed in
};

/// Bits of the device status word. A status of 0 (cuda_ok) means every device-side check
/// passed.
enum cuda_status : int {
  cuda_ok = 0,
  cuda_topk_out_of_range = 1 << 0,    ///< a top-k index >= E
  cuda_topk_repeated = 1 << 1,        ///< a top-k row selects one expert twice
  cuda_bad_stats = 1 << 2,            ///< a reduced statistic is negative, NaN or infinite
  cuda_bad_offsets = 1 << 3,          ///< cu_seqlens does not start at 0, decrease, or end at T
  cuda_layout_out_of_range = 1 << 4,  ///< an activation layout map points outside its buffer
  cuda_layout_repeated = 1 << 5,      ///< two valid slots share one activation vector
};

/// A readable list of the bits set in a status word, e.g. "topk index out of range".
inline std::string cuda_status_string(int status) {
  if (status == cuda_ok) return "ok";
  std::string s;
  auto add = [&](int bit, const char* text) {
    if (status & bit) s += (s.empty() ? "" : "; ") + std::string(text);
  };
  add(cuda_topk_out_of_range, "topk index out of range");
  add(cuda_topk_repeated, "topk row selects an expert twice");
  add(cuda_bad_stats, "reduced statistics negative or not finite");
  add(cuda_bad_offsets, "cu_seqlens inconsistent");
  add(cuda_layout_out_of_range, "activation layout map out of range");
  add(cuda_layout_repeated, "activation layout map repeats a vector");
  const int known = (1 << 6) - 1;
  if (status & ~known) s += (s.empty() ? "" : "; ") + std::string("unknown bits");
  return s;
}

/// Enqueues `*status = 0` on the backend's stream (no synchronisation; capturable).
inline void cuda_clear_status(const cuda& be) {
  if (be.status == nullptr) return;
  const cudaError_t e = cudaMemsetAsync(be.status, 0, sizeof(int), be.stream);
  if (e != cudaSuccess)
    throw backend_error(detail::concat("cuda_clear_status: cudaMemsetAsync failed: ", cudaGetErrorString(e)));
}

/// Copies the status word to the host and waits for the stream: an explicit
/// synchronisation, the caller's choice. Returns cuda_ok when the backend has no status.
inline int cuda_read_status(const cuda& be) {
  if (be.status == nullptr) return cuda_ok;
  int h = 0;
  cudaError_t e = cudaMemcpyAsync(&h, be.status, sizeof(int), cudaMemcpyDeviceToHost, be.stream);
  if (e == cudaSuccess) e = cudaStreamSynchronize(be.stream);
  if (e != cudaSuccess) throw backend_error(detail::concat("cuda_read_status: ", cudaGetErrorString(e)));
  return h;
}

/// Copies the value word to the host and waits for the stream (explicit synchronisation).
inline double cuda_read_value(const cuda& be) {
  detail::require(be.value != nullptr, "cuda_read_value: the backend has no value pointer");
  double h = 0;
  cudaError_t e = cudaMemcpyAsync(&h, be.value, sizeof(double), cudaMemcpyDeviceToHost, be.stream);
  if (e == cudaSuccess) e = cudaStreamSynchronize(be.stream);
  if (e != cudaSuccess) throw backend_error(detail::concat("cuda_read_value: ", cudaGetErrorString(e)));
  return h;
}

namespace detail {

static_assert(sizeof(half) == sizeof(__half) && alignof(half) == alignof(__half),
              "moereg::half must have the layout of __half");
static_assert(sizeof(bfloat16) == sizeof(__nv_bfloat16) && alignof(bfloat16) == alignof(__nv_bfloat16),
              "moereg::bfloat16 must have the layout of __nv_bfloat16");

// ---------------------------------------------------------------------------------------
// Tuning. Plain constants, like CUB's policies. The rows per block are part of the
// numerical contract (they fix the order of the sums), the thread counts are not visible
// in results except through that order.
// ---------------------------------------------------------------------------------------
struct cuda_tuning {
  static constexpr int threads = 256;             ///< threads of every block
  static constexpr int warps = threads / 32;      ///< warps of a block
  static constexpr index_t rows_per_block = 256;  ///< rows of a column-sum block
  static constexpr index_t rows_per_warp = 8;     ///< rows one warp handles in a row-wise block
};

/// Rows of one row-wise block (a warp per row): warps * rows_per_warp.
inline constexpr index_t cuda_row_block = cuda_tuning::warps * cuda_tuning::rows_per_warp;

inline constexpr std::size_t cuda_alignment = 256;

__host__ __device__ inline index_t cuda_blocks(index_t n, index_t per_block) {
  return n <= 0 ? 0 : (n + per_block - 1) / per_block;
}

// ---------------------------------------------------------------------------------------
// Workspace: one function computes the layout for the size query and for the real call.
// ---------------------------------------------------------------------------------------
class workspace_carver {
 public:
  /// `base` null: size query only.
  explicit workspace_carver(void* base) : base_(static_cast<char*>(base)) {
    if (base_ != nullptr) {
      const auto a = reinterpret_cast<std::uintptr_t>(base_);
      start_ = base_ + (cuda_alignment - a % cuda_alignment) % cuda_alignment;
    }
  }
  /// The next sub-buffer of n elements of U, 256-byte aligned (null in a size query, or for n = 0).
  template <class U>
  U* take(index_t n) {
    used_ = (used_ + cuda_alignment - 1) / cuda_alignment * cuda_alignment;
    U* p = (start_ != nullptr && n > 0) ? reinterpret_cast<U*>(start_ + used_) : nullptr;
    used_ += static_cast<std::size_t>(n > 0 ? n : 0) * sizeof(U);
    return p;
  }
  /// Bytes a caller must provide for everything taken so far (with slack for an unaligned base).
  std::size_t required() const { return used_ == 0 ? 0 : used_ + cuda_alignment - 1; }

 private:
  char* base_ = nullptr;
  char* start_ = nullptr;
  std::size_t used_ = 0;
};

// ---------------------------------------------------------------------------------------
// Host-side checks and launch helpers.
// ---------------------------------------------------------------------------------------

inline void cuda_require(cudaError_t e, const char* who, const char* what) {
  if (e != cudaSuccess) throw backend_error(concat(who, ": ", what, " failed: ", cudaGetErrorString(e)));
}

/// Checks that the launch just enqueued was accepted (no synchronisation).
inline void cuda_check_launch(const char* who, const char* kernel) {
  cuda_require(cudaGetLastError(), who, kernel);
}

inline void cuda_check_workspace(const char* who, const cuda& be, std::size_t needed) {
  require(needed == 0 || (be.workspace != nullptr && be.workspace_bytes >= needed), who, ": workspace is ",
          be.workspace == nullptr ? std::size_t(0) : be.workspace_bytes, " bytes but this call needs ", needed,
          " (query it with moereg::workspace_size)");
}

/// Refuses host memory where the device needs its own (a likely mistake with an API that
/// also takes host buffers on the CPU backend), when that can be told without side effects:
/// not while the stream is being captured, and not on systems where the GPU reads pageable
/// host memory. A null pointer passes (the shape checks decide whether null is allowed).
inline void cuda_check_pointer(const char* who, const char* name, const void* p, const cuda& be) {
  if (p == nullptr) return;
  cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(be.stream, &cap) != cudaSuccess || cap != cudaStreamCaptureStatusNone) {
    (void)cudaGetLastError();
    return;
  }
  int dev = 0, pageable = 0;
  if (cudaGetDevice(&dev) == cudaSuccess &&
      cudaDeviceGetAttribute(&pageable, cudaDevAttrPageableMemoryAccess, dev) == cudaSuccess && pageable != 0)
    return;
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    (void)cudaGetLastError();
    return;
  }
  const bool device_ok = attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged ||
                         (attr.type == cudaMemoryTypeHost && attr.devicePointer != nullptr);
  require(device_ok, who, ": ", name,
          " points to host memory; the CUDA backend needs device (or managed or mapped) memory");
}

/// The host checks of one CUDA call, which read no device memory: the loss's validate_shapes()
/// (core/validate.hpp, the checks every backend runs), then a device-pointer check of every
/// buffer its for_each_buffer() names and of the reduced statistics. The contents (top-k ids,
/// offsets, statistics, layout maps) are checked by the kernels.
template <class Loss, class In, class G>
void cuda_validate(const char* who, const Loss& loss, const In& in, stats_view reduced, const G* grad, const cuda& be) {
  validate_shapes(who, loss, in, reduced, grad);
  for_each_buffer(in, grad, [&](const char* name, const void* p) { cuda_check_pointer(who, name, p, be); });
  cuda_check_pointer(who, "reduced statistics", reduced.data, be);
}

/// Check of a statistics output buffer of `size` entries: not null when entries are due, and
/// a device pointer.
inline void cuda_check_stats_out(const char* who, const double* out, index_t size, const cuda& be) {
  require(out != nullptr || size == 0, who, ": the statistics output is null but ", size, " entries are due");
  cuda_check_pointer(who, "statistics output", out, be);
}

// ---------------------------------------------------------------------------------------
// Device loads and stores. 16-bit storage is read and written through its raw bits with the
// CUDA conversion intrinsics (round to nearest even, as Eigen does on the host).
// ---------------------------------------------------------------------------------------

template <class T>
__device__ __forceinline__ accumulator_t<T> dload(const T* p) {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<U, half>) {
    return __half2float(__ushort_as_half(*reinterpret_cast<const unsigned short*>(p)));
  } else if constexpr (std::is_same_v<U, bfloat16>) {
    return __bfloat162float(__ushort_as_bfloat16(*reinterpret_cast<const unsigned short*>(p)));
  } else {
    return *p;
  }
}

template <class T>
__device__ __forceinline__ void dstore(T* p, accumulator_t<T> v) {
  if constexpr (std::is_same_v<T, half>) {
    *reinterpret_cast<unsigned short*>(p) = __half_as_ushort(__float2half_rn(v));
  } else if constexpr (std::is_same_v<T, bfloat16>) {
    *reinterpret_cast<unsigned short*>(p) = __bfloat16_as_ushort(__float2bfloat16_rn(v));
  } else {
    *p = v;
  }
}

/// Writes one gradient element: overwrite or accumulate, as the CPU backend's put_grad.
template <class T>
__device__ __forceinline__ void dput_grad(T* p, accumulator_t<T> v, bool accumulate) {
  if (accumulate)
    dstore(p, dload(p) + v);
  else
    dstore(p, v);
}

// ---------------------------------------------------------------------------------------
// Deterministic reductions. Every order below depends only on sizes and constants.
// ---------------------------------------------------------------------------------------

/// Butterfly sum over a warp. Every lane ends with the same bits: at each step lanes i and
/// i ^ m add the same two numbers (addition is commutative).
template <class Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
  for (int m = 16; m >= 1; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

template <class Acc>
__device__ __forceinline__ Acc warp_max(Acc v) {
  for (int m = 16; m >= 1; m >>= 1) v = acc_max(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}

/// Fixed-tree sum of one value per thread of a cuda_tuning::threads block; the result is
/// returned to every thread. `scratch` is shared memory of cuda_tuning::threads elements.
/// Must be called by every thread of the block.
template <class Acc>
__device__ Acc block_sum(Acc v, Acc* scratch) {
  const int tid = static_cast<int>(threadIdx.x);
  scratch[tid] = v;
  __syncthreads();
  for (int s = cuda_tuning::threads / 2; s > 0; s >>= 1) {
    if (tid < s) scratch[tid] = scratch[tid] + scratch[tid + s];
    __syncthreads();
  }
  const Acc r = scratch[0];
  __syncthreads();
  return r;
}

/// Fixed-order sum of v[0], v[stride], ..., v[(n - 1) * stride] by a whole block: thread j
/// sums the terms j, j + threads, ... in order, then block_sum. Every thread gets the result.
template <class Acc>
__device__ Acc block_sum_strided(const Acc* v, index_t n, index_t stride, Acc* scratch) {
  Acc s = Acc(0);
  for (index_t i = threadIdx.x; i < n; i += cuda_tuning::threads) s += v[i * stride];
  return block_sum(s, scratch);
}

/// A block's partials of N running sums, one set per warp: lane 0 of each warp puts its
/// values v[0..N) in `part` (shared memory, [cuda_tuning::warps][N]); after a barrier, thread
/// j < N writes the sum over the warps, in warp order, to out[j]. Called by every thread.
template <int N, class Acc>
__device__ void block_warp_partials(const Acc (&v)[N], Acc (*part)[N], Acc* out) {
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  if (lane == 0)
    for (int j = 0; j < N; ++j) part[warp][j] = v[j];
  __syncthreads();
  if (threadIdx.x < N) {
    const int j = static_cast<int>(threadIdx.x);
    Acc s = part[0][j];
    for (int u = 1; u < cuda_tuning::warps; ++u) s += part[u][j];
    out[j] = s;
  }
}

/// Column sums of a [n, width] row-major array of per-block partials, by one block: the
/// threads form 32 columns x (threads / 32) lanes; lane l sums rows l, l + lanes, ... of its
/// column in order (in Acc), then the lanes are added in lane order. out[j] for j < width.
/// `scratch` is shared memory of cuda_tuning::threads elements. Ends with a barrier.
template <class In, class Acc, class Out>
__device__ void block_column_sums(const In* partials, index_t n, index_t width, Out* out, Acc* scratch) {
  constexpr int lanes = cuda_tuning::threads / 32;
  const int col = static_cast<int>(threadIdx.x) % 32, lane = static_cast<int>(threadIdx.x) / 32;
  for (index_t j0 = 0; j0 < width; j0 += 32) {
    const index_t j = j0 + col;
    Acc s = Acc(0);
    if (j < width)
      for (index_t b = lane; b < n; b += lanes) s += static_cast<Acc>(partials[b * width + j]);
    scratch[threadIdx.x] = s;
    __syncthreads();
    if (lane == 0 && j < width) {
      Acc t = scratch[col];
      for (int l = 1; l < lanes; ++l) t += scratch[l * 32 + col];
      out[j] = static_cast<Out>(t);
    }
    __syncthreads();
  }
}

/// OR of the per-block error words err[0..n) by one block; every thread gets the result.
__device__ inline int block_or(const int* err, index_t n, int* shared_word) {
  if (threadIdx.x == 0) *shared_word = 0;
  __syncthreads();
  int f = 0;
  for (index_t i = threadIdx.x; i < n; i += cuda_tuning::threads) f |= err[i];
  if (f != 0) atomicOr(shared_word, f);
  __syncthreads();
  const int r = *shared_word;
  __syncthreads();
  return r;
}

/// True when x is a valid reduced statistic (a finite, non-negative sum).
__device__ __forceinline__ bool stat_ok(double x) {
  return isfinite(x) && x >= 0.0;
}

/// Checks reduced[0..n) with one block: every entry finite, entries [0, nonneg) also
/// non-negative (counts; column sums of scores may be negative). Returns cuda_bad_stats or 0
/// to every thread.
__device__ inline int block_check_stats(const double* reduced, index_t n, index_t nonneg, int* shared_word) {
  if (threadIdx.x == 0) *shared_word = 0;
  __syncthreads();
  bool bad = false;
  for (index_t i = threadIdx.x; i < n; i += cuda_tuning::threads)
    bad = bad || !isfinite(reduced[i]) || (i < nonneg && reduced[i] < 0.0);
  if (bad) atomicOr(shared_word, static_cast<int>(cuda_bad_stats));
  __syncthreads();
  const int r = *shared_word;
  __syncthreads();
  return r;
}

/// Checks the top-k row of token t: flags (cuda_status bits) for an index >= E or an index
/// repeated in an earlier slot of the row. `valid_slot(s)` afterwards tells whether slot s
/// may be used (non-negative, in range, first occurrence).
__device__ inline int topk_slot_flags(const topk_view& I, index_t t, index_t s, index_t E, bool& usable) {
  const index_t e = I(t, s);
  usable = false;
  if (e < 0) return 0;
  if (e >= E) return cuda_topk_out_of_range;
  for (index_t r = 0; r < s; ++r)
    if (I(t, r) == e) return cuda_topk_repeated;
  usable = true;
  return 0;
}

/// The final word of a call: writes the value (NaN when a check failed) and ORs the flags
/// into the caller's status. Called by one thread.
__device__ inline void publish(double* value, int* status, double v, int flags) {
  if (value != nullptr) *value = flags != 0 ? static_cast<double>(NAN) : v;
  if (status != nullptr && flags != 0) atomicOr(status, flags);
}

}  // namespace detail
MOEREG_NAMESPACE_END
