// The CPU Gram engine: runs every Gram-based activation loss (specialization, orthogonality,
// and any loss described the same way, losses/gram.hpp) from its per-token kernel.
//
// For every unmasked token with n >= 2 valid slots: a Gram pass forms the n x n Gram matrix G
// of the token's valid vectors, the loss's kernel gives F_t and dF_t/dG, and a gradient pass
// writes grad_s = sum_r (W[s][r] + W[r][s]) h_r for every valid slot. The passes are register
// tiled and specialised at compile time for 2 to 8 contiguous valid slots (AVX-512 when
// MOEREG_HAS_AVX512, 16-byte vectors otherwise), with a run-time-n pass in fixed blocks for
// more slots or strided vectors. The specialisations are unrolled only over compile-time
// counts, which keeps a translation unit that uses both Gram losses compiling in a few seconds.
//
// Passes over memory (value_and_grad): activations read once, gradient written once. Per
// token, the Gram pass reads the token's valid vectors once; the gradient pass re-reads the
// same vectors (then resident in L1/L2: k * d * sizeof(T) bytes) and writes each gradient
// vector once. topk and mask are read once per token. Nothing proportional to T * k * d is
// allocated: the only buffer is one partial sum per block of 256 tokens. In overwrite mode a
// gradient of 32 MiB or more is written with non-temporal stores (AVX-512 builds, aligned
// contiguous vectors; detail::gram_cpu_policy), which saves the read-for-ownership of its
// cache lines; smaller ones are written normally and stay cached for their consumer.
//
// Gradient: written through the grad view's own layout (same policy type as the input, its
// own maps and strides). Overwrite mode writes zeros into every vector the grad layout holds
// for a masked token, a dropped slot, or a token with fewer than 2 valid slots; accumulate
// mode leaves those untouched. Storage the layout maps to no (token, slot) is never touched.
#pragma once

#include "internal.hpp"  // refuses direct inclusion; core/config.hpp

#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#if MOEREG_HAS_AVX512
#include <immintrin.h>
#endif

#include "../../core/layouts.hpp"
#include "../../core/types.hpp"
#include "../../core/views.hpp"
#include "../../losses/gram.hpp"
#include "../../math/reduce.hpp"
#include "executor.hpp"

MOEREG_NAMESPACE_BEGIN

