"""Checkpoints written by earlier code load and behave the same (tests/data/compat_checkpoints.pt, written by
tests/data/make_compat_checkpoints.py at main's commit b9d4ef0, before the fused embedding path moved into ops/
and SharedBottom became a family body over the shared input):

- ``torch.save(model)`` whole-model pickles of SAML, SharedBottom, STAR and HMoE load with ``torch.load``, score the
  stored batch as they did, keep training (the fused update runs on the unpickled layers) and give a strict
  state_dict that the models built today load;
- every model (kernel and reference) built today under the same seed has the same state_dict keys, in the same
  order, and bitwise the same initial parameters (the layers are built and initialised in the same order), so
  its outputs are the old model's outputs.
"""
from __future__ import annotations

import importlib.util
import io
import pathlib

import numpy as np
import pytest
import torch

from saml_kernels.nn import TrainingOptimizer

DATA_FILE = pathlib.Path(__file__).parent / "data" / "compat_checkpoints.pt"
# the generator's models and data (its BUILD table is the contract of the stored checkpoints)
_spec = importlib.util.spec_from_file_location("make_compat_checkpoints",
                                               DATA_FILE.parent / "make_compat_checkpoints.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)


@pytest.fixture(scope="module")
def stored():
    return torch.load(DATA_FILE, weights_only=False)


def _equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)))


@pytest.mark.parametrize("name", list(gen.BUILD))
def test_fresh_model_has_the_old_keys_initial_values_and_outputs(stored, name):
    old = stored["models"][name]
    torch.manual_seed(0)
    model = gen.BUILD[name]()
    sd = model.state_dict()
    assert list(sd) == old["keys"]
    for k, v in old["fresh_state"].items():
        assert torch.equal(sd[k], v), k  # same init order: bitwise the same weights under one seed
    if "state" in old:  # the trained weights of the old model give the old outputs
        model.load_state_dict(old["state"], strict=True)
        model.eval()
        with torch.no_grad():
            y = model(*stored["inputs"])
        assert _equal(y, old["out"]), name


@pytest.mark.parametrize("name", [n for n in gen.BUILD if "Reference" not in n])
def test_whole_model_pickle_from_main_loads_scores_and_trains(stored, name):
    old = stored["models"][name]
    model = torch.load(io.BytesIO(old["pickle"]), weights_only=False)
    with torch.no_grad():
        y = model(*stored["inputs"])
    assert _equal(y, old["out"]), name  # bitwise the scores main's code gave
    # a model built today loads the unpickled model's strict state_dict
    torch.manual_seed(1)
    fresh = gen.BUILD[name]()
    fresh.load_state_dict(model.state_dict(), strict=True)
    # and the unpickled model keeps training: the fused update changes its tables
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = TrainingOptimizer(model, 1e-2, 0.05)
    opt.zero_grad()
    model.loss(gen.DATA.batch(np.arange(96, 120))).backward()
    opt.step()
    after = model.state_dict()
    table = next(k for k in after if k.endswith("embedding.global_weight"))
    assert not torch.equal(after[table], before[table])
    state = next(k for k in after if k.endswith("embedding.global_state"))
    assert not torch.equal(after[state], before[state])
