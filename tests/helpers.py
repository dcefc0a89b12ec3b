"""What the tests ask of an erase output: its tensors, a pipeline that uses it, its denoising loss."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from fewshot_erase.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None):
    """In-process: fast, and the exit code is what a shell would see."""
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def run_cli_process(*args, env=None, **kwargs):
    """A real process, for what only a process shows (offline Hub cache, signals, stdout purity)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "fewshot_erase", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=kwargs.pop("cwd", None), **kwargs)


def encoder_folders(output: Path, family: str) -> dict[str, Path]:
    if family == "sdxl":
        return {"text_encoder": output / "text_encoder", "text_encoder_2": output / "text_encoder_2"}
    return {"text_encoder": output}


def load_encoders(output: Path, family: str) -> dict:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    return {name: classes[name].from_pretrained(str(path)) for name, path in encoder_folders(output, family).items()}


def erased_tensors(output: Path, family: str) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(str(path / "model.safetensors")) for name, path in encoder_folders(output, family).items()}


def with_encoders(pipe, encoders: dict):
    """The same pipeline with other text encoders (the way a user passes `text_encoder=` to from_pretrained)."""
    return type(pipe)(**{**pipe.components, **encoders})


def mean_denoising_loss(pipe, family_name: str, pictures: Path, concept: str, templates, seed: int = 123,
                        rounds: int = 4) -> float:
    """The erase objective, measured on fixed noise and timesteps: what gradient ascent should have raised."""
    from fewshot_erase import conditioning, denoising, families, images, prompts, unlearning

    family = families.FAMILIES[family_name]
    resolution = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    loaded = images.load_images([pictures])
    latents = unlearning.encode_images_once(pipe.vae, images.to_pixels(loaded, resolution, False), "cpu", torch.float32)
    scheduler = denoising.training_scheduler(pipe)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    with torch.no_grad():
        for round_ in range(rounds):
            captions = [prompts.fill(templates[(round_ + i) % len(templates)], concept) for i in range(len(loaded))]
            cond = conditioning.conditioning(pipe, family, captions, resolution, torch.float32)
            noisy, timesteps, target = denoising.noised(latents, scheduler, generator)
            losses.append(denoising.prediction_error(pipe.unet, noisy, timesteps, target, cond).item())
    return sum(losses) / len(losses)


LAYERS = 3  # the tiny models' encoder layers; SD 2.x's single file has a 4th block that diffusers does not use
# Where each family's single file keeps the feed-forward weights: (layer N's prefix, fc1's name, fc2's name).
SINGLE_FILE_NAMES = {
    "sd1": {"text_encoder": ("cond_stage_model.transformer.text_model.encoder.layers.", "mlp.fc1", "mlp.fc2")},
    "sd2": {"text_encoder": ("cond_stage_model.model.transformer.resblocks.", "mlp.c_fc", "mlp.c_proj")},
    "sdxl": {"text_encoder": ("conditioner.embedders.0.transformer.text_model.encoder.layers.", "mlp.fc1", "mlp.fc2"),
             "text_encoder_2": ("conditioner.embedders.1.model.transformer.resblocks.", "mlp.c_fc", "mlp.c_proj")},
}


def single_file_keys(family: str) -> dict[tuple[str, str], str]:
    """(encoder, canonical name) -> the single file's key, for every feed-forward tensor an erase changes."""
    found = {}
    for encoder, (layers, fc1, fc2) in SINGLE_FILE_NAMES[family].items():
        for n in range(LAYERS):
            for module, name in (("mlp.fc1", fc1), ("mlp.fc2", fc2)):
                for param in ("weight", "bias"):
                    found[encoder, f"text_model.encoder.layers.{n}.{module}.{param}"] = f"{layers}{n}.{name}.{param}"
    return found
