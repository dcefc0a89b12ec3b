"""A cheaper `--robust`, tried for its wall time: soft prompts learned alongside the erase instead of rounds of fresh
attacks (simultaneous descent-ascent, AdvUnlearn's inner attack reduced to one warm-started step per erase step).

    python -m benchmarks.descent_ascent                        # every digit, erase seed 0, every variant
    python -m benchmarks.descent_ascent --digits 4,9 --variants until-gone -o /tmp/da.json

After the plain erase (as `--robust` runs it, the empty caption held), `--prefixes` soft prompts (each started near
the vocabulary's mean, as the audit's) join the concept's captions, and every erase step is followed by one Adam step
of every prefix on all the concept's pictures, descending the denoising loss the erase ascends. Variants:

- `until-gone`: the erase runs on until the stopping rule finds the plain and the prefixed captions gone (the worse
  of them, as `--robust` checks), at most its usual cap;
- `fixed`: `--fixed` such steps, then the plain erase again until its own captions are gone;
- `free-until-gone`, `free-fixed`: the same, each prefix stepped on the gradient the erase step's own backward
  left it (the rows whose drawn caption holds it), with no UNet call of its own;
- `shipped`: `--robust` as it is (hardening.run), measured the same way, for comparison.

Each erase is then audited with the soft prompt at the audit's defaults (judged on the demo), the way
`benchmarks.efficacy --audit` audits `--robust`. Reported per digit: steps, prefix steps, erase seconds (the API
call, one thread) beside a default erase's of the same digit, the soft prompt's recovery and judged success, the
plain captions' judged success.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import tempfile
import time
from pathlib import Path
from unittest import mock

from benchmarks.overhead import timed_erase
from demo.measure import SAMPLES

VARIANTS = ("until-gone", "fixed", "free-until-gone", "free-fixed", "shipped")


def descent_ascent(prefixes: int, fixed: int | None, counted: dict, free: bool = False, batch: int | None = None,
                   warm: tuple[int, float] | None = None):
    """A replacement for hardening.run with the same signature: the plain erase, then prefixes learned alongside
    (`free`: from the erase steps' own gradients, no UNet call of their own), `batch` pictures a step (None: as the
    plain erase); `warm` (steps, step share): the concept's prefixes first fitted together for that many steps, each
    on one half of the pictures, as --robust's in-loop attacks are."""
    import torch

    from fewshot_erase import attacks, unlearning
    from fewshot_erase.audit import split
    from fewshot_erase.denoising import training_scheduler

    def run(parts, targets, settings, before, on_step=lambda step, loss: None,
            on_attack=lambda round_number, concept, step: None):  # no rounds of attacks: nothing calls on_attack
        targets = list(targets)
        result = unlearning.run(parts, targets, settings, before, on_step, hold_empty=True)
        trajectory, losses = list(result.trajectory), list(result.losses)
        scheduler = training_scheduler(parts.pipeline)

        def started(setup, k):
            start = torch.Generator().manual_seed(settings.seed + 1 + k)
            return {name: attacks.near_mean(table[setup.words], attacks.SOFT_TOKENS, start).requires_grad_(True)
                    for name, table in setup.tables.items()}

        def warmed(setup, k):
            if k == 0:  # every prefix of the concept fitted at once, prefix k on half k % 2 (the audit's first)
                for name in parts.family.encoders:
                    parts.text_encoder(name).requires_grad_(False)  # the next erase run takes them up again
                halves = split(len(setup.fit_latents))
                setups = [dataclasses.replace(setup, fit_latents=setup.fit_latents[halves[j % 2]],
                                              seed=settings.seed + 1 + j) for j in range(prefixes)]
                with mock.patch.object(attacks, "STEP_SHARE", warm[1]):
                    fits[:] = attacks.soft_attacks(setups, warm[0])
                counted["warm_steps"] = counted.get("warm_steps", 0) + warm[0]
            return {name: vector.clone().requires_grad_(True) for name, vector in fits[k].vectors.items()}

        fits: list = []
        with contextlib.ExitStack() as learned:
            targets, groups = with_prefixes(parts, targets, settings, prefixes, learned, warmed if warm else started)
            learnable = [v for _, _, vectors in groups for v in vectors.values()]
            # each encoder's vectors at its own step size, as attacks.fit_embeddings sets them
            optimizer = torch.optim.Adam([{"params": [vector], "lr": attacks.step_size(setup.tables[name])}
                                          for setup, _, vectors in groups for name, vector in vectors.items()])
            fitted, captions = attacks.fitted_together([(setup, captions) for setup, captions, _ in groups])
            noise = torch.Generator().manual_seed(settings.seed + 99)

            def with_prefix_step(step, loss):
                on_step(step, loss)
                if free:  # the erase step's own backward left the gradient of its ascent objective, -loss
                    if all(vector.grad is None for vector in learnable):
                        return
                    for vector in learnable:
                        vector.grad = None if vector.grad is None else -vector.grad
                else:
                    rows = attacks.fitting_rows(fitted.fit_latents, scheduler, noise)
                    # autograd.grad, not backward: the encoder's weights step inside backward (stepping_in_backward)
                    gradients = torch.autograd.grad(fitted.loss(captions, rows), learnable)
                    for vector, gradient in zip(learnable, gradients):
                        vector.grad = gradient
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                counted["prefix_steps"] = counted.get("prefix_steps", 0) + 1

            phase = settings.replace(until=None, steps=fixed) if fixed else settings
            phase = phase.replace(batch_size=batch) if batch else phase
            result = unlearning.run(parts, targets, phase, before, with_prefix_step, hold_empty=True)
            trajectory += result.trajectory
            losses += result.losses
            if fixed:
                plain = [dataclasses.replace(t, hardened=()) for t in targets]
                result = unlearning.run(parts, plain, settings, before, on_step, hold_empty=True)
                trajectory += result.trajectory
                losses += result.losses
            for vector in learnable:
                vector.requires_grad_(False)
        return unlearning.LoopResult(losses, trajectory, result.stopped_early, result.trained, [])

    return run


