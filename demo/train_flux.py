"""Train the second embedded digits demo: a tiny FLUX.1-layout flow-matching model on the TRAINING split of load_digits.

    python -m demo.train_flux --out fewshot_erase/demo_flux

Components (diffusers ``FluxPipeline`` layout):
  text_encoder    CLIPTextModel (from scratch, the packaged CLIP BPE tokenizer, 77 positions); its pooled output
                  feeds the transformer's ``pooled_projections``
  text_encoder_2  T5EncoderModel, gated-gelu (from scratch) with an offline-built Unigram T5 tokenizer
                  (``tokenizer_2/``); its last hidden state is the transformer's ``encoder_hidden_states``
  transformer     FluxTransformer2DModel (double- and single-stream blocks, RoPE over img/txt ids),
                  ``guidance_embeds=False``: classifier-free guidance comes from the 12% empty captions and is
                  applied at generation with ``true_cfg_scale`` and ``negative_prompt=""``
  vae             the SD1 demo's trained AutoencoderKL (``fewshot_erase/demo/vae``; 16x16x3 -> 8x8x4, factor 2),
                  with ``shift_factor`` / ``scaling_factor`` measured on the training split
  scheduler       FlowMatchEulerDiscreteScheduler with FLUX.1-dev's config (dynamic shifting)

Loss: diffusers' FLUX training recipe (examples/dreambooth/train_dreambooth_flux.py):
  x = (vae mean - shift_factor) * scaling_factor, packed 2x2 with FluxPipeline._pack_latents;
  u = compute_density_for_timestep_sampling(...), timestep = scheduler.timesteps[u * 1000], sigma = timestep / 1000;
  noisy = (1 - sigma) * x + sigma * noise; target = noise - x;
  pred = transformer(noisy, timestep=timestep / 1000, pooled_projections=CLIP pooled, encoder_hidden_states=T5,
                     txt_ids=zeros, img_ids=FluxPipeline._prepare_latent_image_ids(...));
  loss = mean(compute_loss_weighting_for_sd3(scheme, sigma) * (unpack(pred) - target) ** 2).
Everything seeded; CPU, torch.set_num_threads(1) by default (the machine is shared).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import string
import time

import numpy as np
import torch
import torch.nn.functional as F

try:
    from . import data
    from . import train as sd1
except ImportError:  # pragma: no cover
    import data  # type: ignore
    import train as sd1  # type: ignore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "fewshot_erase", "demo_flux")
SD1_VAE = os.path.join(REPO, "fewshot_erase", "demo", "vae")
PIXELS = sd1.PIXELS  # 16x16 RGB, VAE factor 2 -> 8x8x4 latents -> 4x4 = 16 packed tokens of 16 channels
MAX_SEQUENCE_LENGTH = 16  # T5 tokens (the generation setting; "a photo of the digit seven" is 7 with </s>)

# FLUX.1-dev's scheduler config (black-forest-labs/FLUX.1-dev, scheduler/scheduler_config.json)
SCHEDULER_KW = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                    base_image_seq_len=256, max_image_seq_len=4096)

# the generation settings demo.json ships (chosen by demo/evaluate_flux.py's measurement; see demo/FLUX.md)
GENERATION = dict(height=PIXELS, width=PIXELS, num_inference_steps=20, true_cfg_scale=3.0, negative_prompt="",
                  max_sequence_length=MAX_SEQUENCE_LENGTH, guidance_scale=None)


# ----------------------------------------------------------------------------------------------- configs

def clip_config():
    from transformers import CLIPTextConfig

    # hidden 32 keeps the 49408-token embedding at 3.2 MB in fp16
    return CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                          projection_dim=32, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def t5_config(vocab_size):
    from transformers import T5Config

    return T5Config(vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_heads=4,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6,
                    is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0)


def make_transformer(args):
    from diffusers import FluxTransformer2DModel

    head = 16
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=None, num_layers=args.double_blocks,
        num_single_layers=args.single_blocks, attention_head_dim=head, num_attention_heads=args.width // head,
        joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6))


def make_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_KW)


# ------------------------------------------------------------------------------------------- T5 tokenizer

def t5_vocab():
    """Unigram pieces (piece, log-prob score): <pad>=0, </s>=1, <unk>=2, whole words of every caption template
    (training and held-out), then every printable ASCII character with and without the word-start "▁", so any
    ASCII text tokenizes (unknown words fall back to characters; other characters are <unk>)."""
    words = []
    for tpl in data.WORD_TEMPLATES + data.NUMERAL_TEMPLATES + data.HELDOUT_TEMPLATES:
        for d in range(10):
            for w in data.caption(d, tpl).split():
                if w not in words:
                    words.append(w)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen = {p for p, _ in vocab}
    for w in words:
        if "▁" + w not in seen:
            vocab.append(("▁" + w, -2.0)); seen.add("▁" + w)
    vocab.append(("▁", -6.0)); seen.add("▁")
    for c in string.digits + string.ascii_letters + string.punctuation:
        for p in ("▁" + c, c):
            if p not in seen:
                vocab.append((p, -8.0)); seen.add(p)
    return vocab


def make_t5_tokenizer():
    from transformers import T5TokenizerFast  # transformers 5: the same class as T5Tokenizer (tokenizers backend)

    return T5TokenizerFast(vocab=t5_vocab(), extra_ids=0, model_max_length=512)


# ------------------------------------------------------------------------------------------------- VAE

def load_vae(path, x, log):
    """The SD1 demo's trained VAE (fp16 on disk, upcast), with FLUX's shift_factor and scaling_factor measured on
    the training split's latent means: x = (mean - shift) * scale has mean 0, std 1."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path, torch_dtype=torch.float32).float().eval()
    with torch.no_grad():
        mu = vae.encode(x).latent_dist.mean
    shift = float(mu.mean())
    scale = float(1.0 / (mu - shift).std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    log(f"vae from {os.path.relpath(path, REPO)}: shift_factor {shift:.4f}, scaling_factor {scale:.4f}")
    return vae, mu


# ------------------------------------------------------------------------------------------------ saving

def _fp32_config(path):
    cj = os.path.join(path, "config.json")
    with open(cj) as fh:
        c = json.load(fh)
    c["dtype"] = "float32"
    with open(cj, "w") as fh:
        json.dump(c, fh, indent=2, sort_keys=True)
        fh.write("\n")


def save_t5(te2, path):
    """transformers' own T5EncoderModel key names, fp16 weights, config dtype float32 (upcast on load)."""
    m = copy.deepcopy(te2).to(torch.float16)
    m.config.architectures = ["T5EncoderModel"]
    m.save_pretrained(path, safe_serialization=True)
    _fp32_config(path)


def save_pipeline(out, vae, te, te2, tok2, transformer, meta):
    import diffusers

    os.makedirs(out, exist_ok=True)
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    copy.deepcopy(transformer).to(torch.float16).save_pretrained(os.path.join(out, "transformer"),
                                                                  safe_serialization=True)
    copy.deepcopy(vae).to(torch.float16).save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
    sd1.save_text_encoder(te, os.path.join(out, "text_encoder"))  # canonical text_model.* names
    save_t5(te2, os.path.join(out, "text_encoder_2"))
    os.makedirs(os.path.join(out, "tokenizer"))
    for f in sd1.TOKENIZER_FILES:
        shutil.copyfile(os.path.join(sd1.TOKENIZER_DIR, f), os.path.join(out, "tokenizer", f))
    tok2.save_pretrained(os.path.join(out, "tokenizer_2"))
    make_scheduler().save_pretrained(os.path.join(out, "scheduler"))
    index = {
        "_class_name": "FluxPipeline", "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    }
    with open(os.path.join(out, "model_index.json"), "w") as fh:
        json.dump(index, fh, indent=2)
        fh.write("\n")
    with open(os.path.join(out, "demo.json"), "w") as fh:
        json.dump(meta, fh, indent=1)
        fh.write("\n")
    for root, _, files in os.walk(out):
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)


def metadata(args, stats):
    return {
        "description": "Tiny text-to-image model in the FLUX.1 diffusers layout (FluxPipeline: CLIPTextModel + "
                       "CLIP BPE tokenizer -> pooled_projections, T5EncoderModel (gated-gelu) + Unigram T5 tokenizer "
                       "-> encoder_hidden_states, FluxTransformer2DModel, AutoencoderKL, "
                       "FlowMatchEulerDiscreteScheduler) trained from scratch by flow matching on scikit-learn's 8x8 "
                       "digits (the VAE is the SD1 demo's). Weights stored in fp16 (load in fp32).",
        "dataset": "sklearn.datasets.load_digits (UCI ML hand-written digits, E. Alpaydin and C. Kaynak, CC BY 4.0)",
        "split": {"seed": data.SPLIT_SEED, "heldout_fraction": data.HELDOUT_FRACTION, "stratified": True,
                  "generator_trained_on": "training split only (1,257 images)",
                  "heldout_used_for": "judge training"},
        "resolution": {"pixels": PIXELS, "latent": [4, PIXELS // 2, PIXELS // 2],
                       "packed": [(PIXELS // 4) ** 2, 16],
                       "note": "8x8 scans upsampled nearest-neighbour to 16x16 grey->RGB; VAE factor 2; FLUX packs "
                               "2x2 latent patches -> 16 image tokens of 16 channels"},
        "generation": dict(GENERATION, note="guidance_embeds is False, so guidance_scale is ignored; true "
                                            "classifier-free guidance with the empty negative prompt "
                                            "(true_cfg_scale > 1 and negative_prompt given). Always pass "
                                            "height/width 16: FluxPipeline's default is 128 * vae_scale_factor."),
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "caption_templates": {"word": list(data.WORD_TEMPLATES), "numeral": list(data.NUMERAL_TEMPLATES),
                              "empty_caption_share": data.EMPTY_CAPTION_SHARE,
                              "placeholders": "{w}=zero..nine, {n}=0..9",
                              "empty_caption": "both encoders get the empty caption"},
        "heldout_phrasing": list(data.HELDOUT_TEMPLATES),
        "digit_words": list(data.DIGIT_WORDS),
        "judge": "demo/judge.py: SVC(C=10, gamma=0.001) on the held-out split's 8x8 grey values",
        "training": {"command": "python -m demo.train_flux --out fewshot_erase/demo_flux",
                     "loss": "diffusers FLUX recipe: flow matching, target noise - x, weighting scheme "
                             f"{args.weighting_scheme!r}",
                     "steps": args.steps, "batch": args.batch, "captions_per_step": args.captions_per_step,
                     "lr": args.lr, "ema": args.ema, "seed": args.seed, "threads": args.threads,
                     "encoder_drop": args.encoder_drop,
                     "wall_seconds": stats.get("train_wall_seconds")},
    }


# ------------------------------------------------------------------------------------------------- train

def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae", default=SD1_VAE, help="AutoencoderKL folder to reuse (the SD1 demo's)")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--captions-per-step", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--width", type=int, default=64, help="transformer inner dim (heads x 16)")
    ap.add_argument("--double-blocks", type=int, default=2)
    ap.add_argument("--single-blocks", type=int, default=4)
    ap.add_argument("--weighting-scheme", default="none", choices=["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"])
    ap.add_argument("--logit-mean", type=float, default=0.0)
    ap.add_argument("--logit-std", type=float, default=1.0)
    ap.add_argument("--mode-scale", type=float, default=1.29)
    ap.add_argument("--encoder-drop", type=float, default=0.0,
                    help="experimental, off by default: each non-empty caption goes to CLIP only (T5 gets the empty "
                         "caption) with this probability, and to T5 only with the same probability, so that each "
                         "encoder alone learns the digit; 0 keeps the SD1 demo's caption recipe exactly")
    ap.add_argument("--stats", default=None, help="where to write training stats JSON")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    t_start = time.time()

    def log(msg):
        print(f"[{time.time()-t_start:7.1f}s] {msg}", flush=True)

    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
    from diffusers.utils import logging as dlog
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel

    dlog.set_verbosity_error()
    x8, y, _ = data.train_split()
    x = sd1.to_pixels(x8)
    log(f"train split: {len(y)} images")

    vae, mu = load_vae(args.vae, x, log)
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    lat = (mu - shift) * scale                                    # [N, 4, 8, 8]
    n_img, c_lat, h_lat, w_lat = lat.shape
    with torch.no_grad():
        rec = vae.decode(lat / scale + shift).sample
    from .judge import judge
    vae_acc = float((judge(((rec[:, 0] + 1) / 2).clamp(0, 1).numpy()) == y).mean())
    log(f"vae recon mse {F.mse_loss(rec, x).item():.5f}, judge acc on recon {vae_acc:.4f}")

    # captions: all (digit, template) combos + empty; pre-tokenized exactly as FluxPipeline does
    tok = CLIPTokenizer.from_pretrained(sd1.TOKENIZER_DIR)
    tok2 = make_t5_tokenizer()
    caps = [""] + [c for d in range(10) for c in data.training_captions(d)]
    ids1 = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids
    ids2 = tok2(caps, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                return_tensors="pt").input_ids
    log(f"T5 vocab {len(tok2)}; '{caps[1]}' -> {tok2.convert_ids_to_tokens(ids2[1][:8].tolist())}")
    per_digit = len(data.training_captions(0))
    by_digit = [np.nonzero(y == d)[0] for d in range(10)]

    torch.manual_seed(args.seed + 1)
    te = CLIPTextModel(clip_config())
    te2 = T5EncoderModel(t5_config(len(tok2)))
    transformer = make_transformer(args)
    models = [te, te2, transformer]
    for m in models:
        m.train()
    emas = [copy.deepcopy(m).eval() for m in models]
    for e in emas:
        for p in e.parameters():
            p.requires_grad_(False)
    named = [(n, p) for m in models for n, p in m.named_parameters()]
    no_decay = [p for n, p in named if "embed" in n or "shared" in n or "norm" in n or n.endswith("bias")]
    nd_ids = {id(p) for p in no_decay}
    decay = [p for _, p in named if id(p) not in nd_ids]
    opt = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.01}],
                            lr=args.lr)
    all_params = [p for _, p in named]
    sched = make_scheduler()   # training copy, as the diffusers example's noise_scheduler_copy
    sched_timesteps, sched_sigmas = sched.timesteps.clone(), sched.sigmas.clone()
    img_ids = FluxPipeline._prepare_latent_image_ids(args.batch, h_lat // 2, w_lat // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(MAX_SEQUENCE_LENGTH, 3)
    g = torch.Generator().manual_seed(args.seed + 2)
    rng = np.random.default_rng(args.seed + 3)
    params = {"text_encoder": sum(p.numel() for p in te.parameters()),
              "text_encoder_2": sum(p.numel() for p in te2.parameters()),
              "transformer": sum(p.numel() for p in transformer.parameters()),
              "vae": sum(p.numel() for p in vae.parameters())}
    log(f"params: {params}")
    t0 = time.time()
    run = 0.0
    for step in range(args.steps):
        for grp in opt.param_groups:
            grp["lr"] = sd1.lr_at(step, args.steps, args.lr, min(500, args.steps // 10))
        # k distinct captions per step (text encoder cost), batch/k images per caption
        k = args.captions_per_step
        ci = []
        for _ in range(k):
            if rng.random() < data.EMPTY_CAPTION_SHARE:
                ci.append(0)
            else:
                ci.append(1 + int(rng.integers(len(caps) - 1)))
        ci1, ci2 = list(ci), list(ci)  # the captions CLIP and T5 see (the same unless --encoder-drop)
        if args.encoder_drop > 0:
            for j, c in enumerate(ci):
                r = rng.random() if c else 1.0
                if r < args.encoder_drop:
                    ci1[j] = 0
                elif r < 2 * args.encoder_drop:
                    ci2[j] = 0
        m = args.batch // k
        bi = []
        for c in ci:
            pool = np.arange(n_img) if c == 0 else by_digit[(c - 1) // per_digit]
            bi.extend(pool[rng.integers(len(pool), size=m)].tolist())
        model_input = lat[torch.tensor(bi)]
        bsz = model_input.shape[0]
        noise = torch.randn(model_input.shape, generator=g)
        u = compute_density_for_timestep_sampling(args.weighting_scheme, bsz, logit_mean=args.logit_mean,
                                                  logit_std=args.logit_std, mode_scale=args.mode_scale,
                                                  generator=g)
        indices = (u * sched.config.num_train_timesteps).long()
        timesteps = sched_timesteps[indices]
        sigmas = sched_sigmas[indices].view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * model_input + sigmas * noise
        packed = FluxPipeline._pack_latents(noisy, bsz, c_lat, h_lat, w_lat)
        pooled = te(ids1[ci1]).pooler_output.repeat_interleave(m, dim=0)
        hidden = te2(ids2[ci2])[0].repeat_interleave(m, dim=0)
        pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=None,
                           pooled_projections=pooled, encoder_hidden_states=hidden, txt_ids=txt_ids,
                           img_ids=img_ids, return_dict=False)[0]
        pred = FluxPipeline._unpack_latents(pred, h_lat * 2, w_lat * 2, 2)  # pixels = latent * vae factor 2
        weighting = compute_loss_weighting_for_sd3(args.weighting_scheme, sigmas)
        target = noise - model_input
        loss = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(bsz, -1), 1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(all_params, 1.0)
        opt.step()
        dk = min(args.ema, (1 + step) / (10 + step))
        for e, mdl in zip(emas, models):
            sd1.ema_update(e, mdl, dk)
        run = 0.98 * run + 0.02 * loss.item() if step else loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            el = time.time() - t0
            log(f"step {step} loss {run:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{el/(step+1)*1000:.0f}ms/step eta {el/(step+1)*(args.steps-step-1)/60:.1f}min")
    wall = time.time() - t_start
    ema_te, ema_te2, ema_tr = emas
    stats = {"train_wall_seconds": round(wall, 1), "ms_per_step": round((time.time() - t0) / args.steps * 1000, 1),
             "vae_recon_judge_acc": vae_acc, "vae_shift_factor": shift, "vae_scaling_factor": scale,
             "final_running_loss": run, "args": vars(args), "params": params, "t5_vocab": len(tok2),
             "max_sequence_length": MAX_SEQUENCE_LENGTH}
    save_pipeline(args.out, vae, ema_te, ema_te2, tok2, ema_tr, metadata(args, stats))
    sizes = {os.path.relpath(os.path.join(r, f), args.out): os.path.getsize(os.path.join(r, f))
             for r, _, fs in os.walk(args.out) for f in fs}
    stats["file_bytes"] = dict(sorted(sizes.items()))
    if args.stats:
        with open(args.stats, "w") as fh:
            json.dump(stats, fh, indent=1)
    log(f"saved to {args.out}; wall {wall/60:.1f} min; largest file {max(sizes.values())/1e6:.2f} MB")


if __name__ == "__main__":
    main()
