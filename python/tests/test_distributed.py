"""scope="global" (and "micro") with a process_group: 2 processes, gloo, loopback only."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

import moereg_torch as mt
import reference as ref
from conftest import rel_err


def _batch():
    g = torch.Generator().manual_seed(99)
    T, E, k = 2 * 45, 8, 2
    P = torch.softmax(torch.randn(T, E, dtype=torch.float64, generator=g), 1)
    I = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    I[torch.rand(T, k, generator=g) < 0.1] = -1
    m = torch.ones(T, dtype=torch.bool)
    m[[3, 10, 50, 51]] = False  # two padded tokens on each rank: equal valid counts
    return P, I, m


def _worker(rank, world, port, out):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        P, I, m = _batch()
        n = P.shape[0] // world
        sl = slice(rank * n, (rank + 1) * n)
        res = {}
        for scope in ["global", "micro"]:
            p = P[sl].clone().requires_grad_()
            v = mt.load_balancing(p, I[sl], m[sl], coef=0.5, scope=scope, process_group=dist.group.WORLD)
            v.backward()
            res[scope] = (v.item(), p.grad.clone())
        # the accumulator: two micro-batches per rank, summed, then over ranks (two-phase schedule)
        acc = mt.StatsAccumulator(steps=2)
        half = n // 2
        parts = [slice(rank * n, rank * n + half), slice(rank * n + half, (rank + 1) * n)]
        for s in parts:
            acc.add(mt.load_balancing_stats(P[s], I[s], m[s], scope="global"))
        acc.all_reduce()
        res["acc"] = [mt.load_balancing(P[s], I[s], m[s], coef=0.5, scope="global", stats=acc.sums).item()
                      for s in parts]
        out[rank] = res
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    world = 2
    mgr = tmp.Manager()
    out = mgr.dict()
    tmp.spawn(_worker, args=(world, _free_port(), out), nprocs=world, join=True)
    P, I, m = _batch()
    n = P.shape[0] // world
    # one call over the whole batch
    Pw = P.clone().requires_grad_()
    whole = mt.load_balancing(Pw, I, m, coef=0.5)
    whole.backward()
    assert rel_err(whole, ref.load_balancing(P, I, m, 0.5)) < 1e-12
    # micro scope + process_group: each rank's gradient rows are the whole batch's rows and
    # the ranks' values add up to the whole value (LOSSES.md section 9).
    assert abs(sum(out[r]["micro"][0] for r in range(world)) - whole.item()) < 1e-12 * whole.item()
    for r in range(world):
        assert rel_err(out[r]["micro"][1], Pw.grad[r * n:(r + 1) * n]) < 1e-12
    # global scope (Qwen): f from the whole batch, pbar and the gradient's 1/T_v local. With
    # equal valid counts per rank, the mean of the ranks' values is the whole batch's value
    # and each rank's gradient rows, averaged over ranks as DDP does, are the whole batch's.
    assert abs(sum(out[r]["global"][0] for r in range(world)) / world - whole.item()) < 1e-12 * whole.item()
    for r in range(world):
        assert rel_err(out[r]["global"][1] / world, Pw.grad[r * n:(r + 1) * n]) < 1e-12
        # and against the formula: f of the whole batch, pbar of the rank's rows
        sl = slice(r * n, (r + 1) * n)
        E, k = P.shape[1], I.shape[1]
        f = ref.expert_counts(I, m, E) / (k * m.sum())
        ms = m[sl].double()
        pbar = (ms[:, None] * P[sl]).sum(0) / ms.sum()
        assert abs(out[r]["global"][0] - 0.5 * E * (f * pbar).sum().item()) < 1e-12
    # accumulator over 2 micro-batches x 2 ranks: every micro-batch sees the whole batch's f
    E, k = P.shape[1], I.shape[1]
    f = ref.expert_counts(I, m, E) / (k * m.sum())
    half = n // 2
    for r in range(world):
        parts = [slice(r * n, r * n + half), slice(r * n + half, (r + 1) * n)]
        for v, s in zip(out[r]["acc"], parts):
            ms = m[s].double()
            pbar = (ms[:, None] * P[s]).sum(0) / ms.sum()
            assert abs(v - 0.5 * E * (f * pbar).sum().item()) < 1e-12