def with_prefixes(parts, targets, settings, prefixes: int, learned: contextlib.ExitStack, vectors_for):
    """Each concept's captions (anchored ones aside) behind `prefixes` prefixes of placeholder words, whose embeddings
    are `vectors_for(setup, k)` while `learned` is open: the targets with those captions among the erased ones, and per
    prefix (its setup, its captions, its vectors)."""
    from fewshot_erase import attacks
    from fewshot_erase.denoising import training_scheduler

    scheduler = training_scheduler(parts.pipeline)
    targets, groups, taken = list(targets), [], ()
    for i, target in enumerate(targets):
        if target.anchor:
            continue
        setup = attacks.Setup(parts.pipeline, parts.family, settings.resolution or parts.resolution, parts.dtype,
                              target.concept, target.templates, target.latents[:target.image_count], scheduler,
                              settings.seed, (), settings.max_sequence_length)
        for k in range(prefixes):
            placeholders, text = attacks.placeholder_tokens(dataclasses.replace(setup, reserved=taken),
                                                            attacks.SOFT_TOKENS)
            taken += placeholders
            vectors = vectors_for(setup, k)
            learned.enter_context(attacks.learned_tokens(parts.pipeline, parts.family, placeholders, vectors))
            groups.append((setup, setup.captions(setup.concept, text), vectors))
            targets[i] = dataclasses.replace(targets[i], hardened=targets[i].hardened + tuple(
                f"{text} {template}" for template in target.templates))
    return targets, groups


