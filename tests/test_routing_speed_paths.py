"""The routed layer's cheap finiteness check (one sum, the elementwise test only when the sum is not finite)."""

from __future__ import annotations

import pytest
import torch

from modlora.errors import RoutingError
from modlora.reuse.routing.layer import RoutedLoraLinear, RoutingState, TopKRouting, all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_all_finite_equals_elementwise_test(dtype: torch.dtype) -> None:
    big = torch.finfo(dtype).max
    cases = [torch.randn(7, 5), torch.zeros(0, 3), torch.tensor([big, big, -big, big]),    # the sum overflows
             torch.tensor([1.0, float("inf"), 2.0]), torch.tensor([float("-inf"), float("inf")]),
             torch.tensor([1.0, float("nan")]), torch.tensor([big, float("nan"), -big])]
    for case in cases:
        x = case.to(dtype)
        assert all_finite(x) == bool(torch.isfinite(x).all()), x


def test_layer_still_names_a_non_finite_output() -> None:
    """A finite output passes; an Inf router weight is still caught and explained (naming the cause)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 4, bias=False)
    A, B = [torch.randn(2, 6) for _ in range(3)], [torch.randn(4, 2) for _ in range(3)]
    weights = torch.full((5, 2), 0.5)
    routing = TopKRouting(torch.tensor([[0, 1]] * 5), weights)
    layer = RoutedLoraLinear(base, "layer", [0, 1, 2], A, B, [1.0] * 3, lambda x, name: routing, RoutingState())
    x = torch.randn(1, 5, 6)
    with torch.inference_mode():
        assert torch.isfinite(layer(x)).all()
        weights[2, 1] = float("inf")
        with pytest.raises(RoutingError, match="NaN/Inf weights"):
            layer(x)
