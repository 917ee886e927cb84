"""Calls every CUDA op of csrc/cuda once through the emulation, at small odd sizes (float32 and float16, the
types every build variant has), so that every ``__global__`` kernel runs: the coverage test and the sanitizer
runs use it.

Command line (a sanitizer run, in a subprocess with the sanitizer runtime preloaded, see build.sanitizer_env):
    python tests/cuda_emu/drive.py VARIANT all|<emu_selftest case>
prints "DRIVE OK" when every call returned.
"""
from __future__ import annotations

import os
import sys

import torch


def run_all(ops) -> None:
    g = torch.Generator().manual_seed(23)

    def rn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    # ---- scenario_embedding_bag: forward, rows / dense backward, fused SGD and row-wise Adagrad (hot row)
    fr, fsr, slot = torch.tensor([0, 11, 50]), torch.tensor([0, 11, 11]), torch.tensor([0, -1])
    B, M = 5, 3
    lens = torch.tensor([2, 0, 40, 1, 3, 1, 2, 0, 3, 1])
    off = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    idx = torch.cat([torch.randint(0, 11 if i < B else 39, (int(n),), generator=g) for i, n in enumerate(lens)])
    idx[2:42] = 4  # a hot row: 40 entries > kPiece
    scen = torch.tensor([0, 1, 0, 1, 1])
    for dt, D, it in ((torch.float32, 7, torch.int32), (torch.float16, 16, torch.int64)):
        gw, sw = rn(50, D, dtype=dt), rn(M, 11, D, dtype=dt)
        psw = rn(idx.numel(), dtype=dt)
        a = (idx.to(it), off.to(it), scen, gw, sw, fr, fsr, slot, psw, 0, 0)
        ops.seb_forward(*a, True, 1)
        gg, gs = rn(B, 2, D, dtype=dt), rn(B, 1, D, dtype=dt)
        ops.seb_backward_rows(gg, gs, *a, True)
        ops.seb_backward_dense(gg, gs, *a, True)
        # [lr, eps, weight_decay, apply, stochastic_rounding, seed, step] (ops/embedding_optimizer.make_hparams)
        hp = torch.tensor([0.1, 1e-3, 0.01, 1.0, 1.0, 5.0, 1.0], dtype=torch.float64)
        ops.seb_backward_update_(gg, gs, *a, None, None, 1, hp, True, True)
        ops.seb_backward_update_(gg, gs, *a, torch.rand(50), torch.rand(M * 11), 2, hp, True, True)
    # ---- mbranch_linear: tiled grouped / dense GEMMs (SIMT float32, WMMA float16), weight gradients, cuBLAS path
    B, M, K, N, Ka = 37, 3, 20, 19, 5
    s = torch.randint(0, M - 1, (B,), generator=g)
    for dt in (torch.float32, torch.float16):
        x, w, b = rn(B, K, dtype=dt), rn(M, K, N, dtype=dt), rn(M, N, dtype=dt)
        aux, wa = rn(B, Ka, dtype=dt), rn(M, Ka, N, dtype=dt)
        ops.mbl_grouped_forward(x, w, b, aux, wa, s, 3)
        ops.mbl_all_forward(x, w, b, aux, wa, 2)
        ops.mbl_grouped_backward(rn(B, N, dtype=dt), x, w, aux, wa, s, True, True, True, True, True)
    # the weight gradient's two-level row split (wgrad_reduce_kernel): few (K, N) tiles and > 256 rows a scenario
    Bw = 600
    sw_ = torch.randint(0, 2, (Bw,), generator=g)
    xw, ww = rn(Bw, 8), rn(2, 8, 8)
    dzw = rn(Bw, 8)
    _, dww, dbw, _, _ = ops.mbl_grouped_backward(dzw, xw, ww, None, None, sw_, True, True, True, False, False)
    ref = torch.stack([xw[sw_ == m].double().T @ dzw[sw_ == m].double() for m in range(2)])
    assert torch.allclose(dww.double(), ref, rtol=1e-5, atol=1e-4), "wgrad row split: dW differs from float64"
    assert torch.allclose(dbw.double(), torch.stack([dzw[sw_ == m].double().sum(0) for m in range(2)]),
                          rtol=1e-5, atol=1e-4), "wgrad row split: db differs from float64"
    os.environ["SAML_CUDA_GROUPED"] = "cublas"
    try:
        ops.mbl_grouped_forward(x.float(), w.float(), b.float(), None, None, s, 1)
    finally:
        del os.environ["SAML_CUDA_GROUPED"]
    # ---- mutual unit / mutual_linear (row kernels; float16 mutual_linear through the tiled GEMM)
    h = rn(M, B, N)
    out, attn = ops.mutual_forward(h, s, 0.7, 0)
    ops.mutual_backward(rn(B, N), h, s, attn, 0.7, 0)
    xh, wh, bh = rn(B, K, dtype=torch.float16), rn(M, K, N, dtype=torch.float16), rn(M, N, dtype=torch.float16)
    out, attn = ops.mutual_linear_forward(xh, wh, bh, None, None, s, 4, 1.3, 1)
    ops.mutual_linear_backward(rn(B, N, dtype=torch.float16), xh, wh, bh, None, None, s, attn, 4, 1.3, 1)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from build import library

    variant, case = sys.argv[1], sys.argv[2]
    torch.ops.load_library(str(library(variant)))
    ops = torch.ops.saml_C_emu
    if case == "all":
        run_all(ops)
    else:
        print(ops.emu_selftest(case, torch.arange(32, dtype=torch.float32)).tolist())
    print("DRIVE OK", flush=True)
