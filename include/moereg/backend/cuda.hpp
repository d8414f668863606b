// moereg's CUDA backend: every loss of the CPU library behind the same API, selected by a
// backend value that carries a stream. Include it from a .cu file compiled by nvcc (C++17):
//
//   #include <moereg/backend/cuda.hpp>
//
//   moereg::load_balancing_loss lb;
//   moereg::load_balancing_inputs<float> in{{d_probs, T, E}, {d_topk, T, k}, {d_mask, T}};
//   moereg::cuda be;
//   be.stream = stream;
//   be.workspace_bytes = moereg::workspace_size(lb, in, be);   // the CUB convention: ask first
//   cudaMalloc(&be.workspace, be.workspace_bytes);            // the caller's allocator, once
//   be.value = d_value;                                       // double in device memory
//   be.status = d_status;                                     // int in device memory, optional
//   lb.value_and_grad(in, moereg::matrix_view<float>(d_grad, T, E), moereg::on(be));  // enqueued
//
// What changes against the CPU backend (backend/cuda/core.cuh has the full contract):
//   * every view points to device memory (also reduced statistics and statistics outputs);
//   * nothing is allocated and nothing synchronises, so a step can be captured in a CUDA graph;
//   * the value is written to *be.value on the device; the member functions return NaN;
//   * shapes are checked on the host (moereg::error); indices, offsets, layout maps and
//     reduced statistics are checked on the device and reported as cuda_status bits in
//     *be.status (NaN value and gradient entries where a bad index would have mattered);
//     moereg::cuda_read_status / cuda_clear_status read and clear it;
//   * deterministic: fixed-order block partials, no floating-point atomics.
//
// Fused entry points: moereg::router_fused (load balancing, z-loss, entropy, variance and
// importance on one [T, E] matrix) and moereg::gram_fused (specialization and orthogonality on
// one set of activations).
//
// The engines: backend/cuda/router.cuh (the [T, E] losses: load balancing, z-loss, entropy,
// variance, importance), gram.cuh (specialization, orthogonality) and coupling.cuh; a loss
// with an engine of its own has its own file (load_balancing.cuh: the sequence scope). The
// entry points are written once (backend/cuda/api.cuh). The per-row and per-token arithmetic the kernels run is the
// MOEREG_HOST_DEVICE code of math/router.hpp and math/pairwise.hpp.
//
// Build notes: Eigen 3.4, which the storage types come from, wants --expt-relaxed-constexpr
// when its headers are compiled by nvcc; its "annotation is ignored on a defaulted function"
// diagnostics (#20012) are silenced around the includes below when this header is the first
// to include Eigen. The host compiler's -Wpedantic rejects nvcc's generated line markers:
// pass the other warning flags through -Xcompiler.
#pragma once

#if !defined(__CUDACC__)
#error "moereg/backend/cuda.hpp must be compiled by nvcc (include it from a .cu file)"
#endif

#if defined(__NVCC_DIAG_PRAGMA_SUPPORT__)
#pragma nv_diagnostic push
#pragma nv_diag_suppress 20012
#endif
#include "../core/types.hpp"
#if defined(__NVCC_DIAG_PRAGMA_SUPPORT__)
#pragma nv_diagnostic pop
#endif

// The internal headers below refuse to be included without this (they are not public).
#define MOEREG_DETAIL_CUDA_BACKEND 1
#include "cuda/core.cuh"
#include "cuda/router.cuh"

#include "cuda/coupling.cuh"
#include "cuda/load_balancing.cuh"

#include "cuda/router_fused.cuh"

#include "cuda/gram.cuh"

#include "cuda/gram_fused.cuh"

#include "cuda/api.cuh"

#include "cuda/bias_update.cuh"
