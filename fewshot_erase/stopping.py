"""`--until gone`: when an erased concept is taken as done, measured inside the run without a classifier.

The measure is the concept's *advantage*: how much better its captions let the frozen UNet denoise its own pictures
than the original encoder's empty caption does, on fixed noise and timesteps. A concept is done once its captions
push the denoising away from its pictures as strongly as they pulled before, and by a margin (`gone`); the run stops
once every concept is done and no kept caption has drifted past the bound (`drift_ok`). How each constant was chosen, and how
often the rule agreed with the demo's judge: docs/stopping-rule.md.
"""

from __future__ import annotations

import torch

from .conditioning import as_cond, conditioning, denoiser_of, select_rows
from .denoising import noised, prediction_error

ADVANTAGE_SEED = 4021  # fixed: every check of a run, and the report before and after, see the same noise
ADVANTAGE_REPEATS = 2  # each picture at two timesteps: six pictures alone make a noisy estimate
NO_GRAD_ROWS = 6  # x the run's batch size per UNet call (not with --low-memory): a forward without gradients holds far less

# How much further than "undoing the pull it had" the captions must push away, as a share of the empty caption's
# loss: the advantage before training is small and noisy, and without a margin digits were called gone while drawn.
GONE_MARGIN = 0.1


@torch.no_grad()
def advantage(parts, target, scheduler, empty: list[torch.Tensor], settings, blank: dict[str, float]) -> float:
    """The empty caption's loss minus the concept's captions' loss on the concept's pictures; above 0 the text still
    helps draw the concept. `blank` caches the empty caption's loss per concept: frozen UNet, frozen conditioning
    and fixed noise make it the same at every check of a run, so only the first check pays for it."""
    pipeline, family, unet = parts.pipeline, parts.family, denoiser_of(parts.pipeline)
    generator = torch.Generator().manual_seed(ADVANTAGE_SEED)
    pictures = target.latents[: target.image_count]
    latents = pictures.repeat(ADVANTAGE_REPEATS, *[1] * (pictures.ndim - 1))
    noisy, timesteps, goal = noised(latents, scheduler, generator)
    captions = [target.caption(i) for i in range(len(latents))]
    # each distinct caption encoded once: the rows repeat them (ADVANTAGE_REPEATS, and more pictures than templates)
    unique = list(dict.fromkeys(captions))
    encoded = conditioning(pipeline, family, unique, settings.resolution, parts.dtype,
                           sequence_length=settings.max_sequence_length)
    index = torch.tensor([unique.index(caption) for caption in captions])
    known = target.concept in blank
    with_text = without_text = 0.0
    chunk = settings.batch_size * (1 if settings.low_memory else NO_GRAD_ROWS)
    for start in range(0, len(latents), chunk):
        rows = slice(start, start + chunk)
        count = len(captions[rows])
        cond = select_rows(encoded, index[rows])
        with_text += prediction_error(unet, noisy[rows], timesteps[rows], goal[rows], cond, "sum").item()
        if not known:
            empty_cond = as_cond([t.expand(count, *t.shape[1:]) for t in empty], cond)
            without_text += prediction_error(unet, noisy[rows], timesteps[rows], goal[rows], empty_cond, "sum").item()
    if not known:
        blank[target.concept] = without_text / goal.numel()
    return blank[target.concept] - with_text / goal.numel()


def gone(before: float, after: float, blank: float) -> bool:
    """Gone when the concept's captions now steer the denoising of its pictures away from them at least as strongly
    as they steered it toward them before, and by a margin (GONE_MARGIN of `blank`, the empty caption's loss) that
    the noise of the estimate does not reach. A proxy for a judge, not a judge."""
    return after <= -max(before, 0.0) - GONE_MARGIN * blank


def finished(before: float, readings: list[float], blank: float) -> bool:
    """Gone at the last check. (A stall clause, pushed away by a smaller margin at two checks in a row, called "nine"
    done while drawn once the demo's mirrored copies went: docs/stopping-rule.md.)"""
    return gone(before, readings[-1], blank)


def readings(trajectory: list[dict], concept: str) -> list[float]:
    """The concept's advantage at every check so far, as the trajectory recorded it."""
    return [e["advantage"][concept] for e in trajectory if concept in e.get("advantage", {})]


def drift_ok(trajectory: list[dict], window: int, bound: float) -> bool:
    """Every kept caption the last `window` steps compared has drifted no more than `bound`: the worst one, not
    their mean, since the concept an erase drags is one of them, not all."""
    drifts = [e["drift_worst"] for e in trajectory[-window:] if "drift_worst" in e]
    return not drifts or max(drifts) <= bound


def still_there(targets, checked: list[int], before_advantage: dict, blank: dict, trajectory: list[dict]) -> list[int]:
    """The checked concepts not done at this check; a steered concept (--anchor) is never "gone" by this rule: it
    runs the full schedule."""
    return [i for i in checked
            if targets[i].anchor or not finished(before_advantage[targets[i].concept],
                                                 readings(trajectory, targets[i].concept), blank[targets[i].concept])]
