"""gradcheck, 16-bit storage, strided inputs, zero-copy, expert-grouped layout, bad input."""
import pytest
import torch

import moereg_torch as mt
import reference as ref
from conftest import rand_mask, rand_probs, rand_topk, rel_err


# ---- torch.autograd.gradcheck on small float64 inputs --------------------------------------

def test_gradcheck_router_losses():
    P = rand_probs(6, 4).requires_grad_()
    I = rand_topk(6, 4, 2)
    m = rand_mask(6)
    m[0] = True
    for fn in [lambda x: mt.load_balancing(x, I, m, coef=1.0), lambda x: mt.z_loss(x, m, coef=1.0),
               lambda x: mt.entropy(x, m, coef=1.0), lambda x: mt.importance(x, m, coef=1.0),
               lambda x: mt.variance(x, m, coef=1.0), lambda x: mt.variance(x, m, coef=1.0, axis="experts")]:
        assert torch.autograd.gradcheck(fn, (P,), eps=1e-6, atol=1e-7)


def test_gradcheck_activation_losses():
    H = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    I = rand_topk(4, 5, 3, drop=0.1)
    for fn in [lambda x: mt.specialization(x, I, coef=1.0), lambda x: mt.specialization(x, I, coef=1.0, pairs="mean"),
               lambda x: mt.orthogonality(x, I, coef=1.0), lambda x: mt.orthogonality(x, I, coef=1.0, variant="subspace")]:
        assert torch.autograd.gradcheck(fn, (H,), eps=1e-6, atol=1e-7)


def test_gradcheck_coupling():
    Ps = [rand_probs(5, 4).requires_grad_() for _ in range(3)]
    Is = [rand_topk(5, 4, 2, drop=0.0) for _ in range(3)]
    for form in ["token", "log", "batch"]:
        assert torch.autograd.gradcheck(lambda *p: mt.coupling(list(p), Is, coef=1.0, form=form), tuple(Ps),
                                        eps=1e-6, atol=1e-7)


# ---- bfloat16 / float16 storage against float32 ----------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
def test_16bit_storage(dtype, tol):
    T, E, k, d = 64, 8, 4, 24
    P32 = rand_probs(T, E, torch.float32)
    H32 = torch.randn(T, k, d)
    I = rand_topk(T, E, k)
    m = rand_mask(T)
    cases = [
        # coef = T so that the gradients lie in float16's normal range (no subnormal rounding)
        (lambda x: mt.load_balancing(x, I, m, coef=T), P32), (lambda x: mt.z_loss(x, m, coef=T), P32 * 4),
        (lambda x: mt.entropy(x, m, coef=T), P32), (lambda x: mt.importance(x, m, coef=T), P32),
        (lambda x: mt.variance(x, m, coef=T), P32), (lambda x: mt.specialization(x, I, m, coef=T), H32),
        (lambda x: mt.orthogonality(x, I, m, coef=T), H32),
    ]
    for fn, x32 in cases:
        x16 = x32.to(dtype)
        # Same stored values in both: the 16-bit rounding of the input is not the error measured.
        xa = x16.to(torch.float32).requires_grad_()
        xb = x16.clone().requires_grad_()
        va, vb = fn(xa), fn(xb)
        assert vb.dtype == torch.float32
        va.backward()
        vb.backward()
        assert xb.grad.dtype == dtype
        assert rel_err(vb, va) < tol
        assert rel_err(xb.grad, xa.grad) < tol


# ---- strided inputs are read in place --------------------------------------------------------

