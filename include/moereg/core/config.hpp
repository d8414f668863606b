// Every annotation and feature macro of the library, defined once. Each sits inside
// #ifndef so that a user can override it before the first moereg include.
#pragma once

#ifndef MOEREG_HOST_DEVICE
#if defined(__CUDACC__) || defined(__HIPCC__)
#define MOEREG_HOST_DEVICE __host__ __device__
#else
#define MOEREG_HOST_DEVICE
#endif
#endif

#ifndef MOEREG_FORCEINLINE
#if defined(_MSC_VER)
#define MOEREG_FORCEINLINE __forceinline
#else
#define MOEREG_FORCEINLINE inline __attribute__((always_inline))
#endif
#endif

#ifndef MOEREG_RESTRICT
#define MOEREG_RESTRICT __restrict__
#endif

// OpenMP is used by the CPU backend when the translation unit is compiled with it.
// Define MOEREG_NO_OPENMP to run single-threaded even then.
#if defined(_OPENMP) && !defined(MOEREG_NO_OPENMP)
#define MOEREG_HAS_OPENMP 1
#else
#define MOEREG_HAS_OPENMP 0
#endif

// AVX-512 kernels are used when the compiler targets AVX-512F (for example -march=native
// on a machine that has it). Define MOEREG_NO_AVX512 to force the portable loops.
#if defined(__AVX512F__) && !defined(MOEREG_NO_AVX512) && !defined(__CUDA_ARCH__)
#define MOEREG_HAS_AVX512 1
#else
#define MOEREG_HAS_AVX512 0
#endif
