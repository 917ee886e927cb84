"""Serving (saml_kernels.serving): torch.export of a trained SAML through the custom ops' fake implementations,
with a dynamic batch dimension; the saved program and an AOTInductor package score like the eager model; bad
inputs still raise inside the exported graph; python/serve_saml.py end to end."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import device_backends
from saml_kernels import serving
from saml_kernels.data import load_ali_ccp, make_synthetic
from saml_kernels.nn import SAML, SAMLConfig, SharedBottom, TrainingOptimizer

ROOT = Path(__file__).resolve().parents[1]
ALI_TRAIN = ROOT / "data" / "ali_ccp" / "ali_ccp_train_sample.csv"
ALI_VAL = ROOT / "data" / "ali_ccp" / "ali_ccp_val_sample.csv"


def _synthetic():
    return make_synthetic(300, num_users=60, num_items=80, num_categories=7, num_contexts=5, num_segments=6,
                          num_tags=11, seq_len=6, seed=3)


def _trained(data, backend=None, steps=3):
    """A SAML (mutual layer, row-wise Adagrad fused into the embedding backward) after a few training steps, so
    the exported weights are not the initial ones."""
    cfg = SAMLConfig.from_data(data, embedding_dim=8, attention_dim=4, aux_hidden=(12, 7), branch_hidden=(10, 6),
                               mutual_layers=(0,), dropout=0.1)
    model = SAML(cfg, backend=backend, embedding_optimizer="rowwise_adagrad")
    opt = TrainingOptimizer(model, lr=1e-2)
    for k in range(steps):
        opt.zero_grad()
        model.loss(data.batch(np.arange(32 * k, 32 * k + 32))).backward()
        opt.step()
    return model.eval()


DATASETS = {"synthetic": _synthetic, "ali_ccp": lambda: load_ali_ccp(ALI_TRAIN)[0]}


def _eager(model, batch):
    with torch.no_grad():
        return model(*batch.inputs())


@pytest.mark.parametrize("device, backend", [p for p in device_backends("mbranch_linear") if p.values[0] == "cpu"])
@pytest.mark.parametrize("name", sorted(DATASETS))
def test_exported_program_scores_equal_eager_for_any_batch_size(tmp_path, name, device, backend):
    data = DATASETS[name]()
    model = _trained(data, backend)
    path = tmp_path / "saml.pt2"
    program = serving.export_saml(model, data.batch(np.arange(40, 56)), path)
    assert program.range_constraints  # the batch dimension is symbolic
    loaded = serving.load_exported(path)
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any(o.startswith("saml_kernels.") for o in ops), ops  # our custom ops, not a decomposition
    for rows in (np.arange(16), np.arange(60, 67), np.arange(5, 6), np.arange(len(data))):  # B = 16, 7, 1, all
        batch = data.batch(rows)
        main, aux = _eager(model, batch)
        for fn in (program.module(), loaded):
            got_main, got_aux = fn(*batch.inputs())
            assert got_main.shape == (len(rows),) and type(got_main) is torch.Tensor
            torch.testing.assert_close(got_main, main, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(got_aux, aux, atol=1e-6, rtol=1e-6)


def test_shared_bottom_exports_with_dynamic_batch():
    data = _synthetic()
    cfg = SAMLConfig.from_data(data, embedding_dim=8, attention_dim=4, aux_hidden=(12, 7), branch_hidden=(10, 6))
    model = SharedBottom(cfg).eval()
    fn = serving.export_saml(model, data.batch(np.arange(16))).module()
    for rows in (np.arange(9), np.arange(20, 22), np.arange(30, 31)):
        batch = data.batch(rows)
        torch.testing.assert_close(fn(*batch.inputs()), _eager(model, batch), atol=1e-6, rtol=1e-6)


class _LayoutNeedsTwo(SAML):
    """A model whose trace decides a memory layout on a [B, 1] slice (contiguous only when B == 1)."""

    def forward(self, indices, offsets, scenario, seq_ids=None, seq_lengths=None, dense=None):
        dense = torch.cat([dense[:, 1:2].contiguous(), dense[:, :1]], 1)
        return super().forward(indices, offsets, scenario, seq_ids, seq_lengths, dense)


def test_export_falls_back_to_batches_of_two_when_the_trace_needs_it():
    data = _synthetic()
    cfg = SAMLConfig.from_data(data, embedding_dim=8, attention_dim=4, aux_hidden=(12, 7), branch_hidden=(10, 6))
    model = _LayoutNeedsTwo(cfg).eval()
    with pytest.warns(RuntimeWarning, match="batches of 2 or more"):
        fn = serving.export_saml(model, data.batch(np.arange(16))).module()
    for rows in (np.arange(9), np.arange(20, 22)):
        batch = data.batch(rows)
        torch.testing.assert_close(fn(*batch.inputs()), _eager(model, batch), atol=1e-6, rtol=1e-6)
    with pytest.raises(Exception):
        fn(*data.batch(np.arange(1)).inputs())
    with pytest.warns(RuntimeWarning, match="batches of 2 or more"):
        program = serving.export_saml(model, data.batch(np.arange(16)))
    with pytest.raises(ValueError, match=r"_LayoutNeedsTwo: this program serves batches of B >= 2 .*got B = 1"):
        serving.served_module(program)(*data.batch(np.arange(1)).inputs())


def test_eager_model_unchanged_after_export():
    """Tracing creates fake layout tensors; none of them may leak into the model's next eager call."""
    data = _synthetic()
    model = _trained(data)
    batch = data.batch(np.arange(20))
    before = _eager(model, batch)
    model.train()
    serving.export_saml(model, batch)
    assert model.training  # the mode is restored
    model.eval()
    after = _eager(model, batch)
    assert type(after[0]) is torch.Tensor
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_bare_torch_export_leaves_no_fake_tensor_behind():
    """A plain ``torch.export.export`` (not through export_saml, so nothing clears a cache) must not leave fake
    layout tensors for the model's next eager call."""
    data = _synthetic()
    model = _trained(data)
    batch = data.batch(np.arange(20))
    before = _eager(model, batch)
    from saml_kernels.ops import scenario_embedding_bag as seb

    seb._layout_cached.cache_clear()  # the trace is the first to build the layout
    torch.export.export(model, tuple(batch.inputs()))
    after = _eager(model, batch)
    assert type(after[0]) is torch.Tensor and type(after[1]) is torch.Tensor
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_exported_program_still_checks_inputs():
    data = _synthetic()
    model = _trained(data)
    fn = serving.export_saml(model, data.batch(np.arange(16))).module()
    batch = data.batch(np.arange(8))
    bad_scenario = batch.scenario.clone()
    bad_scenario[3] = model.config.num_scenarios
    with pytest.raises(IndexError, match=r"scenario\[3\] = "):
        fn(batch.indices, batch.offsets, bad_scenario, batch.seq_ids, batch.seq_lengths, batch.dense)
    bad_ids = batch.indices.clone()
    bad_ids[5] = 10_000
    with pytest.raises(IndexError, match=r"indices\[5\] = 10000 is out of range"):
        fn(bad_ids, batch.offsets, batch.scenario, batch.seq_ids, batch.seq_lengths, batch.dense)
    bad_offsets = batch.offsets.clone()
    bad_offsets[2] = bad_offsets[4] + 1
    with pytest.raises(ValueError, match="offsets must be non-decreasing"):
        fn(batch.indices, bad_offsets, batch.scenario, batch.seq_ids, batch.seq_lengths, batch.dense)
    with pytest.raises(Exception):  # a shape the program was not exported for (seq length L fixed)
        fn(batch.indices, batch.offsets, batch.scenario, batch.seq_ids[:, :3], batch.seq_lengths, batch.dense)


