"""`fewshot-erase apply PATCH CHECKPOINT -o NEW`: an erase written into the single files people share (SD 1.x, 2.x
and XL in the original CompVis / Stability layout that A1111 and ComfyUI use) and into diffusers pipeline folders,
and every input it refuses with one line, exit code 2, nothing written and the input untouched."""

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import LAYERS, erased_tensors, run_cli, single_file_keys
from tiny_pipelines import (build_tiny_pipeline, canonical_text_encoder_state_dict, load_single_file_pipeline,
                            save_single_file)

FAMILIES = ["sd1", "sd2", "sdxl"]


def assert_patched(before: Path, after: Path, output: Path, family: str) -> None:
    """`after` holds the erased feed-forward weights (in `before`'s dtypes) and every other tensor of `before`."""
    before, after, erased_weights = load_file(before), load_file(after), erased_tensors(output, family)
    assert {key: t.dtype for key, t in after.items()} == {key: t.dtype for key, t in before.items()}
    feed_forward = single_file_keys(family)
    for (encoder, name), key in feed_forward.items():
        assert torch.equal(after[key], erased_weights[encoder][name].to(before[key].dtype)), key
    # SD 2.x's unused last block is among the others
    assert all(torch.equal(before[key], after[key]) for key in set(before) - set(feed_forward.values()))


def assert_holds_the_erase(loaded, output: Path, family: str) -> None:
    """Every text encoder of the loaded pipeline carries the erase output's trained tensors."""
    for name, tensors in erased_tensors(output, family).items():
        state = canonical_text_encoder_state_dict(getattr(loaded, name))
        assert all(torch.equal(state[key], tensor) for key, tensor in tensors.items()), name


def metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_writes_the_erase_into_a_single_file_that_diffusers_loads(erased, family, tmp_path):
    tiny, output = erased(family)
    new = tmp_path / "erased.safetensors"
    result = run_cli("apply", output, tiny.single_file, "-o", new)
    assert result.exit_code == 0, result.output

    assert_holds_the_erase(load_single_file_pipeline(new, family, tiny.config_dir), output, family)
    assert_patched(tiny.single_file, new, output, family)


def test_the_file_keeps_its_metadata_and_gains_the_erase_record(erased, tmp_path):
    tiny, output = erased("sd1")
    new = tmp_path / "erased.safetensors"
    assert run_cli("apply", output, tiny.single_file, "-o", new).exit_code == 0
    found = metadata(new)
    assert found["format"] == metadata(tiny.single_file)["format"] == "pt"
    record = json.loads(found["fewshot_erase"])
    assert record["concept"] == "tiny robot" and len(record["images"]) == 3
    assert record["applied"] == {"patch": "erase output", "base_matched": True}
    assert record["base"] == json.loads((output / "erase.json").read_text())["base"]


@pytest.mark.parametrize("family", FAMILIES)
def test_an_fp16_checkpoint_of_the_base_is_recognised_and_stays_fp16(erased, family, tmp_path):
    tiny, output = erased(family)
    fp16 = save_single_file(tiny.pipe, tmp_path / "fp16.safetensors", family, dtype=torch.float16)
    new = tmp_path / "erased.safetensors"
    assert run_cli("apply", output, fp16, "-o", new).exit_code == 0
    assert_patched(fp16, new, output, family)
    assert {t.dtype for t in load_file(new).values() if t.is_floating_point()} == {torch.float16}


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_to_a_pipeline_folder_patches_its_text_encoders_and_keeps_the_rest(erased, family, tmp_path):
    tiny, output = erased(family)
    new = tmp_path / "pipeline"
    result = run_cli("apply", output, tiny.folder, "-o", new)
    assert result.exit_code == 0, result.output

    assert_holds_the_erase(type(tiny.pipe).from_pretrained(str(new)), output, family)
    for name in erased_tensors(output, family):
        assert json.loads(metadata(new / name / "model.safetensors")["fewshot_erase"])["concept"] == "tiny robot"
    for path in tiny.folder.rglob("*"):
        copy = new / path.relative_to(tiny.folder)
        if path.is_file() and not (path.parent.name.startswith("text_encoder") and path.suffix == ".safetensors"):
            assert copy.read_bytes() == path.read_bytes(), path


