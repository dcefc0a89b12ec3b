"""What a default `audit` costs on a full-size Stable Diffusion model, counted without a GPU: the FLOPs of each unit of
its work on fake tensors (gpu_memory's counter, the family's packaged configs), times how many of each the default
budgets run, and the seconds that predicts on each card at gpu_memory.UTILISATION. A prediction, not a measurement.

    python -m benchmarks.audit_gpu --out benchmarks/results/audit_gpu.json    # sd1 at 512 px; ~1 min here
    python -m benchmarks.audit_gpu --robust-from benchmarks/results/overhead_robust.json \
        --out benchmarks/results/audit_gpu.json      # and what --robust adds to an erase, by the demo's rounds

The units, each counted once on the real code paths (attacks.Setup.errors and .loss):
- a scored row: one caption's conditioning and a denoiser forward without gradients (the phrasings, the hard
  prompt's candidates, the held-out scoring);
- a fitting step: the fitted pictures' rows (attacks.FIT_REPEATS each) forward, and backward through the denoiser
  and the text encoder into the learned embeddings (the soft prompt, the hard prompt, textual inversion; a robust
  erase's rounds fit every picture).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
from pathlib import Path

PICTURES = 6  # as gpu_memory's estimate: the README's handful


def unit_flops(family_name: str, resolution: int | None, dtype: str, fitted_pictures: int = PICTURES // 2) -> dict:
    """FLOPs of one scored row and of one fitting step (on `fitted_pictures`) on `family_name`'s full-size pipeline."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fewshot_erase import attacks, families, gpu_memory
    from fewshot_erase.denoising import training_scheduler
    from fewshot_erase.models import quiet_libraries
    from fewshot_erase.prompts import default_templates

    quiet_libraries()
    family = families.FAMILIES[family_name]
    compute = getattr(torch, dtype)
    with FakeTensorMode(allow_non_fake_inputs=True):
        pipeline = gpu_memory.fake_pipeline(family, compute, None)
        for module in (getattr(pipeline, family.denoiser), pipeline.vae, *(getattr(pipeline, n) for n in family.encoders)):
            module.requires_grad_(False)
        size = resolution or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
        latent = size // pipeline.vae_scale_factor
        fitted = torch.randn(fitted_pictures, pipeline.unet.config.in_channels, latent, latent, dtype=compute)
        scheduler = training_scheduler(pipeline)
        setup = attacks.Setup(pipeline, family, size, compute, "the concept", tuple(default_templates(False)), fitted,
                              scheduler, 0, ())
        scored = attacks.fixed_rows(fitted, attacks.SELECT_REPEATS, scheduler, 0)
        fitting = attacks.fitting_rows(fitted, scheduler, torch.Generator().manual_seed(0))
        placeholders = (49000, 49001, 49002)
        vectors = {name: torch.randn(3, getattr(pipeline, name).config.hidden_size, requires_grad=True)
                   for name in family.encoders}
        captions = setup.captions("the concept", "a b c")
        with gpu_memory.Flops() as counter:
            with torch.no_grad():
                setup.errors(captions, scored)
            scored_flops = counter.total / len(scored)
            with attacks.learned_tokens(pipeline, family, placeholders, vectors):
                setup.loss(captions, fitting).backward()
            fit_flops = counter.total - scored_flops * len(scored)
    return {"resolution": size, "scored_row": scored_flops, "fitting_step": fit_flops,
            "fitted_rows_per_step": len(fitting)}


def audit_counts(budget: int) -> dict:
    """How many of each unit a default audit runs (every attack at `budget`), from the audit's own constants."""
    import importlib

    from fewshot_erase import attacks

    audit = importlib.import_module("fewshot_erase.audit")  # the package's name `audit` is the function
    fitted = PICTURES // 2 + PICTURES % 2
    held_out = PICTURES // 2
    select_rows = fitted * attacks.SELECT_REPEATS
    score_rows = held_out * audit.SCORE_REPEATS
    return {
        "prompts": {"scored_rows": budget * select_rows},
        "soft": {"fitting_steps": budget},
        # at most one candidate per step, each compared on the selection rows
        "hard": {"fitting_steps": budget, "scored_rows": budget * select_rows},
        "inversion": {"fitting_steps": budget},
        # L_empty, L_original, the erased captions, and each attack's find, on the held-out rows
        "scoring": {"scored_rows": (3 + 4) * score_rows},
    }


