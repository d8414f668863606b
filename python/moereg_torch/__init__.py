"""moereg's Mixture-of-Experts regularization losses as differentiable PyTorch ops.

Every loss returns a 0-dim tensor (float64 for float64 inputs, float32 otherwise) whose
backward() multiplies moereg's analytic gradient by the upstream gradient. Options are
keyword-only, with the names and defaults of LOSSES.md and moereg-eval. See python/README.md.

    import moereg_torch as mt
    loss = mt.load_balancing(probs, topk, mask) + mt.z_loss(logits, mask)
"""
import torch

from . import _C

__all__ = [
    "load_balancing", "load_balancing_stats", "z_loss", "entropy", "importance", "variance",
    "specialization", "orthogonality", "coupling", "bias_update", "StatsAccumulator",
    "megatron", "hf", "defaults", "__version__",
]

__version__ = "0.1.0"

_SCOPE = {"micro": 0, "sequence": 1, "global": 2}
_AXIS = {"tokens": 0, "experts": 1}
_REDUCTION = {"mean": 0, "sum": 1}
_PAIRS = {"sum": 0, "mean": 1}
_VARIANT = {"pairwise": 0, "subspace": 1}
_FORM = {"token": 0, "log": 1, "batch": 2}


def defaults():
    """The C++ configs' defaults, {op: {option: value}} (read from the compiled library)."""
    return _C.defaults()


def _choice(table, value, op, name):
    try:
        return table[value]
    except (KeyError, TypeError):
        raise ValueError(f"moereg_torch.{op}: {name} = {value!r}; choose one of {', '.join(map(repr, table))}") from None


class _Loss(torch.autograd.Function):
    """One differentiable input x; fn(x, *rest) -> (value, grad) runs moereg's value_and_grad."""

    @staticmethod
    def forward(ctx, x, fn, rest):
        value, grad = fn(x, *rest, True)
        # Saved as a saved tensor (not a ctx attribute): autograd frees it after backward unless
        # retain_graph is set, so the returned gradient is then its only reference and
        # AccumulateGrad takes it without a copy.
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    def backward(ctx, go):
        g, = ctx.saved_tensors
        if go.item() != 1.0:
            g = g * go.to(g.dtype)
        return g, None, None


def _call(x, fn, rest):
    if torch.is_grad_enabled() and x.requires_grad:
        return _Loss.apply(x, fn, rest)
    return fn(x, *rest, False)[0]


def _lb_stats(probs, topk, mask, cu_seqlens, k, scope, seq_len):
    return _C.load_balancing_stats(probs, topk, mask, cu_seqlens, 0 if k is None else int(k), scope,
                                   0 if seq_len is None else int(seq_len))


def load_balancing(probs, topk, mask=None, *, coef=1e-2, k=None, scope="micro", seq_len=None, cu_seqlens=None,
                   process_group=None, stats=None):
    """Switch/GShard load-balancing loss alpha * E * sum_e f_e * pbar_e (LOSSES.md section 1).

    probs [T, E]; topk [T, k] int32/int64 (negative = dropped); mask [T] (nonzero = valid).
    scope: "micro", "sequence" (seq_len or cu_seqlens [B + 1]) or "global".
    process_group: the scope's statistics (micro, global: [T_v, count_0..count_{E-1}];
    sequence: [B]) are all-reduced over it with torch.distributed before the finish step.
    stats: reduced statistics given by the caller (for example a StatsAccumulator's sums).
    """
    sc = _choice(_SCOPE, scope, "load_balancing", "scope")
    kk = 0 if k is None else int(k)
    sl = 0 if seq_len is None else int(seq_len)
    if process_group is not None:
        if stats is not None:
            raise ValueError("moereg_torch.load_balancing: give process_group or stats, not both")
        import torch.distributed as dist
        stats = _lb_stats(probs, topk, mask, cu_seqlens, kk, sc, sl)
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=process_group)
    return _call(probs, _C.load_balancing, (topk, mask, cu_seqlens, float(coef), kk, sc, sl, stats))


def load_balancing_stats(probs, topk, mask=None, *, k=None, scope="micro", seq_len=None, cu_seqlens=None):
    """This call's sum-reducible statistics of load_balancing (a float64 tensor): [T_v, counts] or [B]."""
    sc = _choice(_SCOPE, scope, "load_balancing", "scope")
    return _lb_stats(probs, topk, mask, cu_seqlens, k, sc, seq_len)


def z_loss(logits, mask=None, *, coef=1e-3):
    """Router z-loss beta * mean_t lse_t^2 over valid tokens (LOSSES.md section 2); logits [T, E]."""
    return _call(logits, _C.z_loss, (mask, float(coef), None))


def entropy(probs, mask=None, *, coef=1e-3):
    """Router entropy eta * mean_t H(P_t) over valid tokens (LOSSES.md section 7); probs [T, E]."""
    return _call(probs, _C.entropy, (mask, float(coef), None))


