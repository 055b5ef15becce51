"""The CPU dropout sampler (16-bit lanes, four per 64-bit draw): the rate, the scale and the draws.

Tolerances are binomial: with n elements and drop probability q, the dropped fraction has standard deviation
sqrt(q (1 - q) / n); 6 of them fail a correct sampler about once in 10^9 runs.
"""
from __future__ import annotations

import math

import pytest
import torch

from mtlbench.layers import Dropout, dropout

N = 1 << 20


def _dropped(p: float, lane: int | None = None, seed: int = 0) -> tuple[float, float, torch.Tensor]:
    torch.manual_seed(seed)
    out = dropout(torch.ones(N), p, True)
    q = round(p * 65536) / 65536
    values = out if lane is None else out[lane::4]
    return float((values == 0).float().mean()), q, out


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5, 0.9])
def test_the_rate_is_p_rounded_to_a_multiple_of_2_to_the_minus_16(p):
    frac, q, _ = _dropped(p)
    assert abs(q - p) <= 2 ** -17
    assert abs(frac - q) < 6 * math.sqrt(q * (1 - q) / N)


@pytest.mark.parametrize("lane", range(4))
def test_each_of_the_four_lanes_of_a_draw_drops_at_the_rate(lane):
    """A lane that reused a draw's always-zero sign bit (random_() on int64 draws [0, 2^63)) would drop all or
    nothing at p = 0.5."""
    frac, q, _ = _dropped(0.5, lane)
    n = N // 4
    assert abs(frac - q) < 6 * math.sqrt(q * (1 - q) / n)


def test_kept_elements_are_scaled_so_the_expectation_holds():
    frac, q, out = _dropped(0.2)
    kept = out[out != 0]
    assert torch.all(kept == 1.0 / (1.0 - q))  # 65536 / 52429, one float32 value
    assert abs(float(out.double().mean()) - 1.0) < 6 * math.sqrt(q / (1 - q) / N)


def test_same_seed_same_mask_and_masks_differ_between_calls():
    _, _, a = _dropped(0.3, seed=5)
    _, _, b = _dropped(0.3, seed=5)
    assert torch.equal(a, b)
    torch.manual_seed(5)
    first, second = dropout(torch.ones(N), 0.3, True), dropout(torch.ones(N), 0.3, True)
    assert not torch.equal(first, second)


def test_edges_and_shapes():
    x = torch.randn(3, 5, 7)
    assert dropout(x, 0.2, False) is x and dropout(x, 0.0, True) is x
    assert torch.equal(dropout(x, 1.0, True), torch.zeros_like(x))
    out = dropout(x, 0.5, True)  # an element count that is not a multiple of 4
    assert out.shape == x.shape and torch.all((out == 0) | (out == x * 2.0))
    module = Dropout(0.5)
    module.eval()
    assert torch.equal(module(x), x)
    module.train()
    torch.manual_seed(1)
    a = module(x)
    torch.manual_seed(1)
    assert torch.equal(a, dropout(x, 0.5, True))  # one sampler for the banks and the MLPs


def test_gradient_flows_through_kept_elements_only():
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(2)
    out = dropout(x, 0.25, True)
    out.sum().backward()
    q = round(0.25 * 65536) / 65536
    expected = torch.where(out != 0, torch.full_like(x, 1.0 / (1.0 - q)), torch.zeros_like(x))
    assert torch.equal(x.grad, expected)
