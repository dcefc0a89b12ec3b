"""`fewshot-erase export OUT --format delta|lora-kohya|lora-diffusers -o FILE`: small patch files that `apply` takes
and that diffusers (like A1111 and ComfyUI) loads as a LoRA, within the tolerance the export reports."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fewshot_erase import conditioning, families
from fewshot_erase.prompts import OBJECT_TEMPLATES, fill
from helpers import erased_tensors, load_encoders, run_cli, single_file_keys, with_encoders
from tiny_pipelines import build_tiny_pipeline, save_diffusers_folder

FAMILIES = ["sd1", "sd2", "sdxl"]
FLAVOURS = ["lora-kohya", "lora-diffusers"]
PROMPTS = [fill(template, "tiny robot") for template in OBJECT_TEMPLATES]  # the erase's own captions


def export(output, fmt, file, *options):
    result = run_cli("export", output, "--format", fmt, "-o", file, "--json", *options)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def embeddings(pipe, family: str) -> torch.Tensor:
    """The UNet's conditioning for the erased prompts, as the pipeline builds it when generating."""
    with torch.no_grad():
        cond = conditioning.conditioning(pipe, families.FAMILIES[family], PROMPTS, 32, torch.float32)
    return torch.cat([tensor.flatten() for tensor in conditioning.conditioning_tensors(cond)])


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_lora_loaded_by_diffusers_stays_within_the_reported_tolerance_of_the_full_patch(erased, family, flavour, tmp_path):
    tiny, output = erased(family)
    report = export(output, flavour, tmp_path / "erase.safetensors")

    with_lora = type(tiny.pipe).from_pretrained(str(tiny.folder))
    with_lora.load_lora_weights(str(tmp_path / "erase.safetensors"))
    full = embeddings(with_encoders(tiny.pipe, load_encoders(output, family)), family)
    lora, base = embeddings(with_lora, family), embeddings(tiny.pipe, family)
    missed = (lora - full).norm().item()
    assert missed / full.norm().item() <= report["embedding_error"] * 1.01 + 1e-7
    assert missed / (full - base).norm().item() <= report["effect_error"] * 1.01 + 1e-7
    assert report["effect_error"] < 0.15  # the erase's effect is there: the LoRA is not a no-op


def test_each_layers_reconstruction_error_is_reported_and_falls_with_the_rank(erased, tmp_path):
    _, output = erased("sd1")
    reports = {rank: export(output, "lora-diffusers", tmp_path / f"rank{rank}.safetensors", "--rank", rank)
               for rank in (1, 4, 32)}
    layers = {f"text_encoder:layers.{n}.mlp.{fc}" for n in range(3) for fc in ("fc1", "fc2")}
    assert all(set(report["layers"]) == layers for report in reports.values())
    for layer in layers:
        assert reports[1]["layers"][layer] > reports[4]["layers"][layer] > reports[32]["layers"][layer]
    assert max(reports[32]["layers"].values()) < 1e-3  # full rank: only fp16 rounding is left
    assert reports[1]["effect_error"] > reports[4]["effect_error"] > reports[32]["effect_error"]
    assert reports[32]["effect_error"] < 1e-3


