"""`--robust`'s cost against what it withstands, as its budget constants change: rounds, each in-loop attack's Adam
steps, its step size, its starts on each half.

    python -m benchmarks.robust_budget                                  # as it ships: every digit, erase seed 0
    python -m benchmarks.robust_budget --rounds 1 --attack-steps 32 --step-share 0.6 -o /tmp/budget.json

After one untimed erase (the first also pays for the first load), each digit is erased twice from its shipped
pictures, by default and with `--robust` (the constants patched for the erase only), one thread, and the robust
erase is audited with the soft prompt at the audit's defaults (judged on the demo), as benchmarks.descent_ascent
does. Reported: both erases' seconds (the API call) and their ratio, steps, rounds, the soft prompt's recovery and
judged success.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from unittest import mock

from benchmarks.descent_ascent import audited_robust_erase, each_run, saved
from benchmarks.overhead import timed_erase


def constants(args) -> contextlib.ExitStack:
    from fewshot_erase import attacks, hardening

    stack = contextlib.ExitStack()
    for module, name, value in ((hardening, "ROUNDS", args.rounds), (hardening, "ATTACK_STEPS", args.attack_steps),
                                (hardening, "STARTS", args.starts), (attacks, "STEP_SHARE", args.step_share)):
        if value is not None:
            stack.enter_context(mock.patch.object(module, name, value))
    return stack


def measured(word: str, seed: int, args, output: Path) -> dict:
    output.mkdir(parents=True, exist_ok=True)
    default_seconds, default_steps, _ = timed_erase(word, {"seed": seed}, output / "default")
    report, result = audited_robust_erase(word, seed, output / "robust", constants(args))
    rounds = result.record.get("robust_rounds", [])
    return {**report, "default_seconds": default_seconds, "default_steps": default_steps,
            "ratio": report["erase_seconds"] / default_seconds, "rounds": max((r["round"] for r in rounds), default=0)}


def warm_up() -> None:
    """One untimed erase first: the first in a process also pays for imports and the first load from disk."""
    import tempfile

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        timed_erase("zero", {"seed": 0}, Path(folder) / "out")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
    parser.add_argument("--seeds", default="0", help="erase seeds")
    parser.add_argument("--rounds", type=int, help="hardening.ROUNDS (default: as it ships)")
    parser.add_argument("--attack-steps", type=int, help="hardening.ATTACK_STEPS")
    parser.add_argument("--starts", type=int, help="hardening.STARTS")
    parser.add_argument("--step-share", type=float, help="attacks.STEP_SHARE, for the in-loop attacks only")
    parser.add_argument("-o", "--output", default="benchmarks/results/robust_budget.json")
    args = parser.parse_args(argv)

    warm_up()
    runs = each_run(args.digits, args.seeds, lambda word, seed, folder: measured(word, seed, args, folder))
    summary = {key: sum(r[key] for r in runs) / len(runs)
               for key in ("soft_judged", "soft_recovery", "erase_seconds", "default_seconds", "steps", "rounds")}
    summary["ratio_of_means"] = summary["erase_seconds"] / summary["default_seconds"]
    return saved(args, summary, runs)


if __name__ == "__main__":
    main()
