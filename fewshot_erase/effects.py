"""What an erase did, measured inside the run (no classifier, no generation), so every erase.json carries it:

- for each erased concept, how much its captions still help the UNet denoise its own pictures compared with the
  empty caption (the "advantage"); above 0 the text still carries the concept; "gone" once the captions push
  away from the pictures as strongly as they used to pull toward them (stopping.gone);
- for each concept that should survive (the preserve set, or the automatic one when preservation is off), how far
  the encoder's conditioning for it moved, relative to its size: the interference.

The same numbers are taken before and after training on the same fixed noise, so the two are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .conditioning import conditioning, conditioning_tensors, frozen_conditioning
from .denoising import training_scheduler
from .prompts import fill
from .stopping import advantage, finished, readings

KEPT_TEMPLATES = 4  # captions per kept concept: enough to see drift, cheap (an encoder forward only)


@dataclass
class Snapshot:
    advantage: dict[str, float]  # erased concept -> empty-caption loss minus concept-caption loss
    kept: dict[str, list[torch.Tensor]]  # kept concept -> its conditioning tensors
    empty: list[torch.Tensor]  # the ORIGINAL encoder's empty-caption conditioning, one row: the reference both times
    blank: dict[str, float]  # per concept, the empty caption's loss on the fixed noise: the same before and after
    originals: dict[str, list[torch.Tensor]]  # kept caption -> its conditioning (before: the retain term's too)


@torch.no_grad()
def snapshot(parts, targets, kept: tuple[str, ...], settings, empty: list[torch.Tensor] | None = None,
             blank: dict[str, float] | None = None) -> Snapshot:
    """The measures on the encoder as it is now; after training, pass the first snapshot's `empty` and `blank` so
    both are taken against the same original reference."""
    pipeline, family, dtype = parts.pipeline, parts.family, parts.dtype
    resolution = settings.resolution
    scheduler = training_scheduler(pipeline)
    length = settings.max_sequence_length
    empty = empty or conditioning_tensors(conditioning(pipeline, family, [""], resolution, dtype, sequence_length=length))
    blank = {} if blank is None else blank
    advantages = {t.concept: advantage(parts, t, scheduler, empty, settings, blank) for t in targets}
    templates = targets[0].templates[:KEPT_TEMPLATES]
    captions = {name: [fill(t, name) for t in templates] for name in kept}
    encoded = frozen_conditioning(pipeline, family, [c for group in captions.values() for c in group], resolution, dtype,
                                  sequence_length=length)
    kept_cond = {name: [torch.cat(rows) for rows in zip(*(encoded[c] for c in group))] for name, group in captions.items()}
    return Snapshot(advantages, kept_cond, empty, blank, encoded)


def drift(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    """Squared change of the conditioning relative to its squared size (0: untouched)."""
    return sum(float((b.float() - a.float()).pow(2).sum() / b.float().pow(2).sum()) for b, a in zip(before, after))


def verdict(before: float, after: float, blank: float, checks: list[float], anchor: str | None) -> str:
    """One rule for the report and the stop: the stopping rule's `finished`, over the run's checks and the reading
    after it. "steered" for an anchored concept, which that rule does not judge."""
    if anchor is not None:
        return "steered"
    return "erased" if finished(before, checks + [after], blank) else "not erased"


def report(before: Snapshot, after: Snapshot, targets, trajectory: list[dict]) -> dict:
    """erase.json's "effects": per erased concept its advantage before and after and the verdict; per kept concept
    its drift, largest first (the concepts the erase dragged along most)."""
    # a run that ended on a check has already read the encoder it leaves: the reading after is that check again
    ended_on_check = bool(trajectory) and "advantage" in trajectory[-1]
    erased = {}
    for target in targets:
        concept = target.concept
        checks = readings(trajectory, concept)
        if ended_on_check and concept in trajectory[-1]["advantage"]:
            checks = checks[:-1]
        said = verdict(before.advantage[concept], after.advantage[concept], before.blank[concept], checks, target.anchor)
        erased[concept] = {"advantage_before": before.advantage[concept], "advantage_after": after.advantage[concept],
                           "empty_caption_loss": before.blank[concept], "verdict": said,
                           "gone": None if said == "steered" else said == "erased"}
    drifts = {name: drift(before.kept[name], after.kept[name]) for name in before.kept}
    kept = dict(sorted(drifts.items(), key=lambda item: (-item[1], item[0])))
    return {"erased": erased, "kept_drift": kept, "kept_drift_max": max(kept.values()) if kept else None}