def test_kohya_and_diffusers_key_names_and_alpha_equal_to_the_rank(erased, tmp_path):
    _, output = erased("sdxl")
    kohya = tmp_path / "kohya.safetensors"
    result = run_cli("export", output, "--format", "lora-kohya", "--rank", 4, "-o", kohya)
    assert result.exit_code == 0 and "kohya's keys cannot carry the bias changes" in result.stderr
    tensors = load_file(kohya)
    modules = {f"lora_te{te}_text_model_encoder_layers_{n}_mlp_{fc}" for te in (1, 2) for n in range(3) for fc in ("fc1", "fc2")}
    assert set(tensors) == {f"{m}.{part}" for m in modules for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert all(tensors[f"{m}.alpha"].item() == 4 and tensors[f"{m}.lora_down.weight"].shape[0] == 4 for m in modules)
    assert tensors["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"].shape == (37, 4)

    export(output, "lora-diffusers", tmp_path / "diffusers.safetensors", "--rank", 4)
    tensors = load_file(tmp_path / "diffusers.safetensors")
    module = "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer"
    assert tensors[f"{module}.down.weight"].shape == (4, 64) and tensors[f"{module}.up.bias"].shape == (37,)
    assert {tensor.dtype for tensor in tensors.values()} == {torch.float16}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_delta_is_the_fp16_differences_and_apply_adds_them_to_the_base(erased, family, tmp_path):
    tiny, output = erased(family)
    report = export(output, "delta", tmp_path / "delta.safetensors")
    delta = load_file(tmp_path / "delta.safetensors")
    assert {tensor.dtype for tensor in delta.values()} == {torch.float16}
    assert {key.split(".")[0] for key in delta} == set(families.FAMILIES[family].encoders)
    assert "text_encoder.text_model.encoder.layers.0.mlp.fc1.weight" in delta

    new = tmp_path / "erased.safetensors"
    assert run_cli("apply", tmp_path / "delta.safetensors", tiny.single_file, "-o", new).exit_code == 0
    before, after, erased_weights = load_file(tiny.single_file), load_file(new), erased_tensors(output, family)
    assert report["rounding_error"] < 1e-3
    for (encoder, name), key in single_file_keys(family).items():
        assert torch.allclose(after[key], erased_weights[encoder][name], rtol=0, atol=1e-5), key  # fp16 rounding
    assert all(torch.equal(before[key], after[key]) for key in set(before) - set(single_file_keys(family).values()))


def test_a_kohya_lora_applied_to_a_single_file_adds_up_times_down_and_keeps_the_biases(erased, tmp_path):
    tiny, output = erased("sd2")
    export(output, "lora-kohya", tmp_path / "lora.safetensors", "--rank", 2)
    new = tmp_path / "erased.safetensors"
    assert run_cli("apply", tmp_path / "lora.safetensors", tiny.single_file, "-o", new).exit_code == 0
    lora, before, after = load_file(tmp_path / "lora.safetensors"), load_file(tiny.single_file), load_file(new)
    for n in range(3):
        name = f"lora_te_text_model_encoder_layers_{n}_mlp_fc2"
        up, down = lora[f"{name}.lora_up.weight"].float(), lora[f"{name}.lora_down.weight"].float()
        key = f"cond_stage_model.model.transformer.resblocks.{n}.mlp.c_proj"
        assert torch.allclose(after[f"{key}.weight"], before[f"{key}.weight"] + up @ down, atol=1e-7)
        assert torch.equal(after[f"{key}.bias"], before[f"{key}.bias"])
    record = json.loads(safe_open(str(new), framework="pt").metadata()["fewshot_erase"])
    assert record["export"]["format"] == "lora-kohya" and record["applied"]["patch"] == "lora-kohya"


def test_the_base_model_can_be_named_and_must_be_the_erased_one(erased, tmp_path):
    tiny, output = erased("sd1")
    export(output, "delta", tmp_path / "recorded.safetensors")
    export(output, "delta", tmp_path / "named.safetensors", "--model", tiny.single_file)
    assert (tmp_path / "named.safetensors").read_bytes() == (tmp_path / "recorded.safetensors").read_bytes()

    other = save_diffusers_folder(build_tiny_pipeline("sd1", seed=1), tmp_path / "other")
    result = run_cli("export", output, "--format", "delta", "-o", tmp_path / "x.safetensors", "--model", other)
    assert result.exit_code == 2 and "is not the base the patch was made from" in result.stderr
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("arguments, message", [
    (["--format", "delta", "-o", "patch.bin"], "must end in .safetensors"),
    (["--format", "lora-kohya", "--rank", "0", "-o", "patch.safetensors"], "--rank must be at least 1"),
    (["--format", "zip", "-o", "patch.safetensors"], "Invalid value for '--format'"),
    (["--format", "delta", "--rank", "4", "-o", "patch.safetensors"], "--rank sets a LoRA's rank; delta is no LoRA"),
])
def test_bad_export_options_are_one_line_and_exit_2(erased, tmp_path, arguments, message):
    _, output = erased("sd1")
    result = run_cli("export", output, *[tmp_path / a if a.startswith("patch") else a for a in arguments])
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_an_erase_output_that_does_not_exist_is_named_so(tmp_path):
    result = run_cli("export", tmp_path / "missing", "--format", "delta", "-o", tmp_path / "patch.safetensors")
    assert result.exit_code == 2 and "missing does not exist" in result.stderr


def test_without_rank_the_export_takes_the_smallest_rank_within_one_percent(erased, tmp_path):
    _, output = erased("sd1")
    chosen = export(output, "lora-diffusers", tmp_path / "auto.safetensors")
    assert chosen["rank_asked"] == "auto" and chosen["effect_error"] <= 0.01
    smaller = [rank for rank in (4, 8, 16, 32) if rank < chosen["rank"]]
    if smaller:  # the rank below it would have missed more than 1%
        below = export(output, "lora-diffusers", tmp_path / "below.safetensors", "--rank", smaller[-1])
        assert below["effect_error"] > 0.01


def test_a_rank_above_the_full_one_is_reported_as_the_rank_written(erased, tmp_path):
    _, output = erased("sd1")
    report = export(output, "lora-diffusers", tmp_path / "big.safetensors", "--rank", 1000)
    assert report["rank_asked"] == 1000 and report["rank"] == report["full_rank"] == 32  # the tiny encoder's 32-wide matrices
    with safe_open(str(tmp_path / "big.safetensors"), framework="pt") as handle:
        assert max(handle.get_tensor(key).shape[0] for key in handle.keys() if key.endswith("down.weight")) == 32


def test_an_exported_file_cannot_be_exported_again(erased, tmp_path):
    _, output = erased("sd1")
    export(output, "delta", tmp_path / "delta.safetensors")
    result = run_cli("export", tmp_path / "delta.safetensors", "--format", "delta", "-o", tmp_path / "again.safetensors")
    assert result.exit_code == 2 and "export from the `erase` output folder" in result.stderr


def test_a_lora_at_full_rank_that_misses_the_effect_says_export_delta_not_raise_the_rank(erased, tmp_path):
    """kohya's keys carry no biases: at full rank the LoRA still misses their part of the erase."""
    _, output = erased("sd1")
    result = run_cli("export", output, "--format", "lora-kohya", "-o", tmp_path / "kohya.safetensors")
    assert result.exit_code == 0, result.output
    assert "misses" in result.stderr and "raise --rank" not in result.stderr and "delta" in result.stderr

