// moereg-eval: evaluates one moereg loss on .npy inputs and writes its value and gradients.
// See args.hpp for the command line and driver.cpp for the output protocol.
//
// Exit status: 0 on success; 2 on anything else (bad arguments, bad input, a loss not
// implemented in this build, out of memory), with one line on stderr saying what is wrong.
#include <cstdio>
#include <exception>
#include <new>

#include "args.hpp"
#include "eval.hpp"

namespace {

// Writes one line without allocating (it may run after std::bad_alloc).
void report(const char* msg) {
  std::fputs("moereg-eval: ", stderr);
  for (const char* p = msg; p && *p; ++p) std::fputc(*p == '\n' || *p == '\r' ? ' ' : *p, stderr);
  std::fputc('\n', stderr);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const moereg_eval::arguments args = moereg_eval::parse_args(argc, argv);
    if (args.help) {
      std::fputs(moereg_eval::usage(), stdout);
      return 0;
    }
    moereg_eval::run(args);
    return 0;
  } catch (const std::bad_alloc&) {
    report("out of memory (are the inputs too large?)");
  } catch (const std::exception& e) {
    report(e.what());
  } catch (...) {
    report("unexpected error");
  }
  return 2;
}
