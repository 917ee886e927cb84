"""Benchmark of scenario_embedding_bag.

Problem: B=4096 samples, F=16 features of 100,000 rows each, D=32, M=4 scenarios, every feature scenario-aware;
one-hot bags and bags of 8; uniform and Zipf(1.05) ids; float32. Every lookup reads one global row and one row of
the sample's scenario table.

Providers (timed alternately, see harness.time_alternating; ratios are medians of per-round ratios):
  ours-<backend>     saml_kernels.scenario_embedding_bag (each backend available; the reference only with --all)
  eager-embbag       two F.embedding_bag calls (global table, scenario tables viewed as one [M*Rs, D] table); their
                     outputs are [F, B, D] returned as transposed views, not ours' contiguous [B, F, D]
  eager-embbag+layout (fwd, CPU) the same plus .contiguous(): the same output as ours (a model reading [B, F*D]
                     rows pays this copy)
  eager-emb          two F.embedding calls + sum over the bag (fixed-length bags)
  compile-ref        torch.compile of saml_kernels.reference.scenario_embedding_bag_reference (forward only)
  fbgemm             FBGEMM CPU TBE (fbgemm-gpu-cpu): 16 global tables + 16 scenario tables of M*100k rows
  gather-ceiling     (fwd, CPU) the random-row read ceiling (benchmarks/gather_ceiling.py): the same global and
                     scenario rows (row ids precomputed, outside the timed region) summed per bag into preallocated
                     feature-major outputs by a minimal C++ loop compiled for this CPU, both tables prefetched
                     ahead (best distance kept); nothing else (16-bit and 8-bit rows: their words summed as
                     integers, the same bytes read). "% ceiling" = its time / the provider's.
  index-select       (fwd, CPU) torch.index_select of the same rows into preallocated buffers (a naive ceiling:
                     it is slower than a good gather).
  *-thp              (fwd and fwd+bwd+sgd, CPU) the same provider with its tables on transparent huge pages
                     (saml_kernels.nn.scenario_embedding.huge_page_empty; ScenarioEmbedding(huge_pages=True);
                     FBGEMM's flat weight parameter moved there). Huge pages speed up every provider, so the
                     comparisons are reported both ways: -thp against -thp, plain against plain.
  *-hashed4          (fwd and fwd+bwd+sgd) hashed scenario tables (`scenario_rows=` of the layer):
                     every feature's scenario tables have R/4 rows, id -> hash(id) mod R/4 (ops/scenario_hash.py):
                     ours, eager-embbag (the hash in its index arithmetic), fbgemm (tables of M*R/4 rows, the hash
                     in its index arithmetic), gather-ceiling (the same rows). Only where the hash option exists.
  ours-<backend>-fp32 (fwd+bwd+sgd, 16-bit --dtype) ours' fused step on the float32 tables of the same problem
                     (GB/s at float32 bytes).
  --dtype uint8      the forward on 8-bit row-wise tables (quantize_rows of the float32 tables, [*, D + 8] bytes;
                     saml_kernels.quantized): ours = scenario_embedding_bag_8bit; eager-embbag = two
                     torch.ops.quantized.embedding_bag_byte_rowwise_offsets calls (FBGEMM's 8-bit EmbeddingSpMDM,
                     the 8-bit F.embedding_bag); fbgemm = FBGEMM's inference TBE (IntNBitTableBatchedEmbeddingBags
                     Codegen, INT8 rows with float16 scale / bias, float32 outputs); gather-ceiling on the packed
                     rows; and the same with hashed scenario tables. Bytes: rows of D + 8, float32 outputs.
Modes: fwd (forward), fwd+bwd (sparse gradients), fwd+bwd+sgd (ours: fused optimizer; eager: sparse grads +
torch.optim.SGD.step; fbgemm: its fused EXACT_SGD).
Index arithmetic (feature offsets, scenario * Rs) is inside every provider's timed region: it is part of the op.

Per-phase breakdown (ours, fwd+bwd and fwd+bwd+sgd; JSON "phases_ms"): a torch.profiler pass over a few extra
calls, reading the kernels' profiler scopes: forward (saml_C::seb_forward), sort (seb_backward::sort), reduce
(seb_backward::reduce: per-row gradient sums written out) or reduce_update (seb_backward::reduce_update: the
fused reduction + in-place update, each touched row read and written once).

Effective bytes (compulsory traffic, counted per lookup, not per unique row):
  fwd  = 2 * nnz * D * 4 (global + scenario rows read) + 2 * B * F * D * 4 (outputs written) + nnz * 8 (ids)
  bwd  += 2 * B * F * D * 4 (upstream gradients read) + 2 * nnz * D * 4 (gradient rows written)
  sgd  += 2 * 2 * nnz * D * 4 (rows read and written back)

Tables in another dtype (--dtype bfloat16 | float16; gradients in the same dtype, bytes counted at its size):
FBGEMM's TBE runs with weights and outputs in float16 (it has no bfloat16 CPU kernels, so no fbgemm rows for
bfloat16). The fused step of 16-bit tables runs with the
default stochastic rounding (`ours-<backend>`) and with round-to-nearest (`ours-<backend>-rtn`).

Usage: python benchmarks/bench_embedding.py [--quick] [--gpu] [--reps N] [--threads N] [--no-thp] [--dtype DT|uint8]
Writes benchmarks/results/embedding_<machine>[_<dtype>][_t<threads>].md / .json / .png (harness.result_stem; with
--quick: ..._quick.* in a temporary folder unless --out-dir is given).
"""
from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.nn.functional as Fn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gather_ceiling import make_ceiling  # noqa: E402
from harness import (TimeBudget, machine_info, make_parser, markdown_table, measure_copy_bandwidth,  # noqa: E402
                     result_stem, time_alternating, write_results)