namespace detail {

// ---------------------------------------------------------------------------------------------
// Register packs: one chunk of a vector in registers. The width is 64 bytes of accumulator
// type (16 floats or 8 doubles). All layouts, strides and tails go through the same pack
// arithmetic in the same order, so a token gives bitwise the same result in every layout.

/// The portable pack: 64 bytes of Acc as four 16-byte GNU vectors where the compiler has the
/// vector extension (each operation is then four vector statements, which every target lowers
/// directly to its registers; 16 bytes is the width every x86-64 and AArch64 CPU has, so no
/// argument ever needs a wider ABI), or as width scalars the compiler vectorises otherwise.
/// Either way the parts are operated on one by one and every lane is computed alone, so both
/// forms give the same bits.
template <class Acc>
struct pack_portable {
  using acc_type = Acc;
  static constexpr int width = 64 / static_cast<int>(sizeof(Acc));
#if MOEREG_HAS_VECTOR_EXT
  static constexpr int parts = 4;
  typedef Acc part __attribute__((vector_size(16)));
#else
  static constexpr int parts = width;
  using part = Acc;
#endif
  struct reg {
    part v[parts];
  };
  static MOEREG_FORCEINLINE reg zero() {
    reg r;
    for (int j = 0; j < parts; ++j) r.v[j] = part{};
    return r;
  }
  static MOEREG_FORCEINLINE reg loadu(const Acc* p) {
    reg r;
    std::memcpy(&r, p, sizeof(reg));
    return r;
  }
  static MOEREG_FORCEINLINE void storeu(Acc* p, const reg& a) {
    std::memcpy(p, &a, sizeof(reg));
  }
  static MOEREG_FORCEINLINE reg fmadd(const reg& a, const reg& b, const reg& c) {
    reg r;
    for (int j = 0; j < parts; ++j) r.v[j] = a.v[j] * b.v[j] + c.v[j];
    return r;
  }
  static MOEREG_FORCEINLINE reg mul_s(Acc s, const reg& a) {
    reg r;
    for (int j = 0; j < parts; ++j) r.v[j] = s * a.v[j];
    return r;
  }
  static MOEREG_FORCEINLINE reg fmadd_s(Acc s, const reg& a, const reg& c) {
    reg r;
    for (int j = 0; j < parts; ++j) r.v[j] = s * a.v[j] + c.v[j];
    return r;
  }
  static MOEREG_FORCEINLINE reg add(const reg& a, const reg& b) {
    reg r;
    for (int j = 0; j < parts; ++j) r.v[j] = a.v[j] + b.v[j];
    return r;
  }
  /// Fixed tree: halves added until one lane is left.
  static MOEREG_FORCEINLINE Acc hsum(const reg& a) {
    Acc t[width];
    storeu(t, a);
    for (int h = width / 2; h >= 1; h /= 2)
      for (int l = 0; l < h; ++l) t[l] += t[l + h];
    return t[0];
  }
};

#if MOEREG_HAS_AVX512
struct pack_avx512_f32 {
  using acc_type = float;
  static constexpr int width = 16;
  using reg = __m512;
  static MOEREG_FORCEINLINE reg zero() { return _mm512_setzero_ps(); }
  static MOEREG_FORCEINLINE reg loadu(const float* p) { return _mm512_loadu_ps(p); }
  static MOEREG_FORCEINLINE void storeu(float* p, reg a) { _mm512_storeu_ps(p, a); }
  static MOEREG_FORCEINLINE reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static MOEREG_FORCEINLINE reg mul_s(float s, reg a) { return _mm512_mul_ps(_mm512_set1_ps(s), a); }
  static MOEREG_FORCEINLINE reg fmadd_s(float s, reg a, reg c) { return _mm512_fmadd_ps(_mm512_set1_ps(s), a, c); }
  static MOEREG_FORCEINLINE reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  // A fixed tree (halves, quarters, ...). Written with the masked intrinsics and an all-ones
  // mask: the unmasked ones start from an "undefined" register that GCC 12 reports under
  // -Wuninitialized (GCC bug 105593); the instructions are the same.
  static MOEREG_FORCEINLINE float hsum(reg a) {
    const __mmask16 all = 0xffff;
    a = _mm512_add_ps(a, _mm512_mask_shuffle_f32x4(a, all, a, a, 0x4e));
    a = _mm512_add_ps(a, _mm512_mask_shuffle_f32x4(a, all, a, a, 0xb1));
    a = _mm512_add_ps(a, _mm512_mask_permute_ps(a, all, a, 0x4e));
    a = _mm512_add_ps(a, _mm512_mask_permute_ps(a, all, a, 0xb1));
    return _mm512_cvtss_f32(a);
  }
};
struct pack_avx512_f64 {
  using acc_type = double;
  static constexpr int width = 8;
  using reg = __m512d;
  static MOEREG_FORCEINLINE reg zero() { return _mm512_setzero_pd(); }
  static MOEREG_FORCEINLINE reg loadu(const double* p) { return _mm512_loadu_pd(p); }
  static MOEREG_FORCEINLINE void storeu(double* p, reg a) { _mm512_storeu_pd(p, a); }
  static MOEREG_FORCEINLINE reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_pd(a, b, c); }
  static MOEREG_FORCEINLINE reg mul_s(double s, reg a) { return _mm512_mul_pd(_mm512_set1_pd(s), a); }
  static MOEREG_FORCEINLINE reg fmadd_s(double s, reg a, reg c) { return _mm512_fmadd_pd(_mm512_set1_pd(s), a, c); }
  static MOEREG_FORCEINLINE reg add(reg a, reg b) { return _mm512_add_pd(a, b); }
  static MOEREG_FORCEINLINE double hsum(reg a) {
    const __mmask8 all = 0xff;
    a = _mm512_add_pd(a, _mm512_mask_shuffle_f64x2(a, all, a, a, 0x4e));
    a = _mm512_add_pd(a, _mm512_mask_shuffle_f64x2(a, all, a, a, 0xb1));
    a = _mm512_add_pd(a, _mm512_mask_permute_pd(a, all, a, 0x55));
    return _mm512_cvtsd_f64(a);
  }
};
template <class T>
struct gram_pack {
  using type = pack_avx512_f32;
};
template <>
struct gram_pack<double> {
  using type = pack_avx512_f64;
};
#else
template <class T>
struct gram_pack {
  using type = pack_portable<accumulator_t<T>>;
};
#endif

