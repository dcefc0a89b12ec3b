"""`fewshot-erase inspect PATH [--patch PATCH]`: what a file or folder is (a single-file checkpoint, a pipeline folder,
an erase output, an exported patch), its family and text encoders, the erase records it carries, and whether a patch
fits it."""

import json
import shutil

import pytest
from PIL import Image
import torch

from helpers import run_cli
from tiny_pipelines import build_tiny_pipeline, save_single_file

ENCODERS = {
    "sd1": {"text_encoder": ("transformers names", 3)},
    "sd2": {"text_encoder": ("OpenCLIP names", 4)},  # the file's unused last block counts here
    "sdxl": {"text_encoder": ("transformers names", 3), "text_encoder_2": ("OpenCLIP names", 3)},
}


def inspect(*arguments) -> dict:
    result = run_cli("inspect", *arguments, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_a_single_file_checkpoint_is_described_by_family_and_text_encoders(tiny_model, family):
    report = inspect(tiny_model(family).single_file)
    assert report["kind"] == "single-file checkpoint" and report["family"] == family and report["records"] == []
    described = {name: (facts["layout"], facts["layers"]) for name, facts in report["text_encoders"].items()}
    assert described == ENCODERS[family]
    assert all(facts["dtypes"] == ["F32"] for facts in report["text_encoders"].values())


def test_a_patched_checkpoint_shows_its_erase_record_and_whether_a_patch_fits(erased, tmp_path):
    tiny, output = erased("sd1")
    new = tmp_path / "erased.safetensors"
    assert run_cli("apply", output, tiny.single_file, "-o", new).exit_code == 0

    report = inspect(new, "--patch", output)
    record = report["records"][0]
    assert record["concept"] == "tiny robot" and len(record["images"]) == 3
    assert record["base"]["family"] == "sd1" and len(record["base"]["text_encoders"]["text_encoder"]["sha256"]) == 64
    assert record["settings"]["lr"] == 1e-3 and record["applied"]["base_matched"] is True
    assert report["patch"]["fits"] is False and len(report["patch"]["differing"]) == 12
    assert report["patch"]["applied_here"] is True  # not "another base": this very patch was applied
    assert "is already applied here" in run_cli("inspect", new, "--patch", output).stdout
    assert inspect(tiny.single_file, "--patch", output)["patch"] == {"path": str(output), "kind": "erase output",
                                                                      "fits": True, "differing": [], "applied_here": False}


def test_a_patch_applied_with_force_to_another_base_is_still_told_apart_from_a_mere_misfit(erased, tmp_path):
    tiny, output = erased("sd1")
    other = save_single_file(build_tiny_pipeline("sd1", seed=1), tmp_path / "other.safetensors", "sd1")
    lora = tmp_path / "lora.safetensors"
    assert run_cli("export", output, "--format", "lora-kohya", "-o", lora).exit_code == 0
    assert run_cli("apply", lora, other, "-o", tmp_path / "forced.safetensors", "--force").exit_code == 0
    assert inspect(tmp_path / "forced.safetensors", "--patch", output)["patch"]["applied_here"] is True
    assert inspect(other, "--patch", output)["patch"]["applied_here"] is False


def test_erase_outputs_exported_patches_and_pipeline_folders_are_told_apart(erased, tmp_path):
    tiny, output = erased("sdxl")
    assert run_cli("export", output, "--format", "lora-kohya", "-o", tmp_path / "lora.safetensors").exit_code == 0
    assert inspect(output)["kind"] == "erase output"
    exported = inspect(tmp_path / "lora.safetensors")
    assert exported["kind"] == "lora-kohya patch" and exported["records"][0]["export"]["rank"] >= 1
    folder = inspect(tiny.folder, "--patch", tmp_path / "lora.safetensors")
    assert folder["kind"] == "diffusers pipeline" and folder["family_label"] == "SDXL"
    assert folder["text_encoders"]["text_encoder_2"]["files"] == ["text_encoder_2/model.safetensors"]
    assert folder["patch"]["fits"] is True


def test_a_patch_for_another_family_does_not_fit_and_says_why(erased, tiny_model):
    _, output = erased("sd1")
    verdict = inspect(tiny_model("sd2").single_file, "--patch", output)["patch"]
    assert verdict["fits"] is False and "made on an SD 1.x model" in verdict["reason"]


def test_the_text_report_names_what_a_user_asks(erased, tmp_path):
    tiny, output = erased("sd1")
    result = run_cli("inspect", tiny.single_file, "--patch", output)
    assert result.exit_code == 0
    assert "single-file checkpoint, SD 1.x" in result.stdout and "fits" in result.stdout
    # each encoder in words: its size read from the file, not a name guessed from the layout
    assert "text_encoder: 3 layers, 32 wide, F32, transformers names" in result.stdout
    described = run_cli("inspect", output).stdout
    assert "erased 'tiny robot' with 3 images" in described and "sha256" in described
    assert "text_encoder: 12 feed-forward tensors patched" in described


def _pickle(folder):
    torch.save({}, folder / "model.ckpt")
    return folder / "model.ckpt"


def _junk(folder):
    (folder / "junk.safetensors").write_bytes(b"junk")
    return folder / "junk.safetensors"


def _picture(folder):
    Image.new("RGB", (64, 64)).save(folder / "photo.png")
    return folder / "photo.png"


@pytest.mark.parametrize("make, message", [
    (_pickle, "pickle checkpoint"),
    (_picture, "photo.png is not a .safetensors file; inspect takes a checkpoint"),
    (lambda folder: folder / "missing.safetensors", "does not exist"),
    (_junk, "too short"),
    (lambda folder: _picture(folder).parent, "is not a diffusers pipeline folder (no model_index.json)"),
])
def test_what_it_cannot_read_is_one_line_and_exit_2(tmp_path, make, message):
    result = run_cli("inspect", make(tmp_path))
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("field, value", [("images", "x"), ("effects", 5), ("concepts", []), ("settings", None)])
@pytest.mark.parametrize("command", ["inspect", "export"])
def test_a_hand_edited_record_is_refused_as_damaged_in_one_line(erased, tmp_path, field, value, command):
    _, output = erased("sd1")
    copy = shutil.copytree(output, tmp_path / "edited")
    record = json.loads((copy / "erase.json").read_text())
    (copy / "erase.json").write_text(json.dumps({**record, field: value}))
    arguments = [copy] if command == "inspect" else [copy, "--format", "delta", "-o", tmp_path / "delta.safetensors"]
    result = run_cli(command, *arguments)
    assert result.exit_code == 2 and f"its {field!r} is malformed" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "delta.safetensors").exists()


def test_a_record_without_the_bases_fingerprints_is_called_damaged_not_another_base(erased, tmp_path):
    tiny, output = erased("sd1")
    copy = shutil.copytree(output, tmp_path / "edited")
    record = json.loads((copy / "erase.json").read_text())
    del record["base_fingerprints"]
    (copy / "erase.json").write_text(json.dumps(record))
    result = run_cli("apply", copy, tiny.single_file, "-o", tmp_path / "patched.safetensors")
    assert result.exit_code == 2 and "it has no 'base_fingerprints'" in result.stderr, result.output
