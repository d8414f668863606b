// The CPU engine of the row losses: every loss that reads one [T, E] matrix row by row (load
// balancing in the micro and global scopes, z-loss, entropy, importance, variance, and any
// loss a user describes the same way). It knows no loss: a loss describes itself by a row
// kernel (below), and the engine runs any tuple of kernels in one go, so that fusing losses
// (losses/fuse.hpp) is running several kernels in one pass. Include <moereg/backend/cpu.hpp>,
// not this file.
//
// A row kernel is what make_row_kernel(loss, inputs, opts) returns (found by argument-dependent
// lookup; each loss header defines one). Acc is its accumulator type, x a valid row of its
// matrix converted to Acc and contiguous, g the row of the gradient it adds into:
//
//   using storage_type = T; using acc_type = Acc;
//   matrix_view<const T> x;                  the matrix it reads ([T, E], any strides)
//   index_t stats_size;                      its statistics' length (LOSSES.md section 9)
//   mask_view mask;                          its valid rows
//   index_t sum_width, count_width;          pass 1: column statistics of the valid rows,
//                                            Acc sums and integer counts (0, 0: none)
//   bool needs_pass1(bool reduced) const;    whether value or gradient need pass 1
//   void stats_row(index_t t, const Acc* x, Acc* sums, index_t* counts) const;   pass 1
//   bool reads_row;                          whether row() reads x (else x is null)
//   void write_stats(const row_local<Acc>&, double* out) const;   LOSSES.md section 9
//   void prepare(const double* stats, const row_local<Acc>& local);
//                                            constants from the statistics: the reduced ones
//                                            when given, else this call's (write_stats)
//   bool active;                             false: rows add nothing (set by prepare)
//   bool wants_rows(bool grad) const;        whether the row pass is needed
//   template <class Ops> Acc row(index_t t, const Acc* x, Acc* g, Ops& ops) const;
//                                            one valid row: writes its gradient row into g
//                                            through ops.put / ops.put_at, once per element
//                                            (or itself, assigning or adding per
//                                            ops.assigning())
//                                            (null: none wanted), returns its term of the row sum
//   double finish(Acc row_sum) const;        the value
//
// Ops is the engine's row toolkit (cpu_row_ops): aligned scratch rows, the vectorised
// log-sum-exp, log and sum, so a kernel's row is written once and runs on Eigen's packets, and
// put(g, n, v) / put_at(g, e, v), which assign or add v as the engine says: g is the caller's
// gradient row itself when one kernel writes that gradient and it is contiguous in the
// accumulator type (assigned in overwrite mode, added to in accumulate mode: the arithmetic of
// a direct store), otherwise an engine buffer (the first kernel of the row assigns, the later
// ones add, and the engine stores the sum once).
//
// Passes: pass 1 (only when a kernel needs it) reads each distinct matrix once per valid row;
// the row pass reads each distinct matrix once and writes each distinct gradient once, the
// sum of the contributions of every kernel that writes it (the rows of a gradient are zeroed,
// or left as they are with grad_options::accumulate, where no kernel contributes). Blocks of
// cpu_block_rows rows run in parallel; each kernel's row terms are summed in row order inside
// a block and pairwise over the blocks: bitwise the same for any thread count.
#pragma once

#include "internal.hpp"  // refuses direct inclusion; core/config.hpp

#include <array>
#include <cmath>
#include <cstddef>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../core/error.hpp"
#include "../../core/types.hpp"
#include "../../core/validate.hpp"
#include "../../core/views.hpp"
#include "../../losses/api.hpp"
#include "../../losses/common.hpp"
#include "../../losses/fuse.hpp"
#include "../../math/router.hpp"
#include "executor.hpp"

