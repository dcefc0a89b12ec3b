"""Canonical tensor names of the CLIP and T5 text encoders, and which of them an erase trains. Pure tables and
functions.

transformers >= 5.6 builds CLIPTextModel without its `text_model` wrapper, so its own names are `encoder.layers...`;
ComfyUI, A1111, older transformers and kohya LoRA names all expect `text_model.encoder.layers...`. Files written by
this tool always carry the canonical names, whatever the installed transformers calls them. T5's names are the ones
transformers gives `T5EncoderModel` (`encoder.block.N.layer.1.DenseReluDense.wi_0`), which ComfyUI's t5xxl files use too.
"""

from __future__ import annotations

import re

from .errors import BadInput

# First name component as the installed transformers may spell it -> the canonical prefix.
CLIP_TOP_LEVEL = {
    "text_model": "text_model",
    "embeddings": "text_model.embeddings",
    "encoder": "text_model.encoder",
    "final_layer_norm": "text_model.final_layer_norm",
    "text_projection": "text_projection",  # CLIPTextModelWithProjection keeps it outside text_model
}

LAYER_TENSOR = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(\w+)\.(\w+)\.(weight|bias)$")
# T5: layer.0 is self-attention, layer.1 the feed-forward (gated in T5 v1.1: wi_0, wi_1, wo; the original: wi, wo).
T5_LAYER_TENSOR = re.compile(r"^encoder\.block\.(\d+)\.layer\.\d+\.(SelfAttention|DenseReluDense)\.(\w+)\.weight$")
FFN_MODULES = {("mlp", "fc1"), ("mlp", "fc2")} | {("DenseReluDense", name) for name in ("wi", "wi_0", "wi_1", "wo")}
ATTENTION_MODULES = ({("self_attn", name) for name in ("q_proj", "k_proj", "v_proj", "out_proj")}
                     | {("SelfAttention", name) for name in ("q", "k", "v", "o")})
T5_TIED = "encoder.embed_tokens.weight"  # the same tensor as `shared.weight`; files keep only that one


def encoder_kind(text_encoder) -> str:
    return "t5" if type(text_encoder).__name__.startswith("T5") else "clip"


def canonical_clip_key(name: str) -> str:
    head, _, rest = name.partition(".")
    if head not in CLIP_TOP_LEVEL:
        raise KeyError(f"unexpected CLIP text encoder tensor {name!r}")
    return CLIP_TOP_LEVEL[head] + ("." + rest if rest else "")


def canonical_key(kind: str, name: str) -> str:
    return name if kind == "t5" else canonical_clip_key(name)


def layer_of(canonical: str) -> tuple[int, str, str] | None:
    """(layer index, block, module) for a transformer-layer tensor of either encoder, else None."""
    match = LAYER_TENSOR.match(canonical) or T5_LAYER_TENSOR.match(canonical)
    return (int(match.group(1)), match.group(2), match.group(3)) if match else None


def is_trained(canonical: str, train: str, layer_count: int, layers: frozenset[int] | None = None) -> bool:
    """`ffn`: the feed-forward weights (CLIP's fc1 and fc2 with their biases, T5's wi/wo) of every layer, the
    paper's choice, or of `layers` only; `ffn+last-attn` adds the last layer's self-attention, as the reference code
    does; `all` trains the whole encoder."""
    if train == "all":
        return True
    where = layer_of(canonical)
    if where is None:
        return False
    layer, block, module = where
    if (block, module) in FFN_MODULES:
        return layers is None or layer in layers
    return train == "ffn+last-attn" and layer == layer_count - 1 and (block, module) in ATTENTION_MODULES


def trained_blocks(kind: str, t5_layers) -> frozenset[int] | None:
    """The layers whose feed-forward weights train: --t5-layers narrows T5's; None, every layer."""
    return frozenset(t5_layers) if kind == "t5" and t5_layers is not None else None


ALL_ENCODERS = ("both", "all")


def encoder_choice_ok(encoder: str | None) -> bool:
    """The syntax of --encoder: `all` (or `both`), or a comma list of positions and names (`1`, `clip-l,t5`)."""
    return encoder is None or encoder in ALL_ENCODERS or all(
        re.fullmatch(r"[1-9]|[a-z][a-z0-9-]*", part) for part in encoder.split(","))


def trained_encoders(family, encoder: str | None) -> list[str]:
    """The encoders an erase trains: all of them unless told (on FLUX-layout demos CLIP alone is far from enough, T5
    alone and both tie, and both leave no encoder untouched: docs/flow-models.md); names the family lacks are refused."""
    if encoder is None or encoder in ALL_ENCODERS or len(family.encoders) == 1 and encoder in ("1", *family.encoder_names):
        return list(family.encoders)
    known = family.encoder_numbers
    wrong = [part for part in encoder.split(",") if part not in known]
    if wrong:
        names = ", ".join([*family.encoder_names, *map(str, range(1, len(family.encoders) + 1)), "all"])
        raise BadInput(f"{family.label} has no text encoder {wrong[0]!r}; --encoder takes {names}")
    return [name for name in family.encoders if name in {known[part] for part in encoder.split(",")}]
