// moereg: Mixture-of-Experts regularization losses. Apache-2.0.
#pragma once

#define MOEREG_VERSION_MAJOR 0
#define MOEREG_VERSION_MINOR 1
#define MOEREG_VERSION_PATCH 0

/// The version as one integer, MAJOR * 10000 + MINOR * 100 + PATCH.
#define MOEREG_VERSION (MOEREG_VERSION_MAJOR * 10000 + MOEREG_VERSION_MINOR * 100 + MOEREG_VERSION_PATCH)
