"""The quick form of examples/pytorch/train_tiny_moe.py: it trains and the task loss falls."""
import importlib.util
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, os.pardir, os.pardir, "examples", "pytorch", "train_tiny_moe.py")


@pytest.mark.skipif(not os.path.isfile(EXAMPLE), reason="examples/pytorch is not next to python/")
def test_tiny_moe_trains():
    spec = importlib.util.spec_from_file_location("train_tiny_moe", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    hist = mod.train(steps=40, quiet=True)
    first = sum(h[0] for h in hist[:5]) / 5
    last = sum(h[0] for h in hist[-5:]) / 5
    assert last < 0.8 * first
