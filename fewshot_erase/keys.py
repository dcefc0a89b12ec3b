"""Canonical tensor names of the CLIP text encoder, and which of them an erase trains. Pure tables and functions.

transformers >= 5.6 builds CLIPTextModel without its `text_model` wrapper, so its own names are `encoder.layers...`;
ComfyUI, A1111, older transformers and kohya LoRA names all expect `text_model.encoder.layers...`. Files written by
this tool always carry the canonical names, whatever the installed transformers calls them.
"""

from __future__ import annotations

import re

# First name component as the installed transformers may spell it -> the canonical prefix.
CLIP_TOP_LEVEL = {
    "text_model": "text_model",
    "embeddings": "text_model.embeddings",
    "encoder": "text_model.encoder",
    "final_layer_norm": "text_model.final_layer_norm",
    "text_projection": "text_projection",  # CLIPTextModelWithProjection keeps it outside text_model
}

LAYER_TENSOR = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(\w+)\.(\w+)\.(weight|bias)$")
FFN_MODULES = {("mlp", "fc1"), ("mlp", "fc2")}
ATTENTION_MODULES = {("self_attn", name) for name in ("q_proj", "k_proj", "v_proj", "out_proj")}


def canonical_clip_key(name: str) -> str:
    head, _, rest = name.partition(".")
    if head not in CLIP_TOP_LEVEL:
        raise KeyError(f"unexpected CLIP text encoder tensor {name!r}")
    return CLIP_TOP_LEVEL[head] + ("." + rest if rest else "")


def layer_of(canonical: str) -> tuple[int, str, str] | None:
    """(layer index, block, module) for a transformer-layer tensor, else None."""
    match = LAYER_TENSOR.match(canonical)
    return (int(match.group(1)), match.group(2), match.group(3)) if match else None


def is_trained(canonical: str, train: str, layer_count: int) -> bool:
    """`ffn`: fc1 and fc2 (weight and bias) of every layer, the paper's choice; `ffn+last-attn` adds the last
    layer's self-attention, as the reference code does; `all` trains the whole encoder."""
    if train == "all":
        return True
    where = layer_of(canonical)
    if where is None:
        return False
    layer, block, module = where
    if (block, module) in FFN_MODULES:
        return True
    return train == "ffn+last-attn" and layer == layer_count - 1 and (block, module) in ATTENTION_MODULES


def trained_encoders(family, encoder: str) -> list[str]:
    """SDXL erases in both encoders by default; SD 1.x and 2.x have one."""
    if len(family.encoders) == 1 or encoder == "both":
        return list(family.encoders)
    return [family.encoder_numbers[encoder]]