def test_example_batch_must_be_a_batch_or_six_inputs():
    data = _synthetic()
    model = _trained(data, steps=0)
    with pytest.raises(ValueError, match="6 inputs"):
        serving.export_saml(model, data.batch(np.arange(4)).inputs()[:3])


@pytest.mark.slow
def test_aoti_package_scores_equal_eager(tmp_path):
    """AOTInductor (a C++ compile: tens of seconds on a 2-core CPU, hence ``slow``)."""
    data = load_ali_ccp(ALI_TRAIN)[0]
    model = _trained(data)
    program = serving.export_saml(model, data.batch(np.arange(16)), tmp_path / "saml.pt2")
    package = serving.aoti_package(tmp_path / "saml.pt2", tmp_path / "saml_aoti.pt2")
    runner = serving.load_aoti(package)
    for rows in (np.arange(16), np.arange(30, 39), np.arange(2, 3)):
        batch = data.batch(rows)
        main, aux = _eager(model, batch)
        got_main, got_aux = runner(*batch.inputs())
        torch.testing.assert_close(got_main, main, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_aux, aux, atol=1e-5, rtol=1e-5)
    assert program is not None
    # the package carries the eager input contract: every bad input raises the eager type and message
    assert isinstance(runner, serving.ServedProgram)
    cases = _bad_inputs(data.batch(np.arange(8)))
    assert len(cases) >= 10
    for name, inputs in cases.items():
        eager = _error(model, inputs)
        assert eager[0] is not None and _error(runner, inputs) == eager, name


