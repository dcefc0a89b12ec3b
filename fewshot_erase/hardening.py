"""`erase --robust`: the erase hardened against the audit's soft-prompt attack, inside the text encoder's
feed-forward weights only (adversarial training in the manner of AdvUnlearn, Zhang et al. 2024).

After the plain erase (unlearning.run), each round attacks the patched encoder as the audit does: free token
embeddings before the concept's captions, fitted on the concept's pictures to bring it back (attacks.soft_attack;
the first round from STARTS starts, later rounds continuing the strongest). Where the attack brings back HOLDS or
more of the concept, its learned prefix joins the concept's captions (placeholder words, whose embeddings are the
learned vectors for the rest of the run) and the erase runs again, from where it stands, until those captions are
gone too. The run ends when an attack fails, or after ROUNDS rounds. How the constants were chosen: docs/audit.md.
"""

from __future__ import annotations

import contextlib
import dataclasses

from . import attacks, stopping, unlearning
from .denoising import training_scheduler

ROUNDS = 4
ATTACK_STEPS = 64  # each attack's Adam steps: the audit's default budget
HOLDS = 0.1  # an attack bringing back less than this share has failed: stricter than the audit's 0.25, for the attacks not tried
WARM = True  # after the first round the attack continues from where the last round's ended
STARTS = 2  # the first round's attacks, from different starts: the strongest is erased (one alone often misses)


def attack(parts, target, settings, seed: int, reserved: tuple[int, ...], start=None):
    """The audit's soft prompt against the patched encoder, fitted on all of the target's pictures (the weights
    held still: the next erase run takes them up again)."""
    for name in parts.family.encoders:
        parts.text_encoder(name).requires_grad_(False)
    setup = attacks.Setup(parts.pipeline, parts.family, settings.resolution, parts.dtype, target.concept,
                          target.templates, target.latents[: target.image_count], training_scheduler(parts.pipeline),
                          seed, (), settings.max_sequence_length, reserved)
    return attacks.soft_attack(setup, ATTACK_STEPS, start=start)


def prefixed(parts, target, found) -> tuple[str, ...]:
    """The target's templates behind the attack's placeholder words, as the attack captioned the pictures."""
    words = parts.pipeline.tokenizer.decode(list(found.placeholders)).strip()
    return tuple(f"{words} {template}" for template in target.templates)


def recovered(parts, target, settings, before, found) -> float:
    """The share of the concept's original advantage that the attack's captions give back (stopping.advantage, on
    the stop check's fixed noise)."""
    probe = dataclasses.replace(target, templates=prefixed(parts, target, found), hardened=())
    with found.active(parts.pipeline, parts.family):
        regained = stopping.advantage(parts, probe, training_scheduler(parts.pipeline), before.empty, settings,
                                      dict(before.blank))
    original = before.advantage[target.concept]
    return max(0.0, regained / original) if original > 0 else 0.0


def strongest(parts, target, settings, before, round_index: int, reserved: tuple[int, ...], last):
    """This round's attack on `target`: STARTS fresh ones in the first round, the last round's strongest continued
    (WARM) after it; the one that brings back the most, and that share."""
    starts = [last] if WARM and last is not None else [None] * STARTS
    tried = []
    for k, start in enumerate(starts):
        found = attack(parts, target, settings, settings.seed + 1 + STARTS * round_index + k, reserved, start)
        tried.append((recovered(parts, target, settings, before, found), -k, found))
    share, _, found = max(tried, key=lambda t: t[:2])
    return found, share


def run(parts, targets, settings, before, on_step=lambda step, loss: None) -> unlearning.LoopResult:
    """The plain erase, then rounds of attack and erase until the attack fails."""
    result = unlearning.run(parts, targets, settings, before, on_step)
    trajectory, losses = list(result.trajectory), list(result.losses)
    rounds, reserved, last = [], (), {}
    with contextlib.ExitStack() as learned:
        for round_index in range(ROUNDS):
            found = []
            for i, target in enumerate(targets):
                if target.anchor:
                    continue
                attacked, share = strongest(parts, target, settings, before, round_index, reserved, last.get(i))
                last[i] = attacked.vectors
                rounds.append({"round": round_index + 1, "concept": target.concept, "recovered": share})
                if share >= HOLDS:
                    found.append((i, attacked))
                reserved += attacked.placeholders
            if not found:
                break
            for i, attacked in found:
                learned.enter_context(attacks.learned_tokens(parts.pipeline, parts.family, attacked.placeholders, attacked.vectors))
                targets = [dataclasses.replace(t, hardened=t.hardened + prefixed(parts, t, attacked)) if j == i else t
                           for j, t in enumerate(targets)]
            result = unlearning.run(parts, targets, settings, before, on_step)
            trajectory += result.trajectory
            losses += result.losses
    return unlearning.LoopResult(losses, trajectory, result.stopped_early, result.trained, rounds)
