// The one C++ layer between PyTorch tensors and moereg's front end.
//
// Everything that knows moereg's API (views, layouts, configs, loss structs) lives in the
// csrc/*.cpp files that include this header; the Python package only calls the functions
// declared at the bottom. When moereg's front end changes, only this directory changes.
//
// Conventions:
//  - Tensors are read in place: a view gets the tensor's own data pointer and strides. A copy
//    is made only where a moereg view cannot express the strides (see strided_* below and
//    python/README.md, "Copies").
//  - Checks that belong to the torch side (device, dtype, number of dimensions) raise
//    TypeError (dtype) or ValueError; moereg::error (a std::invalid_argument) becomes
//    ValueError with moereg's own message. moereg validates before it writes anything.
//  - Gradients are new contiguous tensors of the input's dtype; none is made when the caller
//    needs no gradient.
#pragma once

#include <cstdint>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <torch/extension.h>

#include <moereg/moereg.hpp>

namespace moereg_torch {

using moereg::index_t;

/// A value and its gradient (undefined = None in Python when no gradient was asked for).
using value_grad = std::tuple<at::Tensor, at::Tensor>;

namespace detail {

[[noreturn]] inline void raise_type(const std::string& msg) {
  throw pybind11::type_error(msg);
}
[[noreturn]] inline void raise_value(const std::string& msg) {
  throw pybind11::value_error(msg);
}

/// CUDA (or any non-CPU) tensors: this build runs moereg's CPU backend only.
inline void check_cpu(const at::Tensor& x, const char* who, const char* name) {
  if (x.device().is_cpu()) return;
  const std::string msg = std::string("moereg_torch.") + who + ": " + name + " is on " + x.device().str() +
                          ", but this build of moereg_torch is CPU-only (the extension was built without "
                          "MOEREG_TORCH_CUDA=1; the CUDA binding is not available yet). Move the tensors to the CPU.";
  PyErr_SetString(PyExc_NotImplementedError, msg.c_str());
  throw pybind11::error_already_set();
}

inline void check_dim(const at::Tensor& x, int64_t n, const char* who, const char* name, const char* shape) {
  if (x.dim() != n)
    raise_value(moereg::detail::concat("moereg_torch.", who, ": ", name, " must be ", n, "-D ", shape, " but has ",
                                       x.dim(), " dimensions"));
}

/// A stride as moereg reads it: a dimension of size <= 1 gets `natural` (torch may give it
/// any stride, which means nothing for a single element).
inline index_t stride_of(const at::Tensor& x, int64_t dim, index_t natural) {
  return x.size(dim) <= 1 ? natural : static_cast<index_t>(x.stride(dim));
}

/// Calls f(T{}) with T the moereg storage type of x's dtype.
template <class F>
decltype(auto) dispatch_float(const at::Tensor& x, const char* who, const char* name, F&& f) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return f(float{});
    case at::kDouble:
      return f(double{});
    case at::kBFloat16:
      return f(moereg::bfloat16{});
    case at::kHalf:
      return f(moereg::half{});
    default:
      break;
  }
  raise_type(moereg::detail::concat("moereg_torch.", who, ": ", name, " has dtype ", c10::toString(x.scalar_type()),
                                    "; float32, float64, bfloat16 or float16 is needed"));
}

/// moereg's storage type T over a tensor of the matching dtype (c10::BFloat16 and c10::Half
/// have the same bits as moereg::bfloat16 and moereg::half).
template <class T>
T* data_of(const at::Tensor& x) {
  return reinterpret_cast<T*>(x.data_ptr());
}

/// The dtype of the returned value: float64 for float64 inputs, float32 otherwise.
inline at::Tensor value_tensor(double v, const at::Tensor& like) {
  const auto dt = like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::scalar_tensor(v, at::TensorOptions().dtype(dt));
}

/// A [rows, cols] view of a 2-D floating tensor with its own strides (zero-copy).
template <class T>
moereg::matrix_view<const T> matrix_of(const at::Tensor& x) {
  return moereg::matrix_view<const T>(data_of<const T>(x), x.size(0), x.size(1), stride_of(x, 0, x.size(1)),
                                      stride_of(x, 1, 1));
}
template <class T>
moereg::matrix_view<T> mutable_matrix_of(const at::Tensor& x) {
  return moereg::matrix_view<T>(data_of<T>(x), x.size(0), x.size(1), stride_of(x, 0, x.size(1)), stride_of(x, 1, 1));
}

