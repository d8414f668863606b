// libFuzzer target: moereg-eval's argument parser. The input is split at NUL bytes into an
// argument vector; any vector must parse or throw moereg::error, through both entry points
// (the std::vector one and main's argc/argv one), with the same outcome.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "moereg-eval/args.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::vector<std::string> args;
  std::string cur;
  for (std::size_t i = 0; i < size; ++i) {
    if (data[i] == 0) {
      args.push_back(cur);
      cur.clear();
    } else {
      cur.push_back(static_cast<char>(data[i]));
    }
  }
  if (size > 0) args.push_back(cur);

  bool ok_vec = true;
  moereg_eval::arguments a;
  try {
    a = moereg_eval::parse_args(args);
  } catch (const moereg::error&) {
    ok_vec = false;
  }

  std::vector<const char*> argv;
  argv.push_back("moereg-eval");
  for (const auto& s : args) argv.push_back(s.c_str());
  argv.push_back(nullptr);
  bool ok_argv = true;
  try {
    (void)moereg_eval::parse_args(static_cast<int>(argv.size() - 1), argv.data());
  } catch (const moereg::error&) {
    ok_argv = false;
  }
  if (ok_vec != ok_argv) std::abort();

  if (ok_vec && !a.help) {
    // What the parser promises about an accepted command line.
    if (a.loss.empty() || a.output_dir.empty() || a.inputs.empty()) std::abort();
    if (a.backend != "cpu" && a.backend != "cuda") std::abort();
    for (std::size_t i = 0; i < a.inputs.size(); ++i) {
      if (!moereg_eval::valid_input_name(a.inputs[i].first) || a.inputs[i].second.empty()) std::abort();
      for (std::size_t j = 0; j < i; ++j)
        if (a.inputs[i].first == a.inputs[j].first) std::abort();
    }
  }
  return 0;
}
