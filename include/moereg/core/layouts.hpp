// Activation layout policies: where h_{t,s}, the activation vector of token t in slot s,
// lies in the caller's buffer.
//
// A layout policy, like a layout mapping of std::mdspan, has one job: turn an index into
// an offset. Any type with these members works as a policy (see examples/custom_layout.cpp):
//
//   index_t tokens() const;                  // T
//   index_t slots() const;                   // k
//   index_t dim() const;                     // d, the length of one vector
//   index_t stride() const;                  // elements between h[i] and h[i + 1]
//   index_t offset(index_t t, index_t s) const;  // element offset of h_{t,s}[0],
//                                            // negative when the layout holds no vector there
//   void validate(const char* who) const;    // throws moereg::error on an inconsistent layout
//
// and optionally
//
//   void validate_shape(const char* who) const;  // the checks that read no map entry (sizes,
//                                                // strides, map shapes): what a device backend
//                                                // can check on the host before a launch
//
// Gradients are written through the same policy, so they land in the caller's layout.
// Two valid slots must never share storage: validate() of the three built-in layouts checks
// that the strides do not overlap against the extents (is_unique(), mdspan's question) and,
// for the map layouts, that no row or (expert, position) is used twice. This holds for input
// views as well: an overlapping view is almost always a mistake (a row stride smaller than the
// width), so it is refused rather than read as given. A layout of your own answers for itself.
#pragma once

#include <type_traits>
#include <utility>
#include <vector>

#include "config.hpp"
#include "error.hpp"
#include "types.hpp"
#include "views.hpp"

MOEREG_NAMESPACE_BEGIN

/// Token-major [T, k, d] with arbitrary strides (elements). Contiguous by default. The
/// strides must not overlap (validate() refuses, for example, slot_stride 0 with k > 1, or a
/// token stride smaller than the k * d a contiguous token needs).
struct token_major {
  /// Shape [T, k, d] and the strides (elements) between tokens, slots and elements.
  ///@{
  index_t num_tokens = 0, num_slots = 0, length = 0;
  index_t token_stride = 0, slot_stride = 0, elem_stride = 1;
  ///@}

  /// An empty layout.
  constexpr token_major() = default;
  /// Contiguous [t, k, d].
  constexpr token_major(index_t t, index_t k, index_t d)
      : num_tokens(t), num_slots(k), length(d), token_stride(k * d), slot_stride(d), elem_stride(1) {}
  /// [t, k, d] with token stride ts, slot stride ss and element stride es.
  constexpr token_major(index_t t, index_t k, index_t d, index_t ts, index_t ss, index_t es = 1)
      : num_tokens(t), num_slots(k), length(d), token_stride(ts), slot_stride(ss), elem_stride(es) {}

  /// T, the number of tokens.
  constexpr index_t tokens() const { return num_tokens; }
  /// k, the number of slots per token.
  constexpr index_t slots() const { return num_slots; }
  /// d, the length of one activation vector.
  constexpr index_t dim() const { return length; }
  /// Elements between two consecutive entries of one vector.
  constexpr index_t stride() const { return elem_stride; }
  /// Offset (elements) of the first entry of h_{t,s}.
  MOEREG_HOST_DEVICE constexpr index_t offset(index_t t, index_t s) const { return t * token_stride + s * slot_stride; }
  /// Throws moereg::error (message prefixed by `who`) on negative sizes or strides, or strides
  /// that overlap. A token-major layout has no map, so this is all of validate().
  void validate_shape(const char* who) const {
    detail::require(num_tokens >= 0 && num_slots >= 0 && length >= 0, who, ": token_major layout has a negative size [",
                    num_tokens, ", ", num_slots, ", ", length, "]");
    detail::require(token_stride >= 0 && slot_stride >= 0 && elem_stride >= 1, who,
                    ": token_major layout needs non-negative strides and an element stride >= 1");
    detail::require(is_unique(), who, ": token_major layout [", num_tokens, ", ", num_slots, ", ", length,
                    "] with strides (", token_stride, ", ", slot_stride, ", ", elem_stride,
                    ") overlaps: two (token, slot, element) share storage");
  }
  /// validate_shape().
  void validate(const char* who) const { validate_shape(who); }
  /// True when every (token, slot, element) has its own storage (the strides against the extents).
  bool is_unique() const {
    const index_t ext[3] = {num_tokens, num_slots, length}, str[3] = {token_stride, slot_stride, elem_stride};
    return detail::strides_unique(3, ext, str);
  }
};