/// A 2-D floating input: CPU, 2-D, one of the four dtypes (checked by dispatch_float).
inline void check_matrix_input(const at::Tensor& x, const char* who, const char* name) {
  check_cpu(x, who, name);
  check_dim(x, 2, who, name, "[T, E]");
}

/// Keeps the copies made for views alive until the call returns.
struct keep {
  std::vector<at::Tensor> tensors;
  const at::Tensor& hold(at::Tensor t) {
    tensors.push_back(std::move(t));
    return tensors.back();
  }
};

/// An int32/int64 [T, k] index tensor (topk, row_map) as a topk_view. moereg's view has a row
/// stride and unit column stride: a tensor with another column stride (a transposed view), or
/// a row stride below k (an expanded view) is copied.
inline moereg::topk_view index_matrix_of(const at::Tensor& x0, const char* who, const char* name, keep& k) {
  check_cpu(x0, who, name);
  check_dim(x0, 2, who, name, "[T, k]");
  const auto st = x0.scalar_type();
  if (st != at::kInt && st != at::kLong)
    raise_type(moereg::detail::concat("moereg_torch.", who, ": ", name, " has dtype ", c10::toString(st),
                                      "; int32 or int64 is needed"));
  const at::Tensor* x = &x0;
  const index_t cols = x0.size(1);
  const bool unit_cols = x0.size(1) <= 1 || x0.stride(1) == 1;
  const bool rows_ok = x0.size(0) <= 1 || x0.stride(0) >= cols;
  if (!unit_cols || !rows_ok) x = &k.hold(x0.contiguous());
  const index_t rs = stride_of(*x, 0, cols);
  if (st == at::kLong) return moereg::topk_view(data_of<const std::int64_t>(*x), x->size(0), cols, rs);
  return moereg::topk_view(data_of<const std::int32_t>(*x), x->size(0), cols, rs);
}

/// An optional [T] mask (bool, uint8, int32, int64; nonzero = valid), read with its stride.
inline moereg::mask_view mask_of(const c10::optional<at::Tensor>& m, const char* who) {
  if (!m.has_value() || !m->defined()) return {};
  const at::Tensor& x = *m;
  check_cpu(x, who, "mask");
  check_dim(x, 1, who, "mask", "[T]");
  const index_t n = x.size(0), st = stride_of(x, 0, 1);
  switch (x.scalar_type()) {
    case at::kBool:
      return moereg::mask_view(data_of<const bool>(x), n, st);
    case at::kByte:
      return moereg::mask_view(data_of<const std::uint8_t>(x), n, st);
    case at::kInt:
      return moereg::mask_view(data_of<const std::int32_t>(x), n, st);
    case at::kLong:
      return moereg::mask_view(data_of<const std::int64_t>(x), n, st);
    default:
      break;
  }
  raise_type(moereg::detail::concat("moereg_torch.", who, ": mask has dtype ", c10::toString(x.scalar_type()),
                                    "; bool, uint8, int32 or int64 is needed"));
}

/// Optional cu_seqlens [B + 1] (int32/int64); moereg's offsets view has no stride, so a
/// strided tensor is copied (B + 1 entries).
inline moereg::offsets_view offsets_of(const c10::optional<at::Tensor>& o, const char* who, keep& k) {
  if (!o.has_value() || !o->defined()) return {};
  check_cpu(*o, who, "cu_seqlens");
  check_dim(*o, 1, who, "cu_seqlens", "[B + 1]");
  const auto st = o->scalar_type();
  if (st != at::kInt && st != at::kLong)
    raise_type(moereg::detail::concat("moereg_torch.", who, ": cu_seqlens has dtype ", c10::toString(st),
                                      "; int32 or int64 is needed"));
  const at::Tensor& x = o->is_contiguous() ? *o : k.hold(o->contiguous());
  if (st == at::kLong) return moereg::offsets_view(data_of<const std::int64_t>(x), x.size(0));
  return moereg::offsets_view(data_of<const std::int32_t>(x), x.size(0));
}

