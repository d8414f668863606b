// A small, strict reader and writer of NumPy .npy files, for moereg-eval.
//
// Supported: format versions 1.0 and 2.0 on read, 1.0 on write; C order only; little-endian
// data only; dtypes <f4 <f8 <i4 <i8 |u1 |b1. Everything else is refused with an npy_error
// whose message says what is wrong: Fortran order, big-endian data, other dtypes, a bad
// magic string, a malformed or truncated header, truncated or trailing data, a shape whose
// element or byte count overflows, a bool byte other than 0 or 1.
//
// The parser works on a memory buffer (parse_npy) and is written for hostile input: every
// read is bounds-checked against the buffer, the header is parsed by a small recursive
// descent over a fixed grammar (no eval, no recursion depth that input can grow), and no
// allocation larger than the buffer itself is made before the shape has been checked
// against the bytes actually present. It is the entry point a fuzzer is pointed at.
//
// Header grammar accepted (the Python dict literal numpy writes, with some latitude):
//   header := ws '{' ws [ entry ( ws ',' ws entry )* ws [','] ] ws '}' ws
//   entry  := string ws ':' ws value
//   value  := string | 'True' | 'False' | tuple
//   tuple  := '(' ws ')' | '(' ws int ws ',' ws ')' | '(' ws int ( ws ',' ws int )+ ws [','] ws ')'
//   string := "'" chars "'" | '"' chars '"'        (no escapes, printable ASCII)
//   int    := decimal digits (non-negative, at most 2^63 - 1)
// with exactly the keys descr, fortran_order and shape, each once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include <moereg/core/error.hpp>

namespace moereg_eval {
namespace npy {

/// What the reader and writer throw. A moereg::error, so one catch handles both.
class npy_error : public moereg::error {
 public:
  explicit npy_error(const std::string& what) : moereg::error(what) {}
};

/// The element types supported.
enum class dtype : std::uint8_t { f4, f8, i4, i8, u1, b1 };

/// The descr string numpy writes for a dtype.
inline const char* descr(dtype t) {
  switch (t) {
    case dtype::f4:
      return "<f4";
    case dtype::f8:
      return "<f8";
    case dtype::i4:
      return "<i4";
    case dtype::i8:
      return "<i8";
    case dtype::u1:
      return "|u1";
    default:
      return "|b1";
  }
}

/// The numpy name of a dtype, for messages.
inline const char* dtype_name(dtype t) {
  switch (t) {
    case dtype::f4:
      return "float32";
    case dtype::f8:
      return "float64";
    case dtype::i4:
      return "int32";
    case dtype::i8:
      return "int64";
    case dtype::u1:
      return "uint8";
    default:
      return "bool";
  }
}

inline std::size_t itemsize(dtype t) {
  switch (t) {
    case dtype::f4:
    case dtype::i4:
      return 4;
    case dtype::f8:
    case dtype::i8:
      return 8;
    default:
      return 1;
  }
}

/// The largest number of dimensions accepted (numpy's own limit).
inline constexpr std::size_t max_ndim = 64;

/// The C++ type holding the elements of each dtype. bool is held as uint8_t 0/1.
template <class T>
struct dtype_of;
template <>
struct dtype_of<float> {
  static constexpr dtype value = dtype::f4;
};
template <>
struct dtype_of<double> {
  static constexpr dtype value = dtype::f8;
};
template <>
struct dtype_of<std::int32_t> {
  static constexpr dtype value = dtype::i4;
};
template <>
struct dtype_of<std::int64_t> {
  static constexpr dtype value = dtype::i8;
};
template <>
struct dtype_of<std::uint8_t> {
  static constexpr dtype value = dtype::u1;
};

/// Formats a shape the way numpy prints it: (), (3,), (2, 3).
inline std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string s = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(shape[i]);
  }
  if (shape.size() == 1) s += ",";
  return s + ")";
}

