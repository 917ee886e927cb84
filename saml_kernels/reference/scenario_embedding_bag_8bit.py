"""Plain-PyTorch kernel of ``saml_kernels::scenario_embedding_bag_8bit`` (the ``reference`` backend): dequantise the
packed tables (v = scale * q + bias, float32), then the float reference kernel. Contract:
``saml_kernels/ops/scenario_embedding_bag_8bit.py``."""
from __future__ import annotations

import torch

from ..ops.scenario_embedding_bag_8bit import dequantize_rows
from .scenario_embedding_bag import forward_kernel


def forward(indices, offsets, scenario, global_packed, scenario_packed, feature_rows, feature_scenario_rows,
            aware_slot, per_sample_weights, pooling, bag_len, check, num_aware=-1):
    """(global_out float32, scenario_out float32, bad_count int64 [1]) on the dequantised tables."""
    psw = per_sample_weights.to(torch.float32) if per_sample_weights is not None else None
    return forward_kernel(indices, offsets, scenario, dequantize_rows(global_packed), dequantize_rows(scenario_packed),
                          feature_rows, feature_scenario_rows, aware_slot, psw, pooling, bag_len, check, num_aware)


KERNELS = {"scenario_embedding_bag_8bit": {"forward": forward}}
