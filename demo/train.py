"""Train the embedded digits demo model (SD 1.x layout) on the TRAINING split of load_digits.

    python -m demo.train --out fewshot_erase/demo

Stage 1: a small AutoencoderKL (16x16x3 pixels -> 8x8x4 latents).
Stage 2: CLIPTextModel (from scratch, real CLIP BPE tokenizer) + UNet2DConditionModel,
         epsilon prediction, 12% empty captions (classifier-free guidance), EMA weights.
Stage 3: the implicit forms (data.IMPLICIT_FORMS), from the saved model: only the token embeddings of their words
         that no stage-2 caption uses learn, everything else frozen, so no erase of the model changes.
         `--implicit-only` runs this stage alone on a saved model.
Everything seeded; CPU, torch.set_num_threads(2).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F

try:
    from . import data
except ImportError:  # pragma: no cover
    import data  # type: ignore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(REPO, "fewshot_erase", "demo", "tokenizer")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
PIXELS = 16  # 8x8 scans upsampled (nearest) to 16x16; VAE factor 2 -> 8x8x4 latents

SCHEDULER_KW = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def text_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                          projection_dim=64, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=PIXELS // 2, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
        attention_head_dim=4, norm_num_groups=16)


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32), layers_per_block=1, latent_channels=4,
        norm_num_groups=16, sample_size=PIXELS)


def to_pixels(x8: np.ndarray) -> torch.Tensor:
    """[N,8,8] in 0..16 -> [N,3,16,16] in [-1,1] (nearest upsampling, grey -> RGB)."""
    t = torch.from_numpy(x8 / 16.0).float()[:, None]
    t = F.interpolate(t, scale_factor=PIXELS // 8, mode="nearest")
    return (t * 2 - 1).repeat(1, 3, 1, 1)


def lr_at(step, total, base, warmup):
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def ema_update(ema, model, decay):
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)


def train_vae(x, steps, batch, lr, seed, log):
    torch.manual_seed(seed)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, steps, lr, 100)
        xb = x[torch.randint(len(x), (batch,), generator=g)]
        post = vae.encode(xb).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, xb) + 1e-5 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"vae step {step} loss {loss.item():.5f} t={time.time()-t0:.0f}s")
    vae.eval()
    return vae


def make_scheduler(name="DDIMScheduler"):
    import inspect

    import diffusers

    cls = getattr(diffusers, name)
    ok = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in SCHEDULER_KW.items() if k in ok})


def save_text_encoder(te, path):
    """Canonical SD-1 key names (text_model.*), fp16, metadata {"format": "pt"}."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    cfg = copy.deepcopy(te.config)
    cfg.architectures = ["CLIPTextModel"]
    cfg.save_pretrained(path)
    # weights are stored in fp16 (size); record float32 so dtype="auto" loading upcasts them
    cj = os.path.join(path, "config.json")
    with open(cj) as fh:
        c = json.load(fh)
    c["dtype"] = "float32"
    with open(cj, "w") as fh:
        json.dump(c, fh, indent=2, sort_keys=True)
        fh.write("\n")
    sd = {}
    for k, v in te.state_dict().items():
        k2 = k if k.startswith("text_model.") else "text_model." + k
        sd[k2] = v.detach().to(torch.float16).contiguous()
    for f in os.listdir(path):
        if f.endswith(".safetensors") or f.endswith(".bin"):
            os.remove(os.path.join(path, f))
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def save_pipeline(out, vae, te, unet, scheduler_cls="DDIMScheduler"):
    import diffusers

    os.makedirs(out, exist_ok=True)
    # read first: the tokenizer the demo ships is the package's one copy, and `out` is usually where it lives
    tokenizer_files = {}
    for f in TOKENIZER_FILES:
        with open(os.path.join(TOKENIZER_DIR, f), "rb") as handle:
            tokenizer_files[f] = handle.read()
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    copy.deepcopy(unet).to(torch.float16).save_pretrained(os.path.join(out, "unet"), safe_serialization=True)
    copy.deepcopy(vae).to(torch.float16).save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
    save_text_encoder(te, os.path.join(out, "text_encoder"))
    os.makedirs(os.path.join(out, "tokenizer"))
    for f, content in tokenizer_files.items():
        with open(os.path.join(out, "tokenizer", f), "wb") as handle:
            handle.write(content)
    make_scheduler(scheduler_cls).save_pretrained(os.path.join(out, "scheduler"))
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_cls], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    with open(os.path.join(out, "model_index.json"), "w") as fh:
        json.dump(index, fh, indent=2)
        fh.write("\n")


def load_resume(path):
    """A checkpoint this script saved, or a pipeline folder it wrote (the shipped model: its fp16 weights, upcast)."""
    if not os.path.isdir(path):
        return torch.load(path, weights_only=True)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path)
    return {"vae": pipe.vae.float().state_dict(), "te": pipe.text_encoder.float().state_dict(),
            "unet": pipe.unet.float().state_dict()}


