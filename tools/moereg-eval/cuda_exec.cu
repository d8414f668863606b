// moereg-eval --backend cuda: the same loss bodies as the CPU (runners.hpp) with an executor
// that stages every input on the first CUDA device and brings the results back.
//
// Inputs are copied to device memory once, gradients are device buffers copied back into the
// response, the value and the statistics come back through device words, and the call waits
// for its stream only at the end (the tool is a command-line program; the library itself
// never synchronises). A nonzero device status word is an error naming its bits, so an
// out-of-range or repeated top-k index ends the run with exit code 2 and no output files.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <moereg/backend/cuda.hpp>

#include "runners.hpp"

namespace moereg_eval {
namespace {

void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw moereg::error(std::string("CUDA: ") + what + ": " + cudaGetErrorString(e));
}

std::size_t index_bytes(moereg::index_type t) {
  return t == moereg::index_type::i32 ? 4 : 8;
}

std::size_t mask_bytes(moereg::mask_type t) {
  switch (t) {
    case moereg::mask_type::u8:
    case moereg::mask_type::boolean:
      return 1;
    case moereg::mask_type::i32:
      return 4;
    default:
      return 8;
  }
}

class cuda_exec {
 public:
  cuda_exec() {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0)
      throw moereg::error(std::string("--backend cuda: no usable CUDA device (") +
                          (e != cudaSuccess ? cudaGetErrorString(e) : "device count 0") + ")");
    cuda_ok(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    value_ = static_cast<double*>(alloc(sizeof(double)));
    status_ = static_cast<int*>(alloc(sizeof(int)));
    cuda_ok(cudaMemsetAsync(status_, 0, sizeof(int), stream_), "cudaMemsetAsync");
  }
  ~cuda_exec() {
    if (stream_ != nullptr) (void)cudaStreamSynchronize(stream_);
    for (void* p : allocs_) (void)cudaFree(p);
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
  }
  cuda_exec(const cuda_exec&) = delete;
  cuda_exec& operator=(const cuda_exec&) = delete;

  // ---- inputs: device copies of host views -------------------------------------------
  template <class T>
  moereg::matrix_view<const T> in(const moereg::matrix_view<const T>& v) {
    return {upload(v.data, static_cast<std::size_t>(v.rows * v.cols)), v.rows, v.cols};
  }
  template <class T>
  moereg::activation_view<const T, moereg::token_major> in(
      const moereg::activation_view<const T, moereg::token_major>& v) {
    const auto& l = v.layout;
    return {upload(v.data, static_cast<std::size_t>(l.tokens() * l.slots() * l.dim())), l};
  }
  moereg::topk_view in(const moereg::topk_view& v) {
    moereg::topk_view d = v;
    d.data = upload_bytes(v.data, static_cast<std::size_t>(v.rows * v.row_stride) * index_bytes(v.type));
    return d;
  }
  moereg::mask_view in(const moereg::mask_view& v) {
    moereg::mask_view d = v;
    if (v.data != nullptr)
      d.data = upload_bytes(v.data, static_cast<std::size_t>(v.size * v.stride) * mask_bytes(v.type));
    return d;
  }
  moereg::offsets_view in(const moereg::offsets_view& v) {
    moereg::offsets_view d = v;
    if (v.data != nullptr) d.data = upload_bytes(v.data, static_cast<std::size_t>(v.size) * index_bytes(v.type));
    return d;
  }
  moereg::stats_view in(const moereg::stats_view& v) {
    if (v.empty()) return v;
    return {upload(v.data, static_cast<std::size_t>(v.size)), v.size};
  }

  // ---- gradients: device buffers copied back into the host ones at the end -----------
  template <class T>
  moereg::matrix_view<T> out(const moereg::matrix_view<T>& v) {
    return {download_later(v.data, static_cast<std::size_t>(v.rows * v.cols)), v.rows, v.cols};
  }
  template <class T>
  moereg::activation_view<T, moereg::token_major> out(const moereg::activation_view<T, moereg::token_major>& v) {
    const auto& l = v.layout;
    return {download_later(v.data, static_cast<std::size_t>(l.tokens() * l.slots() * l.dim())), l};
  }

  template <class Loss, class In>
  std::vector<double> stats(const Loss& loss, const In& in) {
    const auto n = static_cast<std::size_t>(loss.stats_size(in));
    std::vector<double> s(n);
    auto* d = static_cast<double*>(alloc(n * sizeof(double)));
    loss.local_stats(in, d, backend(loss, in));
    if (n > 0)
      cuda_ok(cudaMemcpyAsync(s.data(), d, n * sizeof(double), cudaMemcpyDeviceToHost, stream_), "copy statistics");
    finish();
    return s;
  }

