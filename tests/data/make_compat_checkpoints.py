"""Writes tests/data/compat_checkpoints.pt: whole pickled models (``torch.save(model)``), their state_dicts, a batch
and its outputs, written by the code of main at commit b9d4ef0 (before the fused path moved into ops/ and
SharedBottom became a family body). ``tests/test_checkpoint_compat.py`` loads them with the current code.

Run from a checkout of that commit (``PYTHONPATH=<checkout> python tests/data/make_compat_checkpoints.py OUT``);
not part of the test run."""
from __future__ import annotations

import io
import sys

import numpy as np
import torch

from saml_kernels.data import make_synthetic
from saml_kernels.nn import HMoE, HMoEConfig, SAML, SAMLConfig, STAR, STARConfig, SharedBottom, TrainingOptimizer
from saml_kernels.reference import HMoEReference, SAMLReference, SharedBottomReference, STARReference

DATA = make_synthetic(120, num_users=20, num_items=30, num_categories=5, num_contexts=4, num_segments=5,
                      num_tags=7, seq_len=4, seed=5)
DIMS = dict(embedding_dim=4, attention_dim=4)
SAML_CFG = dict(aux_hidden=(6, 5), branch_hidden=(6, 4), mutual_layers=(0,), **DIMS)
BUILD = {
    "SAML": lambda: SAML(SAMLConfig.from_data(DATA, **SAML_CFG)),
    "SharedBottom": lambda: SharedBottom(SAMLConfig.from_data(DATA, **SAML_CFG)),
    "STAR": lambda: STAR(STARConfig.from_data(DATA, hidden=(6, 4), aux_dim=3, aux_hidden=4, **DIMS)),
    "HMoE": lambda: HMoE(HMoEConfig.from_data(DATA, num_experts=2, expert_hidden=(6,), tower_hidden=4, **DIMS)),
    "SAMLReference": lambda: SAMLReference(SAMLConfig.from_data(DATA, **SAML_CFG)),
    "SharedBottomReference": lambda: SharedBottomReference(SAMLConfig.from_data(DATA, **SAML_CFG)),
    "STARReference": lambda: STARReference(STARConfig.from_data(DATA, hidden=(6, 4), aux_dim=3, aux_hidden=4,
                                                               **DIMS)),
    "HMoEReference": lambda: HMoEReference(HMoEConfig.from_data(DATA, num_experts=2, expert_hidden=(6,),
                                                               tower_hidden=4, **DIMS)),
}


def main(out: str) -> None:
    train, test = DATA.batch(np.arange(0, 64)), DATA.batch(np.arange(64, 96))
    record = {"inputs": tuple(test.inputs()), "models": {}}
    for name, build in BUILD.items():
        torch.manual_seed(0)
        model = build()
        fresh = {k: v.clone() for k, v in model.state_dict().items()}
        opt = TrainingOptimizer(model, 1e-2, 0.05)
        opt.zero_grad()
        model.loss(train).backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            y = model(*test.inputs())
        buf = io.BytesIO()
        torch.save(model, buf)
        entry = dict(keys=list(model.state_dict()), out=y, fresh_state=fresh)
        if "Reference" not in name:  # the twins share the bodies: the kernel models' pickles cover them
            entry.update(pickle=buf.getvalue(), state=model.state_dict())
        record["models"][name] = entry
    torch.save(record, out)


if __name__ == "__main__":
    main(sys.argv[1])