MOEREG_NAMESPACE_BEGIN
namespace detail {

/// width rounded up to whole alignment units of Acc, so that rows of scratch laid end to end
/// are all aligned.
template <class Acc>
constexpr index_t aligned_width(index_t width) {
  constexpr index_t unit = EIGEN_MAX_ALIGN_BYTES / static_cast<index_t>(sizeof(Acc)) > 0
                               ? EIGEN_MAX_ALIGN_BYTES / static_cast<index_t>(sizeof(Acc))
                               : 1;
  return (width + unit - 1) / unit * unit;
}

/// The row toolkit the CPU engine hands to a kernel's row(): `slots` aligned scratch rows of
/// `width` elements, and row math on Eigen's packets.
template <class Acc>
class cpu_row_ops {
 public:
  cpu_row_ops(index_t width, int slots)
      : width_(padded(width)), buf_(static_cast<std::size_t>(padded(width) * slots)) {}
  /// Scratch row i (aligned to EIGEN_MAX_ALIGN_BYTES; width elements).
  Acc* scratch(int i) { return buf_.data() + static_cast<std::size_t>(i) * static_cast<std::size_t>(width_); }

  /// log sum_e exp(z_e) of a contiguous row, vectorised; `buf` (aligned scratch) receives
  /// exp(z - shift) and `sum` their sum, so that softmax(z)_e = buf[e] / sum. The formulas of
  /// math/router.hpp (lse_shift, lse_term, lse_finish), to a few ulp of the exponential; two
  /// exceptions keep the scalar results: terms whose exponential is below the smallest normal
  /// number (Eigen clamps the argument of exp there, so exp(-inf) would not be 0) are
  /// recomputed with lse_term, and a row whose maximum or log-sum-exp is not finite is redone
  /// by the scalar logsumexp_row.
  static Acc logsumexp(const Acc* z, index_t n, Acc* buf, Acc& sum) {
    const row_array<Acc> zr(z, n);
    const auto scalar = [&] { return logsumexp_row<Acc>([z](index_t e) { return z[e]; }, n, buf, sum); };
    const Acc mx = zr.maxCoeff();
    if (!(std::abs(mx) <= std::numeric_limits<Acc>::max())) return scalar();
    const Acc shift = lse_shift(mx);
    scratch_array<Acc> ex(buf, n);
    ex = (zr - shift).exp();
    // log of the smallest normal number: below it Eigen's exp is clamped.
    const Acc normal_floor = std::log(std::numeric_limits<Acc>::min());
    if (zr.minCoeff() - shift < normal_floor)
      for (index_t e = 0; e < n; ++e)
        if (!(z[e] - shift >= normal_floor)) buf[e] = lse_term(z[e], shift);
    const Acc s = ex.sum();
    const Acc lse = lse_finish(shift, s);
    if (!(std::abs(lse) <= std::numeric_limits<Acc>::max())) return scalar();
    sum = s;
    return lse;
  }
  /// Writes a kernel's gradient row: g[e] = v(e) for e in [0, n), or g[e] += v(e) when the
  /// engine says the row already holds a value (an earlier kernel's, or the caller's in
  /// accumulate mode). Two plain loops, which the compiler vectorises.
  template <class F>
  MOEREG_FORCEINLINE void put(Acc* MOEREG_RESTRICT g, index_t n, F&& v) const {
    if (assign_)
      for (index_t e = 0; e < n; ++e) g[e] = v(e);
    else
      for (index_t e = 0; e < n; ++e) g[e] += v(e);
  }
  /// put() of one element, for kernels that form their row element by element.
  MOEREG_FORCEINLINE void put_at(Acc* g, index_t e, Acc v) const {
    if (assign_)
      g[e] = v;
    else
      g[e] += v;
  }
  /// Whether put() assigns (true) or adds, for a kernel that writes its row itself.
  bool assigning() const { return assign_; }
  /// Set by the engine before each kernel's row(): whether put() assigns or adds.
  void set_assign(bool assign) { assign_ = assign; }

  /// out[e] = log(x[e]) on packets (out aligned scratch); accurate for normal numbers.
  static void log(const Acc* x, index_t n, Acc* out) { scratch_array<Acc>(out, n) = row_array<Acc>(x, n).log(); }
  /// sum_e x[e] of aligned scratch, in the packets' fixed order.
  static Acc sum(const Acc* x, index_t n) { return scratch_array<Acc>(const_cast<Acc*>(x), n).sum(); }

