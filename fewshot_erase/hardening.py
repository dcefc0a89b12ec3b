"""`erase --robust`: the erase hardened against the audit's soft-prompt attack, inside the text encoder's
feed-forward weights only (adversarial training in the manner of AdvUnlearn, Zhang et al. 2024).

After the plain erase (unlearning.run), each round attacks the patched encoder as the audit does: free token
embeddings before the concept's captions, fitted on half of its pictures to bring it back and scored on the other
half by the audit's recovery (audit.Scoring, against the original encoder's losses, taken before the erase). Each
round fits fresh attacks, STARTS on each half, all in the same steps. Every attack that brings back HOLDS or more of
the concept lends its learned prefix to the concept's captions (placeholder words, whose embeddings are the learned
vectors for the rest of the run), and the erase runs again, from where it stands, until those captions and the plain
ones are gone. The run ends when every attack of a round fails, or after ROUNDS rounds. Throughout, the empty caption
is held in the retain term: guidance draws away from it, and moved away from the concept it let an attack that
denoised no better than it draw the concept. How the constants were chosen: docs/audit.md.
"""

from __future__ import annotations

import contextlib
import dataclasses

from . import attacks, unlearning
from .audit import SCORE_REPEATS, SCORE_SEED, Scoring, recovery, split
from .denoising import training_scheduler

ROUNDS = 4
ATTACK_STEPS = 64  # each attack's Adam steps: the audit's default budget
STARTS = 2  # attacks fitted on each half in a round, from different starts: one alone missed what the audit found
HOLDS = 0.1  # an attack bringing back less than this share has failed: stricter than the audit's 0.25, for the attacks not tried


@dataclasses.dataclass
class Half:
    """One way of splitting a concept's pictures, as the audit does: the attack fits on some and is scored on the
    others, against the original encoder's losses there."""

    name: str
    scoring: Scoring
    references: dict[str, float]


def halves(parts, target, settings) -> list[Half]:
    """The audit's split and its mirror image (one picture: fitted and scored on itself), with the losses of the
    encoder as it is now: taken before the erase."""
    count = target.image_count
    fitted, held = split(count) if count > 1 else ([0], [0])
    ways = [("even", fitted, held), ("odd", held, fitted)] if count > 1 else [("all", fitted, held)]
    scheduler = training_scheduler(parts.pipeline)
    made = []
    for name, fit, scored in ways:
        setup = attacks.Setup(parts.pipeline, parts.family, settings.resolution, parts.dtype, target.concept,
                              target.templates, target.latents[fit], scheduler, settings.seed, (),
                              settings.max_sequence_length)
        scoring = Scoring(setup, setup, attacks.fixed_rows(target.latents[scored], SCORE_REPEATS, scheduler, SCORE_SEED))
        made.append(Half(name, scoring, scoring.references()))
    return made


def attack(parts, ways: list[Half], seed: int, reserved: tuple[int, ...],
           on_step=lambda step: None) -> list[tuple[Half, object, float]]:
    """STARTS fresh soft prompts fitted on each half's pictures against the patched encoder (its weights held still:
    the next erase run takes them up again), each with the share of the concept it brings back on the other half."""
    for name in parts.family.encoders:
        parts.text_encoder(name).requires_grad_(False)
    tried = [half for half in ways for _ in range(STARTS)]
    setups = [dataclasses.replace(half.scoring.patched, seed=seed + k, reserved=reserved) for k, half in enumerate(tried)]
    found = attacks.soft_attacks(setups, ATTACK_STEPS, on_step)
    def brought_back(half: Half, f) -> float:  # None: the original captions never helped there, nothing to bring back
        attacked = half.scoring.loss(half.scoring.patched, f.captions, f)
        return recovery(half.references["empty"], half.references["original"], attacked) or 0.0

    return [(half, f, brought_back(half, f)) for f, half in zip(found, tried)]


def prefixed(parts, target, found) -> tuple[str, ...]:
    """The target's templates behind the attack's placeholder words, as the attack captioned the pictures."""
    words = parts.pipeline.tokenizer.decode(list(found.placeholders)).strip()
    return tuple(f"{words} {template}" for template in target.templates)


def run(parts, targets, settings, before, on_step=lambda step, loss: None,
        on_attack=lambda round_number, concept, step: None) -> unlearning.LoopResult:
    """The plain erase, then rounds of attack and erase until every attack of a round fails. `on_attack` after each
    step of a round's attacks, which take no erase step."""
    targets = list(targets)  # the caller's stay as they were: the report after the run reads their plain captions
    splits = {i: halves(parts, t, settings) for i, t in enumerate(targets) if not t.anchor}
    result = unlearning.run(parts, targets, settings, before, on_step, hold_empty=True)
    trajectory, losses = list(result.trajectory), list(result.losses)
    rounds, reserved = [], ()
    with contextlib.ExitStack() as learned:
        for round_index in range(ROUNDS):
            hardened = False
            for i, ways in splits.items():
                fitted = attack(parts, ways, settings.seed + 1 + 2 * STARTS * round_index, reserved,
                                lambda step: on_attack(round_index + 1, targets[i].concept, step + 1))
                for half, found, share in fitted:
                    rounds.append({"round": round_index + 1, "concept": targets[i].concept, "fitted": half.name,
                                   "recovered": share})
                    if share < HOLDS:
                        continue
                    hardened = True
                    reserved += found.placeholders
                    learned.enter_context(found.active(parts.pipeline, parts.family))
                    targets[i] = dataclasses.replace(targets[i], hardened=targets[i].hardened + prefixed(parts, targets[i], found))
            if not hardened:
                break
            result = unlearning.run(parts, targets, settings, before, on_step, hold_empty=True)
            trajectory += result.trajectory
            losses += result.losses
    return unlearning.LoopResult(losses, trajectory, result.stopped_early, result.trained, rounds)
