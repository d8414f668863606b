"""Independent float64 formulas of LOSSES.md, written with torch ops only (no moereg code).
torch autograd of these gives the reference gradients."""
import torch


def valid_tokens(mask, T):
    if mask is None:
        return torch.ones(T, dtype=torch.float64)
    return (mask != 0).to(torch.float64)


def slot_valid(topk, mask):
    m = valid_tokens(mask, topk.shape[0])
    return (topk >= 0).to(torch.float64) * m[:, None]


def expert_counts(topk, mask, E):
    w = slot_valid(topk, mask)
    c = torch.zeros(E, dtype=torch.float64)
    idx = topk.clamp(min=0).long().reshape(-1)
    return c.index_add(0, idx, w.reshape(-1))


def load_balancing(P, topk, mask=None, coef=1e-2, k=None, scope="micro", seq_len=None, cu_seqlens=None):
    T, E = P.shape
    kk = topk.shape[1] if not k else k
    if scope == "sequence":
        if seq_len:
            bounds = [(b * seq_len, (b + 1) * seq_len) for b in range(T // seq_len)]
        else:
            c = [int(x) for x in cu_seqlens]
            bounds = list(zip(c[:-1], c[1:]))
        total = P.sum() * 0
        for (a, b) in bounds:
            m = None if mask is None else mask[a:b]
            total = total + load_balancing(P[a:b], topk[a:b], m, coef, k)
        return total / len(bounds) if bounds else total
    m = valid_tokens(mask, T)
    tv = m.sum()
    if tv == 0:
        return P.sum() * 0
    f = expert_counts(topk, mask, E) / (kk * tv)
    pbar = (m[:, None] * P).sum(0) / tv
    return coef * E * (f * pbar).sum()


def z_loss(Z, mask=None, coef=1e-3):
    m = valid_tokens(mask, Z.shape[0])
    tv = m.sum()
    if tv == 0:
        return Z.sum() * 0
    lse = torch.logsumexp(Z, dim=1)
    return coef * (m * lse * lse).sum() / tv


def entropy(P, mask=None, coef=1e-3):
    m = valid_tokens(mask, P.shape[0])
    tv = m.sum()
    if tv == 0:
        return P.sum() * 0
    h = -(P * torch.log(P.clamp(min=1e-30))).sum(1)
    return coef * (m * h).sum() / tv


def importance(P, mask=None, coef=1e-2):
    m = valid_tokens(mask, P.shape[0])
    imp = (m[:, None] * P).sum(0)
    mean = imp.mean()
    if m.sum() == 0 or mean == 0:
        return P.sum() * 0
    var = ((imp - mean) ** 2).mean()
    return coef * var / (mean * mean)


def variance(S, mask=None, coef=1e-3, axis="tokens", reduction="mean"):
    T, E = S.shape
    m = valid_tokens(mask, T)
    tv = m.sum()
    if tv == 0:
        return S.sum() * 0
    if axis == "experts":
        if E < 2:
            return S.sum() * 0
        return -coef * (m * S.var(dim=1, unbiased=True)).sum() / tv
    sbar = (m[:, None] * S).sum(0) / tv
    total = (m[:, None] * (S - sbar) ** 2).sum() / E
    return -coef * (total / tv if reduction == "mean" else total)


def gather_token_major(acts_grouped, row_map):
    """[N, d] expert-grouped rows -> [T, k, d] (zeros where the map has no row)."""
    T, k = row_map.shape
    d = acts_grouped.shape[1]
    idx = row_map.clamp(min=0).long().reshape(-1)
    out = acts_grouped.index_select(0, idx).reshape(T, k, d)
    return out * (row_map >= 0).to(out.dtype)[:, :, None]


def specialization(H, topk, mask=None, coef=2e-3, eps=1e-8, pairs="sum"):
    T, k, d = H.shape
    w = slot_valid(topk, mask)
    tv = valid_tokens(mask, T).sum()
    if tv == 0:
        return H.sum() * 0
    n = H.norm(dim=2).clamp(min=eps)
    hn = H / n[:, :, None]
    C = hn @ hn.transpose(1, 2)
    W = w[:, :, None] * w[:, None, :] * (1 - torch.eye(k, dtype=torch.float64))
    per = (C * C * W).sum((1, 2))
    if pairs == "mean":
        nv = w.sum(1)
        den = nv * (nv - 1)
        per = torch.where(den > 0, per / den.clamp(min=1), per * 0)
    return coef * per.sum() / tv


def orthogonality(H, topk, mask=None, coef=1e-4, eps=1e-6, variant="pairwise", reduction="mean"):
    T, k, d = H.shape
    w = slot_valid(topk, mask)
    tv = valid_tokens(mask, T).sum()
    if tv == 0:
        return H.sum() * 0
    if variant == "pairwise":
        G = H @ H.transpose(1, 2)
        nsq = torch.diagonal(G, dim1=1, dim2=2)
        term = G * G * (nsq / (nsq + eps) ** 2)[:, None, :]  # [t, j, s]
        W = w[:, :, None] * w[:, None, :] * (1 - torch.eye(k, dtype=torch.float64))
        total = (term * W).sum()
    else:
        total = H.sum() * 0
        for t in range(T):
            slots = [s for s in range(k) if w[t, s] > 0]
            if len(slots) < 2:
                continue
            for j in slots:
                X = torch.stack([H[t, s] for s in slots if s != j], dim=1)
                G = X.T @ X + eps * torch.eye(X.shape[1], dtype=torch.float64)
                proj = X @ torch.linalg.solve(G, (X.T @ H[t, j])[:, None])[:, 0]
                total = total + (proj * proj).sum() / k
    return coef * (total / tv if reduction == "mean" else total)


def coupling(Ps, Is, mask=None, coef=1e-3, form="token", eps=1e-12):
    T, E = Ps[0].shape
    m = valid_tokens(mask, T)
    tv = m.sum()
    if tv == 0:
        return sum(p.sum() for p in Ps) * 0
    L = len(Ps)
    if form == "batch":
        total = Ps[0].sum() * 0
        for l in range(L - 1):
            J = (m[:, None] * Ps[l]).T @ Ps[l + 1] / tv
            kl = Is[l].shape[1]
            sel = torch.topk(J.detach(), kl, dim=1).indices
            total = total + J.gather(1, sel).sum()
        return -coef * total
    M = []
    for P, I in zip(Ps, Is):
        w = (I >= 0).to(torch.float64)
        M.append((P.gather(1, I.clamp(min=0).long()) * w).sum(1))
    total = Ps[0].sum() * 0
    for l in range(L - 1):
        if form == "token":
            total = total + (m * M[l] * M[l + 1]).sum()
        else:
            total = total + (m * torch.log(M[l] * M[l + 1] + eps)).sum()
    return -coef * total / tv


def bias_update(b, c, rate=1e-3, center=False):
    c = c.to(torch.float64)
    out = b.to(torch.float64) + rate * torch.sign(c.mean() - c)
    if center:
        out = out - out.mean()
    return out