 private:
  static index_t padded(index_t width) { return aligned_width<Acc>(width); }
  index_t width_;
  row_scratch<Acc> buf_;
  bool assign_ = true;
};

/// The same matrix for two kernels: one read serves both.
template <class A, class B>
bool same_matrix(const matrix_view<A>& a, const matrix_view<B>& b) {
  return static_cast<const void*>(a.data) == static_cast<const void*>(b.data) && a.rows == b.rows && a.cols == b.cols &&
         a.row_stride == b.row_stride && a.col_stride == b.col_stride;
}

/// Writes row t of a gradient from v (contiguous Acc): overwrite or add, in the storage type.
template <class T, class Acc>
MOEREG_FORCEINLINE void store_grad_row(const matrix_view<T>& g, index_t t, const Acc* MOEREG_RESTRICT v,
                                       bool accumulate) {
  const index_t n = g.cols;
  if (g.contiguous_rows()) {
    T* MOEREG_RESTRICT d = g.row(t);
    if (accumulate)
      for (index_t e = 0; e < n; ++e) store(d[e], load(d[e]) + v[e]);
    else
      for (index_t e = 0; e < n; ++e) store(d[e], v[e]);
  } else {
    for (index_t e = 0; e < n; ++e) put_grad(g(t, e), v[e], accumulate);
  }
}

/// f(integral_constant<I>) for I = 0, ..., N - 1, in order.
template <class F, std::size_t... I>
MOEREG_FORCEINLINE void for_each_index(F&& f, std::index_sequence<I...>) {
  (f(std::integral_constant<std::size_t, I>{}), ...);
}

/// One run of the engine over kernels ks (all on storage type T, all with the same number of
/// rows). grads[i]: kernel i's gradient, storage type GT (null: none wanted). reduced[i]: its reduced
/// statistics (empty: this call's). With stats_out, writes kernel i's local statistics to
/// stats_out[i] (null: not wanted) and nothing else; otherwise values[i] receives kernel i's
/// value. Validation is the caller's.
template <class T, class GT, class... K>
void cpu_row_run(const cpu& be, std::tuple<K...>& ks, const std::array<const matrix_view<GT>*, sizeof...(K)>& grads,
                 const std::array<stats_view, sizeof...(K)>& reduced, grad_options opts, double* const* stats_out,
                 double* values) {
  using Acc = accumulator_t<T>;
  constexpr std::size_t N = sizeof...(K);
  const auto each = [&ks](auto&& f) {
    for_each_index([&](auto i) { f(i, std::get<decltype(i)::value>(ks)); }, std::make_index_sequence<N>{});
  };
  const bool stats_mode = stats_out != nullptr;
  const index_t rows = std::get<0>(ks).x.rows;
  const index_t B = cpu_block_rows, nb = num_blocks(rows, B);

  // The distinct matrices (sources) and gradients (destinations): each is read, or written,
  // once per row for every kernel that shares it.
  std::array<matrix_view<const T>, N> srcs{};
  std::array<matrix_view<GT>, N> dsts{};
  std::array<int, N> src{}, dst{};
  int nsrc = 0, ndst = 0;
  index_t width = 1;
  each([&](auto i, auto& k) {
    int s = 0;
    while (s < nsrc && !same_matrix(srcs[s], k.x)) ++s;
    if (s == nsrc) srcs[nsrc++] = k.x;
    src[i] = s;
    width = std::max(width, k.x.cols);
    dst[i] = -1;
    if (grads[i] == nullptr || stats_mode) return;
    int d = 0;
    while (d < ndst && !same_matrix(dsts[d], *grads[i])) ++d;
    if (d == ndst) dsts[ndst++] = *grads[i];
    dst[i] = d;
  });
  width = aligned_width<Acc>(width);
  const auto converts = [&](int s) { return acc_row_converts(srcs[static_cast<std::size_t>(s)]); };
  bool any_converts = false;
  for (int s = 0; s < nsrc; ++s) any_converts = any_converts || converts(s);
  const std::size_t conv_size = any_converts ? static_cast<std::size_t>(nsrc * width) : 0;

  // Pass 1: each kernel's column statistics of its valid rows, per block, combined in block
  // order; T_v of every kernel from its mask.
  std::array<bool, N> p1{};
  bool any_p1 = false;
  each([&](auto i, auto& k) {
    p1[i] = stats_mode ? k.sum_width + k.count_width > 0 : k.needs_pass1(!reduced[i].empty());
    any_p1 = any_p1 || p1[i];
  });
  std::array<std::vector<Acc>, N> sums;
  std::array<std::vector<index_t>, N> counts;
  std::array<row_local<Acc>, N> local{};
  if (any_p1) {
    each([&](auto i, auto& k) {
      if (!p1[i]) return;
      sums[i].assign(static_cast<std::size_t>(nb * k.sum_width), Acc(0));
      counts[i].assign(static_cast<std::size_t>(nb * k.count_width), 0);
    });
    parallel_blocks(be, rows, B, [&](index_t b, index_t r0, index_t r1) {
      row_scratch<Acc> conv(conv_size);
      std::array<const Acc*, N> xs{};
      for (index_t t = r0; t < r1; ++t) {
        xs.fill(nullptr);
        each([&](auto i, auto& k) {
          if (!p1[i] || !k.mask(t)) return;
          const auto s = static_cast<std::size_t>(src[i]);
          if (xs[s] == nullptr) xs[s] = acc_row(srcs[s], t, conv.data() + s * static_cast<std::size_t>(width));
          k.stats_row(t, xs[s], sums[i].data() + b * k.sum_width, counts[i].data() + b * k.count_width);
        });
      }
    });
    each([&](auto i, auto& k) {
      if (!p1[i]) return;
      std::vector<Acc> s(static_cast<std::size_t>(k.sum_width));
      combine_blocks(sums[i], nb, k.sum_width, s.data());
      std::vector<index_t> c(static_cast<std::size_t>(k.count_width), 0);
      for (index_t b = 0; b < nb; ++b)
        for (index_t j = 0; j < k.count_width; ++j)
          c[static_cast<std::size_t>(j)] += counts[i][static_cast<std::size_t>(b * k.count_width + j)];
      sums[i] = std::move(s);
      counts[i] = std::move(c);
    });
  }
  each([&](auto i, auto& k) { local[i] = {count_valid(k.mask, rows), sums[i].data(), counts[i].data()}; });

  if (stats_mode) {
    each([&](auto i, auto& k) {
      if (stats_out[i] != nullptr) k.write_stats(local[i], stats_out[i]);
    });
    return;
  }

  // The constants of every kernel, from the reduced statistics or this call's.
  each([&](auto i, auto& k) {
    std::vector<double> own;
    const double* st = reduced[i].data;
    if (st == nullptr) {
      own.resize(static_cast<std::size_t>(k.stats_size));
      k.write_stats(local[i], own.data());
      st = own.data();
    }
    k.prepare(st, local[i]);
  });

  // The row pass: each source read once per row, each destination written once.
  std::array<bool, N> on{};
  bool any_rows = ndst > 0;
  each([&](auto i, auto& k) {
    on[i] = k.active && k.wants_rows(grads[i] != nullptr);
    any_rows = any_rows || on[i];
  });
  std::array<std::vector<Acc>, N> part;
  for (auto& v : part) v.assign(static_cast<std::size_t>(any_rows ? nb : 0), Acc(0));
  // A gradient that one kernel writes, contiguous in the accumulator type, is written in place
  // (direct); the others through a row buffer that sums the kernels' contributions.
  std::array<bool, N> direct{};
  {
    std::array<int, N> writers{};
    each([&](auto i, auto&) {
      if (on[i] && dst[i] >= 0) ++writers[static_cast<std::size_t>(dst[i])];
    });
    for (int d = 0; d < ndst; ++d)
      direct[static_cast<std::size_t>(d)] = std::is_same<GT, Acc>::value && writers[static_cast<std::size_t>(d)] == 1 &&
                                            dsts[static_cast<std::size_t>(d)].contiguous_rows();
  }
  if (any_rows) {
    parallel_blocks(be, rows, B, [&](index_t b, index_t r0, index_t r1) {
      row_scratch<Acc> conv(conv_size), gbuf(static_cast<std::size_t>(ndst * width));
      cpu_row_ops<Acc> ops(width, 2);
      std::array<Acc, N> acc{};
      std::array<const Acc*, N> xs{};
      std::array<bool, N> touched{};
      for (index_t t = r0; t < r1; ++t) {
        xs.fill(nullptr);
        touched.fill(false);
        each([&](auto i, auto& k) {
          if (!on[i] || !k.mask(t)) return;
          const auto s = static_cast<std::size_t>(src[i]);
          if (k.reads_row && xs[s] == nullptr)
            xs[s] = acc_row(srcs[s], t, conv.data() + s * static_cast<std::size_t>(width));
          Acc* g = nullptr;
          if (dst[i] >= 0) {
            const auto d = static_cast<std::size_t>(dst[i]);
            if (direct[d]) {
              g = reinterpret_cast<Acc*>(dsts[d].row(t));  // GT is Acc here
              ops.set_assign(!opts.accumulate);
            } else {
              g = gbuf.data() + d * static_cast<std::size_t>(width);
              ops.set_assign(!touched[d]);
            }
            touched[d] = true;
          }
          acc[i] += k.row(t, k.reads_row ? xs[s] : nullptr, g, ops);
        });
        for (int d = 0; d < ndst; ++d) {
          const auto du = static_cast<std::size_t>(d);
          if (touched[du]) {
            if (!direct[du])
              store_grad_row(dsts[du], t, gbuf.data() + du * static_cast<std::size_t>(width), opts.accumulate);
          } else if (!opts.accumulate) {
            zero_grad_row(dsts[du], t);
          }
        }
      }
      for (std::size_t i = 0; i < N; ++i) part[i][static_cast<std::size_t>(b)] = acc[i];
    });
  }
  each([&](auto i, auto& k) { values[i] = k.finish(on[i] ? pairwise_sum(part[i].data(), nb) : Acc(0)); });
}

/// The row kernel of a loss for these inputs (its header's make_row_kernel).
template <class Loss, class In>
using row_kernel_t = decltype(make_row_kernel(std::declval<const Loss&>(), std::declval<const In&>(), grad_options{}));

/// True for a loss the row engine runs: one whose header describes a row kernel.
template <class Loss, class In, class = void>
struct is_row_loss : std::false_type {};
template <class Loss, class In>
struct is_row_loss<Loss, In, std::void_t<row_kernel_t<Loss, In>>> : std::true_type {};
template <class Loss, class In>
using enable_row_loss = std::enable_if_t<is_row_loss<Loss, In>::value, int>;

}  // namespace detail

