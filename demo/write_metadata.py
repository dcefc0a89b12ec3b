"""Write fewshot_erase/demo/demo.json from the training stats and the evaluation JSON.

    python -m demo.write_metadata --guidance 1.5 --steps 10
"""
from __future__ import annotations

import argparse
import json
import os

try:
    from . import data
    from .judge import self_check
except ImportError:  # pragma: no cover
    import data  # type: ignore
    from judge import self_check  # type: ignore

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MODEL = os.path.join(REPO, "fewshot_erase", "demo")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval", default=os.path.join(HERE, "logs", "eval.json"))
    ap.add_argument("--stats", default=os.path.join(HERE, "logs", "train_stats.json"))
    ap.add_argument("--guidance", type=float, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--erase-settings", default="{}", help="JSON: the erase settings measured for this model")
    ap.add_argument("--notes", default="{}", help="JSON: further fields, e.g. erase_settings_measured (what the "
                                                  "erase settings achieved) or known_limitation")
    args = ap.parse_args(argv)
    with open(args.eval) as fh:
        ev = json.load(fh)
    with open(args.stats) as fh:
        st = json.load(fh)
    with open(os.path.join(MODEL, "scheduler", "scheduler_config.json")) as fh:
        sched = json.load(fh)["_class_name"]
    chosen = {r["kind"]: {"prompt_template": r["template"], "mean": round(r["mean"], 4), "min": round(r["min"], 4),
                          "per_digit": {k: round(v, 4) for k, v in r["per_digit"].items()}}
              for r in ev if r["guidance_scale"] == args.guidance and r["steps"] == args.steps}
    grid = [{"kind": r["kind"], "prompt_template": r["template"], "guidance_scale": r["guidance_scale"],
             "steps": r["steps"], "scheduler": r["scheduler"], "mean": round(r["mean"], 4),
             "min": round(r["min"], 4)} for r in ev]
    n = ev[0]["n_per_digit"] if ev else None
    sizes = {}
    for root, _, files in os.walk(MODEL):
        for f in files:
            sizes[os.path.relpath(os.path.join(root, f), MODEL)] = os.path.getsize(os.path.join(root, f))
    a = st["args"]
    meta = {
        "description": ("Tiny text-to-image model in the Stable Diffusion 1.x diffusers layout "
                        "(CLIPTextModel + CLIP BPE tokenizer, UNet2DConditionModel with cross-attention, "
                        "AutoencoderKL, DDIM scheduler) trained from scratch on scikit-learn's 8x8 digits, "
                        "so fewshot_erase can run offline. Weights stored in fp16 (load in fp32)."),
        "dataset": ("sklearn.datasets.load_digits: scikit-learn's bundled copy of the UCI ML hand-written "
                    "digits data set (Optical Recognition of Handwritten Digits, E. Alpaydin and C. Kaynak), "
                    "1,797 8x8 images"),
        "dataset_licence": "UCI Machine Learning Repository data set, CC BY 4.0 (attribution: E. Alpaydin, C. Kaynak)",
        "split": {"seed": data.SPLIT_SEED, "heldout_fraction": data.HELDOUT_FRACTION, "stratified": True,
                  "generator_trained_on": "training split only (1,257 images)",
                  "heldout_used_for": "judge training and sample_images/ (540 images)"},
        "resolution": {"pixels": 16, "latent": [4, 8, 8],
                       "note": "8x8 scans upsampled nearest-neighbour to 16x16 grey->RGB; VAE factor 2"},
        "guidance_scale": args.guidance,
        "num_inference_steps": args.steps,
        "scheduler": sched,
        "caption_templates": {"word": list(data.WORD_TEMPLATES), "numeral": list(data.NUMERAL_TEMPLATES),
                              "empty_caption_share": data.EMPTY_CAPTION_SHARE,
                              "placeholders": "{w}=zero..nine, {n}=0..9"},
        "heldout_phrasing": list(data.HELDOUT_TEMPLATES),
        # other names of each digit that no erase template uses (an audit's prompts attack tries them)
        "implicit_forms": {form: list(names) for form, names in data.IMPLICIT_FORMS.items()},
        "implicit_templates": list(data.IMPLICIT_TEMPLATES),
        "digit_words": list(data.DIGIT_WORDS),
        "judge": {"model": "sklearn SVC(C=10, gamma=0.001) on 8x8 grey values (0..16), trained on the held-out split",
                  "self_check": self_check()},
        "quality": {"n_per_digit": n, "seeds": "1000*digit + i, i < n", "at_chosen_settings": chosen,
                    "grid": grid},
        "parameters": st["params"],
        "training": {"wall_seconds": st["train_wall_seconds"], "vae_recon_judge_acc": st["vae_recon_judge_acc"],
                     "implicit_stage": st.get("implicit"), "args": a, "machine": f"2-core CPU, torch.set_num_threads({a['threads']})"},
        "reproduce": ("from the repository root: python -m demo.train --stats demo/logs/train_stats.json " +
                      " ".join(f"--{k.replace('_', '-')} {v}" for k, v in a.items() if k not in ("out", "stats", "checkpoint") and v is not None)),
        "file_bytes": dict(sorted(sizes.items())),
        "total_bytes": sum(v for k, v in sizes.items() if k != "demo.json"),
    }
    # What fewshot-erase reads: the concepts it knows (the automatic preserve set) and the erase settings measured
    # for it, applied when the user does not choose (the published SD defaults move a 64-wide encoder not at all).
    meta["concepts"] = list(data.DIGIT_WORDS)
    meta["erase_settings"] = json.loads(args.erase_settings)
    meta.update(json.loads(args.notes))
    with open(os.path.join(MODEL, "demo.json"), "w") as fh:
        json.dump(meta, fh, indent=1)
        fh.write("\n")
    print(json.dumps(chosen, indent=1))


if __name__ == "__main__":
    main()
