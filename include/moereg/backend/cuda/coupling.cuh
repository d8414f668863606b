// CUDA backend of the cross-layer coupling loss (losses/coupling.hpp, LOSSES.md section 4).
//
// Include <moereg/backend/cuda.hpp>, not this file.
//
// The per-layer views (`probs`, `topk` and the gradients: host arrays of views that point to
// device memory) are copied into a table in the workspace by small kernels whose parameters
// carry them (16 layers per launch), so the run is capturable in a graph and L is unbounded.
//
// token and log forms:
//   1. count   one block: T_v (or the reduced T_v, checked) and the constants.
//   2. tokens  a warp per token, cuda_row_block tokens per block: the token's top-k slots of
//              every layer are checked first (a bad slot poisons that token's gradient), then
//              the layers are streamed with one layer of look-ahead: M^l by a warp sum over
//              the slots, the pair terms and dM^l in the CPU's order, and the gradient row of
//              each layer written once (zeros except at the selected experts, or added at the
//              selected experts in accumulate mode).
//   3. finish  one block: -lambda / T_v times the fixed-order sum of the block partials.
// batch form:
//   1. count   as above.
//   2. joint   U^l = sum_t m_t P^l[t,:]^T P^{l+1}[t,:] per pair l and per row chunk (at most 16
//              chunks, their size a function of T only), 32 x 32 output tiles, each thread
//              summing its rows in order; padding rows never enter a product.
//   3. reduce  U^l = sum of the chunks in chunk order; the statistics output when wanted.
//   4. select  a thread per (l, e): the k_l largest entries of row e of the reduced U (or the
//              local one), detail::coupling_select_row of math/router.hpp (the CPU's rule);
//              the selected local U entries in (l, e, nu) order.
//   5. value   one block: -lambda / T_v times the fixed-order sum of those entries.
//   6. grad    a warp per token: dP^l[t,e] = gc (sum over the selected nu of P^{l+1}[t,nu]
//              + sum over e' of P^{l-1}[t,e'] S_{l-1}[e',e]).
// Workspace of the batch form: about (16 + 2) (L-1) E^2 sizeof(Acc) bytes.
//
// Device checks: top-k indices >= E or repeated in a row (token and log forms; the batch form
// uses only the width k_l of each layer), reduced statistics not finite or a negative T_v.
#pragma once

#include "internal.cuh"  // refuses direct inclusion; core/config.hpp

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "../../losses/coupling.hpp"
#include "core.cuh"

