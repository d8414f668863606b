// The .npy reader/writer of moereg-eval (tools/moereg-eval/npy.hpp): round trips of every
// dtype and shape, byte-exact agreement with the files numpy writes, and the refusal of
// every malformed case with a clear message (never a crash, never another exception type).
#include <catch2/catch.hpp>

#include <moereg-eval/npy.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

namespace npy = moereg_eval::npy;
using bytes = std::vector<std::uint8_t>;
using shape_t = std::vector<std::int64_t>;

// A .npy file from a header dict written by hand: the preamble of `major`.0, the dict,
// space padding to a multiple of 64 and '\n' (unless `raw`), then `data`.
bytes make_file(std::string dict, const bytes& data, int major = 1, bool raw = false) {
  const std::size_t pre = major == 1 ? 10 : 12;
  if (!raw) {
    const std::size_t unpadded = pre + dict.size() + 1;
    dict.append((64 - unpadded % 64) % 64, ' ');
    dict.push_back('\n');
  }
  bytes out = {0x93, 'N', 'U', 'M', 'P', 'Y', static_cast<std::uint8_t>(major), 0};
  const std::size_t n = dict.size();
  out.push_back(static_cast<std::uint8_t>(n & 0xff));
  out.push_back(static_cast<std::uint8_t>((n >> 8) & 0xff));
  if (major != 1) {
    out.push_back(static_cast<std::uint8_t>((n >> 16) & 0xff));
    out.push_back(static_cast<std::uint8_t>((n >> 24) & 0xff));
  }
  out.insert(out.end(), dict.begin(), dict.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

std::string dict_of(const std::string& descr, const std::string& shape, const std::string& fortran = "False") {
  return "{'descr': '" + descr + "', 'fortran_order': " + fortran + ", 'shape': " + shape + ", }";
}

// Parses `b` and requires an npy_error whose message contains `what`.
void expect_reject(const bytes& b, const std::string& what) {
  INFO("expected a refusal mentioning \"" << what << "\"");
  bool threw = false;
  try {
    (void)npy::parse_npy(b.data(), b.size());
  } catch (const npy::npy_error& e) {
    threw = true;
    const std::string msg = e.what();
    INFO("message: " << msg);
    CHECK(msg.find(what) != std::string::npos);
    CHECK(msg.find('\n') == std::string::npos);
  }
  CHECK(threw);
}

// Values that exercise every bit of each type, `n` of them.
template <class T>
std::vector<T> sample_values(std::size_t n, std::mt19937_64& gen) {
  std::vector<T> v(n);
  if constexpr (std::is_floating_point_v<T>) {
    const T specials[] = {T(0),
                          -T(0),
                          T(1.5),
                          std::numeric_limits<T>::max(),
                          std::numeric_limits<T>::lowest(),
                          std::numeric_limits<T>::denorm_min(),
                          std::numeric_limits<T>::infinity(),
                          -std::numeric_limits<T>::infinity(),
                          std::numeric_limits<T>::quiet_NaN()};
    std::normal_distribution<double> nd(0.0, 1e3);
    for (std::size_t i = 0; i < n; ++i) v[i] = i < 9 ? specials[i] : static_cast<T>(nd(gen));
  } else {
    const T specials[] = {T(0), std::numeric_limits<T>::max(), std::numeric_limits<T>::min(), T(1)};
    std::uniform_int_distribution<long long> ud(static_cast<long long>(std::numeric_limits<T>::min()),
                                                static_cast<long long>(std::numeric_limits<T>::max()));
    for (std::size_t i = 0; i < n; ++i) v[i] = i < 4 ? specials[i] : static_cast<T>(ud(gen));
  }
  return v;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

std::size_t count_of(const shape_t& s) {
  std::size_t n = 1;
  for (auto d : s) n *= static_cast<std::size_t>(d);
  return n;
}

template <class T>
void round_trip(const shape_t& shape, std::mt19937_64& gen, bool as_bool = false) {
  std::vector<T> vals = sample_values<T>(count_of(shape), gen);
  npy::array a;
  if constexpr (std::is_same_v<T, std::uint8_t>) {
    if (as_bool) {
      for (auto& x : vals) x = static_cast<T>(x & 1);
      a = npy::array::from_bool(shape, vals);
    } else {
      a = npy::array::from<T>(shape, vals);
    }
  } else {
    a = npy::array::from<T>(shape, vals);
  }
  const bytes file = npy::serialize_npy(a);
  INFO("dtype " << npy::dtype_name(a.type()) << " shape " << npy::shape_string(shape));

  // Layout of what we write: version 1.0, data aligned to 64 bytes, header ends with '\n'.
  REQUIRE(file.size() >= 10);
  CHECK(file[0] == 0x93);
  CHECK(std::string(file.begin() + 1, file.begin() + 6) == "NUMPY");
  CHECK(file[6] == 1);
  CHECK(file[7] == 0);
  const std::size_t hlen = file[8] | (static_cast<std::size_t>(file[9]) << 8);
  CHECK((10 + hlen) % 64 == 0);
  CHECK(file[10 + hlen - 1] == '\n');
  CHECK(file.size() == 10 + hlen + vals.size() * sizeof(T));

  const npy::array b = npy::parse_npy(file.data(), file.size());
  CHECK(b.type() == a.type());
  CHECK(b.shape() == shape);
  CHECK(b.size() == static_cast<std::int64_t>(vals.size()));
  CHECK(same_bits(b.values<T>(), vals));
}

}  // namespace

TEST_CASE("npy: every dtype and shape round-trips bit for bit", "[npy]") {
  std::mt19937_64 gen(20240601);
  const std::vector<shape_t> shapes = {{}, {0}, {3}, {2, 3, 4}, {5, 0, 2}, {1, 1, 1, 1, 17}};
  for (const auto& s : shapes) {
    round_trip<float>(s, gen);
    round_trip<double>(s, gen);
    round_trip<std::int32_t>(s, gen);
    round_trip<std::int64_t>(s, gen);
    round_trip<std::uint8_t>(s, gen);
    round_trip<std::uint8_t>(s, gen, /*as_bool=*/true);
  }
}

TEST_CASE("npy: files round-trip through the file system", "[npy]") {
  const auto dir =
      std::filesystem::temp_directory_path() / ("moereg_npy_test_" + std::to_string(std::random_device{}()));
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "a.npy").string();
  const auto a = npy::array::from<double>({2, 3}, {1, 2, 3, 4, 5, 6.25});
  npy::write_npy(path, a);
  const auto b = npy::read_npy(path);
  CHECK(b.describe() == "float64 (2, 3)");
  CHECK(b.values<double>() == a.values<double>());
  // Messages from a file name it.
  try {
    (void)npy::read_npy((dir / "missing.npy").string());
    FAIL("reading a missing file must throw");
  } catch (const npy::npy_error& e) {
    CHECK(std::string(e.what()).find("missing.npy") != std::string::npos);
  }
  try {
    (void)npy::read_npy(dir.string());
    FAIL("reading a directory must throw");
  } catch (const npy::npy_error& e) {
    CHECK(std::string(e.what()).find("directory") != std::string::npos);
  }
  {
    std::ofstream f(dir / "bad.npy", std::ios::binary);
    f << "not an array";
  }
  try {
    (void)npy::read_npy((dir / "bad.npy").string());
    FAIL("reading garbage must throw");
  } catch (const npy::npy_error& e) {
    const std::string msg = e.what();
    CHECK(msg.find("bad.npy") != std::string::npos);
    CHECK(msg.find("magic") != std::string::npos);
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("npy: byte-exact agreement with numpy.save", "[npy]") {
  // numpy.save(np.arange(6, dtype='<f8').reshape(2, 3) * 0.5) writes exactly these bytes.
  std::string header = "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }";
  header.append(117 - header.size(), ' ');
  header.push_back('\n');
  const std::string preamble("\x93NUMPY\x01\x00\x76\x00", 10);  // version 1.0, header length 118
  const std::string text = preamble + header;
  bytes golden(text.begin(), text.end());
  // 0.0, 0.5, 1.0, 1.5, 2.0, 2.5 as IEEE-754 binary64, little-endian.
  const std::uint64_t bits[] = {0x0000000000000000ull, 0x3FE0000000000000ull, 0x3FF0000000000000ull,
                                0x3FF8000000000000ull, 0x4000000000000000ull, 0x4004000000000000ull};
  for (std::uint64_t b : bits)
    for (int i = 0; i < 8; ++i) golden.push_back(static_cast<std::uint8_t>((b >> (8 * i)) & 0xff));
  REQUIRE(golden.size() == 176);

  const auto a = npy::parse_npy(golden.data(), golden.size());
  CHECK(a.describe() == "float64 (2, 3)");
  CHECK(a.values<double>() == std::vector<double>{0.0, 0.5, 1.0, 1.5, 2.0, 2.5});
  CHECK(npy::serialize_npy(a) == golden);

  // numpy.save(np.array(True)): a bool scalar, 129 bytes.
  std::string h2 = "{'descr': '|b1', 'fortran_order': False, 'shape': (), }";
  h2.append(117 - h2.size(), ' ');
  h2.push_back('\n');
  const std::string text2 = preamble + h2;
  bytes g2(text2.begin(), text2.end());
  g2.push_back(1);
  const auto b = npy::parse_npy(g2.data(), g2.size());
  CHECK(b.describe() == "bool ()");
  CHECK(b.values<std::uint8_t>() == std::vector<std::uint8_t>{1});
  CHECK(npy::serialize_npy(b) == g2);
}

TEST_CASE("npy: accepted header variants and format version 2.0", "[npy]") {
  const bytes d12(12 * 4, 0);  // 12 int32 zeros
  const bytes d3 = {1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0};
  SECTION("version 2.0") {
    const auto f = make_file(dict_of("<i4", "(3,)"), d3, 2);
    const auto a = npy::parse_npy(f.data(), f.size());
    CHECK(a.values<std::int32_t>() == std::vector<std::int32_t>{1, 2, 3});
  }
  SECTION("double quotes, other key order, no trailing comma, odd spacing, no padding") {
    const std::vector<std::string> dicts = {
        "{\"descr\": \"<i4\", \"fortran_order\": False, \"shape\": (3, 4)}",
        "{'shape': (3, 4), 'fortran_order': False, 'descr': '<i4'}",
        "{'descr':'<i4','fortran_order':False,'shape':(3,4),}",
        "  {  'descr' : '<i4' ,\n 'fortran_order' : False , 'shape' : ( 3 , 4 , ) , }  \n",
    };
    for (const auto& d : dicts) {
      INFO(d);
      const auto f = make_file(d, d12, 1, /*raw=*/true);
      const auto a = npy::parse_npy(f.data(), f.size());
      CHECK(a.describe() == "int32 (3, 4)");
    }
  }
  SECTION("a zero dimension beside a huge one holds no data") {
    const auto f = make_file(dict_of("<f8", "(0, 9223372036854775807)"), {});
    const auto a = npy::parse_npy(f.data(), f.size());
    CHECK(a.size() == 0);
    CHECK(a.shape() == shape_t{0, 9223372036854775807LL});
  }
}

TEST_CASE("npy: malformed files are refused with a clear message", "[npy]") {
  const bytes d8(8, 0);
  const auto good = make_file(dict_of("<f8", "(1,)"), d8);

  SECTION("magic and preamble") {
    expect_reject({}, "empty");
    expect_reject({'a', 'b', 'c'}, "magic");
    bytes b = good;
    b[5] = 'Z';
    expect_reject(b, "magic");
    expect_reject(bytes(good.begin(), good.begin() + 7), "truncated");
    expect_reject(bytes(good.begin(), good.begin() + 9), "truncated");
    b = good;
    b[6] = 3;
    expect_reject(b, "version 3.0");
    b = good;
    b[7] = 1;
    expect_reject(b, "version 1.1");
    b = good;
    b[8] = 0xff;
    b[9] = 0xff;
    expect_reject(b, "truncated header");
    const auto v2 = make_file(dict_of("<f8", "(1,)"), d8, 2);
    expect_reject(bytes(v2.begin(), v2.begin() + 11), "truncated");
    CHECK_THROWS_AS(npy::parse_npy(nullptr, 5), npy::npy_error);
  }
  SECTION("order, byte order and dtype") {
    expect_reject(make_file(dict_of("<f8", "(1,)", "True"), d8), "Fortran");
    expect_reject(make_file(dict_of(">f8", "(1,)"), d8), "big-endian");
    expect_reject(make_file(dict_of(">i4", "(2,)"), d8), "big-endian");
    for (const char* d : {"<f2", "<u4", "|O", "<c16", "<U3", "|S1", "<i2", "|i1", "f8", "=f8", "<f16", ""})
      expect_reject(make_file(dict_of(d, "(1,)"), d8), "unsupported dtype");
  }
  SECTION("header dict") {
    expect_reject(make_file("{'fortran_order': False, 'shape': (1,)}", d8), "no 'descr'");
    expect_reject(make_file("{'descr': '<f8', 'shape': (1,)}", d8), "no 'fortran_order'");
    expect_reject(make_file("{'descr': '<f8', 'fortran_order': False}", d8), "no 'shape'");
    expect_reject(make_file("{'descr': '<f8', 'fortran_order': False, 'shape': (1,), 'x': 1}", d8), "unexpected key");
    expect_reject(make_file("{'descr': '<f8', 'descr': '<f8', 'fortran_order': False, 'shape': (1,)}", d8), "twice");
    expect_reject(make_file("'descr': '<f8', 'fortran_order': False, 'shape': (1,)}", d8), "malformed");
    expect_reject(make_file("{'descr': '<f8', 'fortran_order': False, 'shape': (1,)", d8), "malformed");
    expect_reject(make_file("{'descr': '<f8, 'fortran_order': False, 'shape': (1,)}", d8), "malformed");
    expect_reject(make_file("{'descr': '<f8' 'fortran_order': False, 'shape': (1,)}", d8), "malformed");
    expect_reject(make_file("{'descr': '<f8', 'fortran_order': False, 'shape': (1,)} x", d8), "after the closing");
    expect_reject(make_file("{'descr': '<f8', 'fortran_order': false, 'shape': (1,)}", d8), "True or False");
    expect_reject(make_file("{'descr': '\\x3cf8', 'fortran_order': False, 'shape': (1,)}", d8), "escape");
    expect_reject(make_file("{descr: '<f8', 'fortran_order': False, 'shape': (1,)}", d8), "malformed");
    expect_reject(make_file("{,}", d8), "malformed");
    expect_reject(make_file("{'descr': '<f8', 'fortran_order': False, 'shape': (1,)}\x01", d8, 1, true), "control");
    expect_reject(make_file("{'descr': '\xc3\xa9', 'fortran_order': False, 'shape': (1,)}", d8), "non-ASCII");
    expect_reject(make_file("", d8, 1, true), "malformed");
  }
  SECTION("shape") {
    expect_reject(make_file(dict_of("<f8", "(1)"), d8), "not a tuple");
    expect_reject(make_file(dict_of("<f8", "1"), d8), "tuple");
    expect_reject(make_file(dict_of("<f8", "[1]"), d8), "tuple");
    expect_reject(make_file(dict_of("<f8", "(-1,)"), d8), "negative");
    expect_reject(make_file(dict_of("<f8", "(1,,)"), d8), "malformed");
    expect_reject(make_file(dict_of("<f8", "(1 2)"), d8), "malformed");
    expect_reject(make_file(dict_of("<f8", "(a,)"), d8), "malformed");
    expect_reject(make_file(dict_of("<f8", "(1.0,)"), d8), "malformed");
    expect_reject(make_file(dict_of("<f8", "(1,"), d8), "malformed");
    expect_reject(make_file(dict_of("<f8", "(99999999999999999999,)"), d8), "larger than 2^63");
    expect_reject(make_file(dict_of("<f8", "(9223372036854775808,)"), d8), "larger than 2^63");
    expect_reject(make_file(dict_of("<f8", "(4294967296, 4294967296)"), d8), "64 bits");
    expect_reject(make_file(dict_of("<f8", "(2305843009213693952,)"), d8), "more bytes");
    expect_reject(make_file(dict_of("<f8", "(1000000000,)"), d8), "truncated data");
    std::string many = "(";
    for (int i = 0; i < 65; ++i) many += "1, ";
    expect_reject(make_file(dict_of("<f8", many + ")"), d8), "dimensions");
  }
  SECTION("data") {
    expect_reject(make_file(dict_of("<f8", "(2,)"), d8), "truncated data");
    expect_reject(make_file(dict_of("<f8", "()"), bytes(7, 0)), "truncated data");
    expect_reject(make_file(dict_of("<f8", "(1,)"), bytes(9, 0)), "unexpected bytes");
    expect_reject(make_file(dict_of("<f8", "(0,)"), bytes(1, 0)), "unexpected bytes");
    expect_reject(make_file(dict_of("|b1", "(3,)"), bytes{0, 1, 2}), "bool");
  }
}

TEST_CASE("npy: building arrays checks their size", "[npy]") {
  CHECK_THROWS_AS(npy::array::from<double>({2, 2}, {1, 2, 3}), npy::npy_error);
  CHECK_THROWS_AS(npy::array::from<double>({-1}, {}), npy::npy_error);
  CHECK_THROWS_AS(npy::array::from_bool({2}, {0, 2}), npy::npy_error);
  const auto z = npy::array::zeros(npy::dtype::i8, {2, 0});
  CHECK(z.size() == 0);
  CHECK(z.describe() == "int64 (2, 0)");
  CHECK_THROWS_AS(z.values<double>(), npy::npy_error);
  // moereg::error is the base: one catch handles the tool's and the library's errors.
  CHECK_THROWS_AS(npy::array::from<float>({3}, {1.0f}), moereg::error);
}

TEST_CASE("npy: hostile input never crashes the parser", "[npy]") {
  // Every prefix of valid files, and random byte mutations of them: the parser either
  // returns an array or throws npy_error, and nothing else. Run under AddressSanitizer
  // (MOEREG_SANITIZE=address,undefined) this also proves it never reads out of bounds.
  std::mt19937_64 gen(7);
  std::vector<bytes> seeds = {
      npy::serialize_npy(npy::array::from<double>({2, 3}, {1, 2, 3, 4, 5, 6})),
      npy::serialize_npy(npy::array::from<std::int32_t>({3}, {1, -2, 3})),
      npy::serialize_npy(npy::array::from_bool({}, {1})),
      make_file(dict_of("<i8", "(2, 1)"), bytes(16, 0), 2),
  };
  std::size_t accepted = 0, refused = 0;
  auto probe = [&](const bytes& b) {
    try {
      const auto a = npy::parse_npy(b.data(), b.size());
      (void)a.size();
      ++accepted;
    } catch (const npy::npy_error&) {
      ++refused;
    } catch (const std::exception& e) {
      FAIL("parse_npy threw something other than npy_error: " << e.what());
    }
  };
  for (const auto& s : seeds) {
    for (std::size_t n = 0; n < s.size(); ++n) {
      const bytes prefix(s.begin(), s.begin() + static_cast<std::ptrdiff_t>(n));
      // A strict prefix of a valid file always lacks something.
      CHECK_THROWS_AS(npy::parse_npy(prefix.data(), prefix.size()), npy::npy_error);
    }
    std::uniform_int_distribution<std::size_t> pos(0, s.size() - 1);
    std::uniform_int_distribution<int> byte(0, 255), count(1, 4);
    const char interesting[] = "(),:'\"{}-0123456789TrueFalse <>|fib ";
    std::uniform_int_distribution<std::size_t> pick(0, sizeof(interesting) - 2);
    for (int it = 0; it < 4000; ++it) {
      bytes b = s;
      const int c = count(gen);
      for (int j = 0; j < c; ++j) {
        const std::size_t p = pos(gen);
        b[p] = (it & 1) ? static_cast<std::uint8_t>(byte(gen)) : static_cast<std::uint8_t>(interesting[pick(gen)]);
      }
      if (it % 7 == 0) b.resize(pos(gen));
      probe(b);
    }
  }
  CHECK(refused > 0);
  CHECK(accepted > 0);  // mutations of the data bytes leave a valid file
}
