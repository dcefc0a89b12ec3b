"""Tiny real-architecture pipelines: single-file / diffusers-folder / hub-cache round trips, offline.

Also checks the packaged full-size component configs (fewshot_erase/configs/<family>) on the meta device.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers / huggingface_hub are imported

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

if str(Path(__file__).parent) not in sys.path:  # also under --import-mode=importlib
    sys.path.insert(0, str(Path(__file__).parent))

import tiny_pipelines as tp  # noqa: E402
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

FAMILIES = tp.FAMILIES


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # With 2 cores shared with other work, OpenMP spin-waits make tiny convs ~50x slower at 2 threads.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """family -> (pipe, tiny config dir, fp32 single file)."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for fam in FAMILIES:
        pipe = tp.build_tiny_pipeline(fam)
        cfg = tp.tiny_config_dir(pipe, root / f"{fam}-config")
        single = tp.save_single_file(pipe, root / f"{fam}.safetensors", fam)
        out[fam] = (pipe, cfg, single)
    return out


def _assert_same_weights(expected_pipe, got_pipe, cast=None):
    a = tp.component_state_dicts(expected_pipe)
    b = tp.component_state_dicts(got_pipe)
    assert a.keys() == b.keys()
    for comp in a:
        assert a[comp].keys() == b[comp].keys(), comp
        for k, v in a[comp].items():
            w = b[comp][k]
            assert w.device.type == "cpu", (comp, k)
            ref = v if cast is None else v.to(cast)
            assert torch.equal(ref.to(w.dtype), w), f"{comp}.{k} differs"