/// A loss may send some of its configurations to another CPU engine (load balancing its
/// sequence scope: backend/cpu/segmented_rows.hpp): it returns true there and writes the
/// value, or the statistics. By default every configuration runs on the row engine.
template <class Loss, class In, class G>
bool cpu_other_engine(const cpu&, const Loss&, const In&, stats_view, const G*, grad_options, double&) {
  return false;
}
/// The local_stats() form of cpu_other_engine: true where another engine wrote the statistics.
template <class Loss, class In>
bool cpu_other_engine_stats(const cpu&, const Loss&, const In&, double*) {
  return false;
}
/// Whether this configuration of a row loss runs on the row engine, and so can be fused.
template <class Loss>
bool cpu_row_engine_runs(const Loss&) {
  return true;
}

/// CPU backend of a row loss's value(), backward() and value_and_grad() (found by ADL):
/// validates, runs the row engine with the loss's kernel, returns the value and, when `grad`
/// is not null, writes the gradient per `opts`.
template <class Loss, class In, class G, detail::enable_row_loss<Loss, In> = 0>
double execute(const cpu& be, const Loss& loss, const In& in, stats_view reduced, const G* grad, grad_options opts) {
  detail::check_scalars(Loss::label, loss.cfg.coef, opts, be.threads);
  validate_on_host(Loss::label, loss, in, reduced, grad);
  double value = 0;
  if (cpu_other_engine(be, loss, in, reduced, grad, opts, value)) return value;
  std::tuple<detail::row_kernel_t<Loss, In>> ks{make_row_kernel(loss, in, opts)};
  using T = typename detail::row_kernel_t<Loss, In>::storage_type;
  detail::cpu_row_run<T, typename detail::view_storage<G>::type>(be, ks, {grad}, {reduced}, opts, nullptr, &value);
  return value;
}

