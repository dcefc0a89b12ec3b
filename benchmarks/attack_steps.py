"""How many Adam steps `--robust`'s in-loop soft prompts need: its first round, fitted with each budget.

    python -m benchmarks.attack_steps                  # every digit, erase seeds 0 and 1, budgets 16-64
    python -m benchmarks.attack_steps --digits 4 --seeds 0 --budgets 32,64 -o /tmp/steps.json

Each erase runs `erase --robust` with one round (hardening.ROUNDS = 1) and the round's attacks fitted for each
budget in turn. An attack's fit with a smaller budget is the start of the fit with a larger one (the same noise,
the same Adam steps), so the first round is exactly what `--robust` would have found with that budget. Reported:
how many of the round's attacks, and of the erases, reach hardening.HOLDS, and the seconds the round's fit took.
No judging: docs/audit.md says what the audit then finds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from demo.measure import SAMPLES


def first_round(word: str, seed: int, budget: int, output: Path) -> dict:
    """The first round's shares, and the seconds its fit took, for one budget."""
    from fewshot_erase import attacks, hardening
    from fewshot_erase.api import erase_concepts
    from fewshot_erase.concepts import ConceptSpec

    fitting, fit = [], attacks.soft_attacks

    def timed(*args, **kwargs):
        started = time.perf_counter()
        found = fit(*args, **kwargs)
        fitting.append(time.perf_counter() - started)
        return found

    saved = hardening.ROUNDS, hardening.ATTACK_STEPS, attacks.soft_attacks
    hardening.ROUNDS, hardening.ATTACK_STEPS, attacks.soft_attacks = 1, budget, timed
    try:
        result = erase_concepts([ConceptSpec(word, (str(SAMPLES / word),))], output, device="cpu", robust=True,
                                seed=seed, overwrite=True)
    finally:
        hardening.ROUNDS, hardening.ATTACK_STEPS, attacks.soft_attacks = saved
    return {"recovered": [r["recovered"] for r in result.record["robust_rounds"]], "fit_seconds": fitting[0]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
    parser.add_argument("--seeds", default="0,1", help="erase seeds")
    parser.add_argument("--budgets", default="16,32,48,64", help="Adam steps of each in-loop attack")
    parser.add_argument("-o", "--output", default="benchmarks/results/attack_steps.json")
    args = parser.parse_args(argv)

    import warnings

    import torch

    from demo.data import DIGIT_WORDS
    from fewshot_erase import hardening
    from fewshot_erase.errors import EraseWarning

    torch.set_num_threads(1)
    warnings.simplefilter("ignore", EraseWarning)  # "no --model given: the demo"
    budgets = [int(b) for b in args.budgets.split(",")]
    runs = []
    with tempfile.TemporaryDirectory() as workdir:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for digit in [int(d) for d in args.digits.split(",")]:
                word = DIGIT_WORDS[digit]
                run = {"digit": digit, "seed": seed,
                       **{str(b): first_round(word, seed, b, Path(workdir) / "out") for b in budgets}}
                runs.append(run)
                print(json.dumps(run), flush=True)
    summary = {str(b): {"attacks_holding": sum(s >= hardening.HOLDS for r in runs for s in r[str(b)]["recovered"]),
                        "erases_with_one_holding": sum(max(r[str(b)]["recovered"]) >= hardening.HOLDS for r in runs),
                        "fit_seconds_mean": sum(r[str(b)]["fit_seconds"] for r in runs) / len(runs)}
               for b in budgets}
    report = {"holds": hardening.HOLDS, "attacks_per_round": 2 * hardening.STARTS, "erases": len(runs),
              "summary": summary, "runs": runs}
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    for budget, figures in summary.items():
        print(f"{budget:>3} steps: {figures['attacks_holding']} attacks hold, in {figures['erases_with_one_holding']} "
              f"of {len(runs)} erases; the fit {figures['fit_seconds_mean']:.1f} s")
    return report


if __name__ == "__main__":
    main()