import saml_kernels  # noqa: E402
from saml_kernels import _backend  # noqa: E402
from saml_kernels.ops import embedding_optimizer  # noqa: E402
from saml_kernels.nn.scenario_embedding import huge_page_empty  # noqa: E402
from saml_kernels.ops import scenario_embedding_bag as seb_ops  # noqa: E402
from saml_kernels.ops.scenario_embedding_bag_8bit import (OP as OP_8BIT, quantize_rows,  # noqa: E402
                                                          scenario_embedding_bag_8bit)
from saml_kernels.reference.scenario_embedding_bag import scenario_embedding_bag_reference  # noqa: E402

try:  # hashed scenario tables
    from saml_kernels.ops.scenario_hash import scenario_local
except ImportError:  # a build without them: no -hashed rows
    scenario_local = None

LR = 0.01
HASH_DIV = 4  # hashed rows: every feature's scenario tables get R // HASH_DIV rows (ids hashed onto them)
HASHED = f"-hashed{HASH_DIV}"


def fbgemm_status():
    try:
        import fbgemm_gpu  # noqa: F401
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (  # noqa: F401
            SplitTableBatchedEmbeddingBagsCodegen)
        return True, f"fbgemm-gpu {fbgemm_gpu.__version__}"
    except Exception as exc:  # not installable beside this torch, or no wheel: say so
        return False, f"FBGEMM unavailable ({type(exc).__name__}: {str(exc)[:120]}); install fbgemm-gpu-cpu"


def make_ids(n, rows, dist, gen, device):
    """n ids in [0, rows): uniform, or Zipf(1.05) ranks mapped to rows by a random permutation (hot rows spread)."""
    if dist == "uniform":
        return torch.randint(0, rows, (n,), generator=gen).to(device)
    ranks = torch.arange(1, rows + 1, dtype=torch.float64)
    cdf = torch.cumsum(ranks.pow(-1.05), 0)
    cdf /= cdf[-1].clone()
    r = torch.searchsorted(cdf, torch.rand(n, generator=gen, dtype=torch.float64)).clamp(max=rows - 1)
    return torch.randperm(rows, generator=gen)[r].to(device)