def test_sd1_files_without_text_model_in_their_names_are_patched_too(erased, tmp_path):
    tiny, output = erased("sd1")
    older = {key.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): tensor
             for key, tensor in load_file(tiny.single_file).items()}
    save_file(older, str(tmp_path / "older.safetensors"))
    new = tmp_path / "erased.safetensors"
    assert run_cli("apply", output, tmp_path / "older.safetensors", "-o", new).exit_code == 0
    after = load_file(new)
    erased_weights = erased_tensors(output, "sd1")["text_encoder"]
    for n in range(LAYERS):
        key = f"cond_stage_model.transformer.encoder.layers.{n}.mlp.fc2.weight"
        assert torch.equal(after[key], erased_weights[f"text_model.encoder.layers.{n}.mlp.fc2.weight"])


def test_a_pickle_checkpoint_is_patched_with_allow_pickle(erased, tmp_path):
    tiny, output = erased("sd1")
    torch.save({"state_dict": load_file(tiny.single_file)}, tmp_path / "model.ckpt")
    new = tmp_path / "erased.safetensors"
    assert run_cli("apply", output, tmp_path / "model.ckpt", "-o", new, "--allow-pickle").exit_code == 0
    assert load_file(new).keys() == load_file(tiny.single_file).keys()


def test_a_checkpoint_of_another_base_is_refused_unless_forced(erased, tmp_path):
    tiny, output = erased("sd1")
    other = save_single_file(build_tiny_pipeline("sd1", seed=1), tmp_path / "other.safetensors", "sd1")
    new = tmp_path / "erased.safetensors"
    refused = run_cli("apply", output, other, "-o", new)
    assert refused.exit_code == 2
    assert "is not the base the patch was made from" in refused.stderr and "6 of 12" in refused.stderr
    assert not new.exists()

    forced = run_cli("apply", output, other, "-o", new, "--force")
    assert forced.exit_code == 0 and "warning:" in forced.stderr
    assert json.loads(metadata(new)["fewshot_erase"])["applied"]["base_matched"] is False


def test_an_existing_new_is_replaced_only_with_overwrite(erased, tmp_path):
    tiny, output = erased("sd1")
    new = tmp_path / "erased.safetensors"
    new.write_bytes(b"old")
    assert run_cli("apply", output, tiny.single_file, "-o", new).exit_code == 2
    assert new.read_bytes() == b"old"
    assert run_cli("apply", output, tiny.single_file, "-o", new, "--overwrite").exit_code == 0
    assert "fewshot_erase" in metadata(new)


# Each bad input: the arguments of `apply`, made from the good erase output and tiny model in a folder of its own.
def _renamed_text_encoder(output, tiny, folder):
    state = {key.replace(".encoder.layers.", ".encoder.blocks."): t for key, t in load_file(tiny.single_file).items()}
    save_file(state, str(folder / "renamed.safetensors"))
    return [output, folder / "renamed.safetensors", "-o", folder / "new.safetensors"]


def _refiner(output, tiny, folder):
    state = {"model.diffusion_model.out.2.weight": torch.zeros(1), "conditioner.embedders.0.model.ln_final.weight": torch.ones(1)}
    save_file(state, str(folder / "refiner.safetensors"))
    return [output, folder / "refiner.safetensors", "-o", folder / "new.safetensors"]


def _lora_not_a_checkpoint(output, tiny, folder):
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(1, 1)}, str(folder / "lora.safetensors"))
    return [output, folder / "lora.safetensors", "-o", folder / "new.safetensors"]


def _truncated(output, tiny, folder):
    data = tiny.single_file.read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    return [output, folder / "truncated.safetensors", "-o", folder / "new.safetensors"]


