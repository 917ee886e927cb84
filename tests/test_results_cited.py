"""(Source scan.) Every benchmark results file cited anywhere in the tree exists in benchmarks/results/: README,
docs, code comments and docstrings (``_backend.PREFERENCE`` among them), Makefile, scripts and the results files
themselves. A results file is named ``<benchmark>_<machine>[_<config>...].{md,json,png}`` (benchmarks/harness.py
``result_stem``); a name with a placeholder (``<machine>``, ``*``, ``...``) is a pattern, not a citation.
Not scanned: tests/ (their fixtures write stub results such as ``stub_h100.md``) and CHANGELOG.md (history may
name files since removed)."""
import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# <stem>_<machine>[_<config>...].<ext>, machine = cpu<cores> or a GPU model tag (harness.gpu_tag)
CITATION = re.compile(r"(?<![\w<>*.-])(?:benchmarks/results/)?"
                      r"([a-z][a-z0-9]*(?:_[a-z0-9]+)*_(?:cpu\d+|[a-z]\d{2,4})(?:_[a-z0-9]+)*\.(?:md|json|png))\b")
SKIP_DIRS = ("tests/",)
SKIP_FILES = ("CHANGELOG.md",)
BINARY = (".png", ".json", ".so", ".pt2", ".parquet", ".brotli", ".gz", ".zip")


def _tracked_text_files():
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout (a source tarball): every file under the root
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]
    else:
        names = out.stdout.split()
    for name in names:
        if name.startswith(SKIP_DIRS) or name in SKIP_FILES or name.endswith(BINARY):
            continue
        try:
            yield name, (ROOT / name).read_text()
        except (UnicodeDecodeError, OSError):
            continue


def test_the_pattern_finds_citations():
    found = [m.group(1) for m in CITATION.finditer(
        "see benchmarks/results/embedding_cpu2_bfloat16.md and `bench_mutual_cpu2_t1.json`, scaling_h100_m.png; "
        "not embedding_<machine>.md, scaling_cpu2_*.png or ..._quick.md")]
    assert found == ["embedding_cpu2_bfloat16.md", "bench_mutual_cpu2_t1.json", "scaling_h100_m.png"], found


def test_every_cited_results_file_exists():
    present = {p.name for p in RESULTS.iterdir()}
    missing = sorted({f"{name}: {m.group(1)}" for name, text in _tracked_text_files()
                      for m in CITATION.finditer(text) if m.group(1) not in present})
    assert not missing, "results files cited but not in benchmarks/results/:\n  " + "\n  ".join(missing)
