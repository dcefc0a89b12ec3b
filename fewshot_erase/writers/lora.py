"""`export --format lora-kohya|lora-diffusers`: each feed-forward weight difference as low-rank factors (its
truncated SVD), under key names the ecosystem loads, with the erase record and what the export measured.

Two flavours of the same factors. kohya's (`lora_te_..._mlp_fc1.lora_down/lora_up/alpha`, SDXL `lora_te1_`/`lora_te2_`)
is what A1111, ComfyUI and diffusers all read. diffusers' is its own text-encoder naming
(`text_encoder.<module>.lora_linear_layer.down/up`): diffusers cannot load a text-encoder LoRA named peft's way
(`lora_A`/`lora_B`) that touches only fc1/fc2, since its peft-to-diffusers key table has rows for attention only.
alpha equals the rank, so every loader applies the factors at scale 1.

The erase also moves fc1/fc2's biases. kohya's keys have no place for them (diffusers refuses a kohya file with
ComfyUI's `diff_b` keys), so that flavour leaves them out; diffusers' carries them as `up.bias` (peft's lora_bias).
The reported errors say what leaving them out costs.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import safetensors_file
from ..errors import BadInput
from ..families import SDXL
from .text_encoder import METADATA_KEY

FLAVOURS = ("lora-kohya", "lora-diffusers")
# Without --rank, the smallest of these (up to each matrix's full rank) whose LoRA misses at most TOLERANCE of the
# erase's effect on the erased prompts' embeddings: how much rank an erase needs depends on the erase
# (docs/lora-rank.md).
AUTO_RANKS = (4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOLERANCE = 0.01
KOHYA_PREFIXES = {
    "sd1": {"text_encoder": "lora_te_"},
    "sd2": {"text_encoder": "lora_te_"},
    "sdxl": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
    # kohya's sd-scripts and ComfyUI: CLIP-L te1, CLIP-G te2, T5 te3 (FLUX.1 too, which has no CLIP-G)
    "sd3": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"},
    "flux": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"},
}
ENCODER_CLASSES = {
    "sd1": ("CLIPTextModel",), "sd2": ("CLIPTextModel",), "sdxl": ("CLIPTextModel", "CLIPTextModelWithProjection"),
    "sd3": ("CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"),
    "flux": ("CLIPTextModel", "T5EncoderModel"),
}


def lora_keys(flavour: str, family: str, encoder: str, module: str) -> dict[str, str]:
    """The file's key for each part of one module's LoRA, `module` named canonically (text_model.encoder...fc1)."""
    if flavour == "lora-kohya":
        name = KOHYA_PREFIXES[family][encoder] + module.replace(".", "_")  # kohya flattens the module path
        return {"down": f"{name}.lora_down.weight", "up": f"{name}.lora_up.weight", "alpha": f"{name}.alpha"}
    name = f"{encoder}.{module}.lora_linear_layer"
    return {"down": f"{name}.down.weight", "up": f"{name}.up.weight", "bias": f"{name}.up.bias"}


def factorise(difference, rank: int):
    """up @ down, the best rank-`rank` approximation of `difference`; the singular values are split evenly between
    the factors so that neither underflows in fp16."""
    import torch

    u, s, vh = torch.linalg.svd(difference.float(), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def _relative(error, reference) -> float:
    size = reference.norm().item()
    return error.norm().item() / size if size > 0 else 0.0


def write_lora(path, flavour: str, patch, base: dict, differences: dict, rank: int | None, record: dict,
               tokenizers=None) -> dict:
    """Write the file at `rank` (None: the smallest of AUTO_RANKS within TOLERANCE); return the report (also stored
    in the record): the rank used, each layer's relative reconstruction error and the effect on the erased prompts'
    embeddings against the full patch. `tokenizers`: SD 3.x / FLUX.1, the folder holding the base's."""
    if patch.family.flow_matching and flavour == "lora-diffusers":
        raise BadInput(f"diffusers' {patch.family.label} LoRA loader takes no T5 weights, so a lora-diffusers file cannot carry this "
                       "erase; export lora-kohya (ComfyUI, Forge), delta (apply) or drop-in")
    full_rank = max(min(d.shape) for changes in differences.values() for d in changes.values() if d.dim() == 2)
    tried = [rank] if rank else [r for r in AUTO_RANKS if r < full_rank] + [full_rank]
    for candidate in tried:
        tensors, layers, approximate = low_rank(flavour, patch, differences, candidate)
        errors = embedding_errors(patch, base, differences, approximate, tokenizers)
        if errors["effect_error"] <= TOLERANCE:
            break
    report = {"format": flavour, "rank": min(candidate, full_rank), "rank_asked": rank if rank else "auto",
              "full_rank": full_rank, "dtype": "float16",
              "biases": "kept" if flavour == "lora-diffusers" else "left out", "layers": layers, **errors}
    metadata = {"format": "pt", METADATA_KEY: json.dumps({**record, "export": report}, sort_keys=True)}
    safetensors_file.write(path, tensors, metadata)
    return report