/// Loads and stores of one full, contiguous chunk of storage type T. The generic version
/// converts element by element; the specialisations below convert whole registers and give
/// bitwise the same values (the 16-bit to float conversions are exact, and the float to
/// 16-bit ones round to nearest even like moereg::store).
template <class P, class T>
struct chunk_io {
  using Acc = typename P::acc_type;
  using reg = typename P::reg;
  static MOEREG_FORCEINLINE reg load(const T* p) {
    Acc buf[P::width];
    for (int l = 0; l < P::width; ++l) buf[l] = moereg::load(p[l]);
    return P::loadu(buf);
  }
  static MOEREG_FORCEINLINE void store(T* p, reg v, bool accumulate) {
    Acc buf[P::width];
    P::storeu(buf, v);
    for (int l = 0; l < P::width; ++l) put_grad(p[l], buf[l], accumulate);
  }
  /// Overwrite with a non-temporal store where the instruction set has one (p aligned to
  /// a whole chunk); a plain store otherwise.
  static MOEREG_FORCEINLINE void stream(T* p, reg v) { store(p, v, false); }
};
template <class Acc>
struct chunk_io<pack_portable<Acc>, Acc> {
  using P = pack_portable<Acc>;
  using reg = typename P::reg;
  static MOEREG_FORCEINLINE reg load(const Acc* p) { return P::loadu(p); }
  static MOEREG_FORCEINLINE void store(Acc* p, const reg& v, bool accumulate) {
    P::storeu(p, accumulate ? P::add(P::loadu(p), v) : v);
  }
  static MOEREG_FORCEINLINE void stream(Acc* p, const reg& v) { P::storeu(p, v); }
};
#if MOEREG_HAS_AVX512
template <>
struct chunk_io<pack_avx512_f32, float> {
  static MOEREG_FORCEINLINE __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  static MOEREG_FORCEINLINE void store(float* p, __m512 v, bool accumulate) {
    _mm512_storeu_ps(p, accumulate ? _mm512_add_ps(_mm512_loadu_ps(p), v) : v);
  }
  static MOEREG_FORCEINLINE void stream(float* p, __m512 v) { _mm512_stream_ps(p, v); }
};
template <>
struct chunk_io<pack_avx512_f64, double> {
  static MOEREG_FORCEINLINE __m512d load(const double* p) { return _mm512_loadu_pd(p); }
  static MOEREG_FORCEINLINE void store(double* p, __m512d v, bool accumulate) {
    _mm512_storeu_pd(p, accumulate ? _mm512_add_pd(_mm512_loadu_pd(p), v) : v);
  }
  static MOEREG_FORCEINLINE void stream(double* p, __m512d v) { _mm512_stream_pd(p, v); }
};
template <>
struct chunk_io<pack_avx512_f32, bfloat16> {
  // bfloat16 -> float is a 16-bit left shift of the bits. (Masked intrinsics with an all-ones
  // mask throughout: see pack_avx512_f32::hsum.)
  static MOEREG_FORCEINLINE __m512 from_bits(__m256i b) {
    const __mmask16 all = 0xffff;
    const __m512i z = _mm512_setzero_si512();
    return _mm512_castsi512_ps(_mm512_mask_slli_epi32(z, all, _mm512_mask_cvtepu16_epi32(z, all, b), 16));
  }
  // float -> bfloat16, round to nearest even; NaN becomes the quiet NaN 0x7fc0 with the sign
  // kept (the same bits as Eigen's scalar conversion).
  static MOEREG_FORCEINLINE __m256i to_bits(__m512 v) {
    const __mmask16 all = 0xffff;
    const __m512i z = _mm512_setzero_si512();
    const __m512i u = _mm512_castps_si512(v);
    const __m512i hi = _mm512_mask_srli_epi32(z, all, u, 16);
    const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
    const __m512i rounded =
        _mm512_mask_srli_epi32(z, all, _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __m512i qnan = _mm512_or_si512(_mm512_and_si512(hi, _mm512_set1_epi32(0x8000)), _mm512_set1_epi32(0x7fc0));
    return _mm512_mask_cvtepi32_epi16(_mm256_setzero_si256(), all, _mm512_mask_blend_epi32(nan, rounded, qnan));
  }
  static MOEREG_FORCEINLINE __m512 load(const bfloat16* p) {
    return from_bits(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static MOEREG_FORCEINLINE void store(bfloat16* p, __m512 v, bool accumulate) {
    if (accumulate) v = _mm512_add_ps(load(p), v);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bits(v));
  }
  static MOEREG_FORCEINLINE void stream(bfloat16* p, __m512 v) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_bits(v));
  }
};
template <>
struct chunk_io<pack_avx512_f32, half> {
  static MOEREG_FORCEINLINE __m512 load(const half* p) {
    return _mm512_mask_cvtph_ps(_mm512_setzero_ps(), 0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static MOEREG_FORCEINLINE __m256i to_bits(__m512 v) {
    return _mm512_mask_cvtps_ph(_mm256_setzero_si256(), 0xffff, v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static MOEREG_FORCEINLINE void store(half* p, __m512 v, bool accumulate) {
    if (accumulate) v = _mm512_add_ps(load(p), v);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bits(v));
  }
  static MOEREG_FORCEINLINE void stream(half* p, __m512 v) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_bits(v));
  }
};
#endif

/// A strided or partial chunk: `count` elements `stride` apart, zero-filled to a full pack.
template <class P, class T>
MOEREG_FORCEINLINE typename P::reg load_gather(const T* p, index_t stride, int count) {
  typename P::acc_type buf[P::width];
  for (int l = 0; l < P::width; ++l) buf[l] = l < count ? moereg::load(p[l * stride]) : typename P::acc_type(0);
  return P::loadu(buf);
}
template <class P, class T>
MOEREG_FORCEINLINE void store_scatter(T* p, index_t stride, int count, typename P::reg v, bool accumulate) {
  typename P::acc_type buf[P::width];
  P::storeu(buf, v);
  for (int l = 0; l < count; ++l) put_grad(p[l * stride], buf[l], accumulate);
}

/// Asks for the cache line at p ahead of use (into L2: the current token's vectors own L1).
MOEREG_FORCEINLINE void prefetch_l2(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, 2);
#else
  (void)p;
#endif
}

