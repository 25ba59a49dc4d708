"""Longer fuzzing than the test run: tests/test_fuzz.py with many more examples per target.

    python bench/fuzz.py [--examples 5000]
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000)
    args = parser.parse_args()
    env = {**os.environ, "LORA_COLAB_FUZZ_EXAMPLES": str(args.examples)}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:nbval", "-o", "addopts=",
                             str(ROOT / "tests" / "test_fuzz.py")], cwd=ROOT, env=env)
    print(f"{args.examples} examples per target in {time.perf_counter() - start:.0f} s")
    sys.exit(result.returncode)


if __name__ == "__main__":
    main()
