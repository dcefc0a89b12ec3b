"""`fewshot-erase erase`, end to end through the CLI, on tiny SD 1.x, SD 2.x and SDXL pipelines saved in every
accepted form: a diffusers folder, a single .safetensors file, and a Hugging Face Hub cache read offline."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fewshot_erase.keys import is_trained
from fewshot_erase.prompts import OBJECT_TEMPLATES
from fewshot_erase.stopping import GONE_MARGIN
from helpers import erased_tensors, load_encoders, mean_denoising_loss, run_cli, run_cli_process, with_encoders
from tiny_pipelines import canonical_text_encoder_state_dict

FAMILIES = ["sd1", "sd2", "sdxl"]
FORMS = ["folder", "single-file", "hub"]
ERASE = ["--steps", "8", "--lr", "1e-3", "--seed", "7"]
RECORD_FIELDS = {"concept", "concepts", "images", "base", "base_fingerprints", "settings", "steps", "repair_steps", "losses",
                 "versions", "timings", "trained_tensors", "device", "dtype", "format", "trajectory", "effects"}
WEIGHT_FILES = {"sd1": ["model.safetensors"], "sd2": ["model.safetensors"],
                "sdxl": ["text_encoder/model.safetensors", "text_encoder_2/model.safetensors"]}


def erase(tiny, form, pictures, output):
    args = ["erase", "tiny robot", pictures, "-o", output, *tiny.model_args(form), *ERASE]
    if form == "hub":  # the Hub cache is found through real environment variables: a real process
        result = run_cli_process(*args, env={"HF_HUB_CACHE": str(tiny.hub_cache), "HF_HUB_OFFLINE": "1"})
        assert result.returncode == 0, result.stderr
    else:
        result = run_cli(*args)
        assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def erased_twice(tiny_model, pictures, tmp_path_factory):
    """Each (family, form) erased once per test session, and a second time with the same seed: the folder form again
    (in the same process), every other form's second run is the folder form's first (the same model, another way in)."""
    done = {}

    def get(family, form):
        if (family, form) not in done:
            tiny, root = tiny_model(family), tmp_path_factory.mktemp(f"erase-{family}-{form}")
            erase(tiny, form, pictures, root / "first")
            if form == "folder":
                erase(tiny, form, pictures, root / "second")
                done[family, form] = tiny, root / "first", root / "second"
            else:
                done[family, form] = tiny, root / "first", get(family, "folder")[1]
        return done[family, form]

    return get


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_feed_forward_weights_change(erased_twice, family, form):
    tiny, output, _ = erased_twice(family, form)
    changed = set()
    for name, tensors in erased_tensors(output, family).items():
        base = canonical_text_encoder_state_dict(getattr(tiny.pipe, name))
        assert set(tensors) == set(base)
        layers = getattr(tiny.pipe, name).config.num_hidden_layers
        for key, tensor in tensors.items():
            if not torch.equal(tensor, base[key]):
                assert is_trained(key, "ffn", layers), f"{name}.{key} changed but is not a feed-forward weight"
                changed.add(name)
    assert changed == {"sd1": {"text_encoder"}, "sd2": {"text_encoder"}, "sdxl": {"text_encoder", "text_encoder_2"}}[family]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_output_reloads_raises_the_loss_and_drives_a_pipeline(erased_twice, pictures, family, form):
    tiny, output, _ = erased_twice(family, form)
    erased_pipe = with_encoders(tiny.pipe, load_encoders(output, family))
    before = mean_denoising_loss(tiny.pipe, family, pictures, "tiny robot", OBJECT_TEMPLATES)
    after = mean_denoising_loss(erased_pipe, family, pictures, "tiny robot", OBJECT_TEMPLATES)
    assert after > before
    image = erased_pipe("a photo of a tiny robot", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", FAMILIES)
def test_erase_json_records_the_whole_run(erased_twice, family, form):
    _, output, _ = erased_twice(family, form)
    record = json.loads((output / "erase.json").read_text())
    assert RECORD_FIELDS <= set(record)
    assert record["concept"] == "tiny robot"
    assert len(record["images"]) == 3 and all(len(item["sha256"]) == 64 for item in record["images"])
    assert record["base"]["family"] == family and record["base"]["kind"] == form
    assert all(len(e["sha256"]) == 64 for e in record["base"]["text_encoders"].values())
    assert record["settings"]["lr"] == 1e-3 and record["settings"]["seed"] == 7
    assert record["settings"]["betas"] == [0.9, 0.98] and record["settings"]["batch_size"] == 2
    assert record["concepts"][0]["templates"] == list(OBJECT_TEMPLATES)
    assert len(record["losses"]) == record["steps"] == 8
    assert {"images", "load", "encode", "train", "report", "save", "total"} <= set(record["timings"])
    effect = record["effects"]["erased"]["tiny robot"]
    assert effect["gone"] == (effect["advantage_after"]
                              <= -max(effect["advantage_before"], 0) - GONE_MARGIN * effect["empty_caption_loss"])
    assert record["effects"]["kept_drift"] and all(value >= 0 for value in record["effects"]["kept_drift"].values())
    assert {"torch", "diffusers", "transformers", "fewshot_erase"} <= set(record["versions"])


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_gives_byte_identical_weights_from_every_form(erased_twice, family, form):
    _, first, second = erased_twice(family, form)
    for path in WEIGHT_FILES[family]:
        if form == "folder":  # the same run again: the same file
            assert (first / path).read_bytes() == (second / path).read_bytes()
        else:  # another way into the same model (the file's metadata names it): the same tensors
            ours, folders = load_file(first / path), load_file(second / path)
            assert ours.keys() == folders.keys()
            assert all(torch.equal(ours[key], folders[key]) for key in ours), path


def test_json_prints_one_summary_and_nothing_else_on_stdout(tiny_model, pictures, tmp_path):
    result = run_cli_process("erase", "tiny robot", pictures, "-o", tmp_path / "out", "--json",
                             *tiny_model("sd1").model_args("folder"), "--steps", "2")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["steps"] == 2 and summary["output"] == str(tmp_path / "out")


def test_python_api_returns_the_result(tiny_model, pictures, tmp_path):
    from fewshot_erase import erase as erase_api

    result = erase_api("tiny robot", [pictures], tmp_path / "out", model=str(tiny_model("sd1").folder), steps=3, seed=1)
    assert result.output == tmp_path / "out" and len(result.losses) == 3
    assert json.loads((tmp_path / "out" / "erase.json").read_text())["losses"] == result.losses


def test_python_api_takes_one_folder_as_a_string_or_a_path_too(tiny_model, pictures, tmp_path):
    from fewshot_erase import erase as erase_api

    model = str(tiny_model("sd1").folder)
    for images, name in [(str(pictures), "from-str"), (pictures, "from-path"), ([pictures], "from-list")]:
        erase_api("tiny robot", images, tmp_path / name, model=model, steps=1, seed=1)
    weights = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in ("from-str", "from-path", "from-list")}
    assert weights["from-str"] == weights["from-path"] == weights["from-list"]


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_the_loop_conditions_the_unet_as_the_pipeline_does(tiny_model, family):
    """SD 1.x and 2.x skip `encode_prompt`'s tokenizing (cached per caption); the result must still be its own
    (SDXL calls it)."""
    from fewshot_erase import conditioning, families

    pipe = tiny_model(family).pipe
    captions = ["a photo of a tiny robot", "", "a photo of a tiny robot", "tiny robot, " * 40]  # repeated, truncated
    ours = conditioning.conditioning(pipe, families.FAMILIES[family], captions, 32, torch.float32, "cpu")
    with torch.no_grad():
        theirs = pipe.encode_prompt(captions, "cpu", 1, False)[0]
    assert torch.equal(ours["encoder_hidden_states"].detach(), theirs)