/// Orders the non-temporal stores of this thread before its later stores (they are weakly
/// ordered); called once per block that streamed.
MOEREG_FORCEINLINE void stream_fence() {
#if MOEREG_HAS_AVX512
  _mm_sfence();
#endif
}

template <class T>
void zero_vector(T* p, index_t d, index_t stride) {
  for (index_t i = 0; i < d; ++i) store(p[i * stride], accumulator_t<T>(0));
}

// ---------------------------------------------------------------------------------------------
// The two per-token passes, in two forms that give bitwise the same results:
// - specialised (gram_pass<N>, apply_pass<N>): a compile-time number N = 2..8 of contiguous
//   vectors, the loops unrolled and the accumulators in registers;
// - run-time (gram_pass_rt, apply_pass_rt): any n <= math::max_slots and any element stride,
//   the work cut into fixed blocks (4 x 4 pairs, 4 outputs) whose loops are compile-time, so
//   nothing is unrolled over a run-time count (cheap to compile, registers still suffice).
// Both form every dot product and every output in the same order: one accumulator per pair or
// output, the chunks in order, a zero-filled tail chunk, the same horizontal sum. So a token
// gives the same bits whichever path, layout or stride it takes.

/// One sweep of the specialised Gram pass: G[a][b] = G[b][a] = <x_a, x_b> for a in [A0, A1),
/// b <= a, over contiguous vectors. ld: the leading dimension of G.
template <int A0, int A1, class P, class T>
MOEREG_FORCEINLINE void gram_sweep(const T* const* x, index_t d, typename P::acc_type* G, int ld, const T* const* pf,
                                   int npf) {
  using reg = typename P::reg;
  constexpr int W = P::width;
  constexpr int np = A1 * (A1 + 1) / 2 - A0 * (A0 + 1) / 2;
  reg acc[np];
  MOEREG_UNROLL
  for (int p = 0; p < np; ++p) acc[p] = P::zero();
  reg v[A1];
  auto accumulate = [&]() {
    int p = 0;
    MOEREG_UNROLL
    for (int a = A0; a < A1; ++a) {
      MOEREG_UNROLL
      for (int b = 0; b <= a; ++b, ++p) acc[p] = P::fmadd(v[a], v[b], acc[p]);
    }
  };
  index_t i = 0;
  for (; i + W <= d; i += W) {
    for (int r = 0; r < npf; ++r) prefetch_l2(pf[r] + i);
    MOEREG_UNROLL
    for (int r = 0; r < A1; ++r) v[r] = chunk_io<P, T>::load(x[r] + i);
    accumulate();
  }
  if (i < d) {
    const int rest = static_cast<int>(d - i);
    for (int r = 0; r < A1; ++r) v[r] = load_gather<P>(x[r] + i, 1, rest);
    accumulate();
  }
  int p = 0;
  MOEREG_UNROLL
  for (int a = A0; a < A1; ++a) {
    MOEREG_UNROLL
    for (int b = 0; b <= a; ++b, ++p) G[a * ld + b] = G[b * ld + a] = P::hsum(acc[p]);
  }
  MOEREG_KEEP_STORES(G);  // GCC 12 at -O1 lost these stores (core/config.hpp)
}

