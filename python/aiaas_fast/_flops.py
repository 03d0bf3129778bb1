"""FLOP counts of the fused linear_relu ops for torch.utils.flop_counter.FlopCounterMode,
registered for the native ops in ops.py and for the Triton ops in triton/linear_relu.py."""
from __future__ import annotations

import math


def linear_relu_flops(x_shape, w_shape, *args, **kwargs) -> int:
    """For torch.utils.flop_counter.FlopCounterMode: the product's 2*rows*in*out (as
    aten.addmm counts; bias and ReLU are not counted)."""
    return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]


def linear_relu_backward_flops(grad_shape, x_shape, w_shape, saved_out_shape, output_mask, *args, **kwargs) -> int:
    """The grad_x and grad_weight products that output_mask asks for."""
    product = 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]
    return product * (int(bool(output_mask[0])) + int(bool(output_mask[1])))
