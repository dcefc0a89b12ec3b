"""FLUX.1's transformer from a single-file checkpoint in Black Forest Labs' layout (`model.diffusion_model.double_blocks.*`,
as BFL and ComfyUI ship it), into diffusers' `FluxTransformer2DModel`. diffusers' own converter fixes the width at
FLUX.1's 3072; this one takes every size from the model's config, so other widths load too (and the tests' tiny
one). Checked tensor for tensor against diffusers' converter (tests/fixtures/test_tiny_flow_pipelines.py).
"""

from __future__ import annotations

from pathlib import Path

PREFIX = "model.diffusion_model."

# A rule: (the file's key, diffusers' keys, how): "same" renames one tensor; "cat" is several diffusers tensors
# concatenated along dim 0 (fused qkv; a single block's linear1); "swap" one tensor whose halves are swapped (BFL's
# final adaLN is (shift, scale), diffusers' (scale, shift)).
Rule = tuple[str, list[str], str]


def linear(original: str, ours: str, bias: bool = True, how: str = "same") -> list[Rule]:
    return [(f"{original}.weight", [f"{ours}.weight"], how)] + ([(f"{original}.bias", [f"{ours}.bias"], how)] if bias else [])


def fused(original: str, ours: list[str]) -> list[Rule]:
    return [(f"{original}.{part}", [f"{name}.{part}" for name in ours], "cat") for part in ("weight", "bias")]


def swap_halves(tensor):
    import torch

    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def flux_transformer_rules(config) -> list[Rule]:
    """Every tensor of a diffusers `FluxTransformer2DModel` with `config`, and where BFL's layout keeps it."""
    rules: list[Rule] = []
    rules += linear("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    rules += linear("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    rules += linear("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    rules += linear("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    if config.guidance_embeds:
        rules += linear("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
        rules += linear("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    rules += linear("txt_in", "context_embedder") + linear("img_in", "x_embedder")
    for i in range(config.num_layers):
        o, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        rules += linear(o + "img_mod.lin", d + "norm1.linear") + linear(o + "txt_mod.lin", d + "norm1_context.linear")
        rules += fused(o + "img_attn.qkv", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"])
        rules += fused(o + "txt_attn.qkv", [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"])
        for stream, ours in (("img_attn", ("norm_q", "norm_k")), ("txt_attn", ("norm_added_q", "norm_added_k"))):
            rules.append((o + f"{stream}.norm.query_norm.scale", [d + f"attn.{ours[0]}.weight"], "same"))
            rules.append((o + f"{stream}.norm.key_norm.scale", [d + f"attn.{ours[1]}.weight"], "same"))
        rules += linear(o + "img_mlp.0", d + "ff.net.0.proj") + linear(o + "img_mlp.2", d + "ff.net.2")
        rules += linear(o + "txt_mlp.0", d + "ff_context.net.0.proj") + linear(o + "txt_mlp.2", d + "ff_context.net.2")
        rules += linear(o + "img_attn.proj", d + "attn.to_out.0") + linear(o + "txt_attn.proj", d + "attn.to_add_out")
    for i in range(config.num_single_layers):
        o, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        rules += linear(o + "modulation.lin", d + "norm.linear")
        rules += fused(o + "linear1", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"])
        rules.append((o + "norm.query_norm.scale", [d + "attn.norm_q.weight"], "same"))
        rules.append((o + "norm.key_norm.scale", [d + "attn.norm_k.weight"], "same"))
        rules += linear(o + "linear2", d + "proj_out")
    rules += linear("final_layer.linear", "proj_out")
    rules += linear("final_layer.adaLN_modulation.1", "norm_out.linear", how="swap")
    return rules


def from_original(read, transformer) -> dict:
    """diffusers' state dict for `transformer` from BFL's tensors (`read(key)` gives one, unprefixed); fused ones are
    split by the model's own shapes."""
    state = {}
    for ours, tensor in _converted(read, transformer):
        state[ours] = tensor
    return state


def _converted(read, transformer):
    import torch

    shapes = {name: tensor.shape for name, tensor in transformer.state_dict().items()}
    for original, ours, how in flux_transformer_rules(transformer.config):
        tensor = read(original)
        if how == "cat":
            yield from zip(ours, torch.split(tensor, [shapes[name][0] for name in ours], dim=0))
        else:
            yield ours[0], swap_halves(tensor) if how == "swap" else tensor


def load_flux_transformer(path: Path, config_dir: Path, dtype):
    """The transformer of a FLUX.1 single file in `dtype` (an fp8 file's weights are upcast): built on the meta device,
    given uninitialised memory, then filled one tensor at a time, so the host never holds two copies of the model."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors import safe_open

    config = FluxTransformer2DModel.load_config(str(config_dir / "transformer"))
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(config).to(dtype)  # free on meta: the memory comes in `dtype`
    transformer.to_empty(device="cpu")
    parameters = dict(transformer.named_parameters())
    filled = set()
    with torch.no_grad(), safe_open(str(path), framework="pt") as handle:
        for name, tensor in _converted(lambda key: handle.get_tensor(PREFIX + key), transformer):
            if parameters[name].shape != tensor.shape:
                raise RuntimeError(f"size mismatch for {name}: the file's is {tuple(tensor.shape)}, the config's {tuple(parameters[name].shape)}")
            parameters[name].copy_(tensor)
            filled.add(name)
    if filled != set(parameters):
        raise RuntimeError(f"the file has no tensor for {sorted(set(parameters) - filled)[0]}")
    return transformer.eval()
