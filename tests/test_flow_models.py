"""Stable Diffusion 3.x and FLUX.1: erase in their text encoders (CLIP-L, CLIP-G, T5), from a diffusers folder, a Hub
cache or an all-in-one file; the loss as diffusers' own training scripts compute it; outputs that their pipelines,
ComfyUI and Forge load; `apply` into all-in-one checkpoints. Tiny random pipelines of the real architectures."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_flow_pipelines as flow
import tiny_pipelines
from conftest import write_pictures
from helpers import run_cli, run_cli_process, with_encoders

from fewshot_erase import conditioning, denoising, families, images, unlearning
from fewshot_erase.api import erase
from fewshot_erase.apply import apply

LENGTH = flow.TINY_MAX_SEQUENCE_LENGTH
SIZE = {"resolution": 8}  # FLUX's pipeline would generate at 128 latent pixels a side: 256 px for the tiny one
ENCODER_CLASSES = {"sd3": ("CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"),
                   "flux": ("CLIPTextModel", "T5EncoderModel")}


class TinyFlowModel:
    def __init__(self, family, root):
        self.family = family
        self.pipe = flow.build_tiny_pipeline(family)
        self.folder = flow.save_diffusers_folder(self.pipe, root / "pipeline")
        self.single_file = flow.save_single_file(self.pipe, root / f"{family}.safetensors", family)
        self.config_dir = flow.tiny_config_dir(self.pipe, root / "configs")
        self.hub_cache, self.repo_id = root / "hub", f"tiny-tests/{family}"
        tiny_pipelines.save_hub_cache(self.folder, self.hub_cache, self.repo_id)

    def model(self, form):
        if form == "hub":
            return {"model": self.repo_id}
        if form == "single-file":
            return {"model": str(self.single_file), "config": str(self.config_dir)}
        return {"model": str(self.folder)}


@pytest.fixture(scope="module")
def tiny_flow(tmp_path_factory):
    built = {}

    def get(family):
        if family not in built:
            built[family] = TinyFlowModel(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return built[family]

    return get


@pytest.fixture(scope="module")
def flow_pictures(tmp_path_factory):
    return write_pictures(tmp_path_factory.mktemp("flow-pictures") / "robot", count=3, size=16)


def encoder_tensors(output, family_name):
    family = families.FAMILIES[family_name]
    return {name: load_file(str(output / name / "model.safetensors")) for name in family.encoders}


def changed(before, after):
    return {(encoder, name) for encoder in after for name in after[encoder]
            if not torch.equal(before[encoder][name], after[encoder][name])}


def feed_forward(tensors, encoders, t5_blocks=None):
    found = set()
    for encoder in encoders:
        for name in tensors[encoder]:
            if ".mlp.fc" in name:
                found.add((encoder, name))
            elif ".DenseReluDense." in name and (t5_blocks is None or int(name.split(".")[2]) in t5_blocks):
                found.add((encoder, name))
    return found


def base_tensors(tiny):
    return {name: flow.canonical_state_dict(getattr(tiny.pipe, name)) for name in families.FAMILIES[tiny.family].encoders}


# --- the loss and the conditioning, against the pipelines and the training scripts -------------------------------

@pytest.mark.parametrize("family_name", ["sd3", "flux"])
def test_the_loss_is_the_training_scripts(tiny_flow, family_name):
    """noisy = (1 - sigma) x + sigma noise at the scheduler's sigma; FLUX: the transformer on packed latents at
    t / 1000 against noise - x; SD 3: preconditioned (noisy - sigma v against x), as train_dreambooth_sd3.py does."""
    tiny = tiny_flow(family_name)
    pipe, family = tiny.pipe, families.FAMILIES[family_name]
    x = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    schedule = denoising.training_scheduler(pipe)
    generator = torch.Generator().manual_seed(3)
    ours_in = unlearning.pack_latents(x) if family is families.FLUX else x
    noisy, timesteps, target = denoising.noised(ours_in, schedule, generator)
    # the same draws again, by hand
    replay = torch.Generator().manual_seed(3)
    noise = torch.randn(ours_in.shape, generator=replay)
    u = torch.sigmoid(torch.randn((2,), generator=replay)) if family is families.SD3 else torch.rand((2,), generator=replay)
    indices = (u * 1000).long()
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    assert torch.equal(timesteps, scheduler.timesteps[indices])
    sigmas = scheduler.sigmas[indices].view(-1, *[1] * (ours_in.ndim - 1))
    assert torch.allclose(noisy, (1 - sigmas) * ours_in + sigmas * noise)
    cond = conditioning.conditioning(pipe, family, ["a photo of a robot"] * 2, 8, torch.float32, sequence_length=LENGTH)
    with torch.no_grad():
        ours = denoising.prediction_error(pipe.transformer, noisy, timesteps, target, cond)
        if family is families.FLUX:  # train_dreambooth_flux.py, transcribed
            unpacked_noise = pipe._unpack_latents(noise, 8, 8, pipe.vae_scale_factor)
            noisy_x = (1 - sigmas.view(-1, 1, 1, 1)) * x + sigmas.view(-1, 1, 1, 1) * unpacked_noise
            packed = pipe._pack_latents(noisy_x, 2, 16, 4, 4)
            guidance = torch.tensor([3.5]).expand(2)
            embeds, pooled, text_ids = pipe.encode_prompt(["a photo of a robot"] * 2, max_sequence_length=LENGTH)
            prediction = pipe.transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                                          pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                                          img_ids=pipe._prepare_latent_image_ids(2, 2, 2, "cpu", torch.float32),
                                          return_dict=False)[0]
            prediction = pipe._unpack_latents(prediction, 8, 8, pipe.vae_scale_factor)
            script = torch.mean(((prediction - (unpacked_noise - x)) ** 2).reshape(2, -1), 1).mean()
        else:  # train_dreambooth_sd3.py with its default --precondition_outputs 1, transcribed
            embeds, _, pooled, _ = pipe.encode_prompt(["a photo of a robot"] * 2, None, None, max_sequence_length=LENGTH,
                                                      do_classifier_free_guidance=False)
            prediction = pipe.transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=embeds,
                                          pooled_projections=pooled, return_dict=False)[0]
            prediction = prediction * (-sigmas) + noisy
            script = torch.mean(((prediction - x) ** 2).reshape(2, -1), 1).mean()
    assert torch.allclose(ours, script, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family_name", ["sd3", "flux"])
def test_the_conditioning_is_the_pipelines(tiny_flow, family_name):
    tiny = tiny_flow(family_name)
    pipe, family = tiny.pipe, families.FAMILIES[family_name]
    captions = ["a photo of a robot", "the robot"]
    with torch.no_grad():
        cond = conditioning.conditioning(pipe, family, captions, 8, torch.float32, sequence_length=LENGTH)
        if family is families.SD3:
            embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, max_sequence_length=LENGTH,
                                                      do_classifier_free_guidance=False)
            assert embeds.shape[1] == 77 + LENGTH  # CLIP's tokens, then T5's
        else:
            embeds, pooled, _ = pipe.encode_prompt(captions, max_sequence_length=LENGTH)
            assert cond["img_ids"].shape == (4, 3) and torch.equal(cond["guidance"], torch.full((2,), 3.5))
    assert torch.equal(cond["encoder_hidden_states"], embeds) and torch.equal(cond["pooled_projections"], pooled)
    # the retain term compares both, one row a caption
    rows = conditioning.select_rows(cond, slice(1, 2))
    assert [t.shape[0] for t in conditioning.conditioning_tensors(rows)] == [1, 1]


# --- erase, end to end ------------------------------------------------------------------------------------------

FORMS = [("sd3", "folder"), ("sd3", "hub"), ("sd3", "single-file"), ("flux", "folder"), ("flux", "hub"), ("flux", "single-file")]


@pytest.mark.parametrize("family_name,form", FORMS)
def test_erase_changes_only_the_feed_forward_weights_and_the_pipeline_generates(
        tiny_flow, flow_pictures, tmp_path, family_name, form):
    tiny = tiny_flow(family_name)
    output = tmp_path / "erased"
    if form == "hub":  # the Hub cache is found through real environment variables: a real process
        done = run_cli_process("erase", "robot", flow_pictures, "-o", output, "--model", tiny.repo_id, "--steps", "3",
                               "--lr", "1e-3", "--max-sequence-length", LENGTH, "--resolution", 8,
                               env={"HF_HUB_CACHE": str(tiny.hub_cache), "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, done.stderr
        record = json.loads((output / "erase.json").read_text())
    else:
        record = erase("robot", [flow_pictures], output, **tiny.model(form), steps=3, lr=1e-3,
                       max_sequence_length=LENGTH, **SIZE).record
    assert record["base"]["family"] == family_name and record["settings"]["max_sequence_length"] == LENGTH
    family = families.FAMILIES[family_name]
    after = encoder_tensors(output, family_name)
    base = base_tensors(tiny)
    assert changed(base, after) == feed_forward(after, family.encoders)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    classes = {c.__name__: c for c in (CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel)}
    encoders = {name: classes[cls].from_pretrained(str(output / name))
                for name, cls in zip(family.encoders, ENCODER_CLASSES[family_name])}
    erased_pipe = with_encoders(tiny.pipe, encoders)
    image = erased_pipe("a photo of a robot", height=8, width=8, num_inference_steps=2, max_sequence_length=LENGTH,
                        generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (8, 8)


def test_encoder_and_t5_layers_choose_what_trains(tiny_flow, flow_pictures, tmp_path):
    tiny = tiny_flow("flux")
    erase("robot", [flow_pictures], tmp_path / "t5", model=str(tiny.folder), steps=2, lr=1e-3,
          max_sequence_length=LENGTH, encoder="t5", t5_layers=(1,), **SIZE)
    after = encoder_tensors(tmp_path / "t5", "flux")
    assert changed(base_tensors(tiny), after) == feed_forward(after, ["text_encoder_2"], t5_blocks={1})
    assert any(name.endswith("wi_1.weight") for _, name in changed(base_tensors(tiny), after))  # gated T5 v1.1
    result = run_cli("erase", "robot", flow_pictures, "-o", tmp_path / "clip", "--model", tiny.folder,
                     "--steps", "2", "--encoder", "clip-l", "--max-sequence-length", LENGTH, "--resolution", 8)
    assert result.exit_code == 0, result.output
    after = encoder_tensors(tmp_path / "clip", "flux")
    assert changed(base_tensors(tiny), after) == feed_forward(after, ["text_encoder"])


# --- outputs where people use these models --------------------------------------------------------------------

@pytest.fixture(scope="module")
def erased_sd3(tiny_flow, flow_pictures, tmp_path_factory):
    tiny = tiny_flow("sd3")
    output = tmp_path_factory.mktemp("erased-sd3") / "erased"
    erase("robot", [flow_pictures], output, model=str(tiny.folder), steps=2, lr=1e-3, max_sequence_length=LENGTH)
    return tiny, output


def test_apply_writes_the_erase_into_an_all_in_one_checkpoint(erased_sd3, tmp_path):
    tiny, output = erased_sd3
    patched = tmp_path / "patched.safetensors"
    result = run_cli("apply", output, tiny.single_file, "-o", patched)
    assert result.exit_code == 0, result.output
    before, after = load_file(str(tiny.single_file)), load_file(str(patched))
    erased = encoder_tensors(output, "sd3")
    prefixes = {"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.clip_g.transformer.",
                "text_encoder_3": "text_encoders.t5xxl.transformer."}
    moved = {key for key in after if not torch.equal(before[key], after[key])}
    expected = {prefixes[encoder] + name for encoder, name in feed_forward(erased, prefixes)}
    assert moved == expected
    for encoder, name in feed_forward(erased, prefixes):
        assert torch.equal(after[prefixes[encoder] + name], erased[encoder][name])
    reloaded = flow.load_single_file_pipeline(patched, "sd3", tiny.config_dir)
    assert torch.equal(reloaded.text_encoder_3.state_dict()["encoder.block.0.layer.1.DenseReluDense.wo.weight"],
                       erased["text_encoder_3"]["encoder.block.0.layer.1.DenseReluDense.wo.weight"])


def test_apply_into_a_flux_all_in_one_file(tiny_flow, flow_pictures, tmp_path):
    tiny = tiny_flow("flux")
    output = tmp_path / "erased"
    erase("robot", [flow_pictures], output, model=str(tiny.folder), steps=2, lr=1e-3, max_sequence_length=LENGTH, **SIZE)
    patched = apply(output, tiny.single_file, tmp_path / "patched.safetensors")
    assert patched.patched == len(feed_forward(encoder_tensors(output, "flux"), ["text_encoder", "text_encoder_2"]))
    after = load_file(str(tmp_path / "patched.safetensors"))
    name = "encoder.block.1.layer.1.DenseReluDense.wi_0.weight"
    assert torch.equal(after["text_encoders.t5xxl.transformer." + name], encoder_tensors(output, "flux")["text_encoder_2"][name])


def test_drop_in_files_load_in_transformers_with_the_expected_keys(erased_sd3, tmp_path):
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    tiny, output = erased_sd3
    result = run_cli("export", output, "--format", "drop-in", "-o", tmp_path / "comfy")
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in (tmp_path / "comfy").iterdir())
    assert files == ["clip_g.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors"]
    t5 = load_file(str(tmp_path / "comfy" / "t5xxl_fp16.safetensors"))
    assert "shared.weight" in t5 and "encoder.embed_tokens.weight" not in t5 and all(v.dtype == torch.float16 for v in t5.values())
    clip_g = load_file(str(tmp_path / "comfy" / "clip_g.safetensors"))
    assert "text_projection.weight" in clip_g and all(k.startswith(("text_model.", "text_projection")) for k in clip_g)
    model = T5EncoderModel(tiny.pipe.text_encoder_3.config)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in t5.items()}, strict=False)
    assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight"}
    erased = encoder_tensors(output, "sd3")["text_encoder_3"]
    assert torch.allclose(model.state_dict()["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"],
                          erased["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"], atol=1e-3)
    clip = CLIPTextModelWithProjection(tiny.pipe.text_encoder_2.config)
    missing, unexpected = clip.load_state_dict({k: v.float() for k, v in clip_g.items()}, strict=False)
    assert not unexpected and not [m for m in missing if "position_ids" not in m]


def test_inspect_names_t5s_layers(tiny_flow):
    result = run_cli("inspect", tiny_flow("sd3").single_file, "--json")
    report = json.loads(result.output)
    assert report["family"] == "sd3"
    assert report["text_encoders"]["text_encoder_3"]["layers"] == 2 and report["text_encoders"]["text_encoder_3"]["width"] == flow.T5_D_MODEL


# --- bad input ----------------------------------------------------------------------------------------------------

def test_an_encoder_the_family_lacks_is_refused(tiny_flow, flow_pictures, tmp_path):
    result = run_cli("erase", "robot", flow_pictures, "-o", tmp_path / "out", "--model", tiny_flow("flux").folder,
                     "--encoder", "clip-g")
    assert result.exit_code == 2 and "FLUX.1 has no text encoder 'clip-g'" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_robust_is_refused_where_t5_reads_the_captions(tiny_flow, flow_pictures, tmp_path):
    result = run_cli("erase", "robot", flow_pictures, "-o", tmp_path / "out", "--model", tiny_flow("flux").folder,
                     "--robust")
    assert result.exit_code == 2 and "--robust attacks with learned CLIP token embeddings" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_t5_choices_on_a_model_without_t5_are_refused(tiny_model, pictures, tmp_path):
    result = run_cli("erase", "robot", pictures, "-o", tmp_path / "out", "--model", tiny_model("sd1").folder,
                     "--t5-layers", "0-3")
    assert result.exit_code == 2 and "has no T5" in result.output and not (tmp_path / "out").exists()


def test_t5_layers_beyond_the_model_are_refused(tiny_flow, flow_pictures, tmp_path):
    with pytest.raises(Exception, match="blocks 0-1"):
        erase("robot", [flow_pictures], tmp_path / "out", model=str(tiny_flow("flux").folder), steps=1,
              encoder="t5", t5_layers=(0, 5), **SIZE)
    assert not (tmp_path / "out").exists()
    result = run_cli("erase", "robot", flow_pictures, "-o", tmp_path / "out", "--t5-layers", "two")
    assert result.exit_code == 2 and "--t5-layers takes block numbers" in result.output


def test_a_checkpoint_without_its_t5_is_refused(tiny_flow, flow_pictures, tmp_path):
    tensors = load_file(str(tiny_flow("sd3").single_file))
    no_t5 = tmp_path / "sd3_no_t5.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith("text_encoders.t5xxl.")}, str(no_t5))
    result = run_cli("erase", "robot", flow_pictures, "-o", tmp_path / "out", "--model", no_t5)
    assert result.exit_code == 2 and "without its T5 text encoder" in result.output and "--encoder clip-l" in result.output
    assert not (tmp_path / "out").exists()


def test_a_flow_single_file_needs_its_tokenizers(tiny_flow, flow_pictures, tmp_path):
    result = run_cli("erase", "robot", flow_pictures, "-o", tmp_path / "out", "--model", tiny_flow("sd3").single_file)
    assert result.exit_code == 2 and "pass --config" in result.output and not (tmp_path / "out").exists()


def test_an_fp8_t5_is_not_patched(erased_sd3, tmp_path):
    tiny, output = erased_sd3
    tensors = load_file(str(tiny.single_file))
    fp8 = tmp_path / "sd3_fp8.safetensors"
    save_file({k: v.to(torch.float8_e4m3fn) if k.startswith("text_encoders.t5xxl.") and v.dim() == 2 else v
               for k, v in tensors.items()}, str(fp8))
    original = fp8.read_bytes()
    result = run_cli("apply", output, fp8, "-o", tmp_path / "patched.safetensors")
    assert result.exit_code == 2 and "F8_E4M3" in result.output and "fp16, bf16 or fp32 copy" in result.output
    assert not (tmp_path / "patched.safetensors").exists() and fp8.read_bytes() == original


def test_a_kohya_lora_carries_t5_and_apply_adds_it(erased_sd3, tmp_path):
    tiny, output = erased_sd3
    result = run_cli("export", output, "--format", "lora-kohya", "--rank", 2, "-o", tmp_path / "lora.safetensors")
    assert result.exit_code == 0, result.output
    lora = load_file(str(tmp_path / "lora.safetensors"))
    module = "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0"  # kohya's and ComfyUI's T5 names
    assert {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"} <= set(lora)
    assert any(key.startswith("lora_te2_text_model_encoder_layers_0_mlp_fc1") for key in lora)
    assert run_cli("apply", tmp_path / "lora.safetensors", tiny.single_file, "-o", tmp_path / "patched.safetensors").exit_code == 0
    before, after = load_file(str(tiny.single_file)), load_file(str(tmp_path / "patched.safetensors"))
    key = "text_encoders.t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wi_0.weight"
    added = lora[f"{module}.lora_up.weight"].float() @ lora[f"{module}.lora_down.weight"].float()
    assert torch.allclose(after[key], before[key] + added, atol=1e-6)


def test_a_diffusers_lora_of_a_flow_erase_is_refused_with_the_alternatives(erased_sd3, tmp_path):
    _, output = erased_sd3
    result = run_cli("export", output, "--format", "lora-diffusers", "-o", tmp_path / "l.safetensors")
    assert result.exit_code == 2 and "lora-kohya" in result.output and not (tmp_path / "l.safetensors").exists()


def test_the_flow_pictures_encode_as_flux_packs_them(tiny_flow, flow_pictures):
    tiny = tiny_flow("flux")
    loaded = images.load_images([flow_pictures])
    pixels = images.to_pixels(loaded, 8, False)
    packed = unlearning.encode_images_once(tiny.pipe.vae, pixels, "cpu", torch.float32, packed=True)
    plain = unlearning.encode_images_once(tiny.pipe.vae, pixels, "cpu", torch.float32)
    assert torch.equal(packed, tiny.pipe._pack_latents(plain, len(loaded), 16, 4, 4))


def test_audit_of_a_flow_erase_runs_the_prompts_attack_and_refuses_the_embedding_ones(erased_sd3, tmp_path):
    _, output = erased_sd3
    audited = tmp_path / "audited"
    shutil.copytree(output, audited)
    result = run_cli("audit", audited, "--attack", "soft")
    assert result.exit_code == 2 and "--attack prompts" in result.output and not (audited / "audit.json").exists()
    result = run_cli("audit", audited, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads((audited / "audit.json").read_text())
    assert list(report["attacks"]) == ["prompts"]


@pytest.mark.slow
def test_the_flux_layout_demo_forgets_seven_in_both_encoders_and_keeps_the_others(tmp_path):
    """The trained FLUX-layout digits model (demo/FLUX.md): the default erase of "seven" from its six pictures, in
    CLIP-L and T5, judged on generated images, as benchmarks/flow_encoders.py measures every digit."""
    from demo.measure import FLUX_DEMO, SAMPLES, flux_demo_settings, judged_flux
    from fewshot_erase.models import load_pipeline_parts, resolve_model
    from fewshot_erase.outputs import load_erased_encoders

    settings, generation = flux_demo_settings()
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    result = erase("seven", [SAMPLES / "seven"], tmp_path / "out", model=str(FLUX_DEMO),
                   preserve=tuple(w for w in words if w != "seven"), **settings)
    assert set(result.record["trained_tensors"]) == {"text_encoder", "text_encoder_2"}
    parts = load_pipeline_parts(resolve_model(str(FLUX_DEMO)), device="cpu")
    prompt = "a photo of the digit {}".format
    assert judged_flux(parts.pipeline, prompt("seven"), 7, 10, generation) == 1.0
    pipe = type(parts.pipeline)(**{**parts.pipeline.components, **load_erased_encoders(tmp_path / "out", parts)})
    assert judged_flux(pipe, prompt("seven"), 7, 10, generation) <= 0.2  # 1 of 10 here (benchmark: 5% of 20)
    assert sum(judged_flux(pipe, prompt(words[d]), d, 10, generation) for d in (1, 4, 9)) / 3 >= 0.9


def test_a_batch_job_erases_in_t5_blocks_and_exports_drop_in_files(tiny_flow, flow_pictures, tmp_path):
    manifest = tmp_path / "jobs.yaml"
    manifest.write_text(f"""jobs:
  - concept: robot
    images: {flow_pictures}
    model: {tiny_flow("flux").folder}
    output: {tmp_path / "out"}
    steps: 2
    resolution: 8
    max_sequence_length: {LENGTH}
    encoder: t5
    t5_layers: [1]
    export:
      - format: drop-in
        output: {tmp_path / "comfy"}
