"""The denoiser's conditioning exactly as each pipeline builds it when generating, and the original encoder's, frozen.

Both terms of an erase read these: the objective conditions the UNet on the patched encoder's captions, the retain
term compares kept captions against their original conditioning.
"""

from __future__ import annotations

import weakref

import torch

from .families import FLUX, SD3, SDXL

# Keys of a conditioning that are the same for every row (FLUX's position ids): never sliced, never compared.
SHARED = ("txt_ids", "img_ids")
# The pipelines' own default T5 length, where `encode_prompt` has one (what `max_sequence_length` defaults to).
SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}
# What diffusers' FLUX training scripts feed a guidance-distilled model (FLUX.1 [dev]) while training.
FLUX_GUIDANCE = 3.5


def denoiser_of(pipeline):
    return getattr(pipeline, "unet", None) or pipeline.transformer


def conditioning(pipeline, family, captions: list[str], resolution: int, dtype, device=None,
                 sequence_length: int | None = None) -> dict:
    """The denoiser's conditioning for `captions`, with gradients kept.

    SD 1.x takes the last hidden state; SD 2.x in diffusers form already ends at the original's penultimate layer
    (both as the pipeline's `encode_prompt` computes them); SDXL, through the pipeline's own `encode_prompt`,
    concatenates the penultimate hidden states of both encoders and adds the second's pooled output and the
    size/crop time ids. SD 3.x and FLUX.1 through theirs too: SD 3.x's CLIP tokens padded to T5's width before T5's
    `sequence_length` tokens, both CLIPs' pooled outputs; FLUX.1's T5 tokens, CLIP-L's pooled output, the position
    ids of text and image and, where the model has one, the guidance value its training scripts feed."""
    device = device or denoiser_of(pipeline).device  # the loop passes it: asking diffusers costs a walk of the model
    if family is SD3 or family is FLUX:
        length = sequence_length or SEQUENCE_LENGTH[family.name]
        if family is SD3:
            embeds, _, pooled, _ = pipeline.encode_prompt(
                prompt=captions, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
                do_classifier_free_guidance=False, max_sequence_length=length)
            return {"encoder_hidden_states": embeds.to(dtype), "pooled_projections": pooled.to(dtype)}
        embeds, pooled, text_ids = pipeline.encode_prompt(prompt=captions, prompt_2=None, device=device,
                                                          num_images_per_prompt=1, max_sequence_length=length)
        latent = resolution // pipeline.vae_scale_factor // 2  # FLUX packs 2x2 latent patches into one token
        cond = {"encoder_hidden_states": embeds.to(dtype), "pooled_projections": pooled.to(dtype),
                "txt_ids": text_ids.to(dtype),
                "img_ids": pipeline._prepare_latent_image_ids(1, latent, latent, device, dtype)}
        if pipeline.transformer.config.guidance_embeds:
            cond["guidance"] = torch.full((len(captions),), FLUX_GUIDANCE, device=device, dtype=torch.float32)
        return cond
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
    # SD 1.x and 2.x: what `encode_prompt` does with no clip skip, LoRA scale or textual inversion (the erase loads
    # none), minus its tokenizing every caption three times per call (docs/speed.md). Tested equal to it.
    ids, mask = token_ids(pipeline.tokenizer, captions)
    use_mask = getattr(pipeline.text_encoder.config, "use_attention_mask", False)
    embeds = pipeline.text_encoder(ids.to(device), attention_mask=mask.to(device) if use_mask else None)[0]
    return {"encoder_hidden_states": embeds.to(dtype)}


_TOKENS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> caption -> (ids, attention mask)


def token_ids(tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The captions' ids and attention mask as the pipeline pads and truncates them, each caption tokenized once per
    tokenizer (weakly held: a pipeline that goes away takes its cache with it)."""
    known = _TOKENS.setdefault(tokenizer, {})
    missing = [caption for caption in dict.fromkeys(captions) if caption not in known]
    if missing:
        tokens = tokenizer(missing, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
        known.update(zip(missing, zip(tokens.input_ids, tokens.attention_mask)))
    return torch.stack([known[c][0] for c in captions]), torch.stack([known[c][1] for c in captions])


def conditioning_tensors(cond: dict) -> list[torch.Tensor]:
    """What the retain term compares: the token embeddings, and the pooled embedding where there is one (SDXL's,
    SD 3.x's and FLUX.1's)."""
    added = cond.get("added_cond_kwargs") or {}
    pooled = [added["text_embeds"]] if "text_embeds" in added else []
    return [cond["encoder_hidden_states"]] + pooled + ([cond["pooled_projections"]] if "pooled_projections" in cond else [])


FROZEN_CHUNK = 16  # captions per encoder call when computing the originals: batched, but never a memory peak


@torch.no_grad()
def frozen_conditioning(pipeline, family, captions, resolution, dtype,
                        known: dict[str, list[torch.Tensor]] | None = None,
                        sequence_length: int | None = None) -> dict[str, list[torch.Tensor]]:
    """The ORIGINAL encoder's conditioning per caption, computed once before any weight moves; `known` ones are
    taken as they are."""
    known = known or {}
    unique = [caption for caption in dict.fromkeys(captions) if caption not in known]
    frozen = {caption: known[caption] for caption in captions if caption in known}
    for start in range(0, len(unique), FROZEN_CHUNK):
        chunk = unique[start:start + FROZEN_CHUNK]
        tensors = conditioning_tensors(conditioning(pipeline, family, chunk, resolution, dtype,
                                                    sequence_length=sequence_length))
        frozen.update({caption: [t[i:i + 1] for t in tensors] for i, caption in enumerate(chunk)})
    return frozen


def select_rows(cond: dict, rows) -> dict:
    """Some rows of a conditioning (pooled embeddings, time ids and guidance with them; position ids shared);
    `rows` a slice or an index."""
    return {key: value if key in SHARED else select_rows(value, rows) if isinstance(value, dict) else value[rows]
            for key, value in cond.items()}


def split_conditioning(cond: dict, count: int) -> tuple[dict, list[torch.Tensor]]:
    """One encoder call serves both terms: the first `count` rows condition the UNet, the rest are the kept
    captions the retain term compares (a second call per step costs more than the extra rows)."""
    return select_rows(cond, slice(0, count)), [t[count:] for t in conditioning_tensors(cond)]


def stacked(frozen: dict, captions: list[str]) -> list[torch.Tensor]:
    """The frozen conditioning of `captions`, one row each, in order."""
    parts = [frozen[caption] for caption in captions]
    return [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))]


def as_cond(tensors: list[torch.Tensor], like: dict) -> dict:
    """Frozen conditioning tensors back in the denoiser's keyword form, the rest as in `like` (SDXL's time ids,
    FLUX's position ids and guidance)."""
    cond = {**like, "encoder_hidden_states": tensors[0]}
    if "added_cond_kwargs" in like:
        cond["added_cond_kwargs"] = {**like["added_cond_kwargs"], "text_embeds": tensors[1]}
    if "pooled_projections" in like:
        cond["pooled_projections"] = tensors[1]
    return cond
