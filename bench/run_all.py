"""`make bench`: run every benchmark's main() in turn and print its figures.

    python bench/run_all.py [name ...]     e.g. python bench/run_all.py eval

Benchmarks measure; they never fail a build on a slow figure (a main() that
returns non-zero, e.g. for a missed target, is reported as such). A missing
benchmark is reported and skipped; one that raises is reported, the others
still run, and the exit code is 1.
"""
import importlib
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from utils.cli import quiet_tensorflow, run_main  # noqa: E402
from utils.errors import UserError  # noqa: E402

ORDER = ("bench_model", "bench_producer", "bench_eval", "bench_feed")  # known ones first, then any other bench_*.py


def discover():
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(f[:-3] for f in os.listdir(here) if f.startswith("bench_") and f.endswith(".py"))
    return list(ORDER) + [name for name in found if name not in ORDER]


def run_one(name):
    """Run bench/<name>.py's main([]); returns 'ok', 'missing', 'failed' or 'main returned N'."""
    if not os.path.isfile(os.path.join(ROOT, "bench", f"{name}.py")):
        print(f"(skipped: bench/{name}.py does not exist yet)", flush=True)
        return "missing"
    start = time.perf_counter()
    try:
        module = importlib.import_module(f"bench.{name}")
        code = module.main([])
    except UserError as e:
        print(f"error: {e}", flush=True)
        return "failed"
    except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others' figures
        traceback.print_exc()
        return "failed"
    print(f"({name} took {time.perf_counter() - start:.0f} s)", flush=True)
    return "ok" if code in (None, 0) else f"main returned {code}"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    names = [n if n.startswith("bench_") else f"bench_{n}" for n in argv] or discover()
    quiet_tensorflow()
    status = {}
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        status[name] = run_one(name)
    print("\n" + "  ".join(f"{name}: {s}" for name, s in status.items()))
    return 1 if "failed" in status.values() else 0


if __name__ == "__main__":
    run_main(main)
