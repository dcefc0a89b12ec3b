"""The diffusion training loss the method ascends: the pipeline's noise schedule, noisy latents at random timesteps,
and the scheduler's target (epsilon or v)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def training_scheduler(pipeline):
    """The noise schedule of the pipeline, as a DDPM scheduler: it has `add_noise` and `get_velocity` whatever
    sampler the pipeline ships with (PNDM has no `get_velocity`). The prediction type comes from the config."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipeline.scheduler.config)


def noised(latents, scheduler, generator, band: tuple[float, float] = (0.0, 1.0)):
    """Noisy latents at uniform random timesteps (in `band`, a share of the schedule), and the scheduler's target
    (epsilon or v, from its config)."""
    total = scheduler.config.num_train_timesteps
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    steps = torch.randint(int(band[0] * total), int(band[1] * total), (latents.shape[0],), generator=generator)
    steps = steps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, steps)
    if scheduler.config.prediction_type == "v_prediction":
        return noisy, steps, scheduler.get_velocity(latents, noise, steps)
    return noisy, steps, noise


def prediction_error(unet, noisy, timesteps, target, cond, reduction: str = "mean") -> torch.Tensor:
    """|| target - unet(noisy, t, cond) ||^2, in fp32 whatever the UNet runs in."""
    return F.mse_loss(unet(noisy, timesteps, **cond).sample.float(), target.float(), reduction=reduction)