/// G[a][b] = <x_a, x_b> for N contiguous vectors, both triangles filled (leading dimension N).
/// More than 6 vectors would need more accumulators than there are registers; the pairs are
/// then formed in two sweeps (a < 6, then a >= 6), the second re-reading the first 6 vectors
/// from cache.
template <int N, class P, class T>
void gram_pass(const T* const* x, index_t d, typename P::acc_type* G, const T* const* pf, int npf) {
  static_assert(N >= 1 && N <= 8, "the specialised Gram pass covers 1 to 8 vectors");
  if constexpr (N > 6) {
    gram_sweep<0, 6, P>(x, d, G, N, pf, npf);
    gram_sweep<6, N, P>(x, d, G, N, pf, 0);
  } else {
    gram_sweep<0, N, P>(x, d, G, N, pf, npf);
  }
}

/// One chunk of `rest` elements (W for a full one) of a vector `stride` apart.
template <class P, bool Contig, class T>
MOEREG_FORCEINLINE typename P::reg load_chunk(const T* p, index_t stride, int rest) {
  if constexpr (Contig)
    if (rest == P::width) return chunk_io<P, T>::load(p);
  return load_gather<P>(p, stride, rest);
}

/// The run-time Gram pass: G as gram_pass gives it, for 1 <= n <= math::max_slots vectors with
/// element stride `stride` (1 when Contig). The lower triangle is covered by 4 x 4 blocks of
/// pairs, each one sweep over the chunks with 16 accumulators; block rows past n repeat the
/// last vector and are not stored.
template <class P, bool Contig, class T>
void gram_pass_rt(int n, const T* const* x, index_t d, index_t stride, typename P::acc_type* G, const T* const* pf,
                  int npf) {
  using reg = typename P::reg;
  constexpr int W = P::width, B = 4;
  for (int a0 = 0; a0 < n; a0 += B)
    for (int b0 = 0; b0 <= a0; b0 += B) {
      const T* xa[B];
      const T* xb[B];
      MOEREG_UNROLL
      for (int j = 0; j < B; ++j) {
        xa[j] = x[a0 + j < n ? a0 + j : n - 1];
        xb[j] = x[b0 + j < n ? b0 + j : n - 1];
      }
      reg acc[B * B];
      MOEREG_UNROLL
      for (int p = 0; p < B * B; ++p) acc[p] = P::zero();
      const int nf = a0 == 0 ? npf : 0;  // the next token's lines are asked for once
      for (index_t i = 0; i < d; i += W) {
        const int rest = d - i < W ? static_cast<int>(d - i) : W;
        for (int r = 0; r < nf; ++r) prefetch_l2(pf[r] + i * stride);
        reg va[B], vb[B];
        MOEREG_UNROLL
        for (int j = 0; j < B; ++j) {
          va[j] = load_chunk<P, Contig>(xa[j] + i * stride, stride, rest);
          vb[j] = load_chunk<P, Contig>(xb[j] + i * stride, stride, rest);
        }
        MOEREG_UNROLL
        for (int ia = 0; ia < B; ++ia) {
          MOEREG_UNROLL
          for (int ib = 0; ib < B; ++ib) acc[ia * B + ib] = P::fmadd(va[ia], vb[ib], acc[ia * B + ib]);
        }
      }
      for (int ia = 0; ia < B && a0 + ia < n; ++ia)
        for (int ib = 0; ib < B && b0 + ib <= a0 + ia; ++ib) {
          const int a = a0 + ia, b = b0 + ib;
          G[a * n + b] = G[b * n + a] = P::hsum(acc[ia * B + ib]);
        }
    }
  MOEREG_KEEP_STORES(G);
}

/// One output chunk of `rest` elements: a non-temporal store (Stream), a contiguous store or a
/// scatter `stride` apart.
template <class P, bool Contig, bool Stream, class T>
MOEREG_FORCEINLINE void store_chunk(T* p, index_t stride, int rest, typename P::reg o, bool accumulate) {
  if constexpr (Contig) {
    if (rest == P::width) {
      if constexpr (Stream)
        chunk_io<P, T>::stream(p, o);
      else
        chunk_io<P, T>::store(p, o, accumulate);
      return;
    }
  }
  store_scatter<P>(p, stride, rest, o, accumulate);
}

