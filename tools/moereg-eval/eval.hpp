// The loss registry of moereg-eval and what a loss function sees.
//
// Each loss is one function `void eval_NAME(const request&, response&)` in its own file
// loss_NAME.cpp, listed in the table of registry.cpp together with the options and inputs
// it accepts. The driver (driver.cpp) checks the command line against that table, loads the
// inputs, calls the function and writes what it put into the response. Adding a loss is:
// write loss_NAME.cpp, declare eval_NAME below, put it in the table.
//
// Dtypes: a loss runs the float instantiation of the library for float32 inputs and the
// double one for float64 inputs. All floating inputs of one call must share one dtype
// (mixed float32/float64 inputs are refused, never silently converted), and every gradient
// is written in the dtype and shape of its input.
#pragma once

#include <cstdint>
#include <list>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <moereg/core/layouts.hpp>
#include <moereg/core/types.hpp>
#include <moereg/core/views.hpp>

#include "args.hpp"
#include "npy.hpp"

#include <moereg/core/config.hpp>

MOEREG_NAMESPACE_BEGIN
struct load_balancing_loss;
struct z_loss;
struct specialization_loss;
struct coupling_loss;
struct orthogonality_loss;
struct variance_loss;
struct entropy_loss;
struct importance_loss;
MOEREG_NAMESPACE_END

namespace moereg_eval {

/// A loss function's view of one invocation: options, inputs and reduced statistics.
class request {
 public:
  request(const arguments& args, std::map<std::string, npy::array> inputs, std::vector<double> stats_in,
          bool has_stats_in)
      : args_(args), inputs_(std::move(inputs)), stats_in_(std::move(stats_in)), has_stats_in_(has_stats_in) {}

  const std::string& loss() const { return args_.loss; }
  /// "cpu" or "cuda", from --backend.
  const std::string& backend() const { return args_.backend; }
  double grad_scale() const { return args_.grad_scale; }
  /// True when --stats-out was given: the loss must fill response::stats.
  bool want_stats() const { return !args_.stats_out.empty(); }
  /// The reduced statistics of --stats-in, or an empty view (use the local ones).
  moereg::stats_view stats() const {
    if (!has_stats_in_) return {};
    return moereg::stats_view{stats_in_.data(), static_cast<moereg::index_t>(stats_in_.size())};
  }

  // Options (the registry has already refused options that do not apply to this loss).
  double opt_double(const std::string& name, double def) const;
  std::int64_t opt_int(const std::string& name, std::int64_t def) const;
  /// One of `choices` (the first is not special); `def` when the option is absent.
  std::string opt_choice(const std::string& name, const std::vector<std::string>& choices,
                         const std::string& def) const;

  // Inputs. Every accessor checks the number of dimensions and the dtype and names the
  // input in its message; cross-input shape checks are left to the library, whose messages
  // name both arguments.
  bool has(const std::string& name) const { return inputs_.count(name) != 0; }
  const npy::array& input(const std::string& name) const;
  /// The dtype shared by the present floating inputs among `names` (float32 or float64).
  npy::dtype float_dtype(const std::vector<std::string>& names) const;
  /// A 2-D floating input [rows, cols] of dtype T.
  template <class T>
  moereg::routing_view<T> matrix(const std::string& name) const {
    const auto& a = input_ndim(name, 2, "[T, E]");
    return moereg::routing_view<T>(a.values<T>().data(), a.shape()[0], a.shape()[1]);
  }
  /// A 3-D floating input [T, k, d], token-major, of dtype T.
  template <class T>
  moereg::activation_view<const T, moereg::token_major> activations(const std::string& name) const {
    const auto& a = input_ndim(name, 3, "[T, k, d]");
    return {a.values<T>().data(), moereg::token_major(a.shape()[0], a.shape()[1], a.shape()[2])};
  }
  /// A 2-D index input [T, k], int32 or int64.
  moereg::topk_view topk(const std::string& name) const;
  /// The 1-D token mask, or an all-valid view when it was not given.
  moereg::mask_view mask(const std::string& name = "mask") const;
  /// 1-D offsets [B + 1], int32 or int64, or an empty view when not given.
  moereg::offsets_view offsets(const std::string& name) const;
  /// The number L of consecutive inputs prefix0, prefix1, ... (stops at the first gap).
  std::size_t count_numbered(const std::string& prefix) const;
  /// Every input name given, in sorted order.
  std::vector<std::string> input_names() const;