def test_noncontiguous_inputs_agree():
    T, E, k, d = 30, 7, 3, 10
    big = rand_probs(E, 2 * T).T  # a transposed view [2T, E]: column stride 2T
    P = big[::2]  # and every other row
    assert not P.is_contiguous()
    I_full = rand_topk(T, E, k)
    I = torch.cat([I_full, torch.zeros(T, 2, dtype=torch.int64)], 1)[:, :k]  # row stride k + 2
    mfull = rand_mask(2 * T)
    m = mfull[::2]
    Pc = P.contiguous()
    for fn in [lambda x: mt.load_balancing(x, I, m), lambda x: mt.z_loss(x, m), lambda x: mt.entropy(x, m),
               lambda x: mt.importance(x, m), lambda x: mt.variance(x, m)]:
        a = P.clone().requires_grad_()  # clone keeps the strides? no: use as_strided below
        a = P.detach().requires_grad_()
        b = Pc.detach().clone().requires_grad_()
        va, vb = fn(a), fn(b)
        va.backward()
        vb.backward()
        assert va.item() == vb.item()
        assert torch.equal(a.grad, b.grad)
    Hbig = torch.randn(d, k, 2 * T, dtype=torch.float64)
    H = Hbig.permute(2, 1, 0)[::2]  # [T, k, d], element stride 2T*k
    Hc = H.contiguous()
    for fn in [lambda x: mt.specialization(x, I, m), lambda x: mt.orthogonality(x, I, m)]:
        a = H.detach().requires_grad_()
        b = Hc.detach().clone().requires_grad_()
        va, vb = fn(a), fn(b)
        va.backward()
        vb.backward()
        assert abs(va.item() - vb.item()) <= 1e-14 * abs(vb.item())
        assert rel_err(a.grad, b.grad) < 1e-13


