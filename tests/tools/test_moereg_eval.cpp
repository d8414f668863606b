// The moereg-eval command-line contract, tested by running the built binary on .npy inputs
// and comparing its outputs with the independent float64 reference (tests/reference).
// Also the argument parser (tools/moereg-eval/args.hpp) in-process.
#include <catch2/catch.hpp>

#include <moereg-eval/args.hpp>
#include <moereg-eval/npy.hpp>

#include "reference/reference.hpp"
#include "support/random.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#if !defined(_WIN32)
#include <sys/wait.h>
#endif

namespace {

namespace fs = std::filesystem;
namespace npy = moereg_eval::npy;
using vec = std::vector<double>;
using ivec = std::vector<long long>;

// ---- argument parser (in-process) ------------------------------------------------------

moereg_eval::arguments parse(std::vector<std::string> v) {
  return moereg_eval::parse_args(v);
}

void expect_arg_error(const std::vector<std::string>& v, const std::string& what) {
  INFO("arguments must be refused with a message mentioning \"" << what << "\"");
  try {
    (void)parse(v);
    FAIL("parse_args accepted them");
  } catch (const moereg::error& e) {
    INFO("message: " << e.what());
    CHECK(std::string(e.what()).find(what) != std::string::npos);
  }
}

}  // namespace

TEST_CASE("moereg-eval arguments: a full command line", "[moereg-eval][args]") {
  const auto a = parse({"load_balancing",
                        "--output-dir",
                        "out",
                        "--backend",
                        "cpu",
                        "--grad-scale",
                        "-2.5e-1",
                        "--coef",
                        "0.03",
                        "--scope",
                        "sequence",
                        "--seq-len",
                        "16",
                        "--in",
                        "probs=p.npy",
                        "--in",
                        "topk=dir/with=sign.npy",
                        "--stats-out",
                        "s.npy",
                        "--stats-in",
                        "r.npy"});
  CHECK(a.loss == "load_balancing");
  CHECK(a.output_dir == "out");
  CHECK(a.backend == "cpu");
  CHECK(a.grad_scale == -0.25);
  CHECK(a.stats_out == "s.npy");
  CHECK(a.stats_in == "r.npy");
  REQUIRE(a.options.size() == 3);
  CHECK(*a.option("coef") == "0.03");
  CHECK(*a.option("scope") == "sequence");
  CHECK(*a.option("seq-len") == "16");
  CHECK(a.option("eps") == nullptr);
  REQUIRE(a.inputs.size() == 2);
  CHECK(a.inputs[0] == std::make_pair(std::string("probs"), std::string("p.npy")));
  CHECK(a.inputs[1] == std::make_pair(std::string("topk"), std::string("dir/with=sign.npy")));
  // LOSS may come after options, and argc/argv works the same.
  const char* argv[] = {"moereg-eval", "--output-dir", "o", "z_loss", "--in", "logits=z.npy"};
  const auto b = moereg_eval::parse_args(6, argv);
  CHECK(b.loss == "z_loss");
  CHECK(b.grad_scale == 1.0);
  CHECK(b.backend == "cpu");
  CHECK(parse({"--help"}).help);
}

TEST_CASE("moereg-eval arguments: every malformed command line is refused", "[moereg-eval][args]") {
  const std::vector<std::string> ok = {"--output-dir", "o", "--in", "probs=p.npy"};
  auto with = [&](std::vector<std::string> extra) {
    std::vector<std::string> v = {"load_balancing"};
    v.insert(v.end(), ok.begin(), ok.end());
    v.insert(v.end(), extra.begin(), extra.end());
    return v;
  };
  expect_arg_error({}, "missing LOSS");
  expect_arg_error({"load_balancing", "--in", "probs=p.npy"}, "--output-dir");
  expect_arg_error({"load_balancing", "--output-dir", "o"}, "no inputs");
  expect_arg_error({"load_balancing", "--output-dir"}, "needs a value");
  expect_arg_error(with({"--output-dir", "p"}), "twice");
  expect_arg_error(with({"--foo", "1"}), "unknown option");
  expect_arg_error(with({"-x"}), "unknown option");
  expect_arg_error(with({"--coef", "1", "--coef", "2"}), "twice");
  expect_arg_error(with({"--coef"}), "needs a value");
  expect_arg_error(with({"--grad-scale", "abc"}), "number");
  expect_arg_error(with({"--grad-scale", "1.5x"}), "number");
  expect_arg_error(with({"--grad-scale", " 1"}), "number");
  expect_arg_error(with({"--grad-scale", "inf"}), "finite");
  expect_arg_error(with({"--grad-scale", "nan"}), "finite");
  expect_arg_error(with({"--grad-scale", "1e999"}), "finite");
  expect_arg_error(with({"--backend", "tpu"}), "cpu or cuda");
  expect_arg_error(with({"--in", "probs"}), "NAME=FILE");
  expect_arg_error(with({"--in", "=p.npy"}), "bad input name");
  expect_arg_error(with({"--in", "../x=p.npy"}), "bad input name");
  expect_arg_error(with({"--in", "topk="}), "file name");
  expect_arg_error(with({"--in", "probs=q.npy"}), "given twice");
  expect_arg_error(with({"extra"}), "unexpected argument");
  expect_arg_error(with({"--stats-in", ""}), "file name");
  CHECK_THROWS_AS(moereg_eval::parse_args(2, static_cast<const char* const*>(nullptr)), moereg::error);
  const char* null_arg[] = {"moereg-eval", nullptr};
  CHECK_THROWS_AS(moereg_eval::parse_args(2, null_arg), moereg::error);
  CHECK(moereg_eval::parse_int("--k", "-12") == -12);
  CHECK_THROWS_AS(moereg_eval::parse_int("--k", "99999999999999999999"), moereg::error);
  CHECK_THROWS_AS(moereg_eval::parse_int("--k", "2.5"), moereg::error);
  CHECK_THROWS_AS(moereg_eval::parse_int("--k", "-"), moereg::error);
}

TEST_CASE("moereg-eval arguments: random token soup only ever throws moereg::error", "[moereg-eval][args]") {
  const std::vector<std::string> pool = {"load_balancing",
                                         "z_loss",
                                         "--output-dir",
                                         "--in",
                                         "--coef",
                                         "--scope",
                                         "--grad-scale",
                                         "--backend",
                                         "--stats-in",
                                         "--stats-out",
                                         "--help",
                                         "-h",
                                         "probs=p.npy",
                                         "=",
                                         "x=",
                                         "1e-3",
                                         "-1",
                                         "",
                                         "--",
                                         "-",
                                         "cuda",
                                         "cpu",
                                         std::string("a\0b", 3),
                                         "\n",
                                         "--seq-len",
                                         "nan",
                                         "0x1p-3",
                                         "topk=t.npy"};
  std::mt19937_64 gen(99);
  std::uniform_int_distribution<std::size_t> len(0, 12), pick(0, pool.size() - 1);
  std::size_t accepted = 0;
  for (int it = 0; it < 20000; ++it) {
    std::vector<std::string> v(len(gen));
    for (auto& s : v) s = pool[pick(gen)];
    try {
      (void)parse(v);
      ++accepted;
    } catch (const moereg::error&) {
    } catch (const std::exception& e) {
      FAIL("parse_args threw something other than moereg::error: " << e.what());
    }
  }
  CHECK(accepted > 0);
}

#ifndef MOEREG_EVAL_PATH

TEST_CASE("moereg-eval binary", "[moereg-eval]") {
  WARN("MOEREG_EVAL_PATH is not defined (moereg-eval was not built): the binary tests are skipped");
}

#else