namespace detail {

[[noreturn]] inline void fail(const std::string& msg) {
  throw npy_error(msg);
}

/// Element count of a shape, or fails when it is negative or overflows int64.
inline std::int64_t checked_count(const std::vector<std::int64_t>& shape) {
  if (shape.size() > max_ndim)
    fail("npy: shape has " + std::to_string(shape.size()) + " dimensions; at most " + std::to_string(max_ndim) +
         " are supported");
  for (std::int64_t d : shape)
    if (d < 0) fail("npy: shape " + shape_string(shape) + " has a negative dimension");
  for (std::int64_t d : shape)
    if (d == 0) return 0;
  std::int64_t n = 1;
  for (std::int64_t d : shape) {
    if (n > std::numeric_limits<std::int64_t>::max() / d)
      fail("npy: shape " + shape_string(shape) + " has more elements than fit in 64 bits");
    n *= d;
  }
  return n;
}

/// Byte count of `count` elements of `t`, or fails when it overflows.
inline std::size_t checked_bytes(std::int64_t count, dtype t, const std::vector<std::int64_t>& shape) {
  const auto isz = static_cast<std::int64_t>(itemsize(t));
  if (count > std::numeric_limits<std::int64_t>::max() / isz ||
      static_cast<std::uint64_t>(count * isz) > static_cast<std::uint64_t>(std::numeric_limits<std::size_t>::max()))
    fail(std::string("npy: shape ") + shape_string(shape) + " of " + dtype_name(t) +
         " has more bytes than this machine can address");
  return static_cast<std::size_t>(count * isz);
}

// Little-endian loads and stores that do not depend on the host's byte order.
template <class U>
U load_le(const unsigned char* p) {
  static_assert(std::is_unsigned_v<U>, "unsigned bit pattern");
  U v = 0;
  for (std::size_t i = 0; i < sizeof(U); ++i) v = static_cast<U>(v | static_cast<U>(static_cast<U>(p[i]) << (8 * i)));
  return v;
}
template <class U>
void store_le(unsigned char* p, U v) {
  static_assert(std::is_unsigned_v<U>, "unsigned bit pattern");
  for (std::size_t i = 0; i < sizeof(U); ++i) p[i] = static_cast<unsigned char>((v >> (8 * i)) & 0xffu);
}

template <class T>
using bits_t =
    std::conditional_t<sizeof(T) == 8, std::uint64_t, std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint8_t>>;

template <class T>
std::vector<T> decode(const unsigned char* p, std::size_t n) {
  std::vector<T> out(n);
  for (std::size_t i = 0; i < n; ++i) {
    const auto b = load_le<bits_t<T>>(p + i * sizeof(T));
    std::memcpy(&out[i], &b, sizeof(T));
  }
  return out;
}

template <class T>
void encode(const std::vector<T>& v, unsigned char* p) {
  for (std::size_t i = 0; i < v.size(); ++i) {
    bits_t<T> b;
    std::memcpy(&b, &v[i], sizeof(T));
    store_le(p + i * sizeof(T), b);
  }
}

/// Recursive-descent parser of the header dict. `pos` never passes `end`.
class header_parser {
 public:
  header_parser(const char* b, const char* e) : p_(b), end_(e) {}

  struct result {
    std::string descr;
    bool fortran_order = false;
    std::vector<std::int64_t> shape;
  };

