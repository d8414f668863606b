"""A tiny MoE trained with moereg's losses from moereg_torch (CPU, under a minute on 2 cores).

    router   P = softmax(x W_r) [T, E], top-k, a capacity per expert (slots over it: -1),
             padding tokens at the end of the batch (mask)
    experts  SwiGLU: h = SiLU(x W_gate[e]) * (x W_up[e]) [d_ff], y = h W_down[e]
    output   sum_s P[t, e_s] y_{t,s}, regressed onto a fixed random teacher (masked MSE)
    loss     task + load_balancing + z_loss + specialization + orthogonality
             + coupling between the two MoE layers' routings

The expert activations are gathered token-major [T, k, d_ff] for the specialization loss and
the expert outputs [T, k, d_model] for the orthogonality loss; their gradients flow back into
the expert weights through torch autograd, the router's through the softmax.

    python3 train_tiny_moe.py [--steps N] [--quiet]
"""
import argparse
import math
import time

import torch

import moereg_torch as mt

D, DFF, E, K, T, PAD = 16, 24, 8, 2, 128, 16


class MoELayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.router = torch.nn.Linear(D, E, bias=False)
        s = 1 / math.sqrt(D)
        self.w_gate = torch.nn.Parameter(torch.randn(E, D, DFF) * s)
        self.w_up = torch.nn.Parameter(torch.randn(E, D, DFF) * s)
        self.w_down = torch.nn.Parameter(torch.randn(E, DFF, D) / math.sqrt(DFF))

    def forward(self, x, mask):
        logits = self.router(x)
        P = torch.softmax(logits, -1)
        topk = P.detach().topk(K, -1).indices
        cap = math.ceil(1.0 * T * K / E)
        # capacity in token order (slot order within a token); padding takes none
        onehot = torch.nn.functional.one_hot(topk, E) * mask[:, None, None]
        flat = onehot.reshape(T * K, E)
        position = (flat.cumsum(0) * flat).sum(1).reshape(T, K)
        topk[position > cap] = -1
        idx = topk.clamp(min=0)
        valid = (topk >= 0) & mask[:, None]
        xg = x[:, None, :].expand(T, K, D)
        h = torch.nn.functional.silu(torch.einsum("tkd,tkdf->tkf", xg, self.w_gate[idx])) * \
            torch.einsum("tkd,tkdf->tkf", xg, self.w_up[idx])  # [T, K, DFF]
        y = torch.einsum("tkf,tkfd->tkd", h, self.w_down[idx])  # [T, K, D]
        gate = P.gather(1, idx) * valid
        out = (gate[:, :, None] * y).sum(1)
        return out, dict(logits=logits, P=P, topk=topk, h=h, y=y)


class TinyMoE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = MoELayer(), MoELayer()

    def forward(self, x, mask):
        a, r1 = self.l1(x, mask)
        b, r2 = self.l2(x + a, mask)
        return x + a + b, (r1, r2)


def train(steps=300, quiet=False, seed=0):
    torch.manual_seed(seed)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = TinyMoE()
    teacher = torch.randn(D, D) / math.sqrt(D)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    mask = torch.ones(T, dtype=torch.bool)
    mask[T - PAD:] = False
    m = mask.double()
    history = []
    t0 = time.time()
    for step in range(steps):
        x = torch.randn(T, D)
        target = torch.tanh(x @ teacher) * 2
        out, (r1, r2) = model(x, mask)
        task = (((out - target) ** 2).sum(1) * m.float()).sum() / m.sum().float()
        aux = 0
        for r in (r1, r2):
            aux = aux + mt.load_balancing(r["P"], r["topk"], mask) + mt.z_loss(r["logits"], mask)
            aux = aux + mt.specialization(r["h"], r["topk"], mask) + mt.orthogonality(r["y"], r["topk"], mask)
        aux = aux + mt.coupling([r1["P"], r2["P"]], [r1["topk"], r2["topk"]], mask)
        total = task + aux
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append((task.item(), float(aux)))
        if not math.isfinite(total.item()):
            raise RuntimeError(f"non-finite loss at step {step}")
        if not quiet and (step % 50 == 0 or step == steps - 1):
            print(f"step {step:4d}  task {task.item():.4f}  aux {float(aux):+.5f}  "
                  f"dropped {int((r1['topk'] < 0).sum())}")
    if not quiet:
        print(f"{steps} steps in {time.time() - t0:.1f} s; task {history[0][0]:.3f} -> {history[-1][0]:.3f}")
    return history


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    train(a.steps, a.quiet)
