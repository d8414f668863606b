"""Every op against the float64 formulas of reference.py (torch autograd, not moereg).

The worst relative error per op is recorded in WORST and printed at the end of the session
(python/README.md quotes it)."""
import pytest
import torch

import moereg_torch as mt
import reference as ref
from conftest import rand_mask, rand_probs, rand_topk, rel_err

TOL = 1e-10
WORST = {}


def check(op, mt_fn, ref_fn, *inputs):
    """Values and gradients w.r.t. every floating input (requires_grad set by the caller)."""
    xs = [x for x in inputs if x.requires_grad]
    v = mt_fn()
    r = ref_fn()
    assert v.dim() == 0 and v.dtype == torch.float64
    err = rel_err(v, r) if abs(r.item()) > 1e-300 else abs(v.item() - r.item())
    if xs:
        g = torch.autograd.grad(v, xs, allow_unused=True)
        gr = torch.autograd.grad(r, xs, allow_unused=True) if r.requires_grad else [None] * len(xs)
        for a, b in zip(g, gr):
            b = torch.zeros_like(a) if b is None else b
            assert a.dtype == torch.float64 and a.shape == b.shape
            err = max(err, rel_err(a, b))
    WORST[op] = max(WORST.get(op, 0.0), err)
    assert err < TOL, f"{op}: relative error {err:.3e}"


SIZES = [(0, 5), (1, 5), (7, 4), (33, 9), (300, 16)]


