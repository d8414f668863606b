// The optional compiled library (CMake target moereg::compiled), the way fmt offers one beside
// its header-only mode. It holds explicit instantiations of every loss's CPU execute() and
// execute_stats() for the four storage types (float, double, moereg::half, moereg::bfloat16)
// and, for the activation losses, the three layouts (token_major, expert_grouped,
// capacity_padded). A translation unit that links moereg::compiled sees them declared
// `extern template` at the end of each loss header, so it compiles only the thin front end and
// calls the library's copy: the kernels are compiled once, in the library.
//
// The target defines MOEREG_COMPILED=1 and the configuration it was built with
// (MOEREG_COMPILED_OPENMP, MOEREG_COMPILED_AVX512; the library's own sources refuse to build
// when their configuration differs from the one they declare). A unit whose own configuration
// differs (built with -march=native against a portable library, say) gets no extern
// declarations and instantiates the headers as usual: it links and computes the same, only its
// compile time is not saved. Other storage types, layouts and the CUDA backend are always
// header-only.
#pragma once

#include "config.hpp"

#if defined(MOEREG_COMPILED) && MOEREG_COMPILED && !defined(__CUDACC__) && \
    MOEREG_HAS_OPENMP == MOEREG_COMPILED_OPENMP && MOEREG_HAS_AVX512 == MOEREG_COMPILED_AVX512
#define MOEREG_DETAIL_USE_COMPILED 1
#else
#define MOEREG_DETAIL_USE_COMPILED 0
#endif

// X(T, args...) for every storage type the library instantiates.
#define MOEREG_DETAIL_FOR_STORAGE(X, ...) \
  X(float, __VA_ARGS__) X(double, __VA_ARGS__) X(half, __VA_ARGS__) X(bfloat16, __VA_ARGS__)

// The CPU entry points of a router-side loss (inputs Inputs<T>, gradient matrix_view<T>):
// declared with kw = `extern template`, defined with kw = `template`. The template arguments
// are deduced, so the entry may be the row engine's generic one (backend/cpu/row_engine.hpp)
// or a loss's own.
#define MOEREG_DETAIL_ROUTER_ENTRY(T, kw, Loss, Inputs)                                                          \
  kw double execute(const cpu&, const Loss&, const Inputs<T>&, stats_view, const matrix_view<T>*, grad_options); \
  kw void execute_stats(const cpu&, const Loss&, const Inputs<T>&, double*);

// The CPU entry points of an activation loss (inputs Inputs<T, Layout>) for one layout, then
// for the three layouts.
#define MOEREG_DETAIL_ACTIVATION_ENTRY_L(T, kw, Loss, Inputs, Layout)                                                 \
  kw double execute(const cpu&, const Loss&, const Inputs<T, Layout>&, stats_view, const activation_view<T, Layout>*, \
                    grad_options);                                                                                    \
  kw void execute_stats(const cpu&, const Loss&, const Inputs<T, Layout>&, double*);
#define MOEREG_DETAIL_ACTIVATION_ENTRY(T, kw, Loss, Inputs)             \
  MOEREG_DETAIL_ACTIVATION_ENTRY_L(T, kw, Loss, Inputs, token_major)    \
  MOEREG_DETAIL_ACTIVATION_ENTRY_L(T, kw, Loss, Inputs, expert_grouped) \
  MOEREG_DETAIL_ACTIVATION_ENTRY_L(T, kw, Loss, Inputs, capacity_padded)

// At the end of a loss header (inside the moereg namespace): the extern declarations, when
// this unit uses the compiled library.
#if MOEREG_DETAIL_USE_COMPILED
#define MOEREG_DETAIL_EXTERN_ROUTER(Loss, Inputs) \
  MOEREG_DETAIL_FOR_STORAGE(MOEREG_DETAIL_ROUTER_ENTRY, extern template, Loss, Inputs)
#define MOEREG_DETAIL_EXTERN_ACTIVATION(Loss, Inputs) \
  MOEREG_DETAIL_FOR_STORAGE(MOEREG_DETAIL_ACTIVATION_ENTRY, extern template, Loss, Inputs)
#else
#define MOEREG_DETAIL_EXTERN_ROUTER(Loss, Inputs)
#define MOEREG_DETAIL_EXTERN_ACTIVATION(Loss, Inputs)
#endif