def _malformed_header(output, tiny, folder):
    (folder / "malformed.safetensors").write_bytes((64).to_bytes(8, "little") + b"{not json" + b" " * 60)
    return [output, folder / "malformed.safetensors", "-o", folder / "new.safetensors"]


def _pickle(output, tiny, folder):
    torch.save(load_file(tiny.single_file), folder / "model.ckpt")
    return [output, folder / "model.ckpt", "-o", folder / "new.safetensors"]


def _other_family(output, tiny, folder):
    return [output, save_single_file(build_tiny_pipeline("sd2"), folder / "sd2.safetensors", "sd2"), "-o", folder / "new.safetensors"]


def _new_is_the_input(output, tiny, folder):
    copy = folder / "model.safetensors"
    copy.write_bytes(tiny.single_file.read_bytes())
    return [output, copy, "-o", copy, "--overwrite"]


def _truncated_patch(output, tiny, folder):
    patch = shutil.copytree(output, folder / "patch")
    weights = patch / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return [patch, tiny.single_file, "-o", folder / "new.safetensors"]


BAD_INPUTS = {
    "a layout it cannot patch": (_renamed_text_encoder, "no text-encoder feed-forward tensors"),
    "an SDXL refiner": (_refiner, "refiner"),
    "a LoRA, not a checkpoint": (_lora_not_a_checkpoint, "no Stable Diffusion UNet"),
    "a truncated file": (_truncated, "truncated"),
    "a malformed header": (_malformed_header, "malformed safetensors header"),
    "a pickle without --allow-pickle": (_pickle, "--allow-pickle"),
    "a patch for another family": (_other_family, "was made on an SD 1.x model but"),
    "NEW equal to the input, even with --overwrite": (_new_is_the_input, "same path as the input"),
    "a truncated patch": (_truncated_patch, "truncated"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_nothing_written(erased, tmp_path, case):
    make, message = BAD_INPUTS[case]
    tiny, output = erased("sd1")
    arguments = make(output, tiny, tmp_path)
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}

    result = run_cli("apply", *arguments)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before


def test_outputs_get_the_modes_any_new_file_gets_under_the_users_umask(erased, tmp_path):
    """Staging is private; the outputs are not: a ComfyUI service account or a colleague can read them."""
    tiny, output = erased("sd1")
    previous = os.umask(0o027)
    try:
        patched, delta = tmp_path / "erased.safetensors", tmp_path / "delta.safetensors"
        assert run_cli("apply", output, tiny.single_file, "-o", patched).exit_code == 0
        assert run_cli("export", output, "--format", "delta", "-o", delta).exit_code == 0
        folder = tmp_path / "folder"
        assert run_cli("apply", output, tiny.folder, "-o", folder).exit_code == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE(patched.stat().st_mode) == stat.S_IMODE(delta.stat().st_mode) == 0o640
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    # the erase output itself, written by the session fixture under the process's own umask
    expected = 0o777 & ~previous
    assert stat.S_IMODE(output.stat().st_mode) == expected
    assert stat.S_IMODE((output / "model.safetensors").stat().st_mode) == expected & 0o666


def test_a_pipeline_folder_patched_into_a_name_ending_in_safetensors_is_refused(erased, tmp_path):
    """A folder's patch is a folder: a name that promises one file would get a folder of that name."""
    tiny, output = erased("sd1")
    result = run_cli("apply", output, tiny.folder, "-o", tmp_path / "patched.safetensors")
    assert result.exit_code == 2 and "a pipeline folder is patched into a folder; name a folder" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_that_is_no_safetensors_file_is_named_so(erased, tmp_path):
    _, output = erased("sd1")
    notes = tmp_path / "README.md"
    notes.write_text("# not a model\n")
    result = run_cli("apply", output, notes, "-o", tmp_path / "patched.safetensors")
    assert result.exit_code == 2 and "is not a .safetensors file; pass a .safetensors checkpoint" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
