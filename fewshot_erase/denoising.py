"""The diffusion training loss the method ascends: the pipeline's noise schedule, noisy latents at random timesteps,
and the target the model is trained toward. SD 1.x, 2.x and SDXL: DDPM noise, epsilon or v. SD 3.x and FLUX.1: flow
matching as diffusers' own training scripts for them compute it (docs/flow-models.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class FlowMatching:
    """A flow-matching schedule as diffusers' SD 3 and FLUX DreamBooth scripts sample it: u in [0, 1) (logit-normal
    for SD 3, uniform for FLUX), index = u * 1000, the scheduler's timestep and sigma there (SD 3's shifted by 3,
    FLUX's unshifted: its shift is dynamic, applied only when sampling)."""

    timesteps: torch.Tensor
    sigmas: torch.Tensor
    sampling: str  # "logit_normal" | "uniform"
    # SD 3's script compares `noisy - sigma * prediction` with the latents (its default --precondition_outputs),
    # FLUX's the prediction with `noise - latents`.
    preconditioned: bool

    @property
    def count(self) -> int:
        return len(self.timesteps)


def training_scheduler(pipeline):
    """The noise schedule of the pipeline: for SD 1.x, 2.x and SDXL a DDPM scheduler (it has `add_noise` and
    `get_velocity` whatever sampler the pipeline ships with; PNDM has no `get_velocity`), the prediction type from
    its config; for SD 3.x and FLUX.1 the flow-matching schedule their training scripts draw from."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if getattr(pipeline, "transformer", None) is not None:
        schedule = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)
        sd3 = type(pipeline.transformer).__name__.startswith("SD3")
        return FlowMatching(schedule.timesteps.clone(), schedule.sigmas[: len(schedule.timesteps)].clone(),
                            "logit_normal" if sd3 else "uniform", preconditioned=sd3)
    return DDPMScheduler.from_config(pipeline.scheduler.config)


def noised(latents, scheduler, generator, band: tuple[float, float] = (0.0, 1.0)):
    """Noisy latents at random timesteps (in `band`, a share of the schedule), and the target the prediction is
    compared with: epsilon or v (from the config), or for flow matching the script's."""
    if isinstance(scheduler, FlowMatching):
        return _flow_noised(latents, scheduler, generator, band)
    total = scheduler.config.num_train_timesteps
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    steps = torch.randint(int(band[0] * total), int(band[1] * total), (latents.shape[0],), generator=generator)
    steps = steps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, steps)
    if scheduler.config.prediction_type == "v_prediction":
        return noisy, steps, scheduler.get_velocity(latents, noise, steps)
    return noisy, steps, noise


def _flow_noised(latents, schedule: FlowMatching, generator, band):
    """noisy = (1 - sigma) x + sigma noise; the target noise - x, or x where the prediction is preconditioned."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    count = latents.shape[0]
    if schedule.sampling == "logit_normal":
        u = torch.sigmoid(torch.randn((count,), generator=generator))
    else:
        u = torch.rand((count,), generator=generator)
    u = band[0] + (band[1] - band[0]) * u
    index = (u * schedule.count).long().clamp(0, schedule.count - 1)
    sigma = schedule.sigmas[index].to(latents.device, torch.float32).view(-1, *[1] * (latents.ndim - 1))
    noisy = ((1 - sigma) * latents.float() + sigma * noise.float()).to(latents.dtype)
    target = latents if schedule.preconditioned else noise - latents
    return noisy, schedule.timesteps[index].to(latents.device), target


def predict(model, noisy, timesteps, cond) -> torch.Tensor:
    """The denoiser's output in the space its target is in. The UNet and SD 3's transformer take the scheduler's
    timestep; FLUX's pipeline passes it divided by 1000; SD 3's script preconditions (x0 = noisy - sigma v)."""
    kind = type(model).__name__
    if kind.startswith("Flux"):
        return model(noisy, timestep=timesteps / 1000, **cond).sample
    out = model(noisy, timestep=timesteps, **cond).sample
    if kind.startswith("SD3"):
        sigma = (timesteps.float() / 1000).view(-1, *[1] * (noisy.ndim - 1))
        return noisy.float() - sigma * out.float()
    return out


def prediction_error(model, noisy, timesteps, target, cond, reduction: str = "mean") -> torch.Tensor:
    """|| target - prediction ||^2, in fp32 whatever the denoiser runs in."""
    return F.mse_loss(predict(model, noisy, timesteps, cond).float(), target.float(), reduction=reduction)