namespace detail {
/// Checks the shape of a layout's [T, k] index map before any entry is read: non-negative
/// sizes, a pointer when it has entries, and rows that do not overlap (row stride >= k),
/// as check_topk does for top-k views.
inline void require_index_map(const char* who, const char* what, const topk_view& m) {
  require(m.rows >= 0 && m.k >= 0, who, ": ", what, " has a negative size [", m.rows, ", ", m.k, "]");
  require(m.data != nullptr || m.rows * m.k == 0, who, ": ", what, " is null but has size [", m.rows, ", ", m.k, "]");
  require(m.row_stride >= m.k || m.rows <= 1, who, ": ", what, " row stride ", m.row_stride,
          " is smaller than k = ", m.k);
}

// Checks that the valid entries of an index map are distinct keys in [0, n); key_of(t, s)
// returns the key or a negative number for no entry.
template <class KeyOf>
void require_distinct_keys(const char* who, const char* what, index_t tokens, index_t slots, index_t n, KeyOf key_of) {
  std::vector<bool> seen(static_cast<std::size_t>(n), false);
  for (index_t t = 0; t < tokens; ++t)
    for (index_t s = 0; s < slots; ++s) {
      const index_t key = key_of(t, s);
      if (key < 0) continue;
      require(key < n, who, ": ", what, " at (", t, ", ", s, ") is ", key, ", out of range [0, ", n, ")");
      require(!seen[static_cast<std::size_t>(key)], who, ": ", what, " at (", t, ", ", s, ") is ", key,
              ", already used by another slot");
      seen[static_cast<std::size_t>(key)] = true;
    }
}
}  // namespace detail

namespace detail {
/// The shape queries of a layout placed by a [T, k] map (expert_grouped, capacity_padded):
/// T and k are the map's, d and the element stride the layout's `length` and `elem_stride`.
template <class Derived>
struct mapped_layout_shape {
  /// T, the number of tokens.
  index_t tokens() const { return self().slot_map().rows; }
  /// k, the number of slots per token.
  index_t slots() const { return self().slot_map().k; }
  /// d, the length of one activation vector.
  index_t dim() const { return self().length; }
  /// Elements between two consecutive entries of one vector.
  index_t stride() const { return self().elem_stride; }

 private:
  const Derived& self() const { return static_cast<const Derived&>(*this); }
};
}  // namespace detail

/// Expert-grouped rows, the layout a grouped GEMM produces: a [num_rows, d] matrix whose
/// rows are sorted by expert, and a map [T, k] from (token, slot) to row (negative = none).
struct expert_grouped : detail::mapped_layout_shape<expert_grouped> {
  topk_view row_of;  ///< [T, k] row of h_{t,s}; int32 or int64
  /// Rows of the grouped matrix, d, and its row and element strides (elements).
  ///@{
  index_t num_rows = 0, length = 0, row_stride = 0, elem_stride = 1;
  ///@}

  /// An empty layout.
  expert_grouped() = default;
  /// `rows` x d matrix, `map` [T, k] giving the row of each slot; `rs < 0` means row stride d.
  expert_grouped(topk_view map, index_t rows, index_t d, index_t rs = -1, index_t es = 1)
      : row_of(map), num_rows(rows), length(d), row_stride(rs < 0 ? d : rs), elem_stride(es) {}

