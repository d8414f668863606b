"""mt.megatron and mt.hf against the peers' documented formulas, written here in torch."""
import math

import pytest
import torch

import moereg_torch as mt
from conftest import rand_probs, rel_err


def megatron_aux(probs, tokens_per_expert, total_num_tokens, topk, num_experts, coeff, padding_mask=None):
    # Megatron-LM moe_utils docstring: E * sum_i f_i P_i, f_i = count_i / (T topk), P_i = sum probs / T;
    # padding_mask (True = valid) multiplies probs.
    if padding_mask is not None:
        probs = probs * padding_mask.unsqueeze(-1)
    return (probs.sum(0) * tokens_per_expert).sum() * (num_experts * coeff / (topk * total_num_tokens ** 2))


def megatron_z(logits, coeff, padding_mask=None):
    lse2 = torch.logsumexp(logits, -1) ** 2
    if padding_mask is None:
        return lse2.mean() * coeff
    valid = ~padding_mask
    return (lse2 * valid).sum() / valid.sum().clamp(min=1) * coeff


def hf_mixtral(gate_logits, num_experts, top_k, attention_mask=None):
    # transformers Mixtral docstring/semantics: pooled layers, softmax, top-k, one-hot counts per slot.
    x = torch.cat(gate_logits, 0)
    w = torch.softmax(x, -1)
    sel = torch.topk(w, top_k, -1).indices
    onehot = torch.nn.functional.one_hot(sel, num_experts).double()  # [N, k, E]
    if attention_mask is None:
        tpe = onehot.mean(0)
        rpe = w.mean(0)
    else:
        B, S = attention_mask.shape
        L = x.shape[0] // (B * S)
        am = attention_mask.reshape(1, B * S).expand(L, B * S).reshape(-1).double()
        tpe = (onehot * am[:, None, None]).sum(0) / am.sum()
        rpe = (w * am[:, None]).sum(0) / am.sum()
    return (tpe * rpe.unsqueeze(0)).sum() * num_experts


def _routing(T, E, k):
    P = rand_probs(T, E).requires_grad_()
    I = torch.topk(P.detach(), k, -1).indices
    tpe = torch.zeros(E, dtype=torch.float64).index_add(0, I.reshape(-1), torch.ones(T * k, dtype=torch.float64))
    return P, I, tpe


@pytest.mark.parametrize("masked", [False, True])
def test_megatron_switch(masked):
    T, E, k = 50, 8, 2
    P, I, tpe = _routing(T, E, k)
    mask = torch.rand(T) > 0.3 if masked else None
    N = T if mask is None else int(mask.sum())
    a = mt.megatron.switch_load_balancing_loss_func(P, tpe, N, k, E, 1e-2, mask)
    b = megatron_aux(P, tpe, N, k, E, 1e-2, mask)
    assert rel_err(a, b) < 1e-12
    ga, = torch.autograd.grad(a, P)
    gb, = torch.autograd.grad(b, P)
    assert rel_err(ga, gb) < 1e-12
    # a global count (say, the tensor-parallel group's) is taken as given
    a2 = mt.megatron.switch_load_balancing_loss_func(P, 3 * tpe, 3 * N, k, E, 1e-2, mask)
    assert rel_err(a2, megatron_aux(P, 3 * tpe, 3 * N, k, E, 1e-2, mask)) < 1e-12


def test_megatron_switch_fully_padded_is_zero():
    T, E, k = 10, 4, 2
    P, I, tpe = _routing(T, E, k)
    mask = torch.zeros(T, dtype=torch.bool)
    # Megatron: total_num_tokens = 0 -> 0/0 (NaN with a tensor count)
    assert math.isnan(megatron_aux(P, tpe * 0, torch.tensor(0.0), k, E, 1e-2, mask).item())
    v = mt.megatron.switch_load_balancing_loss_func(P, tpe * 0, 0, k, E, 1e-2, mask)
    assert v.item() == 0.0
    v.backward()
    assert torch.all(P.grad == 0)


@pytest.mark.parametrize("masked", [False, True])
def test_megatron_z(masked):
    Z = (torch.randn(4, 9, 6, dtype=torch.float64) * 2).requires_grad_()
    pad = torch.rand(4, 9) < 0.3 if masked else None
    a = mt.megatron.z_loss_func(Z, 1e-3, pad)
    b = megatron_z(Z.reshape(-1, 6), 1e-3, None if pad is None else pad.reshape(-1))
    assert rel_err(a, b) < 1e-12
    assert rel_err(torch.autograd.grad(a, Z)[0], torch.autograd.grad(b, Z)[0]) < 1e-12
    empty = torch.empty(0, 6, dtype=torch.float64)
    assert math.isnan(megatron_z(empty, 1e-3).item()) and mt.megatron.z_loss_func(empty, 1e-3).item() == 0.0


@pytest.mark.parametrize("masked", [False, True])
def test_hf_mixtral(masked):
    B, S, E, k, L = 3, 7, 8, 2, 4
    logits = tuple((torch.randn(B * S, E, dtype=torch.float64) * 2).requires_grad_() for _ in range(L))
    am = (torch.rand(B, S) > 0.3).long() if masked else None
    a = mt.hf.load_balancing_loss_func(logits, E, k, am)
    b = hf_mixtral(logits, E, k, am)
    assert rel_err(a, b) < 1e-12
    ga = torch.autograd.grad(a, logits)
    gb = torch.autograd.grad(b, logits)
    for x, y in zip(ga, gb):
        assert rel_err(x, y) < 1e-12


def test_hf_edge_cases():
    assert mt.hf.load_balancing_loss_func(None, 8, 2) == 0
    assert mt.hf.load_balancing_loss_func([torch.randn(4, 8)], 8, 2) == 0  # not a tuple: 0, as HF
    logits = (torch.randn(6, 4, dtype=torch.float64),)
    am = torch.zeros(2, 3, dtype=torch.long)
    assert math.isnan(hf_mixtral(logits, 4, 2, am).item())
    assert mt.hf.load_balancing_loss_func(logits, 4, 2, am).item() == 0.0