/// g_s (+)= sum_r Wm[s][r] x_r for N contiguous vectors. Stream (overwrite mode, every g_s
/// aligned to a whole chunk): full chunks are written with non-temporal stores.
template <int N, class P, bool Stream, class T, class GT>
void apply_pass(const T* const* x, GT* const* g, index_t d, const typename P::acc_type* Wm, bool accumulate,
                const T* const* pf, int npf) {
  using Acc = typename P::acc_type;
  using reg = typename P::reg;
  constexpr int W = P::width;
  Acc w[N * N];  // a private copy: the compiler need not reload it after every store
  for (int i = 0; i < N * N; ++i) w[i] = Wm[i];
  reg v[N];
  index_t i = 0;
  for (; i + W <= d; i += W) {
    for (int r = 0; r < npf; ++r) prefetch_l2(pf[r] + i);
    MOEREG_UNROLL
    for (int r = 0; r < N; ++r) v[r] = chunk_io<P, T>::load(x[r] + i);
    MOEREG_UNROLL
    for (int s = 0; s < N; ++s) {
      reg o = P::mul_s(w[s * N], v[0]);
      MOEREG_UNROLL
      for (int r = 1; r < N; ++r) o = P::fmadd_s(w[s * N + r], v[r], o);
      store_chunk<P, true, Stream>(g[s] + i, 1, W, o, accumulate);
    }
  }
  if (i < d) {  // the tail: the same arithmetic, loops left rolled
    const int rest = static_cast<int>(d - i);
    for (int r = 0; r < N; ++r) v[r] = load_gather<P>(x[r] + i, 1, rest);
    for (int s = 0; s < N; ++s) {
      reg o = P::mul_s(w[s * N], v[0]);
      for (int r = 1; r < N; ++r) o = P::fmadd_s(w[s * N + r], v[r], o);
      store_scatter<P>(g[s] + i, 1, rest, o, accumulate);
    }
  }
}

/// The run-time gradient pass: apply_pass for 1 <= n <= math::max_slots vectors, input and
/// gradient elements xstride and gstride apart (1 when Contig). The outputs go in blocks of 4,
/// each a sweep over the chunks with the inputs in order; block rows past n are not stored.
template <class P, bool Contig, bool Stream, class T, class GT>
void apply_pass_rt(int n, const T* const* x, GT* const* g, index_t d, index_t xstride, index_t gstride,
                   const typename P::acc_type* Wm, bool accumulate, const T* const* pf, int npf) {
  using Acc = typename P::acc_type;
  using reg = typename P::reg;
  constexpr int W = P::width, B = 4;
  for (int s0 = 0; s0 < n; s0 += B) {
    Acc w[B][math::max_slots];
    MOEREG_UNROLL
    for (int j = 0; j < B; ++j) {
      const int s = s0 + j < n ? s0 + j : n - 1;
      for (int r = 0; r < n; ++r) w[j][r] = Wm[s * n + r];
    }
    const int nf = s0 == 0 ? npf : 0;
    for (index_t i = 0; i < d; i += W) {
      const int rest = d - i < W ? static_cast<int>(d - i) : W;
      for (int r = 0; r < nf; ++r) prefetch_l2(pf[r] + i * xstride);
      reg o[B];
      reg v = load_chunk<P, Contig>(x[0] + i * xstride, xstride, rest);
      MOEREG_UNROLL
      for (int j = 0; j < B; ++j) o[j] = P::mul_s(w[j][0], v);
      for (int r = 1; r < n; ++r) {
        v = load_chunk<P, Contig>(x[r] + i * xstride, xstride, rest);
        MOEREG_UNROLL
        for (int j = 0; j < B; ++j) o[j] = P::fmadd_s(w[j][r], v, o[j]);
      }
      for (int j = 0; j < B && s0 + j < n; ++j)
        store_chunk<P, Contig, Stream>(g[s0 + j] + i * gstride, gstride, rest, o[j], accumulate);
    }
  }
}

/// G for n vectors: the specialised pass for contiguous 2..8 vectors, the run-time one
/// otherwise.
template <class P, bool Contig, class T>
void gram_dispatch(int n, const T* const* x, index_t d, index_t stride, typename P::acc_type* G, const T* const* pf,
                   int npf) {
  if constexpr (Contig) {
    switch (n) {
      case 2:
        return gram_pass<2, P>(x, d, G, pf, npf);
      case 3:
        return gram_pass<3, P>(x, d, G, pf, npf);
      case 4:
        return gram_pass<4, P>(x, d, G, pf, npf);
      case 5:
        return gram_pass<5, P>(x, d, G, pf, npf);
      case 6:
        return gram_pass<6, P>(x, d, G, pf, npf);
      case 7:
        return gram_pass<7, P>(x, d, G, pf, npf);
      case 8:
        return gram_pass<8, P>(x, d, G, pf, npf);
      default:
        break;
    }
  }
  gram_pass_rt<P, Contig>(n, x, d, stride, G, pf, npf);
}

