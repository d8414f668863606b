// One shared list of every loss, for property tests (tests/losses/test_properties.cpp).
//
// A "case" is a struct of static functions that knows how to make random inputs for one loss
// configuration (masks, dropped slots, odd sizes), how to call the loss, and how its batch
// splits (LOSSES.md section 9). The inputs of every case are held in one generic form, a
// `batch`: per-token tables (T rows each), so that the property tests can slice, permute and
// pad any loss's batch without knowing the loss. The gradient is one flat buffer of doubles
// made of `grad_widths` blocks, block j being [T, grad_widths[j]] row-major (one block for a
// router loss, [T, k * d] token-major for an activation loss, one [T, E] block per layer for
// coupling).
//
// The library calls live out of line (tests/losses/test_cases_*.cpp), so that the heavy loss
// templates compile in separate translation units and the property tests stay cheap.
#pragma once

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include <moereg/core/views.hpp>

#include "support/random.hpp"

namespace moereg_test {

/// How the statistics of parts of a batch combine (LOSSES.md section 9).
enum class split_rule {
  sum,     ///< parts' values sum to the whole value; every part gets the whole batch's gradient rows
  whole,   ///< every part's value IS the whole value (importance: CV^2 is not a sum); gradient rows equal
  global,  ///< lb global scope: f global, pbar and 1/T_v local: part value and rows scale by T_v / T_v(part)
};

/// A batch in generic form: T tokens, each with rows in a few tables.
struct batch {
  long long T = 0;
  long long E = 0, k = 0, d = 0, layers = 0;  // the shape parameters a case uses
  std::vector<std::uint8_t> mask;             // [T], 1 = valid
  std::vector<std::vector<double>> reals;     // each [T, real_w[i]]
  std::vector<long long> real_w;
  std::vector<std::vector<long long>> ints;  // each [T, int_w[i]]
  std::vector<long long> int_w;
  std::vector<long long> cu;  // packed sequences (B + 1 offsets), empty = none