def implicit_token_ids(tok) -> list[int]:
    """The implicit forms' tokens that no training or held-out caption uses: the only weights stage 3 moves."""
    def ids(captions):
        return {i for c in captions for i in tok(c).input_ids}

    used = ids([c for d in range(10) for c in data.training_captions(d)]
               + [data.caption(d, t) for d in range(10) for t in data.HELDOUT_TEMPLATES])
    return sorted(ids([c for d in range(10) for c in data.implicit_captions(d)]) - used)


def teach_implicit_forms(out, steps, lr, seed, log, batch=64) -> dict:
    """Stage 3 on the model saved in `out`: the denoising loss of the training split's digits under their implicit
    captions, Adam on the rows of `implicit_token_ids` alone; writes the text encoder back."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out)
    vae, te, unet, tok = pipe.vae.float(), pipe.text_encoder.float(), pipe.unet.float(), pipe.tokenizer
    for p in list(vae.parameters()) + list(te.parameters()) + list(unet.parameters()):
        p.requires_grad_(False)
    x8, y, _ = data.train_split()
    with torch.no_grad():
        post = vae.encode(to_pixels(x8)).latent_dist
    mu, sd, scaling = post.mean, post.std, vae.config.scaling_factor
    table = te.get_input_embeddings().weight
    original = table.detach().clone()
    rows = torch.tensor(implicit_token_ids(tok))
    mask = torch.zeros(len(table), 1)
    mask[rows] = 1.0
    table.requires_grad_(True)
    opt = torch.optim.Adam([table], lr=lr)
    caps = [(d, c) for d in range(10) for c in data.implicit_captions(d)]
    ids = tok([c for _, c in caps], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    by_digit = [np.nonzero(y == d)[0] for d in range(10)]
    acp = DDPMScheduler(**{k: v for k, v in SCHEDULER_KW.items() if k != "set_alpha_to_one"}).alphas_cumprod
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    t0, run = time.time(), 0.0
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, steps, lr, min(100, steps // 10))
        ci = rng.integers(len(caps), size=batch)
        bi = torch.tensor([int(rng.choice(by_digit[caps[c][0]])) for c in ci])
        z0 = (mu[bi] + sd[bi] * torch.randn(mu[bi].shape, generator=g)) * scaling
        t = torch.randint(0, 1000, (batch,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        pred = unet(a.sqrt() * z0 + (1 - a).sqrt() * eps, t, encoder_hidden_states=te(ids[ci])[0]).sample
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        table.grad.mul_(mask)  # zero gradient: Adam leaves those rows exactly where they are
        opt.step()
        run = 0.98 * run + 0.02 * loss.item() if step else loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"implicit step {step} loss {run:.4f} {(time.time() - t0) / (step + 1) * 1000:.0f}ms/step")
    table.requires_grad_(False)
    kept = mask[:, 0] == 0
    assert torch.equal(table[kept], original[kept]), "stage 3 moved a row it does not train"
    save_text_encoder(te, os.path.join(out, "text_encoder"))
    return {"steps": steps, "lr": lr, "seed": seed, "tokens_trained": len(rows), "final_running_loss": run,
            "wall_seconds": round(time.time() - t0, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(REPO, "fewshot_erase", "demo"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=200)
    ap.add_argument("--steps", type=int, default=3400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--captions-per-step", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--scheduler", default="DDIMScheduler")
    ap.add_argument("--stats", default=None, help="where to write training stats JSON")
    ap.add_argument("--threads", type=int, default=2, help="1 when the machine is busy: two spin-waiting threads on a shared core run many times slower")
    ap.add_argument("--resume", default=None, help="continue from a checkpoint this script saved, or from a pipeline folder it wrote")
    ap.add_argument("--checkpoint", default=os.path.join("/tmp", "fewshot_erase_demo_ckpt.pt"))
    ap.add_argument("--implicit-steps", type=int, default=1500)
    ap.add_argument("--implicit-lr", type=float, default=1e-2)
    ap.add_argument("--implicit-only", action="store_true", help="run stage 3 alone on the model in --out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    t_start = time.time()

    def log(msg):
        print(f"[{time.time()-t_start:7.1f}s] {msg}", flush=True)

    if args.implicit_only:
        implicit = teach_implicit_forms(args.out, args.implicit_steps, args.implicit_lr, args.seed + 4, log)
        if args.stats:
            with open(args.stats) as fh:
                stats = json.load(fh)
            stats["implicit"] = implicit
            stats["args"].update(implicit_steps=args.implicit_steps, implicit_lr=args.implicit_lr)
            with open(args.stats, "w") as fh:
                json.dump(stats, fh, indent=1)
        return

    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    x8, y, _ = data.train_split()
    x = to_pixels(x8)
    log(f"train split: {len(y)} images")

    resumed = load_resume(args.resume) if args.resume else None
    if resumed:
        # Second stage: the first taught the UNet what digits look like; this one, with one caption per image
        # and many more steps, teaches the text encoder which word is which digit.
        vae = make_vae()
        vae.load_state_dict(resumed["vae"])
        vae.eval()
    else:
        vae = train_vae(x, args.vae_steps, 64, 1e-3, args.seed, log)
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        mu, sd = post.mean, post.std
        scaling = float(1.0 / mu.std())
        rec = vae.decode(mu).sample
    vae.register_to_config(scaling_factor=scaling)
    from .judge import judge
    rec01 = ((rec[:, 0] + 1) / 2).clamp(0, 1).numpy()
    vae_acc = float((judge(rec01) == y).mean())
    log(f"vae scaling_factor {scaling:.4f}, recon mse {F.mse_loss(rec, x).item():.5f}, judge acc on recon {vae_acc:.4f}")

    # captions: all (digit, template) combos + empty; pre-tokenized to 77 tokens like the pipeline
    tok = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    caps = [""] + [c for d in range(10) for c in data.training_captions(d)]
    ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    per_digit = len(data.training_captions(0))
    by_digit = [np.nonzero(y == d)[0] for d in range(10)]

    torch.manual_seed(args.seed + 1)
    te = CLIPTextModel(text_config())
    unet = make_unet()
    if resumed:
        te.load_state_dict(resumed["te"])
        unet.load_state_dict(resumed["unet"])
    te.train(); unet.train()
    ema_te, ema_unet = copy.deepcopy(te).eval(), copy.deepcopy(unet).eval()
    for p in list(ema_te.parameters()) + list(ema_unet.parameters()):
        p.requires_grad_(False)
    emb = [p for n, p in te.named_parameters() if "embedding" in n]
    rest = [p for n, p in te.named_parameters() if "embedding" not in n] + list(unet.parameters())
    opt = torch.optim.AdamW([{"params": emb, "weight_decay": 0.0}, {"params": rest, "weight_decay": 0.01}],
                            lr=args.lr)
    sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_KW.items() if k not in ("set_alpha_to_one",)})
    acp = sched.alphas_cumprod
    g = torch.Generator().manual_seed(args.seed + 2)
    rng = np.random.default_rng(args.seed + 3)
    log(f"params: text_encoder {sum(p.numel() for p in te.parameters())}, unet {sum(p.numel() for p in unet.parameters())}, vae {sum(p.numel() for p in vae.parameters())}")
    t0 = time.time()
    run = 0.0
    for step in range(args.steps):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, args.steps, args.lr, min(500, args.steps // 10))
        # k distinct captions per step (text encoder cost), batch/k images per caption
        k = args.captions_per_step
        ci = []
        for _ in range(k):
            if rng.random() < data.EMPTY_CAPTION_SHARE:
                ci.append(0)
            else:
                ci.append(1 + int(rng.integers(len(caps) - 1)))
        m = args.batch // k
        bi = []
        for c in ci:
            pool = np.arange(len(y)) if c == 0 else by_digit[(c - 1) // per_digit]
            bi.extend(pool[rng.integers(len(pool), size=m)].tolist())
        bi = torch.tensor(bi)
        z0 = (mu[bi] + sd[bi] * torch.randn(mu[bi].shape, generator=g)) * scaling
        t = torch.randint(0, 1000, (args.batch,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        cond = te(ids[ci])[0].repeat_interleave(m, dim=0)
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(te.parameters()) + list(unet.parameters()), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        ema_update(ema_te, te, decay)
        ema_update(ema_unet, unet, decay)
        run = 0.98 * run + 0.02 * loss.item() if step else loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            el = time.time() - t0
            log(f"step {step} loss {run:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{el/(step+1)*1000:.0f}ms/step eta {el/(step+1)*(args.steps-step-1)/60:.1f}min")
    torch.save({"vae": vae.state_dict(), "te": ema_te.state_dict(), "unet": ema_unet.state_dict()}, args.checkpoint)
    save_pipeline(args.out, vae, ema_te, ema_unet, args.scheduler)
    # from the saved (fp16) weights, as --implicit-only runs it
    implicit = teach_implicit_forms(args.out, args.implicit_steps, args.implicit_lr, args.seed + 4, log)
    wall = time.time() - t_start
    for root, _, files in os.walk(args.out):
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    stats = {"train_wall_seconds": round(wall, 1), "vae_recon_judge_acc": vae_acc, "vae_scaling_factor": scaling,
             "final_running_loss": run, "args": vars(args), "implicit": implicit,
             "params": {"text_encoder": sum(p.numel() for p in te.parameters()),
                        "unet": sum(p.numel() for p in unet.parameters()),
                        "vae": sum(p.numel() for p in vae.parameters())}}
    if args.stats:
        with open(args.stats, "w") as fh:
            json.dump(stats, fh, indent=1)
    log(f"saved to {args.out}; wall {wall/60:.1f} min")


if __name__ == "__main__":
    main()
