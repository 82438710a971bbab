"""Runs a script's `test_*` functions in order, reports each, and exits non-zero if any failed."""
import sys
import time


def run_tests(namespace):
    tests = [v for k, v in list(namespace.items()) if k.startswith("test_") and callable(v)]
    failed = 0
    for t in tests:
        start = time.time()
        try:
            t()
            print(f"ok     {t.__name__} ({time.time() - start:.1f}s)", flush=True)
        except Exception as e:  # report every failure, then fail
            failed += 1
            print(f"FAILED {t.__name__}: {type(e).__name__}: {e}", flush=True)
    sys.exit(1 if failed else 0)
