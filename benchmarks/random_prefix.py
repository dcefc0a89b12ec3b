"""A cheaper `--robust`, tried for its wall time: no attack in the loop at all. After the plain erase, the erase runs
on with random prefixes before the concept's captions, drawn afresh at every step, in the space the soft-prompt
attack searches (free token embeddings, around the vocabulary's mean with `--spread` times its spread), until the
plain and the prefixed captions are gone.

    python -m benchmarks.random_prefix                             # every digit, erase seed 0
    python -m benchmarks.random_prefix --digits 6,9 --spread 3 --prefixes 4 -o /tmp/random_prefix.json

Each erase is then audited with the soft prompt at the audit's defaults (judged on the demo), as
benchmarks.descent_ascent does.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from unittest import mock

from benchmarks.descent_ascent import audited_robust_erase, each_run, saved, with_prefixes


def random_prefixes(prefixes: int, spread: float):
    """A replacement for hardening.run with the same signature."""
    import torch

    from fewshot_erase import attacks, unlearning

    def run(parts, targets, settings, before, on_step=lambda step, loss: None,
            on_attack=lambda round_number, concept, step: None):  # no attacks: nothing calls on_attack
        targets = list(targets)
        result = unlearning.run(parts, targets, settings, before, on_step, hold_empty=True)
        trajectory, losses = list(result.trajectory), list(result.losses)
        generator = torch.Generator().manual_seed(settings.seed + 1)

        def zeros(setup, k):  # redrawn before every step
            return {name: torch.zeros(attacks.SOFT_TOKENS, table.shape[1], dtype=table.dtype)
                    for name, table in setup.tables.items()}

        with contextlib.ExitStack() as learned:
            targets, groups = with_prefixes(parts, targets, settings, prefixes, learned, zeros)
            drawn = [(setup, vectors) for setup, _, vectors in groups]

            @torch.no_grad()
            def redraw():
                for setup, vectors in drawn:
                    for name, vector in vectors.items():
                        rows = setup.tables[name][setup.words]
                        vector.copy_(rows.mean(0) + spread * rows.std(0) * torch.randn(vector.shape, generator=generator))

            def with_redraw(step, loss):
                on_step(step, loss)
                redraw()

            redraw()
            result = unlearning.run(parts, targets, settings, before, with_redraw, hold_empty=True)
            trajectory += result.trajectory
            losses += result.losses
        return unlearning.LoopResult(losses, trajectory, result.stopped_early, result.trained, [])

    return run


def measured(word: str, seed: int, prefixes: int, spread: float, output: Path) -> dict:
    from fewshot_erase import hardening

    report, _ = audited_robust_erase(word, seed, output,
                                     mock.patch.object(hardening, "run", random_prefixes(prefixes, spread)))
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
    parser.add_argument("--seeds", default="0", help="erase seeds")
    parser.add_argument("--prefixes", type=int, default=2, help="random prefixes per concept, each redrawn every step")
    parser.add_argument("--spread", type=float, default=1.0, help="times the vocabulary's spread around its mean")
    parser.add_argument("-o", "--output", default="benchmarks/results/random_prefix.json")
    args = parser.parse_args(argv)

    runs = each_run(args.digits, args.seeds, lambda word, seed, folder: measured(
        word, seed, args.prefixes, args.spread, folder))
    summary = {key: sum(r[key] for r in runs) / len(runs)
               for key in ("soft_judged", "soft_recovery", "erase_seconds", "steps")}
    return saved(args, summary, runs)


if __name__ == "__main__":
    main()
