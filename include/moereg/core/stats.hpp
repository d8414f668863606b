// Sum-reducible statistics of several losses in one flat buffer (LOSSES.md section 9).
//
// Every loss splits into local statistics (plain sums: valid-token counts, expert counts,
// column sums, joint matrices, ...) and a finish step that reads the reduced sums. A
// training step with several losses on several layers therefore needs one reduction, not
// one per loss: the stats_bundle lays the losses' statistics end to end in one contiguous
// std::vector<double>, the caller sums that vector across ranks (moereg::dist::allreduce,
// ncclAllReduce, a plain loop) and hands each loss its slice:
//
//   moereg::stats_bundle b;
//   auto h_lb = b.add(lb, lb_in);          // any loss with stats_size(in) and local_stats(in, double*, be)
//   auto h_z  = b.add(zl, z_in);
//   b.compute_local();                     // every loss writes its local sums into its slice
//   moereg::dist::allreduce(b, comm);      // one MPI_Allreduce over b.data(), b.size()
//   lb.value_and_grad(lb_in, dP, {}, b.view(h_lb));
//   zl.value_and_grad(z_in, dZ, {}, b.view(h_z));
//
// The bundle is generic over the loss type: it calls only the two members every loss has
// (`stats_size(in)` and `local_stats(in, double* out, backend)`), so a new loss needs no
// change here.
//
// Gradient accumulation (several micro-batches per optimizer step) uses stats_accumulator,
// which sums statistics over the micro-batches of one global batch. Which micro-batch's
// gradient sees which sums is a choice of the trainer; the three schedules and their exact
// semantics are written out at stats_accumulator below.
//
// Determinism: integer statistics (counts, valid-token counts, sequence counts) are whole
// numbers held in double, so any summation order gives them exactly while the totals stay
// below 2^53. Floating statistics (column sums of probabilities or scores, joint matrices)
// are rounded in every addition; a reduction whose order depends on the rank count (as
// MPI_Allreduce's and ncclAllReduce's may) can change their last bits between rank counts.
#pragma once

#include "config.hpp"

#include <cstddef>
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

#include "error.hpp"
#include "types.hpp"
#include "views.hpp"

MOEREG_NAMESPACE_BEGIN

/// Where one loss's statistics lie in a flat statistics buffer.
struct stats_slice {
  index_t offset = 0;  ///< first double of the slice in the buffer
  index_t size = 0;    ///< number of doubles (the loss's stats_size)

  /// The slice inside `buffer` (a buffer with the layout of the bundle that issued it).
  constexpr stats_view in(const double* buffer) const { return stats_view{buffer + offset, size}; }
};

namespace detail {

/// True when Loss follows the loss shape for statistics: `stats_size(in)` and
/// `local_stats(in, double* out, backend)`.
template <class Loss, class Inputs, class Backend, class = void>
struct has_stats_shape : std::false_type {};
template <class Loss, class Inputs, class Backend>
struct has_stats_shape<
    Loss, Inputs, Backend,
    std::void_t<decltype(static_cast<index_t>(std::declval<const Loss&>().stats_size(std::declval<const Inputs&>()))),
                decltype(std::declval<const Loss&>().local_stats(std::declval<const Inputs&>(), std::declval<double*>(),
                                                                 std::declval<const Backend&>()))>> : std::true_type {};

}  // namespace detail

/// The local statistics of several losses, packed end to end in one contiguous buffer.
///
/// add() records a loss and its inputs (by value: the loss is a small config, the inputs are
/// views, so the tensors they point to must live until compute_local() has run) and returns
/// the slice of the buffer that belongs to it. compute_local() runs every recorded loss's
/// local_stats into its slice, on the CPU backend only (the buffer is host memory). A bundle can be
/// reused every step when the views point to buffers refreshed in place; otherwise clear() it and
/// add the new inputs.
///
/// add() may reallocate the buffer: take data() and views after the last add().
class stats_bundle {
 public:
  /// Records `loss` on `in` (run by backend `be`); returns its slice of the buffer.
  template <class Loss, class Inputs, class Backend = cpu>
  stats_slice add(const Loss& loss, const Inputs& in, const Backend& be = {}) {
    static_assert(detail::is_cpu_backend_v<Backend>, MOEREG_HOST_STATS_MESSAGE);
    static_assert(detail::has_stats_shape<Loss, Inputs, Backend>::value,
                  "moereg::stats_bundle::add: the loss needs stats_size(in) and local_stats(in, double*, backend)");
    const index_t n = static_cast<index_t>(loss.stats_size(in));
    return push(n, [loss, in, be](double* out) { loss.local_stats(in, out, be); });
  }