def low_rank(flavour: str, patch, differences: dict, rank: int) -> tuple[dict, dict, dict]:
    """The file's tensors at `rank`, each layer's relative reconstruction error, and the differences they add."""
    import torch

    tensors, layers, approximate = {}, {}, {}
    for encoder, changes in differences.items():
        for name, difference in sorted(changes.items()):
            module, param = name.rsplit(".", 1)
            keys = lora_keys(flavour, patch.family.name, encoder, module)
            if param == "bias":
                if "bias" in keys:
                    tensors[keys["bias"]] = difference.to(torch.float16)
                    approximate.setdefault(encoder, {})[name] = tensors[keys["bias"]].float()
                continue
            up, down = (factor.to(torch.float16).contiguous() for factor in factorise(difference, rank))
            tensors[keys["up"]], tensors[keys["down"]] = up, down
            if "alpha" in keys:
                tensors[keys["alpha"]] = torch.tensor(float(down.shape[0]), dtype=torch.float16)
            approximate.setdefault(encoder, {})[name] = up.float() @ down.float()
            layers[f"{encoder}:{module.removeprefix('text_model.encoder.')}"] = _relative(approximate[encoder][name] - difference, difference)
    return tensors, layers, approximate


def reader(flavour: str):
    """The differences a LoRA file of `flavour` adds, for `apply`: up @ down * alpha / rank per weight."""

    def differences(tensors: dict, record: dict, family) -> dict:
        found = {}
        for encoder, names in record["trained_tensors"].items():
            for name in names:
                module, param = name.rsplit(".", 1)
                keys = lora_keys(flavour, family.name, encoder, module)
                if param == "bias":
                    if keys.get("bias") in tensors:
                        found.setdefault(encoder, {})[name] = tensors[keys["bias"]]
                    continue
                up, down = tensors.get(keys["up"]), tensors.get(keys["down"])
                alpha = tensors.get(keys.get("alpha"))  # kohya: no alpha means alpha = rank
                if (up is None or down is None or up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0]
                        or alpha is not None and alpha.numel() != 1):
                    raise BadInput(f"LoRA patch lacks {keys['down']!r} or {keys['up']!r}, or their shapes do not match; the file is damaged, export it again")
                scale = alpha.item() / down.shape[0] if alpha is not None else 1.0
                found.setdefault(encoder, {})[name] = up.float() @ down.float() * scale
        return found

    return differences


def erased_prompts(record: dict) -> list[str]:
    from ..prompts import fill

    return [fill(template, concept["concept"]) for concept in record["concepts"] for template in concept["templates"]]


