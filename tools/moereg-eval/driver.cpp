// The moereg-eval driver: checks the command line against the loss table, loads the inputs,
// runs the loss and writes its outputs so that a failed run never leaves a directory that
// looks complete.
//
// Output protocol: any value.npy already in DIR is removed first (a stale result must not
// survive a failed run). Every output is then written to a temporary file next to its final
// name, and only after every computation and every write succeeded are they renamed into
// place: the gradients, then --stats-out, then value.npy last. A reader that sees value.npy
// therefore sees a complete set. On failure the temporary files are removed.
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "eval.hpp"

namespace moereg_eval {

namespace fs = std::filesystem;

namespace {

[[noreturn]] void fail(const std::string& msg) {
  throw moereg::error(msg);
}

std::string join(const std::vector<std::string>& v, const std::string& prefix = "") {
  std::string s;
  for (std::size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    const auto& n = v[i];
    if (!n.empty() && n.back() == '#')
      s += prefix + n.substr(0, n.size() - 1) + "0, " + n.substr(0, n.size() - 1) + "1, ...";
    else
      s += prefix + n;
  }
  return s;
}

/// Does `name` match the table entry `pattern` ("probs" or "probs#" for probs0, probs1, ...)?
bool matches(const std::string& pattern, const std::string& name) {
  if (pattern.empty() || pattern.back() != '#') return pattern == name;
  const std::string stem = pattern.substr(0, pattern.size() - 1);
  if (name.size() <= stem.size() || name.compare(0, stem.size(), stem) != 0) return false;
  const std::string digits = name.substr(stem.size());
  if (digits.size() > 4 || (digits.size() > 1 && digits[0] == '0')) return false;
  for (char c : digits)
    if (c < '0' || c > '9') return false;
  return true;
}

/// Checks the options and inputs given against the table row of the loss.
void check_against_table(const loss_entry& e, const arguments& a) {
  for (const auto& o : a.options) {
    bool ok = false;
    for (const auto& allowed : e.options) ok = ok || allowed == o.first;
    if (!ok)
      fail("option --" + o.first + " does not apply to " + e.name +
           (e.options.empty() ? std::string(" (it takes no options)")
                              : " (its options: " + join(e.options, "--") + ")"));
  }
  for (const auto& in : a.inputs) {
    bool ok = false;
    for (const auto& allowed : e.inputs) ok = ok || matches(allowed, in.first);
    if (!ok) fail(e.name + " takes no input '" + in.first + "' (its inputs: " + join(e.inputs) + ")");
  }
  for (const auto& r : e.required) {
    bool given = false;
    for (const auto& in : a.inputs) given = given || in.first == r;
    if (!given) fail(e.name + " needs the input " + r + " (--in " + r + "=FILE.npy)");
  }
}

/// A name for temporary files that no other run picks at the same moment.
std::string temp_suffix() {
  std::uint64_t x = static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  try {
    std::random_device rd;
    x ^= (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
  } catch (...) {
    // no entropy source: the clock alone is good enough for a temporary name
  }
  static const char hex[] = "0123456789abcdef";
  std::string s = ".tmp-";
  for (int i = 0; i < 16; ++i, x >>= 4) s += hex[x & 15];
  return s;
}

/// Temporary files written so far; removed unless commit() renamed them all into place.
class staged_outputs {
 public:
  staged_outputs() : suffix_(temp_suffix()) {}
  staged_outputs(const staged_outputs&) = delete;
  staged_outputs& operator=(const staged_outputs&) = delete;
  ~staged_outputs() {
    for (const auto& f : files_) {
      std::error_code ec;
      fs::remove(f.first, ec);
    }
  }

  /// Writes `a` to a temporary file beside `final_path`.
  void stage(const fs::path& final_path, const npy::array& a) {
    fs::path tmp = final_path;
    tmp.replace_filename("." + final_path.filename().string() + suffix_);
    files_.emplace_back(tmp, final_path);  // recorded first, so that a failed write is cleaned up too
    npy::write_npy(tmp.string(), a);
  }

  /// Renames every staged file into place, in the order staged.
  void commit() {
    while (!files_.empty()) {
      std::error_code ec;
      fs::rename(files_.front().first, files_.front().second, ec);
      if (ec)
        fail("cannot rename " + files_.front().first.string() + " to " + files_.front().second.string() + ": " +
             ec.message());
      files_.erase(files_.begin());
    }
  }

 private:
  std::string suffix_;
  std::vector<std::pair<fs::path, fs::path>> files_;
};

/// The largest extent accepted for a dimension that need not be backed by data: every
/// dimension but the first (E, k, d), and every dimension of an empty array. Without a cap an
/// empty input of shape (0, 2^40) would make a loss size per-expert buffers by it.
constexpr std::int64_t max_inner_dim = std::int64_t(1) << 24;

void check_dims(const std::string& name, const npy::array& a) {
  const bool empty = a.size() == 0;
  for (std::size_t i = 0; i < a.ndim(); ++i)
    if ((i > 0 || empty) && a.shape()[i] > max_inner_dim)
      fail("input " + name + " is " + a.describe() + "; moereg-eval accepts at most " + std::to_string(max_inner_dim) +
           " in axis " + std::to_string(i) + (empty ? " of an empty array" : ""));
}

std::vector<double> read_stats(const std::string& path) {
  const auto a = npy::read_npy(path);
  if (a.type() != npy::dtype::f8 && a.type() != npy::dtype::f4)
    fail("--stats-in " + path + " must hold float64 statistics, got " + a.describe());
  if (a.ndim() != 1) fail("--stats-in " + path + " must be 1-D, got " + a.describe());
  return a.to_doubles();
}

}  // namespace

// ---- request ---------------------------------------------------------------------------

double request::opt_double(const std::string& name, double def) const {
  const std::string* v = args_.option(name);
  return v ? parse_double("--" + name, *v) : def;
}

std::int64_t request::opt_int(const std::string& name, std::int64_t def) const {
  const std::string* v = args_.option(name);
  return v ? parse_int("--" + name, *v) : def;
}

std::string request::opt_choice(const std::string& name, const std::vector<std::string>& choices,
                                const std::string& def) const {
  const std::string* v = args_.option(name);
  if (!v) return def;
  for (const auto& c : choices)
    if (*v == c) return c;
  std::string list;
  for (std::size_t i = 0; i < choices.size(); ++i) list += (i ? ", " : "") + choices[i];
  fail("--" + name + " must be one of " + list + "; got " + detail::quoted(*v));
}

const npy::array& request::input(const std::string& name) const {
  const auto it = inputs_.find(name);
  if (it == inputs_.end()) fail(loss() + " needs the input " + name + " (--in " + name + "=FILE.npy)");
  return it->second;
}

const npy::array& request::input_ndim(const std::string& name, std::size_t ndim, const char* layout) const {
  const auto& a = input(name);
  if (a.ndim() != ndim)
    fail("input " + name + " must be " + std::to_string(ndim) + "-D " + layout + " but is " + a.describe());
  return a;
}

npy::dtype request::float_dtype(const std::vector<std::string>& names) const {
  const std::string* first = nullptr;
  npy::dtype t = npy::dtype::f8;
  for (const auto& n : names) {
    if (!has(n)) continue;
    const auto& a = input(n);
    if (a.type() != npy::dtype::f4 && a.type() != npy::dtype::f8)
      fail("input " + n + " must be float32 or float64, got " + a.describe());
    if (first && a.type() != t)
      fail("inputs " + *first + " (" + npy::dtype_name(t) + ") and " + n + " (" + npy::dtype_name(a.type()) +
           ") differ in dtype; give every floating input in one dtype");
    if (!first) {
      first = &n;
      t = a.type();
    }
  }
  return t;
}

moereg::topk_view request::topk(const std::string& name) const {
  const auto& a = input_ndim(name, 2, "[T, k]");
  const moereg::index_t T = a.shape()[0], k = a.shape()[1];
  switch (a.type()) {
    case npy::dtype::i4:
      return moereg::topk_view(a.values<std::int32_t>().data(), T, k);
    case npy::dtype::i8:
      return moereg::topk_view(a.values<std::int64_t>().data(), T, k);
    default:
      fail("input " + name + " must be int32 or int64, got " + a.describe());
  }
}

moereg::mask_view request::mask(const std::string& name) const {
  if (!has(name)) return {};
  const auto& a = input_ndim(name, 1, "[T]");
  const moereg::index_t T = a.shape()[0];
  switch (a.type()) {
    case npy::dtype::u1:
    case npy::dtype::b1:
      return moereg::mask_view(a.values<std::uint8_t>().data(), T);
    case npy::dtype::i4:
      return moereg::mask_view(a.values<std::int32_t>().data(), T);
    case npy::dtype::i8:
      return moereg::mask_view(a.values<std::int64_t>().data(), T);
    default:
      fail("input " + name + " must be uint8, bool, int32 or int64, got " + a.describe());
  }
}

moereg::offsets_view request::offsets(const std::string& name) const {
  if (!has(name)) return {};
  const auto& a = input_ndim(name, 1, "[B + 1]");
  const moereg::index_t n = a.shape()[0];
  switch (a.type()) {
    case npy::dtype::i4:
      return moereg::offsets_view(a.values<std::int32_t>().data(), n);
    case npy::dtype::i8:
      return moereg::offsets_view(a.values<std::int64_t>().data(), n);
    default:
      fail("input " + name + " must be int32 or int64, got " + a.describe());
  }
}

std::size_t request::count_numbered(const std::string& prefix) const {
  std::size_t n = 0;
  while (has(prefix + std::to_string(n))) ++n;
  return n;
}

std::vector<std::string> request::input_names() const {
  std::vector<std::string> names;
  for (const auto& kv : inputs_) names.push_back(kv.first);
  return names;
}

// ---- registry lookup and the driver ----------------------------------------------------

const loss_entry* find_loss(const std::string& name) {
  for (const auto& e : registry())
    if (e.name == name) return &e;
  return nullptr;
}

void run(const arguments& args) {
  // A stale result from an earlier run must not survive this one, whatever happens next.
  const fs::path dir(args.output_dir);
  {
    std::error_code ec;
    if (fs::is_directory(dir, ec)) {
      fs::remove(dir / "value.npy", ec);
      if (ec) fail("cannot remove the stale " + (dir / "value.npy").string() + ": " + ec.message());
    }
  }

  const loss_entry* e = find_loss(args.loss);
  if (!e) {
    std::vector<std::string> names;
    for (const auto& r : registry()) names.push_back(r.name);
    fail("unknown loss " + detail::quoted(args.loss) + "; expected one of " + join(names));
  }
  if (!e->fn) fail(e->name + " is not implemented yet in this build of moereg-eval");
  check_against_table(*e, args);

  {
    std::error_code ec;
    if (!fs::exists(dir, ec)) {
      fs::create_directories(dir, ec);
      if (ec) fail("cannot create --output-dir " + dir.string() + ": " + ec.message());
    } else if (!fs::is_directory(dir, ec)) {
      fail("--output-dir " + dir.string() + " exists and is not a directory");
    }
  }

  std::map<std::string, npy::array> inputs;
  for (const auto& in : args.inputs) {
    auto a = npy::read_npy(in.second);
    check_dims(in.first, a);
    inputs.emplace(in.first, std::move(a));
  }
  std::vector<double> stats_in;
  if (!args.stats_in.empty()) stats_in = read_stats(args.stats_in);

  const request rq(args, std::move(inputs), std::move(stats_in), !args.stats_in.empty());
  response rs;
  if (args.backend == "cuda")
    eval_cuda(rq, rs);  // never silently on the CPU: builds without CUDA refuse
  else
    e->fn(rq, rs);
  if (rq.want_stats() && rs.stats.empty()) fail(e->name + " produced no statistics for --stats-out");

  staged_outputs out;
  for (const auto& g : rs.grads) out.stage(dir / ("grad_" + g.first + ".npy"), g.second);
  if (!args.stats_out.empty()) {
    const auto n = static_cast<std::int64_t>(rs.stats.size());
    out.stage(fs::path(args.stats_out), npy::array::from<double>({n}, rs.stats));
  }
  out.stage(dir / "value.npy", npy::array::from<double>({}, {rs.value}));
  out.commit();
}

}  // namespace moereg_eval
