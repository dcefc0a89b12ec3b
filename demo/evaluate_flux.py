"""Measure the FLUX-layout demo model with the judge.

    python -m demo.evaluate_flux --out demo/logs/eval_flux.json

For each prompt kind (word / numeral / held-out phrasing), true-CFG scale and step count: generate N images per
digit with fixed seeds (seed = 1000*digit + i) through FluxPipeline (height = width = 16, negative_prompt "",
max_sequence_length from demo.json) and report the share the judge recognises as the prompted digit.
``--encoders`` also measures which encoder carries the digit: "clip" gives the prompt to CLIP only (T5 gets ""),
"t5" the other way round (FluxPipeline: ``prompt`` feeds CLIP, ``prompt_2`` feeds T5).
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
DEFAULT_MODEL = os.path.join(REPO, "fewshot_erase", "demo_flux")


def load_pipeline(path=DEFAULT_MODEL):
    from diffusers import FluxPipeline
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    pipe = FluxPipeline.from_pretrained(path, **{dtype_keyword(): torch.float32})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def settings(path=DEFAULT_MODEL):
    with open(os.path.join(path, "demo.json")) as fh:
        return json.load(fh)["generation"]


@torch.no_grad()
def generate(pipe, prompts, n, cfg, steps, max_sequence_length, prompts_2=None, seed_base=0):
    """n images per prompt; image i of prompt k uses seed seed_base + 1000*k + i. Returns [len*n,H,W,3].
    prompts feed CLIP, prompts_2 (default: the same) feed T5."""
    gens = [torch.Generator().manual_seed(seed_base + 1000 * k + i) for k in range(len(prompts)) for i in range(n)]
    kw = dict(negative_prompt=[""] * len(prompts), true_cfg_scale=cfg) if cfg > 1 else {}
    out = pipe(prompt=prompts, prompt_2=prompts_2, num_images_per_prompt=n, height=16, width=16,
               num_inference_steps=steps, max_sequence_length=max_sequence_length, generator=gens,
               output_type="np", **kw)
    return out.images


def measure(pipe, template, n, cfg, steps, msl, encoders="both"):
    prompts = [data.caption(d, template) for d in range(10)]
    p1, p2 = prompts, prompts
    if encoders == "clip":
        p2 = [""] * 10
    elif encoders == "t5":
        p1 = [""] * 10
    t0 = time.time()
    imgs = generate(pipe, p1, n, cfg, steps, msl, prompts_2=p2)
    secs = time.time() - t0
    pred = judge(imgs).reshape(10, n)
    per = {data.DIGIT_WORDS[d]: float((pred[d] == d).mean()) for d in range(10)}
    return {"template": template, "encoders": encoders, "true_cfg_scale": cfg, "steps": steps, "n_per_digit": n,
            "mean": float(np.mean(list(per.values()))), "min": float(min(per.values())), "per_digit": per,
            "seconds": round(secs, 1)}


def summarize(results, model=DEFAULT_MODEL):
    """Write the judged accuracy at the shipped generation settings (and the encoder ablation) into demo.json."""
    path = os.path.join(model, "demo.json")
    with open(path) as fh:
        meta = json.load(fh)
    gen = meta["generation"]
    rows = {}
    for r in results:
        if r["steps"] == gen["num_inference_steps"] and r["true_cfg_scale"] == gen["true_cfg_scale"]:
            key = r["kind"] if r["encoders"] == "both" else f"{r['kind']}_{r['encoders']}_only"
            rows[key] = {"template": r["template"], "mean": r["mean"], "min": r["min"], "per_digit": r["per_digit"]}
    n = {r["n_per_digit"] for r in results}
    meta["quality"] = {"judged_at": {k: gen[k] for k in ("num_inference_steps", "true_cfg_scale",
                                                         "max_sequence_length")},
                       "n_per_digit": sorted(n), "seeds": "1000*digit + i",
                       "note": "*_clip_only: the prompt goes to CLIP only (T5 gets the empty caption); "
                               "*_t5_only: the other way round. The full grid: demo/logs/eval_flux.json",
                       "rows": rows}
    with open(path, "w") as fh:
        json.dump(meta, fh, indent=1)
        fh.write("\n")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--cfg", default="1.0,2.0,3.0,5.0", help="true_cfg_scale values (1.0: no guidance)")
    ap.add_argument("--steps", default="20")
    ap.add_argument("--kinds", default="word,numeral,heldout_word,heldout_numeral")
    ap.add_argument("--encoders", default="both", help="comma list of both, clip, t5")
    ap.add_argument("--encoder-cfg", default=None, help="cfg values for the clip/t5-only rows (default: --cfg)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--summarize", default=None, metavar="EVAL_JSON",
                    help="only write this eval file's rows at the shipped settings into --model's demo.json")
    args = ap.parse_args(argv)
    if args.summarize:
        with open(args.summarize) as fh:
            summarize(json.load(fh), args.model)
        return None
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    msl = settings(args.model)["max_sequence_length"]
    results = []
    for enc in args.encoders.split(","):
        cfgs = args.cfg if enc == "both" or not args.encoder_cfg else args.encoder_cfg
        for kind in args.kinds.split(","):
            if enc != "both" and kind not in ("word", "numeral"):
                continue
            tpl = data.EVAL_PROMPTS[kind]
            for steps in [int(s) for s in args.steps.split(",")]:
                for cfg in [float(g) for g in cfgs.split(",")]:
                    r = measure(pipe, tpl, args.n, cfg, steps, msl, enc)
                    r["kind"] = kind
                    r["scheduler"] = type(pipe.scheduler).__name__
                    r["max_sequence_length"] = msl
                    results.append(r)
                    print(f"{kind:16s} enc={enc:4s} steps={steps:3d} cfg={cfg:4.1f} mean={r['mean']:.3f} "
                          f"min={r['min']:.2f} ({r['seconds']}s) "
                          + " ".join(f"{v:.2f}" for v in r["per_digit"].values()), flush=True)
                    if args.out:
                        with open(args.out, "w") as fh:
                            json.dump(results, fh, indent=1)
    return results


if __name__ == "__main__":
    main()