def _generate(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe("a photo of a cat", num_inference_steps=2, generator=g, output_type="np").images


# ------------------------------------------------------------------ builders
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipeline_architecture_and_generation(built, family):
    pipe = built[family][0]
    te = pipe.text_encoder
    assert te.config.vocab_size == 49408 and te.config.max_position_embeddings == 77
    assert pipe.tokenizer.model_max_length == 77 and len(pipe.tokenizer) == 49408
    sched = pipe.scheduler.config
    assert (sched.beta_start, sched.beta_end, sched.beta_schedule, sched.num_train_timesteps) == (
        0.00085,
        0.012,
        "scaled_linear",
        1000,
    )
    if family == "sd1":
        assert te.config.hidden_act == "quick_gelu"
        assert sched.prediction_type == "epsilon"
        assert not pipe.unet.config.use_linear_projection
        assert pipe.tokenizer.pad_token == "<|endoftext|>"
    elif family == "sd2":
        assert te.config.hidden_act == "gelu"
        assert sched.prediction_type == "v_prediction"
        assert pipe.unet.config.use_linear_projection and pipe.unet.config.upcast_attention
        assert pipe.tokenizer.pad_token == "!"
    else:
        te2 = pipe.text_encoder_2
        assert isinstance(te2, CLIPTextModelWithProjection) and te2.config.hidden_act == "gelu"
        assert te.config.hidden_size != te2.config.hidden_size  # needed by diffusers' single-file loader
        assert pipe.unet.config.addition_embed_type == "text_time"
        assert pipe.unet.config.cross_attention_dim == te.config.hidden_size + te2.config.hidden_size
        assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer_2.pad_token == "!"
    n_unet = sum(p.numel() for p in pipe.unet.parameters())
    assert n_unet < 2_500_000
    img = _generate(pipe)
    assert img.shape == (1, 32, 32, 3)
    assert torch.isfinite(torch.from_numpy(img)).all()


def test_builder_is_seeded():
    a, b = tp.build_tiny_pipeline("sd1", seed=3), tp.build_tiny_pipeline("sd1", seed=3)
    _assert_same_weights(a, b)


# ------------------------------------------------------------------ single file
@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_layout(built, family):
    pipe, _, single = built[family]
    with safe_open(str(single), "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        get = f.get_tensor
        assert "model.diffusion_model.input_blocks.0.0.weight" in keys
        assert "model.diffusion_model.out.2.weight" in keys
        assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
        assert get("first_stage_model.encoder.mid.attn_1.q.weight").ndim == 4
        assert not any(k.startswith(("unet.", "vae.", "text_encoder")) for k in keys)
        if family == "sd1":
            fc1 = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
            assert torch.equal(get(fc1), pipe.text_encoder.state_dict()["encoder.layers.0.mlp.fc1.weight"])
            assert "betas" in keys and "alphas_cumprod" in keys
        elif family == "sd2":
            n = pipe.text_encoder.config.num_hidden_layers
            p = "cond_stage_model.model."
            assert f"{p}transformer.resblocks.{n}.mlp.c_fc.weight" in keys  # the unused final block
            assert f"{p}transformer.resblocks.{n + 1}.mlp.c_fc.weight" not in keys
            qkv = get(f"{p}transformer.resblocks.0.attn.in_proj_weight")
            sd = pipe.text_encoder.state_dict()
            assert torch.equal(qkv[: qkv.shape[0] // 3], sd["encoder.layers.0.self_attn.q_proj.weight"])
            assert torch.equal(qkv[-qkv.shape[0] // 3 :], sd["encoder.layers.0.self_attn.v_proj.weight"])
            assert get(f"{p}text_projection").shape[0] == pipe.text_encoder.config.hidden_size
            assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
        else:
            assert "model.diffusion_model.label_emb.0.0.weight" in keys
            assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
            proj = get("conditioner.embedders.1.model.text_projection")
            assert torch.equal(proj, pipe.text_encoder_2.text_projection.weight.T)
            assert not any(k.startswith("cond_stage_model.") for k in keys)


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_round_trip(built, family):
    pipe, cfg, single = built[family]
    loaded = tp.load_single_file_pipeline(single, family, cfg)
    assert type(loaded) is type(pipe)
    _assert_same_weights(pipe, loaded)
    assert type(loaded.scheduler) is type(pipe.scheduler)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}
    assert public(loaded.scheduler.config) == public(pipe.scheduler.config)
    assert loaded.tokenizer.pad_token == pipe.tokenizer.pad_token
    assert (_generate(loaded) == _generate(pipe)).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_fp16(built, family, tmp_path):
    pipe, cfg, _ = built[family]
    single = tp.save_single_file(pipe, tmp_path / "half.safetensors", family, dtype=torch.float16)
    with safe_open(str(single), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert "F32" not in dtypes and "F16" in dtypes
    as_half = tp.load_single_file_pipeline(single, family, cfg, torch_dtype=torch.float16)
    assert as_half.unet.dtype == torch.float16
    _assert_same_weights(pipe, as_half, cast=torch.float16)
    as_float = tp.load_single_file_pipeline(single, family, cfg)  # upcast on load
    assert as_float.unet.dtype == torch.float32
    _assert_same_weights(pipe, as_float, cast=torch.float16)


# ------------------------------------------------------------------ quirks the loader call depends on
def test_quirk_tokenizer_must_be_passed(built):
    pipe, cfg, single = built["sd1"]
    loaded = StableDiffusionPipeline.from_single_file(str(single), config=str(cfg), local_files_only=True, safety_checker=None)
    # no tokenizer files in the config dir -> transformers 5 silently builds an empty tokenizer
    assert len(loaded.tokenizer) < 1000


def test_quirk_prediction_type_kwarg_breaks_scheduler(built):
    _, cfg, single = built["sd2"]
    loaded = StableDiffusionPipeline.from_single_file(
        str(single),
        config=str(cfg),
        local_files_only=True,
        tokenizer=tp.load_tokenizer("!"),
        safety_checker=None,
        prediction_type="v_prediction",
    )
    # legacy scheduler path: default config with beta_start 0.02 instead of config_dir/scheduler
    assert loaded.scheduler.config.beta_start != 0.00085


def test_quirk_sdxl_text_encoders_told_apart_by_width(tmp_path):
    base = tp.build_tiny_pipeline("sdxl")
    te2 = CLIPTextModelWithProjection(tp._text_config(32, 3, 4, "gelu", projection_dim=32)).eval()
    unet = UNet2DConditionModel.from_config(
        {**base.unet.config, "cross_attention_dim": 64, "projection_class_embeddings_input_dim": 6 * 8 + 32}
    )
    same = type(base)(
        vae=base.vae,
        text_encoder=base.text_encoder,
        text_encoder_2=te2,
        tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer_2,
        unet=unet,
        scheduler=base.scheduler,
        add_watermarker=False,
    )
    cfg = tp.tiny_config_dir(same, tmp_path / "cfg")
    single = tp.save_single_file(same, tmp_path / "same.safetensors", "sdxl")
    loaded = tp.load_single_file_pipeline(single, "sdxl", cfg)
    got = loaded.text_encoder_2.text_model.embeddings.token_embedding.weight
    assert torch.equal(got, base.text_encoder.embeddings.token_embedding.weight)  # CLIP-L weights in text_encoder_2


# ------------------------------------------------------------------ diffusers folder + hub cache
@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_folder_round_trip(built, family, tmp_path):
    pipe = built[family][0]
    folder = tp.save_diffusers_folder(pipe, tmp_path / "pipe")
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is None:
            continue
        with safe_open(str(folder / name / "model.safetensors"), "pt") as f:
            keys = list(f.keys())
            assert f.metadata() == {"format": "pt"}
        assert "text_model.encoder.layers.0.mlp.fc1.weight" in keys
        assert all(k.startswith("text_model.") or k == "text_projection.weight" for k in keys)
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(pipe, name, None) is not None:
            assert (folder / name / "vocab.json").is_file() and (folder / name / "merges.txt").is_file()
    loaded = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    assert type(loaded) is type(pipe)
    _assert_same_weights(pipe, loaded)
    assert loaded.tokenizer.pad_token == pipe.tokenizer.pad_token and len(loaded.tokenizer) == 49408


def _digest(pipe) -> dict[str, str]:
    out = {}
    for comp, sd in tp.component_state_dicts(pipe).items():
        h = hashlib.sha256()
        for k in sorted(sd):
            h.update(k.encode())
            h.update(sd[k].detach().float().contiguous().numpy().tobytes())
        out[comp] = h.hexdigest()
    return out


_SUBPROCESS = r"""
import json, sys, torch
torch.set_num_threads(1)
from diffusers import DiffusionPipeline
sys.path.insert(0, sys.argv[2])
from test_tiny_pipelines import _digest
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
print("DIGEST " + json.dumps(_digest(pipe)))
"""


def test_hub_cache_offline(built, tmp_path):
    pipe = built["sd1"][0]
    folder = tp.save_diffusers_folder(pipe, tmp_path / "pipe")
    repo_id = "tiny-org/tiny-sd1"
    snapshot = tp.save_hub_cache(folder, tmp_path / "home" / "hub", repo_id)
    assert snapshot.parent.parent.name == "models--tiny-org--tiny-sd1"
    assert (snapshot.parent.parent / "refs" / "main").read_text() == snapshot.name

    loaded = DiffusionPipeline.from_pretrained(repo_id, cache_dir=str(tmp_path / "home" / "hub"), local_files_only=True)
    _assert_same_weights(pipe, loaded)

    # environment-variable route, as the CLI would see it: HF_HOME + HF_HUB_OFFLINE=1, no cache_dir argument
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent))
    res = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS, repo_id, str(Path(__file__).parent)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(l for l in res.stdout.splitlines() if l.startswith("DIGEST "))
    assert json.loads(line[len("DIGEST ") :]) == _digest(pipe)


# ------------------------------------------------------------------ config dirs
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_config_dir_has_packaged_shape(built, family):
    cfg = built[family][1]
    packaged = tp.PACKAGED_CONFIGS_DIR / family
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    assert files(cfg) == files(packaged)
    assert not any(p.suffix == ".safetensors" for p in cfg.rglob("*"))
    tiny_index, real_index = tp.load_json(cfg / "model_index.json"), tp.load_json(packaged / "model_index.json")
    assert tiny_index["_class_name"] == real_index["_class_name"]
    for comp, spec in real_index.items():
        if isinstance(spec, list) and spec[0] is not None:
            assert tiny_index[comp] == spec, comp
    assert tp.load_json(cfg / "scheduler" / "scheduler_config.json")["_class_name"] == tp.load_json(
        packaged / "scheduler" / "scheduler_config.json"
    )["_class_name"]


# published parameter counts (millions)
_FULL_SIZE = {
    "sd1": {"unet": 859.52, "vae": 83.65, "text_encoder": 123.06},
    "sd2": {"unet": 865.91, "vae": 83.65, "text_encoder": 340.39},
    "sdxl": {"unet": 2567.46, "vae": 83.65, "text_encoder": 123.06, "text_encoder_2": 694.66},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_packaged_configs_full_size(family):
    d = tp.PACKAGED_CONFIGS_DIR / family
    index = tp.load_json(d / "model_index.json")
    if family != "sdxl":  # not shipped: from_single_file would try to load them from the config dir
        assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
        assert index["requires_safety_checker"] is False
    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(d, subfolder="unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(d, subfolder="vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(d / "text_encoder")),
        }
        if family == "sdxl":
            models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(d / "text_encoder_2"))
    for name, expected in _FULL_SIZE[family].items():
        n = sum(p.numel() for p in models[name].parameters()) / 1e6
        assert abs(n - expected) < 0.01 * expected, (name, n, expected)
    assert models["vae"].config.scaling_factor == (0.13025 if family == "sdxl" else 0.18215)
    sched = tp.load_json(d / "scheduler" / "scheduler_config.json")
    assert sched["prediction_type"] == ("v_prediction" if family == "sd2" else "epsilon")
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"]) == (0.00085, 0.012, "scaled_linear")

    # full-size original layout (meta tensors): diffusers' own converters must give back every key,
    # and diffusers must infer the right model type from it.
    unet, vae, te = models["unet"], models["vae"], models["text_encoder"]
    ldm = {"model.diffusion_model." + k: v for k, v in tp.unet_to_ldm(unet.state_dict(), unet.config).items()}
    ldm.update({"first_stage_model." + k: v for k, v in tp.vae_to_ldm(vae.state_dict(), vae.config).items()})
    if family == "sd1":
        ldm.update(tp.clip_to_ldm(te, "cond_stage_model.transformer."))
        te_back = sfu.convert_ldm_clip_checkpoint(ldm)
    elif family == "sd2":
        ldm.update(tp.openclip_to_ldm(te, "cond_stage_model.model.", extra_final_block=True))
        assert "cond_stage_model.model.transformer.resblocks.23.mlp.c_fc.weight" in ldm  # 24 blocks in the file
        te_back = sfu.convert_open_clip_checkpoint(te, ldm, prefix="cond_stage_model.model.")
    else:
        ldm.update(tp.clip_to_ldm(te, "conditioner.embedders.0.transformer."))
        ldm.update(tp.openclip_to_ldm(models["text_encoder_2"], "conditioner.embedders.1.model."))
        te_back = sfu.convert_ldm_clip_checkpoint(ldm)
        te2_back = sfu.convert_open_clip_checkpoint(models["text_encoder_2"], ldm, prefix="conditioner.embedders.1.model.")
        assert set(te2_back) == set(models["text_encoder_2"].state_dict())
    assert sfu.infer_diffusers_model_type(ldm) == {"sd1": "v1", "sd2": "v2", "sdxl": "xl_base"}[family]
    assert set(sfu.convert_ldm_unet_checkpoint(ldm, unet.config)) == set(unet.state_dict())
    assert set(sfu.convert_ldm_vae_checkpoint(ldm, vae.config)) == set(vae.state_dict())
    assert {k.removeprefix("text_model.") for k in te_back} == set(te.state_dict())
