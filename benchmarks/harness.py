"""Shared benchmark harness of saml-kernels.

Usage from a benchmark script in benchmarks/ (the script's own folder is on sys.path when run as
``python benchmarks/bench_x.py``; from elsewhere add it first)::

    import os, sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from harness import make_parser, result_stem, time_alternating, write_results

    ap = make_parser(__doc__)                       # the common flags; add the benchmark's own after it
    args = ap.parse_args(argv)                      # --quick without --out-dir: a fresh temporary folder
    res = time_alternating({"ours": f_ours, "eager": f_eager}, reps=30, warmup=3)
    res["medians_ms"]["ours"], res["ratios"][("eager", "ours")]   # ratio = median over pairs of t_eager / t_ours

What is here and why:
- ``make_parser()``: the flags every benchmark takes (``--quick --gpu --no-compile --budget-s --out-dir --reps
  --threads``; benchmarks/gpu_check.sh passes the first five to every bench_*.py), and what they mean after
  parsing: ``--quick`` without ``--out-dir`` writes to a fresh temporary folder, never into benchmarks/results/.
  ``result_stem()``: the results file name, ``<benchmark>_<machine>[_<config>...][_quick]``.
- ``machine_info()``: CPU model, cores, torch / triton / numpy versions, GPU name: every table names its machine.
- ``measure_gather_ceiling()``: random-row gather bandwidth (rows of a table much larger than the caches, read
  with torch.index_select): the practical ceiling of an embedding lookup on this machine, measured in the same
  run as the benchmark. ``measure_copy_bandwidth()``: device (or host) copy bandwidth, the GPU ceiling.
- ``time_alternating()``: the machine is shared and noisy, so providers are timed in turn (A B C A B C ...), and
  besides each provider's median the *median of the per-round ratios* is reported for every pair; a burst of
  load hits both sides of a ratio. On CUDA the timing uses CUDA events.
- ``peak_memory()``: peak extra memory of one call (CUDA allocator stats, or the process RSS high-water mark).
- ``write_results()``: a markdown table + JSON (+ a matplotlib PNG bar chart) under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import tempfile
import time
from typing import Callable, Dict, Optional

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ------------------------------------------------------------------------------------------------ machine

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """Description of the machine and software versions (put it at the top of every result file)."""
    info = {
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    try:
        import numpy
        info["numpy"] = numpy.__version__
    except ImportError:
        pass
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["gpu"] = None
    return info


def gpu_tag(name: str) -> str:
    """File-name tag of a GPU: its model number lower-cased ('NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA H200' ->
    'h200', 'NVIDIA A100-SXM4-80GB' -> 'a100'); a name without one is kept, made file-name safe."""
    m = re.search(r"\b([A-Z]{1,2}\d{2,4})\b", name.upper())
    if m:
        return m.group(1).lower()
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "gpu"


def machine_tag() -> str:
    """Short file-name tag: 'cpu<cores>' or the GPU's model (:func:`gpu_tag`), e.g. 'cpu2', 'h100', 'h200'."""
    if torch.cuda.is_available():
        return gpu_tag(torch.cuda.get_device_name())
    return f"cpu{os.cpu_count()}"


class TimeBudget:
    """``--budget-s`` of a benchmark: start no new case once one as long as the last would end past ``seconds``
    (counted from construction), so a capped run (benchmarks/gpu_check.sh) still writes what it measured. A case
    lasts from its ``allows()`` to the next one.

        budget = TimeBudget(args.budget_s)       # None: no limit
        for case in cases:
            if not budget.allows(case_name):     # prints why, remembers it in budget.skipped
                continue
            ...
        body += budget.note()
    """

    def __init__(self, seconds: Optional[float]):
        self.seconds = float("inf") if seconds is None else float(seconds)
        self.t0 = time.perf_counter()
        self.last = 0.0
        self._started: Optional[float] = None
        self.skipped: list = []

    def allows(self, what: str) -> bool:
        now = time.perf_counter()
        if self._started is not None:
            self.last = now - self._started
        if now - self.t0 + self.last <= self.seconds:
            self._started = now
            return True
        self._started = None
        self.skipped.append(str(what))
        print(f"time budget ({self.seconds:.0f} s) spent: skipping {what}", flush=True)
        return False

    def note(self) -> str:
        """A line for the results file naming the cases not run ('' when none was skipped)."""
        if not self.skipped:
            return ""
        return (f"\nNot run (time budget --budget-s {self.seconds:.0f} spent): " + "; ".join(self.skipped) + ".\n")


# ------------------------------------------------------------------------------------------------ flags

COMMON_FLAGS = ("quick", "gpu", "no-compile", "budget-s", "out-dir", "reps", "threads")


