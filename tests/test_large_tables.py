"""Large tables: fp16 tables with more than 2^31 elements gather and accumulate gradients correctly at ids near
their end (64-bit address arithmetic: row * D and (m * Rs + r) * D overflow int32 there).

* global table: 70M rows x 32 (2.24e9 elements, 4.5 GB), ids near the end of both features;
* scenario table: 4 scenarios x 17M rows x 32 (2.18e9 elements, 4.4 GB) + its 17M x 32 global table, ids near the
  end of scenario 3 (flat row 68M - 1).

Tables are allocated with ``torch.empty`` and only the rows the test reads are written (untouched pages cost no
memory); gradients are checked through ``sparse=True`` (COO rows, no dense 4.5 GB gradient) and through the
fused SGD update (``embedding_optimizer.backward_update``), which writes the touched rows in place; neighbour
rows hold sentinels that must not change. Each test skips, saying so, when /proc/meminfo's MemAvailable is too
small for its tables plus a margin.
"""
from __future__ import annotations

import gc

import pytest
import torch

import saml_kernels
from saml_kernels.ops import embedding_optimizer
from saml_kernels.ops.scenario_embedding_bag import table_layout

D = 32
GIB = 1 << 30
MARGIN = int(1.5 * GIB)
BACKENDS = [b for b in ("cpu", "reference") if b in saml_kernels.available_backends("cpu")]


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _need(nbytes: int):
    avail = _mem_available()
    if avail < nbytes + MARGIN:
        pytest.skip(f"needs {(nbytes + MARGIN) / GIB:.1f} GiB free memory (tables {nbytes / GIB:.1f} GiB + "
                    f"{MARGIN / GIB:.1f} GiB margin); /proc/meminfo MemAvailable is {avail / GIB:.1f} GiB")


def _fill(table2d, rows, gen, sentinel=None):
    """Write random values into ``rows`` (and a sentinel into the rows just before/after each)."""
    rows = torch.as_tensor(sorted(set(rows)), dtype=torch.long)
    if sentinel is not None:
        nb = torch.cat([rows - 1, rows + 1]).clamp(0, table2d.shape[0] - 1)
        nb = nb[~torch.isin(nb, rows)].unique()
        table2d.index_copy_(0, nb, torch.full((nb.numel(), table2d.shape[1]), sentinel, dtype=table2d.dtype))
    else:
        nb = torch.empty(0, dtype=torch.long)
    table2d.index_copy_(0, rows, torch.randn(rows.numel(), table2d.shape[1], generator=gen).to(table2d.dtype))
    return nb


def _expected(rows_per_bag, table2d, B, F):
    """Sum-pooled float32 expectation [B, F, D] from the listed (sample, feature) -> table rows."""
    out = torch.zeros(B, F, table2d.shape[1])
    for (b, f), rows in rows_per_bag.items():
        for r in rows:
            out[b, f] += table2d[r].float()
    return out


def _jagged(bags, B, F, idx_dtype):
    """Feature-major indices/offsets from {(b, f): [local ids]}."""
    ids, off = [], [0]
    for f in range(F):
        for b in range(B):
            ids += bags.get((b, f), [])
            off.append(len(ids))
    return torch.tensor(ids, dtype=idx_dtype), torch.tensor(off, dtype=idx_dtype)


def _row_grads(rows_per_bag, up, nrows_hint=None):
    """{table row: summed upstream gradient} (float32)."""
    acc = {}
    for (b, f), rows in rows_per_bag.items():
        for r in rows:
            acc[r] = acc.get(r, 0) + up[b, f].float()
    return acc


