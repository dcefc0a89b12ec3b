"""Tiny, real-architecture Stable Diffusion pipelines for tests, saved in every accepted form.

Everything here is offline: the tokenizer is the packaged SD 1.x CLIP BPE tokenizer
(``fewshot_erase/tokenizer``), all weights are random and seeded.

Public helpers
--------------
``FAMILIES``                               ("sd1", "sd2", "sdxl")
``load_tokenizer(pad_token=None)``         the real CLIP tokenizer (pad "!" for SD2 / SDXL's 2nd)
``build_tiny_pipeline(family, seed=0)``    StableDiffusionPipeline / StableDiffusionXLPipeline
``canonical_text_encoder_state_dict(te)``  text encoder weights under canonical ``text_model.*`` names
``save_diffusers_folder(pipe, path)``      diffusers folder, canonical text-encoder keys, BPE files
``to_original_state_dict(pipe, family)``   CompVis / Stability / A1111 / ComfyUI single-file layout
``save_single_file(pipe, path, family, dtype=torch.float32, extras=True)``
``tiny_config_dir(pipe, path)``            component configs only (shape of fewshot_erase/configs/<family>)
``load_single_file_pipeline(path, family, config_dir, **kw)``  the offline ``from_single_file`` call
``save_hub_cache(pipe_folder, cache_dir, repo_id, commit=None)``  local HF Hub cache layout

Quirks this module has to respect (diffusers 0.42 / transformers 5.x):

* transformers >= 5.6 builds ``CLIPTextModel`` without the ``text_model`` wrapper
  (``CLIPTextModelWithProjection`` still has it), so key names are written from an
  explicit table, never from ``named_modules()``.
* diffusers tells SDXL's two text encoders apart in a single file by the hidden size of
  ``positional_embedding`` / ``position_embedding``: if both had the same width the
  OpenCLIP encoder (text_encoder_2) would be loaded with the CLIP-L weights.  The tiny
  SDXL therefore uses width 32 for text_encoder and 64 for text_encoder_2.
* the SD2 single file holds one OpenCLIP resblock more than diffusers' text encoder
  (SD2 uses the penultimate layer); diffusers only knows to drop ``resblocks.23``, any
  other surplus block is silently ignored by ``load_state_dict(strict=False)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import torch

from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from fewshot_erase.models import dtype_keyword

FAMILIES = ("sd1", "sd2", "sdxl")

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO_ROOT / "fewshot_erase" / "demo" / "tokenizer"
PACKAGED_CONFIGS_DIR = REPO_ROOT / "fewshot_erase" / "configs"

VOCAB_SIZE = 49408
MAX_POSITIONS = 77

# SD beta schedule (all three families)
_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


# --------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------
def load_tokenizer(pad_token: str | None = None) -> CLIPTokenizer:
    """The real CLIP BPE tokenizer; ``pad_token="!"`` for SD 2.x and SDXL's tokenizer_2."""
    if pad_token is None:
        return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), pad_token=pad_token)


def tokenizers_for(family: str) -> dict[str, CLIPTokenizer]:
    """Tokenizer objects keyed by pipeline component name (what ``from_single_file`` needs)."""
    if family == "sd1":
        return {"tokenizer": load_tokenizer()}
    if family == "sd2":
        return {"tokenizer": load_tokenizer("!")}
    if family == "sdxl":
        return {"tokenizer": load_tokenizer(), "tokenizer_2": load_tokenizer("!")}
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


# --------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------
def _text_config(hidden: int, layers: int, heads: int, act: str, projection_dim: int | None = None) -> CLIPTextConfig:
    kw = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=MAX_POSITIONS,
        hidden_act=act,
        layer_norm_eps=1e-5,
        # the published SD configs carry the legacy ids (eos 2 -> pooled output at argmax(input_ids))
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    if projection_dim is not None:
        kw["projection_dim"] = projection_dim
    return CLIPTextConfig(**kw)


def _vae(scaling_factor: float, force_upcast: bool = True) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


