// Helpers shared by the CPU executors of the losses; the checks are in core/validate.hpp.
#pragma once

#include "../core/config.hpp"

#include <cmath>
#include <vector>

#include "../core/error.hpp"
#include "../core/layouts.hpp"
#include "../core/types.hpp"
#include "../core/validate.hpp"
#include "../core/views.hpp"

MOEREG_NAMESPACE_BEGIN
namespace detail {

/// Number of valid tokens, T_v = sum_t m_t.
inline index_t count_valid(const mask_view& m, index_t T) {
  if (m.all_valid()) return T;
  index_t n = 0;
  for (index_t t = 0; t < T; ++t) n += m(t) ? 1 : 0;
  return n;
}

}  // namespace detail
MOEREG_NAMESPACE_END
