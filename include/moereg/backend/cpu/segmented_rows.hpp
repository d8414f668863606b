// The CPU engine of the losses taken per segment of rows: load balancing in the sequence scope
// (LOSSES.md section 1), f and pbar inside each of B sequences, L = (1/B) sum_b L_b. Each
// sequence is one sequential piece of work (blocks of cpu_block_rows rows summed in block
// order, as on the row engine), and the sequences run in parallel; the value is the pairwise
// sum of the sequences' values, so the result is bitwise the same for any thread count.
// Include <moereg/backend/cpu.hpp>, not this file.
#pragma once

#include "internal.hpp"  // refuses direct inclusion; core/config.hpp

#include <algorithm>
#include <vector>

#include "../../core/types.hpp"
#include "../../core/views.hpp"
#include "../../losses/load_balancing.hpp"
#include "../../math/reduce.hpp"
#include "../../math/router.hpp"
#include "executor.hpp"
#include "row_engine.hpp"

MOEREG_NAMESPACE_BEGIN
namespace detail {

/// The sequences of a sequence-scope call: a fixed length, or the offsets cu_seqlens.
struct lb_sequences {
  index_t count = 0;
  index_t fixed = 0;  // > 0: fixed length
  offsets_view offsets{};
  index_t begin(index_t b) const { return fixed > 0 ? b * fixed : offsets[b]; }
  index_t end(index_t b) const { return fixed > 0 ? (b + 1) * fixed : offsets[b + 1]; }
};

/// The sequences of a validated call.
template <class T>
lb_sequences lb_sequences_of(const load_balancing_loss& loss, const load_balancing_inputs<T>& in) {
  lb_sequences seq;
  if (loss.cfg.seq_len > 0) {
    seq.fixed = loss.cfg.seq_len;
    seq.count = in.probs.rows / loss.cfg.seq_len;
  } else {
    seq.offsets = in.cu_seqlens;
    seq.count = in.cu_seqlens.size - 1;
  }
  return seq;
}

/// Masked column sums, expert counts and T_v over rows [r0, r1), in row order.
template <class T, class Acc>
void lb_block_sums(const load_balancing_inputs<T>& in, index_t r0, index_t r1, Acc* colsum, index_t* counts,
                   index_t& tv) {
  const auto& P = in.probs;
  const index_t E = P.cols;
  for (index_t e = 0; e < E; ++e) colsum[e] = Acc(0), counts[e] = 0;
  tv = 0;
  for (index_t t = r0; t < r1; ++t) {
    if (!in.mask(t)) continue;
    ++tv;
    for (index_t e = 0; e < E; ++e) colsum[e] += load(P(t, e));
    for (index_t s = 0; s < in.topk.k; ++s) {
      const index_t e = in.topk(t, s);
      if (e >= 0) ++counts[e];
    }
  }
}

}  // namespace detail

/// The sequence scope of load_balancing_loss runs here, not on the row engine (so it is not fused).
inline bool cpu_row_engine_runs(const load_balancing_loss& loss) {
  return loss.cfg.scope != lb_scope::sequence;
}

/// The sequence scope of load_balancing_loss's statistics: [B] (the row engine runs the other
/// scopes).
template <class T>
bool cpu_other_engine_stats(const cpu&, const load_balancing_loss& loss, const load_balancing_inputs<T>& in,
                            double* out) {
  if (loss.cfg.scope != lb_scope::sequence) return false;
  out[0] = static_cast<double>(detail::lb_sequences_of(loss, in).count);
  return true;
}

/// The sequence scope of load_balancing_loss's value and gradient (the row engine runs the
/// other scopes); the call is validated.
template <class T, class G>
bool cpu_other_engine(const cpu& be, const load_balancing_loss& loss, const load_balancing_inputs<T>& in,
                      stats_view reduced, const matrix_view<G>* grad, grad_options opts, double& value) {
  if (loss.cfg.scope != lb_scope::sequence) return false;
  using Acc = accumulator_t<T>;
  const auto seq = detail::lb_sequences_of(loss, in);
  const index_t E = in.probs.cols;
  const Acc k = make_row_kernel(loss, in, opts).k;  // the configured top-k width
  const Acc alphaE = static_cast<Acc>(loss.cfg.coef) * static_cast<Acc>(E);
  const Acc gs = static_cast<Acc>(opts.grad_scale);
  const double B_total = reduced.empty() ? static_cast<double>(seq.count) : reduced.data[0];
  std::vector<Acc> seq_values(static_cast<std::size_t>(seq.count), Acc(0));
  const Acc invB = B_total > 0 ? static_cast<Acc>(1.0 / B_total) : Acc(0);
  detail::parallel_blocks(be, seq.count, 1, [&](index_t b, index_t, index_t) {
    const index_t r0 = seq.begin(b), r1 = seq.end(b);
    const index_t nb = detail::num_blocks(r1 - r0, detail::cpu_block_rows);
    std::vector<Acc> pcol(static_cast<std::size_t>(nb * E)), colsum(static_cast<std::size_t>(E)),
        c(static_cast<std::size_t>(E)), terms(static_cast<std::size_t>(E));
    std::vector<index_t> pcnt(static_cast<std::size_t>(nb * E)), cnt(static_cast<std::size_t>(E), 0);
    index_t tv = 0;
    for (index_t j = 0; j < nb; ++j) {
      index_t tvj = 0;
      const index_t a = r0 + j * detail::cpu_block_rows;
      detail::lb_block_sums(in, a, std::min(r1, a + detail::cpu_block_rows), pcol.data() + j * E, pcnt.data() + j * E,
                            tvj);
      tv += tvj;
      for (index_t e = 0; e < E; ++e) cnt[static_cast<std::size_t>(e)] += pcnt[static_cast<std::size_t>(j * E + e)];
    }
    detail::combine_blocks(pcol, nb, E, colsum.data());
    const Acc inv_tv = tv > 0 ? Acc(1) / static_cast<Acc>(tv) : Acc(0);
    for (index_t e = 0; e < E; ++e) {
      const auto r = detail::lb_seq_expert(static_cast<Acc>(cnt[static_cast<std::size_t>(e)]), inv_tv,
                                           colsum[static_cast<std::size_t>(e)], k, alphaE, gs, invB);
      terms[static_cast<std::size_t>(e)] = r.term;
      c[static_cast<std::size_t>(e)] = r.coeff;
    }
    seq_values[static_cast<std::size_t>(b)] = alphaE * detail::pairwise_sum(terms.data(), E);
    if (grad) {
      for (index_t t = r0; t < r1; ++t) {
        const bool valid = in.mask(t);
        if (!valid && opts.accumulate) continue;
        for (index_t e = 0; e < E; ++e)
          detail::put_grad((*grad)(t, e), valid ? c[static_cast<std::size_t>(e)] : Acc(0), opts.accumulate);
      }
    }
  });
  value = static_cast<double>(invB * detail::pairwise_sum(seq_values.data(), seq.count));
  return true;
}

MOEREG_NAMESPACE_END