/// The gradient pass for n vectors, dispatched like gram_dispatch.
template <class P, bool Contig, bool Stream, class T, class GT>
void apply_dispatch(int n, const T* const* x, GT* const* g, index_t d, index_t xs, index_t gs,
                    const typename P::acc_type* Wm, bool accumulate, const T* const* pf, int npf) {
  static_assert(Contig || !Stream, "non-temporal stores need contiguous vectors");
  if constexpr (Contig) {
    switch (n) {
      case 2:
        return apply_pass<2, P, Stream>(x, g, d, Wm, accumulate, pf, npf);
      case 3:
        return apply_pass<3, P, Stream>(x, g, d, Wm, accumulate, pf, npf);
      case 4:
        return apply_pass<4, P, Stream>(x, g, d, Wm, accumulate, pf, npf);
      case 5:
        return apply_pass<5, P, Stream>(x, g, d, Wm, accumulate, pf, npf);
      case 6:
        return apply_pass<6, P, Stream>(x, g, d, Wm, accumulate, pf, npf);
      case 7:
        return apply_pass<7, P, Stream>(x, g, d, Wm, accumulate, pf, npf);
      case 8:
        return apply_pass<8, P, Stream>(x, g, d, Wm, accumulate, pf, npf);
      default:
        break;
    }
  }
  apply_pass_rt<P, Contig, Stream>(n, x, g, d, xs, gs, Wm, accumulate, pf, npf);
}

/// Tuning of the CPU executor of the Gram-based losses, a plain struct (like CUB's policies);
/// gram_loss_run takes another as its first template argument.
struct gram_cpu_policy {
  /// In overwrite mode, a gradient of at least this many bytes (T * k * d elements of its storage type) is
  /// written with non-temporal stores (AVX-512 builds, contiguous vectors aligned to 64 bytes,
  /// or 32 for 16-bit types). They bypass the caches and so save the read-for-ownership of
  /// every gradient line, a third of the memory traffic, when the gradient is too large to stay
  /// cached for its consumer anyway. Smaller gradients are written normally and stay cached.
  static constexpr index_t stream_min_bytes = index_t(32) << 20;
};

/// The CPU executor of a Gram-based loss. For every unmasked token with n >= 2 valid slots:
/// the Gram pass, token_fn(n, G, W) -> F_t (W = null for the value only), W scaled by
/// scale * grad_scale, the gradient pass. Returns scale * sum_t F_t, summed per block of
/// cpu_block_rows tokens and then pairwise over blocks (thread-count independent). scale = 0
/// (T_v = 0) gives 0 and, in overwrite mode, an all-zero gradient. Inputs must be validated.
template <class Policy = gram_cpu_policy, class T, class Layout, class GT, class TokenFn>
double gram_loss_run(const cpu& be, const activation_view<const T, Layout>& x, const topk_view& I,
                     const mask_view& mask, const activation_view<GT, Layout>* grad, grad_options opts, double scale,
                     TokenFn token_fn) {
  using Acc = accumulator_t<T>;
  using P = typename gram_pack<T>::type;
  constexpr int K = math::max_slots;
  const index_t ntok = I.rows, k = I.k, d = x.layout.dim();
  const index_t xs = x.layout.stride(), gs = grad ? grad->layout.stride() : 1;
  const bool live = scale != 0.0;
  const Acc gcoef = static_cast<Acc>(scale * opts.grad_scale);
  const index_t nb = num_blocks(ntok, cpu_block_rows);
  std::vector<Acc> partial(static_cast<std::size_t>(nb), Acc(0));
  const bool contig = xs == 1 && gs == 1;
  // Non-temporal stores exist in the AVX-512 packs only; elsewhere the streaming variant of
  // the gradient pass would be the plain one, so it is not instantiated.
  constexpr bool can_stream = MOEREG_HAS_AVX512 != 0;
  const bool stream = can_stream && grad && !opts.accumulate && contig &&
                      ntok * k * d * static_cast<index_t>(sizeof(GT)) >= Policy::stream_min_bytes;
  constexpr std::uintptr_t chunk_bytes = static_cast<std::uintptr_t>(P::width) * sizeof(GT);

  auto run = [&](auto contig_tag) {
    constexpr bool C = decltype(contig_tag)::value;
    parallel_blocks(be, ntok, cpu_block_rows, [&](index_t b, index_t r0, index_t r1) {
      // The valid vectors of the current token and of the next one, whose memory is
      // prefetched while the current token is processed.
      const T* xbuf[2][K];
      int sbuf[2][K];
      GT* gv[K];
      Acc G[K * K], Wm[K * K];
      Acc sum = Acc(0);
      auto collect = [&](index_t t, const T** xv, int* slot) {
        int n = 0;
        if (live && mask(t))
          for (index_t s = 0; s < k; ++s)
            if (I(t, s) >= 0) {
              xv[n] = x.data + x.layout.offset(t, s);
              slot[n++] = static_cast<int>(s);
            }
        return n >= 2 ? n : 0;  // fewer than 2 valid slots: no pair, zero gradient
      };
      int cur = 0;
      int n = r0 < r1 ? collect(r0, xbuf[0], sbuf[0]) : 0;
      for (index_t t = r0; t < r1; ++t) {
        const T* const* xv = xbuf[cur];
        const int* slot = sbuf[cur];
        const int n_next = t + 1 < r1 ? collect(t + 1, xbuf[1 - cur], sbuf[1 - cur]) : 0;
        const int npf = C ? n_next : 0;
        if (n > 0) {
          gram_dispatch<P, C>(n, xv, d, xs, G, xbuf[1 - cur], grad ? 0 : npf);
          sum += token_fn(n, static_cast<const Acc*>(G), grad ? Wm : static_cast<Acc*>(nullptr));
          if (grad) {
            for (int i = 0; i < n * n; ++i) Wm[i] *= gcoef;
            for (int i = 0; i < n; ++i) gv[i] = grad->data + grad->layout.offset(t, slot[i]);
            bool aligned = stream;
            for (int i = 0; i < n; ++i) aligned = aligned && reinterpret_cast<std::uintptr_t>(gv[i]) % chunk_bytes == 0;
            bool streamed = false;
            if constexpr (C && can_stream) {
              if (aligned) {
                apply_dispatch<P, true, true>(n, xv, gv, d, xs, gs, Wm, false, xbuf[1 - cur], npf);
                streamed = true;
              }
            }
            if (!streamed) apply_dispatch<P, C, false>(n, xv, gv, d, xs, gs, Wm, opts.accumulate, xbuf[1 - cur], npf);
          }
        }
        if (grad && !opts.accumulate) {
          for (index_t s = 0, next = 0; s < k; ++s) {
            if (next < n && slot[next] == s) {
              ++next;
              continue;
            }
            const index_t o = grad->layout.offset(t, s);
            if (o >= 0) zero_vector(grad->data + o, d, gs);
          }
        }
        cur = 1 - cur;
        n = n_next;
      }
      if (stream) stream_fence();
      partial[static_cast<std::size_t>(b)] = sum;
    });
  };
  if (contig)
    run(std::true_type{});
  else
    run(std::false_type{});
  return scale * static_cast<double>(pairwise_sum(partial.data(), nb));
}