/// CPU backend of a row loss's local_stats() (found by ADL): validates, then writes the
/// statistics to `out`.
template <class Loss, class In, detail::enable_row_loss<Loss, In> = 0>
void execute_stats(const cpu& be, const Loss& loss, const In& in, double* out) {
  detail::check_scalars(Loss::label, loss.cfg.coef, grad_options{}, be.threads);
  validate_on_host(Loss::label, loss, in, stats_view{}, static_cast<const detail::grad_view_t<In>*>(nullptr));
  if (cpu_other_engine_stats(be, loss, in, out)) return;
  std::tuple<detail::row_kernel_t<Loss, In>> ks{make_row_kernel(loss, in, grad_options{})};
  double* outs[1] = {out};
  using T = typename detail::row_kernel_t<Loss, In>::storage_type;
  detail::cpu_row_run<T, T>(be, ks, {nullptr}, {stats_view{}}, grad_options{}, outs, nullptr);
}

namespace detail {

/// The bytes [lo, hi) a non-empty view reaches.
template <class T>
std::pair<const char*, const char*> byte_range(const matrix_view<T>& m) {
  const char* base = reinterpret_cast<const char*>(m.data);
  index_t lo = 0, hi = 0;
  for (const index_t d : {(m.rows - 1) * m.row_stride, (m.cols - 1) * m.col_stride}) (d < 0 ? lo : hi) += d;
  return {base + lo * static_cast<index_t>(sizeof(T)), base + (hi + 1) * static_cast<index_t>(sizeof(T))};
}

/// The compile-time checks of a fusion of losses L... on inputs In..., and its storage type.
template <class Losses, class Inputs>
struct fused_traits;
template <class... L, class... In>
struct fused_traits<std::tuple<L...>, std::tuple<In...>> {
  static_assert(sizeof...(L) == sizeof...(In), "moereg::fused: pass one inputs object per loss");
  static_assert((std::is_same<typename In::loss_type, L>::value && ...),
                "moereg::fused: the i-th inputs must be the inputs of the i-th loss");
  static_assert((is_row_loss<L, In>::value && ...),
                "moereg::fused: every fused loss must be a row loss (one routing matrix; backend/cpu/row_engine.hpp)");
  using kernels = std::tuple<row_kernel_t<L, In>...>;
  using storage_type = typename std::tuple_element_t<0, kernels>::storage_type;
  static_assert((std::is_same<typename row_kernel_t<L, In>::storage_type, storage_type>::value && ...),
                "moereg::fused: every fused loss must have the same storage type");
  /// The gradients' array, storage type GT (the inputs' own, or another for mixed precision).
  template <class GT = storage_type>
  using grads = std::array<const matrix_view<GT>*, sizeof...(L)>;

