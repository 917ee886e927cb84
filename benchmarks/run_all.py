"""``make bench``: runs every benchmarks/bench_*.py in its own process, passing the command line through (the
common flags of harness.make_parser: --quick --gpu --no-compile --budget-s --out-dir --reps --threads).
``--quick`` without ``--out-dir``: every benchmark writes into one fresh temporary folder, named at the start."""
import pathlib
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import make_parser  # noqa: E402


def main(argv):
    known, _ = make_parser(__doc__.split("\n")[0]).parse_known_args(argv)
    argv = list(argv)
    if known.quick and known.out_dir is None:
        argv += ["--out-dir", tempfile.mkdtemp(prefix="saml_bench_quick_")]
        print(f"--quick: results go to {argv[-1]}", flush=True)
    failed = []
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"\n=== {script.name} {' '.join(argv)}", flush=True)
        rc = subprocess.call([sys.executable, str(script), *argv], cwd=HERE.parent)
        if rc:
            failed.append(f"{script.name} (exit {rc})")
    if failed:
        print("\nFAILED: " + ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