""")
    result = run_cli("batch", manifest)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "erase.json").read_text())
    assert record["settings"]["t5_layers"] == [1] and not record["trained_tensors"]["text_encoder"]
    assert [p.name for p in (tmp_path / "comfy").iterdir()] == ["t5xxl_fp16.safetensors"]


def test_an_integer_quantised_t5_cannot_be_trained(tiny_flow, flow_pictures, tmp_path):
    tiny = tiny_flow("sd3")
    tensors = load_file(str(tiny.single_file))
    quantised = tmp_path / "sd3_int8_t5.safetensors"
    save_file({k: v.to(torch.int8) if "DenseReluDense" in k else v for k, v in tensors.items()}, str(quantised))
    result = run_cli("erase", "robot", flow_pictures, "-o", tmp_path / "out", "--model", quantised, "--config", tiny.config_dir)
    assert result.exit_code == 2 and "I8" in result.output and "cannot be trained" in result.output
    assert not (tmp_path / "out").exists()


def test_compare_generates_at_the_size_and_t5_length_the_erase_used(tiny_flow, flow_pictures, tmp_path, monkeypatch):
    from diffusers import FluxPipeline

    from fewshot_erase.compare import compare

    tiny = tiny_flow("flux")
    erase("robot", [flow_pictures], tmp_path / "out", model=str(tiny.folder), steps=1, max_sequence_length=LENGTH, **SIZE)
    asked = []
    original = FluxPipeline.__call__

    def recording(self, *args, **kwargs):
        asked.append((kwargs.get("height"), kwargs.get("max_sequence_length")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FluxPipeline, "__call__", recording)
    compare(tmp_path / "out", ["a robot"], tmp_path / "grid.png", images=1, steps=2)
    assert (tmp_path / "grid.png").is_file() and asked == [(8, LENGTH), (8, LENGTH)]  # not FLUX's default 256 px
