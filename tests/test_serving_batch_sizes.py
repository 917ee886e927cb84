"""Every model of the family (SAML with its mutual unit at the first and at a deeper layer, SharedBottom, STAR,
HMoE) exported with ``serving.export_saml`` once, with no warning, scores batches of 1, 2 and 7 like the eager
model (a program must not specialise on B != 1). The trap is ``Tensor.contiguous()`` on a route-"all" output
[M, B, N] (contiguous exactly when B == 1): ``ops/_layout.dense`` decides without that guard."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from saml_kernels import serving
from saml_kernels.data import make_synthetic
from saml_kernels.nn import HMoE, HMoEConfig, SAML, SAMLConfig, STAR, STARConfig, SharedBottom
from saml_kernels.ops._layout import dense

DATA = make_synthetic(300, num_users=60, num_items=80, num_categories=7, num_contexts=5, num_segments=6,
                      num_tags=11, seq_len=6, seed=3)
DIMS = dict(embedding_dim=8, attention_dim=4)
SAML_DIMS = dict(aux_hidden=(12, 7), branch_hidden=(10, 6), **DIMS)
MODELS = {
    "SAML": lambda be: SAML(SAMLConfig.from_data(DATA, mutual_layers=(0,), **SAML_DIMS), backend=be),
    "SAML-mutual-above-all": lambda be: SAML(SAMLConfig.from_data(DATA, mutual_layers=(1,), **SAML_DIMS),
                                             backend=be),
    "SharedBottom": lambda be: SharedBottom(SAMLConfig.from_data(DATA, **SAML_DIMS), backend=be),
    "STAR": lambda be: STAR(STARConfig.from_data(DATA, hidden=(16, 8), aux_dim=4, aux_hidden=8, **DIMS), backend=be),
    "HMoE": lambda be: HMoE(HMoEConfig.from_data(DATA, num_experts=3, expert_hidden=(16, 12), tower_hidden=8,
                                                 **DIMS), backend=be),
}


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("name", list(MODELS))
def test_export_scores_batches_of_one_two_and_seven_like_eager(name, backend):
    torch.manual_seed(0)
    model = MODELS[name](backend).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to B >= 2
        program = serving.export_saml(model, DATA.batch(np.arange(40, 56)))
    fn = program.module()
    for B in (1, 2, 7):
        for start in (0, 101):
            batch = DATA.batch(np.arange(start, start + B))
            with torch.no_grad():
                want = model(*batch.inputs())
                got = fn(*batch.inputs())
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, msg=lambda m: f"{name} B = {B}: {m}")


def test_dense_is_contiguous_in_eager_mode():
    """Eager: ``dense(t)`` is ``t`` when contiguous (also a [M, 1, N] view whose B stride does not count), else a
    contiguous copy with the same values."""
    buf = torch.randn(5, 3, 4)
    view = buf.permute(1, 0, 2)  # [M, B, N] with strides (N, M*N, 1): the route-"all" layout
    out = dense(view)
    assert out.is_contiguous() and out.data_ptr() != view.data_ptr() and torch.equal(out, view)
    one = torch.randn(1, 3, 4).permute(1, 0, 2)  # B = 1: contiguous already
    assert dense(one) is one
    c = torch.randn(3, 5, 4)
    assert dense(c) is c and dense(None) is None
    empty = torch.randn(0, 3, 4).permute(1, 0, 2)
    assert dense(empty) is empty