def robust_counts(results: Path) -> dict:
    """What --robust ran on the demo beyond the default erase, on average (`benchmarks.overhead --methods
    published,default,robust`'s results): rounds, and erase steps."""
    import statistics

    runs = json.loads(results.read_text())["runs"]
    return {"erases": len(runs), "rounds_mean": statistics.mean(run["robust"]["rounds"] for run in runs),
            "extra_steps_mean": statistics.mean(run["robust"]["steps"] - run["default"]["steps"] for run in runs)}


def robust_flops(family: str, resolution: int | None, dtype: str, counts: dict) -> dict:
    """--robust's work beyond the default erase on the full-size model: each round's attacks (STARTS on each half of
    the pictures, fitted together: STARTS fitting steps on every picture, ATTACK_STEPS times), each scored on the
    other half, each half's two reference losses once, and the extra erase steps (gpu_memory's count of a default
    erase step and check)."""
    from fewshot_erase import gpu_memory, hardening
    from fewshot_erase.audit import SCORE_REPEATS

    units = unit_flops(family, resolution, dtype, fitted_pictures=PICTURES)
    rounds = counts["rounds_mean"]
    half_rows = SCORE_REPEATS * PICTURES / 2
    scored = rounds * 2 * hardening.STARTS * half_rows + 2 * 2 * half_rows  # each attack; each half's L_empty, L_original
    erase = gpu_memory.estimate(family, resolution, "default", dtype=dtype)
    return {"attacks": rounds * 2 * hardening.STARTS,
            "attack_tflops": (rounds * hardening.STARTS * hardening.ATTACK_STEPS * units["fitting_step"]
                              + scored * units["scored_row"]) / 1e12,
            "extra_steps_tflops": counts["extra_steps_mean"] * erase.loop_flops_per_step / 1e12,
            "default_erase_tflops": erase.total_flops / 1e12}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd1")
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--robust-from", type=Path, help="overhead results with --robust runs: add --robust's cost")
    args = parser.parse_args(argv)
    from fewshot_erase import gpu_memory

    units = unit_flops(args.family, args.resolution, args.dtype)
    counts = audit_counts(args.budget)
    parts = {name: c.get("scored_rows", 0) * units["scored_row"] + c.get("fitting_steps", 0) * units["fitting_step"]
             for name, c in counts.items()}
    total = sum(parts.values())
    seconds = {card.name: total / (card.tflops * 1e12 * gpu_memory.UTILISATION) for card in gpu_memory.CARDS}
    result = {"family": args.family, "dtype": args.dtype, "budget": args.budget, "pictures": PICTURES, **units,
              "counts": counts, "tflops": {name: value / 1e12 for name, value in parts.items()},
              "total_tflops": total / 1e12, "utilisation": gpu_memory.UTILISATION, "predicted_seconds": seconds}
    print(f"{args.family} at {units['resolution']} px, {args.dtype}: a scored row {units['scored_row'] / 1e12:.2f} TFLOP, "
          f"a fitting step ({units['fitted_rows_per_step']} rows) {units['fitting_step'] / 1e12:.2f} TFLOP")
    for name, value in parts.items():
        print(f"  {name:10s} {value / 1e12:8.1f} TFLOP")
    print(f"  total      {total / 1e12:8.1f} TFLOP; predicted at {gpu_memory.UTILISATION:.0%} of peak: "
          + ", ".join(f"{card} {s:.1f} s" for card, s in seconds.items()))
    if args.robust_from:
        counts = robust_counts(args.robust_from)
        robust = robust_flops(args.family, args.resolution, args.dtype, counts)
        extra = (robust["attack_tflops"] + robust["extra_steps_tflops"]) * 1e12
        default = robust["default_erase_tflops"] * 1e12
        result["robust"] = {**counts, **robust, "predicted_seconds": {
            card.name: {"default_erase": default / (card.tflops * 1e12 * gpu_memory.UTILISATION),
                        "robust_erase": (default + extra) / (card.tflops * 1e12 * gpu_memory.UTILISATION)}
            for card in gpu_memory.CARDS}}
        print(f"--robust ({counts['rounds_mean']:.1f} rounds, {counts['extra_steps_mean']:.1f} more steps on the demo): "
              f"{robust['attacks']:.1f} attacks {robust['attack_tflops']:.0f} TFLOP + steps {robust['extra_steps_tflops']:.0f} "
              f"TFLOP over the default erase's {robust['default_erase_tflops']:.0f}; "
              + ", ".join(f"{card}: {s['default_erase']:.1f} s -> {s['robust_erase']:.1f} s"
                          for card, s in result["robust"]["predicted_seconds"].items()))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