  template <class Loss, class In, class Grad>
  double value_and_grad(const Loss& loss, const In& in, const Grad& grad, moereg::grad_options opts,
                        moereg::stats_view reduced) {
    loss.value_and_grad(in, grad, opts, reduced, backend(loss, in));
    double v = 0.0;
    cuda_ok(cudaMemcpyAsync(&v, value_, sizeof(double), cudaMemcpyDeviceToHost, stream_), "copy value");
    for (const auto& p : pending_)
      cuda_ok(cudaMemcpyAsync(p.host, p.dev, p.bytes, cudaMemcpyDeviceToHost, stream_), "copy gradient");
    finish();
    return v;
  }

 private:
  struct pending {
    void* host;
    const void* dev;
    std::size_t bytes;
  };
  cudaStream_t stream_ = nullptr;
  std::vector<void*> allocs_;
  std::vector<pending> pending_;
  double* value_ = nullptr;
  int* status_ = nullptr;
  std::vector<unsigned char*> ws_;

  void* alloc(std::size_t bytes) {
    void* p = nullptr;
    cuda_ok(cudaMalloc(&p, bytes > 0 ? bytes : 1), "cudaMalloc");
    allocs_.push_back(p);
    return p;
  }
  const void* upload_bytes(const void* h, std::size_t bytes) {
    void* d = alloc(bytes);
    if (bytes > 0) cuda_ok(cudaMemcpyAsync(d, h, bytes, cudaMemcpyHostToDevice, stream_), "copy input");
    return d;
  }
  template <class T>
  const T* upload(const T* h, std::size_t n) {
    return static_cast<const T*>(upload_bytes(h, n * sizeof(T)));
  }
  template <class T>
  T* download_later(T* h, std::size_t n) {
    T* d = static_cast<T*>(const_cast<void*>(upload_bytes(h, n * sizeof(T))));  // starts as the host's zeros
    pending_.push_back({h, d, n * sizeof(T)});
    return d;
  }
  template <class Loss, class In>
  moereg::cuda backend(const Loss& loss, const In& in) {
    moereg::cuda be;
    be.stream = stream_;
    be.workspace_bytes = moereg::workspace_size(loss, in, be);
    be.workspace = be.workspace_bytes > 0 ? alloc(be.workspace_bytes) : nullptr;
    be.value = value_;
    be.status = status_;
    return be;
  }
  /// Waits for the stream and turns a nonzero device status into an error.
  void finish() {
    int status = 0;
    cuda_ok(cudaMemcpyAsync(&status, status_, sizeof(int), cudaMemcpyDeviceToHost, stream_), "copy status");
    cuda_ok(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    if (status != moereg::cuda_ok)
      throw moereg::error("device-side check failed: " + moereg::cuda_status_string(status));
  }
};

}  // namespace

void eval_cuda(const request& rq, response& rs) {
  const std::string& name = rq.loss();
  cuda_exec x;
  if (name == "load_balancing") {
    run_load_balancing(rq, rs, load_balancing_options(rq), x);
  } else if (name == "z_loss") {
    run_matrix_loss<moereg::z_loss_inputs>(rq, rs, z_loss_options(rq), x, "logits");
  } else if (name == "entropy") {
    run_matrix_loss<moereg::entropy_inputs>(rq, rs, entropy_options(rq), x, "probs");
  } else if (name == "importance") {
    run_matrix_loss<moereg::importance_inputs>(rq, rs, importance_options(rq), x, "probs");
  } else if (name == "variance") {
    run_matrix_loss<moereg::variance_inputs>(rq, rs, variance_options(rq), x, "scores");
  } else if (name == "specialization") {
    run_activation_loss<moereg::specialization_inputs>(rq, rs, specialization_options(rq), x);
  } else if (name == "orthogonality") {
    run_activation_loss<moereg::orthogonality_inputs>(rq, rs, orthogonality_options(rq), x);
  } else if (name == "coupling") {
    const moereg::coupling_loss loss = coupling_options(rq);
    run_coupling(rq, rs, loss, coupling_layers(rq), x);
  } else {
    throw moereg::error(name + " has no CUDA backend in this build of moereg-eval");
  }
}

}  // namespace moereg_eval
