// Command-line parsing of moereg-eval into a plain struct.
//
//   moereg-eval LOSS --output-dir DIR [--backend cpu|cuda] [--grad-scale G]
//               [--stats-out FILE.npy] [--stats-in FILE.npy] [--OPTION VALUE ...]
//               --in NAME=FILE.npy [--in NAME=FILE.npy ...]
//
// parse_args only checks what it can know without the loss: the syntax, that every option
// is a known one and given at most once, that numbers are numbers, that input names are
// well formed and not repeated. Whether an option or input applies to LOSS is checked by
// the loss registry (eval.hpp). Every failure throws moereg::error with a one-line message;
// the parser never reads past argv[argc - 1] and accepts any bytes, so it can be fuzzed.
#pragma once

#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include <moereg/core/error.hpp>

namespace moereg_eval {

/// The loss options of LOSSES.md that the tool knows (written --NAME VALUE).
inline const std::vector<std::string>& loss_option_names() {
  static const std::vector<std::string> names = {"coef",  "eps",  "scope",     "seq-len", "k",
                                                 "pairs", "form", "reduction", "axis",    "variant"};
  return names;
}

struct arguments {
  std::string loss;                                          ///< LOSS
  std::string output_dir;                                    ///< --output-dir
  std::string backend = "cpu";                               ///< --backend cpu|cuda
  double grad_scale = 1.0;                                   ///< --grad-scale
  std::string stats_in;                                      ///< --stats-in (empty = none)
  std::string stats_out;                                     ///< --stats-out (empty = none)
  std::vector<std::pair<std::string, std::string>> options;  ///< loss options (name without --, raw value), in order
  std::vector<std::pair<std::string, std::string>> inputs;   ///< --in NAME=FILE, in order
  bool help = false;                                         ///< --help / -h: print the usage and exit 0

  /// The raw value of a loss option, or nullptr when it was not given.
  const std::string* option(const std::string& name) const {
    for (const auto& o : options)
      if (o.first == name) return &o.second;
    return nullptr;
  }
};

/// The usage text printed by --help.
inline const char* usage() {
  return "usage: moereg-eval LOSS --output-dir DIR [--backend cpu|cuda] [--grad-scale G]\n"
         "                   [--stats-out FILE.npy] [--stats-in FILE.npy] [--OPTION VALUE ...]\n"
         "                   --in NAME=FILE.npy [--in NAME=FILE.npy ...]\n"
         "LOSS: load_balancing z_loss specialization coupling orthogonality variance entropy importance\n"
         "OPTION: coef eps scope seq-len k pairs form reduction axis variant (see LOSSES.md)\n"
         "Writes DIR/value.npy and DIR/grad_NAME.npy for every differentiable input.\n"
         "Exit status: 0 on success, 2 on bad arguments or bad input.\n";
}

namespace detail {

[[noreturn]] inline void arg_fail(const std::string& msg) {
  throw moereg::error(msg);
}

/// Quotes an argument for a message, escaping what would break the one-line rule.
inline std::string quoted(const std::string& s) {
  std::string out = "'";
  const std::size_t limit = 200;
  for (std::size_t i = 0; i < s.size() && i < limit; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7f) {
      static const char hex[] = "0123456789abcdef";
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    } else {
      out += static_cast<char>(c);
    }
  }
  if (s.size() > limit) out += "...";
  return out + "'";
}

}  // namespace detail

/// Parses a finite floating-point number; the whole text must be the number.
inline double parse_double(const std::string& what, const std::string& text) {
  if (text.empty() || text.size() > 100 || text.find('\0') != std::string::npos)
    detail::arg_fail(what + " must be a number, got " + detail::quoted(text));
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (end != text.c_str() + text.size() || std::isspace(static_cast<unsigned char>(text[0])))
    detail::arg_fail(what + " must be a number, got " + detail::quoted(text));
  // Overflow gives +-inf (caught here); underflow to a tiny number or zero is harmless.
  if (!std::isfinite(v)) detail::arg_fail(what + " must be a finite number, got " + detail::quoted(text));
  return v;
}

/// Parses a decimal integer (optional sign); the whole text must be the number.
inline std::int64_t parse_int(const std::string& what, const std::string& text) {
  std::size_t i = 0;
  bool neg = false;
  if (i < text.size() && (text[i] == '+' || text[i] == '-')) neg = text[i++] == '-';
  if (i == text.size()) detail::arg_fail(what + " must be an integer, got " + detail::quoted(text));
  std::uint64_t v = 0;
  const std::uint64_t lim = static_cast<std::uint64_t>(INT64_MAX);
  for (; i < text.size(); ++i) {
    const char c = text[i];
    if (c < '0' || c > '9') detail::arg_fail(what + " must be an integer, got " + detail::quoted(text));
    const auto d = static_cast<std::uint64_t>(c - '0');
    if (v > (lim - d) / 10) detail::arg_fail(what + " is out of range: " + detail::quoted(text));
    v = v * 10 + d;
  }
  const auto s = static_cast<std::int64_t>(v);
  return neg ? -s : s;
}

