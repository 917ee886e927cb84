"""Calls every CUDA op of the extension once at odd sizes: the program compute-sanitizer runs in gpu_check.sh.

    python benchmarks/gpu_sanitize_driver.py                       # CUDA, every part
    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/gpu_sanitize_driver.py --parts direct,api
    python benchmarks/gpu_sanitize_driver.py --dry-run             # = --device cpu: the same Python on the CPU

Parts (``--parts``, comma list; default all):
  direct  every op registered for CUDA in csrc/cuda/*.cu (``TORCH_LIBRARY_IMPL(saml_C, CUDA, ...)``), called through
          ``torch.ops.saml_C.<op>`` with its registry schema (csrc/registry.cpp): arguments are given by name from
          the schema, so a reordered schema still works and a new argument without a default is named in the error.
          An op registered for CUDA that the driver has no case for is an error (exit 2): a new op cannot skip it.
  api     the public API, forward and backward, float32 / float64 / float16 / bfloat16 and int32 / int64 ids, on
          the shapes B=37 K=45 N=29 Ka=7 M=3 (K and N tails, one empty scenario in some cases): mbranch_linear
          routes own and all (grad_mask own / params / none), mutual_unit (cosine, dot), mutual_linear (recompute
          and saved), every activation; under each CUDA GEMM engine (SAML_CUDA_GROUPED = auto, simt, cublas);
          scenario_embedding_bag (sum / mean / none pooling, per-sample weights, dense and sparse gradients); the
          fused SGD and row-wise Adagrad updates of ``nn.ScenarioEmbedding`` (weight decay on); partitioned_norm
          (Triton on CUDA). Every result is compared with the float64 reference on the CPU by
          ||got - ref|| / ||ref|| (NaN fails).
  graph   ``graphs.CapturedTrainingStep`` of a small SAML with the fused row-wise Adagrad: capture and two replays
          (on the CPU: the same step run eagerly; CUDA graphs need a GPU).

The CUDA-graph part needs PyTorch's caching allocator; memcheck is most precise without it
(PYTORCH_NO_CUDA_MEMORY_CACHING=1: every tensor its own allocation, so an access past a tensor's end is caught),
so gpu_check.sh runs memcheck as two processes: ``--parts direct,api`` without caching, ``--parts graph`` with it.

``--device cpu`` (``--dry-run``): the "cpu" backend (C++ CPU kernels) instead of "cuda"; ops without a CPU kernel
are skipped and named. ``--stop-at EPOCH``: start no case after that time (gpu_check.sh passes its cap, so the
driver exits by itself and compute-sanitizer still prints its summary). Exit status: 0 all ran and matched, 1 a
call failed or mismatched, 2 coverage incomplete, 3 cases left out at --stop-at (none failed). The last line is
``gpu_sanitize_driver: ...`` with the counts; each case prints ``ok <case> (<seconds>)`` or ``FAIL <case>: ...``.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import pathlib
import re
import sys
import time
import traceback

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import saml_kernels  # noqa: E402
from saml_kernels import nn as snn  # noqa: E402

PARTS = ("direct", "api", "graph")
ENGINES = ("auto", "simt", "cublas")          # SAML_CUDA_GROUPED, read by the CUDA GEMM ops at every call
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# ||got - ref|| / ||ref|| allowed per dtype (float32 accumulation; 16-bit outputs carry their own rounding)
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
M, B, K, N, KA = 3, 37, 45, 29, 7
ACTIVATIONS = (None, "relu", "leaky_relu", "gelu", "silu")


# ------------------------------------------------------------------------------------------------ bookkeeping

class Run:
    """Counts calls, records failures (the driver goes on after one, so every broken op is named), and stops
    starting cases at ``stop_at`` (epoch seconds), so that a capped run still exits by itself and the sanitizer
    prints its summary."""

    def __init__(self, device: str, stop_at: float = math.inf):
        self.device, self.stop_at = device, stop_at
        self.calls, self.failures, self.skipped, self.not_run = 0, [], [], []

    def due(self, name: str) -> bool:
        """False (and the case is counted as not run) once the deadline has passed."""
        if time.time() < self.stop_at:
            return True
        self.not_run.append(name)
        return False

    @contextlib.contextmanager
    def case(self, name: str):
        self.calls += 1
        t0 = time.perf_counter()
        try:
            yield
            if self.device == "cuda":
                torch.cuda.synchronize()  # an asynchronous fault is charged to this case
            print(f"ok {name} ({time.perf_counter() - t0:.2f} s)", flush=True)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, then the exit status says so
            self.failures.append(f"{name}: {type(exc).__name__}: {exc}")
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
            traceback.print_exc(limit=3)

    def compare(self, name: str, got, ref, dtype) -> None:
        """Raises when ``got`` (any device / dtype) is not within TOL[dtype] of the float64 ``ref``."""
        if got is None or ref is None:
            if (got is None) != (ref is None):
                raise AssertionError(f"{name}: got {type(got).__name__}, reference {type(ref).__name__}")
            return
        if got.is_sparse:
            got = got.to_dense()
        if ref.is_sparse:
            ref = ref.to_dense()
        g, r = got.detach().cpu().double(), ref.detach().cpu().double()
        if g.shape != r.shape:
            raise AssertionError(f"{name}: shape {tuple(g.shape)}, reference {tuple(r.shape)}")
        if not torch.isfinite(g).all():
            raise AssertionError(f"{name}: {int((~torch.isfinite(g)).sum())} non-finite elements")
        den = float(r.norm())
        err = float((g - r).norm()) / den if den > 0 else float(g.norm())
        if not err <= TOL[dtype]:
            raise AssertionError(f"{name}: relative error {err:.3g} > {TOL[dtype]:.0e} ({dtype})")


def rand(*shape, dtype, scale=1.0, gen):
    """float64 values already rounded to ``dtype`` (the reference then sees exactly the kernel's inputs)."""
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).double()