namespace {

// Worst relative error of the 1e-9 comparisons since the last report. Each test case that
// compares with the reference reports it at its end (a Catch2 warning, shown with -s or on
// failure): every test case may run in its own process under ctest.
double g_worst_rel = 0.0;

void report_worst(const char* what) {
  WARN("moereg-eval " << what << ": worst relative error against the float64 reference " << g_worst_rel);
  CHECK(g_worst_rel <= 1e-9);
  g_worst_rel = 0.0;
}

// A fresh directory under the system temp directory, removed at the end of the scope.
struct temp_dir {
  fs::path path;
  temp_dir() {
    static std::mt19937_64 gen(std::random_device{}());
    path = fs::temp_directory_path() / ("moereg_eval_test_" + std::to_string(gen()));
    fs::create_directories(path);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

struct run_result {
  int code = -1;
  std::string err;  // stderr
  std::string out;  // stdout
};

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

// Runs moereg-eval with `args`; stdout and stderr go to files in `scratch`.
run_result run_tool(const temp_dir& scratch, const std::vector<std::string>& args) {
  std::string cmd = shell_quote(MOEREG_EVAL_PATH);
  for (const auto& a : args) cmd += " " + shell_quote(a);
  const std::string out = scratch / "stdout.txt", err = scratch / "stderr.txt";
  cmd += " >" + shell_quote(out) + " 2>" + shell_quote(err);
  const int st = std::system(cmd.c_str());
  run_result r;
#if defined(_WIN32)
  r.code = st;
#else
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
#endif
  r.err = slurp(err);
  r.out = slurp(out);
  return r;
}

vec read_values(const std::string& path, npy::dtype expect_type, const std::vector<std::int64_t>& expect_shape) {
  const auto a = npy::read_npy(path);
  INFO(path << " is " << a.describe());
  CHECK(a.type() == expect_type);
  CHECK(a.shape() == expect_shape);
  return a.to_doubles();
}

double read_value(const std::string& dir) {
  const auto a = npy::read_npy(dir + "/value.npy");
  INFO("value.npy is " << a.describe());
  REQUIRE(a.type() == npy::dtype::f8);
  REQUIRE((a.shape().empty() || a.shape() == std::vector<std::int64_t>{1}));
  return a.values<double>()[0];
}

double rel_err(double a, double b) {
  return std::abs(a - b) / std::max(std::abs(b), 1e-300);
}

void check_close(const vec& got, const vec& want, double tol, const char* what) {
  REQUIRE(got.size() == want.size());
  const double r = moereg_test::rel_diff(got, want);
  if (tol <= 1e-9) g_worst_rel = std::max(g_worst_rel, r);
  INFO(what << ": relative error " << r);
  CHECK(r <= tol);
}

void check_close(double got, double want, double tol, const char* what) {
  const double r = rel_err(got, want);
  if (tol <= 1e-9) g_worst_rel = std::max(g_worst_rel, r);
  INFO(what << ": got " << got << ", want " << want << ", relative error " << r);
  CHECK(r <= tol);
}

// ---- writing inputs --------------------------------------------------------------------

void write_matrix(const std::string& path, const vec& v, long long rows, long long cols, bool f32 = false) {
  if (f32)
    npy::write_npy(path, npy::array::from<float>({rows, cols}, moereg_test::cast<float>(v)));
  else
    npy::write_npy(path, npy::array::from<double>({rows, cols}, v));
}

void write_topk(const std::string& path, const ivec& I, long long rows, long long k, bool i32 = false) {
  if (i32)
    npy::write_npy(path, npy::array::from<std::int32_t>({rows, k}, moereg_test::cast<std::int32_t>(I)));
  else
    npy::write_npy(path, npy::array::from<std::int64_t>({rows, k}, moereg_test::cast<std::int64_t>(I)));
}

// Writes a mask in one of the four accepted dtypes (0: uint8, 1: bool, 2: int32, 3: int64).
void write_mask(const std::string& path, const std::vector<std::uint8_t>& m, int kind) {
  const std::vector<std::int64_t> shape = {static_cast<std::int64_t>(m.size())};
  switch (kind) {
    case 0:
      npy::write_npy(path, npy::array::from<std::uint8_t>(shape, m));
      break;
    case 1:
      npy::write_npy(path, npy::array::from_bool(shape, m));
      break;
    case 2: {  // arbitrary nonzero values mean valid
      std::vector<std::int32_t> v(m.size());
      for (std::size_t i = 0; i < m.size(); ++i) v[i] = m[i] ? static_cast<std::int32_t>(i % 5 + 1) : 0;
      npy::write_npy(path, npy::array::from<std::int32_t>(shape, v));
      break;
    }
    default: {
      std::vector<std::int64_t> v(m.size());
      for (std::size_t i = 0; i < m.size(); ++i) v[i] = m[i] ? -7 : 0;
      npy::write_npy(path, npy::array::from<std::int64_t>(shape, v));
    }
  }
}

template <class T>
std::vector<T> rows_of(const std::vector<T>& v, long long r0, long long r1, long long width) {
  return std::vector<T>(v.begin() + r0 * width, v.begin() + r1 * width);
}

// A random load-balancing problem with padding and dropped slots.
struct lb_problem {
  long long T, E, k;
  vec P;
  ivec I;
  std::vector<std::uint8_t> mask;
  lb_problem(std::uint64_t seed, long long t, long long e, long long kk, double pad = 0.2) : T(t), E(e), k(kk) {
    moereg_test::rng r(seed);
    P = moereg_test::random_probs(r, T, E);
    I = moereg_test::random_topk(r, T, E, k, 0.2);
    mask = moereg_test::random_mask(r, T, pad);
  }
};

// Writes a part [r0, r1) of a problem into `d` as probs.npy, topk.npy, mask.npy.
void write_lb(const temp_dir& d, const lb_problem& p, long long r0, long long r1, bool f32 = false, bool i32 = false,
              int mask_kind = 0) {
  write_matrix(d / "probs.npy", rows_of(p.P, r0, r1, p.E), r1 - r0, p.E, f32);
  write_topk(d / "topk.npy", rows_of(p.I, r0, r1, p.k), r1 - r0, p.k, i32);
  write_mask(d / "mask.npy", rows_of(p.mask, r0, r1, 1), mask_kind);
}

std::vector<std::string> lb_inputs(const temp_dir& d) {
  return {"--in", "probs=" + (d / "probs.npy"), "--in", "topk=" + (d / "topk.npy"), "--in", "mask=" + (d / "mask.npy")};
}

std::vector<std::string> cat(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// Runs the tool and requires success with nothing on stderr.
void run_ok(const temp_dir& d, const std::vector<std::string>& args) {
  const auto r = run_tool(d, args);
  INFO("stderr: " << r.err);
  REQUIRE(r.code == 0);
  CHECK(r.err.empty());
}

}  // namespace

TEST_CASE("moereg-eval load_balancing, micro scope, matches the reference", "[moereg-eval]") {
  struct cfg {
    long long T, E, k;
    int mask_kind;  // -1: no mask input
    bool i32;
    double coef;
  };
  const cfg cases[] = {{37, 8, 3, 0, false, 1e-2},
                       {300, 5, 2, 1, true, 0.3},
                       {1, 4, 4, 2, false, 1e-2},
                       {513, 16, 6, 3, true, 2.0},
                       {29, 7, 1, -1, false, 1e-2}};
  std::uint64_t seed = 1;
  for (const auto& c : cases) {
    INFO("T=" << c.T << " E=" << c.E << " k=" << c.k << " mask kind " << c.mask_kind);
    temp_dir d;
    lb_problem p(seed++, c.T, c.E, c.k);
    if (c.mask_kind < 0) p.mask.assign(static_cast<std::size_t>(c.T), 1);
    write_lb(d, p, 0, c.T, false, c.i32, std::max(c.mask_kind, 0));
    auto in = lb_inputs(d);
    if (c.mask_kind < 0) in.resize(4);  // no mask input: every token valid
    std::vector<std::string> args = {"load_balancing", "--output-dir", d / "out"};
    if (c.coef != 1e-2) args = cat(args, {"--coef", std::to_string(c.coef)});
    run_ok(d, cat(args, in));
    const auto ref = moereg_ref::load_balancing(p.P, p.I, moereg_test::to_int_mask(p.mask), c.T, c.E, c.k, c.coef);
    check_close(read_value(d / "out"), ref.value, 1e-9, "value");
    check_close(read_values(d / "out/grad_probs.npy", npy::dtype::f8, {c.T, c.E}), ref.grad, 1e-9, "grad_probs");
    CHECK(!fs::exists(d / "out/grad_topk.npy"));
    CHECK(!fs::exists(d / "out/grad_mask.npy"));
  }
  report_worst("load_balancing micro");
}

TEST_CASE("moereg-eval load_balancing: --k and --grad-scale", "[moereg-eval]") {
  temp_dir d;
  const lb_problem p(11, 45, 9, 3);
  write_lb(d, p, 0, p.T);
  const auto ref = moereg_ref::load_balancing(p.P, p.I, moereg_test::to_int_mask(p.mask), p.T, p.E, p.k, 1e-2);
  for (double g : {2.5, -0.75, 0.0}) {
    INFO("grad scale " << g);
    run_ok(d, cat({"load_balancing", "--output-dir", d / "out", "--grad-scale", std::to_string(g)}, lb_inputs(d)));
    check_close(read_value(d / "out"), ref.value, 1e-9, "value (not scaled)");
    vec want = ref.grad;
    for (auto& x : want) x *= g;
    const vec got = read_values(d / "out/grad_probs.npy", npy::dtype::f8, {p.T, p.E});
    if (g == 0.0)
      CHECK(moereg_test::max_abs(got) == 0.0);
    else
      check_close(got, want, 1e-9, "scaled grad_probs");
  }
  // A configured k larger than the topk width divides the counts by it (f_e = count / (k T_v)).
  run_ok(d, cat({"load_balancing", "--output-dir", d / "outk", "--k", "5"}, lb_inputs(d)));
  const double s = 3.0 / 5.0;
  vec want = ref.grad;
  for (auto& x : want) x *= s;
  check_close(read_value(d / "outk"), ref.value * s, 1e-9, "value with --k 5");
  check_close(read_values(d / "outk/grad_probs.npy", npy::dtype::f8, {p.T, p.E}), want, 1e-9, "grad with --k 5");
  report_worst("load_balancing --k/--grad-scale");
}

TEST_CASE("moereg-eval load_balancing, sequence scope (--seq-len and cu_seqlens)", "[moereg-eval]") {
  SECTION("fixed length, one sequence fully padded") {
    temp_dir d;
    const long long B = 5, S = 23;
    lb_problem p(21, B * S, 6, 2);
    for (long long t = 2 * S; t < 3 * S; ++t) p.mask[static_cast<std::size_t>(t)] = 0;
    write_lb(d, p, 0, p.T);
    run_ok(d, cat({"load_balancing", "--output-dir", d / "out", "--scope", "sequence", "--seq-len", std::to_string(S),
                   "--coef", "0.02"},
                  lb_inputs(d)));
    ivec cu;
    for (long long b = 0; b <= B; ++b) cu.push_back(b * S);
    const auto ref =
        moereg_ref::load_balancing_seq(p.P, p.I, moereg_test::to_int_mask(p.mask), p.T, p.E, p.k, 0.02, cu);
    check_close(read_value(d / "out"), ref.value, 1e-9, "value");
    check_close(read_values(d / "out/grad_probs.npy", npy::dtype::f8, {p.T, p.E}), ref.grad, 1e-9, "grad_probs");
  }
  SECTION("packed sequences of uneven length, an empty one included") {
    for (bool i32 : {false, true}) {
      temp_dir d;
      const ivec cu = {0, 7, 7, 40, 41, 300, 333};
      lb_problem p(22, cu.back(), 10, 4);
      for (long long t = 7; t < 40; ++t) p.mask[static_cast<std::size_t>(t)] = 0;  // a fully padded sequence
      write_lb(d, p, 0, p.T);
      const std::vector<std::int64_t> shape = {static_cast<std::int64_t>(cu.size())};
      if (i32)
        npy::write_npy(d / "cu.npy", npy::array::from<std::int32_t>(shape, moereg_test::cast<std::int32_t>(cu)));
      else
        npy::write_npy(d / "cu.npy", npy::array::from<std::int64_t>(shape, moereg_test::cast<std::int64_t>(cu)));
      run_ok(d, cat({"load_balancing", "--output-dir", d / "out", "--scope", "sequence", "--in",
                     "cu_seqlens=" + (d / "cu.npy")},
                    lb_inputs(d)));
      const auto ref =
          moereg_ref::load_balancing_seq(p.P, p.I, moereg_test::to_int_mask(p.mask), p.T, p.E, p.k, 1e-2, cu);
      check_close(read_value(d / "out"), ref.value, 1e-9, "value");
      check_close(read_values(d / "out/grad_probs.npy", npy::dtype::f8, {p.T, p.E}), ref.grad, 1e-9, "grad_probs");
    }
  }
  SECTION("packed sequences: empty ones at the start and the end, the last row a valid token") {
    for (const ivec& cu : {ivec{0, 0, 0, 19, 19, 64, 64}, ivec{0, 64}}) {
      temp_dir d;
      lb_problem p(23, 64, 7, 3);
      p.mask[63] = 1;  // the row a cu_seqlens off by one at the end would lose
      write_lb(d, p, 0, p.T);
      const std::vector<std::int64_t> shape = {static_cast<std::int64_t>(cu.size())};
      npy::write_npy(d / "cu.npy", npy::array::from<std::int64_t>(shape, moereg_test::cast<std::int64_t>(cu)));
      run_ok(d, cat({"load_balancing", "--output-dir", d / "out", "--scope", "sequence", "--in",
                     "cu_seqlens=" + (d / "cu.npy")},
                    lb_inputs(d)));
      const auto ref =
          moereg_ref::load_balancing_seq(p.P, p.I, moereg_test::to_int_mask(p.mask), p.T, p.E, p.k, 1e-2, cu);
      check_close(read_value(d / "out"), ref.value, 1e-9, "value");
      check_close(read_values(d / "out/grad_probs.npy", npy::dtype::f8, {p.T, p.E}), ref.grad, 1e-9, "grad_probs");
    }
  }
  report_worst("load_balancing sequence");
}

TEST_CASE("moereg-eval --stats-out/--stats-in: three uneven parts reproduce the whole batch", "[moereg-eval]") {
  // Parts [0, 17), [17, 67), [67, 101). Each part's --stats-out is summed; each part then
  // runs with --stats-in the sum.
  const long long cuts[] = {0, 17, 67, 101};
  const lb_problem p(31, 101, 8, 3);
  const auto mask_i = moereg_test::to_int_mask(p.mask);
  const auto whole = moereg_ref::load_balancing(p.P, p.I, mask_i, p.T, p.E, p.k, 1e-2);

  auto summed_stats = [&](const std::vector<std::string>& opts, std::vector<temp_dir>& parts) {
    vec sum;
    for (int i = 0; i < 3; ++i) {
      write_lb(parts[static_cast<std::size_t>(i)], p, cuts[i], cuts[i + 1]);
      const temp_dir& d = parts[static_cast<std::size_t>(i)];
      run_ok(d, cat(cat({"load_balancing", "--output-dir", d / "local", "--stats-out", d / "stats.npy"}, opts),
                    lb_inputs(d)));
      const auto s = npy::read_npy(d / "stats.npy");
      INFO("stats.npy is " << s.describe());
      REQUIRE(s.type() == npy::dtype::f8);
      REQUIRE(s.ndim() == 1);
      if (sum.empty()) sum.assign(s.values<double>().size(), 0.0);
      REQUIRE(s.values<double>().size() == sum.size());
      for (std::size_t j = 0; j < sum.size(); ++j) sum[j] += s.values<double>()[j];
    }
    return sum;
  };

  SECTION("micro scope: every part gets the whole batch's gradient rows, the values add up") {
    std::vector<temp_dir> parts(3);
    const vec sum = summed_stats({}, parts);
    REQUIRE(sum.size() == static_cast<std::size_t>(1 + p.E));
    CHECK(sum[0] == moereg_ref::detail::valid_tokens(mask_i, p.T));
    npy::write_npy(parts[0] / "sum.npy", npy::array::from<double>({static_cast<std::int64_t>(sum.size())}, sum));
    double total = 0.0;
    for (int i = 0; i < 3; ++i) {
      const temp_dir& d = parts[static_cast<std::size_t>(i)];
      run_ok(d, cat({"load_balancing", "--output-dir", d / "out", "--stats-in", parts[0] / "sum.npy"}, lb_inputs(d)));
      total += read_value(d / "out");
      check_close(read_values(d / "out/grad_probs.npy", npy::dtype::f8, {cuts[i + 1] - cuts[i], p.E}),
                  rows_of(whole.grad, cuts[i], cuts[i + 1], p.E), 1e-9, "part gradient rows");
    }
    check_close(total, whole.value, 1e-9, "summed part values");
  }
  SECTION("global scope: f from the summed counts, pbar and 1/T_v local to each part") {
    std::vector<temp_dir> parts(3);
    const vec sum = summed_stats({"--scope", "global"}, parts);
    REQUIRE(sum.size() == static_cast<std::size_t>(1 + p.E));
    npy::write_npy(parts[0] / "sum.npy", npy::array::from<double>({static_cast<std::int64_t>(sum.size())}, sum));
    for (int i = 0; i < 3; ++i) {
      const temp_dir& d = parts[static_cast<std::size_t>(i)];
      run_ok(d,
             cat({"load_balancing", "--output-dir", d / "out", "--scope", "global", "--stats-in", parts[0] / "sum.npy"},
                 lb_inputs(d)));
      // From the reference over the whole batch: dL/dP = alpha E f_e m_t / T_v(whole) with the
      // global f; the global-batch gradient of a part divides by the part's own T_v instead,
      // and its value, linear in P, is sum_{t,e} grad[t,e] P[t,e].
      const std::vector<int> part_mask(mask_i.begin() + cuts[i], mask_i.begin() + cuts[i + 1]);
      const double tv_part = moereg_ref::detail::valid_tokens(part_mask, cuts[i + 1] - cuts[i]);
      const double tv_whole = moereg_ref::detail::valid_tokens(mask_i, p.T);
      REQUIRE(tv_part > 0);
      vec want = rows_of(whole.grad, cuts[i], cuts[i + 1], p.E);
      double want_value = 0.0;
      for (std::size_t j = 0; j < want.size(); ++j) {
        want[j] *= tv_whole / tv_part;
        want_value += want[j] * p.P[static_cast<std::size_t>(cuts[i] * p.E) + j];
      }
      check_close(read_value(d / "out"), want_value, 1e-9, "global-scope part value");
      check_close(read_values(d / "out/grad_probs.npy", npy::dtype::f8, {cuts[i + 1] - cuts[i], p.E}), want, 1e-9,
                  "global-scope part gradient");
    }
  }
  SECTION("sequence scope, parts cut at sequence boundaries") {
    // Sequences of 10 rows won't fit the cuts above; use 4 sequences of 25 rows, parts of 1, 2 and 1 sequences.
    const long long S = 25, scuts[] = {0, 25, 75, 100};
    const lb_problem q(32, 100, 8, 3);
    const auto qmask = moereg_test::to_int_mask(q.mask);
    ivec cu;
    for (long long b = 0; b <= 4; ++b) cu.push_back(b * S);
    const auto ref = moereg_ref::load_balancing_seq(q.P, q.I, qmask, q.T, q.E, q.k, 1e-2, cu);
    std::vector<temp_dir> parts(3);
    double B = 0;
    for (int i = 0; i < 3; ++i) {
      const temp_dir& d = parts[static_cast<std::size_t>(i)];
      write_lb(d, q, scuts[i], scuts[i + 1]);
      run_ok(d, cat({"load_balancing", "--output-dir", d / "local", "--scope", "sequence", "--seq-len", "25",
                     "--stats-out", d / "stats.npy"},
                    lb_inputs(d)));
      const vec s = read_values(d / "stats.npy", npy::dtype::f8, {1});
      B += s[0];
    }
    CHECK(B == 4.0);
    npy::write_npy(parts[0] / "sum.npy", npy::array::from<double>({1}, {B}));
    double total = 0;
    for (int i = 0; i < 3; ++i) {
      const temp_dir& d = parts[static_cast<std::size_t>(i)];
      run_ok(d, cat({"load_balancing", "--output-dir", d / "out", "--scope", "sequence", "--seq-len", "25",
                     "--stats-in", parts[0] / "sum.npy"},
                    lb_inputs(d)));
      total += read_value(d / "out");
      check_close(read_values(d / "out/grad_probs.npy", npy::dtype::f8, {scuts[i + 1] - scuts[i], q.E}),
                  rows_of(ref.grad, scuts[i], scuts[i + 1], q.E), 1e-9, "sequence part gradient rows");
    }
    check_close(total, ref.value, 1e-9, "summed sequence part values");
  }
  report_worst("load_balancing split");
}

TEST_CASE("moereg-eval z_loss matches the reference, whole and split", "[moereg-eval]") {
  moereg_test::rng r(41);
  const long long T = 301, E = 12;
  for (double scale : {1.0, 40.0}) {
    INFO("logit scale " << scale);
    temp_dir d;
    const vec Z = moereg_test::random_normal(r, static_cast<std::size_t>(T * E), scale);
    const auto mask = moereg_test::random_mask(r, T, 0.25);
    const auto mask_i = moereg_test::to_int_mask(mask);
    write_matrix(d / "z.npy", Z, T, E);
    write_mask(d / "m.npy", mask, 1);
    run_ok(d, {"z_loss", "--output-dir", d / "out", "--coef", "0.01", "--grad-scale", "3", "--in",
               "logits=" + (d / "z.npy"), "--in", "mask=" + (d / "m.npy")});
    const auto ref = moereg_ref::z_loss(Z, mask_i, T, E, 0.01);
    check_close(read_value(d / "out"), ref.value, 1e-9, "z value");
    vec want = ref.grad;
    for (auto& x : want) x *= 3.0;
    check_close(read_values(d / "out/grad_logits.npy", npy::dtype::f8, {T, E}), want, 1e-9, "grad_logits");

    // Three uneven parts with summed statistics.
    const long long cuts[] = {0, 100, 101, 301};
    double stats = 0.0;
    std::vector<temp_dir> parts(3);
    for (int i = 0; i < 3; ++i) {
      const temp_dir& q = parts[static_cast<std::size_t>(i)];
      write_matrix(q / "z.npy", rows_of(Z, cuts[i], cuts[i + 1], E), cuts[i + 1] - cuts[i], E);
      write_mask(q / "m.npy", rows_of(mask, cuts[i], cuts[i + 1], 1), 0);
      run_ok(q, {"z_loss", "--output-dir", q / "local", "--coef", "0.01", "--stats-out", q / "s.npy", "--in",
                 "logits=" + (q / "z.npy"), "--in", "mask=" + (q / "m.npy")});
      stats += read_values(q / "s.npy", npy::dtype::f8, {1})[0];
    }
    npy::write_npy(d / "sum.npy", npy::array::from<double>({1}, {stats}));
    double total = 0.0;
    for (int i = 0; i < 3; ++i) {
      const temp_dir& q = parts[static_cast<std::size_t>(i)];
      run_ok(q, {"z_loss", "--output-dir", q / "out", "--coef", "0.01", "--stats-in", d / "sum.npy", "--in",
                 "logits=" + (q / "z.npy"), "--in", "mask=" + (q / "m.npy")});
      total += read_value(q / "out");
      check_close(read_values(q / "out/grad_logits.npy", npy::dtype::f8, {cuts[i + 1] - cuts[i], E}),
                  rows_of(ref.grad, cuts[i], cuts[i + 1], E), 1e-9, "z part gradient rows");
    }
    check_close(total, ref.value, 1e-9, "summed z part values");
  }
  report_worst("z_loss");
}

TEST_CASE("moereg-eval float32 inputs give float32 gradients", "[moereg-eval]") {
  temp_dir d;
  const lb_problem p(51, 70, 6, 2);
  write_lb(d, p, 0, p.T, /*f32=*/true, /*i32=*/true, 2);
  run_ok(d, cat({"load_balancing", "--output-dir", d / "out", "--grad-scale", "2"}, lb_inputs(d)));
  // The reference runs on the float32-rounded probabilities; the library accumulates in float.
  const vec P32 = moereg_test::cast<double>(moereg_test::cast<float>(p.P));
  const auto ref = moereg_ref::load_balancing(P32, p.I, moereg_test::to_int_mask(p.mask), p.T, p.E, p.k, 1e-2);
  vec want = ref.grad;
  for (auto& x : want) x *= 2.0;
  check_close(read_value(d / "out"), ref.value, 1e-5, "float32 value");
  check_close(read_values(d / "out/grad_probs.npy", npy::dtype::f4, {p.T, p.E}), want, 1e-5, "float32 grad_probs");

  moereg_test::rng r(52);
  const vec Z = moereg_test::random_normal(r, 40 * 9, 3.0);
  write_matrix(d / "z.npy", Z, 40, 9, true);
  run_ok(d, {"z_loss", "--output-dir", d / "zout", "--in", "logits=" + (d / "z.npy")});
  const auto zref = moereg_ref::z_loss(moereg_test::cast<double>(moereg_test::cast<float>(Z)), {}, 40, 9, 1e-3);
  check_close(read_value(d / "zout"), zref.value, 1e-5, "float32 z value");
  check_close(read_values(d / "zout/grad_logits.npy", npy::dtype::f4, {40, 9}), zref.grad, 1e-5, "float32 grad_logits");
}

TEST_CASE("moereg-eval empty and fully padded batches give zero", "[moereg-eval]") {
  temp_dir d;
  npy::write_npy(d / "p0.npy", npy::array::from<double>({0, 5}, {}));
  npy::write_npy(d / "i0.npy", npy::array::from<std::int64_t>({0, 2}, {}));
  run_ok(d, {"load_balancing", "--output-dir", d / "out0", "--in", "probs=" + (d / "p0.npy"), "--in",
             "topk=" + (d / "i0.npy")});
  CHECK(read_value(d / "out0") == 0.0);
  CHECK(read_values(d / "out0/grad_probs.npy", npy::dtype::f8, {0, 5}).empty());

  lb_problem p(61, 9, 5, 2);
  p.mask.assign(9, 0);
  write_lb(d, p, 0, 9);
  run_ok(d, cat({"load_balancing", "--output-dir", d / "outp"}, lb_inputs(d)));
  CHECK(read_value(d / "outp") == 0.0);
  CHECK(moereg_test::max_abs(read_values(d / "outp/grad_probs.npy", npy::dtype::f8, {9, 5})) == 0.0);
}

TEST_CASE("moereg-eval --help", "[moereg-eval]") {
  temp_dir d;
  const auto r = run_tool(d, {"--help"});
  CHECK(r.code == 0);
  CHECK(r.out.find("usage: moereg-eval LOSS") != std::string::npos);
}

TEST_CASE("moereg-eval errors: exit 2, one stderr line, no result left behind", "[moereg-eval]") {
  temp_dir d;
  const lb_problem p(71, 20, 6, 2);
  write_lb(d, p, 0, p.T);
  write_matrix(d / "p_short.npy", rows_of(p.P, 0, 19, p.E), 19, p.E);
  npy::write_npy(d / "p_flat.npy", npy::array::from<double>({p.T * p.E}, p.P));
  write_matrix(d / "t_float.npy", moereg_test::cast<double>(p.I), p.T, p.k);
  npy::write_npy(d / "p_int.npy", npy::array::from<std::int32_t>({p.T, p.E}, std::vector<std::int32_t>(p.T * p.E, 0)));
  ivec bad_range = p.I, dup = p.I;
  bad_range[5] = p.E;
  dup[0] = 1;
  dup[1] = 1;
  write_topk(d / "t_range.npy", bad_range, p.T, p.k);
  write_topk(d / "t_dup.npy", dup, p.T, p.k);
  write_mask(d / "m_short.npy", rows_of(p.mask, 0, 7, 1), 0);
  write_matrix(d / "m_float.npy", vec(20, 1.0), 20, 1);
  npy::write_npy(d / "m_float1.npy", npy::array::from<double>({20}, vec(20, 1.0)));
  npy::write_npy(d / "cu_bad.npy", npy::array::from<std::int64_t>({3}, {0, 5, 19}));
  npy::write_npy(d / "p_wide.npy", npy::array::from<double>({0, std::int64_t(1) << 30}, {}));
  npy::write_npy(d / "stats_short.npy", npy::array::from<double>({3}, {1, 2, 3}));
  npy::write_npy(d / "stats_2d.npy", npy::array::from<double>({1, 7}, vec(7, 1.0)));
  vec neg(7, 1.0);
  neg[2] = -1.0;
  npy::write_npy(d / "stats_neg.npy", npy::array::from<double>({7}, neg));
  {
    std::ofstream f(d / "garbage.npy", std::ios::binary);
    f << "this is not a numpy file";
  }
  {
    auto bytes = npy::serialize_npy(npy::array::from<double>({p.T, p.E}, p.P));
    bytes.resize(bytes.size() - 3);
    std::ofstream f(d / "truncated.npy", std::ios::binary);
    f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  }
  {
    std::ofstream f(d / "a_file", std::ios::binary);
    f << "x";
  }
  const std::string P = "probs=" + (d / "probs.npy"), I = "topk=" + (d / "topk.npy"), M = "mask=" + (d / "mask.npy");
  const std::string out = d / "out";

  struct bad_case {
    const char* why;
    std::vector<std::string> args;
    const char* says;  // a piece of the expected message
  };
  const std::vector<bad_case> cases = {
      {"no arguments", {}, "LOSS"},
      {"unknown loss", {"bogus_loss", "--output-dir", out, "--in", P}, "unknown loss"},
      {"missing --output-dir", {"load_balancing", "--in", P, "--in", I}, "--output-dir"},
      {"unknown option",
       {"load_balancing", "--output-dir", out, "--in", P, "--in", I, "--frobnicate", "1"},
       "unknown option"},
      {"option of another loss",
       {"load_balancing", "--output-dir", out, "--in", P, "--in", I, "--eps", "1e-3"},
       "does not apply"},
      {"z_loss takes no --scope",
       {"z_loss", "--output-dir", out, "--in", "logits=" + (d / "probs.npy"), "--scope", "micro"},
       "does not apply"},
      {"bad --coef", {"load_balancing", "--output-dir", out, "--in", P, "--in", I, "--coef", "abc"}, "--coef"},
      {"non-finite --coef", {"load_balancing", "--output-dir", out, "--in", P, "--in", I, "--coef", "nan"}, "--coef"},
      {"bad --scope", {"load_balancing", "--output-dir", out, "--in", P, "--in", I, "--scope", "diagonal"}, "--scope"},
      {"non-integer --seq-len",
       {"load_balancing", "--output-dir", out, "--in", P, "--in", I, "--scope", "sequence", "--seq-len", "2.5"},
       "--seq-len"},
      {"bad --grad-scale",
       {"load_balancing", "--output-dir", out, "--in", P, "--in", I, "--grad-scale", "x"},
       "--grad-scale"},
      {"duplicate option",
       {"load_balancing", "--output-dir", out, "--in", P, "--in", I, "--coef", "1", "--coef", "1"},
       "twice"},
      {"missing required input", {"load_balancing", "--output-dir", out, "--in", P}, "topk"},
      {"unknown input name",
       {"load_balancing", "--output-dir", out, "--in", P, "--in", I, "--in", "logits=" + (d / "probs.npy")},
       "logits"},
      {"duplicate input", {"load_balancing", "--output-dir", out, "--in", P, "--in", I, "--in", P}, "twice"},
      {"input name with a path",
       {"load_balancing", "--output-dir", out, "--in", P, "--in", I, "--in", "../x=" + (d / "mask.npy")},
       "input name"},
      {"missing file",
       {"load_balancing", "--output-dir", out, "--in", "probs=" + (d / "nope.npy"), "--in", I},
       "nope.npy"},
      {"not a .npy file",
       {"load_balancing", "--output-dir", out, "--in", "probs=" + (d / "garbage.npy"), "--in", I},
       "garbage.npy"},
      {"truncated .npy file",
       {"load_balancing", "--output-dir", out, "--in", "probs=" + (d / "truncated.npy"), "--in", I},
       "truncated"},
      {"integer probs",
       {"load_balancing", "--output-dir", out, "--in", "probs=" + (d / "p_int.npy"), "--in", I},
       "float32 or float64"},
      {"1-D probs", {"load_balancing", "--output-dir", out, "--in", "probs=" + (d / "p_flat.npy"), "--in", I}, "2-D"},
      {"float topk",
       {"load_balancing", "--output-dir", out, "--in", P, "--in", "topk=" + (d / "t_float.npy")},
       "int32 or int64"},
      {"topk rows != probs rows",
       {"load_balancing", "--output-dir", out, "--in", "probs=" + (d / "p_short.npy"), "--in", I},
       "rows"},
      {"an empty input of absurd width",
       {"load_balancing", "--output-dir", out, "--in", "probs=" + (d / "p_wide.npy"), "--in", I},
       "at most"},
      {"topk out of range",
       {"load_balancing", "--output-dir", out, "--in", P, "--in", "topk=" + (d / "t_range.npy")},
       "out of range"},
      {"topk repeats an expert",
       {"load_balancing", "--output-dir", out, "--in", P, "--in", "topk=" + (d / "t_dup.npy")},
       "twice"},
      {"mask of the wrong length",
       {"load_balancing", "--output-dir", out, "--in", P, "--in", I, "--in", "mask=" + (d / "m_short.npy")},
       "mask"},
      {"2-D mask",
       {"load_balancing", "--output-dir", out, "--in", P, "--in", I, "--in", "mask=" + (d / "m_float.npy")},
       "mask"},
      {"float mask",
       {"load_balancing", "--output-dir", out, "--in", P, "--in", I, "--in", "mask=" + (d / "m_float1.npy")},
       "mask"},
#ifndef MOEREG_EVAL_HAS_CUDA  // with CUDA, --backend cuda runs (tests/cuda checks it)
      {"CUDA backend",
       {"load_balancing", "--output-dir", out, "--backend", "cuda", "--in", P, "--in", I},
       "CUDA backend not built"},
#endif
      {"unknown backend",
       {"load_balancing", "--output-dir", out, "--backend", "tpu", "--in", P, "--in", I},
       "--backend"},
      {"stats of the wrong size",
       {"load_balancing", "--output-dir", out, "--in", P, "--in", I, "--stats-in", d / "stats_short.npy"},
       "statistics"},
      {"2-D stats",
       {"load_balancing", "--output-dir", out, "--in", P, "--in", I, "--stats-in", d / "stats_2d.npy"},
       "1-D"},
      {"negative stats",
       {"load_balancing", "--output-dir", out, "--in", P, "--in", I, "--stats-in", d / "stats_neg.npy"},
       "non-negative"},
      {"missing stats file",
       {"load_balancing", "--output-dir", out, "--in", P, "--in", I, "--stats-in", d / "nope.npy"},
       "nope.npy"},
      {"sequence scope without lengths",
       {"load_balancing", "--output-dir", out, "--in", P, "--in", I, "--scope", "sequence"},
       "seq_len"},
      {"seq-len not dividing T",
       {"load_balancing", "--output-dir", out, "--in", P, "--in", I, "--scope", "sequence", "--seq-len", "7"},
       "multiple"},
      {"cu_seqlens not ending at T",
       {"load_balancing", "--output-dir", out, "--in", P, "--in", I, "--scope", "sequence", "--in",
        "cu_seqlens=" + (d / "cu_bad.npy")},
       "cu_seqlens"},
      {"cu_seqlens outside the sequence scope",
       {"load_balancing", "--output-dir", out, "--in", P, "--in", I, "--in", "cu_seqlens=" + (d / "cu_bad.npy")},
       "sequence scope"},
      {"stats-out into a missing directory",
       {"load_balancing", "--output-dir", out, "--in", P, "--in", I, "--stats-out", d / "no/such/dir/s.npy"},
       "s.npy"},
      {"output dir is a file",
       {"load_balancing", "--output-dir", d / "a_file", "--in", P, "--in", I},
       "not a directory"},
  };
  SECTION("each bad command line or input") for (const auto& c : cases) {
    INFO("case: " << c.why);
    std::error_code ec;
    fs::remove_all(out, ec);
    const auto r = run_tool(d, c.args);
    INFO("stderr: " << r.err);
    CHECK(r.code == 2);
    // Exactly one non-empty line, ending in a newline.
    REQUIRE(!r.err.empty());
    CHECK(r.err.back() == '\n');
    CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
    CHECK(r.err.size() > 20);
    CHECK(r.err.find(c.says) != std::string::npos);
    // Nothing that looks like a result, and no temporary file left over.
    if (fs::exists(out)) CHECK(fs::is_empty(out));
  }

  SECTION("a failed run removes a stale value.npy") {
    fs::create_directories(out);
    run_ok(d, cat({"load_balancing", "--output-dir", out}, lb_inputs(d)));
    REQUIRE(fs::exists(out + "/value.npy"));
    const auto r =
        run_tool(d, {"load_balancing", "--output-dir", out, "--in", P, "--in", "topk=" + (d / "t_range.npy")});
    CHECK(r.code == 2);
    CHECK(!fs::exists(out + "/value.npy"));
  }
  SECTION("every loss refuses an input it does not take") {
    std::size_t not_implemented = 0;
    for (const char* loss : {"specialization", "coupling", "orthogonality", "variance", "entropy", "importance"}) {
      INFO("loss " << loss);
      std::error_code ec;
      fs::remove_all(out, ec);
      const auto r = run_tool(d, {loss, "--output-dir", out, "--in", "bogus=" + (d / "probs.npy")});
      INFO("stderr: " << r.err);
      CHECK(r.code == 2);
      CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
      if (r.err.find("not implemented") != std::string::npos)
        ++not_implemented;
      else
        CHECK(r.err.find("bogus") != std::string::npos);
      if (fs::exists(out)) CHECK(fs::is_empty(out));
    }
    if (not_implemented > 0) WARN("losses not implemented in this moereg-eval build: " << not_implemented << " of 6");
  }
}

namespace {

// Writes activations [T, k, d] (float64 or float32).
void write_acts(const std::string& path, const vec& H, long long T, long long k, long long d, bool f32 = false) {
  if (f32)
    npy::write_npy(path, npy::array::from<float>({T, k, d}, moereg_test::cast<float>(H)));
  else
    npy::write_npy(path, npy::array::from<double>({T, k, d}, H));
}

// A random activation problem: acts [T, k, d], topk with dropped slots, a mask.
struct acts_problem {
  long long T, k, d, E;
  vec H;
  ivec I;
  std::vector<std::uint8_t> mask;
  acts_problem(std::uint64_t seed, long long t, long long kk, long long dd, long long e = 12)
      : T(t), k(kk), d(dd), E(e) {
    moereg_test::rng r(seed);
    H = moereg_test::random_normal(r, static_cast<std::size_t>(T * k * d));
    I = moereg_test::random_topk(r, T, E, k, 0.2);
    mask = moereg_test::random_mask(r, T, 0.2);
  }
};

void write_acts_problem(const temp_dir& d, const acts_problem& p, long long r0, long long r1, bool f32 = false) {
  write_acts(d / "acts.npy", rows_of(p.H, r0, r1, p.k * p.d), r1 - r0, p.k, p.d, f32);
  write_topk(d / "topk.npy", rows_of(p.I, r0, r1, p.k), r1 - r0, p.k);
  write_mask(d / "mask.npy", rows_of(p.mask, r0, r1, 1), 0);
}

std::vector<std::string> acts_inputs(const temp_dir& d) {
  return {"--in", "acts=" + (d / "acts.npy"), "--in", "topk=" + (d / "topk.npy"), "--in", "mask=" + (d / "mask.npy")};
}

}  // namespace

TEST_CASE("moereg-eval specialization and orthogonality match the reference", "[moereg-eval]") {
  const acts_problem p(81, 67, 5, 11);
  const auto mask_i = moereg_test::to_int_mask(p.mask);
  temp_dir d;
  write_acts_problem(d, p, 0, p.T);
  for (bool mean : {false, true}) {
    INFO("specialization pairs " << (mean ? "mean" : "sum"));
    run_ok(d, cat({"specialization", "--output-dir", d / "sp", "--coef", "0.02", "--eps", "1e-8", "--pairs",
                   mean ? "mean" : "sum", "--grad-scale", "1.5"},
                  acts_inputs(d)));
    const auto ref = moereg_ref::specialization(p.H, p.I, mask_i, p.T, p.k, p.d, 0.02, mean, 1e-8);
    vec want = ref.grad;
    for (auto& x : want) x *= 1.5;
    check_close(read_value(d / "sp"), ref.value, 1e-9, "specialization value");
    check_close(read_values(d / "sp/grad_acts.npy", npy::dtype::f8, {p.T, p.k, p.d}), want, 1e-9,
                "specialization grad_acts");
  }
  for (const char* variant : {"pairwise", "subspace"})
    for (bool sum : {false, true}) {
      INFO("orthogonality " << variant << (sum ? " sum" : " mean"));
      run_ok(d, cat({"orthogonality", "--output-dir", d / "or", "--coef", "0.1", "--eps", "1e-6", "--variant", variant,
                     "--reduction", sum ? "sum" : "mean"},
                    acts_inputs(d)));
      const auto ref = moereg_ref::orthogonality(p.H, p.I, mask_i, p.T, p.k, p.d, 0.1, sum, variant, 1e-6);
      check_close(read_value(d / "or"), ref.value, 1e-9, "orthogonality value");
      check_close(read_values(d / "or/grad_acts.npy", npy::dtype::f8, {p.T, p.k, p.d}), ref.grad, 1e-9,
                  "orthogonality grad_acts");
    }
  // --k sets the 1/k of the subspace variant.
  run_ok(d, cat({"orthogonality", "--output-dir", d / "ok", "--variant", "subspace", "--k", "10"}, acts_inputs(d)));
  const auto ref = moereg_ref::orthogonality(p.H, p.I, mask_i, p.T, p.k, p.d, 1e-4, false, "subspace", 1e-6);
  check_close(read_value(d / "ok"), ref.value * 5.0 / 10.0, 1e-9, "orthogonality value with --k 10");

  // float32 activations give a float32 gradient of the same shape.
  write_acts_problem(d, p, 0, p.T, /*f32=*/true);
  run_ok(d, cat({"specialization", "--output-dir", d / "sp32"}, acts_inputs(d)));
  const vec H32 = moereg_test::cast<double>(moereg_test::cast<float>(p.H));
  const auto ref32 = moereg_ref::specialization(H32, p.I, mask_i, p.T, p.k, p.d, 2e-3, false, 1e-8);
  check_close(read_value(d / "sp32"), ref32.value, 1e-4, "float32 specialization value");
  check_close(read_values(d / "sp32/grad_acts.npy", npy::dtype::f4, {p.T, p.k, p.d}), ref32.grad, 1e-4,
              "float32 grad_acts");

  // k = 1 (no pair anywhere: zero value and gradient) and zero activation vectors (norms at
  // the eps clamp), against the same reference.
  acts_problem k1(83, 31, 1, 9);
  acts_problem zeros(84, 41, 4, 6);
  for (std::size_t v = 0; v < static_cast<std::size_t>(zeros.T * zeros.k); v += 5)
    std::fill_n(zeros.H.begin() + static_cast<std::ptrdiff_t>(v * static_cast<std::size_t>(zeros.d)), zeros.d, 0.0);
  for (const acts_problem* q : {&k1, &zeros}) {
    INFO("k = " << q->k << ", zero vectors: " << (q == &zeros));
    const auto qmask = moereg_test::to_int_mask(q->mask);
    write_acts_problem(d, *q, 0, q->T);
    run_ok(d, cat({"specialization", "--output-dir", d / "spq"}, acts_inputs(d)));
    const auto rs = moereg_ref::specialization(q->H, q->I, qmask, q->T, q->k, q->d, 2e-3, false, 1e-8);
    check_close(read_value(d / "spq"), rs.value, 1e-9, "specialization value");
    check_close(read_values(d / "spq/grad_acts.npy", npy::dtype::f8, {q->T, q->k, q->d}), rs.grad, 1e-9,
                "specialization grad_acts");
    for (const char* variant : {"pairwise", "subspace"}) {
      run_ok(d, cat({"orthogonality", "--output-dir", d / "orq", "--variant", variant}, acts_inputs(d)));
      const auto ro = moereg_ref::orthogonality(q->H, q->I, qmask, q->T, q->k, q->d, 1e-4, false, variant, 1e-6);
      check_close(read_value(d / "orq"), ro.value, 1e-9, "orthogonality value");
      check_close(read_values(d / "orq/grad_acts.npy", npy::dtype::f8, {q->T, q->k, q->d}), ro.grad, 1e-9,
                  "orthogonality grad_acts");
    }
  }
  report_worst("specialization/orthogonality");
}

TEST_CASE("moereg-eval coupling matches the reference for every form", "[moereg-eval]") {
  const long long T = 53, E = 7, L = 3;
  const std::vector<long long> ks = {2, 3, 1};
  moereg_test::rng r(91);
  std::vector<vec> P;
  std::vector<ivec> I;
  for (long long l = 0; l < L; ++l) {
    P.push_back(moereg_test::random_probs(r, T, E));
    I.push_back(moereg_test::random_topk(r, T, E, ks[static_cast<std::size_t>(l)], 0.2));
  }
  const auto mask = moereg_test::random_mask(r, T, 0.2);
  temp_dir d;
  std::vector<std::string> in;
  for (long long l = 0; l < L; ++l) {
    const std::string n = std::to_string(l);
    write_matrix(d / ("p" + n + ".npy"), P[static_cast<std::size_t>(l)], T, E);
    write_topk(d / ("t" + n + ".npy"), I[static_cast<std::size_t>(l)], T, ks[static_cast<std::size_t>(l)], l == 1);
    in = cat(in, {"--in", "probs" + n + "=" + (d / ("p" + n + ".npy")), "--in",
                  "topk" + n + "=" + (d / ("t" + n + ".npy"))});
  }
  write_mask(d / "m.npy", mask, 3);
  in = cat(in, {"--in", "mask=" + (d / "m.npy")});
  for (const char* form : {"token", "log", "batch"}) {
    INFO("form " << form);
    run_ok(d, cat({"coupling", "--output-dir", d / "out", "--coef", "0.05", "--form", form, "--eps", "1e-12"}, in));
    const auto ref = moereg_ref::coupling(P, I, ks, moereg_test::to_int_mask(mask), T, E, 0.05, form, 1e-12);
    check_close(read_value(d / "out"), ref.first, 1e-9, "coupling value");
    for (long long l = 0; l < L; ++l)
      check_close(read_values(d / "out/grad_probs" + std::to_string(l) + ".npy", npy::dtype::f8, {T, E}),
                  ref.second[static_cast<std::size_t>(l)], 1e-9, "coupling grad_probsL");
  }
  SECTION("layers must be numbered without gaps, each with its topk, in one dtype") {
    const auto gap = run_tool(d, cat(in, {"coupling", "--output-dir", d / "bad", "--in", "probs4=" + (d / "p0.npy")}));
    CHECK(gap.code == 2);
    CHECK(gap.err.find("probs4") != std::string::npos);
    const auto no_topk = run_tool(d, {"coupling", "--output-dir", d / "bad", "--in", "probs0=" + (d / "p0.npy"), "--in",
                                      "probs1=" + (d / "p1.npy"), "--in", "probs2=" + (d / "p2.npy"), "--in",
                                      "topk0=" + (d / "t0.npy"), "--in", "topk1=" + (d / "t1.npy")});
    CHECK(no_topk.code == 2);
    CHECK(no_topk.err.find("topk2") != std::string::npos);
    write_matrix(d / "p1f.npy", P[1], T, E, /*f32=*/true);
    const auto mixed = run_tool(
        d, {"coupling", "--output-dir", d / "bad", "--in", "probs0=" + (d / "p0.npy"), "--in",
            "probs1=" + (d / "p1f.npy"), "--in", "topk0=" + (d / "t0.npy"), "--in", "topk1=" + (d / "t1.npy")});
    CHECK(mixed.code == 2);
    CHECK(mixed.err.find("dtype") != std::string::npos);
    CHECK(!fs::exists(d / "bad/value.npy"));
  }
  SECTION("batch form, three uneven parts with summed statistics") {
    const long long cuts[] = {0, 20, 21, 53};
    const auto whole = moereg_ref::coupling(P, I, ks, moereg_test::to_int_mask(mask), T, E, 0.05, "batch", 1e-12);
    std::vector<temp_dir> parts(3);
    vec sum;
    auto part_inputs = [&](const temp_dir& q) {
      std::vector<std::string> v;
      for (long long l = 0; l < L; ++l) {
        const std::string n = std::to_string(l);
        v = cat(v, {"--in", "probs" + n + "=" + (q / ("p" + n + ".npy")), "--in",
                    "topk" + n + "=" + (q / ("t" + n + ".npy"))});
      }
      return cat(v, {"--in", "mask=" + (q / "m.npy")});
    };
    for (int i = 0; i < 3; ++i) {
      const temp_dir& q = parts[static_cast<std::size_t>(i)];
      for (long long l = 0; l < L; ++l) {
        const std::string n = std::to_string(l);
        const auto lz = static_cast<std::size_t>(l);
        write_matrix(q / ("p" + n + ".npy"), rows_of(P[lz], cuts[i], cuts[i + 1], E), cuts[i + 1] - cuts[i], E);
        write_topk(q / ("t" + n + ".npy"), rows_of(I[lz], cuts[i], cuts[i + 1], ks[lz]), cuts[i + 1] - cuts[i], ks[lz]);
      }
      write_mask(q / "m.npy", rows_of(mask, cuts[i], cuts[i + 1], 1), 0);
      run_ok(q, cat({"coupling", "--output-dir", q / "local", "--coef", "0.05", "--form", "batch", "--stats-out",
                     q / "s.npy"},
                    part_inputs(q)));
      const vec s = read_values(q / "s.npy", npy::dtype::f8, {1 + (L - 1) * E * E});
      if (sum.empty()) sum.assign(s.size(), 0.0);
      for (std::size_t j = 0; j < s.size(); ++j) sum[j] += s[j];
    }
    npy::write_npy(d / "sum.npy", npy::array::from<double>({static_cast<std::int64_t>(sum.size())}, sum));
    double total = 0.0;
    for (int i = 0; i < 3; ++i) {
      const temp_dir& q = parts[static_cast<std::size_t>(i)];
      run_ok(q, cat({"coupling", "--output-dir", q / "out", "--coef", "0.05", "--form", "batch", "--stats-in",
                     d / "sum.npy"},
                    part_inputs(q)));
      total += read_value(q / "out");
      for (long long l = 0; l < L; ++l)
        check_close(
            read_values(q / "out/grad_probs" + std::to_string(l) + ".npy", npy::dtype::f8, {cuts[i + 1] - cuts[i], E}),
            rows_of(whole.second[static_cast<std::size_t>(l)], cuts[i], cuts[i + 1], E), 1e-9,
            "coupling part gradient rows");
    }
    check_close(total, whole.first, 1e-9, "summed coupling part values");
  }
  report_worst("coupling");
}

TEST_CASE("moereg-eval entropy: the default clamp tiny = 1e-30 on both sides, against the reference", "[moereg-eval]") {
  // No --coef either: the defaults of the library (eta = 1e-3, tiny = 1e-30) are what the
  // reference implements.
  const long long T = 37, E = 7;
  moereg_test::rng r(131);
  vec P = moereg_test::random_probs(r, T, E);
  const double small[] = {0.0, 1e-300, 1e-35, 1e-31, 1e-29, 1e-25, 1e-21, 1e-12};
  for (long long t = 0; t < T; ++t)
    for (long long e = 0; e < 3; ++e) P[static_cast<std::size_t>(t * E + (t + e) % E)] = small[(t * 3 + e) % 8];
  const auto mask = moereg_test::random_mask(r, T, 0.2);
  temp_dir d;
  write_matrix(d / "p.npy", P, T, E);
  write_mask(d / "m.npy", mask, 0);
  run_ok(d, {"entropy", "--output-dir", d / "h", "--in", "probs=" + (d / "p.npy"), "--in", "mask=" + (d / "m.npy")});
  const auto ref = moereg_ref::entropy(P, moereg_test::to_int_mask(mask), T, E, 1e-3);
  check_close(read_value(d / "h"), ref.value, 1e-9, "entropy value");
  check_close(read_values(d / "h/grad_probs.npy", npy::dtype::f8, {T, E}), ref.grad, 1e-9, "entropy grad_probs");
  report_worst("entropy clamp");
}

TEST_CASE("moereg-eval variance, entropy and importance match the reference", "[moereg-eval]") {
  const long long T = 83, E = 9;
  moereg_test::rng r(101);
  const vec S = moereg_test::random_probs(r, T, E);
  const auto mask = moereg_test::random_mask(r, T, 0.25);
  const auto mask_i = moereg_test::to_int_mask(mask);
  temp_dir d;
  write_matrix(d / "s.npy", S, T, E);
  write_mask(d / "m.npy", mask, 1);
  const std::vector<std::string> sin = {"--in", "scores=" + (d / "s.npy"), "--in", "mask=" + (d / "m.npy")};
  const std::vector<std::string> pin = {"--in", "probs=" + (d / "s.npy"), "--in", "mask=" + (d / "m.npy")};
  for (const char* axis : {"tokens", "experts"})
    for (bool sum : {false, true}) {
      INFO("variance axis " << axis << (sum ? " sum" : " mean"));
      run_ok(d, cat({"variance", "--output-dir", d / "v", "--coef", "0.5", "--axis", axis, "--reduction",
                     sum ? "sum" : "mean"},
                    sin));
      const auto ref = moereg_ref::variance(S, mask_i, T, E, 0.5, axis, sum);
      check_close(read_value(d / "v"), ref.value, 1e-9, "variance value");
      check_close(read_values(d / "v/grad_scores.npy", npy::dtype::f8, {T, E}), ref.grad, 1e-9, "grad_scores");
    }
  run_ok(d, cat({"entropy", "--output-dir", d / "h", "--coef", "0.3", "--grad-scale", "-2"}, pin));
  const auto href = moereg_ref::entropy(S, mask_i, T, E, 0.3);
  vec hwant = href.grad;
  for (auto& x : hwant) x *= -2.0;
  check_close(read_value(d / "h"), href.value, 1e-9, "entropy value");
  check_close(read_values(d / "h/grad_probs.npy", npy::dtype::f8, {T, E}), hwant, 1e-9, "entropy grad_probs");

  run_ok(d, cat({"importance", "--output-dir", d / "i", "--coef", "0.7"}, pin));
  const auto iref = moereg_ref::importance(S, mask_i, T, E, 0.7);
  check_close(read_value(d / "i"), iref.value, 1e-9, "importance value");
  check_close(read_values(d / "i/grad_probs.npy", npy::dtype::f8, {T, E}), iref.grad, 1e-9, "importance grad_probs");

  SECTION("importance with summed statistics: every part gets the whole gradient rows and the whole value") {
    const long long cuts[] = {0, 30, 31, 83};
    std::vector<temp_dir> parts(3);
    vec sum(static_cast<std::size_t>(E), 0.0);
    for (int i = 0; i < 3; ++i) {
      const temp_dir& q = parts[static_cast<std::size_t>(i)];
      write_matrix(q / "p.npy", rows_of(S, cuts[i], cuts[i + 1], E), cuts[i + 1] - cuts[i], E);
      write_mask(q / "m.npy", rows_of(mask, cuts[i], cuts[i + 1], 1), 0);
      run_ok(q, {"importance", "--output-dir", q / "local", "--coef", "0.7", "--stats-out", q / "s.npy", "--in",
                 "probs=" + (q / "p.npy"), "--in", "mask=" + (q / "m.npy")});
      const vec s = read_values(q / "s.npy", npy::dtype::f8, {E});
      for (std::size_t j = 0; j < s.size(); ++j) sum[j] += s[j];
    }
    npy::write_npy(d / "isum.npy", npy::array::from<double>({E}, sum));
    for (int i = 0; i < 3; ++i) {
      const temp_dir& q = parts[static_cast<std::size_t>(i)];
      run_ok(q, {"importance", "--output-dir", q / "out", "--coef", "0.7", "--stats-in", d / "isum.npy", "--in",
                 "probs=" + (q / "p.npy"), "--in", "mask=" + (q / "m.npy")});
      check_close(read_value(q / "out"), iref.value, 1e-9, "importance part value (the whole value)");
      check_close(read_values(q / "out/grad_probs.npy", npy::dtype::f8, {cuts[i + 1] - cuts[i], E}),
                  rows_of(iref.grad, cuts[i], cuts[i + 1], E), 1e-9, "importance part gradient rows");
    }
  }
  report_worst("variance/entropy/importance");
}

#endif  // MOEREG_EVAL_PATH