  result parse() {
    result r;
    bool has_descr = false, has_fortran = false, has_shape = false;
    skip_ws();
    expect('{', "the header must start with '{'");
    skip_ws();
    bool first = true;
    while (true) {
      skip_ws();
      if (peek() == '}') break;
      if (!first) {
        expect(',', "expected ',' or '}' between the header entries");
        skip_ws();
        if (peek() == '}') break;  // trailing comma
      }
      first = false;
      const std::string key = parse_string("a header key");
      skip_ws();
      expect(':', "expected ':' after the header key '" + key + "'");
      skip_ws();
      if (key == "descr") {
        if (has_descr) fail("npy: header has the key 'descr' twice");
        has_descr = true;
        r.descr = parse_string("the value of 'descr'");
      } else if (key == "fortran_order") {
        if (has_fortran) fail("npy: header has the key 'fortran_order' twice");
        has_fortran = true;
        r.fortran_order = parse_bool();
      } else if (key == "shape") {
        if (has_shape) fail("npy: header has the key 'shape' twice");
        has_shape = true;
        r.shape = parse_tuple();
      } else {
        fail("npy: header has the unexpected key '" + key + "'; only 'descr', 'fortran_order' and 'shape' are allowed");
      }
    }
    expect('}', "the header must end with '}'");
    skip_ws();
    if (p_ != end_) fail("npy: unexpected characters after the closing '}' of the header");
    if (!has_descr) fail("npy: header has no 'descr' key");
    if (!has_fortran) fail("npy: header has no 'fortran_order' key");
    if (!has_shape) fail("npy: header has no 'shape' key");
    return r;
  }

 private:
  const char* p_;
  const char* end_;

  int peek() const { return p_ < end_ ? static_cast<unsigned char>(*p_) : -1; }
  void skip_ws() {
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\n' || *p_ == '\t' || *p_ == '\r')) ++p_;
  }
  void expect(char c, const std::string& what) {
    if (peek() != static_cast<unsigned char>(c)) fail("npy: malformed header: " + what);
    ++p_;
  }
  bool match(const char* word) {
    const std::size_t n = std::strlen(word);
    if (static_cast<std::size_t>(end_ - p_) < n || std::memcmp(p_, word, n) != 0) return false;
    p_ += n;
    return true;
  }
  std::string parse_string(const std::string& what) {
    const int q = peek();
    if (q != '\'' && q != '"') fail("npy: malformed header: expected a quoted string for " + what);
    ++p_;
    std::string s;
    while (true) {
      const int c = peek();
      if (c < 0) fail("npy: malformed header: unterminated string in " + what);
      ++p_;
      if (c == q) break;
      if (c == '\\') fail("npy: malformed header: escape sequences are not supported in " + what);
      if (c < 0x20 || c > 0x7e) fail("npy: malformed header: non-printable character in " + what);
      if (s.size() >= 64) fail("npy: malformed header: " + what + " is too long");
      s.push_back(static_cast<char>(c));
    }
    return s;
  }
  bool parse_bool() {
    if (match("True")) return true;
    if (match("False")) return false;
    fail("npy: malformed header: 'fortran_order' must be True or False");
  }
  std::int64_t parse_int() {
    if (peek() == '-') fail("npy: shape has a negative dimension");
    if (peek() < '0' || peek() > '9') fail("npy: malformed header: expected a non-negative integer in 'shape'");
    std::uint64_t v = 0;
    const auto lim = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
    while (peek() >= '0' && peek() <= '9') {
      const auto d = static_cast<std::uint64_t>(peek() - '0');
      if (v > (lim - d) / 10) fail("npy: shape has a dimension larger than 2^63 - 1");
      v = v * 10 + d;
      ++p_;
    }
    return static_cast<std::int64_t>(v);
  }
  std::vector<std::int64_t> parse_tuple() {
    expect('(', "'shape' must be a tuple such as (2, 3)");
    std::vector<std::int64_t> dims;
    skip_ws();
    if (peek() == ')') {
      ++p_;
      return dims;
    }
    bool trailing_comma = false;
    while (true) {
      if (dims.size() >= max_ndim) fail("npy: shape has more than " + std::to_string(max_ndim) + " dimensions");
      dims.push_back(parse_int());
      skip_ws();
      trailing_comma = false;
      if (peek() == ',') {
        ++p_;
        trailing_comma = true;
        skip_ws();
      }
      if (peek() == ')') break;
      if (!trailing_comma) fail("npy: malformed header: expected ',' or ')' in 'shape'");
    }
    ++p_;
    if (dims.size() == 1 && !trailing_comma)
      fail("npy: malformed header: 'shape' (n) is not a tuple; a one-dimensional shape is written (n,)");
    return dims;
  }
};

inline dtype parse_descr(const std::string& d) {
  if (d == "<f4") return dtype::f4;
  if (d == "<f8") return dtype::f8;
  if (d == "<i4") return dtype::i4;
  if (d == "<i8") return dtype::i8;
  if (d == "|u1") return dtype::u1;
  if (d == "|b1") return dtype::b1;
  if (!d.empty() && d[0] == '>')
    fail("npy: big-endian data ('" + d + "') is not supported; save the array as little-endian");
  fail("npy: unsupported dtype '" + d + "'; supported: <f4 <f8 <i4 <i8 |u1 |b1");
}

}  // namespace detail

