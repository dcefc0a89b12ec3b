"""The method: few-shot unlearning of the text encoder (Fuchi & Takagi, BMVC 2024).

The denoising loss of a frozen UNet, on a few real pictures of the concept, conditioned on captions that name the
concept, is *maximised* with respect to the text encoder's feed-forward weights only. The encoder thereby stops
producing conditioning that lets the UNet reconstruct the concept:

    theta* = argmax_theta  E_{x, c, t, eps} || eps_target - unet(noisy(x, t, eps), t, text_encoder_theta(c)) ||^2

Two additions, each optional: a retain term that holds the conditioning of kept concepts at the original encoder's
(preservation), and a pull toward an anchor concept instead of the push away (steering). `--until gone` stops on
evidence (stopping.py); several concepts take turns (`next_concept`). Read top to bottom: select the weights, encode
the pictures once, then `run`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from . import keys, stopping
from .keys import trained_encoders
from .conditioning import (FROZEN_CHUNK, as_cond, conditioning, conditioning_tensors, denoiser_of, frozen_conditioning,
                           split_conditioning, stacked)
from .denoising import noised, predict, training_scheduler
from .effects import Snapshot
from .errors import BadInput, RunFailure
from .prompts import fill
from .placement import frozen_parts_in, stepping_in_backward, stepping_on_host
from .settings import EraseSettings


def ffn_parameters(text_encoder, train: str, t5_layers: tuple[int, ...] | None = None) -> dict[str, torch.nn.Parameter]:
    """Canonical name -> parameter for the weights this erase trains; everything else gets requires_grad False."""
    layer_count = text_encoder.config.num_hidden_layers
    kind = keys.encoder_kind(text_encoder)
    layers = keys.trained_blocks(kind, t5_layers)
    if layers is not None and max(layers) >= layer_count:
        raise BadInput(f"--t5-layers names block {max(layers)}, but this T5 has blocks 0-{layer_count - 1}; name blocks it has")
    selected = {}
    for name, parameter in text_encoder.named_parameters():
        canonical = keys.canonical_key(kind, name)
        trained = keys.is_trained(canonical, train, layer_count, layers)
        parameter.requires_grad_(trained)
        if trained:
            selected[canonical] = parameter
    return selected


# Pixels per VAE batch: the encoder's full-resolution activations grow with the batch, and bigger batches are no
# faster (docs/speed.md).
ENCODE_PIXELS = 4 * 512 * 512


@torch.no_grad()
def encode_images_once(vae, pixels: torch.Tensor, device, dtype, chunk: int | None = None,
                       packed: bool = False) -> torch.Tensor:
    """Latents for the whole run. The distribution's mean, not a sample: the pictures are few, and a fixed
    encoding keeps the run deterministic; the noise the loss adds dominates the VAE's own variance anyway."""
    chunk = chunk or max(1, ENCODE_PIXELS // (pixels.shape[-2] * pixels.shape[-1]))
    if vae.device != torch.device(device):
        vae.to(device)  # back from the host, where an earlier erase of this loaded model left it
    unet_dtype = dtype
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        # SDXL's VAE overflows in fp16 (its config says so); the encoder runs once, so fp32 costs nothing here.
        vae.to(torch.float32)
        dtype = torch.float32
    latents = []
    for start in range(0, len(pixels), chunk):
        batch = pixels[start:start + chunk].to(device=device, dtype=dtype)
        latents.append(vae.encode(batch).latent_dist.mean)
    latents = torch.cat(latents)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latents = ((latents - shift) * vae.config.scaling_factor).to(unet_dtype)
    return pack_latents(latents) if packed else latents


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """FLUX's transformer reads 2x2 latent patches as tokens: [N, C, H, W] -> [N, H/2 * W/2, 4C], as its pipeline
    packs them (noise drawn in either layout is the same distribution)."""
    n, c, h, w = latents.shape
    return latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


@dataclass
class Target:
    """One concept to erase: its cached latents (originals, then mirrored copies) and its captions. With an
    anchor, the concept is steered to generate the anchor instead of being pushed away from everything."""

    concept: str
    latents: torch.Tensor
    image_count: int
    templates: tuple[str, ...]
    anchor: str | None = None
    # --robust: the templates behind the attackers' learned prefixes (hardening.py), erased along with the templates
    # but not lent to the kept concepts
    hardened: tuple[str, ...] = ()

    @property
    def drawn(self) -> tuple[str, ...]:
        """The templates the erase steps draw captions from."""
        return self.templates + self.hardened

    def caption(self, index: int) -> str:
        """The templates in turn: what the stop checks and the report condition the pictures on."""
        return fill(self.drawn[index % len(self.drawn)], self.concept)


@dataclass
class LoopResult:
    losses: list[float]
    trajectory: list[dict]  # per step: concept, loss, retain, worst drift (or repair); --until's checks
    stopped_early: bool
    trained: dict[str, dict[str, torch.nn.Parameter]]  # encoder -> canonical name -> parameter
    rounds: list[dict] | None = None  # --robust: each round's attack and what it brought back (hardening.py)

    @property
    def retain_losses(self) -> list[float]:
        """The retain term at every step that had one (erase and repair steps alike)."""
        return [entry["retain"] for entry in self.trajectory if "retain" in entry]


def prepare_encoders(parts, settings: EraseSettings) -> dict:
    """Freeze everything but the selected weights; return them per encoder."""
    pipeline, family = parts.pipeline, parts.family
    denoiser_of(pipeline).requires_grad_(False)  # no weight gradients for the denoiser: only its input gets one
    pipeline.vae.requires_grad_(False)
    chosen = trained_encoders(family, settings.encoder)
    trained = {}
    for name in family.encoders:
        encoder = parts.text_encoder(name)
        encoder.train(False)
        trained[name] = ffn_parameters(encoder, settings.train, settings.t5_layers) if name in chosen else {}
        if name not in chosen:
            encoder.requires_grad_(False)
    return trained


def objective(model, noisy, timesteps, goal, cond, anchor_cond: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The denoising loss, and what the step minimises: its negative (gradient ASCENT, the published method), or,
    with an anchor, the distance to what the ORIGINAL encoder's anchor captions make the denoiser predict on the
    same noisy pictures (steer rather than push away)."""
    prediction = predict(model, noisy, timesteps, cond).float()
    loss = F.mse_loss(prediction, goal.float())
    if anchor_cond is None:
        return loss, -loss
    with torch.no_grad():
        wanted = predict(model, noisy, timesteps, anchor_cond).float()
    return loss, F.mse_loss(prediction, wanted)


PRESERVE_POOL = 64  # preserve captions drawn once per run; their original conditioning is computed once


def preserve_pool(preserve: tuple[str, ...], templates, rng: random.Random) -> dict[str, list[str]]:
    """Per concept to keep, its captions in the erase's own templates: at most PRESERVE_POOL in all, and at least
    one per concept."""
    per_concept = max(1, PRESERVE_POOL // max(1, len(preserve)))
    return {other: [fill(template, other) for template in rng.sample(list(templates), min(per_concept, len(templates)))]
            for other in preserve}


def preserve_rows(pool: dict[str, list[str]], batch: int, rng: random.Random):
    """Per step, the captions the retain term compares: `batch` kept concepts in turn (every one of them each step
    when there are no more), each in one of its captions; drawing at random left a similar concept unguarded for
    a few steps, and those steps cost it (docs/stopping-rule.md)."""
    concepts, start = list(pool), 0
    while True:
        chosen = [concepts[(start + i) % len(concepts)] for i in range(min(batch, len(concepts)))]
        start = (start + len(chosen)) % len(concepts)
        yield [rng.choice(pool[concept]) for concept in chosen]


def caption_drifts(current: list[torch.Tensor], reference: list[torch.Tensor]) -> torch.Tensor:
    """Per kept caption, how far the patched encoder's conditioning has moved from the original's (mean squared
    difference; SDXL's pooled embedding adds its own). The retain term is their mean; --until also reads the worst."""
    return sum((new.float() - old.float()).pow(2).flatten(1).mean(1) for new, old in zip(current, reference))


def retain_term(now: list[torch.Tensor], captions: list[str], frozen: dict, settings,
                watched: int) -> tuple[torch.Tensor, dict]:
    """The preservation term added to the objective, and what the trajectory records of it: the worst drift of the
    first `watched` captions (the kept concepts; the held ones after them are not what the drift bound is about)."""
    drifts = caption_drifts(now, stacked(frozen, captions))
    worst = drifts[:watched].max().item() if watched else 0.0
    return settings.preserve_weight * drifts.mean(), {"retain": drifts.mean().item(), "drift_worst": worst}


def batches(image_count: int, batch_size: int, flip: bool, generator):
    """Image indices per step, endlessly: epochs of shuffled pictures; with `flip`, each pick is the mirrored copy
    (cached after the originals) half of the time."""
    stream: list[int] = []
    while True:
        while len(stream) < batch_size:
            stream += torch.randperm(image_count, generator=generator).tolist()
        picked, stream = stream[:batch_size], stream[batch_size:]
        if flip:
            mirrored = torch.randint(0, 2, (batch_size,), generator=generator).tolist()
            picked = [index + image_count * bit for index, bit in zip(picked, mirrored)]
        yield picked


@dataclass
class Loop:
    """What every step of a run reads: set up once by `run`, before any weight moves."""

    parts: object
    settings: EraseSettings
    scheduler: object
    generator: torch.Generator  # the pictures' noise and timesteps (the batches draw from it too)
    frozen: dict  # caption -> the original encoder's conditioning (kept captions, anchors), and the held ones'
    resolution: int
    device: torch.device  # the UNet's, asked once: asking diffusers costs a walk of the UNet

    def encode(self, captions: list[str]) -> dict:
        return conditioning(self.parts.pipeline, self.parts.family, captions, self.resolution, self.parts.dtype,
                            self.device, self.settings.max_sequence_length)

    def descend(self, objective_value: torch.Tensor) -> None:
        objective_value.backward()  # each weight takes its step during it (stepping_in_backward)


def erase_step(loop: Loop, target: Target, picked: list[int], templates: list[str], kept: list[str],
               held: list[str], step: int) -> dict:
    """One step of ascent (or steering) on `target`'s `picked` pictures captioned with `templates`, with the retain
    term on the `kept` captions and the `held` ones."""
    # At the first step no weight has moved: the retain term and its gradient are zero, and the kept rows would cost
    # an encoder forward and backward for nothing.
    compared = kept + held if step > 0 else []
    cond, kept_now = split_conditioning(loop.encode([fill(t, target.concept) for t in templates] + compared),
                                        len(picked))
    noisy, timesteps, goal = noised(target.latents[picked], loop.scheduler, loop.generator)
    anchor = as_cond(stacked(loop.frozen, [fill(t, target.anchor) for t in templates]), cond) if target.anchor else None
    loss, value = objective(denoiser_of(loop.parts.pipeline), noisy, timesteps, goal, cond, anchor)
    if not torch.isfinite(value):
        raise RunFailure(f"the loss became {value.item()} at step {step + 1}; lower --lr (now {loop.settings.lr}) or use --dtype float32")
    entry = {"concept": target.concept, "loss": loss.item()}
    if compared:
        retain, recorded = retain_term(kept_now, compared, loop.frozen, loop.settings, len(kept))
        value = value + retain
        entry.update(recorded)
    elif kept:
        entry.update(retain=0.0, drift_worst=0.0)
    loop.descend(value)
    return entry


def hold(loop: Loop, target: Target) -> list[str]:
    """A concept found done is held where it is: its captions' conditioning now joins the retain term's references,
    so that ascent on the other concepts, or repair steps, do not bring it back (where they do, the next check
    returns it to the rotation). Its captions."""
    captions = [target.caption(i) for i in range(len(target.drawn))]
    loop.frozen.update(frozen_conditioning(loop.parts.pipeline, loop.parts.family, captions, loop.resolution,
                                           loop.parts.dtype, sequence_length=loop.settings.max_sequence_length))
    return captions


def held_rows(held: dict[str, list[str]], step: int) -> list[str]:
    """One caption per held concept a step, in turn: each weighs in the retain term as one kept concept does."""
    return [captions[step % len(captions)] for captions in held.values()]


def repair_step(loop: Loop, kept: list[str], held: list[str]) -> dict:
    """A retain-only step: the kept captions' conditioning pulled back toward the original's, the held ones toward
    where they were held, nothing erased (an encoder forward and backward over them, about half an erase step)."""
    rows = kept + held
    retain, recorded = retain_term(conditioning_tensors(loop.encode(rows)), rows, loop.frozen, loop.settings, len(kept))
    loop.descend(retain)
    return {"repair": True, **recorded}


@torch.no_grad()
def drift_now(loop: Loop, captions: list[str]) -> float:
    """The worst drift of the kept `captions` in the encoder as it stands: each step's retain term reads them before
    that step's update, so the last steps before a stop go unread by it (zero+one+five: two steps of five's ascent
    took "seven" from 0.004 to 0.12, docs/stopping-rule.md)."""
    return max(caption_drifts(conditioning_tensors(loop.encode(chunk)), stacked(loop.frozen, chunk)).max().item()
               for chunk in (captions[i:i + FROZEN_CHUNK] for i in range(0, len(captions), FROZEN_CHUNK)))


def checked_advantage(loop: Loop, target: Target, before: Snapshot) -> float:
    """The concept's advantage at a check (stopping.py); with --robust's learned prefixes, the worse of its own
    captions' and theirs: erasing the prefixed captions alone let the plain ones come back."""
    def of(templates: tuple[str, ...]) -> float:
        probe = replace(target, templates=templates, hardened=())
        return stopping.advantage(loop.parts, probe, loop.scheduler, before.empty, loop.settings, before.blank)

    return max(of(target.templates), of(target.hardened)) if target.hardened else of(target.templates)


def check_finite(trained: dict, settings: EraseSettings) -> None:
    """No loss reads the last step's update: an --lr that blew it up shows only in the weights (checked once the
    run is over, when --low-memory's fp32 values are back in them)."""
    if not all(torch.isfinite(p).all() for group in trained.values() for p in group.values()):
        raise RunFailure(f"the weights became inf or nan at the last step; lower --lr (now {settings.lr}) or use --dtype float32")


def next_concept(active: list[int], taken: list[int], share: int, seen: list[float], step: int) -> int:
    """Which concept the step erases. Several take turns, but with --until a concept whose captions did not help draw
    its pictures even before the erase goes first, alone, until the check finds it gone or it has had its share of
    the steps: the check sees little of it, and erasing the others first drags their captions toward it, where they
    are held (zero+six+nine's nine: docs/stopping-rule.md#an-unseen-concept-first)."""
    unseen = [i for i in active if seen[i] <= 0 and taken[i] < share]
    return min(unseen, key=lambda i: (seen[i], i)) if unseen else active[step % len(active)]


def run(parts, targets: list[Target], settings: EraseSettings, before: Snapshot,
        on_step: Callable[[int, float], None] = lambda step, loss: None, hold_empty: bool = False) -> LoopResult:
    """Erase `targets` from the text encoder(s) of `parts`; `before` is the report's snapshot of the original
    encoder (its advantages, empty caption and kept captions are the stopping rule's and retain term's reference).
    `hold_empty`: the empty caption joins the retain term where it was (--robust: hardening.py says why)."""
    pipeline, family, dtype = parts.pipeline, parts.family, parts.dtype
    resolution = settings.resolution or parts.resolution
    trained = prepare_encoders(parts, settings)
    if settings.low_memory:
        denoiser_of(pipeline).enable_gradient_checkpointing()
    captions_rng = random.Random(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    streams = [batches(t.image_count, settings.batch_size, settings.flip, generator) for t in targets]
    pool = preserve_pool(settings.preserve, targets[0].templates, captions_rng) if settings.preserve_weight > 0 else {}
    retained = preserve_rows(pool, settings.preserve_batch, captions_rng) if pool else None
    anchors = [fill(template, t.anchor) for t in targets if t.anchor for template in t.templates]
    pooled = [caption for group in pool.values() for caption in group]
    frozen = frozen_conditioning(pipeline, family, pooled + anchors, resolution, dtype, before.originals,
                                 settings.max_sequence_length)
    loop = Loop(parts, settings, training_scheduler(pipeline), generator, frozen, resolution,
                denoiser_of(pipeline).device)
    published_length = sum(settings.replace(steps=None).step_count(t.image_count) for t in targets)
    steps = settings.steps or published_length
    earliest_stop = min(published_length, steps)  # --until never stops before the published schedule is done
    losses, trajectory = [], []
    active = list(range(len(targets)))  # with --until, a concept found done leaves the rotation
    seen = [before.advantage[t.concept] / before.blank[t.concept] for t in targets]  # how much its captions help, before
    taken, share = [0] * len(targets), max(1, steps // len(targets))  # ascent steps each; each one's budget
    held: dict[str, list[str]] = {}  # with --until: concept found done -> its captions, held where they were then
    if hold_empty:
        held[""], frozen[""] = [""], before.empty
    repairing = False  # with --until: every concept is done, but a kept one has drifted past the bound
    encoders = [parts.text_encoder(name) for name in family.encoders]
    stepping = (stepping_on_host(trained, settings, dtype, parts.host, parts.held) if settings.low_memory
                else stepping_in_backward(trained, settings))
    with stepping, frozen_parts_in(encoders, dtype, parts.host):
        for step in range(steps):
            if repairing:
                trajectory.append(repair_step(loop, next(retained) if retained else [], held_rows(held, step)))
            else:
                index = next_concept(active, taken, share, seen, step) if settings.until else active[step % len(active)]
                taken[index] += 1
                target, picked = targets[index], next(streams[index])
                templates = [captions_rng.choice(target.drawn) for _ in picked]
                kept = next(retained) if retained else []
                trajectory.append(erase_step(loop, target, picked, templates, kept, held_rows(held, step), step))
                losses.append(trajectory[-1]["loss"])
            on_step(step, losses[-1])
            if settings.until and step + 1 >= earliest_stop and (step + 1) % settings.until_window == 0:
                # the done concepts too: erasing the others can bring one back (zero+eight+nine's nine did)
                checked = list(range(len(targets)))
                trajectory[-1]["advantage"] = {targets[i].concept: checked_advantage(loop, targets[i], before)
                                               for i in checked}
                still = stopping.still_there(targets, checked, before.advantage, before.blank, trajectory)
                for i in still:
                    if i not in active:  # back: it rejoins the rotation, no longer held where it was
                        held.pop(targets[i].concept, None)
                        trajectory[-1].setdefault("back", []).append(targets[i].concept)
                for i in active if settings.preserve_weight > 0 else ():
                    if i not in still and not targets[i].anchor and targets[i].concept not in held:
                        held[targets[i].concept] = hold(loop, targets[i])
                        trajectory[-1].setdefault("held", []).append(targets[i].concept)
                if not still and stopping.drift_ok(trajectory, settings.until_window, settings.until_drift):
                    # the window read each caption before its step's update: read the whole pool as it is now too
                    trajectory[-1]["drift_now"] = drift_now(loop, pooled) if pooled else 0.0
                    if trajectory[-1]["drift_now"] <= settings.until_drift:
                        return LoopResult(losses, trajectory, True, trained)
                # every concept done but a kept one dragged along: pull the kept ones back without more ascent
                repairing = not still
                active = still or active
        return LoopResult(losses, trajectory, False, trained)
