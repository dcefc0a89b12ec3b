"""Measure the demo model with the judge.

    python -m demo.evaluate --out demo/logs/eval.json

For each prompt kind (word / numeral / held-out phrasing), guidance scale and step count:
generate N images per digit with fixed seeds (seed = 1000*digit + i) through
StableDiffusionPipeline and report the share the judge recognises as the prompted digit.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from fewshot_erase.models import dtype_keyword

try:
    from . import data
    from .judge import judge
except ImportError:  # pragma: no cover
    import data  # type: ignore
    from judge import judge  # type: ignore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(REPO, "fewshot_erase", "demo")


def load_pipeline(path=DEFAULT_MODEL, scheduler=None):
    import diffusers
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    pipe = StableDiffusionPipeline.from_pretrained(path, **{dtype_keyword(): torch.float32})
    if scheduler:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixel_size(pipe):
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


@torch.no_grad()
def generate(pipe, prompts, n, guidance_scale, steps, seed_base=0):
    """n images per prompt; image i of prompt k uses seed seed_base + 1000*k + i. Returns [len*n,H,W,3]."""
    gens = [torch.Generator().manual_seed(seed_base + 1000 * k + i) for k in range(len(prompts)) for i in range(n)]
    px = pixel_size(pipe)
    out = pipe(prompts, num_images_per_prompt=n, height=px, width=px, num_inference_steps=steps,
               guidance_scale=guidance_scale, generator=gens, output_type="np")
    return out.images


def measure(pipe, template, n, guidance_scale, steps):
    prompts = [data.caption(d, template) for d in range(10)]
    t0 = time.time()
    imgs = generate(pipe, prompts, n, guidance_scale, steps)
    secs = time.time() - t0
    pred = judge(imgs).reshape(10, n)
    per = {data.DIGIT_WORDS[d]: float((pred[d] == d).mean()) for d in range(10)}
    return {"template": template, "guidance_scale": guidance_scale, "steps": steps, "n_per_digit": n,
            "mean": float(np.mean(list(per.values()))), "min": float(min(per.values())), "per_digit": per,
            "seconds": round(secs, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--scheduler", default=None, help="override scheduler class (default: the shipped one)")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--guidance", default="1.0,1.5,2.0,3.0,5.0")
    ap.add_argument("--steps", default="10,20")
    ap.add_argument("--kinds", default="word,numeral,heldout_word,heldout_numeral")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    pipe = load_pipeline(args.model, args.scheduler)
    results = []
    for kind in args.kinds.split(","):
        tpl = data.EVAL_PROMPTS[kind]
        for steps in [int(s) for s in args.steps.split(",")]:
            for gs in [float(g) for g in args.guidance.split(",")]:
                r = measure(pipe, tpl, args.n, gs, steps)
                r["kind"] = kind
                r["scheduler"] = type(pipe.scheduler).__name__
                results.append(r)
                print(f"{kind:16s} {r['scheduler']:28s} steps={steps:3d} gs={gs:4.1f} mean={r['mean']:.3f} "
                      f"min={r['min']:.2f} ({r['seconds']}s) "
                      + " ".join(f"{v:.2f}" for v in r["per_digit"].values()), flush=True)
                if args.out:
                    with open(args.out, "w") as fh:
                        json.dump(results, fh, indent=1)
    return results


if __name__ == "__main__":
    main()
