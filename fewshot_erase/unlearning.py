"""The method: few-shot unlearning of the text encoder (Fuchi & Takagi, BMVC 2024).

The denoising loss of a frozen UNet, on a few real pictures of the concept, conditioned on captions that name the
concept, is *maximised* with respect to the text encoder's feed-forward weights only. The encoder thereby stops
producing conditioning that lets the UNet reconstruct the concept:

    theta* = argmax_theta  E_{x, c, t, eps} || eps_target - unet(noisy(x, t, eps), t, text_encoder_theta(c)) ||^2

Read top to bottom: select the weights, encode the pictures once, build the conditioning exactly as the pipeline does
at generation time, and ascend.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import keys
from .errors import RunFailure
from .families import SDXL
from .prompts import fill, sample_captions
from .settings import EraseSettings


def trained_encoders(family, encoder: str) -> list[str]:
    """SDXL erases in both encoders by default; SD 1.x and 2.x have one."""
    if len(family.encoders) == 1 or encoder == "both":
        return list(family.encoders)
    return [family.encoder_numbers[encoder]]


def ffn_parameters(text_encoder, train: str) -> dict[str, torch.nn.Parameter]:
    """Canonical name -> parameter for the weights this erase trains; everything else gets requires_grad False."""
    layer_count = text_encoder.config.num_hidden_layers
    selected = {}
    for name, parameter in text_encoder.named_parameters():
        canonical = keys.canonical_clip_key(name)
        trained = keys.is_trained(canonical, train, layer_count)
        parameter.requires_grad_(trained)
        if trained:
            selected[canonical] = parameter
    return selected


@torch.no_grad()
def encode_images_once(vae, pixels: torch.Tensor, device, dtype, chunk: int = 8) -> torch.Tensor:
    """Latents for the whole run. The distribution's mean, not a sample: the pictures are few, and a fixed
    encoding keeps the run deterministic; the noise the loss adds dominates the VAE's own variance anyway."""
    latents = []
    for start in range(0, len(pixels), chunk):
        batch = pixels[start:start + chunk].to(device=device, dtype=dtype)
        latents.append(vae.encode(batch).latent_dist.mean)
    latents = torch.cat(latents)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def conditioning(pipeline, family, captions: list[str], resolution: int, dtype) -> dict:
    """The UNet's conditioning exactly as the pipeline builds it when generating, with gradients kept.

    The pipeline's own `encode_prompt` does the family's work: SD 1.x takes the last hidden state; SD 2.x in
    diffusers form already ends at the original's penultimate layer; SDXL concatenates the penultimate hidden
    states of both encoders and adds the second's pooled output and the size/crop time ids."""
    device = pipeline.unet.device
    if family is SDXL:
        embeds, _, pooled, _ = pipeline.encode_prompt(
            prompt=captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        time_ids = pipeline._get_add_time_ids(
            (resolution, resolution), (0, 0), (resolution, resolution), dtype=dtype,
            text_encoder_projection_dim=pipeline.text_encoder_2.config.projection_dim,
        )
        added = {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(device).repeat(len(captions), 1)}
        return {"encoder_hidden_states": embeds.to(dtype), "added_cond_kwargs": added}
    embeds, _ = pipeline.encode_prompt(captions, device, 1, False)
    return {"encoder_hidden_states": embeds.to(dtype)}


def training_scheduler(pipeline):
    """The noise schedule of the pipeline, as a DDPM scheduler: it has `add_noise` and `get_velocity` whatever
    sampler the pipeline ships with (PNDM has no `get_velocity`). The prediction type comes from the config."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipeline.scheduler.config)


def denoising_loss(unet, scheduler, latents, cond, generator) -> torch.Tensor:
    """The ordinary diffusion training loss at uniform random timesteps against the scheduler's target."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    steps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    steps = steps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, steps)
    prediction = unet(noisy, steps, **cond).sample
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, steps)
    else:
        target = noise
    return F.mse_loss(prediction.float(), target.float())


PRESERVE_POOL = 64  # preserve captions drawn once per run; their original conditioning is computed once


def conditioning_tensors(cond: dict) -> list[torch.Tensor]:
    """What the retain term compares: the token embeddings, and SDXL's pooled embedding."""
    added = cond.get("added_cond_kwargs") or {}
    return [cond["encoder_hidden_states"]] + ([added["text_embeds"]] if "text_embeds" in added else [])


