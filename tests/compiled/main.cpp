// moereg::compiled computes bitwise what the headers compute: every loss, storage type and
// layout of every_loss.hpp through the library and through a header-only instantiation of
// the same code with the same flags.
#include <cstdio>
#include <vector>

std::vector<double> run_with_library();
std::vector<double> run_header_only();

int main() {
  const std::vector<double> a = run_with_library(), b = run_header_only();
  if (a.size() != b.size() || a.size() < 1000) {
    std::fprintf(stderr, "compiled: %zu results through the library, %zu header-only\n", a.size(), b.size());
    return 1;
  }
  std::size_t bad = 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!(a[i] == b[i]) && !(a[i] != a[i] && b[i] != b[i])) {
      if (bad++ < 10)
        std::fprintf(stderr, "compiled: result %zu is %.17g through the library, %.17g header-only\n", i, a[i], b[i]);
    }
  if (bad) {
    std::fprintf(stderr, "compiled: %zu of %zu results differ\n", bad, a.size());
    return 1;
  }
  std::printf("compiled: %zu results, library and header-only agree bitwise\n", a.size());
  return 0;
}