  long long valid() const {
    long long n = 0;
    for (auto m : mask) n += m ? 1 : 0;
    return n;
  }
  /// Rows [r0, r1) (no sequences).
  batch rows(long long r0, long long r1) const {
    batch b = *this;
    b.T = r1 - r0;
    b.mask.assign(mask.begin() + r0, mask.begin() + r1);
    for (std::size_t i = 0; i < reals.size(); ++i)
      b.reals[i].assign(reals[i].begin() + r0 * real_w[i], reals[i].begin() + r1 * real_w[i]);
    for (std::size_t i = 0; i < ints.size(); ++i)
      b.ints[i].assign(ints[i].begin() + r0 * int_w[i], ints[i].begin() + r1 * int_w[i]);
    b.cu.clear();
    return b;
  }
  /// Sequences [b0, b1) with their rows, offsets rebased to 0.
  batch sequences(long long b0, long long b1) const {
    const long long r0 = cu[static_cast<std::size_t>(b0)], r1 = cu[static_cast<std::size_t>(b1)];
    batch b = rows(r0, r1);
    for (long long s = b0; s <= b1; ++s) b.cu.push_back(cu[static_cast<std::size_t>(s)] - r0);
    return b;
  }
  /// Token perm[i] of this batch becomes token i.
  batch permuted(const std::vector<long long>& perm) const {
    batch b = *this;
    for (long long t = 0; t < T; ++t) {
      const long long src = perm[static_cast<std::size_t>(t)];
      b.mask[static_cast<std::size_t>(t)] = mask[static_cast<std::size_t>(src)];
      for (std::size_t i = 0; i < reals.size(); ++i)
        for (long long c = 0; c < real_w[i]; ++c)
          b.reals[i][static_cast<std::size_t>(t * real_w[i] + c)] =
              reals[i][static_cast<std::size_t>(src * real_w[i] + c)];
      for (std::size_t i = 0; i < ints.size(); ++i)
        for (long long c = 0; c < int_w[i]; ++c)
          b.ints[i][static_cast<std::size_t>(t * int_w[i] + c)] = ints[i][static_cast<std::size_t>(src * int_w[i] + c)];
    }
    return b;
  }
};

/// Number of gradient entries of a batch with these block widths.
inline std::size_t grad_size(long long T, const std::vector<long long>& widths) {
  std::size_t n = 0;
  for (long long w : widths) n += static_cast<std::size_t>(T * w);
  return n;
}

/// Rows [r0, r1) of every block of a flat gradient over T tokens.
inline std::vector<double> grad_rows(const std::vector<double>& g, long long T, const std::vector<long long>& widths,
                                     long long r0, long long r1) {
  std::vector<double> out;
  std::size_t off = 0;
  for (long long w : widths) {
    out.insert(out.end(), g.begin() + static_cast<std::ptrdiff_t>(off + r0 * w),
               g.begin() + static_cast<std::ptrdiff_t>(off + r1 * w));
    off += static_cast<std::size_t>(T * w);
  }
  return out;
}

/// The gradient with its token rows permuted like batch::permuted(perm).
inline std::vector<double> grad_permuted(const std::vector<double>& g, long long T,
                                         const std::vector<long long>& widths, const std::vector<long long>& perm) {
  std::vector<double> out(g.size());
  std::size_t off = 0;
  for (long long w : widths) {
    for (long long t = 0; t < T; ++t)
      for (long long c = 0; c < w; ++c)
        out[off + static_cast<std::size_t>(t * w + c)] =
            g[off + static_cast<std::size_t>(perm[static_cast<std::size_t>(t)] * w + c)];
    off += static_cast<std::size_t>(T * w);
  }
  return out;
}

/// Appends n rows of random content to table `i` (helpers for the cases' append()).
inline void append_probs(batch& b, std::size_t i, rng& r, long long n) {
  const auto p = random_probs(r, n, b.real_w[i]);
  b.reals[i].insert(b.reals[i].end(), p.begin(), p.end());
}
inline void append_normal(batch& b, std::size_t i, rng& r, long long n, double scale) {
  const auto p = random_normal(r, static_cast<std::size_t>(n * b.real_w[i]), scale);
  b.reals[i].insert(b.reals[i].end(), p.begin(), p.end());
}
inline void append_topk(batch& b, std::size_t i, rng& r, long long n, long long E, double drop) {
  const auto I = random_topk(r, n, E, b.int_w[i], drop);
  b.ints[i].insert(b.ints[i].end(), I.begin(), I.end());
}

// ---------------------------------------------------------------------------------------------
// The cases. Each has:
//   name                      the loss and configuration, for messages
//   equivariant               permuting tokens permutes the gradient rows and keeps the value
//   split                     how parts combine (split_rule)
//   make(r, T)                a random batch of T tokens (shapes drawn from r)
//   append(b, r, n)           appends n random rows (valid content; the caller sets their mask)
//   grad_widths(b)            the gradient blocks
//   call(b, grad, opts, red)  the value, and with grad != null the gradient (opts) into the
//                             flat buffer; red != null: reduced statistics
//   stats(b)                  local_stats
// Sequence-scope cases keep b.cu; append() extends the last sequence.

#define MOEREG_TEST_CASE_DECL                                                                                      \
  static batch make(rng& r, long long T);                                                                          \
  static void append(batch& b, rng& r, long long n);                                                               \
  static std::vector<long long> grad_widths(const batch& b);                                                       \
  static double call(const batch& b, double* grad, moereg::grad_options opts, const std::vector<double>* reduced); \
  static std::vector<double> stats(const batch& b);

struct case_lb_micro {
  static constexpr const char* name = "load_balancing micro";
  static constexpr bool equivariant = true;
  static constexpr split_rule split = split_rule::sum;
  MOEREG_TEST_CASE_DECL
};
struct case_lb_sequence {
  static constexpr const char* name = "load_balancing sequence (cu_seqlens)";
  // Not permutation-equivariant across sequences (a token's sequence decides its f and pbar);
  // only permutations inside each sequence keep the value (the property test uses those).
  static constexpr bool equivariant = false;
  static constexpr split_rule split = split_rule::sum;
  MOEREG_TEST_CASE_DECL
};
struct case_lb_global {
  static constexpr const char* name = "load_balancing global";
  static constexpr bool equivariant = true;
  static constexpr split_rule split = split_rule::global;
  MOEREG_TEST_CASE_DECL
};
struct case_z_loss {
  static constexpr const char* name = "z_loss";
  static constexpr bool equivariant = true;
  static constexpr split_rule split = split_rule::sum;
  MOEREG_TEST_CASE_DECL
};
struct case_entropy {
  static constexpr const char* name = "entropy";
  static constexpr bool equivariant = true;
  static constexpr split_rule split = split_rule::sum;
  MOEREG_TEST_CASE_DECL
};
struct case_importance {
  static constexpr const char* name = "importance";
  static constexpr bool equivariant = true;
  static constexpr split_rule split = split_rule::whole;
  MOEREG_TEST_CASE_DECL
};
struct case_variance_tokens {
  static constexpr const char* name = "variance tokens";
  static constexpr bool equivariant = true;
  static constexpr split_rule split = split_rule::sum;
  MOEREG_TEST_CASE_DECL
};
struct case_variance_experts {
  static constexpr const char* name = "variance experts";
  static constexpr bool equivariant = true;
  static constexpr split_rule split = split_rule::sum;
  MOEREG_TEST_CASE_DECL
};
struct case_specialization {
  static constexpr const char* name = "specialization";
  static constexpr bool equivariant = true;
  static constexpr split_rule split = split_rule::sum;
  MOEREG_TEST_CASE_DECL
};
struct case_ortho_pairwise {
  static constexpr const char* name = "orthogonality pairwise";
  static constexpr bool equivariant = true;
  static constexpr split_rule split = split_rule::sum;
  MOEREG_TEST_CASE_DECL
};
struct case_ortho_subspace {
  static constexpr const char* name = "orthogonality subspace";
  static constexpr bool equivariant = true;
  static constexpr split_rule split = split_rule::sum;
  MOEREG_TEST_CASE_DECL
};
struct case_coupling_token {
  static constexpr const char* name = "coupling token";
  static constexpr bool equivariant = true;
  static constexpr split_rule split = split_rule::sum;
  MOEREG_TEST_CASE_DECL
};
struct case_coupling_log {
  static constexpr const char* name = "coupling log";
  static constexpr bool equivariant = true;
  static constexpr split_rule split = split_rule::sum;
  MOEREG_TEST_CASE_DECL
};
struct case_coupling_batch {
  static constexpr const char* name = "coupling batch";
  static constexpr bool equivariant = true;
  static constexpr split_rule split = split_rule::sum;
  MOEREG_TEST_CASE_DECL
};

#undef MOEREG_TEST_CASE_DECL

/// Every loss and configuration the library ships.
using all_loss_cases =
    std::tuple<case_lb_micro, case_lb_sequence, case_lb_global, case_z_loss, case_entropy, case_importance,
               case_variance_tokens, case_variance_experts, case_specialization, case_ortho_pairwise,
               case_ortho_subspace, case_coupling_token, case_coupling_log, case_coupling_batch>;

}  // namespace moereg_test