def build_tiny_pipeline(family: str, seed: int = 0):
    """A scaled-down random-weight pipeline of the real architecture of ``family``.

    sd1:  CLIPTextModel (quick_gelu), conv proj_in/out UNet, epsilon, PNDM
    sd2:  CLIPTextModel (gelu, OpenCLIP-H style), linear proj UNet, upcast_attention, v_prediction, DDIM
    sdxl: CLIPTextModel (quick_gelu, 32) + CLIPTextModelWithProjection (gelu, 64), text_time UNet, Euler
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    torch.manual_seed(seed)
    toks = tokenizers_for(family)

    if family == "sd1":
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=2,
            cross_attention_dim=32,
            attention_head_dim=2,
            norm_num_groups=32,
        )
        text_encoder = CLIPTextModel(_text_config(32, 3, 4, "quick_gelu", projection_dim=32))
        vae = _vae(0.18215, force_upcast=True)
        scheduler = PNDMScheduler(**_BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=toks["tokenizer"],
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    elif family == "sd2":
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=2,
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            upcast_attention=True,
            norm_num_groups=32,
        )
        text_encoder = CLIPTextModel(_text_config(32, 3, 4, "gelu", projection_dim=32))
        vae = _vae(0.18215, force_upcast=True)
        scheduler = DDIMScheduler(
            **_BETAS,
            prediction_type="v_prediction",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=toks["tokenizer"],
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:  # sdxl
        te1_hidden, te2_hidden = 32, 64  # MUST differ, see module docstring
        addition_time_embed_dim = 8
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=2,
            cross_attention_dim=te1_hidden + te2_hidden,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=addition_time_embed_dim,
            # 6 micro-conditioning ints (orig size, crop, target size) + pooled text_embeds
            projection_class_embeddings_input_dim=6 * addition_time_embed_dim + te2_hidden,
            norm_num_groups=32,
        )
        text_encoder = CLIPTextModel(_text_config(te1_hidden, 3, 4, "quick_gelu", projection_dim=te1_hidden))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(te2_hidden, 3, 4, "gelu", projection_dim=te2_hidden))
        vae = _vae(0.13025, force_upcast=True)
        scheduler = EulerDiscreteScheduler(
            **_BETAS,
            prediction_type="epsilon",
            interpolation_type="linear",
            timestep_spacing="leading",
            steps_offset=1,
        )
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=toks["tokenizer"],
            tokenizer_2=toks["tokenizer_2"],
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    for module in _model_components(pipe).values():
        module.eval()
    return pipe


def _model_components(pipe) -> dict[str, torch.nn.Module]:
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    return {n: getattr(pipe, n) for n in names if isinstance(getattr(pipe, n, None), torch.nn.Module)}


def family_of(pipe) -> str:
    if isinstance(pipe, StableDiffusionXLPipeline):
        return "sdxl"
    return "sd2" if pipe.scheduler.config.prediction_type == "v_prediction" else "sd1"


# --------------------------------------------------------------------------------------
# canonical text-encoder names
# --------------------------------------------------------------------------------------
_CLIP_LAYER_PARAMS = (
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.out_proj.weight",
    "self_attn.out_proj.bias",
    "layer_norm1.weight",
    "layer_norm1.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
    "layer_norm2.weight",
    "layer_norm2.bias",
)


def _resolve(module: torch.nn.Module, dotted: str) -> torch.Tensor:
    obj = module
    for part in dotted.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, torch.Tensor):
        raise KeyError(dotted)
    return obj


def canonical_text_encoder_state_dict(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{canonical_name: tensor}`` for a CLIPTextModel / CLIPTextModelWithProjection.

    Canonical names are those of transformers < 5.6, ComfyUI, A1111 and single files:
    ``text_model.embeddings.token_embedding.weight``, ``text_model.encoder.layers.N.mlp.fc1.weight``,
    ``text_model.final_layer_norm.weight`` and the top-level ``text_projection.weight``.
    """
    inner = text_encoder.text_model if hasattr(text_encoder, "text_model") else text_encoder
    n_layers = text_encoder.config.num_hidden_layers
    table: dict[str, str] = {  # canonical name -> attribute path relative to `inner`
        "text_model.embeddings.token_embedding.weight": "embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "embeddings.position_embedding.weight",
        "text_model.final_layer_norm.weight": "final_layer_norm.weight",
        "text_model.final_layer_norm.bias": "final_layer_norm.bias",
    }
    for i in range(n_layers):
        for p in _CLIP_LAYER_PARAMS:
            table[f"text_model.encoder.layers.{i}.{p}"] = f"encoder.layers.{i}.{p}"
    out = {name: _resolve(inner, path) for name, path in table.items()}
    if isinstance(text_encoder, CLIPTextModelWithProjection):
        out["text_projection.weight"] = text_encoder.text_projection.weight
    n_params = len(text_encoder.state_dict())
    if n_params != len(out):
        raise AssertionError(f"canonical table covers {len(out)} of {n_params} text-encoder tensors")
    return out