/// An n-dimensional array in C order. Elements are held in the C++ type of their dtype
/// (float, double, int32, int64, uint8; bool as uint8 0/1).
class array {
 public:
  using storage = std::variant<std::vector<float>, std::vector<double>, std::vector<std::int32_t>,
                               std::vector<std::int64_t>, std::vector<std::uint8_t>>;

  /// An empty float64 array of shape (0,).
  array() : type_(dtype::f8), shape_{0}, data_(std::vector<double>{}) {}

  /// An array of the given shape and values; the dtype follows T (float, double, int32_t,
  /// int64_t, uint8_t). `values` must have exactly as many elements as the shape.
  template <class T>
  static array from(std::vector<std::int64_t> shape, std::vector<T> values) {
    return array(dtype_of<T>::value, std::move(shape), storage(std::move(values)));
  }
  /// A bool array; every value must be 0 or 1.
  static array from_bool(std::vector<std::int64_t> shape, std::vector<std::uint8_t> values) {
    for (std::uint8_t v : values)
      if (v > 1) detail::fail("npy: a bool array may only hold 0 and 1");
    return array(dtype::b1, std::move(shape), storage(std::move(values)));
  }
  /// A zero-filled array of the given dtype and shape.
  static array zeros(dtype t, std::vector<std::int64_t> shape) {
    const auto n = static_cast<std::size_t>(detail::checked_count(shape));
    (void)detail::checked_bytes(static_cast<std::int64_t>(n), t, shape);
    switch (t) {
      case dtype::f4:
        return array(t, std::move(shape), storage(std::vector<float>(n)));
      case dtype::f8:
        return array(t, std::move(shape), storage(std::vector<double>(n)));
      case dtype::i4:
        return array(t, std::move(shape), storage(std::vector<std::int32_t>(n)));
      case dtype::i8:
        return array(t, std::move(shape), storage(std::vector<std::int64_t>(n)));
      default:
        return array(t, std::move(shape), storage(std::vector<std::uint8_t>(n)));
    }
  }

  dtype type() const { return type_; }
  const std::vector<std::int64_t>& shape() const { return shape_; }
  std::size_t ndim() const { return shape_.size(); }
  /// Number of elements (1 for shape ()).
  std::int64_t size() const { return detail::checked_count(shape_); }
  /// "float64 (2, 3)", for messages.
  std::string describe() const { return std::string(dtype_name(type_)) + " " + shape_string(shape_); }

  /// The elements; T must be the type that holds this array's dtype (uint8_t for bool).
  template <class T>
  const std::vector<T>& values() const {
    const auto* v = std::get_if<std::vector<T>>(&data_);
    if (!v) detail::fail(std::string("npy: array holds ") + dtype_name(type_) + ", not the requested type");
    return *v;
  }
  template <class T>
  std::vector<T>& values() {
    auto* v = std::get_if<std::vector<T>>(&data_);
    if (!v) detail::fail(std::string("npy: array holds ") + dtype_name(type_) + ", not the requested type");
    return *v;
  }
  /// The elements converted to double (exact for every dtype except int64 beyond 2^53).
  std::vector<double> to_doubles() const {
    return std::visit(
        [](const auto& v) {
          std::vector<double> out(v.size());
          for (std::size_t i = 0; i < v.size(); ++i) out[i] = static_cast<double>(v[i]);
          return out;
        },
        data_);
  }