@pytest.mark.parametrize("T,E", SIZES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kcfg", [None, 4])
def test_load_balancing_micro(T, E, masked, kcfg):
    P = rand_probs(T, E).requires_grad_()
    I = rand_topk(T, E, 3)
    m = rand_mask(T) if masked else None
    check("load_balancing", lambda: mt.load_balancing(P, I, m, coef=0.37, k=kcfg),
          lambda: ref.load_balancing(P, I, m, 0.37, kcfg), P)


@pytest.mark.parametrize("T,S", [(0, 4), (12, 4), (35, 7), (8, 1)])
def test_load_balancing_sequence_fixed(T, S):
    P = rand_probs(T, 6).requires_grad_()
    I = rand_topk(T, 6, 2)
    m = rand_mask(T, p=0.5)
    if T >= S:
        m[:S] = False  # one sequence without valid tokens
    check("load_balancing", lambda: mt.load_balancing(P, I, m, scope="sequence", seq_len=S),
          lambda: ref.load_balancing(P, I, m, scope="sequence", seq_len=S), P)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_load_balancing_sequence_packed(dtype):
    cu = torch.tensor([0, 3, 3, 10, 17, 30], dtype=dtype)
    P = rand_probs(30, 5).requires_grad_()
    I = rand_topk(30, 5, 2)
    m = rand_mask(30)
    check("load_balancing", lambda: mt.load_balancing(P, I, m, scope="sequence", cu_seqlens=cu),
          lambda: ref.load_balancing(P, I, m, scope="sequence", cu_seqlens=cu), P)


def test_load_balancing_global_without_group_is_micro():
    P = rand_probs(40, 8).requires_grad_()
    I = rand_topk(40, 8, 2)
    check("load_balancing", lambda: mt.load_balancing(P, I, scope="global"), lambda: ref.load_balancing(P, I), P)


@pytest.mark.parametrize("T,E", SIZES)
@pytest.mark.parametrize("masked", [False, True])
def test_router_losses(T, E, masked):
    m = rand_mask(T, dtype=torch.uint8) if masked else None
    Z = (torch.randn(T, E, dtype=torch.float64) * 3).requires_grad_()
    check("z_loss", lambda: mt.z_loss(Z, m, coef=0.1), lambda: ref.z_loss(Z, m, 0.1), Z)
    P = rand_probs(T, E).requires_grad_()
    check("entropy", lambda: mt.entropy(P, m, coef=0.2), lambda: ref.entropy(P, m, 0.2), P)
    check("importance", lambda: mt.importance(P, m, coef=0.3), lambda: ref.importance(P, m, 0.3), P)
    for axis in ["tokens", "experts"]:
        for red in ["mean", "sum"]:
            if axis == "experts" and red == "sum":
                continue
            check("variance", lambda: mt.variance(P, m, coef=0.4, axis=axis, reduction=red),
                  lambda: ref.variance(P, m, 0.4, axis, red), P)


def test_z_loss_large_logits_finite():
    Z = torch.tensor([[1e4, -1e4, 0.0], [5e3, 5e3, -1e4]], dtype=torch.float32, requires_grad=True)
    v = mt.z_loss(Z)
    v.backward()
    assert torch.isfinite(v) and torch.isfinite(Z.grad).all()


@pytest.mark.parametrize("T,k,d", [(0, 2, 3), (1, 2, 5), (9, 3, 7), (40, 4, 33), (17, 8, 16), (5, 5, 1)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("pairs", ["sum", "mean"])
def test_specialization(T, k, d, masked, pairs):
    E = k + 3
    H = torch.randn(T, k, d, dtype=torch.float64)
    if T > 1:
        H[1, 0] *= 1e-10  # a vector shorter than eps
    H.requires_grad_()
    I = rand_topk(T, E, k)
    m = rand_mask(T, dtype=torch.int32) if masked else None
    check("specialization", lambda: mt.specialization(H, I, m, coef=0.5, pairs=pairs),
          lambda: ref.specialization(H, I, m, 0.5, 1e-8, pairs), H)


@pytest.mark.parametrize("T,k,d", [(0, 2, 3), (1, 2, 5), (9, 3, 7), (25, 4, 33), (6, 8, 16)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("variant,reduction", [("pairwise", "mean"), ("pairwise", "sum"), ("subspace", "mean")])
def test_orthogonality(T, k, d, masked, variant, reduction):
    E = k + 2
    H = torch.randn(T, k, d, dtype=torch.float64).requires_grad_()
    I = rand_topk(T, E, k)
    m = rand_mask(T, dtype=torch.int64) if masked else None
    check("orthogonality", lambda: mt.orthogonality(H, I, m, coef=0.5, eps=1e-3, variant=variant, reduction=reduction),
          lambda: ref.orthogonality(H, I, m, 0.5, 1e-3, variant, reduction), H)


@pytest.mark.parametrize("T,E", [(0, 4), (1, 4), (23, 6), (70, 9)])
@pytest.mark.parametrize("form", ["token", "log", "batch"])
@pytest.mark.parametrize("L", [2, 3])
def test_coupling(T, E, form, L):
    Ps = [rand_probs(T, E).requires_grad_() for _ in range(L)]
    Is = [rand_topk(T, E, 1 + (l % 2), drop=0.1) for l in range(L)]
    m = rand_mask(T)
    check("coupling", lambda: mt.coupling(Ps, Is, m, coef=0.7, form=form),
          lambda: ref.coupling(Ps, Is, m, 0.7, form), *Ps)


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("cdtype", [torch.int64, torch.float32])
def test_bias_update(center, cdtype):
    b = torch.randn(11, dtype=torch.float64)
    c = torch.randint(0, 20, (11,)).to(cdtype)
    want = ref.bias_update(b, c, 0.01, center)
    out = mt.bias_update(b, c, rate=0.01, center=center)
    assert out is b
    assert rel_err(b, want) < 1e-14


def test_upstream_gradient_is_applied():
    P = rand_probs(20, 5).requires_grad_()
    I = rand_topk(20, 5, 2)
    (3.5 * mt.load_balancing(P, I)).backward()
    P2 = P.detach().clone().requires_grad_()
    (3.5 * ref.load_balancing(P2, I)).backward()
    assert rel_err(P.grad, P2.grad) < 1e-12


def test_no_grad_and_detached_inputs():
    P = rand_probs(20, 5)
    I = rand_topk(20, 5, 2)
    v = mt.load_balancing(P, I)
    assert not v.requires_grad and v.dim() == 0
    P.requires_grad_()
    with torch.no_grad():
        assert not mt.load_balancing(P, I).requires_grad


def test_defaults_match_the_library():
    import inspect
    lib = mt.defaults()
    ops = {"load_balancing": mt.load_balancing, "z_loss": mt.z_loss, "entropy": mt.entropy,
           "importance": mt.importance, "variance": mt.variance, "specialization": mt.specialization,
           "orthogonality": mt.orthogonality, "coupling": mt.coupling, "bias_update": mt.bias_update}
    for name, fn in ops.items():
        params = inspect.signature(fn).parameters
        for opt, value in lib[name].items():
            assert params[opt].kind == inspect.Parameter.KEYWORD_ONLY, (name, opt)
            assert params[opt].default == value, (name, opt, params[opt].default, value)