# --------------------------------------------------------------------------------------
# diffusers folder
# --------------------------------------------------------------------------------------
def save_diffusers_folder(pipe, path) -> Path:
    """``pipe.save_pretrained(path)`` with canonical ``text_model.*`` keys and BPE vocab files."""
    path = Path(path)
    pipe.save_pretrained(str(path), safe_serialization=True)
    for name in ("text_encoder", "text_encoder_2"):
        te = getattr(pipe, name, None)
        if te is None:
            continue
        folder = path / name
        for old in folder.glob("model*.safetensors*"):
            old.unlink()
        sd = {k: v.detach().contiguous().clone() for k, v in canonical_text_encoder_state_dict(te).items()}
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer", "tokenizer_2"):
        folder = path / name
        if not folder.is_dir():
            continue
        for fname in ("vocab.json", "merges.txt"):
            if not (folder / fname).is_file():
                shutil.copyfile(TOKENIZER_DIR / fname, folder / fname)
    return path


def tiny_config_dir(pipe, path) -> Path:
    """Component configs only (model_index.json, */config.json, scheduler_config.json), no weights/tokenizers."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_config(str(path))  # model_index.json
    for name, module in _model_components(pipe).items():
        (path / name).mkdir(exist_ok=True)
        if hasattr(module, "save_config"):  # diffusers models
            module.save_config(str(path / name))
        else:  # transformers models
            module.config.save_pretrained(str(path / name))
    (path / "scheduler").mkdir(exist_ok=True)
    pipe.scheduler.save_config(str(path / "scheduler"))
    return path


# --------------------------------------------------------------------------------------
# original (LDM / SGM) single-file layout
# --------------------------------------------------------------------------------------
_UNET_TOP = {  # diffusers -> ldm (relative to model.diffusion_model.)
    "time_embedding.linear_1.weight": "time_embed.0.weight",
    "time_embedding.linear_1.bias": "time_embed.0.bias",
    "time_embedding.linear_2.weight": "time_embed.2.weight",
    "time_embedding.linear_2.bias": "time_embed.2.bias",
    "conv_in.weight": "input_blocks.0.0.weight",
    "conv_in.bias": "input_blocks.0.0.bias",
    "conv_norm_out.weight": "out.0.weight",
    "conv_norm_out.bias": "out.0.bias",
    "conv_out.weight": "out.2.weight",
    "conv_out.bias": "out.2.bias",
    # SDXL micro-conditioning / pooled text embedding
    "add_embedding.linear_1.weight": "label_emb.0.0.weight",
    "add_embedding.linear_1.bias": "label_emb.0.0.bias",
    "add_embedding.linear_2.weight": "label_emb.0.2.weight",
    "add_embedding.linear_2.bias": "label_emb.0.2.bias",
}
_UNET_RESNET = {  # diffusers -> ldm inside a ResBlock
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _unet_prefix_table(config) -> list[tuple[str, str, str]]:
    """``(diffusers_prefix, ldm_prefix, kind)`` with kind in {"resnet", "attn", "plain"}."""
    L = config.layers_per_block
    if not isinstance(L, int):
        raise NotImplementedError("per-block layers_per_block is not an SD layout")
    down, up = config.down_block_types, config.up_block_types
    nb = len(config.block_out_channels)
    rows: list[tuple[str, str, str]] = []
    for i in range(nb):
        for j in range(L):
            k = (L + 1) * i + j + 1
            rows.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", "resnet"))
            if "CrossAttn" in down[i]:
                rows.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.", "attn"))
        if i < nb - 1:
            rows.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(L + 1) * (i + 1)}.0.op.", "plain"))
    rows.append(("mid_block.resnets.0.", "middle_block.0.", "resnet"))
    rows.append(("mid_block.attentions.0.", "middle_block.1.", "attn"))
    rows.append(("mid_block.resnets.1.", "middle_block.2.", "resnet"))
    for i in range(nb):
        for j in range(L + 1):
            k = (L + 1) * i + j
            rows.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.", "resnet"))
            if "CrossAttn" in up[i]:
                rows.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1.", "attn"))
        if i < nb - 1:
            slot = 2 if "CrossAttn" in up[i] else 1
            rows.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{(L + 1) * i + L}.{slot}.conv.", "plain"))
    return rows


def unet_to_ldm(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel state dict -> LDM ``openaimodel.UNetModel`` names (no prefix).

    Transformer blocks (SpatialTransformer) use identical inner names in both layouts.
    """
    rows = _unet_prefix_table(config)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key in _UNET_TOP:
            out[_UNET_TOP[key]] = tensor
            continue
        for dprefix, lprefix, kind in rows:
            if key.startswith(dprefix):
                rest = key[len(dprefix):]
                if kind == "resnet":
                    module, _, leaf = rest.partition(".")
                    rest = f"{_UNET_RESNET[module]}.{leaf}"
                out[lprefix + rest] = tensor
                break
        else:
            raise KeyError(f"no LDM name for UNet tensor {key!r}")
    if len(out) != len(state_dict):
        raise AssertionError("UNet key collision in LDM conversion")
    return out