/// True for a well-formed input name: letters, digits and '_' (it becomes part of the
/// output file name grad_NAME.npy, so nothing else is allowed).
inline bool valid_input_name(const std::string& n) {
  if (n.empty() || n.size() > 64) return false;
  for (char c : n)
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_')) return false;
  return true;
}

/// Parses the arguments after the program name.
inline arguments parse_args(const std::vector<std::string>& args) {
  arguments a;
  bool have_out = false, have_backend = false, have_scale = false, have_sin = false, have_sout = false;
  const std::size_t n = args.size();
  auto value_of = [&](std::size_t& i, const std::string& opt) -> const std::string& {
    if (i + 1 >= n) detail::arg_fail("option " + opt + " needs a value");
    return args[++i];
  };
  auto once = [&](bool& seen, const std::string& opt) {
    if (seen) detail::arg_fail("option " + opt + " is given twice");
    seen = true;
  };
  for (std::size_t i = 0; i < n; ++i) {
    const std::string& s = args[i];
    if (s == "--help" || s == "-h") {
      a.help = true;
    } else if (s == "--output-dir") {
      once(have_out, s);
      a.output_dir = value_of(i, s);
      if (a.output_dir.empty()) detail::arg_fail("--output-dir must not be empty");
      if (a.output_dir.find('\0') != std::string::npos) detail::arg_fail("--output-dir contains a NUL byte");
    } else if (s == "--backend") {
      once(have_backend, s);
      a.backend = value_of(i, s);
      if (a.backend != "cpu" && a.backend != "cuda")
        detail::arg_fail("--backend must be cpu or cuda, got " + detail::quoted(a.backend));
    } else if (s == "--grad-scale") {
      once(have_scale, s);
      a.grad_scale = parse_double("--grad-scale", value_of(i, s));
    } else if (s == "--stats-in") {
      once(have_sin, s);
      a.stats_in = value_of(i, s);
      if (a.stats_in.empty() || a.stats_in.find('\0') != std::string::npos)
        detail::arg_fail("--stats-in needs a file name");
    } else if (s == "--stats-out") {
      once(have_sout, s);
      a.stats_out = value_of(i, s);
      if (a.stats_out.empty() || a.stats_out.find('\0') != std::string::npos)
        detail::arg_fail("--stats-out needs a file name");
    } else if (s == "--in") {
      const std::string& spec = value_of(i, s);
      const auto eq = spec.find('=');
      if (eq == std::string::npos) detail::arg_fail("--in expects NAME=FILE.npy, got " + detail::quoted(spec));
      std::string name = spec.substr(0, eq), file = spec.substr(eq + 1);
      if (!valid_input_name(name))
        detail::arg_fail("--in: bad input name " + detail::quoted(name) + " (letters, digits and _ only)");
      if (file.empty() || file.find('\0') != std::string::npos)
        detail::arg_fail("--in " + name + "= needs a file name");
      for (const auto& in : a.inputs)
        if (in.first == name) detail::arg_fail("input " + name + " is given twice");
      a.inputs.emplace_back(std::move(name), std::move(file));
    } else if (s.size() > 2 && s[0] == '-' && s[1] == '-') {
      const std::string name = s.substr(2);
      bool known = false;
      for (const auto& k : loss_option_names()) known = known || k == name;
      if (!known) detail::arg_fail("unknown option " + detail::quoted(s));
      if (a.option(name)) detail::arg_fail("option " + s + " is given twice");
      const std::string& v = value_of(i, s);
      a.options.emplace_back(name, v);
    } else if (!s.empty() && s[0] == '-') {
      detail::arg_fail("unknown option " + detail::quoted(s));
    } else {
      if (!a.loss.empty())
        detail::arg_fail("unexpected argument " + detail::quoted(s) + " (LOSS is already " + a.loss + ")");
      if (s.empty()) detail::arg_fail("LOSS must not be empty");
      a.loss = s;
    }
  }
  if (a.help) return a;
  if (a.loss.empty()) detail::arg_fail("missing LOSS (the first argument, e.g. load_balancing)");
  if (!have_out) detail::arg_fail("missing --output-dir DIR");
  if (a.inputs.empty()) detail::arg_fail("no inputs: give them as --in NAME=FILE.npy");
  return a;
}

/// Parses main's argc/argv (argv[0] is the program name and is skipped).
inline arguments parse_args(int argc, const char* const* argv) {
  if (argc < 0 || (argc > 0 && argv == nullptr)) detail::arg_fail("bad argument vector");
  std::vector<std::string> args;
  for (int i = 1; i < argc; ++i) {
    if (argv[i] == nullptr) detail::arg_fail("bad argument vector");
    args.emplace_back(argv[i]);
  }
  return parse_args(args);
}

}  // namespace moereg_eval