 private:
  const arguments& args_;
  std::map<std::string, npy::array> inputs_;
  std::vector<double> stats_in_;
  bool has_stats_in_;

  const npy::array& input_ndim(const std::string& name, std::size_t ndim, const char* layout) const;
};

/// What a loss function produces. Gradients live in a list so that the pointers handed out
/// by add_grad stay valid while more gradients are added.
struct response {
  double value = 0.0;
  std::list<std::pair<std::string, npy::array>> grads;  ///< input name, gradient (written as grad_NAME.npy)
  std::vector<double> stats;                            ///< local statistics, when request::want_stats()

  /// A zero gradient of the shape and dtype of input `like`, registered as grad_NAME.
  template <class T>
  T* add_grad(const std::string& name, const npy::array& like) {
    grads.emplace_back(name, npy::array::zeros(like.type(), like.shape()));
    return grads.back().second.values<T>().data();
  }
  /// add_grad for a 2-D input, as a matrix view.
  template <class T>
  moereg::matrix_view<T> add_grad_matrix(const std::string& name, const npy::array& like) {
    T* p = add_grad<T>(name, like);
    return moereg::matrix_view<T>(p, like.shape()[0], like.shape()[1]);
  }
};

using eval_fn = void (*)(const request&, response&);

/// One row of the loss table.
struct loss_entry {
  std::string name;
  std::vector<std::string> options;   ///< the loss options it takes (names without --)
  std::vector<std::string> inputs;    ///< input names it takes; "probs#" stands for probs0, probs1, ...
  std::vector<std::string> required;  ///< inputs that must be given
  eval_fn fn;                         ///< nullptr: not implemented in this build
};

/// The table of every loss of LOSSES.md (registry.cpp).
const std::vector<loss_entry>& registry();

/// The row of `name`, or nullptr.
const loss_entry* find_loss(const std::string& name);

/// Runs one invocation; throws moereg::error (or another std::exception) on failure, in
/// which case nothing that looks like a result is left in the output directory.
void run(const arguments& args);

// The loss functions (loss_NAME.cpp).
void eval_load_balancing(const request& rq, response& rs);
void eval_z_loss(const request& rq, response& rs);
void eval_specialization(const request& rq, response& rs);
void eval_coupling(const request& rq, response& rs);
void eval_orthogonality(const request& rq, response& rs);
void eval_variance(const request& rq, response& rs);
void eval_entropy(const request& rq, response& rs);
void eval_importance(const request& rq, response& rs);

// Each loss's options (loss_NAME.cpp), shared by both backends.
moereg::load_balancing_loss load_balancing_options(const request& rq);
moereg::z_loss z_loss_options(const request& rq);
moereg::specialization_loss specialization_options(const request& rq);
moereg::coupling_loss coupling_options(const request& rq);
/// The number of coupled layers L >= 2, after checking that probs0.. and topk0.. match.
std::size_t coupling_layers(const request& rq);
moereg::orthogonality_loss orthogonality_options(const request& rq);
moereg::variance_loss variance_options(const request& rq);
moereg::entropy_loss entropy_options(const request& rq);
moereg::importance_loss importance_options(const request& rq);

/// Runs the request's loss on the CUDA backend (cuda_exec.cu, in builds with
/// MOEREG_ENABLE_CUDA): inputs copied to the first CUDA device, value, gradients and
/// statistics copied back; a nonzero device status (an out-of-range or repeated top-k index,
/// bad reduced statistics) is an error naming the bits. Builds without CUDA refuse.
void eval_cuda(const request& rq, response& rs);

}  // namespace moereg_eval
