"""Which Stable Diffusion family a model is, told from its configs or its tensor names, never from a file name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .errors import BadInput


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    encoders: tuple[str, ...]  # the pipeline's attribute names of its text encoders, in order
    pipeline_class: str

    @property
    def encoder_numbers(self) -> dict[str, str]:
        """`--encoder 1|2` names the encoders by position, as SDXL users know them."""
        return {str(i + 1): name for i, name in enumerate(self.encoders)}


SD1 = Family("sd1", "SD 1.x", ("text_encoder",), "StableDiffusionPipeline")
SD2 = Family("sd2", "SD 2.x", ("text_encoder",), "StableDiffusionPipeline")
SDXL = Family("sdxl", "SDXL", ("text_encoder", "text_encoder_2"), "StableDiffusionXLPipeline")
FAMILIES = {family.name: family for family in (SD1, SD2, SDXL)}

SD_PIPELINES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"}
SDXL_PIPELINES = {"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"}
SUPPORTED = "SD 1.x, SD 2.x and SDXL"


def family_from_configs(model_index: dict, text_encoder_config: dict | None, where: str) -> Family:
    """SD 1.x and 2.x share a pipeline class; their text encoders tell them apart (OpenAI CLIP uses quick_gelu,
    OpenCLIP ViT-H uses gelu)."""
    class_name = model_index.get("_class_name", "")
    if class_name in SDXL_PIPELINES:
        family = SDXL
    elif class_name in SD_PIPELINES:
        family = None
    else:
        raise BadInput(f"{where} is a {class_name or 'unknown'} pipeline, which fewshot-erase does not support; pass an SD 1.x, SD 2.x or SDXL model")
    for name in (family or SD1).encoders:
        if not model_index.get(name) or model_index[name][0] is None:
            raise BadInput(f"{where} has no {name}; fewshot-erase needs a pipeline with its text encoder(s)")
    if family is not None:
        return family
    if text_encoder_config is None:
        raise BadInput(f"{where} has no text_encoder/config.json; re-save the pipeline with its text encoder")
    return SD2 if text_encoder_config.get("hidden_act") == "gelu" else SD1


# Prefixes of the text encoders in single-file checkpoints (CompVis / Stability layout, as A1111 and ComfyUI write).
SDXL_KEYS = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
SD2_KEYS = ("cond_stage_model.model.",)
SD1_KEYS = ("cond_stage_model.transformer.",)
UNET_KEYS = "model.diffusion_model."


def family_from_keys(keys: Iterable[str], where: str) -> Family:
    keys = list(keys)

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    if not has(UNET_KEYS):
        raise BadInput(f"{where} holds no Stable Diffusion UNet (no '{UNET_KEYS}*' tensors); is it a LoRA or another model?")
    if all(has(prefix) for prefix in SDXL_KEYS):
        return SDXL
    if has(SD2_KEYS[0]):
        return SD2
    if has(SD1_KEYS[0]):
        return SD1
    if has("conditioner.embedders."):
        raise BadInput(f"{where} looks like an SDXL refiner or another SDXL variant; only SDXL base layouts are supported")
    raise BadInput(f"{where} has no text encoder of a known layout; fewshot-erase supports {SUPPORTED} checkpoints")
