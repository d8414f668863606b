// Non-owning views of the routing tensors: a pointer, a shape and strides, nothing more.
//
// matrix_view<T>   [rows, cols] with a row stride and a column stride (elements), used for
//                  probabilities, scores, logits and their gradients. Builds from raw
//                  pointers and, without a copy, from any Eigen expression with direct access
//                  (Matrix, Map, Ref, Block) through view(...).
// topk_view        [T, k] selected experts, int32 or int64; a negative entry is a dropped slot.
// mask_view        [T] token mask, uint8/bool/int32/int64; nonzero = valid. Empty = all valid.
// offsets_view     [B + 1] packed-sequence offsets (cu_seqlens), int32 or int64.
//
// Integer views are type-erased (the index type is a run-time tag) so that a loss is a
// template over the floating storage type only; reading an index costs one predictable branch.
#pragma once

#include <cstdint>
#include <type_traits>

#include <Eigen/Core>

#include "config.hpp"
#include "types.hpp"

MOEREG_NAMESPACE_BEGIN

namespace detail {
/// T in a parameter that takes no part in template argument deduction (std::type_identity_t
/// of C++20): the other parameters fix T, this one converts (a matrix_view<float> argument
/// to a matrix_view<const float> parameter).
template <class T>
struct nondeduced {
  using type = T;
};
template <class T>
using nondeduced_t = typename nondeduced<T>::type;

/// Whether an n-dimensional strided view addresses a distinct element for every index
/// (mdspan's is_unique question), by the usual sufficient test: the dimensions of extent > 1,
/// in increasing stride order, each have a stride larger than the span the smaller ones cover.
/// A view with a zero extent has no elements and is unique.
inline bool strides_unique(int n, const index_t* extent, const index_t* stride) {
  index_t ext[4], str[4];
  int m = 0;
  for (int i = 0; i < n; ++i) {
    if (extent[i] == 0) return true;
    if (extent[i] > 1) ext[m] = extent[i], str[m++] = stride[i];
  }
  for (int i = 1; i < m; ++i)  // insertion sort by stride (m <= 4)
    for (int j = i; j > 0 && str[j] < str[j - 1]; --j) {
      const index_t te = ext[j], ts = str[j];
      ext[j] = ext[j - 1], str[j] = str[j - 1], ext[j - 1] = te, str[j - 1] = ts;
    }
  index_t span = 0;  // the largest offset the dimensions so far reach
  for (int i = 0; i < m; ++i) {
    if (str[i] <= span) return false;
    span += str[i] * (ext[i] - 1);
  }
  return true;
}
}  // namespace detail

/// A strided 2-D view. `T` may be const-qualified for inputs.
template <class T>
struct matrix_view {
  T* data = nullptr;       ///< first element, (0, 0)
  index_t rows = 0;        ///< number of rows
  index_t cols = 0;        ///< number of columns
  index_t row_stride = 0;  ///< elements between (i, j) and (i + 1, j)
  index_t col_stride = 1;  ///< elements between (i, j) and (i, j + 1)

  /// An empty view (null data, 0 x 0).
  constexpr matrix_view() = default;
  /// Row-major view; `row_stride < 0` means contiguous rows (row_stride = cols).
  constexpr matrix_view(T* d, index_t r, index_t c, index_t rs = -1, index_t cs = 1)
      : data(d), rows(r), cols(c), row_stride(rs < 0 ? c : rs), col_stride(cs) {}
  /// A mutable view converts to a const one.
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  constexpr matrix_view(const matrix_view<U>& o)  // NOLINT(google-explicit-constructor)
      : data(o.data), rows(o.rows), cols(o.cols), row_stride(o.row_stride), col_stride(o.col_stride) {}

  /// Element (i, j); no bounds check.
  MOEREG_HOST_DEVICE T& operator()(index_t i, index_t j) const { return data[i * row_stride + j * col_stride]; }
  /// Pointer to the first element of row i.
  MOEREG_HOST_DEVICE T* row(index_t i) const { return data + i * row_stride; }
  /// rows * cols.
  constexpr index_t size() const { return rows * cols; }
  /// True when every (i, j) has its own element: no two rows or columns overlap.
  bool is_unique() const {
    const index_t ext[2] = {rows, cols}, str[2] = {row_stride, col_stride};
    return detail::strides_unique(2, ext, str);
  }
  /// True when the elements of a row are adjacent (col_stride == 1).
  constexpr bool contiguous_rows() const { return col_stride == 1; }
};

/// Routing probabilities, scores or logits [T, E].
template <class T>
using routing_view = matrix_view<const T>;