 private:
  dtype type_;
  std::vector<std::int64_t> shape_;
  storage data_;

  array(dtype t, std::vector<std::int64_t> shape, storage data)
      : type_(t), shape_(std::move(shape)), data_(std::move(data)) {
    const std::int64_t n = detail::checked_count(shape_);
    const std::size_t have = std::visit([](const auto& v) { return v.size(); }, data_);
    if (static_cast<std::uint64_t>(n) != static_cast<std::uint64_t>(have))
      detail::fail("npy: shape " + shape_string(shape_) + " has " + std::to_string(n) + " elements but " +
                   std::to_string(have) + " values were given");
  }
};

/// Parses a complete .npy file held in memory. Throws npy_error on anything it does not
/// accept; never reads outside [data, data + size).
inline array parse_npy(const std::uint8_t* data, std::size_t size) {
  using detail::fail;
  if (data == nullptr && size != 0) fail("npy: null buffer");
  static const unsigned char magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
  if (size == 0) fail("npy: empty file");
  if (std::memcmp(data, magic, size < 6 ? size : 6) != 0)
    fail("npy: not a .npy file (it does not start with the magic string \\x93NUMPY)");
  if (size < 8) fail("npy: truncated file: " + std::to_string(size) + " bytes is shorter than the .npy preamble");
  const unsigned major = data[6], minor = data[7];
  std::size_t header_len = 0, header_start = 0;
  if (major == 1 && minor == 0) {
    if (size < 10) fail("npy: truncated file: the version 1.0 preamble needs 10 bytes");
    header_len = detail::load_le<std::uint16_t>(data + 8);
    header_start = 10;
  } else if (major == 2 && minor == 0) {
    if (size < 12) fail("npy: truncated file: the version 2.0 preamble needs 12 bytes");
    header_len = detail::load_le<std::uint32_t>(data + 8);
    header_start = 12;
  } else {
    fail("npy: format version " + std::to_string(major) + "." + std::to_string(minor) +
         " is not supported; only 1.0 and 2.0 are read");
  }
  if (header_len > size - header_start)
    fail("npy: truncated header: it declares " + std::to_string(header_len) + " bytes but only " +
         std::to_string(size - header_start) + " follow the preamble");
  for (std::size_t i = 0; i < header_len; ++i) {
    const unsigned char c = data[header_start + i];
    if ((c < 0x20 || c > 0x7e) && c != '\n' && c != '\t' && c != '\r')
      fail("npy: malformed header: it contains a non-ASCII or control byte");
  }
  const char* hb = reinterpret_cast<const char*>(data + header_start);
  const auto h = detail::header_parser(hb, hb + header_len).parse();
  const dtype t = detail::parse_descr(h.descr);
  if (h.fortran_order) fail("npy: Fortran-ordered arrays (fortran_order: True) are not supported; save in C order");
  const std::int64_t count = detail::checked_count(h.shape);
  const std::size_t nbytes = detail::checked_bytes(count, t, h.shape);
  const std::size_t body = header_start + header_len;
  const std::size_t have = size - body;
  if (have < nbytes)
    fail("npy: truncated data: shape " + shape_string(h.shape) + " of " + dtype_name(t) + " needs " +
         std::to_string(nbytes) + " bytes but only " + std::to_string(have) + " are present");
  if (have > nbytes)
    fail("npy: " + std::to_string(have - nbytes) + " unexpected bytes after the data of shape " +
         shape_string(h.shape) + " of " + dtype_name(t));
  const unsigned char* p = data + body;
  const auto n = static_cast<std::size_t>(count);
  switch (t) {
    case dtype::f4:
      return array::from(h.shape, detail::decode<float>(p, n));
    case dtype::f8:
      return array::from(h.shape, detail::decode<double>(p, n));
    case dtype::i4:
      return array::from(h.shape, detail::decode<std::int32_t>(p, n));
    case dtype::i8:
      return array::from(h.shape, detail::decode<std::int64_t>(p, n));
    case dtype::u1:
      return array::from(h.shape, std::vector<std::uint8_t>(p, p + n));
    default: {
      for (std::size_t i = 0; i < n; ++i)
        if (p[i] > 1)
          fail("npy: bool array holds the byte " + std::to_string(p[i]) + " at element " + std::to_string(i) +
               "; a bool must be 0 or 1");
      return array::from_bool(h.shape, std::vector<std::uint8_t>(p, p + n));
    }
  }
}