_VAE_TOP = {
    "encoder.conv_in.weight": "encoder.conv_in.weight",
    "encoder.conv_in.bias": "encoder.conv_in.bias",
    "encoder.conv_out.weight": "encoder.conv_out.weight",
    "encoder.conv_out.bias": "encoder.conv_out.bias",
    "encoder.conv_norm_out.weight": "encoder.norm_out.weight",
    "encoder.conv_norm_out.bias": "encoder.norm_out.bias",
    "decoder.conv_in.weight": "decoder.conv_in.weight",
    "decoder.conv_in.bias": "decoder.conv_in.bias",
    "decoder.conv_out.weight": "decoder.conv_out.weight",
    "decoder.conv_out.bias": "decoder.conv_out.bias",
    "decoder.conv_norm_out.weight": "decoder.norm_out.weight",
    "decoder.conv_norm_out.bias": "decoder.norm_out.bias",
    "quant_conv.weight": "quant_conv.weight",
    "quant_conv.bias": "quant_conv.bias",
    "post_quant_conv.weight": "post_quant_conv.weight",
    "post_quant_conv.bias": "post_quant_conv.bias",
}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_prefix_table(config) -> list[tuple[str, str, str]]:
    nb = len(config.block_out_channels)
    L = config.layers_per_block
    rows: list[tuple[str, str, str]] = []
    for i in range(nb):
        for j in range(L):
            rows.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", "resnet"))
        if i < nb - 1:
            rows.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", "plain"))
    for i in range(nb):
        for j in range(L + 1):
            rows.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{nb - 1 - i}.block.{j}.", "resnet"))
        if i < nb - 1:
            rows.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{nb - 1 - i}.upsample.conv.", "plain"))
    for part in ("encoder", "decoder"):
        rows.append((f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", "resnet"))
        rows.append((f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", "resnet"))
        rows.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", "attn"))
    return rows


def vae_to_ldm(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> LDM ``AutoencoderKL`` names (no prefix).

    Mid-block attention projections become 1x1 convolutions (C, C, 1, 1) as in the original files.
    """
    rows = _vae_prefix_table(config)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key in _VAE_TOP:
            out[_VAE_TOP[key]] = tensor
            continue
        for dprefix, lprefix, kind in rows:
            if key.startswith(dprefix):
                rest = key[len(dprefix):]
                module, _, leaf = rest.rpartition(".")
                if kind == "resnet":
                    rest = f"{_VAE_RESNET[module]}.{leaf}"
                elif kind == "attn":
                    rest = f"{_VAE_ATTN[module]}.{leaf}"
                    if leaf == "weight" and module != "group_norm":
                        tensor = tensor.reshape(*tensor.shape, 1, 1)
                out[lprefix + rest] = tensor
                break
        else:
            raise KeyError(f"no LDM name for VAE tensor {key!r}")
    if len(out) != len(state_dict):
        raise AssertionError("VAE key collision in LDM conversion")
    return out


def clip_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP layout (SD1 ``cond_stage_model.transformer.``, SDXL ``conditioner.embedders.0.transformer.``)."""
    return {prefix + k: v for k, v in canonical_text_encoder_state_dict(text_encoder).items()}


def _openclip_block(c: dict[str, torch.Tensor], i: int, r: str) -> dict[str, torch.Tensor]:
    d = f"text_model.encoder.layers.{i}."
    return {
        r + "ln_1.weight": c[d + "layer_norm1.weight"],
        r + "ln_1.bias": c[d + "layer_norm1.bias"],
        r + "attn.in_proj_weight": torch.cat(
            [c[d + "self_attn.q_proj.weight"], c[d + "self_attn.k_proj.weight"], c[d + "self_attn.v_proj.weight"]], 0
        ),
        r + "attn.in_proj_bias": torch.cat(
            [c[d + "self_attn.q_proj.bias"], c[d + "self_attn.k_proj.bias"], c[d + "self_attn.v_proj.bias"]], 0
        ),
        r + "attn.out_proj.weight": c[d + "self_attn.out_proj.weight"],
        r + "attn.out_proj.bias": c[d + "self_attn.out_proj.bias"],
        r + "ln_2.weight": c[d + "layer_norm2.weight"],
        r + "ln_2.bias": c[d + "layer_norm2.bias"],
        r + "mlp.c_fc.weight": c[d + "mlp.fc1.weight"],
        r + "mlp.c_fc.bias": c[d + "mlp.fc1.bias"],
        r + "mlp.c_proj.weight": c[d + "mlp.fc2.weight"],
        r + "mlp.c_proj.bias": c[d + "mlp.fc2.bias"],
    }


def _random_clip_layer(config, seed: int) -> dict[str, torch.Tensor]:
    """A random CLIP encoder layer in canonical names (index 0), for the unused SD2 resblock."""
    g = torch.Generator().manual_seed(seed)
    h, m = config.hidden_size, config.intermediate_size
    shapes = {
        "self_attn.q_proj.weight": (h, h),
        "self_attn.k_proj.weight": (h, h),
        "self_attn.v_proj.weight": (h, h),
        "self_attn.out_proj.weight": (h, h),
        "mlp.fc1.weight": (m, h),
        "mlp.fc2.weight": (h, m),
    }
    out = {}
    for p in _CLIP_LAYER_PARAMS:
        if p in shapes:
            t = torch.randn(shapes[p], generator=g) * 0.02
        elif p.startswith("layer_norm") and p.endswith("weight"):
            t = torch.ones(h)
        else:  # biases
            size = m if p == "mlp.fc1.bias" else h
            t = torch.zeros(size)
        out[f"text_model.encoder.layers.0.{p}"] = t
    return out


def openclip_to_ldm(text_encoder, prefix: str, extra_final_block: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """OpenCLIP layout (SD2 ``cond_stage_model.model.``, SDXL ``conditioner.embedders.1.model.``).

    ``text_projection`` is stored (width, proj) = transpose of HF ``text_projection.weight``; for SD2
    (CLIPTextModel, no projection) a random (width, width) matrix is written, like the real file.
    With ``extra_final_block`` a random resblock ``n`` is appended (SD2: the original model has one
    block more than diffusers' text encoder, its output is never used).
    """
    c = canonical_text_encoder_state_dict(text_encoder)
    cfg = text_encoder.config
    n = cfg.num_hidden_layers
    out = {
        prefix + "token_embedding.weight": c["text_model.embeddings.token_embedding.weight"],
        prefix + "positional_embedding": c["text_model.embeddings.position_embedding.weight"],
    }
    for i in range(n):
        out.update(_openclip_block(c, i, f"{prefix}transformer.resblocks.{i}."))
    if extra_final_block:
        extra = _random_clip_layer(cfg, seed)
        out.update(_openclip_block(extra, 0, f"{prefix}transformer.resblocks.{n}."))
    out[prefix + "ln_final.weight"] = c["text_model.final_layer_norm.weight"]
    out[prefix + "ln_final.bias"] = c["text_model.final_layer_norm.bias"]
    if "text_projection.weight" in c:
        out[prefix + "text_projection"] = c["text_projection.weight"].T
    else:
        g = torch.Generator().manual_seed(seed + 1)
        out[prefix + "text_projection"] = torch.randn(cfg.hidden_size, cfg.hidden_size, generator=g) * cfg.hidden_size**-0.5
    out[prefix + "logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return out


def _ldm_schedule_buffers() -> dict[str, torch.Tensor]:
    """The DDPM buffers CompVis/Stability SD1/SD2 checkpoints carry at top level (ignored by loaders)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    post_var = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
    bufs = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": torch.log(torch.clamp(post_var, min=1e-20)),
        "posterior_mean_coef1": betas * prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
    }
    return {k: v.float() for k, v in bufs.items()}


def to_original_state_dict(pipe, family: str, extras: bool = True) -> dict[str, torch.Tensor]:
    """The whole pipeline in the original single-file layout (tensors shared with the pipe, not copied).

    ``extras`` adds the non-weight keys real files carry: SD1/SD2 DDPM schedule buffers, the
    ``position_ids`` int64 buffer of HF-CLIP text encoders, OpenCLIP ``logit_scale`` is always written.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}")
    sd: dict[str, torch.Tensor] = {}
    sd.update({"model.diffusion_model." + k: v for k, v in unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items()})
    sd.update({"first_stage_model." + k: v for k, v in vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items()})
    position_ids = torch.arange(MAX_POSITIONS, dtype=torch.int64)[None]
    if family == "sd1":
        sd.update(clip_to_ldm(pipe.text_encoder, "cond_stage_model.transformer."))
        if extras:
            sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = position_ids
    elif family == "sd2":
        sd.update(openclip_to_ldm(pipe.text_encoder, "cond_stage_model.model.", extra_final_block=True, seed=2))
    else:
        sd.update(clip_to_ldm(pipe.text_encoder, "conditioner.embedders.0.transformer."))
        sd.update(openclip_to_ldm(pipe.text_encoder_2, "conditioner.embedders.1.model."))
        if extras:
            sd["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = position_ids
    if extras and family in ("sd1", "sd2"):
        sd.update(_ldm_schedule_buffers())
    return sd


def save_single_file(pipe, path, family: str, dtype: torch.dtype = torch.float32, extras: bool = True) -> Path:
    """Write ONE .safetensors in the original (CompVis / Stability / A1111 / ComfyUI) layout.

    Floating tensors are cast to ``dtype`` (e.g. torch.float16); integer buffers keep their dtype.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = to_original_state_dict(pipe, family, extras=extras)
    out = {}
    for k, v in sd.items():
        v = v.detach()
        if v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous().clone()
    save_file(out, str(path), metadata={"format": "pt"})
    return path


def load_single_file_pipeline(path, family: str, config_dir=None, torch_dtype: torch.dtype | None = None, **kwargs):
    """The offline ``from_single_file`` call that works (HF_HUB_OFFLINE=1, nothing cached).

    ``config_dir`` defaults to the packaged ``fewshot_erase/configs/<family>``; tiny files need
    :func:`tiny_config_dir`.  Tokenizers must be passed as objects (transformers 5 ``CLIPTokenizer``
    is not a ``PreTrainedTokenizer`` subclass, so diffusers would try ``from_pretrained(config_dir)``).
    Never pass ``prediction_type``/``scheduler_type``: they switch diffusers to its legacy scheduler
    with wrong betas; the scheduler comes from ``config_dir/scheduler``.
    """
    if config_dir is None:
        config_dir = PACKAGED_CONFIGS_DIR / family
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = dict(tokenizers_for(family))
    if family != "sdxl":
        extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    extra.update(kwargs)
    pipe = cls.from_single_file(
        str(path),
        config=str(config_dir),
        local_files_only=True,
        **{dtype_keyword(): torch_dtype},
        **extra,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------
# Hugging Face Hub cache layout
# --------------------------------------------------------------------------------------
def save_hub_cache(pipe_folder, cache_dir, repo_id: str, commit: str | None = None) -> Path:
    """Lay out ``cache_dir/models--org--name/{blobs,refs/main,snapshots/<commit>/...}``.

    Works with ``DiffusionPipeline.from_pretrained(repo_id, cache_dir=cache_dir)`` or with
    ``HF_HUB_CACHE=cache_dir`` (or ``HF_HOME=<home>`` and ``cache_dir=<home>/hub``) under HF_HUB_OFFLINE=1.
    Returns the snapshot folder.
    """
    pipe_folder, cache_dir = Path(pipe_folder), Path(cache_dir)
    if commit is None:
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    blobs = repo_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for src in sorted(p for p in pipe_folder.rglob("*") if p.is_file()):
        rel = src.relative_to(pipe_folder)
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        blob = blobs / digest
        if not blob.exists():
            shutil.copyfile(src, blob)
        dst = snapshot / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists() or dst.is_symlink():
            dst.unlink()
        try:
            os.symlink(os.path.relpath(blob, dst.parent), dst)
        except OSError:  # no symlinks (Windows without developer mode): hub accepts plain files
            shutil.copyfile(blob, dst)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


# --------------------------------------------------------------------------------------
# comparison helper for tests
# --------------------------------------------------------------------------------------
def component_state_dicts(pipe) -> dict[str, dict[str, torch.Tensor]]:
    """``{component: state_dict}`` with canonical names for text encoders."""
    out = {}
    for name, module in _model_components(pipe).items():
        if name.startswith("text_encoder"):
            out[name] = canonical_text_encoder_state_dict(module)
        else:
            out[name] = module.state_dict()
    return out


def read_single_file(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def load_json(path) -> dict:
    return json.loads(Path(path).read_text())