MOEREG_NAMESPACE_BEGIN
namespace detail {
namespace cuda_cp {

template <class T>
struct layer_view {
  routing_view<T> P;
  topk_view I;
  matrix_view<T> G;
};

inline constexpr int upload_chunk = 16;

template <class T>
struct layer_chunk {
  layer_view<T> v[upload_chunk];
  index_t first;
  int count;
};

template <class T>
__global__ void upload_kernel(layer_chunk<T> c, layer_view<T>* table) {
  const int i = static_cast<int>(threadIdx.x);
  if (i < c.count) table[c.first + i] = c.v[i];
}

template <class Acc>
struct scalars {
  int flags;
  int active;  // T_v > 0
  Acc inv_tv;  // 1 / T_v
  Acc gc;      // -grad_scale * lambda / T_v
  Acc vc;      // -lambda / T_v (batch form)
};

/// Rows of one chunk of the batch form's joint sums: at most 16 chunks, a function of T only.
inline index_t joint_chunk_rows(index_t T) {
  const index_t chunks = std::min<index_t>(16, cuda_blocks(T, cuda_tuning::rows_per_block));
  return chunks == 0 ? 1 : cuda_blocks(T, chunks);
}

template <class Acc>
struct workspace {
  void* table = nullptr;  // [L] layer_view<T>
  scalars<Acc>* sc = nullptr;
  Acc* partial = nullptr;  // token forms: [nb] per-block value partials
  // batch form
  Acc* chunks = nullptr;  // [nc * (L-1) * E^2]
  Acc* U = nullptr;       // [(L-1) * E^2]
  Acc* S = nullptr;       // [(L-1) * E^2] 0/1 selection
  int* sel = nullptr;     // [(L-1) * E * kmax] selected nu per row, ascending
  Acc* terms = nullptr;   // [sum_l E k_l]
};

template <class T>
struct shape {
  index_t L = 0, rows = 0, E = 0, kmax = 0, nterms = 0;
};

template <class T>
shape<T> shape_of(const coupling_inputs<T>& in) {
  shape<T> s;
  s.L = in.layers > 0 ? in.layers : 0;
  if (in.probs != nullptr && s.L > 0)
    s.rows = std::max<index_t>(in.probs[0].rows, 0), s.E = std::max<index_t>(in.probs[0].cols, 0);
  if (in.topk != nullptr)
    for (index_t l = 0; l < s.L; ++l) {
      s.kmax = std::max(s.kmax, std::max<index_t>(in.topk[l].k, 0));
      if (l + 1 < s.L) s.nterms += s.E * std::max<index_t>(in.topk[l].k, 0);
    }
  return s;
}

template <class Acc, class T>
workspace<Acc> carve(workspace_carver& c, const coupling_loss& loss, const shape<T>& s) {
  workspace<Acc> w;
  w.table = c.take<layer_view<T>>(s.L);
  w.sc = c.take<scalars<Acc>>(1);
  if (loss.cfg.form != coupling_form::batch) {
    w.partial = c.take<Acc>(cuda_blocks(s.rows, cuda_row_block));
    return w;
  }
  const index_t pairs = s.L > 1 ? s.L - 1 : 0, E2 = s.E * s.E;
  const index_t nc = cuda_blocks(s.rows, joint_chunk_rows(s.rows));
  w.chunks = c.take<Acc>(nc * pairs * E2);
  w.U = c.take<Acc>(pairs * E2);
  w.S = c.take<Acc>(pairs * E2);
  w.sel = c.take<int>(pairs * s.E * s.kmax);
  w.terms = c.take<Acc>(s.nterms);
  return w;
}

template <class T>
void validate(const coupling_loss& loss, const coupling_inputs<T>& in, stats_view reduced, const matrix_view<T>* grads,
              const cuda& be) {
  const char* who = "coupling (cuda)";
  cuda_validate(who, loss, in, reduced, grads, be);
  const index_t T_ = in.probs[0].rows;
  require(cuda_blocks(T_, cuda_row_block) <= static_cast<index_t>(std::numeric_limits<int>::max()), who,
          ": too many rows for one grid");
}

/// T_v (local, or reduced and checked) and the constants; with stats_out, the local T_v.
template <class Acc>
__global__ void __launch_bounds__(cuda_tuning::threads)
    count_kernel(mask_view mask, index_t rows, const double* reduced, index_t reduced_size, double coef, double gs,
                 scalars<Acc>* sc, double* stats_out) {
  __shared__ long long scratch[cuda_tuning::threads];
  __shared__ int word;
  long long n = 0;
  if (mask.data == nullptr)
    n = threadIdx.x == 0 ? static_cast<long long>(rows) : 0;
  else
    for (index_t t = threadIdx.x; t < rows; t += cuda_tuning::threads) n += mask(t) ? 1 : 0;
  n = block_sum(n, scratch);
  int flags = 0;
  if (reduced != nullptr) flags = block_check_stats(reduced, reduced_size, 1, &word);
  if (threadIdx.x != 0) return;
  if (stats_out != nullptr) stats_out[0] = static_cast<double>(n);
  const double tv = reduced != nullptr ? reduced[0] : static_cast<double>(n);
  scalars<Acc> s{};
  s.flags = flags;
  s.active = tv > 0 ? 1 : 0;
  s.inv_tv = tv > 0 ? static_cast<Acc>(1.0 / tv) : Acc(0);
  s.gc = tv > 0 ? static_cast<Acc>(-gs * coef / tv) : Acc(0);
  s.vc = tv > 0 ? static_cast<Acc>(-coef / tv) : Acc(0);
  if (flags != 0) s.active = 1, s.gc = acc_nan<Acc>();
  *sc = s;
}

/// OR over a warp (every lane gets the result).
__device__ inline int warp_or(int v) {
  for (int m = 16; m >= 1; m >>= 1) v |= __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

/// Top-k mass of token t at one layer: a warp sum over the usable slots.
template <class T, class Acc>
__device__ Acc layer_mass(const layer_view<T>& lv, index_t t, index_t E, int lane) {
  Acc m = Acc(0);
  for (index_t s = lane; s < lv.I.k; s += 32) {
    bool usable = false;
    (void)topk_slot_flags(lv.I, t, s, E, usable);
    if (usable) m += dload(&lv.P(t, lv.I(t, s)));
  }
  return warp_sum(m);
}

/// Writes grad row t of one layer: g at the usable selected experts, zeros elsewhere
/// (overwrite), or g added at the selected experts (accumulate).
template <class T, class Acc>
__device__ void write_layer_row(const layer_view<T>& lv, index_t t, index_t E, Acc g, bool accumulate, int lane) {
  if (accumulate) {
    for (index_t s = lane; s < lv.I.k; s += 32) {
      bool usable = false;
      (void)topk_slot_flags(lv.I, t, s, E, usable);
      if (usable) dput_grad(&lv.G(t, lv.I(t, s)), g, true);
    }
    return;
  }
  for (index_t e = lane; e < E; e += 32) {
    bool selected = false;
    for (index_t s = 0; s < lv.I.k && !selected; ++s) selected = lv.I(t, s) == e;
    dput_grad(&lv.G(t, e), selected ? g : Acc(0), false);
  }
}

template <class T, class Acc>
__global__ void __launch_bounds__(cuda_tuning::threads)
    token_kernel(const layer_view<T>* layers, index_t L, index_t rows, index_t E, mask_view mask, bool is_log, Acc eps,
                 bool has_grad, bool accumulate, workspace<Acc> w) {
  __shared__ Acc warp_part[cuda_tuning::warps][1];
  __shared__ int s_flags;
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  if (threadIdx.x == 0) s_flags = 0;
  __syncthreads();
  // Other blocks OR their flags into w.sc->flags meanwhile: read only the constants.
  const int active = w.sc->active;
  const Acc gc = w.sc->gc;
  const index_t r0 = static_cast<index_t>(blockIdx.x) * cuda_row_block + warp * cuda_tuning::rows_per_warp;
  Acc acc = Acc(0);
  int flags = 0;
  for (index_t i = 0; i < cuda_tuning::rows_per_warp; ++i) {
    const index_t t = r0 + i;
    if (t >= rows) break;
    if (!mask(t) || active == 0) {
      if (has_grad && !accumulate)
        for (index_t l = 0; l < L; ++l)
          for (index_t e = lane; e < E; e += 32) dput_grad(&layers[l].G(t, e), Acc(0), false);
      continue;
    }
    int tflags = 0;
    for (index_t l = 0; l < L; ++l)
      for (index_t s = lane; s < layers[l].I.k; s += 32) {
        bool usable = false;
        tflags |= topk_slot_flags(layers[l].I, t, s, E, usable);
      }
    tflags = warp_or(tflags);
    flags |= tflags;
    Acc m_prev = Acc(0), w_prev = Acc(0), val = Acc(0);
    Acc m_cur = layer_mass<T, Acc>(layers[0], t, E, lane);
    for (index_t l = 0; l < L; ++l) {
      const bool has_next = l + 1 < L;
      const Acc m_next = has_next ? layer_mass<T, Acc>(layers[l + 1], t, E, lane) : Acc(0);
      Acc wgt = Acc(0);
      if (has_next) val += coupling_pair(m_cur, m_next, is_log, eps, wgt);  // math/router.hpp
      // dM^l in the CPU's order: the pair (l-1, l) first, then (l, l+1).
      Acc dm = Acc(0) + w_prev * m_prev;
      if (has_next) dm += wgt * m_next;
      if (has_grad) write_layer_row(layers[l], t, E, tflags != 0 ? acc_nan<Acc>() : gc * dm, accumulate, lane);
      m_prev = m_cur, w_prev = wgt, m_cur = m_next;
    }
    acc += val;
  }
  if (flags != 0 && lane == 0) atomicOr(&s_flags, flags);
  const Acc sums[1] = {acc};
  block_warp_partials(sums, warp_part, w.partial + blockIdx.x);
  if (threadIdx.x == 0 && s_flags != 0) atomicOr(&w.sc->flags, s_flags);
}

template <class Acc>
__global__ void __launch_bounds__(cuda_tuning::threads)
    token_finish_kernel(workspace<Acc> w, index_t nb, Acc lambda, double* value, int* status) {
  __shared__ Acc scratch[cuda_tuning::threads];
  const Acc sum = block_sum_strided(w.partial, nb, 1, scratch);
  if (threadIdx.x != 0) return;
  const scalars<Acc> sc = *w.sc;
  const double v = sc.inv_tv != Acc(0) ? static_cast<double>(-lambda * sc.inv_tv * sum) : 0.0;
  publish(value, status, v, sc.flags);
}

// ---------------------------------------------------------------------------------------
// batch form
// ---------------------------------------------------------------------------------------

/// Partial U of pair blockIdx.y over row chunk blockIdx.x, output tile blockIdx.z.
template <class T, class Acc>
__global__ void __launch_bounds__(cuda_tuning::threads)
    joint_kernel(const layer_view<T>* layers, index_t rows, index_t E, index_t chunk_rows, mask_view mask,
                 workspace<Acc> w) {
  constexpr int tile = 32, lanes = cuda_tuning::threads / 32, stage = 32;
  __shared__ Acc sa[stage][tile];
  __shared__ Acc sb[stage][tile];
  __shared__ int sv[stage];
  const index_t chunk = blockIdx.x, l = blockIdx.y;
  const index_t tiles_per_row = cuda_blocks(E, tile);
  const index_t e0 = (static_cast<index_t>(blockIdx.z) / tiles_per_row) * tile;
  const index_t n0 = (static_cast<index_t>(blockIdx.z) % tiles_per_row) * tile;
  const int tx = static_cast<int>(threadIdx.x) % 32, ty = static_cast<int>(threadIdx.x) / 32;
  const index_t r0 = chunk * chunk_rows, r1 = r0 + chunk_rows < rows ? r0 + chunk_rows : rows;
  const auto& A = layers[l].P;
  const auto& B = layers[l + 1].P;
  Acc acc[tile / lanes];
  for (int i = 0; i < tile / lanes; ++i) acc[i] = Acc(0);
  for (index_t s0 = r0; s0 < r1; s0 += stage) {
    // Stage up to 32 rows of the two column tiles (zeros outside E or for padding rows).
    for (int r = ty; r < stage; r += lanes) {
      const index_t t = s0 + r;
      const bool ok = t < r1 && mask(t);
      if (tx == 0) sv[r] = ok ? 1 : 0;
      sa[r][tx] = ok && e0 + tx < E ? dload(&A(t, e0 + tx)) : Acc(0);
      sb[r][tx] = ok && n0 + tx < E ? dload(&B(t, n0 + tx)) : Acc(0);
    }
    __syncthreads();
    for (int r = 0; r < stage; ++r) {
      if (sv[r] == 0) continue;
      const Acc b = sb[r][tx];
      for (int i = 0; i < tile / lanes; ++i) acc[i] += sa[r][ty + lanes * i] * b;
    }
    __syncthreads();
  }
  const index_t E2 = E * E, pairs = gridDim.y;
  Acc* out = w.chunks + (chunk * pairs + l) * E2;
  for (int i = 0; i < tile / lanes; ++i) {
    const index_t e = e0 + ty + lanes * i, nu = n0 + tx;
    if (e < E && nu < E) out[e * E + nu] = acc[i];
  }
}

/// U = sum of the chunks in chunk order; with stats_out, the statistics [T_v, U^1, ...].
template <class Acc>
__global__ void reduce_kernel(workspace<Acc> w, index_t nc, index_t n, double* stats_out) {
  const index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  Acc s = Acc(0);
  for (index_t c = 0; c < nc; ++c) s += w.chunks[c * n + i];
  w.U[i] = s;
  if (stats_out != nullptr) stats_out[1 + i] = static_cast<double>(s);
}

/// A thread per (pair l, row e): the selection of row e and its selected local U entries.
template <class T, class Acc>
__global__ void select_kernel(const layer_view<T>* layers, index_t pairs, index_t E, index_t kmax,
                              const double* reduced, workspace<Acc> w) {
  const index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= pairs * E) return;
  const index_t l = i / E, e = i % E, E2 = E * E;
  const index_t k = layers[l].I.k;
  Acc* S = w.S + l * E2 + e * E;
  if (reduced != nullptr)
    coupling_select_row(reduced + 1 + l * E2 + e * E, E, k, S);
  else
    coupling_select_row(w.U + l * E2 + e * E, E, k, S);
  index_t off = 0;
  for (index_t q = 0; q < l; ++q) off += E * layers[q].I.k;
  off += e * k;
  index_t j = 0;
  for (index_t nu = 0; nu < E; ++nu)
    if (S[nu] != Acc(0)) {
      w.terms[off + j] = w.U[l * E2 + e * E + nu];
      w.sel[(l * E + e) * kmax + j] = static_cast<int>(nu);
      ++j;
    }
}

template <class Acc>
__global__ void __launch_bounds__(cuda_tuning::threads)
    batch_value_kernel(workspace<Acc> w, index_t nterms, double* value, int* status) {
  __shared__ Acc scratch[cuda_tuning::threads];
  const Acc sum = block_sum_strided(w.terms, nterms, 1, scratch);
  if (threadIdx.x != 0) return;
  const scalars<Acc> sc = *w.sc;
  publish(value, status, sc.vc != Acc(0) ? static_cast<double>(sc.vc * sum) : 0.0, sc.flags);
}

/// A warp per token: every layer's gradient row.
template <class T, class Acc>
__global__ void __launch_bounds__(cuda_tuning::threads)
    batch_grad_kernel(const layer_view<T>* layers, index_t L, index_t rows, index_t E, index_t kmax, mask_view mask,
                      bool accumulate, workspace<Acc> w) {
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  const scalars<Acc> sc = *w.sc;
  const index_t E2 = E * E;
  const index_t r0 = static_cast<index_t>(blockIdx.x) * cuda_row_block + warp * cuda_tuning::rows_per_warp;
  for (index_t i = 0; i < cuda_tuning::rows_per_warp; ++i) {
    const index_t t = r0 + i;
    if (t >= rows) break;
    const bool valid = mask(t) && sc.active != 0;
    if (!valid && accumulate) continue;
    for (index_t l = 0; l < L; ++l) {
      const auto& G = layers[l].G;
      for (index_t e = lane; e < E; e += 32) {
        Acc g = Acc(0);
        if (valid) {
          if (l + 1 < L) {
            const auto& Pn = layers[l + 1].P;
            const int* sel = w.sel + (l * E + e) * kmax;
            for (index_t j = 0; j < layers[l].I.k; ++j) g += dload(&Pn(t, sel[j]));
          }
          if (l > 0) {
            const auto& Pp = layers[l - 1].P;
            const Acc* S = w.S + (l - 1) * E2;
            for (index_t q = 0; q < E; ++q) g += dload(&Pp(t, q)) * S[q * E + e];
          }
          g *= sc.gc;
        }
        dput_grad(&G(t, e), g, accumulate);
      }
    }
  }
}

}  // namespace cuda_cp

// This loss's entries for the CUDA front end (backend/cuda/api.cuh).
template <class T>
void cuda_run(const cuda& be, const coupling_loss& loss, const coupling_inputs<T>& in, stats_view reduced,
              const matrix_view<T>* grads, grad_options opts, double* stats_out) {
  using namespace cuda_cp;  // this loss's kernels and helpers
  using Acc = accumulator_t<T>;
  const char* who = "coupling (cuda)";
  validate(loss, in, reduced, grads, be);
  if (stats_out != nullptr) cuda_check_stats_out(who, stats_out, loss.stats_size(in), be);
  const auto s = shape_of(in);
  workspace_carver carver(be.workspace);
  const auto w = carve<Acc>(carver, loss, s);
  cuda_check_workspace(who, be, carver.required());
  auto* table = static_cast<layer_view<T>*>(w.table);
  const dim3 block(cuda_tuning::threads);

  for (index_t first = 0; first < s.L; first += upload_chunk) {
    layer_chunk<T> c{};
    c.first = first;
    c.count = static_cast<int>(std::min<index_t>(upload_chunk, s.L - first));
    for (int i = 0; i < c.count; ++i) {
      const index_t l = first + i;
      c.v[i] = layer_view<T>{in.probs[l], in.topk[l], grads != nullptr ? grads[l] : matrix_view<T>{}};
    }
    upload_kernel<T><<<1, upload_chunk, 0, be.stream>>>(c, table);
    cuda_check_launch(who, "layer table upload");
  }
  const bool batch = loss.cfg.form == coupling_form::batch;
  count_kernel<Acc><<<1, block, 0, be.stream>>>(in.mask, s.rows, reduced.data, reduced.size, loss.cfg.coef,
                                                opts.grad_scale, w.sc, stats_out);
  cuda_check_launch(who, "count kernel");
  const bool want_grad = grads != nullptr && stats_out == nullptr;

  if (!batch) {
    if (stats_out != nullptr) return;
    const index_t nb = cuda_blocks(s.rows, cuda_row_block);
    if (nb > 0) {
      token_kernel<T, Acc><<<static_cast<unsigned>(nb), block, 0, be.stream>>>(
          table, s.L, s.rows, s.E, in.mask, loss.cfg.form == coupling_form::log, static_cast<Acc>(loss.cfg.eps),
          want_grad, opts.accumulate, w);
      cuda_check_launch(who, "token kernel");
    }
    token_finish_kernel<Acc><<<1, block, 0, be.stream>>>(w, nb, static_cast<Acc>(loss.cfg.coef), be.value, be.status);
    cuda_check_launch(who, "finish kernel");
    return;
  }

  const index_t pairs = s.L - 1, E2 = s.E * s.E, n = pairs * E2;
  const index_t chunk_rows = joint_chunk_rows(s.rows), nc = cuda_blocks(s.rows, chunk_rows);
  const index_t tiles = cuda_blocks(s.E, 32) * cuda_blocks(s.E, 32);
  require(pairs <= 65535 && tiles <= 65535, who, ": too many layers or experts for one grid");
  if (nc > 0 && n > 0) {
    joint_kernel<T, Acc><<<dim3(static_cast<unsigned>(nc), static_cast<unsigned>(pairs), static_cast<unsigned>(tiles)),
                           block, 0, be.stream>>>(table, s.rows, s.E, chunk_rows, in.mask, w);
    cuda_check_launch(who, "joint kernel");
  }
  if (n > 0) {
    reduce_kernel<Acc>
        <<<static_cast<unsigned>(cuda_blocks(n, cuda_tuning::threads)), block, 0, be.stream>>>(w, nc, n, stats_out);
    cuda_check_launch(who, "reduce kernel");
  }
  if (stats_out != nullptr) return;  // [T_v, U^1, ...] written by the count and reduce kernels
  const index_t rows_e = pairs * s.E;
  if (rows_e > 0) {
    select_kernel<T, Acc><<<static_cast<unsigned>(cuda_blocks(rows_e, cuda_tuning::threads)), block, 0, be.stream>>>(
        table, pairs, s.E, s.kmax, reduced.data, w);
    cuda_check_launch(who, "select kernel");
  }
  batch_value_kernel<Acc><<<1, block, 0, be.stream>>>(w, s.nterms, be.value, be.status);
  cuda_check_launch(who, "value kernel");
  const index_t nb = cuda_blocks(s.rows, cuda_row_block);
  if (want_grad && nb > 0) {
    batch_grad_kernel<T, Acc><<<static_cast<unsigned>(nb), block, 0, be.stream>>>(table, s.L, s.rows, s.E, s.kmax,
                                                                                  in.mask, opts.accumulate, w);
    cuda_check_launch(who, "gradient kernel");
  }
}

template <class T>
std::size_t cuda_workspace_bytes(const coupling_loss& loss, const coupling_inputs<T>& in) {
  workspace_carver c(nullptr);
  (void)cuda_cp::carve<accumulator_t<T>>(c, loss, cuda_cp::shape_of(in));
  return c.required();
}

}  // namespace detail
MOEREG_NAMESPACE_END
