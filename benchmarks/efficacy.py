"""Efficacy benchmark: erase each digit from the embedded demo model and measure, with a classifier trained on
held-out real digits, whether the digit is gone and whether the other nine survived.

    python -m benchmarks.efficacy                       # all ten digits, 50 images per prompt, every method
    python -m benchmarks.efficacy --digits 7 --images 20 --methods published,default
    python -m benchmarks.efficacy --methods default --seeds 0,1,2     # the default at three erase seeds
    python -m benchmarks.efficacy --methods published,default,robust --audit --multi '' \
        --json benchmarks/results/efficacy_attacks.json --grid ''        # under attack, and the implicit forms

Everything goes through the public API (`fewshot_erase.erase`, `fewshot_erase.api.erase_concepts`).
Writes JSON and a PNG grid, prints a rich table. Needs the test extra (scikit-learn).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from demo.measure import IMPLICIT, PROMPTS, accuracy_table, erased_pipeline, load_base, measure, prompt_for

# What each method is, as erase options. "published" is the bare method with the demo's captions and learning rate
# for the published 4 epochs (no preservation, no stopping rule); "default" is what `fewshot-erase erase` does on
# the demo without options (preservation, stop once gone, at most 120 steps, no mirrored copies); "robust" adds
# --robust; "anchor" steers to another digit. The published method flips its pictures.
METHODS = {
    "published": {"preserve_weight": 0.0, "steps": None, "until": None, "flip": True},
    "default": {},
    "robust": {"robust": True},
    # Steering for a fixed 60 steps (the stopping rule is about ascent; measured: 36 steps or a preservation weight
    # of 5 leave most digits short of the anchor).
    "anchor": {"anchor": "one", "steps": 60, "until": None},
}


def grid_image(parts, generation, output_dirs: dict, seeds):
    """One row per digit prompt: base, then each erased model."""
    from fewshot_erase.compare import generate, grid

    rows = [(f"base: {prompt_for('word', d)}"[:40], generate(parts.pipeline, prompt_for("word", d), seeds, generation, "cpu"))
            for d in range(10)]
    for label, output in output_dirs.items():
        pipe = erased_pipeline(parts, output)
        rows += [(f"{label}: {prompt_for('word', d)}"[:40], generate(pipe, prompt_for("word", d), seeds, generation, "cpu"))
                 for d in range(10)]
    return grid(rows, 48)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
    parser.add_argument("--images", type=int, default=50, help="images per prompt (M)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--multi", default="2,5,7", help="digits erased together in one run ('' to skip)")
    parser.add_argument("--seeds", default="0", help="erase seeds: each run once per seed (the judged images keep theirs)")
    parser.add_argument("--json", default="benchmarks/results/efficacy.json")
    parser.add_argument("--grid", default="benchmarks/results/efficacy.png", help="'' for none")
    parser.add_argument("--audit", action="store_true", help="audit every erase (each attack's recovery and judged "
                                                             "success) and judge the digit's implicit forms")
    args = parser.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table

    torch.set_num_threads(2)
    digits = [int(d) for d in args.digits.split(",") if d]
    erase_seeds = [int(s) for s in args.seeds.split(",")]
    seeds = list(range(1000, 1000 + args.images))
    parts, generation = load_base()
    kinds = tuple(PROMPTS) + (IMPLICIT if args.audit else ())
    base = accuracy_table(parts.pipeline, seeds, generation, kinds)
    results = {"images_per_prompt": args.images, "erase_seeds": erase_seeds, "generation": vars(generation),
               "base": base, "methods": {}, "multi": []}
    table = Table(title=f"efficacy on the demo model ({args.images} images per prompt)")
    for column in ("method", "digit", "seed", "word before->after", "numeral", "held-out", "implicit", "others mean",
                   "worst drop", "anchor", "soft / hard / inversion (judged)", "steps", "s"):
        table.add_column(column)
    grid_outputs = {}  # method -> its erase of seven at the first seed, for the grid
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        for method in [m for m in args.methods.split(",") if m]:  # '' for none: --multi alone
            runs = results["methods"][method] = []
            for seed in erase_seeds:
                for digit in digits:
                    options = {**METHODS[method], "seed": seed}
                    if method == "anchor" and digit == 1:
                        options["anchor"] = "seven"
                    report = {"digits": [digit], "seed": seed,
                              **measure(parts, generation, base, [digit], options, seeds, workdir, kinds)}
                    output = report.pop("output")
                    if args.audit:
                        report["audit"] = audited(output)
                    if digit == 7 and seed == erase_seeds[0]:
                        grid_outputs[method] = output
                    runs.append(report)
                    save(results, args.json)  # after every run: a long benchmark stopped early keeps what it measured
                    e = report["erased"][digit]
                    table.add_row(method, str(digit), str(seed), f"{e['word']['before']:.0%} -> {e['word']['after']:.0%}",
                                  f"{e['numeral']['before']:.0%} -> {e['numeral']['after']:.0%}",
                                  f"{e['heldout']['before']:.0%} -> {e['heldout']['after']:.0%}",
                                  " ".join(f"{e[k]['after']:.0%}" for k in IMPLICIT if k in e),
                                  f"{report['others_mean_before']:.1%} -> {report['others_mean_after']:.1%}",
                                  f"{report['others_worst_drop']:.0%}",
                                  f"{report['anchor'][digit]:.0%}" if "anchor" in report else "",
                                  " / ".join(f"{report['audit']['attacks'][k].get('judged_success') or 0:.0%}"
                                             for k in ("soft", "hard", "inversion")) if "audit" in report else "",
                                  str(report["steps"]), f"{report['erase_seconds']:.1f}")
        multi = [int(d) for d in args.multi.split(",") if d]
        for seed in erase_seeds if multi else []:
            report = {"digits": multi, "seed": seed, **measure(parts, generation, base, multi, {"seed": seed}, seeds, workdir)}
            report.pop("output")
            results["multi"].append(report)
            save(results, args.json)
            table.add_row("default, together", ",".join(map(str, multi)), str(seed),
                          " ".join(f"{report['erased'][d]['word']['before']:.0%}->{report['erased'][d]['word']['after']:.0%}" for d in multi),
                          "", "", "", f"{report['others_mean_before']:.1%} -> {report['others_mean_after']:.1%}",
                          f"{report['others_worst_drop']:.0%}", "", "", str(report["steps"]), f"{report['erase_seconds']:.1f}")
        if grid_outputs and args.grid:
            Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
            grid_image(parts, generation, grid_outputs, seeds[:8]).save(args.grid)
    results["summary"] = summarise(results)
    save(results, args.json)
    Console().print(table)
    Console().print_json(json.dumps(results["summary"]))
    return results


def audited(output: Path) -> dict:
    """`fewshot_erase.audit` of one erase at its defaults: per attack, recovery and judged success; its wall time."""
    import time

    from fewshot_erase import audit

    started = time.perf_counter()
    record = audit(output).record
    return {"seconds": time.perf_counter() - started, "erased_captions": record["erased_captions"],
            "attacks": {name: {key: result.get(key) for key in ("recovery", "judged_success", "prompt")}
                        for name, result in record["attacks"].items()}}


def agreement(audits: list[dict]) -> dict:
    """How often an attack's recovery (>= the audit's HOLDS) and its judged success (>= 50%) say the same, over every
    attack of every audit, and their Pearson correlation."""
    from fewshot_erase.audit import HOLDS

    pairs = [(a["recovery"], a["judged_success"]) for audit in audits for a in audit["attacks"].values()
             if a.get("recovery") is not None and a.get("judged_success") is not None]
    agree = sum((r >= HOLDS) == (j >= 0.5) for r, j in pairs)
    try:
        pearson = statistics.correlation(*zip(*pairs))
    except (statistics.StatisticsError, TypeError):  # fewer than two pairs, or one side constant
        pearson = None
    return {"attacks": len(pairs), "agree": agree, "pearson": pearson}


def save(results: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")


def summarise(results: dict) -> dict:
    """Per method, over every run (each digit, each erase seed): what the README quotes."""
    summary = {}
    groups = {**results["methods"], **({"multi": results["multi"]} if results["multi"] else {})}
    for method, runs in groups.items():
        erased = [e for run in runs for e in run["erased"].values()]
        seconds = [run["erase_seconds"] for run in runs]
        summary[method] = {
            "runs": len(runs),
            "erased_word_after": sum(e["word"]["after"] for e in erased) / len(erased),
            "erased_word_worst": max(e["word"]["after"] for e in erased),
            "erased_numeral_after": sum(e["numeral"]["after"] for e in erased) / len(erased),
            "erased_heldout_after": sum(e["heldout"]["after"] for e in erased) / len(erased),
            "others_mean_drop": sum(run["others_mean_before"] - run["others_mean_after"] for run in runs) / len(runs),
            "others_mean_drop_worst": max(run["others_mean_before"] - run["others_mean_after"] for run in runs),
            "others_worst_drop": max(run["others_worst_drop"] for run in runs),
            "steps": [min(run["steps"] for run in runs), max(run["steps"] for run in runs),
                      sum(run["steps"] for run in runs) / len(runs)],
            "erase_seconds": statistics.mean(seconds),
            "erase_seconds_median": statistics.median(seconds),
        }
        implicit = [e[kind]["after"] for e in erased for kind in IMPLICIT if kind in e]
        if implicit:
            summary[method]["erased_implicit_after"] = sum(implicit) / len(implicit)
            summary[method]["erased_implicit_before"] = sum(e[kind]["before"] for e in erased for kind in IMPLICIT) / len(implicit)
        audits = [run["audit"] for run in runs if "audit" in run]
        if audits:
            summary[method]["audit_seconds"] = statistics.mean(a["seconds"] for a in audits)
            summary[method]["recovery_against_judge"] = agreement(audits)
            for name in audits[0]["attacks"]:
                for key in ("recovery", "judged_success"):
                    values = [a["attacks"][name][key] for a in audits if a["attacks"][name].get(key) is not None]
                    summary[method][f"{name}_{key}"] = sum(values) / len(values) if values else None
        if method == "anchor":
            summary[method]["anchor_hit"] = sum(v for run in runs for v in run["anchor"].values()) / len(runs)
    return summary


if __name__ == "__main__":
    main()