  /// Each loss's row kernel (`in`: a tuple of the inputs or of references to them).
  template <class Tuple>
  static kernels make(const std::tuple<L...>& losses, const Tuple& in, grad_options opts) {
    return make(losses, in, opts, std::index_sequence_for<L...>{});
  }
  template <class Tuple, std::size_t... I>
  static kernels make(const std::tuple<L...>& losses, const Tuple& in, grad_options opts, std::index_sequence<I...>) {
    return kernels{make_row_kernel(std::get<I>(losses), std::get<I>(in), opts)...};
  }

  /// Every check of a fused call, before anything is read or written: each loss's own checks
  /// (its label names it), then what fusion adds (the row engine, the same rows, gradients
  /// that are either the same view or disjoint).
  template <class Tuple, class GT>
  static void validate(const cpu& be, const std::tuple<L...>& losses, const Tuple& in,
                       const std::array<stats_view, sizeof...(L)>& reduced, const grads<GT>& g, grad_options opts,
                       const kernels& ks) {
    validate(be, losses, in, reduced, g, opts, ks, std::index_sequence_for<L...>{});
  }
  template <class Tuple, class GT, std::size_t... I>
  static void validate(const cpu& be, const std::tuple<L...>& losses, const Tuple& in,
                       const std::array<stats_view, sizeof...(L)>& reduced, const grads<GT>& g, grad_options opts,
                       const kernels& ks, std::index_sequence<I...>) {
    const index_t rows = std::get<0>(ks).x.rows;
    const char* first = std::tuple_element_t<0, std::tuple<L...>>::label;
    const auto one = [&](const auto& loss, const auto& inputs, stats_view red, const auto* grad, index_t r) {
      using Loss = std::decay_t<decltype(loss)>;
      check_scalars(Loss::label, loss.cfg.coef, opts, be.threads);
      validate_on_host(Loss::label, loss, inputs, red, grad);
      require(cpu_row_engine_runs(loss), Loss::label,
              ": this configuration does not run on the row engine and cannot be fused");
      require(r == rows, "fused: ", Loss::label, " has ", r, " rows but ", first, " has ", rows,
              "; fused losses share their rows");
    };
    (one(std::get<I>(losses), std::get<I>(in), reduced[I], g[I], std::get<I>(ks).x.rows), ...);
    for (std::size_t i = 0; i < g.size(); ++i)
      for (std::size_t j = i + 1; j < g.size(); ++j) {
        const auto *a = g[i], *b = g[j];
        if (a == nullptr || b == nullptr || a->size() == 0 || b->size() == 0 || same_matrix(*a, *b)) continue;
        const auto ra = byte_range(*a), rb = byte_range(*b);
        require(ra.second <= rb.first || rb.second <= ra.first, "fused: the gradients of losses ", i, " and ", j,
                " overlap without being the same view; share a gradient by passing the same view, else give "
                "disjoint buffers");
      }
  }
};

}  // namespace detail