/// A visitor for is_gram_loss's probe of visit_gram_kernel.
struct gram_kernel_probe {
  template <class Kernel>
  double operator()(double, Kernel) const {
    return 0.0;
  }
};

/// True for a loss the Gram engine runs: one whose header describes a Gram kernel.
template <class Loss, class In, class = void>
struct is_gram_loss : std::false_type {};
template <class Loss, class In>
struct is_gram_loss<Loss, In,
                    std::void_t<decltype(visit_gram_kernel(std::declval<const Loss&>(), std::declval<const In&>(), 0.0,
                                                           gram_kernel_probe{}))>> : std::true_type {};
template <class Loss, class In>
using enable_gram_loss = std::enable_if_t<is_gram_loss<Loss, In>::value, int>;

}  // namespace detail

/// CPU backend of a Gram loss's value(), backward() and value_and_grad() (found by ADL):
/// validates, runs the Gram engine with the loss's kernel, returns the value and, when `grad`
/// is not null, writes the gradient per `opts`.
template <class Loss, class In, class G, detail::enable_gram_loss<Loss, In> = 0>
double execute(const cpu& be, const Loss& loss, const In& in, stats_view reduced, const G* grad, grad_options opts) {
  detail::check_scalars(Loss::label, loss.cfg.coef, opts, be.threads);
  validate_on_host(Loss::label, loss, in, reduced, grad);
  return visit_gram_kernel(loss, in, detail::gram_tv(in.topk, in.mask, reduced), [&](double scale, auto kernel) {
    return detail::gram_loss_run(be, in.acts, in.topk, in.mask, grad, opts, scale, kernel);
  });
}

/// CPU backend of a Gram loss's local_stats() (found by ADL): validates, then writes the
/// statistics [T_v] to `out`.
template <class Loss, class In, detail::enable_gram_loss<Loss, In> = 0>
void execute_stats(const cpu& be, const Loss& loss, const In& in, double* out) {
  detail::check_scalars(Loss::label, loss.cfg.coef, grad_options{}, be.threads);
  validate_on_host(Loss::label, loss, in, stats_view{}, static_cast<const detail::grad_view_t<In>*>(nullptr));
  out[0] = static_cast<double>(detail::count_valid(in.mask, in.topk.rows));
}

MOEREG_NAMESPACE_END