@pytest.mark.slow
def test_serve_saml_script(tmp_path):
    """python/serve_saml.py trains briefly on the Ali-CCP sample, exports, reloads and scores the validation rows
    from another directory (nothing depends on the working directory)."""
    out = tmp_path / "serve"
    r = subprocess.run([sys.executable, str(ROOT / "python" / "serve_saml.py"), "--out", str(out), "--steps", "3"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "saml.pt2").exists() and (out / "vocab.json").exists()
    assert "max |exported - eager| = 0" in r.stdout, r.stdout
    r2 = subprocess.run([sys.executable, str(ROOT / "python" / "serve_saml.py"), "--out", str(out), "--score-only",
                         "--csv", str(ALI_VAL), "--batch-size", "5"], cwd=tmp_path, capture_output=True, text=True,
                        timeout=300)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert "scored 5 rows" in r2.stdout, r2.stdout


def _bad_inputs(batch):
    """{name: the six inputs with one bad entry}: every kind of bad input a serving request can carry."""
    good = dict(indices=batch.indices, offsets=batch.offsets, scenario=batch.scenario, seq_ids=batch.seq_ids,
                seq_lengths=batch.seq_lengths, dense=batch.dense)

    def bad(**kw):
        return tuple({**good, **kw}.values())

    def put(t, i, v):
        t = t.clone()
        t[i] = v
        return t

    cases = {
        "scenario too large": lambda: bad(scenario=put(batch.scenario, 3, 99)),
        "scenario negative": lambda: bad(scenario=put(batch.scenario, 3, -1)),
        "scenario float": lambda: bad(scenario=batch.scenario.float()),
        "scenario 2-D": lambda: bad(scenario=batch.scenario[:, None]),
        "id too large": lambda: bad(indices=put(batch.indices, 5, 10_000)),
        "id negative": lambda: bad(indices=put(batch.indices, 5, -1)),
        "indices float": lambda: bad(indices=batch.indices.float()),
        "offsets decreasing": lambda: bad(offsets=put(batch.offsets, 2, int(batch.offsets[4]) + 1)),
        "offsets last != nnz": lambda: bad(offsets=put(batch.offsets, -1, int(batch.offsets[-1]) - 1)),
        "offsets too short": lambda: bad(offsets=batch.offsets[:-2]),
        "offsets of another B": lambda: bad(offsets=batch.offsets[:-len(batch.scenario)]),
        "offsets int32, indices int64": lambda: bad(offsets=batch.offsets.int()),
        "sequence id too large": lambda: bad(seq_ids=put(batch.seq_ids, (1, 0), 10_000)),
        "seq_lengths above L": lambda: bad(seq_lengths=put(batch.seq_lengths, 2, 99)),
        "seq_lengths negative": lambda: bad(seq_lengths=put(batch.seq_lengths, 2, -1)),
        "seq_lengths float": lambda: bad(seq_lengths=batch.seq_lengths.float()),
        "seq_ids of another B": lambda: bad(seq_ids=batch.seq_ids[:5]),
        "seq_ids missing": lambda: bad(seq_ids=None, seq_lengths=None),
        "dense too narrow": lambda: bad(dense=batch.dense[:, :-1]),
        "dense missing": lambda: bad(dense=None),
    }
    needs = {"seq": batch.seq_ids is not None, "dense": batch.dense is not None and batch.dense.shape[1] > 1}
    return {k: v() for k, v in cases.items() if all(ok or w not in k for w, ok in needs.items())}


def _error(fn, inputs):
    try:
        with torch.no_grad():
            fn(*inputs)
    except Exception as exc:  # noqa: BLE001 - the point is to compare whatever is raised
        return type(exc), str(exc)
    return None, "no error"


@pytest.mark.parametrize("kind", ["SAML", "SharedBottom", "STAR"])
def test_served_program_raises_the_eager_errors(tmp_path, kind):
    """Issue 21 item 12: each bad input raises the same exception type and message from the loaded program as
    from the eager model (they differed in type and naming: a torch guard AssertionError, the op's name instead
    of the model's, a RuntimeError without the position for a bad sequence length)."""
    data = _synthetic()
    if kind == "STAR":
        from saml_kernels.nn import STAR, STARConfig

        model = STAR(STARConfig.from_data(data, embedding_dim=8, attention_dim=4, hidden=(12, 6), aux_dim=3,
                                          aux_hidden=5)).eval()
    else:
        cfg = SAMLConfig.from_data(data, embedding_dim=8, attention_dim=4, aux_hidden=(12, 7), branch_hidden=(10, 6))
        model = {"SAML": SAML, "SharedBottom": SharedBottom}[kind](cfg).eval()
    serving.export_saml(model, data.batch(np.arange(16)), tmp_path / "m.pt2")
    served = serving.load_exported(tmp_path / "m.pt2")
    assert isinstance(served, serving.ServedProgram)
    batch = data.batch(np.arange(8))
    for name, inputs in _bad_inputs(batch).items():
        eager = _error(model, inputs)
        assert eager[0] is not None, name  # every case is a bad input for the eager model
        assert _error(served, inputs) == eager, name
    # accepted alike: int32 ids and offsets, a float64 dense (cast to the dense dtype as in eager mode)
    inputs = list(batch.inputs())
    inputs[0], inputs[1], inputs[5] = inputs[0].int(), inputs[1].int(), inputs[5].double()
    torch.testing.assert_close(served(*inputs), _eager(model, batch), atol=1e-6, rtol=1e-6)
    # the one documented difference: the sequence length is fixed by the export
    short = (batch.indices, batch.offsets, batch.scenario, batch.seq_ids[:, :3], batch.seq_lengths.clamp(max=3),
             batch.dense)
    assert _error(model, short)[0] is None
    with pytest.raises(ValueError, match=f"{kind}: seq_ids must be \\[B, L\\] with L = 6, the sequence length this"):
        served(*short)


def test_served_module_of_an_in_memory_program():
    data = _synthetic()
    model = _trained(data, steps=0)
    program = serving.export_saml(model, data.batch(np.arange(16)))
    served = serving.served_module(program)
    bad = data.batch(np.arange(8))
    scenario = bad.scenario.clone()
    scenario[3] = 99
    with pytest.raises(IndexError, match=r"^SAML: scenario\[3\] = 99 is out of range \[0, 4\)$"):
        served(bad.indices, bad.offsets, scenario, bad.seq_ids, bad.seq_lengths, bad.dense)
    with pytest.raises(ValueError, match="no input contract"):
        serving.served_module(torch.export.export(model, tuple(bad.inputs())))
