"""Long fuzzing of the readers that take bytes from anywhere: the image loader, the safetensors header check and the
pickle checkpoint reader, with the properties of tests/test_fuzz.py, many more examples and fresh random inputs.

    python -m benchmarks.fuzz                       # rounds of 20x the CI examples for up to 30 minutes
    python -m benchmarks.fuzz --scale 5 --minutes 10 -k safetensors

Each round is one pytest run of tests/test_fuzz.py under a new seed; the first failure stops the run and prints
hypothesis's smallest failing input and the command that replays it. Needs the test extra (hypothesis).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def round_command(seed: int, pattern: str | None) -> list[str]:
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider", f"--hypothesis-seed={seed}",
               str(REPO / "tests" / "test_fuzz.py")]
    return command + (["-k", pattern] if pattern else [])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=20, help="examples per property, as a multiple of CI's (default 20)")
    parser.add_argument("--minutes", type=float, default=30, help="stop starting new rounds after this long (default 30)")
    parser.add_argument("--rounds", type=int, default=0, help="stop after this many rounds (default: until --minutes)")
    parser.add_argument("-k", dest="pattern", help="only the properties whose test name matches (pytest -k)")
    args = parser.parse_args(argv)

    env = {**os.environ, "FEWSHOT_ERASE_FUZZ_SCALE": str(args.scale), "FEWSHOT_ERASE_FUZZ_RANDOM": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    started, round_number = time.monotonic(), 0
    while time.monotonic() - started < args.minutes * 60 and (not args.rounds or round_number < args.rounds):
        round_number += 1
        seed = random.SystemRandom().randrange(2**32)
        command = round_command(seed, args.pattern)
        print(f"round {round_number}: seed {seed}, scale {args.scale}", flush=True)
        if subprocess.run(command, cwd=REPO, env=env).returncode != 0:
            replay = f"FEWSHOT_ERASE_FUZZ_SCALE={args.scale} FEWSHOT_ERASE_FUZZ_RANDOM=1 {' '.join(command)}"
            print(f"failure in round {round_number}; replay it with:\n  {replay}", flush=True)
            return 1
    print(f"{round_number} rounds, no failure, {(time.monotonic() - started) / 60:.1f} minutes", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
