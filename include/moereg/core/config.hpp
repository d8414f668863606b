// Every annotation and feature macro of the library, defined once. Each sits inside
// #ifndef so that a user can override it before the first moereg include.
#pragma once

#include "../version.hpp"

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

// Loop hints, defined here once (nvcc's front end rejects GCC loop pragmas, so they are empty
// under nvcc; CUDA kernels write `#pragma unroll` themselves):
// - MOEREG_UNROLL: unroll fully a loop with a compile-time count (the specialised Gram passes).
//   GCC needs the hint; Clang unrolls such loops anyway and warns when a hinted loop with a
//   run-time count is not unrolled, so it gets none.
// - MOEREG_ROLLED: keep a loop over lanes rolled, so that the compiler vectorises it across
//   lanes instead of unrolling it into scalar code (the subspace solver of math/pairwise.hpp).
//   Not clang's vectorize(enable): clang then warns (-Wpass-failed, an error under -Werror)
//   wherever it cannot vectorise, as at -Os; a header must not break its users' -Werror builds.
// MOEREG_HAS_VECTOR_EXT: the compiler has GNU vector extensions (GCC, Clang).
#if defined(__CUDACC__) || !defined(__GNUC__)
#define MOEREG_UNROLL
#define MOEREG_ROLLED
#elif defined(__clang__)
#define MOEREG_UNROLL
#define MOEREG_ROLLED _Pragma("clang loop unroll(disable)")
#else
#define MOEREG_UNROLL _Pragma("GCC unroll 16")
#define MOEREG_ROLLED _Pragma("GCC unroll 1") _Pragma("GCC ivdep")
#endif
#if defined(__GNUC__) || defined(__clang__)
#define MOEREG_HAS_VECTOR_EXT 1
#else
#define MOEREG_HAS_VECTOR_EXT 0
#endif

// MOEREG_KEEP_STORES(p): a compiler barrier placed right after a loop nest that writes an
// array through p with two index patterns (the symmetric G[a][b] = G[b][a] fills of the Gram
// losses). GCC 12 (seen with 12.2; 11.3 is not affected) may rewrite such a store at -O1 into
// an address with a null base and the pointer hidden in the index; its late pure-const and
// mod-ref analyses then take the store for one that writes nothing the caller can see, and the
// caller drops the call or reads the array before it was written. The empty asm statement
// with a "memory" clobber makes every store before it visible to whatever follows, inside the
// function and in its callers; it emits no instruction. docs/compiler-bugs.md has the
// reduced reproducer.
#ifndef MOEREG_KEEP_STORES
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDA_ARCH__)
#define MOEREG_KEEP_STORES(p) __asm__ __volatile__("" : : "r"(p) : "memory")
#else
#define MOEREG_KEEP_STORES(p) static_cast<void>(p)
#endif
#endif

// The ABI namespace. Every moereg name lives in an inline namespace whose name encodes the
// configuration that changes template bodies: the major version, OpenMP (MOEREG_HAS_OPENMP) and
// AVX-512 (MOEREG_HAS_AVX512), e.g. moereg::abi_v0_omp1_avx0. Two translation units of one
// program built with different settings (one with -fopenmp, one without; one with
// -march=native, one portable) then instantiate distinct symbols instead of sharing one mangled
// name whose body the linker picks at random (an AVX-512 body could end up running on a CPU
// without AVX-512). User code keeps writing moereg::name. Under nvcc the host and device passes
// must see the same names, and OpenMP and AVX-512 are host-pass settings, so CUDA translation
// units use one fixed tag (abi_v0_cuda): their host code must be built with one setting per
// program.
#define MOEREG_ABI_CAT_(a, b, c, d, e) a##b##c##d##e
#define MOEREG_ABI_CAT(a, b, c, d, e) MOEREG_ABI_CAT_(a, b, c, d, e)
#ifndef MOEREG_ABI_NAMESPACE
#if defined(__CUDACC__)
#define MOEREG_ABI_NAMESPACE MOEREG_ABI_CAT(abi_v, MOEREG_VERSION_MAJOR, _cuda, , )
#else
#define MOEREG_ABI_NAMESPACE \
  MOEREG_ABI_CAT(abi_v, MOEREG_VERSION_MAJOR, MOEREG_ABI_CAT(_omp, MOEREG_HAS_OPENMP, , , ), _avx, MOEREG_HAS_AVX512)
#endif
#endif
/// Opens namespace moereg and its ABI namespace (see MOEREG_ABI_NAMESPACE).
#define MOEREG_NAMESPACE_BEGIN \
  namespace moereg {           \
  inline namespace MOEREG_ABI_NAMESPACE {
/// Closes what MOEREG_NAMESPACE_BEGIN opened.
#define MOEREG_NAMESPACE_END \
  }                          \
  }