def on(t, device, dtype=None, grad=False):
    if t is None:
        return None
    # always a copy: the float64 master must stay a separate leaf for the reference
    t = t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else t.dtype, copy=True)
    return t.requires_grad_(grad) if grad else t


@contextlib.contextmanager
def engine(name: str):
    old = os.environ.get("SAML_CUDA_GROUPED")
    os.environ["SAML_CUDA_GROUPED"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SAML_CUDA_GROUPED", None)
        else:
            os.environ["SAML_CUDA_GROUPED"] = old


def scenarios(gen, idt, empty: bool):
    s = torch.randint(0, M, (B,), generator=gen)
    if empty:
        s[s == 1] = 2  # scenario 1 has no rows: its tiles, segments and weight gradient are empty
    return s.to(idt)


# ------------------------------------------------------------------------------------------------ coverage

def cuda_registered_ops(root: pathlib.Path = ROOT) -> set:
    """The op names csrc/cuda/*.cu register for CUDA: ``m.impl("name", ...)`` inside TORCH_LIBRARY_IMPL(saml_C,
    CUDA, m) blocks (the source is the authority; the dispatcher is checked too when the extension is loaded)."""
    ops = set()
    for f in sorted((root / "csrc" / "cuda").glob("*.cu")):
        text = f.read_text()
        for m in re.finditer(r"TORCH_LIBRARY_IMPL\(\s*saml_C\s*,\s*CUDA\s*,\s*\w+\s*\)\s*\{(.*?)\n\}", text, re.S):
            ops.update(re.findall(r"\.impl\(\s*\"(\w+)\"", m.group(1)))
    try:
        names = torch._C._dispatch_get_all_op_names()
        ops.update(n.split("::", 1)[1] for n in names if n.startswith("saml_C::")
                   and torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA"))
    except Exception:  # noqa: BLE001 - private API; the source scan stands alone
        pass
    return ops


def has_kernel(op: str, device: str) -> bool:
    """Whether saml_C::<op> exists and has a kernel for the device (False for an op the registry no longer has)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"saml_C::{op}", "CUDA" if device == "cuda" else "CPU")
    except RuntimeError:
        return False


def call_by_schema(op: str, values: dict):
    """``torch.ops.saml_C.<op>`` with every schema argument taken from ``values`` by name; defaults may be omitted."""
    fn = getattr(torch.ops.saml_C, op).default
    kwargs = {}
    for a in fn._schema.arguments:
        if a.name in values:
            kwargs[a.name] = values[a.name]
        elif not a.has_default_value():
            raise KeyError(f"saml_C::{op}: the driver has no value for argument {a.name!r} ({a.type}); schema: "
                           f"{fn._schema}")
    return fn(**kwargs)


# ------------------------------------------------------------------------------------------------ embedding inputs

SIZES, AWARE = (5, 3, 7, 2), (1, 0, 1, 1)
D = 13


def seb_inputs(gen, device, dtype, idt, pooling="sum", psw=False, Bb=11):
    """A jagged batch of F=4 features (one not scenario-aware; empty bags) and tables with spare rows."""
    F = len(SIZES)
    fr, fsr = [0], [0]
    for s, a in zip(SIZES, AWARE):
        fr.append(fr[-1] + s)
        fsr.append(fsr[-1] + (s if a else 0))
    L = 3
    lens = (torch.full((F * Bb,), L) if pooling == "none" else torch.randint(0, 5, (F * Bb,), generator=gen))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    feat = torch.repeat_interleave(torch.arange(F * Bb) // Bb, lens)
    ids = (torch.rand(int(offsets[-1]), generator=gen) * torch.tensor(SIZES)[feat]).long()
    return dict(indices=ids.to(idt), offsets=offsets.to(idt), scenario=torch.randint(0, M, (Bb,), generator=gen),
                gw=rand(fr[-1] + 2, D, dtype=dtype, gen=gen), sw=rand(M, fsr[-1] + 2, D, dtype=dtype, gen=gen),
                fr=fr, fsr=fsr, pooling=pooling,
                psw=rand(ids.numel(), dtype=dtype, gen=gen) if psw else None)


# ------------------------------------------------------------------------------------------------ part: direct

def part_direct(run: Run, device: str, backend: str, gen) -> set:
    """Each CUDA-registered op once through torch.ops.saml_C; returns the ops it has a case for."""
    from saml_kernels.ops import embedding_optimizer as eo
    from saml_kernels.ops import scenario_embedding_bag as seb

    dt = torch.float32
    x, w = rand(B, K, dtype=dt, gen=gen), rand(M, K, N, dtype=dt, gen=gen, scale=K ** -0.5)
    b = rand(M, N, dtype=dt, gen=gen)
    aux, aw = rand(B, KA, dtype=dt, gen=gen), rand(M, KA, N, dtype=dt, gen=gen, scale=KA ** -0.5)
    mbl = {k: on(v, device, dt) for k, v in dict(x=x, weight=w, bias=b, aux=aux, aux_weight=aw).items()}
    mbl.update(scenario=on(scenarios(gen, torch.int64, True), device), activation=1,
               dz=on(rand(B, N, dtype=dt, gen=gen), device, dt), need_dx=True, need_dweight=True, need_dbias=True,
               need_daux=True, need_daux_weight=True, temperature=0.7, similarity=0)
    mbl["h"] = on(rand(M, B, N, dtype=dt, gen=gen), device, dt)
    mbl["grad_out"] = on(rand(B, N, dtype=dt, gen=gen), device, dt)

    e = seb_inputs(gen, device, dt, torch.int32, psw=True)
    args = seb.prepare_args(on(e["indices"], device), on(e["offsets"], device), on(e["scenario"], device),
                            on(e["gw"], device, dt), on(e["sw"], device, dt), e["fr"], e["fsr"],
                            per_sample_weights=on(e["psw"], device, dt), backend=backend)
    names = ("indices", "offsets", "scenario", "global_weight", "scenario_weight", "feature_rows",
             "feature_scenario_rows", "aware_slot", "per_sample_weights", "pooling", "bag_len", "num_aware")
    sv = dict(zip(names, args[:len(names)]))
    Bb, Fs = e["scenario"].numel(), sum(AWARE)
    sv.update(check=True, need_psw_grad=True, optimizer=eo.ROWWISE_ADAGRAD, update_global=True, update_scenario=True,
              grad_global=on(rand(Bb, len(SIZES), D, dtype=dt, gen=gen), device, dt),
              grad_scenario=on(rand(Bb, Fs, D, dtype=dt, gen=gen), device, dt),
              hparams=eo.make_hparams(0.05, 1e-8, 0.01, device=device),
              global_weight=sv["global_weight"].clone(), scenario_weight=sv["scenario_weight"].clone(),
              global_state=torch.zeros(sv["global_weight"].shape[0], device=device),
              scenario_state=torch.zeros(sv["scenario_weight"].shape[:2], device=device))
    attn = {}

    def mutual_backward():
        return call_by_schema("mutual_backward", dict(mbl, attn=attn["mutual_forward"]))

    def mutual_linear_backward():
        return call_by_schema("mutual_linear_backward", dict(mbl, attn=attn["mutual_linear_forward"]))

    cases = {
        "mbl_grouped_forward": lambda: call_by_schema("mbl_grouped_forward", mbl),
        "mbl_all_forward": lambda: call_by_schema("mbl_all_forward", mbl),
        "mbl_grouped_backward": lambda: call_by_schema("mbl_grouped_backward", mbl),
        "mbl_grouped_backward_act": lambda: call_by_schema("mbl_grouped_backward_act", dict(
            mbl, dy=mbl["dz"], saved=torch.empty(0, device=device), activation=0)),
        "mutual_forward": lambda: attn.__setitem__("mutual_forward", call_by_schema("mutual_forward", mbl)[1]),
        "mutual_backward": mutual_backward,
        "mutual_linear_forward": lambda: attn.__setitem__("mutual_linear_forward",
                                                          call_by_schema("mutual_linear_forward", mbl)[1]),
        "mutual_linear_backward": mutual_linear_backward,
        "seb_forward": lambda: call_by_schema("seb_forward", sv),
        "seb_backward_rows": lambda: call_by_schema("seb_backward_rows", sv),
        "seb_backward_dense": lambda: call_by_schema("seb_backward_dense", sv),
        "seb_backward_update_": lambda: call_by_schema("seb_backward_update_", sv),
    }
    for op, fn in cases.items():
        if not has_kernel(op, device):
            if op in cuda_registered_ops():
                run.skipped.append(f"direct {op} (no {device.upper()} kernel)")
            continue
        if not run.due(f"direct {op}"):
            continue
        with run.case(f"direct {op}"):
            out = fn()
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
                    raise AssertionError(f"saml_C::{op} returned non-finite values")
    with run.case("direct seb_backward_update_: updated tables and states finite"):
        for k in ("global_weight", "scenario_weight", "global_state", "scenario_state"):
            assert torch.isfinite(sv[k]).all(), f"non-finite {k} after saml_C::seb_backward_update_"
    return set(cases)


# ------------------------------------------------------------------------------------------------ part: api

def _grads(ts):
    return [None if t is None else t.grad for t in ts]


def api_mbranch(run, device, backend, dtype, idt, gen, *, route, grad_mask, act, empty, tag):
    x, w, b = rand(B, K, dtype=dtype, gen=gen), rand(M, K, N, dtype=dtype, gen=gen, scale=K ** -0.5), \
        rand(M, N, dtype=dtype, gen=gen)
    aux, aw = rand(B, KA, dtype=dtype, gen=gen), rand(M, KA, N, dtype=dtype, gen=gen, scale=KA ** -0.5)
    s = scenarios(gen, idt, empty)
    name = f"api mbranch_linear {route}/{grad_mask} {act} {dtype} {idt} {tag}"
    if not run.due(name):
        return
    with run.case(name):
        leaves = [on(t, device, dtype, grad=True) for t in (x, w, b, aux, aw)]
        refs = [t.detach().clone().requires_grad_(True) for t in (x, w, b, aux, aw)]
        y = saml_kernels.mbranch_linear(leaves[0], leaves[1], leaves[2], on(s, device), route=route, activation=act,
                                        grad_mask=grad_mask, aux=leaves[3], aux_weight=leaves[4], backend=backend)
        y0 = saml_kernels.mbranch_linear(refs[0], refs[1], refs[2], s, route=route, activation=act,
                                         grad_mask=grad_mask, aux=refs[3], aux_weight=refs[4], backend="reference")
        g = rand(*y0.shape, dtype=dtype, gen=gen)
        y.backward(on(g, device, dtype))
        y0.backward(g)
        run.compare(name + " y", y, y0, dtype)
        for k, (a, r) in enumerate(zip(_grads(leaves), _grads(refs))):
            run.compare(f"{name} grad[{k}]", a, r, dtype)


def api_mutual(run, device, backend, dtype, idt, gen, *, sim, empty, tag):
    h = rand(M, B, N, dtype=dtype, gen=gen)
    s = scenarios(gen, idt, empty)
    name = f"api mutual_unit {sim} {dtype} {idt} {tag}"
    if not run.due(name):
        return
    with run.case(name):
        hd, hr = on(h, device, dtype, grad=True), h.detach().clone().requires_grad_(True)
        out, attn = saml_kernels.mutual_unit(hd, on(s, device), temperature=0.7, similarity=sim,
                                             return_attention=True, backend=backend)
        out0, attn0 = saml_kernels.mutual_unit(hr, s, temperature=0.7, similarity=sim, return_attention=True,
                                               backend="reference")
        g = rand(B, N, dtype=dtype, gen=gen)
        out.backward(on(g, device, dtype))
        out0.backward(g)
        run.compare(name + " out", out, out0, dtype)
        run.compare(name + " attn", attn, attn0, dtype if dtype != torch.float64 else torch.float32)
        run.compare(name + " dh", hd.grad, hr.grad, dtype)


def api_mutual_linear(run, device, backend, dtype, idt, gen, *, act, sim, saved, empty, tag):
    x, w, b = rand(B, K, dtype=dtype, gen=gen), rand(M, K, N, dtype=dtype, gen=gen, scale=K ** -0.5), \
        rand(M, N, dtype=dtype, gen=gen)
    aux, aw = rand(B, KA, dtype=dtype, gen=gen), rand(M, KA, N, dtype=dtype, gen=gen, scale=KA ** -0.5)
    s = scenarios(gen, idt, empty)
    name = f"api mutual_linear {act} {sim} saved={saved} {dtype} {idt} {tag}"
    if not run.due(name):
        return
    with run.case(name):
        leaves = [on(t, device, dtype, grad=True) for t in (x, w, b, aux, aw)]
        refs = [t.detach().clone().requires_grad_(True) for t in (x, w, b, aux, aw)]
        kw = dict(activation=act, temperature=0.7, similarity=sim, save_branch_outputs=saved)
        y = saml_kernels.mutual_linear(leaves[0], leaves[1], leaves[2], on(s, device), aux=leaves[3],
                                       aux_weight=leaves[4], backend=backend, **kw)
        y0 = saml_kernels.mutual_linear(refs[0], refs[1], refs[2], s, aux=refs[3], aux_weight=refs[4],
                                        backend="reference", **kw)
        g = rand(B, N, dtype=dtype, gen=gen)
        y.backward(on(g, device, dtype))
        y0.backward(g)
        run.compare(name + " y", y, y0, dtype)
        for k, (a, r) in enumerate(zip(_grads(leaves), _grads(refs))):
            run.compare(f"{name} grad[{k}]", a, r, dtype)


def api_embedding(run, device, backend, dtype, idt, gen, *, pooling, psw, sparse):
    e = seb_inputs(gen, device, dtype, idt, pooling=pooling, psw=psw)
    name = f"api scenario_embedding_bag {pooling} psw={psw} sparse={sparse} {dtype} {idt}"
    if not run.due(name):
        return
    with run.case(name):
        gw, sw = on(e["gw"], device, dtype, grad=True), on(e["sw"], device, dtype, grad=True)
        gr, sr = e["gw"].detach().clone().requires_grad_(True), e["sw"].detach().clone().requires_grad_(True)
        pd = None if e["psw"] is None else on(e["psw"], device, dtype, grad=True)
        pr = None if e["psw"] is None else e["psw"].detach().clone().requires_grad_(True)
        out = saml_kernels.scenario_embedding_bag(
            on(e["indices"], device), on(e["offsets"], device), on(e["scenario"], device), gw, sw, e["fr"], e["fsr"],
            pooling=pooling, per_sample_weights=pd, sparse=sparse, backend=backend)
        out0 = saml_kernels.scenario_embedding_bag(e["indices"], e["offsets"], e["scenario"], gr, sr, e["fr"], e["fsr"],
                                                   pooling=pooling, per_sample_weights=pr, backend="reference")
        gs = [rand(*o.shape, dtype=dtype, gen=gen) for o in out0]
        torch.autograd.backward(list(out), [on(g, device, dtype) for g in gs])
        torch.autograd.backward(list(out0), gs)
        for k in range(2):
            run.compare(f"{name} out[{k}]", out[k], out0[k], dtype)
        run.compare(name + " dG", gw.grad, gr.grad, dtype)
        run.compare(name + " dS", sw.grad, sr.grad, dtype)
        if pd is not None:
            run.compare(name + " dpsw", pd.grad, pr.grad, dtype)


def api_fused_update(run, device, backend, dtype, idt, gen, *, optimizer):
    """One forward + backward of nn.ScenarioEmbedding with the fused optimizer (weight decay on): the updated
    tables and Adagrad states against a float64 reference-backend twin."""
    feats = [(f"f{i}", s, bool(a), "sum") for i, (s, a) in enumerate(zip(SIZES, AWARE))]
    kw = dict(optimizer=optimizer, lr=0.05, eps=1e-8, weight_decay=0.01)
    name = f"api ScenarioEmbedding fused {optimizer} {dtype} {idt}"
    if not run.due(name):
        return
    with run.case(name):
        layer = snn.ScenarioEmbedding(feats, M, D, backend=backend, device=device, dtype=dtype, **kw)
        twin = snn.ScenarioEmbedding(feats, M, D, backend="reference", dtype=torch.float64, **kw)
        twin.load_state_dict({k: v.detach().cpu().to(torch.float64) if v.is_floating_point() else v.cpu()
                              for k, v in layer.state_dict().items()})
        e = seb_inputs(gen, device, dtype, idt)
        outs = layer(on(e["indices"], device), on(e["offsets"], device), on(e["scenario"], device))
        outs0 = twin(e["indices"], e["offsets"], e["scenario"])
        gs = [rand(*o.shape, dtype=dtype, gen=gen) for o in outs0]
        torch.autograd.backward(list(outs), [on(g, device, dtype) for g in gs])
        torch.autograd.backward(list(outs0), gs)
        for (k, v), v0 in zip(layer.state_dict().items(), twin.state_dict().values()):
            if v.is_floating_point():
                run.compare(f"{name} {k}", v, v0, dtype if v.dtype == dtype else torch.float32)


def api_partitioned_norm(run, device, backend, dtype, idt, gen):
    x = rand(B, N, dtype=dtype, gen=gen)
    ps = [rand(N, dtype=dtype, gen=gen), rand(N, dtype=dtype, gen=gen), rand(M, N, dtype=dtype, gen=gen),
          rand(M, N, dtype=dtype, gen=gen)]
    s = scenarios(gen, idt, True)
    name = f"api partitioned_norm {dtype} {idt}"
    if not run.due(name):
        return
    with run.case(name):
        leaves = [on(t, device, dtype, grad=True) for t in [x] + ps]
        refs = [t.detach().clone().requires_grad_(True) for t in [x] + ps]
        y = saml_kernels.partitioned_norm(leaves[0], on(s, device), *leaves[1:], backend=backend)
        y0 = saml_kernels.partitioned_norm(refs[0], s, *refs[1:], backend="reference")
        g = rand(B, N, dtype=dtype, gen=gen)
        y.backward(on(g, device, dtype))
        y0.backward(g)
        run.compare(name + " y", y, y0, dtype)
        for k, (a, r) in enumerate(zip(_grads(leaves), _grads(refs))):
            run.compare(f"{name} grad[{k}]", a, r, dtype)


def part_api(run: Run, device: str, backend: str, gen, engines) -> None:
    for eng in engines:
        # every dtype under the default engine; float32 and bfloat16 (the two GEMM code paths) under the others
        dtypes = DTYPES if eng == "auto" else (torch.float32, torch.bfloat16)
        with engine(eng):
            for i, dt in enumerate(dtypes):
                idt = (torch.int32, torch.int64)[i % 2]
                tag = f"engine={eng}"
                act = ACTIVATIONS[i % len(ACTIVATIONS)]
                api_mbranch(run, device, backend, dt, idt, gen, route="own", grad_mask="own", act=act, empty=True,
                            tag=tag)
                for j, gm in enumerate(("own", "params", "none")):
                    api_mbranch(run, device, backend, dt, idt, gen, route="all", grad_mask=gm,
                                act=ACTIVATIONS[(i + j + 1) % len(ACTIVATIONS)], empty=j == 0, tag=tag)
                for sim in ("cosine", "dot"):
                    api_mutual(run, device, backend, dt, idt, gen, sim=sim, empty=sim == "dot", tag=tag)
                for saved in (False, True):
                    api_mutual_linear(run, device, backend, dt, idt, gen, act=ACTIVATIONS[(i + 3 * saved) % 5],
                                      sim="cosine" if saved else "dot", saved=saved, empty=not saved, tag=tag)
    for i, dt in enumerate(DTYPES):
        idt = (torch.int64, torch.int32)[i % 2]
        for pooling, psw, sparse in (("sum", True, False), ("mean", False, True), ("none", False, False)):
            if sparse and dt in (torch.float16, torch.bfloat16):
                sparse = False  # torch's sparse COO sums of 16-bit values on the CPU side are not the point here
            api_embedding(run, device, backend, dt, idt, gen, pooling=pooling, psw=psw, sparse=sparse)
        if dt != torch.float64:
            for opt in ("sgd", "rowwise_adagrad"):
                api_fused_update(run, device, backend, dt, idt, gen, optimizer=opt)
        if dt in (torch.float32, torch.bfloat16):
            api_partitioned_norm(run, device, backend, dt, idt, gen)


# ------------------------------------------------------------------------------------------------ part: graph

def part_graph(run: Run, device: str, backend: str) -> None:
    import numpy as np

    from saml_kernels.data import make_synthetic
    from saml_kernels.training import saml_loss

    data = make_synthetic(400, seed=1)
    cfg = snn.SAMLConfig.from_data(data, aux_hidden=(24, 16), branch_hidden=(24, 16), mutual_layers=(0,))
    torch.manual_seed(0)
    model = snn.SAML(cfg, backend=backend, embedding_optimizer="rowwise_adagrad", device=device)
    opt = snn.TrainingOptimizer(model, capturable=device == "cuda")
    base = data.batch(np.arange(67)).to(device)  # odd batch
    inputs = list(base.inputs()) + [base.label]

    def loss_fn(m, *t):
        main, aux = m(*t[:-1])
        return saml_loss(main, aux, t[-1], cfg.aux_loss_weight)

    name = "graph CapturedTrainingStep SAML rowwise_adagrad" if device == "cuda" else "graph eager SAML step (CPU)"
    if not run.due(name):
        return
    with run.case(name):
        before = model.embedding.global_weight.detach().clone()
        if device == "cuda":
            from saml_kernels.graphs import CapturedTrainingStep

            step = CapturedTrainingStep(model, opt, inputs, loss_fn=loss_fn, warmup=1)
            losses = [step(*inputs) for _ in range(2)]
        else:
            losses = []
            for _ in range(2):
                opt.zero_grad()
                loss = loss_fn(model, *inputs)
                loss.backward()
                opt.step()
                losses.append(loss.detach())
        saml_kernels.raise_errors()
        assert all(bool(torch.isfinite(v)) for v in losses), f"non-finite loss {losses}"
        assert not torch.equal(model.embedding.global_weight.detach(), before), "the fused update changed nothing"


# ------------------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--dry-run", action="store_true", help="= --device cpu (the Python part, no GPU)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    ap.add_argument("--engines", default=",".join(ENGINES), help="SAML_CUDA_GROUPED values of the api part")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop-at", type=float, default=math.inf,
                    help="epoch seconds after which no new case starts (exit status 3 when cases were left out)")
    args = ap.parse_args(argv)
    device = "cpu" if args.dry_run else args.device
    parts = [p for p in args.parts.split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    engines = [e for e in args.engines.split(",") if e]
    if bad or not set(engines) <= set(ENGINES):
        ap.error(f"unknown part or engine in --parts {args.parts!r} / --engines {args.engines!r}")
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize_driver: no CUDA device (use --dry-run on a machine without one)", flush=True)
        return 1
    backend = "cuda" if device == "cuda" else "cpu"
    gen = torch.Generator().manual_seed(args.seed)
    run = Run(device, args.stop_at)
    t0 = time.perf_counter()
    missing = []
    print(f"gpu_sanitize_driver: device {device}, backend {backend}, parts {parts}, engines {engines}", flush=True)
    if "direct" in parts:
        covered = part_direct(run, device, backend, gen)
        missing = sorted(cuda_registered_ops() - covered)
        for op in missing:
            print(f"FAIL coverage: saml_C::{op} is registered for CUDA but the driver has no case for it", flush=True)
    if "api" in parts:
        part_api(run, device, backend, gen, engines if device == "cuda" else ["auto"])
    if "graph" in parts:
        part_graph(run, device, backend)
    for s in run.skipped:
        print(f"skipped: {s}")
    if run.not_run:
        print(f"not run (--stop-at reached): {len(run.not_run)} cases, from {run.not_run[0]!r}")
    status = 2 if missing else (1 if run.failures else (3 if run.not_run else 0))
    verdict = {0: "OK", 1: "FAILED", 2: "FAILED", 3: "PARTIAL (time)"}[status]
    print(f"gpu_sanitize_driver: {run.calls} cases, {len(run.failures)} failed, {len(missing)} ops without a case, "
          f"{len(run.skipped)} skipped, {len(run.not_run)} not run, {time.perf_counter() - t0:.1f} s -> {verdict}",
          flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
