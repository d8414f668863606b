// A finite-difference gradient checker for any scalar function of a flat buffer of doubles.
//
//   auto f = [&](const double* x) { ... return loss; };       // x has n entries
//   auto report = moereg::testing::gradcheck(f, x, analytic_grad);
//   REQUIRE(report.ok);  // or print report.summary()
//
// Central differences in double: (f(x + h e_i) - f(x - h e_i)) / 2h for every coordinate when
// n <= full_max, otherwise random directional derivatives (f(x + h v) - f(x - h v)) / 2h
// against <grad, v> for `directions` random unit directions v. An entry passes when
// |analytic - numeric| <= atol + noise + rtol * max(|analytic|, |numeric|), where
// noise = noise_factor * eps_double * max(|f(x+)|, |f(x-)|) / h is the rounding error of the
// difference quotient itself (a loss of size 100 cannot be differenced to 1e-9 with h = 1e-6).
// The report keeps the worst entries by that normalised error.
#pragma once

#include "../core/config.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "../core/error.hpp"
#include "../core/types.hpp"

MOEREG_NAMESPACE_BEGIN
/// Finite-difference gradient checking, public so users can check their own layers.
namespace testing {

/// Tolerances and sampling of gradcheck(). An entry passes when
/// |analytic - numeric| <= atol + noise + rtol * max(|analytic|, |numeric|).
struct gradcheck_options {
  double step = 1e-6;          ///< h
  double rtol = 1e-6;          ///< relative tolerance
  double atol = 1e-9;          ///< absolute tolerance
  double noise_factor = 16;    ///< multiples of the difference quotient's rounding error allowed
  index_t full_max = 2048;     ///< check every coordinate up to this size
  int directions = 32;         ///< random directions above it
  std::uint64_t seed = 12345;  ///< seed of the random directions
  int keep_worst = 5;          ///< entries kept in gradcheck_report::worst
};

/// One checked coordinate or direction.
struct gradcheck_entry {
  index_t index = -1;  ///< coordinate, or -(direction + 1) for a directional check
  /// The analytic and central-difference derivatives, |analytic - numeric|, and
  /// score = abs_error / (atol + noise + rtol * scale) (> 1 fails).
  ///@{
  double analytic = 0, numeric = 0, abs_error = 0, score = 0;
  ///@}
};

/// The result of gradcheck().
struct gradcheck_report {
  bool ok = true;                      ///< every entry passed (NaN fails)
  index_t checked = 0;                 ///< coordinates or directions checked
  double max_abs_error = 0;            ///< largest |analytic - numeric|
  double max_rel_error = 0;            ///< abs_error / max(|analytic|, |numeric|) over entries above atol
  std::vector<gradcheck_entry> worst;  ///< the keep_worst highest scores, worst first

  /// One line with the verdict and the largest errors, then one line per worst entry.
  std::string summary() const {
    std::ostringstream os;
    os << (ok ? "gradcheck passed" : "gradcheck FAILED") << ": " << checked << " checks, max abs error "
       << max_abs_error << ", max rel error " << max_rel_error;
    for (const auto& w : worst)
      os << "\n  " << (w.index >= 0 ? "x[" : "direction[") << (w.index >= 0 ? w.index : -w.index - 1) << "]: analytic "
         << w.analytic << ", numeric " << w.numeric << ", abs error " << w.abs_error;
    return os.str();
  }
};

/// Checks `grad` (the analytic gradient of f at x) by central differences. `f` is called as
/// f(const double* x) and must not keep the pointer.
template <class F>
gradcheck_report gradcheck(F&& f, std::vector<double> x, const std::vector<double>& grad,
                           const gradcheck_options& opt = {}) {
  detail::require(grad.size() == x.size(), "gradcheck: grad has ", grad.size(), " entries but x has ", x.size());
  detail::require(opt.step > 0, "gradcheck: step must be positive");
  gradcheck_report rep;
  const index_t n = static_cast<index_t>(x.size());
  const double h = opt.step;
  auto record = [&](index_t idx, double a, double fp, double fm) {
    const double num = (fp - fm) / (2 * h);
    const double noise =
        opt.noise_factor * std::numeric_limits<double>::epsilon() * std::max(std::abs(fp), std::abs(fm)) / h;
    const double err = std::abs(a - num), scale = std::max(std::abs(a), std::abs(num));
    gradcheck_entry en{idx, a, num, err, err / (opt.atol + noise + opt.rtol * scale)};
    ++rep.checked;
    if (!(en.score <= 1.0)) rep.ok = false;  // also catches NaN
    rep.max_abs_error = std::max(rep.max_abs_error, err);
    if (err > opt.atol && scale > 0) rep.max_rel_error = std::max(rep.max_rel_error, err / scale);
    rep.worst.push_back(en);
    std::sort(rep.worst.begin(), rep.worst.end(),
              [](const gradcheck_entry& a_, const gradcheck_entry& b_) { return !(a_.score <= b_.score); });
    if (static_cast<int>(rep.worst.size()) > opt.keep_worst) rep.worst.pop_back();
  };
  if (n <= opt.full_max) {
    for (index_t i = 0; i < n; ++i) {
      const double xi = x[static_cast<std::size_t>(i)];
      x[static_cast<std::size_t>(i)] = xi + h;
      const double fp = f(static_cast<const double*>(x.data()));
      x[static_cast<std::size_t>(i)] = xi - h;
      const double fm = f(static_cast<const double*>(x.data()));
      x[static_cast<std::size_t>(i)] = xi;
      record(i, grad[static_cast<std::size_t>(i)], fp, fm);
    }
    return rep;
  }
  std::mt19937_64 rng(opt.seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<double> v(x.size()), xp(x.size()), xm(x.size());
  for (int d = 0; d < opt.directions; ++d) {
    double nrm = 0;
    for (auto& vi : v) vi = nd(rng), nrm += vi * vi;
    nrm = std::sqrt(nrm);
    double dot = 0;
    for (std::size_t i = 0; i < x.size(); ++i) {
      v[i] /= nrm;
      dot += grad[i] * v[i];
      xp[i] = x[i] + h * v[i];
      xm[i] = x[i] - h * v[i];
    }
    record(-(d + 1), dot, f(static_cast<const double*>(xp.data())), f(static_cast<const double*>(xm.data())));
  }
  return rep;
}

}  // namespace testing
MOEREG_NAMESPACE_END