  /// The map that gives T and k: row_of.
  const topk_view& slot_map() const { return row_of; }
  /// Offset (elements) of the first entry of h_{t,s}; negative when the slot has no row.
  MOEREG_HOST_DEVICE index_t offset(index_t t, index_t s) const {
    const index_t r = row_of(t, s);
    return r < 0 ? -1 : r * row_stride;
  }
  /// True when every (row, element) of the grouped matrix has its own storage.
  bool is_unique() const {
    const index_t ext[2] = {num_rows, length}, str[2] = {row_stride, elem_stride};
    return detail::strides_unique(2, ext, str);
  }
  /// Throws moereg::error (prefixed by `who`) on bad sizes or strides, overlapping rows or a
  /// null map; reads no map entry.
  void validate_shape(const char* who) const {
    detail::require(num_rows >= 0 && length >= 0 && row_stride >= 0 && elem_stride >= 1, who,
                    ": expert_grouped layout has a negative size or stride");
    detail::require(is_unique(), who, ": expert_grouped rows [", num_rows, ", ", length, "] with row stride ",
                    row_stride, " and element stride ", elem_stride, " overlap: two rows share storage");
    detail::require_index_map(who, "expert_grouped row map", row_of);
  }
  /// validate_shape(), then the map: a row index out of range or used by two slots throws.
  void validate(const char* who) const {
    validate_shape(who);
    detail::require_distinct_keys(who, "expert_grouped row map", row_of.rows, row_of.k, num_rows,
                                  [&](index_t t, index_t s) { return row_of(t, s); });
  }
};

/// Capacity-padded [E, C, d]: expert e keeps up to C tokens; slot s of token t sits at
/// position pos(t, s) of expert expert(t, s)'s buffer (negative = dropped).
struct capacity_padded : detail::mapped_layout_shape<capacity_padded> {
  topk_view expert_of;    ///< [T, k] expert of each slot (usually the top-k indices)
  topk_view position_of;  ///< [T, k] position in that expert's buffer
  /// Shape [E, C, d] and the strides (elements) between experts, positions and elements.
  ///@{
  index_t num_experts = 0, capacity = 0, length = 0;
  index_t expert_stride = 0, row_stride = 0, elem_stride = 1;
  ///@}

  /// An empty layout.
  capacity_padded() = default;
  /// Contiguous [e, c, d] buffer; `experts` and `positions` [T, k] place each slot.
  capacity_padded(topk_view experts, topk_view positions, index_t e, index_t c, index_t d)
      : expert_of(experts),
        position_of(positions),
        num_experts(e),
        capacity(c),
        length(d),
        expert_stride(c * d),
        row_stride(d),
        elem_stride(1) {}

  /// The map that gives T and k: expert_of.
  const topk_view& slot_map() const { return expert_of; }
  /// Offset (elements) of the first entry of h_{t,s}; negative when the slot is dropped.
  MOEREG_HOST_DEVICE index_t offset(index_t t, index_t s) const {
    const index_t e = expert_of(t, s);
    const index_t p = position_of(t, s);
    return (e < 0 || p < 0) ? -1 : e * expert_stride + p * row_stride;
  }
  /// True when every (expert, position, element) of the buffer has its own storage.
  bool is_unique() const {
    const index_t ext[3] = {num_experts, capacity, length}, str[3] = {expert_stride, row_stride, elem_stride};
    return detail::strides_unique(3, ext, str);
  }
  /// Throws moereg::error (prefixed by `who`) on bad sizes or strides, overlapping storage or
  /// mismatched maps; reads no map entry.
  void validate_shape(const char* who) const {
    detail::require(
        num_experts >= 0 && capacity >= 0 && length >= 0 && expert_stride >= 0 && row_stride >= 0 && elem_stride >= 1,
        who, ": capacity_padded layout has a negative size or stride");
    detail::require(is_unique(), who, ": capacity_padded buffer [", num_experts, ", ", capacity, ", ", length,
                    "] with strides (", expert_stride, ", ", row_stride, ", ", elem_stride,
                    ") overlaps: two (expert, position, element) share storage");
    detail::require_index_map(who, "capacity_padded expert map", expert_of);
    detail::require_index_map(who, "capacity_padded position map", position_of);
    detail::require(position_of.rows == expert_of.rows && position_of.k == expert_of.k, who,
                    ": capacity_padded position map is [", position_of.rows, ", ", position_of.k,
                    "] but the expert map is [", expert_of.rows, ", ", expert_of.k, "]");
  }
  /// validate_shape(), then the maps: an expert or position out of range, or an (expert,
  /// position) used by two slots, throws.
  void validate(const char* who) const {
    validate_shape(who);
    for (index_t t = 0; t < expert_of.rows; ++t)
      for (index_t s = 0; s < expert_of.k; ++s) {
        const index_t e = expert_of(t, s), p = position_of(t, s);
        if (e < 0 || p < 0) continue;
        detail::require(e < num_experts, who, ": capacity_padded expert at (", t, ", ", s, ") is ", e,
                        ", out of range [0, ", num_experts, ")");
        detail::require(p < capacity, who, ": capacity_padded position at (", t, ", ", s, ") is ", p,
                        ", out of range [0, ", capacity, ")");
      }
    detail::require_distinct_keys(who, "capacity_padded (expert, position)", expert_of.rows, expert_of.k,
                                  num_experts * capacity, [&](index_t t, index_t s) {
                                    const index_t e = expert_of(t, s), p = position_of(t, s);
                                    return (e < 0 || p < 0) ? index_t(-1) : e * capacity + p;
                                  });
  }
};

