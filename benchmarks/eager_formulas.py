"""The formulas of LOSSES.md written as plain PyTorch eager code in the input's dtype and on
its device: the peers moereg is timed against (benchmarks/bench_python.py on the CPU,
benchmarks/cuda/torch_peers.py on a GPU, eager and torch.compile). python/tests/reference.py
holds the float64 references the tests check against.
"""
import torch

def e_lb(P, I, m):
    T, E = P.shape
    mf = m.to(P.dtype)
    tv = mf.sum()
    w = ((I >= 0) & m[:, None]).to(P.dtype)
    counts = torch.zeros(E, dtype=P.dtype, device=P.device).index_add_(0, I.clamp(min=0).reshape(-1), w.reshape(-1))
    f = counts / (I.shape[1] * tv)
    pbar = (mf[:, None] * P).sum(0) / tv
    return 1e-2 * E * (f * pbar).sum()


def e_z(Z, m):
    mf = m.to(Z.dtype)
    lse = torch.logsumexp(Z, 1)
    return 1e-3 * (mf * lse * lse).sum() / mf.sum()


def e_entropy(P, m):
    mf = m.to(P.dtype)
    return 1e-3 * (mf * -(P * torch.log(P.clamp(min=1e-30))).sum(1)).sum() / mf.sum()


def e_importance(P, m):
    imp = (m.to(P.dtype)[:, None] * P).sum(0)
    return 1e-2 * imp.var(unbiased=False) / imp.mean() ** 2


def e_variance(S, m):
    mf = m.to(S.dtype)
    tv = mf.sum()
    sbar = (mf[:, None] * S).sum(0) / tv
    return -1e-3 * (mf[:, None] * (S - sbar) ** 2).sum() / (S.shape[1] * tv)


def e_spec(H, I, m):
    k = H.shape[1]
    w = ((I >= 0) & m[:, None]).to(H.dtype)
    hn = H / H.norm(dim=2, keepdim=True).clamp(min=1e-8)
    C = hn @ hn.transpose(1, 2)
    W = w[:, :, None] * w[:, None, :] * (1 - torch.eye(k, dtype=H.dtype, device=H.device))
    return 2e-3 * (C * C * W).sum() / m.to(H.dtype).sum()


def e_ortho(H, I, m):
    k = H.shape[1]
    w = ((I >= 0) & m[:, None]).to(H.dtype)
    G = H @ H.transpose(1, 2)
    nsq = torch.diagonal(G, dim1=1, dim2=2)
    term = G * G * (nsq / (nsq + 1e-6) ** 2)[:, None, :]
    W = w[:, :, None] * w[:, None, :] * (1 - torch.eye(k, dtype=H.dtype, device=H.device))
    return 1e-4 * (term * W).sum() / m.to(H.dtype).sum()


def e_coupling(Ps, Is, m):
    mf = m.to(Ps[0].dtype)
    M = [(P.gather(1, I.clamp(min=0)) * (I >= 0)).sum(1) for P, I in zip(Ps, Is)]
    return -1e-3 * sum((mf * M[l] * M[l + 1]).sum() for l in range(len(M) - 1)) / mf.sum()
