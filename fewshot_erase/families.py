"""Which Stable Diffusion family a model is, told from its configs or its tensor names, never from a file name.

SD 1.x, 2.x and SDXL denoise with a UNet trained on noise prediction; SD 3.x and FLUX.1 with a transformer trained
by flow matching, conditioned on T5 beside CLIP."""

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
    encoder_names: tuple[str, ...] = ()  # what users call them (`--encoder clip-l`), in the same order
    denoiser: str = "unet"  # the pipeline's attribute of the model the pictures' loss runs through

    @property
    def encoder_numbers(self) -> dict[str, str]:
        """`--encoder 1|2|3` names the encoders by position, as SDXL users know them; `clip-l`, `t5` by kind."""
        return {**{str(i + 1): name for i, name in enumerate(self.encoders)}, **{kind: name for name, kind in self.kinds.items()}}

    @property
    def kinds(self) -> dict[str, str]:
        """Each encoder's pipeline attribute -> what users call it (`text_encoder_3` -> `t5`)."""
        return dict(zip(self.encoders, self.encoder_names))

    @property
    def flow_matching(self) -> bool:
        return self.denoiser == "transformer"


SD1 = Family("sd1", "SD 1.x", ("text_encoder",), "StableDiffusionPipeline", ("clip-l",))
SD2 = Family("sd2", "SD 2.x", ("text_encoder",), "StableDiffusionPipeline", ("clip-h",))
SDXL = Family("sdxl", "SDXL", ("text_encoder", "text_encoder_2"), "StableDiffusionXLPipeline", ("clip-l", "clip-g"))
SD3 = Family("sd3", "SD 3.x", ("text_encoder", "text_encoder_2", "text_encoder_3"), "StableDiffusion3Pipeline",
             ("clip-l", "clip-g", "t5"), denoiser="transformer")
FLUX = Family("flux", "FLUX.1", ("text_encoder", "text_encoder_2"), "FluxPipeline", ("clip-l", "t5"),
              denoiser="transformer")
FAMILIES = {family.name: family for family in (SD1, SD2, SDXL, SD3, FLUX)}

SD_PIPELINES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"}
SDXL_PIPELINES = {"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"}
SD3_PIPELINES = {"StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"}
FLUX_PIPELINES = {"FluxPipeline", "FluxImg2ImgPipeline"}
SUPPORTED = "SD 1.x, SD 2.x, SDXL, SD 3.x or FLUX.1"


def family_from_configs(model_index: dict, text_encoder_config: dict | None, where: str) -> Family:
    """SD 1.x and 2.x share a pipeline class; their text encoders tell them apart (OpenAI CLIP uses quick_gelu,
    OpenCLIP ViT-H uses gelu)."""
    class_name = model_index.get("_class_name", "")
    named = [(SDXL_PIPELINES, SDXL), (SD3_PIPELINES, SD3), (FLUX_PIPELINES, FLUX), (SD_PIPELINES, None)]
    found = [family for classes, family in named if class_name in classes]
    if not found:
        what = f"a {class_name} pipeline" if class_name else "a pipeline of no named class"
        raise BadInput(f"{where} is {what}, which fewshot-erase does not support; pass an {SUPPORTED} model")
    family = found[0]
    for name in (family or SD1).encoders:
        if not model_index.get(name) or model_index[name][0] is None:
            raise BadInput(f"{where} has no {name}{_without(family or SD1, name)}; fewshot-erase needs a pipeline with its text encoder(s)")
    if family is not None:
        return family
    if text_encoder_config is None:
        raise BadInput(f"{where} has no text_encoder/config.json; re-save the pipeline with its text encoder")
    return SD2 if text_encoder_config.get("hidden_act") == "gelu" else SD1


def _without(family: Family, name: str) -> str:
    """What a missing encoder is, for the message (SD 3.x is often shared without its T5)."""
    kind = family.kinds.get(name, "")
    return f" ({kind.upper()})" if kind and len(family.encoders) > 1 else ""


# Prefixes of the text encoders in single-file checkpoints (CompVis / Stability layout, as A1111 and ComfyUI write).
SDXL_KEYS = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
SD2_KEYS = ("cond_stage_model.model.",)
SD1_KEYS = ("cond_stage_model.transformer.",)
UNET_KEYS = "model.diffusion_model."
# All-in-one SD 3.x and FLUX.1 files (Stability's, ComfyUI's): the transformer under UNET_KEYS, encoders here.
SD3_BLOCKS, FLUX_BLOCKS = UNET_KEYS + "joint_blocks.", UNET_KEYS + "double_blocks."
FLOW_ENCODER_KEYS = {"clip-l": "text_encoders.clip_l.transformer.", "clip-g": "text_encoders.clip_g.transformer.",
                     "t5": "text_encoders.t5xxl.transformer."}


def family_from_keys(keys: Iterable[str], where: str) -> Family:
    keys = list(keys)

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    if not has(UNET_KEYS):
        raise BadInput(f"{where} holds no Stable Diffusion UNet (no '{UNET_KEYS}*' tensors); is it a LoRA or another model?")
    if has(SD3_BLOCKS) or has(FLUX_BLOCKS):
        family = SD3 if has(SD3_BLOCKS) else FLUX
        missing = [name for name in family.encoder_names if not has(FLOW_ENCODER_KEYS[name])]
        if missing:
            raise BadInput(f"{where} is a {family.label} checkpoint without its {' and '.join(m.upper() for m in missing)} text "
                           f"encoder{'s' if len(missing) > 1 else ''}; the erase runs through every encoder the model "
                           "conditions on, even with --encoder clip-l: pass the all-in-one file that includes "
                           f"{'them' if len(missing) > 1 else 'it'}, or the model's diffusers folder")
        return family
    if all(has(prefix) for prefix in SDXL_KEYS):
        return SDXL
    if has(SD2_KEYS[0]):
        return SD2
    if has(SD1_KEYS[0]):
        return SD1
    if has("conditioner.embedders."):
        raise BadInput(f"{where} looks like an SDXL refiner or another SDXL variant; only SDXL base layouts are supported")
    raise BadInput(f"{where} has no text encoder of a known layout; fewshot-erase supports {SUPPORTED} checkpoints")