/// Zero-copy view of an Eigen expression with direct access (Matrix, Array, Map, Ref,
/// Block). Row-major and column-major storage both work: the strides are taken from Eigen.
/// The view is const when the expression is read-only.
template <class Derived>
auto view(Eigen::DenseBase<Derived>& m) {
  auto& d = m.derived();
  using S = std::remove_pointer_t<decltype(d.data())>;
  return matrix_view<S>(d.data(), d.rows(), d.cols(), d.rowStride(), d.colStride());
}
/// Read-only overload of view(): a matrix_view of const elements for a const expression.
template <class Derived>
auto view(const Eigen::DenseBase<Derived>& m) {
  const auto& d = m.derived();
  using S = std::remove_pointer_t<decltype(d.data())>;
  return matrix_view<S>(d.data(), d.rows(), d.cols(), d.rowStride(), d.colStride());
}

/// Integer element type of an index view.
enum class index_type : std::uint8_t { i32, i64 };

/// Selected experts [T, k], int32 or int64. Negative = dropped slot.
struct topk_view {
  const void* data = nullptr;         ///< int32 or int64 entries, as `type` says; null = empty view
  index_type type = index_type::i32;  ///< element type of `data`
  index_t rows = 0;                   ///< T, the number of tokens
  index_t k = 0;                      ///< k, the number of slots per token
  index_t row_stride = 0;             ///< elements between the rows of two consecutive tokens

  /// An empty view (no tokens).
  constexpr topk_view() = default;
  /// View of t x kk int32 entries; `rs < 0` means contiguous rows (row stride kk).
  constexpr topk_view(const std::int32_t* d, index_t t, index_t kk, index_t rs = -1)
      : data(d), type(index_type::i32), rows(t), k(kk), row_stride(rs < 0 ? kk : rs) {}
  /// View of t x kk int64 entries; `rs < 0` means contiguous rows (row stride kk).
  constexpr topk_view(const std::int64_t* d, index_t t, index_t kk, index_t rs = -1)
      : data(d), type(index_type::i64), rows(t), k(kk), row_stride(rs < 0 ? kk : rs) {}

  /// The expert of token t in slot s, or a negative number for a dropped slot.
  MOEREG_HOST_DEVICE index_t operator()(index_t t, index_t s) const {
    const index_t o = t * row_stride + s;
    return type == index_type::i32 ? static_cast<index_t>(static_cast<const std::int32_t*>(data)[o])
                                   : static_cast<index_t>(static_cast<const std::int64_t*>(data)[o]);
  }
};

/// Element type of a mask.
enum class mask_type : std::uint8_t { u8, boolean, i32, i64 };

/// Token mask [T]: nonzero = real token, zero = padding. A default-constructed mask
/// (null data) means every token is valid.
struct mask_view {
  const void* data = nullptr;      ///< entries of type `type`; null = every token valid
  mask_type type = mask_type::u8;  ///< element type of `data`
  index_t size = 0;                ///< T, the number of tokens
  index_t stride = 1;              ///< elements between two consecutive tokens

  /// The all-valid mask (null data).
  constexpr mask_view() = default;
  /// A mask of n tokens (nonzero = valid) read every `st` elements from d.
  ///@{
  constexpr mask_view(const std::uint8_t* d, index_t n, index_t st = 1)
      : data(d), type(mask_type::u8), size(n), stride(st) {}
  constexpr mask_view(const bool* d, index_t n, index_t st = 1)
      : data(d), type(mask_type::boolean), size(n), stride(st) {}
  constexpr mask_view(const std::int32_t* d, index_t n, index_t st = 1)
      : data(d), type(mask_type::i32), size(n), stride(st) {}
  constexpr mask_view(const std::int64_t* d, index_t n, index_t st = 1)
      : data(d), type(mask_type::i64), size(n), stride(st) {}
  ///@}

  /// True for the default (null) mask: every token is valid.
  constexpr bool all_valid() const { return data == nullptr; }

  /// 1 for a valid token, 0 for padding.
  MOEREG_HOST_DEVICE bool operator()(index_t t) const {
    if (data == nullptr) return true;
    const index_t o = t * stride;
    switch (type) {
      case mask_type::u8:
        return static_cast<const std::uint8_t*>(data)[o] != 0;
      case mask_type::boolean:
        return static_cast<const bool*>(data)[o];
      case mask_type::i32:
        return static_cast<const std::int32_t*>(data)[o] != 0;
      default:
        return static_cast<const std::int64_t*>(data)[o] != 0;
    }
  }
};

/// Packed-sequence offsets (cu_seqlens) [B + 1], int32 or int64: sequence b holds rows
/// [offsets[b], offsets[b + 1]).
struct offsets_view {
  const void* data = nullptr;         ///< int32 or int64 entries, as `type` says; null = no offsets
  index_type type = index_type::i32;  ///< element type of `data`
  index_t size = 0;                   ///< B + 1