def embedding_errors(patch, base: dict, full: dict, approximate: dict, tokenizers=None) -> dict:
    """How far the LoRA leaves the erased prompts' conditioning from where the full patch puts it, relative to
    that conditioning (`embedding_error`) and to how far the full patch moved it from the base's (`effect_error`,
    the share of the erase's effect that the LoRA misses: the stricter one whenever an erase moves the embeddings
    only a little)."""
    pipeline = text_only_pipeline(patch.source, patch.family, tokenizers)
    prompts = erased_prompts(patch.record)
    length = patch.record.get("settings", {}).get("max_sequence_length")
    embeddings = {}
    for variant, changes in (("base", {}), ("full", full), ("lora", approximate)):
        _set_feed_forward(pipeline, base, changes)
        embeddings[variant] = conditioning(pipeline, patch.family, prompts, length)
    missed = embeddings["lora"] - embeddings["full"]
    return {"embedding_error": _relative(missed, embeddings["full"]),
            "effect_error": _relative(missed, embeddings["full"] - embeddings["base"]), "prompts": len(prompts)}


def text_only_pipeline(output, family, tokenizers=None):
    """The family's pipeline with only the erase output's text encoders and their tokenizers (SD 3.x / FLUX.1: the
    base's, from `tokenizers`): its `encode_prompt` builds the conditioning exactly as generation does."""
    import diffusers
    import transformers

    from ..models import family_tokenizers, quiet_libraries
    from .text_encoder import encoder_folder

    quiet_libraries()
    if family.flow_matching:
        names = ["tokenizer", "tokenizer_2", "tokenizer_3"][: len(family.encoders)]
        parts = {name: transformers.AutoTokenizer.from_pretrained(str(Path(tokenizers) / name)) for name in names}
        extra = {"transformer": None}
    else:
        parts = family_tokenizers(family)
        extra = {"unet": None} if family is SDXL else {"unet": None, "safety_checker": None, "feature_extractor": None,
                                                       "requires_safety_checker": False}
    for encoder, class_name in zip(family.encoders, ENCODER_CLASSES[family.name]):
        parts[encoder] = getattr(transformers, class_name).from_pretrained(str(encoder_folder(output, family, encoder))).eval()
    return getattr(diffusers, family.pipeline_class)(vae=None, scheduler=None, **parts, **extra)


def _set_feed_forward(pipeline, base: dict, changes: dict) -> None:
    import torch

    from ..keys import canonical_key, encoder_kind

    with torch.no_grad():
        for encoder, originals in base.items():
            module = getattr(pipeline, encoder)
            parameters = {canonical_key(encoder_kind(module), n): p for n, p in module.named_parameters()}
            for name, original in originals.items():
                change = changes.get(encoder, {}).get(name)
                parameters[name].copy_(original.float() + change if change is not None else original.float())


def conditioning(pipeline, family, prompts: list[str], sequence_length: int | None = None):
    """The denoiser's conditioning for `prompts`, flattened: SDXL's, SD 3.x's and FLUX.1's include the pooled
    embedding."""
    import torch

    from ..conditioning import SEQUENCE_LENGTH

    with torch.no_grad():
        if family.flow_matching:
            length = sequence_length or SEQUENCE_LENGTH[family.name]
            if family.name == "sd3":
                embeds, _, pooled, _ = pipeline.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device="cpu",
                                                              do_classifier_free_guidance=False, max_sequence_length=length)
            else:
                embeds, pooled, _ = pipeline.encode_prompt(prompt=prompts, prompt_2=None, device="cpu", max_sequence_length=length)
            return torch.cat([embeds.flatten(), pooled.flatten()])
        if family is SDXL:
            embeds, _, pooled, _ = pipeline.encode_prompt(prompt=prompts, device="cpu", num_images_per_prompt=1,
                                                          do_classifier_free_guidance=False)
            return torch.cat([embeds.flatten(), pooled.flatten()])
        return pipeline.encode_prompt(prompts, "cpu", 1, False)[0].flatten()