  /// Records caller-defined statistics: `fill(out)` writes `size` sums to out[0..size).
  /// For quantities of the trainer's own that should ride along in the same reduction.
  stats_slice add_custom(index_t size, std::function<void(double*)> fill) {
    detail::require(static_cast<bool>(fill), "stats_bundle::add_custom: fill is empty");
    return push(size, std::move(fill));
  }

  /// Writes every recorded loss's local statistics into data(). Throws moereg::error when a
  /// loss rejects its inputs; data() is then left exactly as it was.
  void compute_local() { compute_local(data_.data()); }

  /// The same into a caller buffer of size() doubles (for example pinned host memory that
  /// is copied to the device for ncclAllReduce). `out` is untouched when a loss throws.
  void compute_local(double* out) const {
    detail::require(out != nullptr || data_.empty(), "stats_bundle::compute_local: out is null but size() = ", size());
    std::vector<double> scratch(data_.size(), 0.0);
    for (const auto& e : entries_) e.fill(scratch.data() + e.slice.offset);
    for (std::size_t i = 0; i < scratch.size(); ++i) out[i] = scratch[i];
  }

  /// The whole buffer: local sums after compute_local(), reduced sums after the caller's
  /// all-reduce over (data(), size()).
  double* data() { return data_.data(); }
  /// Read-only data().
  const double* data() const { return data_.data(); }
  /// Number of doubles in the buffer (the sum of the recorded losses' stats_size).
  index_t size() const { return static_cast<index_t>(data_.size()); }
  /// The buffer as a vector.
  const std::vector<double>& values() const { return data_; }

  /// Number of recorded losses.
  std::size_t entries() const { return entries_.size(); }
  /// Slice of the i-th recorded loss.
  stats_slice slice(std::size_t i) const {
    detail::require(i < entries_.size(), "stats_bundle::slice: index ", i, " but the bundle has ", entries_.size(),
                    " entries");
    return entries_[i].slice;
  }

  /// The statistics of one loss inside this bundle, to pass as its `reduced` argument.
  stats_view view(stats_slice h) const { return view(h, data_.data()); }
  /// The same slice inside another buffer with this bundle's layout (a device-reduced copy,
  /// an accumulator).
  stats_view view(stats_slice h, const double* buffer) const {
    check_slice(h);
    detail::require(buffer != nullptr || h.size == 0, "stats_bundle::view: buffer is null");
    return h.in(buffer);
  }

  /// Forgets every recorded loss; size() becomes 0.
  void clear() {
    entries_.clear();
    data_.clear();
  }

 private:
  struct entry {
    stats_slice slice;
    std::function<void(double*)> fill;
  };

  stats_slice push(index_t n, std::function<void(double*)> fill) {
    detail::require(n >= 0, "stats_bundle::add: a loss reports a negative statistics size ", n);
    const stats_slice s{size(), n};
    entries_.push_back(entry{s, std::move(fill)});
    data_.resize(data_.size() + static_cast<std::size_t>(n), 0.0);
    return s;
  }

  void check_slice(stats_slice h) const {
    detail::require(h.offset >= 0 && h.size >= 0 && h.offset + h.size <= size(), "stats_bundle::view: slice [",
                    h.offset, ", ", h.offset + h.size, ") is outside the bundle of size ", size());
  }

  std::vector<entry> entries_;
  std::vector<double> data_;
};

/// Sums statistics over the micro-batches of one global batch (gradient accumulation).
///
/// The accumulator holds one flat buffer with the layout of the statistics added to it (a
/// stats_bundle's, or one loss's). add() sums a micro-batch's statistics into it; reset()
/// (or, with `steps` > 0, the first add() after `steps` micro-batches) starts the next
/// global batch and keeps the finished sums as previous(). Slices issued by the bundle
/// address the accumulator too: `acc.view(h)`.
///
/// The global-batch balance loss (load_balancing with lb_scope::global, LOSSES.md 1 and 9)
/// takes f_e from counts and T_v summed over every rank and every micro-batch of the global
/// batch, while pbar_e and the 1/T_v of the gradient stay local to the micro-batch being
/// differentiated. The gradient of micro-batch i depends on which sums it is handed:
///
///  1. Two phases (exact). Phase one: the routing of all N micro-batches is known first
///     (a routing-only forward pass, or micro-batches kept in memory); add() each one's
///     local statistics, then all-reduce the accumulator once (sum over ranks of the sum
///     over micro-batches). Phase two: every micro-batch i = 0..N-1 runs value_and_grad
///     with acc.view(h): all of them use the same f, that of the whole global batch.
///  2. Previous step (one pass, stale). Micro-batch i of step s uses acc.previous(): the
///     reduced sums of the whole global batch of step s - 1, while this step's sums are
///     being added. The first step has no previous sums (previous() is empty: the loss then
///     uses its own micro-batch's counts).
///  3. Running sums (one pass, causal). Micro-batch i's local statistics are all-reduced
///     first, then added, and value_and_grad uses acc.view(h) at once: micro-batch i sees
///     the counts of micro-batches 0..i summed over all ranks. Only the last micro-batch
///     sees the whole global batch. (Reducing each micro-batch and then adding equals
///     adding and then reducing, exactly for integer statistics.)
///
/// Losses with lb_scope::micro or z_loss fed accumulated sums normalise by the global
/// batch's T_v: each micro-batch's gradient rows are those of one call over the whole global
/// batch and the micro-batches' values add up to its value, so such a loss must not be
/// divided by N again. Losses that should stay per micro-batch go into a separate bundle.
class stats_accumulator {
 public:
  stats_accumulator() = default;
  /// `steps` = micro-batches per global batch: the add() after the `steps`-th starts the
  /// next global batch by itself. 0 = only reset() starts one.
  explicit stats_accumulator(index_t steps) : steps_(steps) {
    detail::require(steps >= 0, "stats_accumulator: steps = ", steps, " is negative");
  }