  /// An empty view (no packed sequences).
  constexpr offsets_view() = default;
  /// A view of n = B + 1 offsets.
  ///@{
  constexpr offsets_view(const std::int32_t* d, index_t n) : data(d), type(index_type::i32), size(n) {}
  constexpr offsets_view(const std::int64_t* d, index_t n) : data(d), type(index_type::i64), size(n) {}
  ///@}

  /// True when no offsets were given.
  constexpr bool empty() const { return data == nullptr; }
  /// Offset i, 0 <= i <= B; no bounds check.
  MOEREG_HOST_DEVICE index_t operator[](index_t i) const {
    return type == index_type::i32 ? static_cast<index_t>(static_cast<const std::int32_t*>(data)[i])
                                   : static_cast<index_t>(static_cast<const std::int64_t*>(data)[i]);
  }
};

/// Reduced statistics handed to a loss (LOSSES.md section 9). Empty = use this call's own.
struct stats_view {
  const double* data = nullptr;  ///< the summed statistics; null = none given
  index_t size = 0;              ///< number of doubles; must equal the loss's stats_size(inputs)
  /// True when no statistics were given.
  constexpr bool empty() const { return data == nullptr; }
};

/// Selects the CPU backend. `threads` = 0 uses OpenMP's default (OMP_NUM_THREADS), 1 runs
/// serially; without OpenMP every call is serial. Only the name and its options live here: the
/// engines are in <moereg/backend/cpu.hpp>.
struct cpu {
  int threads = 0;  ///< 0 = OpenMP default, 1 = serial, n > 1 = n OpenMP threads
};

namespace detail {

/// The forms that hand back host memory (the vector-returning local_stats, stats_bundle) are
/// CPU-only: a CUDA backend would have its kernels write to a host buffer, which under graph
/// capture is also freed before the graph runs. On CUDA, local_stats(in, double* out, be)
/// with a device buffer is the form to use.
template <class Backend>
inline constexpr bool is_cpu_backend_v = std::is_same<Backend, cpu>::value;
#define MOEREG_HOST_STATS_MESSAGE                                                                 \
  "moereg: this form returns host memory and runs on the CPU backend only; with another backend " \
  "pass a buffer on that backend's device to local_stats(in, double* out, be)"

}  // namespace detail

/// How a gradient is written: scaled by grad_scale (the upstream derivative of the total
/// loss with respect to this loss), and either overwriting or added to the caller's buffer.
struct grad_options {
  double grad_scale = 1.0;  ///< g, multiplies every gradient entry (default 1)
  bool accumulate = false;  ///< false: overwrite the buffer (zeros where the loss has no gradient); true: add into it
};

/// What a loss call needs besides its data, by name rather than by position: the backend, the
/// reduced statistics (LOSSES.md section 9; empty = this call's own) and the gradient options.
/// Every loss's value / backward / value_and_grad take one in place of their trailing
/// arguments:
///
///   lb.value_and_grad(in, grad, moereg::on(be).with_reduced(red).accumulating());
///   lb.value(in, moereg::on(moereg::cpu{2}));
///   lb.value_and_grad(in, grad, moereg::on(cuda_be).value_into(d_value));  // device output
///
/// The positional forms (opts, reduced, be) stay; both give the same call.
template <class Backend>
struct call_context {
  Backend backend{};     ///< cpu{...}, or the CUDA backend with its stream and buffers
  stats_view reduced{};  ///< reduced statistics; empty = this call's own
  grad_options opts{};   ///< grad_scale and overwrite / accumulate (ignored by value())
  /// Where the value is written, besides being returned: host memory on the CPU; device
  /// memory on CUDA, in place of the backend's own value pointer (the call then returns NaN,
  /// the value being on the device). Null: the backend's default.
  double* value_out = nullptr;

  /// This context with reduced statistics `r`.
  call_context with_reduced(stats_view r) const {
    call_context c = *this;
    c.reduced = r;
    return c;
  }
  /// This context with gradient options `o`.
  call_context with_opts(grad_options o) const {
    call_context c = *this;
    c.opts = o;
    return c;
  }
  /// This context with the gradient multiplied by `s`.
  call_context with_grad_scale(double s) const {
    call_context c = *this;
    c.opts.grad_scale = s;
    return c;
  }
  /// This context writing the value to `out` (host memory on the CPU, device memory on CUDA).
  call_context value_into(double* out) const {
    call_context c = *this;
    c.value_out = out;
    return c;
  }
  /// This context adding into the gradient buffer instead of overwriting it.
  call_context accumulating() const {
    call_context c = *this;
    c.opts.accumulate = true;
    return c;
  }
};

/// A call context on backend `be` (local statistics, default gradient options).
template <class Backend>
call_context<Backend> on(const Backend& be) {
  return call_context<Backend>{be, stats_view{}, grad_options{}, nullptr};
}

MOEREG_NAMESPACE_END
