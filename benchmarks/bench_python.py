"""moereg_torch against PyTorch eager autograd of the same formulas (CPU), and the Python call
overhead per op. One run, same inputs, same thread count for both.

    python3 benchmarks/bench_python.py [--threads 2] [--quick] [--markdown]

Times are the minimum of `reps` runs of forward + backward (the gradient of the loss with
respect to its floating input), after one warm-up run: the minimum, not the median, because
on a shared machine the other runs measure the neighbours' load.

The last column, a clone of the op's floating input (one read and one write of a fresh
tensor, as the gradient is), is the memory-bound floor of that machine at that moment.
"""
import argparse
import time

import torch

import moereg_torch as mt


from eager_formulas import e_coupling, e_entropy, e_importance, e_lb, e_ortho, e_spec, e_variance, e_z


def timeit(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def fwd_bwd(loss_fn, xs):
    def run():
        for x in xs:
            x.grad = None
        loss_fn().backward()
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    load0 = open("/proc/loadavg").read().split()[:3]
    T_r, E_r = (2048, 64) if a.quick else (16384, 256)
    T_a, K, D = (512, 8, 128) if a.quick else (4096, 8, 1024)
    reps = 3 if a.quick else 7

    rows = []
    P = torch.softmax(torch.randn(T_r, E_r), 1).requires_grad_()
    Z = (torch.randn(T_r, E_r) * 3).requires_grad_()
    I = torch.topk(P.detach(), 8, 1).indices
    I[torch.rand(I.shape) < 0.05] = -1
    m = torch.rand(T_r) > 0.1
    router = [
        ("load_balancing", lambda: mt.load_balancing(P, I, m), lambda: e_lb(P, I, m), [P]),
        ("z_loss", lambda: mt.z_loss(Z, m), lambda: e_z(Z, m), [Z]),
        ("entropy", lambda: mt.entropy(P, m), lambda: e_entropy(P, m), [P]),
        ("importance", lambda: mt.importance(P, m), lambda: e_importance(P, m), [P]),
        ("variance", lambda: mt.variance(P, m), lambda: e_variance(P, m), [P]),
    ]
    P2 = torch.softmax(torch.randn(T_r, E_r), 1).requires_grad_()
    I2 = torch.topk(P2.detach(), 8, 1).indices
    router.append(("coupling (L=2)", lambda: mt.coupling([P, P2], [I, I2], m),
                   lambda: e_coupling([P, P2], [I, I2], m), [P, P2]))
    for name, f_mt, f_eager, xs in router:
        tm, te = timeit(fwd_bwd(f_mt, xs), reps), timeit(fwd_bwd(f_eager, xs), reps)
        tc = timeit(lambda: [x.detach().clone() for x in xs], reps)
        rows.append((name, f"T={T_r}, E={E_r}, float32", tm, te, tc))
    del P, Z, P2
    H = torch.randn(T_a, K, D).requires_grad_()
    Ia = torch.stack([torch.randperm(64)[:K] for _ in range(T_a)])
    ma = torch.rand(T_a) > 0.1
    for name, f_mt, f_eager in [("specialization", lambda: mt.specialization(H, Ia, ma), lambda: e_spec(H, Ia, ma)),
                                ("orthogonality", lambda: mt.orthogonality(H, Ia, ma), lambda: e_ortho(H, Ia, ma))]:
        tm, te = timeit(fwd_bwd(f_mt, [H]), reps), timeit(fwd_bwd(f_eager, [H]), reps)
        tc = timeit(lambda: H.detach().clone(), reps)
        rows.append((name, f"T={T_a}, k={K}, d={D}, float32", tm, te, tc))
    del H

    # Python call overhead on small inputs: forward only (no grad) and forward + backward.
    Ps = torch.softmax(torch.randn(8, 8), 1)
    Is = torch.topk(Ps, 2, 1).indices
    Hs = torch.randn(8, 2, 8)
    small = [("load_balancing", lambda x: mt.load_balancing(x, Is), Ps), ("z_loss", lambda x: mt.z_loss(x), Ps),
             ("entropy", lambda x: mt.entropy(x), Ps), ("importance", lambda x: mt.importance(x), Ps),
             ("variance", lambda x: mt.variance(x), Ps), ("specialization", lambda x: mt.specialization(x, Is), Hs),
             ("orthogonality", lambda x: mt.orthogonality(x, Is), Hs)]
    n = 2000
    over = []
    for name, fn, x in small:
        def fwd():
            for _ in range(n):
                fn(x)
        xg = x.clone().requires_grad_()

        def fb():
            for _ in range(n):
                fn(xg).backward()
        over.append((name, timeit(fwd, 3) / n * 1e6, timeit(fb, 3) / n * 1e6))
    # the floor: one trivial torch op and its backward, through the same autograd engine
    xs = Ps.clone().requires_grad_()

    def t_fwd():
        for _ in range(n):
            xs.sum()

    def t_fb():
        for _ in range(n):
            xs.sum().backward()
    over.append(("(torch x.sum(), for scale)", timeit(t_fwd, 3) / n * 1e6, timeit(t_fb, 3) / n * 1e6))

    import os
    model = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    print(f"moereg_torch {mt.__version__}, torch {torch.__version__}, {a.threads} threads, CPU: {model}")
    print()
    print(f"load average before / after: {load0} / {open('/proc/loadavg').read().split()[:3]}")
    print()
    print("| op | size | moereg_torch fwd+bwd (ms) | eager autograd fwd+bwd (ms) | speed-up | input clone (ms) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, size, tm, te, tc in rows:
        print(f"| {name} | {size} | {tm * 1e3:.2f} | {te * 1e3:.2f} | {te / tm:.1f}x | {tc * 1e3:.2f} |")
    print()
    print("| op (T=8, E=8 or k=2, d=8) | call, no grad (us) | call + backward (us) |")
    print("| --- | --- | --- |")
    for name, f, fb in over:
        print(f"| {name} | {f:.1f} | {fb:.1f} |")


if __name__ == "__main__":
    main()
