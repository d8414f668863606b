// The CPU backend: the executor (threads, blocks, element access), the row engine that runs
// every loss on one routing matrix (load balancing, z-loss, entropy, importance, variance, and
// any loss described the same way, alone or fused), and the segmented engine of the
// load-balancing sequence scope. The Gram losses (specialization, orthogonality) and the
// coupling loss bring their own executors with their headers.
//
// With moereg::compiled (core/compiled.hpp) the router losses' CPU entry points are declared
// extern here, so that a unit including this header does not instantiate them again.
#pragma once

#include "../core/config.hpp"
#include "../core/compiled.hpp"

#include "cpu/executor.hpp"
#include "cpu/row_engine.hpp"
#include "cpu/segmented_rows.hpp"
#include "../losses/entropy.hpp"
#include "../losses/importance.hpp"
#include "../losses/load_balancing.hpp"
#include "../losses/variance.hpp"
#include "../losses/z_loss.hpp"

MOEREG_NAMESPACE_BEGIN
// Declared extern when this unit links moereg::compiled (core/compiled.hpp).
MOEREG_DETAIL_EXTERN_ROUTER(load_balancing_loss, load_balancing_inputs)
MOEREG_DETAIL_EXTERN_ROUTER(z_loss, z_loss_inputs)
MOEREG_DETAIL_EXTERN_ROUTER(entropy_loss, entropy_inputs)
MOEREG_DETAIL_EXTERN_ROUTER(importance_loss, importance_inputs)
MOEREG_DETAIL_EXTERN_ROUTER(variance_loss, variance_inputs)
MOEREG_NAMESPACE_END
