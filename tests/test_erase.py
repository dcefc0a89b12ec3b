"""`fewshot-erase erase`, end to end, on tiny SD 1.x, SD 2.x and SDXL pipelines in every accepted form."""

import json

import pytest
import torch

from fewshot_erase.keys import is_trained
from fewshot_erase.prompts import OBJECT_TEMPLATES
from helpers import (erased_tensors, load_encoders, mean_denoising_loss, run_cli, run_cli_process, with_encoders)
from tiny_pipelines import canonical_text_encoder_state_dict

ERASE = ["--steps", "6", "--lr", "1e-3", "--seed", "7"]
RECORD_FIELDS = {"concept", "images", "base", "base_fingerprints", "settings", "steps", "losses", "versions",
                 "timings", "trained_tensors", "device", "dtype", "format"}


def erase(tiny, form, pictures, output, *extra):
    args = ["erase", "tiny robot", pictures, "-o", output, *tiny.model_args(form), *ERASE, *extra]
    if form == "hub":  # the Hub cache is read through real environment variables: a real process
        result = run_cli_process(*args, env={"HF_HUB_CACHE": str(tiny.hub_cache), "HF_HUB_OFFLINE": "1"})
        assert result.returncode == 0, result.stderr
    else:
        result = run_cli(*args)
        assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("form", ["folder", "single-file", "hub"])
def test_erase_changes_only_the_feed_forward_weights(tiny_model, pictures, tmp_path, family, form):
    tiny = tiny_model(family)
    erase(tiny, form, pictures, tmp_path / "out")
    changed_any = False
    for name, tensors in erased_tensors(tmp_path / "out", family).items():
        base = canonical_text_encoder_state_dict(getattr(tiny.pipe, name))
        assert set(tensors) == set(base)
        layers = getattr(tiny.pipe, name).config.num_hidden_layers
        for key, tensor in tensors.items():
            if is_trained(key, "ffn", layers):
                changed_any |= not torch.equal(tensor, base[key])
            else:
                assert torch.equal(tensor, base[key]), f"{name}.{key} changed but is not a feed-forward weight"
    assert changed_any


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_erased_encoder_reloads_raises_the_loss_and_drives_a_pipeline(tiny_model, pictures, tmp_path, family):
    tiny = tiny_model(family)
    erase(tiny, "folder", pictures, tmp_path / "out", "--steps", "10")
    encoders = load_encoders(tmp_path / "out", family)
    erased_pipe = with_encoders(tiny.pipe, encoders)
    before = mean_denoising_loss(tiny.pipe, family, pictures, "tiny robot", OBJECT_TEMPLATES)
    after = mean_denoising_loss(erased_pipe, family, pictures, "tiny robot", OBJECT_TEMPLATES)
    assert after > before
    image = erased_pipe("a photo of a tiny robot", num_inference_steps=2, output_type="pil",
                        generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_erase_json_records_the_whole_run(tiny_model, pictures, tmp_path):
    tiny = tiny_model("sd1")
    erase(tiny, "folder", pictures, tmp_path / "out")
    record = json.loads((tmp_path / "out" / "erase.json").read_text())
    assert RECORD_FIELDS <= set(record)
    assert record["concept"] == "tiny robot"
    assert len(record["images"]) == 3 and all(len(item["sha256"]) == 64 for item in record["images"])
    assert record["base"]["family"] == "sd1" and len(record["base"]["text_encoders"]["text_encoder"]["sha256"]) == 64
    assert record["settings"]["lr"] == 1e-3 and record["settings"]["seed"] == 7
    assert record["settings"]["betas"] == [0.9, 0.98] and record["settings"]["batch_size"] == 2
    assert len(record["losses"]) == record["steps"] == 6
    assert {"images", "load", "encode", "train", "save", "total"} <= set(record["timings"])
    assert {"torch", "diffusers", "transformers", "fewshot_erase"} <= set(record["versions"])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_same_seed_gives_byte_identical_weights(tiny_model, pictures, tmp_path, family):
    tiny = tiny_model(family)
    for run in ("a", "b"):
        erase(tiny, "folder", pictures, tmp_path / run)
    weights = {"sd1": ["model.safetensors"], "sdxl": ["text_encoder/model.safetensors", "text_encoder_2/model.safetensors"]}
    for path in weights[family]:
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes()
