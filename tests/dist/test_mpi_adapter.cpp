// moereg::dist MPI adapter, run under mpirun with several ranks: in-place sums of raw
// buffers, of a stats_bundle and of a stats_accumulator; the errors it reports (bad
// arguments, an MPI error code under MPI_ERRORS_RETURN, a call after MPI_Finalize).
// Prints one line per failed check and exits nonzero on any failure, on every rank.
#include <mpi.h>

#include <cstdio>
#include <string>
#include <vector>

#include <moereg/backend/cpu.hpp>
#include <moereg/core/stats.hpp>
#include <moereg/dist/mpi.hpp>
#include <moereg/losses/z_loss.hpp>

namespace {

int failures = 0;
int rank_id = 0;

void check(bool ok, const char* what) {
  if (ok) return;
  ++failures;
  std::printf("rank %d: FAILED: %s\n", rank_id, what);
}

// Runs f and reports whether it threw Error (moereg::error for bad arguments,
// moereg::backend_error for MPI's own failures) whose message contains `needle`; an exception
// of the other kind is a failure.
template <class Error = moereg::error, class F>
bool throws_with(F&& f, const std::string& needle) {
  try {
    f();
  } catch (const Error& e) {
    const bool ok = std::string(e.what()).find(needle) != std::string::npos;
    if (!ok) std::printf("rank %d: unexpected message: %s\n", rank_id, e.what());
    return ok;
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_id);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  const double R = static_cast<double>(ranks);
  const double r = static_cast<double>(rank_id);

  // Raw buffer: entry i of rank r is (r + 1) * (i + 1); the sum is exactly R(R+1)/2 (i + 1).
  {
    std::vector<double> buf(9);
    for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = (r + 1) * static_cast<double>(i + 1);
    moereg::dist::allreduce_sum(buf.data(), static_cast<moereg::index_t>(buf.size()), MPI_COMM_WORLD);
    bool ok = true;
    for (std::size_t i = 0; i < buf.size(); ++i) ok = ok && buf[i] == R * (R + 1) / 2 * static_cast<double>(i + 1);
    check(ok, "allreduce_sum of a raw buffer");
    moereg::dist::allreduce_sum(nullptr, 0, MPI_COMM_WORLD);  // empty: still a (trivial) collective
  }

  // A bundle: a loss's statistics and custom ones, summed in one call.
  {
    std::vector<double> Z(static_cast<std::size_t>(rank_id + 2) * 3, 0.5);
    const moereg::z_loss zl{};
    const moereg::z_loss_inputs<double> in{moereg::routing_view<double>(Z.data(), rank_id + 2, 3)};
    moereg::stats_bundle b;
    const auto hz = b.add(zl, in);
    const auto hc = b.add_custom(2, [&](double* out) {
      out[0] = 1.0;
      out[1] = r;
    });
    b.compute_local();
    moereg::dist::allreduce(b, MPI_COMM_WORLD);
    // T_v = sum_r (r + 2) = R(R-1)/2 + 2R
    check(b.view(hz).data[0] == R * (R - 1) / 2 + 2 * R, "allreduce of a bundle: z-loss T_v");
    check(b.view(hc).data[0] == R && b.view(hc).data[1] == R * (R - 1) / 2, "allreduce of a bundle: custom slice");
  }

  // An accumulator: two micro-batches per rank, then one all-reduce.
  {
    moereg::stats_accumulator acc(2);
    acc.add(std::vector<double>{1.0, r});
    acc.add(std::vector<double>{2.0, 10 * r});
    moereg::dist::allreduce(acc, MPI_COMM_WORLD);
    check(acc.data()[0] == 3 * R && acc.data()[1] == 11 * R * (R - 1) / 2, "allreduce of an accumulator");
  }

  // Argument errors are found before MPI is called (so no rank is left waiting).
  double x = 1.0;
  check(throws_with([&] { moereg::dist::allreduce_sum(&x, -1, MPI_COMM_WORLD); }, "count = -1 is negative"),
        "negative count throws");
  check(throws_with([&] { moereg::dist::allreduce_sum(nullptr, 3, MPI_COMM_WORLD); }, "buffer is null"),
        "null buffer throws");

  // An error MPI returns: with MPI_ERRORS_RETURN, an invalid communicator comes back as a
  // code, which the adapter throws with MPI_Error_string's text.
  {
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(MPI_ERR_COMM, text, &len);
    const std::string expected(text, static_cast<std::size_t>(len));
    check(throws_with<moereg::backend_error>([&] { moereg::dist::allreduce_sum(&x, 1, MPI_COMM_NULL); },
                                             "MPI_Allreduce of 1 doubles failed: " + expected),
          "an MPI error code is thrown with its MPI_Error_string");
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_ARE_FATAL);
  }

  int worst = 0;
  MPI_Allreduce(&failures, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();

  check(throws_with<moereg::backend_error>([&] { moereg::dist::allreduce_sum(&x, 1, MPI_COMM_WORLD); },
                                           "already finalized"),
        "a call after MPI_Finalize throws");
  if (failures > worst) worst = failures;
  if (rank_id == 0) std::printf("moereg MPI adapter on %d ranks: %s\n", ranks, worst == 0 ? "ok" : "FAILED");
  return worst == 0 ? 0 : 1;
}