/// CPU backend of fused<L...>'s value(), backward() and value_and_grad() (found by ADL):
/// validates every loss, then runs all their row kernels in one engine run.
template <class... L, class... In, class... G>
void execute_fused(const cpu& be, const fused<L...>& f, const std::tuple<In...>& in,
                   const std::array<stats_view, sizeof...(L)>& reduced, const std::tuple<const G*...>& grads,
                   grad_options opts, double* values) {
  using traits = detail::fused_traits<std::tuple<L...>, std::tuple<std::decay_t<In>...>>;
  using T = typename traits::storage_type;
  using G0 = std::tuple_element_t<0, std::tuple<G...>>;
  using GT = typename detail::view_storage<G0>::type;
  static_assert(is_storage_type_v<GT> && (std::is_same<G, matrix_view<GT>>::value && ...),
                "moereg::fused: the gradients are matrix_views of one storage type (the inputs' own, or "
                "another for mixed precision: float gradients for bfloat16 inputs)");
  const typename traits::template grads<GT> g =
      std::apply([](const auto*... p) { return typename traits::template grads<GT>{p...}; }, grads);
  auto ks = traits::make(f.losses, in, opts);
  traits::validate(be, f.losses, in, reduced, g, opts, ks);
  detail::cpu_row_run<T, GT>(be, ks, g, reduced, opts, nullptr, values);
}

/// CPU backend of fused<L...>::local_stats() (found by ADL): validates, then writes loss i's
/// statistics to outs[i].
template <class... L, class... In>
void execute_fused_stats(const cpu& be, const fused<L...>& f, const std::tuple<In...>& in, double* const* outs) {
  using traits = detail::fused_traits<std::tuple<L...>, std::tuple<std::decay_t<In>...>>;
  using T = typename traits::storage_type;
  const typename traits::template grads<T> g{};
  auto ks = traits::make(f.losses, in, grad_options{});
  traits::validate(be, f.losses, in, {}, g, grad_options{}, ks);
  detail::cpu_row_run<T, T>(be, ks, g, {}, grad_options{}, outs, nullptr);
}

MOEREG_NAMESPACE_END