def _allocations(fn):
    """Sizes (bytes) of every CPU allocation made through torch's allocator while fn runs."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # self_cpu_memory_usage: what the op itself allocated (cpu_memory_usage includes its children)
    return [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]


def test_zero_copy():
    """No allocation of the input's size on the contiguous and on the row-strided path.

    Method: torch.profiler with profile_memory=True records every allocation made through
    torch's CPU allocator (a copy by .contiguous() or at::empty inside the extension goes
    through it). Without a gradient no allocation of the input's size may appear; with a
    gradient exactly one (the gradient itself)."""
    T, E, k, d = 512, 64, 4, 64
    P = rand_probs(T, E, torch.float32)
    P_rows = rand_probs(T, E + 16, torch.float32)[:, :E]  # row stride E + 16
    H = torch.randn(T, k, d)
    H_rows = torch.randn(T, k, d + 8)[:, :, :d]  # row (slot) stride d + 8
    I = rand_topk(T, E, k)
    for x in [P, P_rows]:
        n = x.numel() * x.element_size()
        for fn in [lambda: mt.load_balancing(x, I), lambda: mt.z_loss(x), lambda: mt.entropy(x),
                   lambda: mt.importance(x), lambda: mt.variance(x)]:
            assert [a for a in _allocations(fn) if a >= n] == []
        xg = x.detach().requires_grad_()
        big = [a for a in _allocations(lambda: mt.z_loss(xg).backward()) if a >= n]
        assert len(big) == 1, big
    for h in [H, H_rows]:
        n = h.numel() * h.element_size()
        for fn in [lambda: mt.specialization(h, I), lambda: mt.orthogonality(h, I)]:
            assert [a for a in _allocations(fn) if a >= n] == []
        hg = h.detach().requires_grad_()
        big = [a for a in _allocations(lambda: mt.specialization(hg, I).backward()) if a >= n]
        assert len(big) == 1, big


# ---- the expert-grouped layout against token-major -------------------------------------------

def grouped(H, I):
    """Expert-grouped rows of token-major H [T, k, d] (rows sorted by expert) and the row map."""
    T, k, d = H.shape
    slots = [(int(I[t, s]), t, s) for t in range(T) for s in range(k) if I[t, s] >= 0]
    slots.sort()
    rows = torch.zeros(len(slots) + 3, d, dtype=H.dtype)  # 3 rows no slot maps to
    row_map = torch.full((T, k), -1, dtype=torch.int32)
    for r, (_, t, s) in enumerate(slots):
        rows[r] = H[t, s]
        row_map[t, s] = r
    return rows, row_map


@pytest.mark.parametrize("op", ["specialization", "orthogonality"])
def test_expert_grouped_equals_token_major(op):
    T, E, k, d = 37, 9, 4, 13
    H = torch.randn(T, k, d, dtype=torch.float64)
    I = rand_topk(T, E, k)
    m = rand_mask(T)
    rows, row_map = grouped(H, I)
    fn = getattr(mt, op)
    a = H.clone().requires_grad_()
    b = rows.clone().requires_grad_()
    va = fn(a, I, m)
    vb = fn(b, I, m, row_map=row_map)
    va.backward()
    vb.backward()
    assert abs(va.item() - vb.item()) <= 1e-13 * abs(va.item())
    assert rel_err(ref.gather_token_major(b.grad, row_map.long()) * (I >= 0)[:, :, None],
                   a.grad * (I >= 0)[:, :, None]) < 1e-13
    assert torch.all(b.grad[-3:] == 0)
    # strided rows (a column slice of a wider buffer) are read in place too
    wide = torch.zeros(rows.shape[0], d + 5, dtype=torch.float64)
    wide[:, 2:2 + d] = rows
    assert abs(fn(wide[:, 2:2 + d], I, m, row_map=row_map).item() - va.item()) <= 1e-13 * abs(va.item())


# ---- bad input: ValueError / TypeError with moereg's message, nothing written ----------------

def test_bad_input_messages():
    P = rand_probs(8, 4)
    I = rand_topk(8, 4, 2)
    with pytest.raises(ValueError, match="load_balancing: topk has 7 rows"):
        mt.load_balancing(P, I[:7])
    bad = I.clone()
    bad[3] = torch.tensor([1, 1])
    with pytest.raises(ValueError, match="selects expert 1 twice"):
        mt.load_balancing(P, bad)
    with pytest.raises(ValueError, match="out of range"):
        mt.load_balancing(P, I.clamp(max=3) + 1)
    with pytest.raises(TypeError, match="topk has dtype"):
        mt.load_balancing(P, I.float())
    with pytest.raises(TypeError, match="probs has dtype"):
        mt.load_balancing(P.to(torch.int64), I)
    with pytest.raises(ValueError, match="scope"):
        mt.load_balancing(P, I, scope="batch")
    with pytest.raises(ValueError, match="seq_len"):
        mt.load_balancing(P, I, scope="sequence", seq_len=3)
    with pytest.raises(ValueError, match="cu_seqlens"):
        mt.load_balancing(P, I, scope="sequence", cu_seqlens=torch.tensor([0, 5, 4, 8]))
    with pytest.raises(ValueError, match="mask has 7 entries"):
        mt.z_loss(P, torch.ones(7, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask has dtype"):
        mt.entropy(P, torch.ones(8))
    with pytest.raises(ValueError, match="2-D"):
        mt.importance(P[0])
    with pytest.raises(ValueError, match="axis"):
        mt.variance(P, axis="rows")
    H = torch.randn(8, 2, 5)
    with pytest.raises(ValueError, match="specialization"):
        mt.specialization(H, I[:, :1])
    with pytest.raises(ValueError, match="eps"):
        mt.specialization(H, I, eps=0.0)
    with pytest.raises(ValueError, match="orthogonality"):
        mt.orthogonality(H, rand_topk(8, 4, 3))
    with pytest.raises(ValueError, match="3-D"):
        mt.orthogonality(H[0], I)
    with pytest.raises(ValueError, match="row map"):
        mt.specialization(H[:, 0], I, row_map=torch.full((8, 2), 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="coupling"):
        mt.coupling([P], [I])
    with pytest.raises(TypeError, match="same dtype"):
        mt.coupling([P, P.float()], [I, I])
    with pytest.raises(ValueError, match="form"):
        mt.coupling([P, P], [I, I], form="pair")
    b = torch.zeros(4)
    with pytest.raises(ValueError, match="counts has 3 entries"):
        mt.bias_update(b, torch.ones(3))
    assert torch.all(b == 0)
    with pytest.raises(TypeError, match="bias has dtype"):
        mt.bias_update(torch.zeros(4, dtype=torch.int32), torch.ones(4))


def test_nothing_written_on_error():
    P = rand_probs(8, 4).requires_grad_()
    I = rand_topk(8, 4, 2)
    with pytest.raises(ValueError):
        mt.load_balancing(P, I[:7]).backward()
    assert P.grad is None


def test_cuda_tensor_error_names_the_build_option():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    with pytest.raises(NotImplementedError, match="MOEREG_TORCH_CUDA"):
        mt.z_loss(torch.randn(4, 3, device="cuda"))


def test_non_cpu_tensor_error_names_the_build_option():
    # A meta tensor takes the same path as a CUDA tensor in this CPU-only build.
    with pytest.raises(NotImplementedError, match="MOEREG_TORCH_CUDA=1"):
        mt.z_loss(torch.empty(4, 3, device="meta"))
    with pytest.raises(NotImplementedError, match="CPU-only"):
        mt.specialization(torch.empty(4, 2, 3, device="meta"), torch.zeros(4, 2, dtype=torch.long))