def importance(probs, mask=None, *, coef=1e-2):
    """Importance loss w * CV(sum_t m_t P[t, :])^2 (LOSSES.md section 7); probs [T, E]."""
    return _call(probs, _C.importance, (mask, float(coef), None))


def variance(scores, mask=None, *, coef=1e-3, axis="tokens", reduction="mean"):
    """Variance loss (LOSSES.md section 6); scores [T, E]; axis "tokens" or "experts"."""
    a = _choice(_AXIS, axis, "variance", "axis")
    r = _choice(_REDUCTION, reduction, "variance", "reduction")
    return _call(scores, _C.variance, (mask, float(coef), a, r, None))


def specialization(acts, topk, mask=None, *, coef=2e-3, eps=1e-8, pairs="sum", row_map=None):
    """Intra-layer specialization loss (LOSSES.md section 3).

    acts [T, k, d] token-major, or with row_map [T, k] (int32/int64, -1 = none) the [N, d]
    rows of the expert-grouped layout; topk [T, k] (negative = dropped slot).
    """
    p = _choice(_PAIRS, pairs, "specialization", "pairs")
    return _call(acts, _C.specialization, (topk, mask, row_map, float(coef), float(eps), p, None))


def orthogonality(outs, topk, mask=None, *, coef=1e-4, eps=1e-6, variant="pairwise", reduction="mean",
                  row_map=None):
    """Orthogonality loss (LOSSES.md section 5); layouts as specialization."""
    v = _choice(_VARIANT, variant, "orthogonality", "variant")
    r = _choice(_REDUCTION, reduction, "orthogonality", "reduction")
    return _call(outs, _C.orthogonality, (topk, mask, row_map, float(coef), float(eps), v, r, None))


class _Coupling(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rest, *probs):
        value, grads = _C.coupling(list(probs), *rest, True)
        ctx.save_for_backward(*grads)
        return value

    @staticmethod
    def backward(ctx, go):
        grads = ctx.saved_tensors
        if go.item() != 1.0:
            grads = [g * go.to(g.dtype) for g in grads]
        return (None, *grads)


def coupling(probs_list, topk_list, mask=None, *, coef=1e-3, form="token", eps=1e-12):
    """Cross-layer coupling loss over L >= 2 layers (LOSSES.md section 4).

    probs_list: L tensors [T, E]; topk_list: L tensors [T, k_l]; form "token", "log" or "batch".
    """
    f = _choice(_FORM, form, "coupling", "form")
    probs = list(probs_list)
    rest = (list(topk_list), mask, float(coef), f, float(eps), None)
    if torch.is_grad_enabled() and any(p.requires_grad for p in probs):
        return _Coupling.apply(rest, *probs)
    return _C.coupling(probs, *rest, False)[0]


def bias_update(bias, counts, *, rate=1e-3, center=False):
    """Auxiliary-loss-free balancing (DeepSeek-V3, LOSSES.md section 7), in place, no gradient:
    b_e += rate * sign(mean(c) - c_e); center subtracts mean(b) afterwards. Returns bias."""
    with torch.no_grad():
        _C.bias_update(bias, counts, float(rate), bool(center))
    return bias


class StatsAccumulator:
    """Sums statistics over the micro-batches of one global batch (gradient accumulation).

    acc = StatsAccumulator(steps=N)
    for each micro-batch: acc.add(mt.load_balancing_stats(P, I, m, scope="global"))
    acc.all_reduce(group)                # optional: sum over ranks as well
    mt.load_balancing(P, I, m, scope="global", stats=acc.sums)

    With steps > 0 the add() after the steps-th starts the next global batch; reset() starts
    one explicitly. The finished sums stay available as `previous` (the "previous step"
    schedule of docs/distributed.md).
    """

    def __init__(self, steps=0):
        if steps < 0:
            raise ValueError(f"moereg_torch.StatsAccumulator: steps = {steps} is negative")
        self.steps = int(steps)
        self.count = 0
        self.sums = None
        self.previous = None

    def add(self, stats):
        if self.steps > 0 and self.count >= self.steps:
            self.reset()
        s = stats.detach().to(torch.float64)
        if s.dim() != 1:
            raise ValueError("moereg_torch.StatsAccumulator.add: statistics must be a 1-D tensor")
        if self.count == 0 or self.sums is None:
            self.sums = torch.zeros_like(s)
        if s.shape != self.sums.shape:
            raise ValueError(f"moereg_torch.StatsAccumulator.add: {s.numel()} statistics but this global batch has "
                             f"{self.sums.numel()}")
        self.sums += s
        self.count += 1
        return self

    def reset(self):
        if self.count > 0:
            self.previous = self.sums.clone()
        if self.sums is not None:
            self.sums.zero_()
        self.count = 0

    def all_reduce(self, group=None):
        import torch.distributed as dist
        dist.all_reduce(self.sums, op=dist.ReduceOp.SUM, group=group)
        return self


from . import hf, megatron  # noqa: E402  (the drop-ins use the ops above)
