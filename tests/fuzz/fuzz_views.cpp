// libFuzzer target: shape, stride and index validation of the losses. The fuzzer chooses
// sizes, strides (sometimes negative or too small), index values (sometimes out of range or
// repeated), masks, sequence offsets, reduced statistics and the activation layout; the
// buffers are then allocated exactly large enough for the views as described. Every call
// must either succeed or throw moereg::error: never crash, never read or write outside the
// buffers (AddressSanitizer), and, on success, never write a gradient element that the
// gradient view does not address (checked with a sentinel in every other element).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <moereg/backend/cpu.hpp>
#include <moereg/losses/load_balancing.hpp>
#include <moereg/losses/specialization.hpp>
#include <moereg/losses/z_loss.hpp>

#include "byte_reader.hpp"

namespace {

using moereg::index_t;
using moereg_fuzz::byte_reader;

const moereg::cpu serial{1};

// One past the largest element offset of a strided box with the given extents and strides,
// counting only non-negative terms (a view with a negative stride must be refused before it
// is read; if it is not, AddressSanitizer sees the read below the buffer).
index_t extent(std::initializer_list<std::pair<index_t, index_t>> dims) {
  index_t hi = 0;
  for (const auto& [n, st] : dims) {
    if (n <= 0) return 1;
    if (st > 0) hi += (n - 1) * st;
  }
  return hi + 1;
}

// A size that is usually small and valid, sometimes zero or negative.
index_t size_in(byte_reader& in, index_t hi) {
  const std::uint8_t b = in.byte();
  if (b == 255) return -1;
  return static_cast<index_t>(b % (hi + 1));
}
// A stride near `natural`: often natural, otherwise anything in [-1, natural + 4].
index_t stride_near(byte_reader& in, index_t natural) {
  natural = std::max<index_t>(natural, 0);  // a negative size makes the product negative
  const std::uint8_t b = in.byte();
  if (b < 160) return natural;
  return static_cast<index_t>(b % (natural + 6)) - 1;
}

template <class T>
void fill(byte_reader& in, std::vector<T>& v) {
  for (auto& x : v) x = static_cast<T>(in.number());
}

template <class T>
bool same_bits(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

// Index storage for a [rows, k] topk-like view with a fuzzer-chosen stride and type.
struct index_matrix {
  std::vector<std::int32_t> i32;
  std::vector<std::int64_t> i64;
  moereg::topk_view view;
};

index_matrix make_indices(byte_reader& in, index_t rows, index_t k, index_t lo, index_t hi) {
  index_matrix m;
  const bool wide = in.flag();
  const index_t rs = stride_near(in, k);
  const auto n = static_cast<std::size_t>(extent({{rows, rs}, {k, 1}}));
  if (wide) {
    m.i64.resize(n);
    for (auto& x : m.i64) x = in.range(lo, hi);
    m.view = moereg::topk_view(m.i64.data(), rows, k, rs);
  } else {
    m.i32.resize(n);
    for (auto& x : m.i32) x = static_cast<std::int32_t>(in.range(lo, hi));
    m.view = moereg::topk_view(m.i32.data(), rows, k, rs);
  }
  if (rs < 0) m.view.row_stride = rs;  // the constructor maps a negative stride to k; keep the raw one
  return m;
}

struct mask_data {
  std::vector<std::uint8_t> bytes;
  moereg::mask_view view;
};

mask_data make_mask(byte_reader& in, index_t T) {
  mask_data m;
  if (!in.flag()) return m;
  const index_t n = in.flag() ? T : size_in(in, 40);
  const index_t st = stride_near(in, 1);
  m.bytes.resize(static_cast<std::size_t>(extent({{n, st}})));
  for (auto& b : m.bytes) b = static_cast<std::uint8_t>(in.byte() % 3 == 0 ? 0 : 1);
  m.view = moereg::mask_view(m.bytes.data(), n, st);
  return m;
}

struct stats_data {
  std::vector<double> values;
  moereg::stats_view view;
};

stats_data make_stats(byte_reader& in, index_t natural) {
  stats_data s;
  if (in.byte() % 4 != 0) return s;
  const index_t n = in.flag() ? natural : size_in(in, 12);
  s.values.resize(static_cast<std::size_t>(std::max<index_t>(n, 1)));
  for (auto& v : s.values) v = in.flag() ? static_cast<double>(in.range(0, 40)) : in.number();
  s.view = moereg::stats_view{s.values.data(), n};
  return s;
}

// A matrix [rows, cols] with fuzzer strides over a buffer sized to fit, plus the set of
// offsets it addresses (for the sentinel check).
template <class T>
struct matrix_data {
  std::vector<T> buf;
  std::vector<bool> addressed;
  moereg::matrix_view<T> view;
};

template <class T>
matrix_data<T> make_matrix(byte_reader& in, index_t rows, index_t cols, bool values) {
  matrix_data<T> m;
  const index_t cs = stride_near(in, 1);
  const index_t rs = stride_near(in, cols * std::max<index_t>(cs, 1));
  const index_t n = extent({{rows, rs}, {cols, cs}});
  m.buf.resize(static_cast<std::size_t>(n));
  m.addressed.assign(static_cast<std::size_t>(n), false);
  if (values) fill(in, m.buf);
  m.view = moereg::matrix_view<T>(m.buf.data(), rows, cols, 0, cs);
  m.view.row_stride = rs;
  if (rows > 0 && cols > 0 && rs >= 0 && cs >= 0)
    for (index_t i = 0; i < rows; ++i)
      for (index_t j = 0; j < cols; ++j) m.addressed[static_cast<std::size_t>(i * rs + j * cs)] = true;
  return m;
}

template <class T>
void sentinel_fill(std::vector<T>& v) {
  for (auto& x : v) x = static_cast<T>(-777.0);
}
template <class T>
void check_sentinels(const std::vector<T>& v, const std::vector<bool>& addressed) {
  const T s = static_cast<T>(-777.0);
  for (std::size_t i = 0; i < v.size(); ++i)
    if (!addressed[i] && !same_bits(v[i], s)) std::abort();  // wrote outside the gradient view
}

moereg::grad_options make_opts(byte_reader& in) {
  moereg::grad_options o;
  o.accumulate = in.flag();
  o.grad_scale = in.number();
  return o;
}

template <class T>
void run_load_balancing(byte_reader& in) {
  const index_t T_ = size_in(in, 40), E = size_in(in, 9), k = size_in(in, 10);
  auto P = make_matrix<T>(in, T_, E, true);
  moereg::load_balancing_inputs<T> inp;
  inp.probs = P.view;
  auto I = make_indices(in, in.byte() == 7 ? T_ + 1 : T_, k, -2, E + 1);
  inp.topk = I.view;
  auto M = make_mask(in, T_);
  inp.mask = M.view;
  moereg::load_balancing_loss loss;
  loss.cfg.scope = static_cast<moereg::lb_scope>(in.range(0, 2));
  loss.cfg.k = in.range(-1, 10);
  loss.cfg.coef = in.number();
  std::vector<std::int64_t> offs;
  if (loss.cfg.scope == moereg::lb_scope::sequence || in.byte() == 3) {
    if (in.flag()) {
      loss.cfg.seq_len = in.range(-1, 12);
    } else {
      const index_t nb = size_in(in, 8);
      offs.resize(static_cast<std::size_t>(std::max<index_t>(nb + 1, 1)));
      index_t acc = 0;
      for (auto& o : offs) {
        o = in.byte() == 9 ? in.range(-3, 50) : acc;
        acc += in.range(0, 12);
      }
      inp.cu_seqlens = moereg::offsets_view(offs.data(), nb + 1);
    }
  }
  const index_t natural = loss.cfg.scope == moereg::lb_scope::sequence ? 1 : 1 + E;
  auto S = make_stats(in, natural);
  auto G = make_matrix<T>(in, in.byte() == 5 ? T_ + 1 : T_, E, false);
  const auto opts = make_opts(in);
  sentinel_fill(G.buf);
  try {
    if (in.flag()) {
      (void)loss.value(inp, S.view, serial);
      std::vector<double> st(static_cast<std::size_t>(std::max<index_t>(loss.stats_size(inp), 0)));
      loss.local_stats(inp, st.data(), serial);
    } else {
      (void)loss.value_and_grad(inp, G.view, opts, S.view, serial);
      check_sentinels(G.buf, G.addressed);
    }
  } catch (const moereg::error&) {
  }
}

template <class T>
void run_z_loss(byte_reader& in) {
  const index_t T_ = size_in(in, 40), E = size_in(in, 9);
  auto Z = make_matrix<T>(in, T_, E, true);
  moereg::z_loss_inputs<T> inp;
  inp.logits = Z.view;
  auto M = make_mask(in, T_);
  inp.mask = M.view;
  moereg::z_loss loss;
  loss.cfg.coef = in.number();
  auto S = make_stats(in, 1);
  auto G = make_matrix<T>(in, in.byte() == 5 ? T_ + 1 : T_, E, false);
  const auto opts = make_opts(in);
  sentinel_fill(G.buf);
  try {
    (void)loss.value_and_grad(inp, G.view, opts, S.view, serial);
    check_sentinels(G.buf, G.addressed);
  } catch (const moereg::error&) {
  }
}

// Activation buffers for one layout: the input and the gradient, each sized to fit its own
// layout, with the addressed set of the gradient.
template <class T, class Layout>
void run_specialization_with(byte_reader& in, const Layout& x_layout, const Layout& g_layout, index_t x_size,
                             index_t g_size, const moereg::topk_view& topk, index_t E) {
  std::vector<T> x(static_cast<std::size_t>(x_size)), g(static_cast<std::size_t>(g_size));
  fill(in, x);
  sentinel_fill(g);
  std::vector<bool> addressed(g.size(), false);
  moereg::specialization_inputs<T, Layout> inp;
  inp.acts = moereg::activation_view<const T, Layout>{x.data(), x_layout};
  inp.topk = topk;
  auto M = make_mask(in, topk.rows);
  inp.mask = M.view;
  inp.num_experts = E;
  moereg::specialization_loss loss;
  loss.cfg.coef = in.number();
  loss.cfg.eps = in.flag() ? 1e-8 : in.number();
  loss.cfg.pairs = in.flag() ? moereg::sp_pairs::mean : moereg::sp_pairs::sum;
  auto S = make_stats(in, 1);
  const auto opts = make_opts(in);
  moereg::activation_view<T, Layout> gv{g.data(), g_layout};
  try {
    (void)loss.value_and_grad(inp, gv, opts, S.view, serial);
  } catch (const moereg::error&) {
    return;
  }
  // Success: the gradient may only have been written where the gradient layout holds a vector.
  const index_t d = g_layout.dim(), es = g_layout.stride();
  for (index_t t = 0; t < g_layout.tokens(); ++t)
    for (index_t s = 0; s < g_layout.slots(); ++s) {
      const index_t o = g_layout.offset(t, s);
      if (o < 0) continue;
      for (index_t i = 0; i < d; ++i) addressed[static_cast<std::size_t>(o + i * es)] = true;
    }
  check_sentinels(g, addressed);
}

template <class T>
void run_specialization(byte_reader& in) {
  const index_t T_ = size_in(in, 24), k = size_in(in, 6), d = size_in(in, 20);
  const index_t E = in.flag() ? 0 : size_in(in, 9);
  auto I = make_indices(in, T_, k, -2, std::max<index_t>(E, 6) + 1);
  const int kind = static_cast<int>(in.range(0, 2));
  if (kind == 0) {
    auto make = [&](bool is_grad) {
      (void)is_grad;
      const index_t es = stride_near(in, 1);
      const index_t ss = stride_near(in, d * std::max<index_t>(es, 1));
      const index_t ts = stride_near(in, k * std::max<index_t>(ss, 1));
      return moereg::token_major(T_, k, d, ts, ss, es);
    };
    const auto xl = make(false), gl = make(true);
    const index_t xn = extent({{T_, xl.token_stride}, {k, xl.slot_stride}, {d, xl.elem_stride}});
    const index_t gn = extent({{T_, gl.token_stride}, {k, gl.slot_stride}, {d, gl.elem_stride}});
    run_specialization_with<T>(in, xl, gl, xn, gn, I.view, E);
  } else if (kind == 1) {
    const index_t rows = size_in(in, 60);
    auto R = make_indices(in, T_, k, -1, rows + 1);
    auto make = [&]() {
      const index_t es = stride_near(in, 1);
      const index_t rs = stride_near(in, d * std::max<index_t>(es, 1));
      return moereg::expert_grouped(R.view, rows, d, rs, es);
    };
    auto xl = make(), gl = make();
    xl.row_stride = xl.row_stride < 0 ? 0 : xl.row_stride;
    gl.row_stride = gl.row_stride < 0 ? 0 : gl.row_stride;
    if (in.byte() == 1) gl.row_of = I.view;  // a gradient map that differs from the input's
    const index_t xn = extent({{rows, xl.row_stride}, {d, xl.elem_stride}});
    const index_t gn = extent({{rows, gl.row_stride}, {d, gl.elem_stride}});
    run_specialization_with<T>(in, xl, gl, xn, gn, I.view, E);
  } else {
    const index_t Ecap = size_in(in, 8), C = size_in(in, 12);
    auto P = make_indices(in, T_, in.byte() == 2 ? k + 1 : k, -1, C + 1);
    auto make = [&]() {
      moereg::capacity_padded l(I.view, P.view, Ecap, C, d);
      l.elem_stride = stride_near(in, 1);
      l.row_stride = stride_near(in, d * std::max<index_t>(l.elem_stride, 1));
      l.expert_stride = stride_near(in, C * std::max<index_t>(l.row_stride, 1));
      return l;
    };
    const auto xl = make(), gl = make();
    const index_t xn = extent({{Ecap, xl.expert_stride}, {C, xl.row_stride}, {d, xl.elem_stride}});
    const index_t gn = extent({{Ecap, gl.expert_stride}, {C, gl.row_stride}, {d, gl.elem_stride}});
    run_specialization_with<T>(in, xl, gl, xn, gn, I.view, E);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  byte_reader in(data, size);
  const int which = static_cast<int>(in.range(0, 5));
  switch (which) {
    case 0:
      run_load_balancing<float>(in);
      break;
    case 1:
      run_load_balancing<double>(in);
      break;
    case 2:
      run_z_loss<float>(in);
      break;
    case 3:
      run_z_loss<moereg::bfloat16>(in);
      break;
    case 4:
      run_specialization<float>(in);
      break;
    default:
      run_specialization<double>(in);
      break;
  }
  return 0;
}