class BenchParser(argparse.ArgumentParser):
    """The parser :func:`make_parser` returns. ``parse_args`` also resolves what the common flags mean:

    - ``args.out_dir``: ``--out-dir`` if given, else a fresh temporary folder with ``--quick`` (a smoke run never
      writes into the tree), else :data:`RESULTS_DIR`;
    - ``--threads N``: ``torch.set_num_threads(N)``; ``args.config_tags`` is ``["t<N>"]`` when N differs from the
      benchmark's default thread count (the results file name says the configuration, see :func:`result_stem`).
    """

    threads_default: Optional[int] = None

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        ns.config_tags = []
        if getattr(ns, "out_dir", "absent") is None:
            if getattr(ns, "quick", False):
                ns.out_dir = tempfile.mkdtemp(prefix="saml_bench_quick_")
                print(f"--quick: results go to {ns.out_dir} (pass --out-dir to choose)", flush=True)
            else:
                ns.out_dir = RESULTS_DIR
        threads = getattr(ns, "threads", None)
        if threads is not None:
            if threads < 1:
                self.error(f"--threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
            if threads != self.threads_default:
                ns.config_tags.append(f"t{threads}")
        return ns


def make_parser(description: str, *, reps: Optional[int] = None, threads: Optional[int] = None,
                flags=COMMON_FLAGS, quick_help: str = "smoke run: small sizes, few rounds, no torch.compile "
                "(results go to a temporary folder unless --out-dir is given)",
                gpu_help: str = "run on CUDA") -> BenchParser:
    """The argument parser shared by the benchmarks, with the common ``flags`` (a subset of :data:`COMMON_FLAGS`):

    ``--quick`` smoke run; ``--gpu`` CUDA; ``--no-compile`` no torch.compile providers; ``--budget-s S`` start no
    new case past S seconds (:class:`TimeBudget`); ``--out-dir DIR`` (alias ``--results-dir``) where the results
    go; ``--reps N`` alternating rounds (default ``reps``; None = the benchmark's own choice); ``--threads N``
    torch threads (default ``threads``; None = torch's choice). The benchmark adds its own flags to the parser it
    gets; ``parse_args`` resolves ``out_dir`` and ``threads`` (:class:`BenchParser`).
    """
    unknown = set(flags) - set(COMMON_FLAGS)
    if unknown:
        raise ValueError(f"make_parser: unknown common flags {sorted(unknown)}; known: {COMMON_FLAGS}")
    p = BenchParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.threads_default = threads
    g = p.add_argument_group("common benchmark flags (benchmarks/harness.py make_parser)")
    if "quick" in flags:
        g.add_argument("--quick", action="store_true", help=quick_help)
    if "gpu" in flags:
        g.add_argument("--gpu", action="store_true", help=gpu_help)
    if "no-compile" in flags:
        g.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    if "budget-s" in flags:
        g.add_argument("--budget-s", type=float, default=None, metavar="S",
                       help="start no new case past S seconds; the results file names the cases not run")
    if "out-dir" in flags:
        g.add_argument("--out-dir", "--results-dir", dest="out_dir", default=None, metavar="DIR",
                       help="where the results go (default benchmarks/results; with --quick a temporary folder)")
    if "reps" in flags:
        g.add_argument("--reps", type=int, default=reps, metavar="N",
                       help="alternating rounds per case" + (f" (default {reps})" if reps else ""))
    if "threads" in flags:
        g.add_argument("--threads", type=int, default=threads, metavar="N",
                       help="torch.set_num_threads(N) (default " + (str(threads) if threads else "torch's choice")
                       + "); another count than the default adds _t<N> to the results file name")
    return p


def result_stem(benchmark: str, args: argparse.Namespace, *config: str) -> str:
    """The results file stem ``<benchmark>_<machine>[_<config>...][_t<threads>][_quick]``: one current file per
    benchmark, machine and configuration (``config``: the benchmark's own tags, e.g. a dtype; empty ones are
    dropped)."""
    tags = [machine_tag(), *[c for c in config if c], *getattr(args, "config_tags", [])]
    if getattr(args, "quick", False):
        tags.append("quick")
    return "_".join([benchmark, *tags])


# ------------------------------------------------------------------------------------------------ timing

def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def _time_once(fn: Callable, device: str) -> float:
    """Seconds of one call (CUDA events on GPU, perf_counter on CPU)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_alternating(providers: Dict[str, Callable], reps: int = 20, warmup: int = 3, device: str = "cpu",
                     min_time_s: float = 0.0) -> dict:
    """Times the providers alternately (one call of each per round, order rotated every round).

    Returns ``{"medians_ms": {name: ms}, "times_ms": {name: [ms...]}, "ratios": {(a, b): median_k t_a[k] / t_b[k]}}``.
    A ratio > 1 means ``b`` is faster than ``a``. Rounds continue past ``reps`` until ``min_time_s`` elapsed.
    """
    names = list(providers)
    for _ in range(warmup):
        for n in names:
            providers[n]()
    _sync(device)
    times = {n: [] for n in names}
    t_start = time.perf_counter()
    k = 0
    while k < reps or time.perf_counter() - t_start < min_time_s:
        order = names[k % len(names):] + names[:k % len(names)]  # rotate: nobody always runs first
        for n in order:
            times[n].append(_time_once(providers[n], device) * 1e3)
        k += 1
    ratios = {}
    for a in names:
        for b in names:
            if a != b:
                ratios[(a, b)] = statistics.median(x / y for x, y in zip(times[a], times[b]))
    return {"medians_ms": {n: statistics.median(v) for n, v in times.items()}, "times_ms": times, "ratios": ratios}


def peak_memory(fn: Callable, device: str = "cpu") -> Optional[int]:
    """Peak extra bytes of one call of ``fn``: CUDA allocator peak, or on CPU the growth of the process's
    max RSS (a high-water mark: only growth beyond the previous peak shows, so call it before other work)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


# ------------------------------------------------------------------------------------------------ ceilings

def measure_gather_ceiling(rows: int = 4_000_000, dim: int = 32, n: int = 262_144, reps: int = 7,
                           device: str = "cpu", dtype=torch.float32) -> float:
    """Random-row gather bandwidth in GB/s (bytes of rows read + written), rows of ``dim`` ``dtype``.

    The table (rows x dim, 512 MB at the defaults) is much larger than the caches, the ids are uniform, and the
    gather is ``torch.index_select`` into a preallocated output: what one lookup stream achieves here.
    """
    table = torch.randn(rows, dim, device=device, dtype=dtype)
    ids = torch.randint(0, rows, (n,), device=device)
    out = torch.empty(n, dim, device=device, dtype=dtype)
    fn = lambda: torch.index_select(table, 0, ids, out=out)  # noqa: E731
    for _ in range(2):
        fn()
    _sync(device)
    ts = [_time_once(fn, device) for _ in range(reps)]
    nbytes = 2 * n * dim * table.element_size()
    del table
    return nbytes / statistics.median(ts) / 1e9


def measure_copy_bandwidth(nbytes: int = 1 << 30, reps: int = 10, device: str = "cuda") -> float:
    """Copy bandwidth in GB/s (read + write) of a ``nbytes`` buffer: the device's streaming ceiling."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    fn = lambda: b.copy_(a)  # noqa: E731
    fn()
    _sync(device)
    ts = [_time_once(fn, device) for _ in range(reps)]
    return 2 * nbytes / statistics.median(ts) / 1e9


# ------------------------------------------------------------------------------------------------ output

def markdown_table(header: list, rows: list) -> str:
    """A GitHub markdown table from a header and rows of cells (floats are printed with 2-3 significant digits)."""
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
        return str(x)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_results(stem: str, title: str, markdown_body: str, data: dict, plot: Optional[dict] = None,
                  out_dir: str = RESULTS_DIR) -> dict:
    """Writes ``<stem>.md`` (title, machine, body), ``<stem>.json`` (machine + data) and, when ``plot`` is given
    as ``{"groups": {group: {provider: value}}, "ylabel": str}``, a grouped bar chart ``<stem>.png``.
    Returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    mach = machine_info()
    paths = {"md": os.path.join(out_dir, stem + ".md"), "json": os.path.join(out_dir, stem + ".json")}
    with open(paths["md"], "w") as f:
        f.write(f"# {title}\n\nMachine: " + ", ".join(f"{k}={v}" for k, v in mach.items()) + "\n\n")
        f.write(markdown_body.rstrip() + "\n")
    with open(paths["json"], "w") as f:
        json.dump({"title": title, "machine": mach, "data": data}, f, indent=1, default=str)
    if plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return paths
        groups = plot["groups"]
        provs = sorted({p for g in groups.values() for p in g})
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(1, len(provs)) / 2), 4))
        width = 0.8 / max(1, len(provs))
        for j, p in enumerate(provs):
            xs = [i + j * width for i in range(len(groups))]
            ax.bar(xs, [groups[g].get(p, 0) for g in groups], width, label=p)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
        ax.set_xticklabels(list(groups), rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(plot.get("ylabel", ""))
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths["png"] = os.path.join(out_dir, stem + ".png")
        fig.savefig(paths["png"], dpi=110)
        plt.close(fig)
    return paths