def audited_robust_erase(word: str, seed: int, output: Path, patched=contextlib.nullcontext()) -> tuple[dict, object]:
    """`erase --robust` of the digit's shipped pictures (with `patched` in force), then audited with the soft prompt
    at the audit's defaults (judged): what a variant is measured by, and the erase's result."""
    from fewshot_erase.api import erase_concepts
    from fewshot_erase.concepts import ConceptSpec

    audit = importlib.import_module("fewshot_erase.audit").audit  # the package exports the function by that name
    started = time.perf_counter()
    with patched:
        result = erase_concepts([ConceptSpec(word, (str(SAMPLES / word),))], output, device="cpu", seed=seed,
                                robust=True)
    seconds = time.perf_counter() - started
    record = audit(output, attacks=["soft"]).record
    soft = record["attacks"]["soft"]
    return {"digit": word, "seed": seed, "steps": result.record["steps"], "erase_seconds": seconds,
            "soft_recovery": soft["recovery"], "soft_judged": soft["judged_success"],
            "plain_judged": record["erased_captions"]["judged_success"]}, result


def measured(word: str, seed: int, variant: str, prefixes: int, fixed: int, output: Path, batch: int | None = None,
             warm: tuple[int, float] | None = None) -> dict:
    from fewshot_erase import hardening

    counted: dict = {}
    replacement = descent_ascent(prefixes, fixed if variant.endswith("fixed") else None, counted,
                                 variant.startswith("free"), batch, warm)
    patched = mock.patch.object(hardening, "run", replacement) if variant != "shipped" else contextlib.nullcontext()
    output.mkdir(parents=True, exist_ok=True)
    default_seconds, _, _ = timed_erase(word, {"seed": seed}, output / "default")
    report, _ = audited_robust_erase(word, seed, output / "robust", patched)
    return {**report, "variant": variant, "prefix_steps": counted.get("prefix_steps", 0),
            "default_seconds": default_seconds}


def saved(args, summary: dict, runs: list[dict]) -> dict:
    """The report, written to `args.output` with the settings it was taken with; the summary printed."""
    report = {"settings": vars(args), "summary": summary, "runs": runs}
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return report


def each_run(digits: str, seeds: str, measure) -> list[dict]:
    """`measure(word, seed, folder)` for every erase seed and digit, one thread, each printed as it comes."""
    import warnings

    import torch

    from demo.data import DIGIT_WORDS
    from fewshot_erase.errors import EraseWarning

    torch.set_num_threads(1)
    warnings.simplefilter("ignore", EraseWarning)
    runs = []
    with tempfile.TemporaryDirectory() as workdir:
        for seed in [int(s) for s in seeds.split(",")]:
            for digit in [int(d) for d in digits.split(",")]:
                runs.append(measure(DIGIT_WORDS[digit], seed, Path(workdir) / f"{digit}-{seed}"))
                print(json.dumps(runs[-1]), flush=True)
    return runs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
    parser.add_argument("--seeds", default="0", help="erase seeds")
    parser.add_argument("--variants", default="until-gone,fixed,shipped")
    parser.add_argument("--prefixes", type=int, default=2, help="soft prompts learned alongside, per concept")
    parser.add_argument("--fixed", type=int, default=32, help="the fixed variant's steps with prefixes")
    parser.add_argument("--batch", type=int, help="pictures a step while the prefixes learn (default: as the erase)")
    parser.add_argument("--warm-steps", type=int, help="the prefixes first fitted for this many steps, each on one half")
    parser.add_argument("--warm-share", type=float, default=1.0,
                        help="attacks.STEP_SHARE for that fit (as shipped: 0.3)")
    parser.add_argument("-o", "--output", default="benchmarks/results/descent_ascent.json")
    args = parser.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")

    from benchmarks.robust_budget import warm_up

    warm_up()
    warm = (args.warm_steps, args.warm_share) if args.warm_steps else None
    runs = [run for variant in args.variants.split(",")
            for run in each_run(args.digits, args.seeds,
                                lambda word, seed, folder: measured(word, seed, variant, args.prefixes, args.fixed,
                                                                    folder, args.batch, warm))]
    summary = {variant: {"soft_judged_mean": sum(r["soft_judged"] for r in rows) / len(rows),
                         "erase_seconds_mean": sum(r["erase_seconds"] for r in rows) / len(rows),
                         "steps_mean": sum(r["steps"] for r in rows) / len(rows)}
               for variant in args.variants.split(",") if (rows := [r for r in runs if r["variant"] == variant])}
    return saved(args, summary, runs)


if __name__ == "__main__":
    main()
