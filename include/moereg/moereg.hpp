// moereg: Mixture-of-Experts regularization losses with analytic gradients.
// Umbrella header: includes the whole CPU library. The CUDA backend is opt-in through
// <moereg/backend/cuda.hpp>; the distributed adapters through <moereg/dist/mpi.hpp> and
// <moereg/dist/nccl.hpp>.
#pragma once

#include "version.hpp"

#include "core/config.hpp"
#include "core/error.hpp"
#include "core/finite.hpp"
#include "core/layouts.hpp"
#include "core/types.hpp"
#include "core/views.hpp"
#include "core/stats.hpp"

#include "backend/cpu.hpp"
#include "chain.hpp"
#include "losses/load_balancing.hpp"
#include "losses/z_loss.hpp"
#include "losses/specialization.hpp"
#include "losses/orthogonality.hpp"
#include "losses/coupling.hpp"
#include "losses/variance.hpp"
#include "losses/entropy.hpp"
#include "losses/importance.hpp"
#include "losses/fuse.hpp"
#include "losses/bias_update.hpp"
#include "metrics.hpp"
