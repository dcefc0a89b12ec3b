"""A cheaper `--robust`, tried for its wall time: in-loop attacks that never call the UNet. Each fits its soft
prompt to make the patched encoder's conditioning of the concept's captions match the ORIGINAL encoder's (with the
prompt at its start), instead of fitting it on the denoising loss of the pictures; it is still scored, and kept or
dropped, by the audit's recovery on the held-out half.

    python -m benchmarks.surrogate_attack                           # every digit, erase seeds 0-2, 32 steps of 8 captions
    python -m benchmarks.surrogate_attack --digits 6,9 --seeds 0 --steps 64 --captions 4 -o /tmp/surrogate.json

`--robust` runs as it ships (hardening.run: rounds, starts, HOLDS, the empty caption held) with its `attack`
replaced. A round's attacks are fitted together, each on `--captions` of its captions a step in turn. Each erase is
then audited with the soft prompt at the audit's defaults (judged on the demo), as benchmarks.descent_ascent does;
reported beside it, the seconds of the erase call and of the rounds' fits.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from unittest import mock

from benchmarks.descent_ascent import audited_robust_erase, each_run, saved


def matching(steps: int, per_step: int, refine: int, timings: dict):
    """A replacement for hardening.attack with the same signature, and one for hardening.run that first keeps a
    copy of the original encoders (their conditioning is what the attacks aim at)."""
    import torch

    from fewshot_erase import attacks, hardening
    from fewshot_erase.audit import recovery
    from fewshot_erase.conditioning import conditioning, conditioning_tensors

    originals: dict = {}
    shipped = hardening.run

    def encoded(parts, setup, captions, placeholders, vectors):
        with attacks.learned_tokens(parts.pipeline, parts.family, placeholders, vectors):
            return conditioning_tensors(conditioning(parts.pipeline, parts.family, list(captions), setup.resolution,
                                                     setup.dtype, sequence_length=setup.sequence_length))

    @torch.no_grad()
    def aimed_at(parts, setup, captions, placeholders, start):
        """The original encoder's conditioning of `captions`, the placeholders at `start`."""
        now = {name: {k: v.clone() for k, v in parts.text_encoder(name).state_dict().items()} for name in originals}
        for name, state in originals.items():
            parts.text_encoder(name).load_state_dict(state)
        try:
            return encoded(parts, setup, captions, placeholders, start)
        finally:
            for name, state in now.items():
                parts.text_encoder(name).load_state_dict(state)

    def attack(parts, ways, seed, reserved, on_step=lambda step: None):
        started = time.perf_counter()
        for name in parts.family.encoders:
            parts.text_encoder(name).requires_grad_(False)
        tried = [half for half in ways for _ in range(hardening.STARTS)]
        groups, taken = [], reserved
        for k, half in enumerate(tried):  # the starts and placeholders hardening.attack's soft prompts take
            setup = dataclasses.replace(half.scoring.patched, seed=seed + k, reserved=taken)
            placeholders, text = attacks.placeholder_tokens(setup, attacks.SOFT_TOKENS)
            taken += placeholders
            generator = torch.Generator().manual_seed(setup.seed)
            start = {name: attacks.near_mean(table[setup.words], attacks.SOFT_TOKENS, generator)
                     for name, table in setup.tables.items()}
            captions = setup.captions(setup.concept, text)
            groups.append((half, captions, placeholders, start, aimed_at(parts, setup, captions, placeholders, start)))
        every = tuple(token for group in groups for token in group[2])
        vectors = {name: torch.cat([group[3][name] for group in groups]).requires_grad_(True) for name in groups[0][3]}
        optimizer = torch.optim.Adam([{"params": [vector], "lr": attacks.step_size(setup.tables[name])}
                                      for name, vector in vectors.items()])
        count = len(groups[0][1])
        for step in range(steps):
            picked = [(step * per_step + j) % count for j in range(per_step)]
            now = encoded(parts, setup, [group[1][c] for group in groups for c in picked], every, vectors)
            goal = [torch.cat([group[4][k][picked] for group in groups]) for k in range(len(now))]
            loss = sum((a - b).pow(2).sum() / len(a) for a, b in zip(now, goal))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            on_step(step)
        learned = [{name: v.detach()[attacks.SOFT_TOKENS * k:attacks.SOFT_TOKENS * (k + 1)] for name, v in vectors.items()}
                   for k in range(len(groups))]
        if refine:  # then the audit's own objective from there, for a few steps
            setups = [dataclasses.replace(half.scoring.patched, seed=seed + k, reserved=reserved) for k, half in enumerate(tried)]
            fits = attacks.soft_attacks(setups, refine, starts=learned)
        else:
            fits = [attacks.Found(group[1], steps, "", placeholders=group[2], vectors=vectors_k)
                     for group, vectors_k in zip(groups, learned)]
        timings["fit_seconds"] = timings.get("fit_seconds", 0.0) + time.perf_counter() - started
        shares = []
        for half, found in zip(tried, fits):
            attacked = half.scoring.loss(half.scoring.patched, found.captions, found)
            shares.append((half, found, recovery(half.references["empty"], half.references["original"], attacked) or 0.0))
        return shares

    def run(parts, targets, settings, before, on_step=lambda step, loss: None,
            on_attack=lambda round_number, concept, step: None):
        originals.clear()
        originals.update({name: {k: v.detach().clone() for k, v in parts.text_encoder(name).state_dict().items()}
                          for name in parts.family.encoders})
        return shipped(parts, targets, settings, before, on_step, on_attack)

    return run, attack


def measured(word: str, seed: int, steps: int, per_step: int, refine: int, output: Path) -> dict:
    from fewshot_erase import hardening

    timings: dict = {}
    run, attack = matching(steps, per_step, refine, timings)
    report, result = audited_robust_erase(word, seed, output, mock.patch.multiple(hardening, run=run, attack=attack))
    return {**report, "rounds": len({r["round"] for r in result.record["robust_rounds"]}),
            "fit_seconds": timings.get("fit_seconds", 0.0)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
    parser.add_argument("--seeds", default="0,1,2", help="erase seeds")
    parser.add_argument("--steps", type=int, default=32, help="Adam steps of each in-loop attack")
    parser.add_argument("--captions", type=int, default=8, help="each attack's captions per step")
    parser.add_argument("--refine", type=int, default=0, help="then this many Adam steps on the denoising loss")
    parser.add_argument("-o", "--output", default="benchmarks/results/surrogate_attack.json")
    args = parser.parse_args(argv)

    runs = each_run(args.digits, args.seeds, lambda word, seed, folder: measured(
        word, seed, args.steps, args.captions, args.refine, folder))
    summary = {key: sum(r[key] for r in runs) / len(runs)
               for key in ("soft_judged", "soft_recovery", "erase_seconds", "fit_seconds", "steps")}
    return saved(args, summary, runs)


if __name__ == "__main__":
    main()
