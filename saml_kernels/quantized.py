"""8-bit row-wise embedding tables for serving (docs/design.md, "8-bit serving tables").

``quantize_tables(model)`` returns an inference copy of a trained model (``nn.SAML``, ``SharedBottom``, ``STAR``,
``HMoE``: anything built from the kernel layers) in which every ``nn.ScenarioEmbedding`` is replaced by a
:class:`QuantizedScenarioEmbedding`: its global table [R, D] and scenario tables [M, Rs, D] stored as uint8 rows
with a float32 scale and bias each (FBGEMM's fused 8-bit row-wise layout, [R, D + 8] and [M, Rs, D + 8] bytes:
(D + 8) / (4 D) of the float32 bytes), looked up by ``saml_kernels::scenario_embedding_bag_8bit`` (FBGEMM's 8-bit
kernel on the CPU, a Triton kernel on the GPU). Every element is read back as v = scale * q + bias, within
scale / 2 = (row max - row min) / 510 of the trained float value. ``serving.export_saml(..., table_dtype="uint8")``
exports such a copy. The dense layers are shared with ``model`` (not copied); the copy has no table gradients and
no fused optimizer.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn

from .nn.scenario_embedding import FeatureListProperties, ScenarioEmbedding
from .ops.scenario_embedding_bag_8bit import (QUANTIZABLE, ROW_EXTRA, dequantize_rows, prepare_args, quantize_rows,
                                              scale_bias, scenario_embedding_bag_8bit)

__all__ = ["QuantizedScenarioEmbedding", "quantize_tables", "quantize_rows", "dequantize_rows", "scale_bias",
           "scenario_embedding_bag_8bit", "table_bytes", "first_order_bound", "ROW_EXTRA"]


class QuantizedScenarioEmbedding(FeatureListProperties, nn.Module):
    """A ``ScenarioEmbedding`` with 8-bit row-wise tables, for inference: same features, layout, pooling runs,
    ``bounds_check`` and ``backend`` as the layer it was made from, same ``forward`` inputs (plain tensors or a
    KeyedJaggedTensor), float32 outputs: ``forward(...)`` = the float layer's forward on the dequantised tables
    up to float32 rounding.

    Buffers (in the state_dict): ``global_packed`` uint8 [R, D + 8], ``scenario_packed`` uint8 [M, Rs, D + 8]."""

    # the float layer's input handling (KeyedJaggedTensor keys, pooling runs), shared rather than copied
    _unpack = ScenarioEmbedding._unpack
    _from_kjt = ScenarioEmbedding._from_kjt
    _runs_inputs = ScenarioEmbedding._runs_inputs

    def __init__(self, layer: ScenarioEmbedding, who: str = "QuantizedScenarioEmbedding"):
        super().__init__()
        if not isinstance(layer, ScenarioEmbedding):
            raise TypeError(f"{who}: expected a saml_kernels.nn.ScenarioEmbedding, got {type(layer).__name__}")
        for name in ("global_weight", "scenario_weight"):
            w = getattr(layer, name)
            if w.dtype not in QUANTIZABLE:
                raise TypeError(f"{who}: {name} is {w.dtype}; 8-bit row-wise tables are made from float32 / "
                                f"float16 / bfloat16 tables (convert a float64 model with .float() first)")
        self.features, self.num_scenarios, self.embedding_dim = layer.features, layer.num_scenarios, layer.embedding_dim
        self.feature_rows, self.feature_scenario_rows = layer.feature_rows, layer.feature_scenario_rows
        self._runs, self.bounds_check, self.backend = layer._runs, layer.bounds_check, layer.backend
        self.source_dtype = layer.global_weight.dtype
        self.register_buffer("global_packed", quantize_rows(layer.global_weight, f"{who} global_weight"))
        self.register_buffer("scenario_packed", quantize_rows(layer.scenario_weight, f"{who} scenario_weight"))

    def dequantized(self) -> tuple[Tensor, Tensor]:
        """(global [R, D], scenario [M, Rs, D]) float32: the tables this layer serves."""
        return dequantize_rows(self.global_packed), dequantize_rows(self.scenario_packed)

    def forward(self, indices, offsets=None, scenario: Optional[Tensor] = None,
                per_sample_weights: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """As ``ScenarioEmbedding.forward``: (E_g [B, F, D], E_s [B, Fs, D]) float32 ([B, F, L, D] for "none")."""
        indices, offsets, scenario, psw = self._unpack(indices, offsets, scenario, per_sample_weights)
        gs, ss = [], []
        for idx, off, w, a, b, pooling in self._runs_inputs(indices, offsets, psw):
            args = prepare_args(idx, off, scenario, self.global_packed, self.scenario_packed,
                                self.feature_rows[a:b + 1], self.feature_scenario_rows[a:b + 1], pooling=pooling,
                                per_sample_weights=w, bounds_check=self.bounds_check, backend=self.backend)
            g, s = torch.ops.saml_kernels.scenario_embedding_bag_8bit(*args)
            gs.append(g)
            ss.append(s)
        if len(gs) == 1:
            return gs[0], ss[0]
        return torch.cat(gs, 1), torch.cat(ss, 1)

    def extra_repr(self) -> str:
        return (f"num_features={self.num_features}, num_aware={self.num_aware}, num_scenarios={self.num_scenarios}, "
                f"embedding_dim={self.embedding_dim}, rows={self.feature_rows[-1]}, "
                f"scenario_rows={self.feature_scenario_rows[-1]}, 8-bit row-wise from {self.source_dtype}")


def quantize_tables(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` (put in ``eval()``) with every ``nn.ScenarioEmbedding`` replaced by its
    :class:`QuantizedScenarioEmbedding`; ``model`` itself is unchanged and its float tables are not copied (its
    other modules are deep-copied). Raises, before anything is built: ValueError when ``model`` holds no
    ``ScenarioEmbedding`` (e.g. a model of the reference layers), TypeError for a table that is not float32 /
    float16 / bfloat16, ValueError for a table with a non-finite value (naming the layer and row)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_tables: expected a torch.nn.Module, got {type(model).__name__}")
    who = type(model).__name__
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, ScenarioEmbedding)]
    if not layers:
        raise ValueError(f"quantize_tables: {who} has no saml_kernels.nn.ScenarioEmbedding layer (8-bit tables "
                         f"replace the kernel embedding layers; build the model with the kernel layers)")
    # deepcopy with the quantized layers pre-seeded in the memo: every reference to a float layer becomes its
    # 8-bit twin, and the float tables are never copied
    memo = {id(m): QuantizedScenarioEmbedding(m, f"quantize_tables: {who}.{n}") for n, m in layers}
    out = copy.deepcopy(model, memo)
    return out.eval()


def table_bytes(model: nn.Module) -> dict:
    """{"float": bytes of the float tables of ``ScenarioEmbedding`` layers, "uint8": bytes of the packed tables of
    ``QuantizedScenarioEmbedding`` layers} in ``model`` (optimizer state not counted)."""
    fl = sum(m.global_weight.nbytes + m.scenario_weight.nbytes for m in model.modules()
             if isinstance(m, ScenarioEmbedding))
    q = sum(m.global_packed.nbytes + m.scenario_packed.nbytes for m in model.modules()
            if isinstance(m, QuantizedScenarioEmbedding))
    return {"float": fl, "uint8": q}


def first_order_bound(model: nn.Module, qmodel: nn.Module, batch) -> Tensor:
    """Per sample b, a first-order bound on |main_b(qmodel) - main_b(model)| (the first logit) from the 8-bit
    tables' per-element error |v - x| <= scale / 2:

        bound_b = sum_k |d main_b / d e_k| * delta_k

    over every output element e_k of every embedding layer, with delta_k the same bag pooled over the rows'
    scale / 2 (|w_i| scale_i / 2 summed, / length for "mean"), i.e. the largest change of e_k the rounding can
    make. The gradient is the float model's (one backward on a copy, tables frozen, ``model`` untouched); exact up
    to second-order terms in the error. ``qmodel`` = ``quantize_tables(model)``, ``batch`` a Batch. Returns [B]."""
    twin = copy.deepcopy(model).eval()
    outs, deltas = [], []
    for name, layer in list(twin.named_modules()):
        if not isinstance(layer, ScenarioEmbedding):
            continue
        ql = qmodel.get_submodule(name)
        half = [scale_bias(p)[0] / 2 for p in (ql.global_packed, ql.scenario_packed)]
        delta_layer = copy.deepcopy(layer)
        with torch.no_grad():
            delta_layer.global_weight.copy_(half[0].unsqueeze(-1).expand_as(layer.global_weight))
            delta_layer.scenario_weight.copy_(half[1].unsqueeze(-1).expand_as(layer.scenario_weight))
        layer.global_weight.requires_grad_(False)
        layer.scenario_weight.requires_grad_(False)

        def hook(mod, args, out, delta_layer=delta_layer):
            args = list(args)
            if len(args) > 3 and isinstance(args[3], Tensor):
                args[3] = args[3].abs()  # per-sample weights: the error bound scales with |w_i|
            with torch.no_grad():
                deltas.extend(delta_layer(*args))
            out = tuple(o.detach().requires_grad_() for o in out)
            outs.extend(out)
            return out

        layer.register_forward_hook(hook)
    with torch.enable_grad():
        y = twin(*batch.inputs())
        main = y[0] if isinstance(y, tuple) else y
        grads = torch.autograd.grad(main.float().sum(), outs, allow_unused=True)
    bound = torch.zeros(main.shape[0], dtype=torch.float64)
    for g, d in zip(grads, deltas):
        if g is not None:
            bound += (g.abs().double() * d.double()).reshape(g.shape[0], -1).sum(1)
    return bound