def preserve_pool(settings: EraseSettings, templates, rng: random.Random) -> list[str]:
    """Captions of the concepts to keep, in the erase's own templates, at most PRESERVE_POOL of them."""
    pool = [fill(template, other) for other in settings.preserve for template in templates]
    return rng.sample(pool, min(len(pool), PRESERVE_POOL))


def retain_loss(pipeline, family, captions, originals, resolution, dtype) -> torch.Tensor:
    """How far the patched encoder's conditioning for the preserve captions has moved from the original's."""
    current = conditioning_tensors(conditioning(pipeline, family, captions, resolution, dtype))
    return sum(F.mse_loss(new.float(), old.float()) for new, old in zip(current, originals))


@dataclass
class LoopResult:
    losses: list[float]
    retain_losses: list[float]
    trained: dict[str, dict[str, torch.nn.Parameter]]  # encoder -> canonical name -> parameter


def batches(image_count: int, batch_size: int, steps: int, flip: bool, generator):
    """Image indices per step: epochs of shuffled pictures; with `flip`, each pick is the mirrored copy
    (cached after the originals) half of the time."""
    stream: list[int] = []
    for _ in range(steps):
        while len(stream) < batch_size:
            stream += torch.randperm(image_count, generator=generator).tolist()
        picked, stream = stream[:batch_size], stream[batch_size:]
        if flip:
            mirrored = torch.randint(0, 2, (batch_size,), generator=generator).tolist()
            picked = [index + image_count * bit for index, bit in zip(picked, mirrored)]
        yield picked


def run(parts, latents: torch.Tensor, image_count: int, settings: EraseSettings, templates: tuple[str, ...],
        on_step: Callable[[int, float], None] = lambda step, loss: None) -> LoopResult:
    pipeline, family = parts.pipeline, parts.family
    resolution = settings.resolution or parts.resolution
    pipeline.unet.requires_grad_(False)  # no weight gradients for the UNet: only its input gets one
    pipeline.vae.requires_grad_(False)
    trained_names = trained_encoders(family, settings.encoder)
    trained = {}
    for name in family.encoders:
        encoder = parts.text_encoder(name)
        encoder.train(False)  # CLIP has no dropout in use, but keep evaluation semantics explicit
        trained[name] = ffn_parameters(encoder, settings.train) if name in trained_names else {}
        if name not in trained_names:
            encoder.requires_grad_(False)
    parameters = [p for group in trained.values() for p in group.values()]
    optimizer = torch.optim.Adam(
        parameters, lr=settings.lr, betas=settings.betas, eps=settings.eps, weight_decay=settings.weight_decay
    )
    scheduler = training_scheduler(pipeline)
    generator = torch.Generator().manual_seed(settings.seed)
    captions_rng = random.Random(settings.seed)
    losses, retains = [], []
    steps = settings.step_count(image_count)
    keep = preserve_pool(settings, templates, captions_rng) if settings.preserve_weight > 0 else []
    if keep:
        with torch.no_grad():
            originals = [conditioning_tensors(conditioning(pipeline, family, [caption], resolution, parts.dtype))
                         for caption in keep]
    for step, picked in enumerate(batches(image_count, settings.batch_size, steps, settings.flip, generator)):
        captions = sample_captions(templates, settings.concept, len(picked), captions_rng)
        cond = conditioning(pipeline, family, captions, resolution, parts.dtype)
        loss = denoising_loss(pipeline.unet, scheduler, latents[picked], cond, generator)
        if not torch.isfinite(loss):
            raise RunFailure(f"the loss became {loss.item()} at step {step + 1}; lower --lr (now {settings.lr}) or use --dtype float32")
        objective = -loss  # gradient ASCENT on the denoising loss
        if keep:
            chosen = captions_rng.sample(range(len(keep)), min(settings.preserve_batch, len(keep)))
            reference = [torch.cat([originals[i][k] for i in chosen]) for k in range(len(originals[0]))]
            retain = retain_loss(pipeline, family, [keep[i] for i in chosen], reference, resolution, parts.dtype)
            objective = objective + settings.preserve_weight * retain
            retains.append(retain.item())
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        losses.append(loss.item())
        on_step(step, loss.item())
    return LoopResult(losses=losses, retain_losses=retains, trained=trained)
