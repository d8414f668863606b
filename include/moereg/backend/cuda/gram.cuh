// The CUDA engine of the Gram-based activation losses: intra-layer specialization
// (losses/specialization.hpp, LOSSES.md section 3) and orthogonality (losses/orthogonality.hpp,
// section 5), alone or both on the same activations (moereg::gram_fused).
//
// Include <moereg/backend/cuda.hpp>, not this file.
//
// The per-token k x k math is math/pairwise.hpp's MOEREG_HOST_DEVICE code, the very functions
// the CPU executor calls: math::specialization_token, math::orthogonality_pairwise_token,
// math::orthogonality_subspace_token. Kernels:
//   0. keys    (map layouts only) every (token, slot) entry of the activation map and of the
//              gradient map is range-checked and counted in a workspace array (integer
//              atomics; the arrays are cleared with cudaMemsetAsync first), so that two slots
//              sharing a vector are detected.
//   1. count   one block: T_v (or the reduced T_v, checked) and each loss's scale.
//   2. tokens  a warp per token, cuda_row_block tokens per block, a template on the largest
//              slot count (2, 4, 8, 16) so that the Gram accumulators stay in registers:
//              the valid slots are collected and checked; the Gram pass (each lane sums its
//              elements in order, then a butterfly per entry) gives G; lane 0 runs the token
//              functions and scales W; the gradient pass writes
//              grad_s = sum_r W[s][r] h_r (r ascending, as the CPU) once per valid vector.
//              Overwrite mode writes zeros into every other vector the gradient layout holds
//              for the token (masked tokens, dropped slots, tokens with fewer than 2 valid
//              slots), as the CPU executor does.
//   3. finish  one block: scale times the fixed-order sum of the block partials, per loss.
// The activations are read twice per token (Gram pass, gradient pass: the second read is
// served by L1/L2), each gradient vector written once.
//
// Device checks: top-k ids >= num_experts (when given) or repeated in a row, a valid slot with
// no vector in the layout or a map entry out of range (cuda_layout_out_of_range), two map
// entries naming one vector (cuda_layout_repeated), bad reduced statistics. The token
// concerned gets NaN in its valid gradient vectors; the value is NaN.
//
// Custom layout policies work when their offset(t, s) is MOEREG_HOST_DEVICE; their maps, if
// any, are not checked on the device (specialise detail::cuda_gram::layout_keys to add that).
//
// Stack: the orthogonality loss's subspace variant runs math::orthogonality_subspace_token on
// lane 0, whose local arrays need a per-thread stack frame of roughly 12 KB (float) to 25 KB
// (double), far above CUDA's default per-thread stack (1 KB). The runtime raises
// cudaLimitStackSize when such a kernel is launched, a device-wide operation that
// synchronises; before capturing a graph that contains the subspace variant, set the limit
// once yourself (cudaDeviceSetLimit(cudaLimitStackSize, 32 * 1024), or run one eager call).
// The other Gram kernels need about 0.6 KB (float) to 1 KB (double) for k <= 8, and 1.5 KB to
// 3.2 KB for 8 < k <= 16 (sm_90, nvcc 13); the router and coupling kernels under 0.1 KB.
#pragma once

#include "internal.cuh"  // refuses direct inclusion; core/config.hpp

#include <cmath>
#include <cstddef>
#include <limits>
#include <type_traits>

#include "../../core/layouts.hpp"
#include "../../losses/orthogonality.hpp"
#include "../../losses/specialization.hpp"
#include "../../math/pairwise.hpp"
#include "core.cuh"