  /// Adds one micro-batch's statistics. The first add() of a global batch fixes the size;
  /// later ones must match it.
  void add(const double* stats, index_t n) {
    detail::require(n >= 0, "stats_accumulator::add: negative size ", n);
    detail::require(stats != nullptr || n == 0, "stats_accumulator::add: stats is null but n = ", n);
    if (complete()) reset();
    if (count_ == 0) sums_.assign(static_cast<std::size_t>(n), 0.0);
    detail::require(n == size(), "stats_accumulator::add: ", n, " statistics but this global batch has ", size());
    for (std::size_t i = 0; i < sums_.size(); ++i) sums_[i] += stats[i];
    ++count_;
  }
  /// add() from a stats_view, a stats_bundle's buffer or a vector.
  ///@{
  void add(stats_view s) { add(s.data, s.size); }
  void add(const stats_bundle& b) { add(b.data(), b.size()); }
  void add(const std::vector<double>& s) { add(s.data(), static_cast<index_t>(s.size())); }
  ///@}

  /// Starts the next global batch: the current sums become previous() (when at least one
  /// micro-batch was added) and the sums are zeroed.
  void reset() {
    if (count_ > 0) {
      prev_ = sums_;
      has_prev_ = true;
    }
    for (auto& x : sums_) x = 0.0;
    count_ = 0;
  }

  /// True when `steps` > 0 micro-batches have been added to this global batch.
  bool complete() const { return steps_ > 0 && count_ >= steps_; }
  /// Micro-batches per global batch given at construction (0 = ended by reset() only).
  index_t steps() const { return steps_; }
  /// Micro-batches added since the global batch started.
  index_t count() const { return count_; }

  /// The sums (in place: all-reduce data(), size() across ranks in the two-phase schedule).
  double* data() { return sums_.data(); }
  /// Read-only data().
  const double* data() const { return sums_.data(); }
  /// Number of sums (0 before the first add() of a global batch).
  index_t size() const { return static_cast<index_t>(sums_.size()); }

  /// The sums of this global batch, or of one loss's slice of them.
  stats_view view() const { return stats_view{sums_.data(), size()}; }
  /// One loss's slice of view(); throws moereg::error when `h` lies outside the sums.
  stats_view view(stats_slice h) const { return slice_of(sums_, h, "view"); }

  /// The sums of the last finished global batch; empty before the first reset.
  stats_view previous() const {
    return has_prev_ ? stats_view{prev_.data(), static_cast<index_t>(prev_.size())} : stats_view{};
  }
  /// One loss's slice of previous(); empty before the first reset.
  stats_view previous(stats_slice h) const { return has_prev_ ? slice_of(prev_, h, "previous") : stats_view{}; }
  /// True once a global batch has finished (previous() is not empty).
  bool has_previous() const { return has_prev_; }

 private:
  static stats_view slice_of(const std::vector<double>& v, stats_slice h, const char* what) {
    const auto n = static_cast<index_t>(v.size());
    detail::require(h.offset >= 0 && h.size >= 0 && h.offset + h.size <= n, "stats_accumulator::", what, ": slice [",
                    h.offset, ", ", h.offset + h.size, ") is outside the sums of size ", n);
    return h.in(v.data());
  }

  index_t steps_ = 0;
  index_t count_ = 0;
  std::vector<double> sums_;
  std::vector<double> prev_;
  bool has_prev_ = false;
};

MOEREG_NAMESPACE_END
