// moereg::compiled: the explicit instantiation definitions of core/compiled.hpp for one
// storage type. Each src/compiled/<type>.cpp expands MOEREG_DETAIL_INSTANTIATE(<type>); the
// four compile in parallel. The headers seen here already carry the extern declarations (an
// explicit instantiation definition may follow its declaration in one unit).
#pragma once

#include "moereg/moereg.hpp"

#if !MOEREG_DETAIL_USE_COMPILED
#error \
    "moereg::compiled is built with MOEREG_COMPILED=1 and must match the configuration it declares (MOEREG_COMPILED_OPENMP, MOEREG_COMPILED_AVX512): check the compile flags"
#endif

#define MOEREG_DETAIL_INSTANTIATE(T)                                                      \
  MOEREG_NAMESPACE_BEGIN                                                                  \
  MOEREG_DETAIL_ROUTER_ENTRY(T, template, load_balancing_loss, load_balancing_inputs)     \
  MOEREG_DETAIL_ROUTER_ENTRY(T, template, z_loss, z_loss_inputs)                          \
  MOEREG_DETAIL_ROUTER_ENTRY(T, template, entropy_loss, entropy_inputs)                   \
  MOEREG_DETAIL_ROUTER_ENTRY(T, template, importance_loss, importance_inputs)             \
  MOEREG_DETAIL_ROUTER_ENTRY(T, template, variance_loss, variance_inputs)                 \
  MOEREG_DETAIL_ROUTER_ENTRY(T, template, coupling_loss, coupling_inputs)                 \
  MOEREG_DETAIL_ACTIVATION_ENTRY(T, template, specialization_loss, specialization_inputs) \
  MOEREG_DETAIL_ACTIVATION_ENTRY(T, template, orthogonality_loss, orthogonality_inputs)   \
  MOEREG_NAMESPACE_END