/// The bytes of a version 1.0 .npy file holding `a`; the header is padded so that the
/// data starts at a multiple of 64 bytes.
inline std::vector<std::uint8_t> serialize_npy(const array& a) {
  std::string header = std::string("{'descr': '") + descr(a.type()) +
                       "', 'fortran_order': False, 'shape': " + shape_string(a.shape()) + ", }";
  const std::size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header.push_back('\n');
  if (header.size() > 0xffff) detail::fail("npy: header too long for format version 1.0");
  const std::size_t n = static_cast<std::size_t>(a.size());
  const std::size_t nbytes = detail::checked_bytes(a.size(), a.type(), a.shape());
  std::vector<std::uint8_t> out(10 + header.size() + nbytes);
  const unsigned char magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
  std::memcpy(out.data(), magic, 6);
  out[6] = 1;
  out[7] = 0;
  detail::store_le(out.data() + 8, static_cast<std::uint16_t>(header.size()));
  std::memcpy(out.data() + 10, header.data(), header.size());
  unsigned char* p = out.data() + 10 + header.size();
  switch (a.type()) {
    case dtype::f4:
      detail::encode(a.values<float>(), p);
      break;
    case dtype::f8:
      detail::encode(a.values<double>(), p);
      break;
    case dtype::i4:
      detail::encode(a.values<std::int32_t>(), p);
      break;
    case dtype::i8:
      detail::encode(a.values<std::int64_t>(), p);
      break;
    default: {
      const auto& v = a.values<std::uint8_t>();
      if (n) std::memcpy(p, v.data(), n);
    }
  }
  return out;
}

/// Reads and parses a .npy file; messages name the file.
inline array read_npy(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) detail::fail(path + ": is a directory, not a .npy file");
  std::ifstream f(path, std::ios::binary);
  if (!f) detail::fail(path + ": cannot open the file for reading");
  f.seekg(0, std::ios::end);
  const std::streamoff len = f.tellg();
  if (len < 0) detail::fail(path + ": cannot read the file (is it a directory?)");
  f.seekg(0, std::ios::beg);
  std::vector<std::uint8_t> buf(static_cast<std::size_t>(len));
  if (len > 0 && !f.read(reinterpret_cast<char*>(buf.data()), static_cast<std::streamsize>(len)))
    detail::fail(path + ": cannot read the file");
  try {
    return parse_npy(buf.data(), buf.size());
  } catch (const npy_error& e) {
    std::string msg = e.what();
    if (msg.compare(0, 5, "npy: ") == 0) msg.erase(0, 5);
    throw npy_error(path + ": " + msg);
  }
}

/// Writes `a` as a version 1.0 .npy file (overwriting); messages name the file.
inline void write_npy(const std::string& path, const array& a) {
  const auto bytes = serialize_npy(a);
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) detail::fail(path + ": cannot open the file for writing");
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  f.close();
  if (!f) detail::fail(path + ": cannot write the file");
}

}  // namespace npy
}  // namespace moereg_eval
