"""Where `--robust`'s time goes, and what one step of its in-loop attacks costs against one step of the erase.

    python -m benchmarks.robust_profile                      # six, nine and seven at erase seed 0
    python -m benchmarks.robust_profile --digits 7 -o /tmp/profile.json

After one untimed erase (the first also pays for the first load), each digit is erased by default and then with
`--robust`, one thread, and the robust erase's phases are timed: the halves' references (the original encoder's
losses, taken before the erase), each erase run (and its steps), each round's attacks. Then the last digit's first
round of attacks is fitted again, alone, with fewer of its attacks and fewer noise draws a picture
(attacks.FIT_REPEATS), to read a step's cost by the rows it sends through the UNet.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from unittest import mock

from benchmarks.descent_ascent import each_run, saved
from benchmarks.overhead import timed_erase
from benchmarks.robust_budget import warm_up

FIT_STEPS = 16  # timed steps of each fit, after two untimed ones


def phases(word: str, seed: int, output: Path, fitted: dict) -> dict:
    """Both erases' seconds and the robust one's phases; the first round's attack setups go into `fitted`."""
    from fewshot_erase import attacks, hardening, unlearning

    output.mkdir(parents=True, exist_ok=True)
    spent: dict[str, list] = {"halves_s": [], "erase_s": [], "erase_steps": [], "attacks_s": []}

    def timed(key, function):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            result = function(*args, **kwargs)
            spent[key].append(time.perf_counter() - started)
            if key == "erase_s":
                spent["erase_steps"].append(len(result.trajectory))
            return result
        return wrapper

    def first_setups(setups, budget, *args, **kwargs):
        fitted.setdefault("setups", setups)
        return fit(setups, budget, *args, **kwargs)

    fit = attacks.soft_attacks
    default_seconds, default_steps, _ = timed_erase(word, {"seed": seed}, output / "default")
    fitted.clear()
    with mock.patch.object(hardening, "halves", timed("halves_s", hardening.halves)), \
         mock.patch.object(hardening, "attack", timed("attacks_s", hardening.attack)), \
         mock.patch.object(unlearning, "run", timed("erase_s", unlearning.run)), \
         mock.patch.object(attacks, "soft_attacks", first_setups):
        robust_seconds, steps, rounds = timed_erase(word, {"seed": seed, "robust": True}, output / "robust")
    return {"digit": word, "seed": seed, "default_s": default_seconds, "default_steps": default_steps,
            "robust_s": robust_seconds, "steps": steps, "rounds": rounds, **spent}


def step_costs(setups) -> list[dict]:
    """Seconds a fitting step, by how many of the round's attacks are fitted together and FIT_REPEATS."""
    from fewshot_erase import attacks

    costs = []
    for repeats in (2, 1):
        for count in range(1, len(setups) + 1):
            with mock.patch.object(attacks, "FIT_REPEATS", repeats):
                attacks.soft_attacks(setups[:count], 2)
                started = time.perf_counter()
                attacks.soft_attacks(setups[:count], FIT_STEPS)
                seconds = (time.perf_counter() - started) / FIT_STEPS
            rows = repeats * sum(len(setup.fit_latents) for setup in setups[:count])
            costs.append({"attacks": count, "fit_repeats": repeats, "rows": rows, "seconds_a_step": seconds})
            print(costs[-1], flush=True)
    return costs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", default="6,9,7")
    parser.add_argument("--seeds", default="0", help="erase seeds")
    parser.add_argument("-o", "--output", default="benchmarks/results/robust_profile.json")
    args = parser.parse_args(argv)

    warm_up()
    fitted: dict = {}
    runs = each_run(args.digits, args.seeds, lambda word, seed, folder: phases(word, seed, folder, fitted))
    costs = step_costs(fitted["setups"])
    summary = {"erase_s_a_step": sum(sum(r["erase_s"]) for r in runs) / sum(sum(r["erase_steps"]) for r in runs),
               "attacks_s_a_round": sum(sum(r["attacks_s"]) for r in runs) / sum(len(r["attacks_s"]) for r in runs),
               "fit_step_costs": costs}
    return saved(args, summary, runs)


if __name__ == "__main__":
    main()