namespace detail {
template <class Layout, class = void>
struct has_validate_shape : std::false_type {};
template <class Layout>
struct has_validate_shape<Layout, std::void_t<decltype(std::declval<const Layout&>().validate_shape(""))>>
    : std::true_type {};

/// The shape checks of a layout: its validate_shape() where it has one; nothing for a layout of
/// your own without it (its validate() runs wherever the map entries can be read).
template <class Layout>
void validate_layout_shape(const char* who, const Layout& l) {
  if constexpr (has_validate_shape<Layout>::value)
    l.validate_shape(who);
  else
    (void)who, (void)l;
}
}  // namespace detail

/// Activations (or their gradient) in a layout: a pointer and a policy.
template <class T, class Layout>
struct activation_view {
  T* data = nullptr;  ///< base pointer the layout offsets are added to
  Layout layout{};    ///< the layout policy (token_major, expert_grouped or capacity_padded)

  /// An empty view.
  constexpr activation_view() = default;
  /// The vectors at `d`, placed by `l`.
  MOEREG_HOST_DEVICE constexpr activation_view(T* d, Layout l) : data(d), layout(l) {}
  /// A read-only view of a mutable one (like matrix_view's conversion), so that a gradient
  /// buffer's view also serves as an input.
  template <class U, std::enable_if_t<std::is_convertible<U*, T*>::value && !std::is_same<U, T>::value, int> = 0>
  MOEREG_HOST_DEVICE constexpr activation_view(
      const activation_view<U, Layout>& o)  // NOLINT(google-explicit-constructor)
      : data(o.data), layout(o.layout) {}

  /// Pointer to h_{t,s} (entries `layout.stride()` apart), or null when the slot has none.
  MOEREG_HOST_DEVICE T* vector(index_t t, index_t s) const {
    const index_t o = layout.offset(t, s);
    return o < 0 ? nullptr : data + o;
  }
};

/// An expert-grouped view of the rows of an Eigen matrix with direct access (Matrix, Map,
/// Block, Ref; row-major or column-major): the grouped matrix is m itself, [m.rows(), d =
/// m.cols()], with m's own strides, so a default column-major matrix is read correctly (its
/// elements are m.rows() apart). Building expert_grouped from m.data() and the sizes alone
/// would describe a row-major matrix. row_map [T, k] gives each (token, slot) its row.
template <class Derived>
auto grouped_view(const topk_view& row_map, Eigen::DenseBase<Derived>& m) {
  using S = std::remove_reference_t<decltype(*m.derived().data())>;
  return activation_view<S, expert_grouped>{m.derived().data(),
                                            expert_grouped(row_map, m.rows(), m.cols(), m.rowStride(), m.colStride())};
}
/// Read-only overload of grouped_view() for a const matrix or expression.
template <class Derived>
auto grouped_view(const topk_view& row_map, const Eigen::DenseBase<Derived>& m) {
  using S = const std::remove_const_t<std::remove_reference_t<decltype(*m.derived().data())>>;
  return activation_view<S, expert_grouped>{m.derived().data(),
                                            expert_grouped(row_map, m.rows(), m.cols(), m.rowStride(), m.colStride())};
}

/// Shorthand for a contiguous token-major [T, k, d] view.
template <class T>
activation_view<T, token_major> token_major_view(T* data, index_t t, index_t k, index_t d) {
  return {data, token_major(t, k, d)};
}

MOEREG_NAMESPACE_END
