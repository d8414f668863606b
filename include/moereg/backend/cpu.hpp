// The CPU backend: the executor (threads, blocks, element access), the row engine that runs
// every loss on one routing matrix (load balancing, z-loss, entropy, importance, variance, and
// any loss described the same way, alone or fused), the segmented engine of the
// load-balancing sequence scope, and the Gram engine of the activation losses
// (specialization, orthogonality, and any loss described the same way), and the layer engine
// of the cross-layer coupling loss.
//
// With moereg::compiled (core/compiled.hpp) these losses' CPU entry points are declared
// extern here, so that a unit including this header does not instantiate them again.
#pragma once

#include "../core/config.hpp"
#include "../core/compiled.hpp"

// The internal headers below refuse to be included without this (they are not public).
#define MOEREG_DETAIL_CPU_BACKEND 1
#include "cpu/executor.hpp"
#include "cpu/gram_engine.hpp"
#include "cpu/layer_engine.hpp"
#include "cpu/row_engine.hpp"
#include "cpu/segmented_rows.hpp"
#include "../losses/coupling.hpp"
#include "../losses/entropy.hpp"
#include "../losses/importance.hpp"
#include "../losses/load_balancing.hpp"
#include "../losses/orthogonality.hpp"
#include "../losses/specialization.hpp"
#include "../losses/variance.hpp"
#include "../losses/z_loss.hpp"

MOEREG_NAMESPACE_BEGIN
// Declared extern when this unit links moereg::compiled (core/compiled.hpp).
MOEREG_DETAIL_EXTERN_ROUTER(load_balancing_loss, load_balancing_inputs)
MOEREG_DETAIL_EXTERN_ROUTER(z_loss, z_loss_inputs)
MOEREG_DETAIL_EXTERN_ROUTER(entropy_loss, entropy_inputs)
MOEREG_DETAIL_EXTERN_ROUTER(importance_loss, importance_inputs)
MOEREG_DETAIL_EXTERN_ROUTER(variance_loss, variance_inputs)
MOEREG_DETAIL_EXTERN_ROUTER(coupling_loss, coupling_inputs)
MOEREG_DETAIL_EXTERN_ACTIVATION(specialization_loss, specialization_inputs)
MOEREG_DETAIL_EXTERN_ACTIVATION(orthogonality_loss, orthogonality_inputs)
MOEREG_NAMESPACE_END
