import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def rand_probs(T, E, dtype=torch.float64):
    return torch.softmax(torch.randn(T, E, dtype=torch.float64) * 2, dim=1).to(dtype)


def rand_topk(T, E, k, drop=0.2, dtype=torch.int64):
    """Distinct experts per row, about `drop` of the slots dropped (-1)."""
    if T == 0:
        return torch.empty(0, k, dtype=dtype)
    I = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    I[torch.rand(T, k) < drop] = -1
    return I.to(dtype)


def rand_mask(T, p=0.25, dtype=torch.bool):
    m = torch.rand(T) >= p
    return m.to(dtype)


def rel_err(a, b):
    a = a.detach().to(torch.float64)
    b = b.detach().to(torch.float64)
    scale = b.abs().max().item() if b.numel() else 0.0
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    return diff / scale if scale > 0 else diff


def pytest_terminal_summary(terminalreporter):
    """The worst float64 relative error per op against reference.py (value and gradient)."""
    mod = sys.modules.get("test_agreement")
    worst = getattr(mod, "WORST", None)
    if worst:
        terminalreporter.write_line("moereg_torch vs float64 reference, max relative error (value, gradient): " +
                                    ", ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items())))