/// Optional reduced statistics: a float64 CPU vector (copied when strided; it is small).
inline moereg::stats_view stats_of(const c10::optional<at::Tensor>& s, const char* who, keep& k) {
  if (!s.has_value() || !s->defined()) return {};
  check_cpu(*s, who, "stats");
  check_dim(*s, 1, who, "stats", "[n]");
  if (s->scalar_type() != at::kDouble)
    raise_type(moereg::detail::concat("moereg_torch.", who, ": stats has dtype ", c10::toString(s->scalar_type()),
                                      "; float64 is needed"));
  const at::Tensor& x = s->is_contiguous() ? *s : k.hold(s->contiguous());
  return moereg::stats_view{data_of<const double>(x), x.size(0)};
}

/// A new contiguous gradient of x's shape and dtype.
inline at::Tensor grad_like(const at::Tensor& x) {
  return at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
}

/// The CPU backend with torch's intra-op thread count.
inline moereg::cpu backend() {
  return moereg::cpu{at::get_num_threads()};
}

/// Runs f() without the GIL; moereg::error becomes ValueError with moereg's message.
template <class F>
decltype(auto) run(F&& f) {
  std::string err;
  using R = decltype(f());
  if constexpr (std::is_void_v<R>) {
    {
      pybind11::gil_scoped_release nogil;
      try {
        f();
      } catch (const moereg::error& e) {
        err = e.what();
      }
    }
    if (!err.empty()) raise_value(err);
  } else {
    R r{};
    {
      pybind11::gil_scoped_release nogil;
      try {
        r = f();
      } catch (const moereg::error& e) {
        err = e.what();
      }
    }
    if (!err.empty()) raise_value(err);
    return r;
  }
}

/// Statistics vector -> float64 tensor.
inline at::Tensor stats_tensor(const std::vector<double>& s) {
  auto t = at::empty({static_cast<int64_t>(s.size())}, at::TensorOptions().dtype(at::kDouble));
  std::copy(s.begin(), s.end(), t.data_ptr<double>());
  return t;
}

}  // namespace detail

// ---- the functions the Python package calls (one per loss; `*_stats` give local_stats) ----

using opt_tensor = c10::optional<at::Tensor>;

value_grad load_balancing(const at::Tensor& probs, const at::Tensor& topk, const opt_tensor& mask,
                          const opt_tensor& cu_seqlens, double coef, int64_t k, int64_t scope, int64_t seq_len,
                          const opt_tensor& stats, bool want_grad);
at::Tensor load_balancing_stats(const at::Tensor& probs, const at::Tensor& topk, const opt_tensor& mask,
                                const opt_tensor& cu_seqlens, int64_t k, int64_t scope, int64_t seq_len);
value_grad z_loss(const at::Tensor& logits, const opt_tensor& mask, double coef, const opt_tensor& stats,
                  bool want_grad);
value_grad entropy(const at::Tensor& probs, const opt_tensor& mask, double coef, const opt_tensor& stats,
                   bool want_grad);
value_grad importance(const at::Tensor& probs, const opt_tensor& mask, double coef, const opt_tensor& stats,
                      bool want_grad);
value_grad variance(const at::Tensor& scores, const opt_tensor& mask, double coef, int64_t axis, int64_t reduction,
                    const opt_tensor& stats, bool want_grad);
value_grad specialization(const at::Tensor& acts, const at::Tensor& topk, const opt_tensor& mask,
                          const opt_tensor& row_map, double coef, double eps, int64_t pairs, const opt_tensor& stats,
                          bool want_grad);
value_grad orthogonality(const at::Tensor& outs, const at::Tensor& topk, const opt_tensor& mask,
                         const opt_tensor& row_map, double coef, double eps, int64_t variant, int64_t reduction,
                         const opt_tensor& stats, bool want_grad);
std::tuple<at::Tensor, std::vector<at::Tensor>> coupling(const std::vector<at::Tensor>& probs,
                                                         const std::vector<at::Tensor>& topk, const opt_tensor& mask,
                                                         double coef, int64_t form, double eps, const opt_tensor& stats,
                                                         bool want_grad);
void bias_update(at::Tensor& bias, const at::Tensor& counts, double rate, bool center);

/// The library's config defaults, for the Python side's test that its defaults agree.
pybind11::dict defaults();

}  // namespace moereg_torch