def _check_sparse(grad, expect, what):
    assert grad is not None and grad.is_sparse, f"{what}: expected a sparse COO gradient"
    grad = grad.coalesce()
    idx = grad.indices()
    flat = idx[0] if idx.shape[0] == 1 else idx[0] * grad.shape[1] + idx[1]
    got = {int(r): v for r, v in zip(flat.tolist(), grad.values().float())}
    assert sorted(got) == sorted(expect), f"{what}: gradient rows {sorted(got)[:8]} != {sorted(expect)[:8]}"
    for r, v in expect.items():
        torch.testing.assert_close(got[r], v, atol=2e-2, rtol=2e-3, msg=lambda m: f"{what}: row {r}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_global_table_over_2_31_elements(backend):
    R0, R1 = 69_999_000, 1_000  # feature 0 (not aware), feature 1 (aware) at the very end of the table
    R = R0 + R1
    assert R * D > 2**31
    _need(R * D * 2)
    gen = torch.Generator().manual_seed(0)
    gw = torch.empty(R, D, dtype=torch.float16)
    sw = torch.zeros(2, R1, D, dtype=torch.float16)
    sw.copy_(torch.randn(2, R1, D, generator=gen))
    B, F = 3, 2
    bags = {(0, 0): [R0 - 1, 7, R0 - 1], (1, 0): [R0 - 2], (2, 0): [],
            (0, 1): [R1 - 1], (1, 1): [R1 - 1, 0], (2, 1): [R1 - 2]}
    grow = {(b, f): [(0 if f == 0 else R0) + i for i in ids] for (b, f), ids in bags.items()}
    touched = sorted({r for rs in grow.values() for r in rs})
    sentinels = _fill(gw, touched, gen, sentinel=1000.0)
    before = gw.index_select(0, torch.tensor(touched)).clone()
    scen = torch.tensor([1, 0, 1])
    for idx_dtype in (torch.int32, torch.int64):
        indices, offsets = _jagged(bags, B, F, idx_dtype)
        leaf_g = gw.requires_grad_(True)
        go, so = saml_kernels.scenario_embedding_bag(indices, offsets, scen.to(idx_dtype), leaf_g, sw, [0, R0, R],
                                                     [0, 0, R1], sparse=True, backend=backend)
        torch.testing.assert_close(go.float(), _expected(grow, gw.detach(), B, F), atol=2e-2, rtol=2e-3)
        s_exp = torch.stack([sw[scen[b], bags[(b, 1)]].float().sum(0) for b in range(B)])[:, None]
        torch.testing.assert_close(so.float(), s_exp, atol=2e-2, rtol=2e-3)
        up = torch.randn(B, F, D, generator=gen).half()
        go.backward(up)
        _check_sparse(leaf_g.grad, _row_grads(grow, up), f"global grad ({idx_dtype})")
        leaf_g.grad = None
        gw = leaf_g.detach()

        # fused SGD: touched rows move by -lr * g, sentinel neighbours stay
        fr, fsr, slot, _ = table_layout([0, R0, R], [0, 0, R1], R, R1, "cpu")
        lr = 0.5
        old = gw.index_select(0, torch.tensor(touched)).float()
        embedding_optimizer.backward_update(backend, up, torch.zeros(B, 1, D, dtype=torch.float16), indices, offsets,
                                            scen.to(idx_dtype), gw, sw, fr, fsr, slot, None, 0, 0, None, None, "sgd",
                                            embedding_optimizer.make_hparams(lr, 0.0))
        g = _row_grads(grow, up)
        new = gw.index_select(0, torch.tensor(touched)).float()
        exp = old - lr * torch.stack([g[r] for r in touched])
        torch.testing.assert_close(new, exp, atol=2e-2, rtol=2e-3, msg=lambda m: f"fused SGD ({idx_dtype}): {m}")
        assert bool((gw.index_select(0, sentinels) == 1000.0).all()), "fused SGD wrote a neighbouring row"
        gw.index_copy_(0, torch.tensor(touched), before)  # restore for the next index dtype
    del gw, sw, leaf_g
    gc.collect()


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_scenario_table_over_2_31_elements(backend):
    M, Rs = 4, 17_000_000  # one aware feature; flat scenario row (3 * Rs + r) * D > 2^31 near the end
    assert M * Rs * D > 2**31 and (3 * Rs + Rs - 1) * D > 2**31
    _need((M * Rs * D + Rs * D) * 2)
    gen = torch.Generator().manual_seed(1)
    gw = torch.empty(Rs, D, dtype=torch.float16)
    sw = torch.empty(M, Rs, D, dtype=torch.float16)
    sflat = sw.view(M * Rs, D)
    B = 4
    scen = torch.tensor([3, 3, 0, 2])
    bags = {(0, 0): [Rs - 1], (1, 0): [Rs - 2, Rs - 1], (2, 0): [Rs - 1], (3, 0): [5]}
    grow = {k: list(v) for k, v in bags.items()}
    srow = {(b, 0): [int(scen[b]) * Rs + i for i in ids] for (b, _), ids in bags.items()}
    _fill(gw, sorted({r for rs in grow.values() for r in rs}), gen)
    touched = sorted({r for rs in srow.values() for r in rs})
    sentinels = _fill(sflat, touched, gen, sentinel=-1000.0)
    for idx_dtype in (torch.int32, torch.int64):
        indices, offsets = _jagged(bags, B, 1, idx_dtype)
        leaf_s = sw.requires_grad_(True)
        go, so = saml_kernels.scenario_embedding_bag(indices, offsets, scen.to(idx_dtype), gw, leaf_s, [0, Rs], [0, Rs],
                                                     sparse=True, backend=backend)
        torch.testing.assert_close(go.float(), _expected(grow, gw, B, 1), atol=2e-2, rtol=2e-3)
        torch.testing.assert_close(so.float(), _expected(srow, sflat, B, 1), atol=2e-2, rtol=2e-3)
        up = torch.randn(B, 1, D, generator=gen).half()
        so.backward(up)
        _check_sparse(leaf_s.grad, _row_grads(srow, up), f"scenario grad ({idx_dtype})")
        leaf_s.grad = None
        sw = leaf_s.detach()
        sflat = sw.view(M * Rs, D)

        fr, fsr, slot, _ = table_layout([0, Rs], [0, Rs], Rs, Rs, "cpu")
        old = sflat.index_select(0, torch.tensor(touched)).float().clone()
        embedding_optimizer.backward_update(backend, torch.zeros(B, 1, D, dtype=torch.float16), up, indices, offsets,
                                            scen.to(idx_dtype), gw, sw, fr, fsr, slot, None, 0, 0, None, None, "sgd",
                                            embedding_optimizer.make_hparams(0.5, 0.0))
        g = _row_grads(srow, up)
        new = sflat.index_select(0, torch.tensor(touched)).float()
        torch.testing.assert_close(new, old - 0.5 * torch.stack([g[r] for r in touched]), atol=2e-2, rtol=2e-3)
        assert bool((sflat.index_select(0, sentinels) == -1000.0).all()), "fused SGD wrote a neighbouring row"
        sflat.index_copy_(0, torch.tensor(touched), old.half())
    del gw, sw, sflat, leaf_s
    gc.collect()