MOEREG_NAMESPACE_BEGIN
namespace detail {
namespace cuda_gram {

// ---------------------------------------------------------------------------------------
// Layout maps on the device
// ---------------------------------------------------------------------------------------

/// How the entries of a layout's map are checked on the device. The primary template is a
/// layout without a map (token_major, custom layouts): nothing to check.
template <class Layout>
struct layout_keys {
  static constexpr bool has_map = false;
  static index_t num_keys(const Layout&) { return 0; }
  /// The key (a vector index in [0, num_keys)) of entry (t, s), -1 for none; flags for an
  /// entry out of range.
  __device__ static index_t key(const Layout&, index_t, index_t, int& flags) {
    (void)flags;
    return -1;
  }
};

template <>
struct layout_keys<token_major> {
  static constexpr bool has_map = false;
  static index_t num_keys(const token_major&) { return 0; }
  __device__ static index_t key(const token_major&, index_t, index_t, int&) { return -1; }
};

template <>
struct layout_keys<expert_grouped> {
  static constexpr bool has_map = true;
  static index_t num_keys(const expert_grouped& l) { return l.num_rows > 0 ? l.num_rows : 0; }
  __device__ static index_t key(const expert_grouped& l, index_t t, index_t s, int& flags) {
    const index_t r = l.row_of(t, s);
    if (r < 0) return -1;
    if (r >= l.num_rows) {
      flags |= cuda_layout_out_of_range;
      return -1;
    }
    return r;
  }
};

template <>
struct layout_keys<capacity_padded> {
  static constexpr bool has_map = true;
  static index_t num_keys(const capacity_padded& l) {
    return l.num_experts > 0 && l.capacity > 0 ? l.num_experts * l.capacity : 0;
  }
  __device__ static index_t key(const capacity_padded& l, index_t t, index_t s, int& flags) {
    const index_t e = l.expert_of(t, s), p = l.position_of(t, s);
    if (e < 0 || p < 0) return -1;
    if (e >= l.num_experts || p >= l.capacity) {
      flags |= cuda_layout_out_of_range;
      return -1;
    }
    return e * l.capacity + p;
  }
};

/// Offset of h_{t,s} for a usable entry: -1 (and flags) when the map entry is out of range,
/// names a vector shared with another entry, or the layout holds no vector.
template <class Layout>
__device__ index_t checked_offset(const Layout& l, const int* seen, index_t t, index_t s, int& flags) {
  if constexpr (layout_keys<Layout>::has_map) {
    const index_t key = layout_keys<Layout>::key(l, t, s, flags);
    if (key < 0) return -1;
    if (seen[key] != 1) {
      flags |= cuda_layout_repeated;
      return -1;
    }
  }
  return l.offset(t, s);
}

/// Counts every map entry's key into seen[] and flags out-of-range entries.
template <class Layout>
__global__ void keys_kernel(Layout l, index_t rows, index_t k, int* seen, int* flags_out) {
  const index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * k) return;
  int flags = 0;
  const index_t key = layout_keys<Layout>::key(l, i / k, i % k, flags);
  if (key >= 0) atomicAdd(&seen[key], 1);
  if (flags != 0) atomicOr(flags_out, flags);
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

template <class Acc>
struct scalars {
  int flags;        // reduced-statistics and key flags
  double scale[2];  // per loss (0: specialization, 1: orthogonality): value = scale * sum F
  Acc gcoef[2];     // (Acc)(scale * grad_scale)
  int live[2];      // scale != 0
};

template <class T, class Layout, class Acc>
struct plan {
  activation_view<const T, Layout> x;
  activation_view<T, Layout> g;
  topk_view I;
  mask_view mask;
  index_t rows, k, d, xstride, gstride, num_experts;
  bool has_grad, accumulate, stats_mode;
  bool use[2];  // specialization, orthogonality present
  double sp_coef;
  orthogonality_config or_cfg;  // its scale: orthogonality_scale, the CPU's function
  Acc eps[2];
  bool sp_mean, or_subspace;
  double grad_scale;
  const double* reduced[2];
  double* value[2];
  double* stats[2];
  int* status;
};

template <class Acc>
struct workspace {
  scalars<Acc>* sc = nullptr;
  Acc* partial = nullptr;  // [nb * 2]
  int* err = nullptr;      // [nb]
  int* seen_x = nullptr;   // [keys of the activation map]
  int* seen_g = nullptr;   // [keys of the gradient map]
};

template <class Acc, class Layout>
workspace<Acc> carve(workspace_carver& c, index_t rows, const Layout& xl, const Layout* gl) {
  workspace<Acc> w;
  const index_t nb = cuda_blocks(rows > 0 ? rows : 0, cuda_row_block);
  w.sc = c.take<scalars<Acc>>(1);
  w.partial = c.take<Acc>(nb * 2);
  w.err = c.take<int>(nb);
  w.seen_x = c.take<int>(layout_keys<Layout>::num_keys(xl));
  // The gradient map's size is only known with a gradient view; size it as the activation
  // map's (the gradient layout has the activation layout's type and shape).
  w.seen_g = c.take<int>(gl != nullptr ? layout_keys<Layout>::num_keys(*gl) : layout_keys<Layout>::num_keys(xl));
  return w;
}

template <class T, class Layout, class Acc>
__global__ void __launch_bounds__(cuda_tuning::threads) count_kernel(plan<T, Layout, Acc> p, workspace<Acc> w) {
  __shared__ long long scratch[cuda_tuning::threads];
  __shared__ int word;
  long long n = 0;
  if (p.mask.data == nullptr)
    n = threadIdx.x == 0 ? static_cast<long long>(p.rows) : 0;
  else
    for (index_t t = threadIdx.x; t < p.rows; t += cuda_tuning::threads) n += p.mask(t) ? 1 : 0;
  n = block_sum(n, scratch);
  int flags = 0;
  for (int j = 0; j < 2; ++j)
    if (p.use[j] && p.reduced[j] != nullptr) flags |= block_check_stats(p.reduced[j], 1, 1, &word);
  if (threadIdx.x != 0) return;
  if (p.stats_mode) {
    for (int j = 0; j < 2; ++j)
      if (p.use[j] && p.stats[j] != nullptr) p.stats[j][0] = static_cast<double>(n);
    return;
  }
  scalars<Acc> s{};
  s.flags = flags | w.sc->flags;  // the keys kernel may have flagged already
  for (int j = 0; j < 2; ++j) {
    if (!p.use[j]) continue;
    const double tv = p.reduced[j] != nullptr ? p.reduced[j][0] : static_cast<double>(n);
    // The losses' own scales (losses/specialization.hpp, losses/orthogonality.hpp).
    const double scale = j == 0 ? per_valid_token(p.sp_coef, tv) : orthogonality_scale(p.or_cfg, p.k, tv);
    s.scale[j] = scale;
    s.live[j] = scale != 0.0 ? 1 : 0;
    s.gcoef[j] = static_cast<Acc>(scale * p.grad_scale);
  }
  if (s.flags != 0)
    for (int j = 0; j < 2; ++j) s.gcoef[j] = acc_nan<Acc>();
  *w.sc = s;
}

/// The slot capacity a kernel instance is compiled for.
template <int MaxN>
struct pairs_of {
  static constexpr int value = MaxN * (MaxN + 1) / 2;
};

/// Subspace: the orthogonality loss runs its subspace variant. A separate instantiation,
/// because math::orthogonality_subspace_token needs a large per-thread stack frame (see
/// run()) that the other token functions do not.
template <class T, class Layout, class Acc, int MaxN, bool Subspace>
__global__ void __launch_bounds__(cuda_tuning::threads) tokens_kernel(plan<T, Layout, Acc> p, workspace<Acc> w) {
  __shared__ Acc sG[cuda_tuning::warps][MaxN * MaxN];
  __shared__ Acc sW[cuda_tuning::warps][MaxN * MaxN];
  __shared__ Acc part[cuda_tuning::warps][2];
  __shared__ int s_flags;
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  if (threadIdx.x == 0) s_flags = 0;
  __syncthreads();
  const scalars<Acc> sc = *w.sc;
  const bool any_live = (p.use[0] && sc.live[0] != 0) || (p.use[1] && sc.live[1] != 0);
  const index_t r0 = static_cast<index_t>(blockIdx.x) * cuda_row_block + warp * cuda_tuning::rows_per_warp;
  Acc f_acc[2] = {Acc(0), Acc(0)};
  int flags = 0;
  Acc* G = sG[warp];
  Acc* W = sW[warp];

  for (index_t it = 0; it < cuda_tuning::rows_per_warp; ++it) {
    const index_t t = r0 + it;
    if (t >= p.rows) break;
    // Collect the valid slots (every lane the same list).
    int slot[MaxN];
    index_t xo[MaxN], go[MaxN];
    int n = 0, tflags = 0;
    if (any_live && p.mask(t)) {
      for (index_t s = 0; s < p.k; ++s) {
        const index_t e = p.I(t, s);
        if (e < 0) continue;
        if (p.num_experts > 0 && e >= p.num_experts) {
          tflags |= cuda_topk_out_of_range;
          continue;
        }
        bool repeated = false;
        for (index_t r = 0; r < s; ++r) repeated = repeated || p.I(t, r) == e;
        if (repeated) {
          tflags |= cuda_topk_repeated;
          continue;
        }
        int lf = 0;
        const index_t ox = checked_offset(p.x.layout, w.seen_x, t, s, lf);
        const index_t og = p.has_grad ? checked_offset(p.g.layout, w.seen_g, t, s, lf) : 0;
        if (lf == 0 && (ox < 0 || og < 0)) lf |= cuda_layout_out_of_range;  // no vector for a valid slot
        tflags |= lf;
        if (lf != 0) continue;
        slot[n] = static_cast<int>(s), xo[n] = ox, go[n] = og;
        ++n;
      }
    }
    flags |= tflags;
    if (n < 2 && tflags == 0) n = 0;  // fewer than 2 valid slots: no pair, zero gradient

    if (n > 0 && tflags != 0) {
      // A bad slot: poison the usable vectors of this token.
      if (p.has_grad)
        for (int a = 0; a < n; ++a)
          for (index_t i = lane; i < p.d; i += 32)
            dput_grad(p.g.data + go[a] + i * p.gstride, acc_nan<Acc>(), p.accumulate);
    } else if (n > 0) {
      // Gram pass.
      Acc acc[pairs_of<MaxN>::value];
#pragma unroll
      for (int q = 0; q < pairs_of<MaxN>::value; ++q) acc[q] = Acc(0);
      for (index_t i = lane; i < p.d; i += 32) {
        Acc v[MaxN];
#pragma unroll
        for (int a = 0; a < MaxN; ++a) v[a] = a < n ? dload(p.x.data + xo[a] + i * p.xstride) : Acc(0);
        int q = 0;
#pragma unroll
        for (int a = 0; a < MaxN; ++a)
#pragma unroll
          for (int b = a; b < MaxN; ++b, ++q) acc[q] += v[a] * v[b];
      }
      {
        int q = 0;
#pragma unroll
        for (int a = 0; a < MaxN; ++a)
#pragma unroll
          for (int b = a; b < MaxN; ++b, ++q) {
            const Acc s = warp_sum(acc[q]);
            if (lane == 0 && a < n && b < n) G[a * n + b] = G[b * n + a] = s;
          }
      }
      __syncwarp();
      if (lane == 0) {
        Acc tmp[MaxN * MaxN];
        bool first = true;
        if (p.use[0] && sc.live[0] != 0) {
          const Acc f = math::specialization_token(n, G, p.eps[0], p.sp_mean, p.has_grad ? W : nullptr);
          f_acc[0] += f;
          if (p.has_grad)
            for (int i = 0; i < n * n; ++i) W[i] *= sc.gcoef[0];
          first = false;
        }
        if (p.use[1] && sc.live[1] != 0) {
          Acc* dst = p.has_grad ? (first ? W : tmp) : nullptr;
          Acc f;
          if constexpr (Subspace)
            f = math::orthogonality_subspace_token(n, G, p.eps[1], dst);
          else
            f = math::orthogonality_pairwise_token(n, G, p.eps[1], dst);
          f_acc[1] += f;
          if (p.has_grad) {
            if (first)
              for (int i = 0; i < n * n; ++i) W[i] *= sc.gcoef[1];
            else
              for (int i = 0; i < n * n; ++i) W[i] += tmp[i] * sc.gcoef[1];
          }
        }
      }
      __syncwarp();
      // Gradient pass.
      if (p.has_grad)
        for (index_t i = lane; i < p.d; i += 32) {
          Acc v[MaxN];
#pragma unroll
          for (int a = 0; a < MaxN; ++a) v[a] = a < n ? dload(p.x.data + xo[a] + i * p.xstride) : Acc(0);
#pragma unroll
          for (int s = 0; s < MaxN; ++s) {
            if (s >= n) break;
            Acc o = W[s * n] * v[0];
#pragma unroll
            for (int r = 1; r < MaxN; ++r)
              if (r < n) o += W[s * n + r] * v[r];
            dput_grad(p.g.data + go[s] + i * p.gstride, o, p.accumulate);
          }
        }
      __syncwarp();
    }
    // Overwrite: zeros into every other vector the gradient layout holds for this token.
    if (p.has_grad && !p.accumulate)
      for (index_t s = 0, next = 0; s < p.k; ++s) {
        if (next < n && slot[next] == s) {
          ++next;
          continue;
        }
        int lf = 0;
        index_t o = -1;
        if constexpr (layout_keys<Layout>::has_map) {
          const index_t key = layout_keys<Layout>::key(p.g.layout, t, s, lf);
          o = key >= 0 && w.seen_g[key] == 1 ? p.g.layout.offset(t, s) : -1;
        } else {
          o = p.g.layout.offset(t, s);
        }
        if (o >= 0)
          for (index_t i = lane; i < p.d; i += 32) dput_grad(p.g.data + o + i * p.gstride, Acc(0), false);
      }
  }
  if (lane == 0 && flags != 0) atomicOr(&s_flags, flags);
  block_warp_partials(f_acc, part, w.partial + static_cast<index_t>(blockIdx.x) * 2);
  if (threadIdx.x == 0) w.err[blockIdx.x] = s_flags;
}

template <class T, class Layout, class Acc>
__global__ void __launch_bounds__(cuda_tuning::threads)
    finish_kernel(plan<T, Layout, Acc> p, workspace<Acc> w, index_t nb) {
  __shared__ Acc scratch[cuda_tuning::threads];
  __shared__ Acc sums[2];
  __shared__ int word;
  block_column_sums(w.partial, nb, 2, sums, scratch);
  const int flags = block_or(w.err, nb, &word);
  if (threadIdx.x != 0) return;
  const scalars<Acc> sc = *w.sc;
  const int all = flags | sc.flags;
  for (int j = 0; j < 2; ++j)
    if (p.use[j]) publish(p.value[j], nullptr, sc.scale[j] * static_cast<double>(sums[j]), all);
  if (p.status != nullptr && all != 0) atomicOr(p.status, all);
}

/// What one run computes (views on the device).
/// What one loss of a run reads and writes (device memory): its reduced statistics (empty =
/// its local ones), its value and its statistics output (null = not wanted).
struct gram_io {
  stats_view reduced{};
  double* value = nullptr;
  double* stats = nullptr;
};

template <class T, class Layout>
struct request {
  activation_view<const T, Layout> acts{};
  topk_view topk{};
  mask_view mask{};
  index_t num_experts = 0;
  const activation_view<T, Layout>* grad = nullptr;
  grad_options opts{};
  bool stats_mode = false;
  const specialization_loss* sp = nullptr;
  const orthogonality_loss* orth = nullptr;
  gram_io io[2]{};  // per loss: 0 specialization, 1 orthogonality
};

template <class T, class Layout>
std::size_t required_bytes(const request<T, Layout>& rq) {
  workspace_carver c(nullptr);
  (void)carve<accumulator_t<T>>(c, rq.topk.rows, rq.acts.layout, rq.grad != nullptr ? &rq.grad->layout : nullptr);
  return c.required();
}

/// Host checks of a Gram-based loss, which read no device memory: every backend's shape checks
/// (check_gram_shapes), non-null data for a call with vectors, and the device pointers.
template <class T, class Layout>
void validate(const char* who, double coef, double eps, const request<T, Layout>& rq, stats_view reduced,
              const cuda& be) {
  const auto& I = rq.topk;
  check_gram_shapes(who, coef, eps, rq.acts, I, rq.mask, rq.num_experts, rq.grad, reduced);
  const bool any = I.rows > 0 && rq.acts.layout.dim() > 0;  // the map entries are not read on the host
  require(rq.acts.data != nullptr || !any, who, ": acts is null");
  require(rq.grad == nullptr || rq.grad->data != nullptr || !any, who, ": grad is null");
  gram_buffers(rq.acts, I, rq.mask, rq.grad,
               [&](const char* name, const void* p) { cuda_check_pointer(who, name, p, be); });
  cuda_check_pointer(who, "reduced statistics", reduced.data, be);
  require(cuda_blocks(I.rows, cuda_row_block) <= static_cast<index_t>(std::numeric_limits<int>::max()), who,
          ": too many tokens for one grid");
}

template <int MaxN, class T, class Layout, class Acc>
void launch_tokens(const plan<T, Layout, Acc>& p, const workspace<Acc>& w, index_t nb, cudaStream_t stream) {
  if (p.use[1] && p.or_subspace)
    tokens_kernel<T, Layout, Acc, MaxN, true><<<static_cast<unsigned>(nb), cuda_tuning::threads, 0, stream>>>(p, w);
  else
    tokens_kernel<T, Layout, Acc, MaxN, false><<<static_cast<unsigned>(nb), cuda_tuning::threads, 0, stream>>>(p, w);
}

template <class T, class Layout>
void run(const request<T, Layout>& rq, const cuda& be, const char* who) {
  using Acc = accumulator_t<T>;
  workspace_carver carver(be.workspace);
  const auto w = carve<Acc>(carver, rq.topk.rows, rq.acts.layout, rq.grad != nullptr ? &rq.grad->layout : nullptr);
  cuda_check_workspace(who, be, carver.required());

  plan<T, Layout, Acc> p{};
  p.x = rq.acts;
  if (rq.grad != nullptr) p.g = *rq.grad;
  p.I = rq.topk;
  p.mask = rq.mask;
  p.rows = rq.topk.rows;
  p.k = rq.topk.k;
  p.d = rq.acts.layout.dim();
  p.xstride = rq.acts.layout.stride();
  p.gstride = rq.grad != nullptr ? rq.grad->layout.stride() : 1;
  p.num_experts = rq.num_experts;
  p.stats_mode = rq.stats_mode;
  p.has_grad = rq.grad != nullptr && !rq.stats_mode;
  p.accumulate = rq.opts.accumulate;
  p.grad_scale = rq.opts.grad_scale;
  p.use[0] = rq.sp != nullptr;
  p.use[1] = rq.orth != nullptr;
  if (rq.sp != nullptr) {
    p.sp_coef = rq.sp->cfg.coef;
    p.eps[0] = static_cast<Acc>(rq.sp->cfg.eps);
    p.sp_mean = rq.sp->cfg.pairs == sp_pairs::mean;
  }
  if (rq.orth != nullptr) {
    p.or_cfg = rq.orth->cfg;
    p.eps[1] = static_cast<Acc>(rq.orth->cfg.eps);
    p.or_subspace = rq.orth->cfg.variant == ortho_variant::subspace;
  }
  for (int j = 0; j < 2; ++j) {
    p.reduced[j] = rq.io[j].reduced.data;
    p.value[j] = rq.io[j].value;
    p.stats[j] = rq.io[j].stats;
  }
  p.status = be.status;

  const dim3 block(cuda_tuning::threads);
  const index_t nb = cuda_blocks(p.rows, cuda_row_block);
  if (!rq.stats_mode) {
    // Clear the scalars' flags word and count the map keys (map layouts only).
    cuda_require(cudaMemsetAsync(w.sc, 0, sizeof(scalars<Acc>), be.stream), who, "cudaMemsetAsync");
    if constexpr (layout_keys<Layout>::has_map) {
      const index_t entries = p.rows * p.k;
      auto count_keys = [&](const Layout& l, int* seen) {
        const index_t nk = layout_keys<Layout>::num_keys(l);
        if (nk > 0)
          cuda_require(cudaMemsetAsync(seen, 0, static_cast<std::size_t>(nk) * sizeof(int), be.stream), who,
                       "cudaMemsetAsync");
        if (entries > 0) {
          keys_kernel<Layout>
              <<<static_cast<unsigned>(cuda_blocks(entries, cuda_tuning::threads)), block, 0, be.stream>>>(
                  l, p.rows, p.k, seen, &w.sc->flags);
          cuda_check_launch(who, "map check kernel");
        }
      };
      count_keys(p.x.layout, w.seen_x);
      if (p.has_grad) count_keys(p.g.layout, w.seen_g);
    }
  }
  count_kernel<T, Layout, Acc><<<1, block, 0, be.stream>>>(p, w);
  cuda_check_launch(who, "count kernel");
  if (rq.stats_mode) return;
  if (nb > 0) {
    if (p.k <= 2)
      launch_tokens<2>(p, w, nb, be.stream);
    else if (p.k <= 4)
      launch_tokens<4>(p, w, nb, be.stream);
    else if (p.k <= 8)
      launch_tokens<8>(p, w, nb, be.stream);
    else
      launch_tokens<16>(p, w, nb, be.stream);
    cuda_check_launch(who, "tokens kernel");
  }
  finish_kernel<T, Layout, Acc><<<1, block, 0, be.stream>>>(p, w, nb);
  cuda_check_launch(who, "finish kernel");
}

/// The slot of each Gram loss in a run (0 specialization, 1 orthogonality; also gram_fused's
/// value slots) and the name its CUDA errors carry.
template <class Loss>
constexpr int slot_of() {
  if constexpr (std::is_same<Loss, specialization_loss>::value)
    return 0;
  else {
    static_assert(std::is_same<Loss, orthogonality_loss>::value, "not a Gram loss");
    return 1;
  }
}
inline constexpr const char* slot_names[2] = {"specialization (cuda)", "orthogonality (cuda)"};

template <class G>
struct view_types;
template <class T, class Layout>
struct view_types<activation_view<T, Layout>> {
  using storage = T;
  using layout = Layout;
};

/// The request of `loss` alone on `in`, without outputs (all the workspace query needs).
template <class Loss, class In, class G = grad_view_t<In>>
request<typename view_types<G>::storage, typename view_types<G>::layout> single_request(const Loss& loss, const In& in,
                                                                                        const G* grad) {
  request<typename view_types<G>::storage, typename view_types<G>::layout> rq;
  rq.acts = in.acts;
  rq.topk = in.topk;
  rq.mask = in.mask;
  rq.num_experts = in.num_experts;
  rq.grad = grad;
  if constexpr (slot_of<Loss>() == 0)
    rq.sp = &loss;
  else
    rq.orth = &loss;
  return rq;
}

}  // namespace cuda_gram

/// The CUDA entries (backend/cuda/api.cuh) of the Gram losses: one engine run each.
template <class Loss>
inline constexpr bool is_gram_loss_v =
    std::is_same<Loss, specialization_loss>::value || std::is_same<Loss, orthogonality_loss>::value;

template <class Loss, class In, class G, std::enable_if_t<is_gram_loss_v<Loss>, int> = 0>
void cuda_run(const cuda& be, const Loss& loss, const In& in, stats_view reduced, const G* grad, grad_options opts,
              double* stats_out) {
  constexpr int slot = cuda_gram::slot_of<Loss>();
  const char* who = cuda_gram::slot_names[slot];
  if constexpr (slot == 1) check_ortho_config(who, loss.cfg);
  auto rq = cuda_gram::single_request(loss, in, grad);
  cuda_gram::validate(who, loss.cfg.coef, loss.cfg.eps, rq, reduced, be);
  if (stats_out != nullptr) cuda_check_stats_out(who, stats_out, loss.stats_size(in), be);
  rq.opts = opts;
  rq.stats_mode = stats_out != nullptr;
  rq.io[slot] = cuda_gram::gram_io{reduced, be.value, stats_out};
  cuda_gram::run(rq, be, who);
}
template <class Loss, class In, std::enable_if_t<is_gram_loss_v<Loss>, int> = 0>
std::size_t cuda_workspace_bytes(const Loss& loss, const In& in) {
  return cuda_gram::required_bytes(cuda_gram::single_request(loss, in, static_cast<const grad_view_t<In>*>(nullptr)));
}

}  // namespace detail
MOEREG_NAMESPACE_END