class Problem:
    def __init__(self, B, F, R, D, M, L, dist, device, seed=0, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        self.B, self.F, self.R, self.D, self.M, self.L, self.device = B, F, R, D, M, L, device
        self.dtype, self.esize = dtype, torch.empty((), dtype=dtype).element_size()
        self.nnz = B * F * L
        self.ids = torch.cat([make_ids(B * L, R, dist, g, "cpu") for _ in range(F)]).to(device)
        self.offsets = torch.arange(0, self.nnz + 1, L, device=device)
        self.scenario = torch.randint(0, M, (B,), generator=g).to(device)
        self.fr = [f * R for f in range(F + 1)]
        self.gw = (torch.randn(F * R, D, generator=g) * 0.1).to(device, dtype)
        self.sw = (torch.randn(M, F * R, D, generator=g) * 0.1).to(device, dtype)
        self.gg = torch.randn(B, F, D, generator=g).to(device, dtype)
        self.gs = torch.randn(B, F, D, generator=g).to(device, dtype)
        self.fr_t, self.fsr_t, self.slot, _ = seb_ops.table_layout(self.fr, self.fr, F * R, F * R, device)
        self.base = torch.arange(F, device=device).view(F, 1, 1) * R
        self.row_bytes, self.out_esize = D * self.esize, self.esize  # 8-bit tables: D + 8 bytes, float32 outputs

    def bytes(self, mode, esize=None):
        """Effective bytes of one call (module docstring); esize: another table dtype's element size (-fp32)."""
        e = esize or self.esize
        rb, oe = (self.D * e, e) if esize else (self.row_bytes, self.out_esize)
        b = 2 * self.nnz * rb + 2 * self.B * self.F * self.D * oe + self.nnz * 8
        if mode != "fwd":
            b += 2 * self.B * self.F * self.D * e + 2 * self.nnz * self.D * e
        if mode == "fwd+bwd+sgd":
            b += 4 * self.nnz * self.D * e
        return b

    def hashed(self):
        """Hashed scenario tables: (sw_h [M, F * Rs, D] (the first Rs rows of every feature's scenario tables),
        feature_scenario_rows, Rs) with Rs = R // HASH_DIV; id -> f * Rs + scenario_local(id)."""
        Rs = max(self.R // HASH_DIV, 1)
        sw_h = self.sw.view(self.M, self.F, self.R, self.D)[:, :, :Rs].reshape(self.M, self.F * Rs, self.D)
        return sw_h.contiguous(), [f * Rs for f in range(self.F + 1)], Rs

    # eager index arithmetic: global row = f * R + id; scenario row = s * (F * R) + f * R + id
    def eager_rows(self, Rs=None):
        ids = self.ids.view(self.F, self.B, self.L)
        grow = ids + self.base
        if Rs is None:
            srow = grow + (self.scenario * (self.F * self.R)).view(1, self.B, 1)
        else:  # hashed scenario tables of Rs rows per feature (the hash is part of the index arithmetic)
            local = scenario_local(ids, self.R, Rs)
            srow = local + self.base // self.R * Rs + (self.scenario * (self.F * Rs)).view(1, self.B, 1)
        return grow.reshape(-1), srow.reshape(-1)


def on_huge_pages(t):
    out = huge_page_empty(t.shape, t.dtype)
    out.copy_(t)
    return out


def providers_for(P: Problem, mode: str, backends, with_compile: bool, fb_ok: bool, thp: bool = False,
                  with_ceiling: bool = True):
    """{name: zero-arg callable} for one mode. Parameters are fresh per mode (the updates modify them)."""
    dev, B, F, D, L = P.device, P.B, P.F, P.D, P.L
    train = mode != "fwd"
    provs = {}

    def params():
        gw = P.gw.clone().requires_grad_(train)
        sw = P.sw.clone().requires_grad_(train)
        return gw, sw

    if mode == "fwd" and dev == "cpu":
        grow, srow = P.eager_rows()  # precomputed: the ceiling times the row reads only
        gout, sout = torch.empty(grow.numel(), D, dtype=P.dtype), torch.empty(srow.numel(), D, dtype=P.dtype)
        tables = {"": (P.gw, P.sw)}
        if thp:
            tables["-thp"] = (on_huge_pages(P.gw), on_huge_pages(P.sw))
        for tag, (gw, sw) in tables.items():
            def index_select(gw=gw, swf=sw.view(-1, D)):
                torch.index_select(gw, 0, grow, out=gout)
                torch.index_select(swf, 0, srow, out=sout)
            provs[f"index-select{tag}"] = index_select
            if with_ceiling:
                provs[f"gather-ceiling{tag}"], _ = make_ceiling(gw, sw.view(-1, D), grow, srow, L)
            if not tag:
                continue
            bag_off = torch.arange(0, P.nnz, L, device=dev)
            for be in backends:
                def f(be=be, gw=gw, sw=sw):
                    with torch.no_grad():
                        return saml_kernels.scenario_embedding_bag(P.ids, P.offsets, P.scenario, gw, sw, P.fr, P.fr,
                                                                   backend=be)
                provs[f"ours-{be}{tag}"] = f

            def f(gw=gw, swf=sw.view(-1, D), bag_off=bag_off):
                with torch.no_grad():
                    grow, srow = P.eager_rows()
                    g = Fn.embedding_bag(grow, gw, bag_off, mode="sum")
                    s = Fn.embedding_bag(srow, swf, bag_off, mode="sum")
                    return g.view(F, B, D).transpose(0, 1), s.view(F, B, D).transpose(0, 1)
            provs[f"eager-embbag{tag}"] = f

    for be in backends:
        gw, sw = params()
        if mode == "fwd":
            def f(be=be, gw=gw, sw=sw):
                with torch.no_grad():
                    return saml_kernels.scenario_embedding_bag(P.ids, P.offsets, P.scenario, gw, sw, P.fr, P.fr,
                                                               backend=be)
        elif mode == "fwd+bwd":
            def f(be=be, gw=gw, sw=sw):
                g, s = saml_kernels.scenario_embedding_bag(P.ids, P.offsets, P.scenario, gw, sw, P.fr, P.fr,
                                                           sparse=True, backend=be)
                torch.autograd.backward([g, s], [P.gg, P.gs])
                gw.grad = sw.grad = None
        else:
            hp = embedding_optimizer.make_hparams(LR, 0.0, device=gw.device)

            def fused_step(be, gw, sw, hp=hp):  # the layer's fused path: forward, then the fused update
                def f():
                    saml_kernels.scenario_embedding_bag(P.ids, P.offsets, P.scenario, gw, sw, P.fr, P.fr, backend=be)
                    embedding_optimizer.backward_update(be, P.gg, P.gs, P.ids, P.offsets, P.scenario, gw, sw, P.fr_t,
                                                        P.fsr_t, P.slot, None, 0, 0, None, None, "sgd", hp)
                return f
            f = fused_step(be, gw.detach(), sw.detach())
            if P.dtype in (torch.bfloat16, torch.float16):  # the default stochastic rounding vs round-to-nearest
                gw2, sw2 = params()
                provs[f"ours-{be}-rtn"] = fused_step(be, gw2.detach(), sw2.detach(),
                                                     embedding_optimizer.make_hparams(LR, 0.0, device=gw.device,
                                                                                      stochastic_rounding=False))
            if thp and dev == "cpu":  # ScenarioEmbedding(huge_pages=True)
                provs[f"ours-{be}-thp"] = fused_step(be, on_huge_pages(P.gw), on_huge_pages(P.sw))
        provs[f"ours-{be}"] = f

    # eager formulations
    for kind in ("embbag", "emb"):
        gw, sw = params()
        # a [M*Rs, D] leaf: sparse gradients cannot flow back through a view
        sw = swf = sw.detach().view(-1, D).requires_grad_(train)
        opt = torch.optim.SGD([gw, sw], lr=LR) if mode == "fwd+bwd+sgd" else None
        bag_off = torch.arange(0, P.nnz, L, device=dev)

        def fwd(kind=kind, gw=gw, swf=swf, bag_off=bag_off):
            grow, srow = P.eager_rows()
            if kind == "embbag":
                g = Fn.embedding_bag(grow, gw, bag_off, mode="sum", sparse=train)
                s = Fn.embedding_bag(srow, swf, bag_off, mode="sum", sparse=train)
            else:
                g = Fn.embedding(grow, gw, sparse=train).view(F, B, L, D).sum(2)
                s = Fn.embedding(srow, swf, sparse=train).view(F, B, L, D).sum(2)
            return g.view(F, B, D).transpose(0, 1), s.view(F, B, D).transpose(0, 1)

        if mode == "fwd":
            def f(fwd=fwd):
                with torch.no_grad():
                    return fwd()
        else:
            def f(fwd=fwd, gw=gw, sw=sw, opt=opt):
                g, s = fwd()
                torch.autograd.backward([g, s], [P.gg, P.gs])
                if opt is not None:
                    opt.step()
                gw.grad = sw.grad = None
        provs[f"eager-{kind}"] = f
        if kind == "embbag" and mode == "fwd" and dev == "cpu":
            def f_layout(fwd=fwd):  # delivered in ours' contiguous [B, F, D] layout (what a model reads)
                with torch.no_grad():
                    g, s = fwd()
                    return g.contiguous(), s.contiguous()
            provs["eager-embbag+layout"] = f_layout

    if with_compile and mode == "fwd":
        gw, sw = params()
        cref = torch.compile(scenario_embedding_bag_reference, dynamic=False)

        def f(gw=gw, sw=sw):
            with torch.no_grad():
                return cref(P.ids, P.offsets, P.scenario, gw, sw, P.fr_t, P.fsr_t)
        provs["compile-ref"] = f

    if fb_ok and dev == "cpu":
        provs["fbgemm"] = fbgemm_provider(P, mode)
        if thp and mode == "fwd+bwd+sgd":
            provs["fbgemm-thp"] = fbgemm_provider(P, mode, huge_pages=True)
    return provs


def fused_step(P: Problem, be, gw, sw, hp, fsr=None):
    """The layer's fused path: forward, then the fused SGD update of gw / sw in place (fsr: hashed layout)."""
    fsr = fsr or P.fr
    fr_t, fsr_t, slot, _ = seb_ops.table_layout(P.fr, fsr, gw.shape[0], sw.shape[1], gw.device)

    def f():
        saml_kernels.scenario_embedding_bag(P.ids, P.offsets, P.scenario, gw, sw, P.fr, fsr, backend=be)
        embedding_optimizer.backward_update(be, P.gg, P.gs, P.ids, P.offsets, P.scenario, gw, sw, fr_t, fsr_t, slot,
                                            None, 0, 0, None, None, "sgd", hp)
    return f


def extra_providers(P: Problem, mode: str, backends, fb_ok: bool, with_ceiling: bool):
    """The 16-bit, hashed and 8-bit rows beside providers_for's: hashed scenario tables (`*-hashed4`: ours, two
    F.embedding_bag calls with the hash in their index arithmetic, FBGEMM TBE on the smaller tables, the ceiling
    on the same rows; fwd and fwd+bwd+sgd) and, for 16-bit tables, ours' fused step on float32 tables (`-fp32`)."""
    dev, B, F, D, L = P.device, P.B, P.F, P.D, P.L
    provs = {}
    if mode == "fwd+bwd+sgd" and P.dtype != torch.float32:
        for be in backends:
            provs[f"ours-{be}-fp32"] = fused_step(P, be, P.gw.float(), P.sw.float(),
                                                  embedding_optimizer.make_hparams(LR, 0.0, device=dev))
    if scenario_local is None or mode == "fwd+bwd":
        return provs
    sw_h, fsr_h, Rs = P.hashed()
    train = mode != "fwd"
    for be in backends:
        if mode == "fwd":
            def f(be=be):
                with torch.no_grad():
                    return saml_kernels.scenario_embedding_bag(P.ids, P.offsets, P.scenario, P.gw, sw_h, P.fr, fsr_h,
                                                               backend=be)
            provs[f"ours-{be}{HASHED}"] = f
        else:
            provs[f"ours-{be}{HASHED}"] = fused_step(P, be, P.gw.clone(), sw_h.clone(),
                                                     embedding_optimizer.make_hparams(LR, 0.0, device=dev), fsr_h)
    if mode == "fwd" and dev == "cpu" and with_ceiling:
        grow, srow = P.eager_rows(Rs)
        provs[f"gather-ceiling{HASHED}"], _ = make_ceiling(P.gw, sw_h.view(-1, D), grow, srow, L)
    gw = P.gw.clone().requires_grad_(train)
    swf = sw_h.clone().view(-1, D).requires_grad_(train)
    opt = torch.optim.SGD([gw, swf], lr=LR) if train else None
    bag_off = torch.arange(0, P.nnz, L, device=dev)

    def f():
        with torch.set_grad_enabled(train):
            grow, srow = P.eager_rows(Rs)
            g = Fn.embedding_bag(grow, gw, bag_off, mode="sum", sparse=train)
            s = Fn.embedding_bag(srow, swf, bag_off, mode="sum", sparse=train)
            g, s = g.view(F, B, D).transpose(0, 1), s.view(F, B, D).transpose(0, 1)
        if train:
            torch.autograd.backward([g, s], [P.gg, P.gs])
            opt.step()
            gw.grad = swf.grad = None
    provs[f"eager-embbag{HASHED}"] = f
    if fb_ok and dev == "cpu":
        provs[f"fbgemm{HASHED}"] = fbgemm_provider(P, mode, hashed=(sw_h, Rs))
    return provs


def providers_8bit(P: Problem, backends, fb_ok: bool, with_ceiling: bool):
    """fwd on 8-bit row-wise tables (quantize_rows of the float32 tables: [*, D + 8] uint8): ours
    (scenario_embedding_bag_8bit), two torch.ops.quantized.embedding_bag_byte_rowwise_offsets calls (FBGEMM's
    8-bit EmbeddingSpMDM: the eager 8-bit embedding_bag), FBGEMM's inference TBE (IntNBitTableBatchedEmbeddingBags
    Codegen, INT8 rows, float32 outputs), the ceiling on the packed rows; with hashed scenario tables too."""
    dev, B, F, D, L = P.device, P.B, P.F, P.D, P.L
    gq = quantize_rows(P.gw)
    layouts = {"": (quantize_rows(P.sw), P.fr, None)}
    if scenario_local is not None:
        sw_h, fsr_h, Rs = P.hashed()
        layouts[HASHED] = (quantize_rows(sw_h), fsr_h, Rs)
    bag_off = torch.arange(0, P.nnz + 1, L, device=dev)
    provs = {}
    for tag, (sq, fsr, Rs) in layouts.items():
        flat = sq.view(-1, D + 8)
        if with_ceiling and dev == "cpu":
            grow, srow = P.eager_rows(Rs)
            provs[f"gather-ceiling{tag}"], _ = make_ceiling(gq, flat, grow, srow, L)
        for be in backends:
            def f(be=be, sq=sq, fsr=fsr):
                return scenario_embedding_bag_8bit(P.ids, P.offsets, P.scenario, gq, sq, P.fr, fsr, backend=be)
            provs[f"ours-{be}{tag}"] = f

        def f(flat=flat, Rs=Rs):
            grow, srow = P.eager_rows(Rs)
            q = torch.ops.quantized.embedding_bag_byte_rowwise_offsets
            g = q(gq, grow, bag_off, False, 0, False, None, None, True)
            s = q(flat, srow, bag_off, False, 0, False, None, None, True)
            return g.view(F, B, D).transpose(0, 1), s.view(F, B, D).transpose(0, 1)
        provs[f"eager-embbag{tag}"] = f
        if fb_ok and dev == "cpu":
            provs[f"fbgemm{tag}"] = fbgemm_8bit_provider(P, gq, sq, Rs)
    return provs


def fbgemm_8bit_provider(P: Problem, gq, sq, Rs=None):
    """FBGEMM's inference TBE with INT8 rows (its layout: float16 scale and bias before the D codes), float32
    outputs: 16 global tables + 16 scenario tables of M * Rs rows, holding our codes and scale / bias."""
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen
    F, R, D, M, B = P.F, P.R, P.D, P.M, P.B
    Rs = Rs or R
    specs = [("", R, D, SparseType.INT8, EmbeddingLocation.HOST)] * F + \
            [("", M * Rs, D, SparseType.INT8, EmbeddingLocation.HOST)] * F
    tbe = IntNBitTableBatchedEmbeddingBagsCodegen(specs, device="cpu", output_dtype=SparseType.FP32)
    tbe.fill_random_weights()  # allocates; overwritten with our rows below
    for t, (codes, qparams) in enumerate(tbe.split_embedding_weights()):
        rows = gq[t * R:(t + 1) * R] if t < F else sq[:, (t - F) * Rs:(t - F + 1) * Rs].reshape(M * Rs, D + 8)
        codes.copy_(rows[:, :D])
        sb = rows[:, D:].contiguous().view(torch.float32)
        qparams.copy_(sb.to(torch.float16).view(torch.uint8))
    offsets = torch.arange(0, 2 * P.nnz + 1, P.L)

    def f():
        ids = P.ids.view(F, B * P.L)
        local = ids if Rs == R else scenario_local(ids, R, Rs)
        sids = local + (P.scenario * Rs).repeat_interleave(P.L).view(1, -1)
        return tbe(torch.cat([ids, sids]).reshape(-1), offsets)
    return f


def fbgemm_provider(P: Problem, mode: str, huge_pages: bool = False, hashed=None):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (ComputeDevice,
                                                                        SplitTableBatchedEmbeddingBagsCodegen)
    F, R, D, M, B = P.F, P.R, P.D, P.M, P.B
    sw, Rs = hashed if hashed is not None else (P.sw, R)  # hashed: scenario tables [M, F * Rs, D]
    specs = [(R, D, EmbeddingLocation.HOST, ComputeDevice.CPU)] * F + \
            [(M * Rs, D, EmbeddingLocation.HOST, ComputeDevice.CPU)] * F
    precision = {torch.float32: SparseType.FP32, torch.float16: SparseType.FP16}.get(P.dtype)
    if precision is None:  # FBGEMM's CPU TBE has no bfloat16 kernels (NotImplementedError for 'BFloat16')
        return None
    tbe = SplitTableBatchedEmbeddingBagsCodegen(specs, optimizer=EmbOptimType.EXACT_SGD, learning_rate=LR,
                                                device="cpu", weights_precision=precision, output_dtype=precision)
    with torch.no_grad():  # same initial values as the other providers
        for f, w in enumerate(tbe.split_embedding_weights()):
            if f < F:
                w.copy_(P.gw[f * R:(f + 1) * R])
            else:
                w.view(M, Rs, D).copy_(sw[:, (f - F) * Rs:(f - F + 1) * Rs])
    if huge_pages:  # its flat weight parameter moved onto transparent huge pages (updated in place there)
        tbe.weights_host.data = on_huge_pages(tbe.weights_host.data)
    offsets = torch.arange(0, 2 * P.nnz + 1, P.L)
    grad = torch.cat([P.gg, P.gs], 1).reshape(B, 2 * F * D)

    def fwd():
        ids = P.ids.view(F, B * P.L)
        local = ids if Rs == R else scenario_local(ids, R, Rs)
        sids = local + (P.scenario * Rs).repeat_interleave(P.L).view(1, -1)
        return tbe(torch.cat([ids, sids]).reshape(-1), offsets)

    if mode == "fwd":
        def f():
            with torch.no_grad():
                return fwd()
    elif mode == "fwd+bwd":
        return None  # TBE has no sparse-gradient mode; it fuses the optimizer (see fwd+bwd+sgd)
    else:
        def f():
            fwd().backward(grad)
    return f


PHASES = ("saml_C::seb_forward", "seb_backward::sort", "seb_backward::reduce", "seb_backward::reduce_update")


def phase_breakdown(fn, calls=3):
    """Median-free per-call ms of the kernels' profiler scopes over `calls` calls (after the timed rounds)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    out = {}
    for e in prof.key_averages():
        if e.key in PHASES:
            out[e.key.split("::")[-1]] = e.cpu_time_total / calls / 1e3
    return out


def run(args):
    device = "cuda" if args.gpu else "cpu"
    eight_bit = args.dtype == "uint8"  # 8-bit row-wise tables (quantised from float32 ones), forward only
    dtype = torch.float32 if eight_bit else getattr(torch, args.dtype)
    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu: no CUDA device")
    if args.quick:
        B, F, R, D, M, reps = 256, 4, 5000, 32, 4, 3
    else:
        B, F, R, D, M, reps = 4096, 16, 100_000, 32, 4, args.reps
    backends = [b for b in _backend.available_backends(device, OP_8BIT if eight_bit else seb_ops.OP)
                if b != "reference" or args.all]
    fb_ok, fb_msg = fbgemm_status()
    fb_ok = fb_ok and not args.no_fbgemm and device == "cpu"
    print(f"machine: {machine_info()}\n{fb_msg}", flush=True)
    if device == "cuda":
        ceiling_name, ceiling = "device copy bandwidth", measure_copy_bandwidth(device="cuda")
        print(f"ceiling: {ceiling_name} = {ceiling:.2f} GB/s", flush=True)
    else:
        ceiling_name, ceiling = "gather-ceiling (benchmarks/gather_ceiling.py: random-row reads only, per case)", None
    thp = device == "cpu" and not args.no_thp
    budget = TimeBudget(args.budget_s)
    results, rows_md, groups, phases_md = [], [], {}, []
    for L in ([1] if args.quick else [1, 8]):
        for dist in ("uniform", "zipf"):
            P = Problem(B, F, R, D, M, L, dist, device, dtype=dtype)
            if eight_bit:
                P.row_bytes, P.out_esize = D + 8, 4
            for mode in (("fwd",) if eight_bit else ("fwd", "fwd+bwd", "fwd+bwd+sgd")):
                if not budget.allows(f"{'one-hot' if L == 1 else f'bag{L}'} {dist} {mode}"):
                    continue
                if eight_bit:
                    provs = providers_8bit(P, backends, fb_ok, with_ceiling=not args.quick)
                else:
                    provs = providers_for(P, mode, backends, not args.no_compile, fb_ok,
                                          thp=thp and mode != "fwd+bwd", with_ceiling=not args.quick)
                    provs.update(extra_providers(P, mode, backends, fb_ok, with_ceiling=not args.quick))
                provs = {k: v for k, v in provs.items() if v is not None}
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    r = time_alternating(provs, reps=reps, warmup=2, device=device)
                case = f"{'one-hot' if L == 1 else f'bag{L}'} {dist} {mode}"
                ours = [k for k in provs if k.startswith("ours-") and not k.endswith(("-thp", "-fp32", HASHED))]
                best = min(ours, key=lambda k: r["medians_ms"][k]) if ours else None
                groups[case] = dict(r["medians_ms"])
                phases = {}
                if best is not None and mode != "fwd":
                    phases = phase_breakdown(provs[best])
                    phases_md.append([case, best] + [phases.get(k.split("::")[-1], "") for k in PHASES])
                for name, ms in r["medians_ms"].items():
                    gbs = P.bytes(mode, 4 if name.endswith("-fp32") else None) / (ms / 1e3) / 1e9
                    speed = {p: r["ratios"][(p, name)] for p in provs if p != name}
                    if device == "cuda":
                        pct = 100 * gbs / ceiling
                    else:  # against the row-read ceiling of the same rows on the same kind of pages, fwd only
                        ceil_name = "gather-ceiling" + next((t for t in ("-thp", HASHED) if name.endswith(t)), "")
                        pct = 100 * r["ratios"][(ceil_name, name)] if ceil_name in provs and ceil_name != name else None
                    results.append(dict(case=case, L=L, dist=dist, mode=mode, provider=name, ms=ms, gbs=gbs,
                                        pct_ceiling=pct, speedup_vs=speed,
                                        **({"phases_ms": phases} if name == best and phases else {})))
                    ours_thp = name.startswith("ours-") and name.endswith(("-thp", "-fp32", HASHED))
                    vs = ", ".join(f"{p} {x:.2f}x" for p, x in speed.items()) if name == best or ours_thp else ""
                    rows_md.append([case, name, ms, gbs, "" if pct is None else pct, vs])
                    pct_s = "" if pct is None else f"{pct:5.1f}%"
                    print(f"{case:28s} {name:22s} {ms:9.2f} ms {gbs:7.2f} GB/s {pct_s:6s}  {vs}", flush=True)
                if phases:
                    print(f"{'':28s} phases (ms/call): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
                del provs
    body = [f"Problem: B={B}, F={F} features x {R} rows, D={D}, M={M} scenarios, all aware, {args.dtype} tables, "
            f"{torch.get_num_threads()} threads, {reps} alternating rounds per case (medians; speed-ups are medians "
            f"of per-round ratios t_peer / t_ours, > 1 = ours faster).",
            (f"Ceiling: {ceiling_name} measured in this run: {ceiling:.2f} GB/s. {fb_msg}." if ceiling else
             f"Ceiling: {ceiling_name}; % ceiling = median per-round t_ceiling / t_provider (fwd only; -thp rows "
             f"against the ceiling on huge pages). {fb_msg}."),
            f"Load average at the start: {machine_info()['loadavg_1m']:.2f} (the machine is shared; numbers are noisy).",
            "", markdown_table(["case", "provider", "median ms", "GB/s", "% ceiling", "speed-up of best ours vs"],
                               rows_md)]
    if phases_md:
        body += ["", "Per-phase breakdown of ours (ms per call, torch.profiler scopes of the kernels; reduce = per-row "
                 "gradients written out, reduce_update = fused reduction + in-place update):", "",
                 markdown_table(["case", "provider"] + [k.split("::")[-1] for k in PHASES], phases_md)]
    if budget.skipped:
        body.append(budget.note())
    if args.note:
        body.insert(0, args.note + "\n")
    stem = result_stem("embedding", args, "" if args.dtype == "float32" else args.dtype)
    paths = write_results(stem, "scenario_embedding_bag benchmark", "\n".join(body),
                          dict(results=results, ceiling_gbs=ceiling, ceiling=ceiling_name, fbgemm=fb_msg,
                               shape=dict(B=B, F=F, R=R, D=D, M=M), dtype=args.dtype),
                          plot=dict(groups=groups, ylabel="median ms (lower is better)"), out_dir=args.out_dir)
    print("wrote", ", ".join(paths.values()))
    return results


def parser():
    ap = make_parser(__doc__, reps=11, quick_help="small sizes, 3 rounds (smoke test, to a temporary folder)",
                     gpu_help="run on CUDA; GB/s against the device copy bandwidth")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "uint8"),
                    help="table (and gradient) dtype; results file gets a _<dtype> suffix unless float32; uint8: "
                         "8-bit row-wise tables, forward only")
    ap.add_argument("--all", action="store_true", help="include the reference backend among ours")
    ap.add_argument("--no-fbgemm", action="store_true", help="skip FBGEMM")
    ap.add_argument("--no-thp", action="store_true", help="skip the huge-page (-thp) providers")
    ap.add_argument("--note", default=None, help="a note written at the top of the results file")
    return ap


def main(argv=None):
    run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
