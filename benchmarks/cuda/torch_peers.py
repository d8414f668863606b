"""PyTorch eager and torch.compile of the formulas benchmarks/cuda/bench_cuda.cu times in
moereg's CUDA backend, same shapes, on the GPU: forward + backward of

  specialization  H [T, k, d] (T = 16384, k = 8, d = 2048)
  router5         load balancing + z-loss + entropy + variance + importance on P, Z [T, E]
                  (T = 65536, E = 256, top-8)

in bfloat16 and float32, and a device-to-device copy (y.copy_(x), 2 x 512 MiB counted) for
the bandwidth floor. CUDA-event timing, median of 5 runs of `reps` calls after warm-up. One
JSON object per line on stdout and in --out. Needs PyTorch 2.x with CUDA; exits 77 (skipped)
without a GPU. Nothing here asserts a time.

    python3 benchmarks/cuda/torch_peers.py --out DIR/torch_peers.jsonl [--reps 10] [--no-compile]
"""
import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from eager_formulas import e_entropy, e_importance, e_lb, e_spec, e_variance, e_z  # noqa: E402


def time_ms(fn, reps):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        runs.append(a.elapsed_time(b) / reps)
    return statistics.median(runs)


def fwd_bwd(loss_fn, xs):
    def run():
        for x in xs:
            x.grad = None
        loss_fn(*xs).backward()
    return run


def router5(P, Z, I, m):
    return e_lb(P, I, m) + e_z(Z, m) + e_entropy(P, m) + e_variance(P, m) + e_importance(P, m)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    ap.add_argument("--sp", default="16384,8,2048", help="specialization T,k,d")
    ap.add_argument("--router", default="65536,256,8", help="router T,E,k")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("torch_peers: no CUDA device (or a CPU-only torch)", file=sys.stderr)
        sys.exit(77)
    dev = torch.device("cuda")
    out = open(a.out, "w") if a.out else None

    def emit(d):
        line = json.dumps(d)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    emit({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda})
    n = 512 << 20
    x = torch.empty(n, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), a.reps)
    copy_gbps = 2 * n / (ms * 1e-3) / 1e9
    emit({"case": "copy", "impl": "torch", "ms": ms, "GBps": round(copy_gbps, 1)})
    del x, y

    torch.manual_seed(0)
    T, K, D = (int(v) for v in a.sp.split(","))
    Tr, E, Kr = (int(v) for v in a.router.split(","))
    modes = [("eager", lambda f: f)]
    if not a.no_compile:
        modes.append(("torch.compile", lambda f: torch.compile(f)))
    for dtype, name in [(torch.bfloat16, "bfloat16"), (torch.float32, "float32")]:
        H = torch.randn(T, K, D, device=dev, dtype=dtype).requires_grad_()
        I = torch.argsort(torch.rand(T, 64, device=dev), 1)[:, :K]  # K distinct experts of 64 per token
        m = torch.ones(T, dtype=torch.bool, device=dev)
        nbytes = 2 * H.numel() * H.element_size() + I.numel() * 4
        for mode, wrap in modes:
            f = wrap(lambda h: e_spec(h, I, m))
            try:
                ms = time_ms(fwd_bwd(f, [H]), a.reps)
                emit({"case": "specialization", "impl": mode, "dtype": name, "shape": f"T={T} k={K} d={D}", "ms": ms,
                      "pct_of_copy": round(100 * nbytes / (ms * 1e-3) / 1e9 / copy_gbps, 1)})
            except Exception as e:  # a compile failure is a result too
                emit({"case": "specialization", "impl": mode, "dtype": name, "error": str(e)[:300]})
        del H, I, m
        torch.cuda.empty_cache()
        P = torch.softmax(torch.randn(Tr, E, device=dev), 1).to(dtype).requires_grad_()
        Z = (torch.randn(Tr, E, device=dev) * 2).to(dtype).requires_grad_()
        I = torch.topk(P.detach(), Kr, 1).indices
        m = torch.ones(Tr, dtype=torch.bool, device=dev)
        nbytes = 4 * P.numel() * P.element_size() + I.numel() * 4
        for mode, wrap in modes:
            f = wrap(lambda p, z: router5(p, z, I, m))
            try:
                ms = time_ms(fwd_bwd(f, [P, Z]), a.reps)
                emit({"case": "router5", "impl": mode, "dtype": name, "shape": f"T={Tr} E={E} k={Kr}", "ms": ms,
                      "pct_of_copy": round(100 * nbytes / (ms * 1e-3) / 1e9 / copy_gbps, 1)})
            except Exception as e:
                emit({"case": "router5", "impl": mode, "dtype": name, "error": str(e)[:300]})
        del P, Z, I, m
        torch.cuda.empty_cache()
    if out:
        out.close()


if __name__ == "__main__":
    main()
