"""Does the default erase work for any pictures and any pair? Each run erases with the default settings (no options:
the demo's own), judges the generated images with the held-out classifier, and compares the run's verdict with it.

    python -m benchmarks.robustness --sets 4 -o benchmarks/results/picture_sets.json    # every digit, 4 other sets
    python -m benchmarks.robustness --pairs -o benchmarks/results/pairs.json            # all 45 pairs of digits
    python -m benchmarks.robustness --triples -o benchmarks/results/triples.json        # all 120 triples
    python -m benchmarks.robustness --sets 2 --digits 4 --images 20                     # a quick look at one digit
    python -m benchmarks.robustness --tables benchmarks/results/pairs.json              # its figures as markdown

Picture sets: six real scans of the digit from scikit-learn's digits, prepared as `demo.make_samples` prepares the
shipped ones (grey on black, 8x8 upscaled to 64x64), never the shipped six; half from the training split (what the
model learned from: the real case), half from the held-out split. Pairs: the two digits' shipped pictures, erased in
one run. Judged: the erased digits and every other digit on the word prompt, `--images` per prompt on fixed seeds.
A digit counts as erased when at most 10% of its images are still read as it; an erase holds its collateral when no
other digit loses more than 10 points.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from demo.data import DIGIT_WORDS
from demo.measure import SAMPLES, accuracy_table, erased_pipeline, judged, load_base, prompt_for

SHIPPED = 6  # demo.make_samples takes the first six held-out scans of each digit
KINDS = ("picture_sets", "pairs", "triples")
ERASED_AT_MOST = 0.10
COLLATERAL_AT_MOST = 0.10


def picture_sets(digit: int, count: int) -> list[dict]:
    """`count` sets of six scans of `digit`, alternating training and held-out splits, none of them shipped."""
    from demo.data import heldout_split, train_split

    pools = {}
    for split, (x, y, index) in (("train", train_split()), ("heldout", heldout_split())):
        rows = np.nonzero(y == digit)[0]
        rows = rows[SHIPPED:] if split == "heldout" else rows
        pools[split] = [(x[row], int(index[row])) for row in rows]
    sets = []
    for number in range(count):
        split = ("train", "heldout")[number % 2]
        start = (number // 2) * SHIPPED
        chosen = pools[split][start:start + SHIPPED]
        if len(chosen) == SHIPPED:
            sets.append({"split": split, "scans": chosen})
    return sets


def write_set(folder: Path, word: str, scans) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for pixels, index in scans:
        grey = np.round(pixels / 16.0 * 255).astype(np.uint8)
        Image.fromarray(grey).resize((64, 64), Image.NEAREST).save(folder / f"{word}_{index:04d}.png")
    return folder


def judged_run(parts, generation, base: dict, erased: dict[int, Path], seeds, workdir: Path) -> dict:
    """Erase the digits in `erased` (digit -> picture folder) in one default run; judge every digit."""
    from fewshot_erase.api import erase_concepts
    from fewshot_erase.concepts import ConceptSpec

    output = workdir / "out"
    started = time.perf_counter()
    result = erase_concepts([ConceptSpec(DIGIT_WORDS[d], (str(folder),)) for d, folder in erased.items()], output,
                            device="cpu", overwrite=True)
    seconds = time.perf_counter() - started
    pipe = erased_pipeline(parts, output)
    after = {d: judged(pipe, prompt_for("word", d), d, seeds, generation) for d in range(10)}
    effects = result.record["effects"]["erased"]
    drops = {d: base[d]["word"] - after[d] for d in range(10) if d not in erased}
    return {
        "digits": list(erased),
        "erased_after": {d: after[d] for d in erased},
        "verdicts": {d: effects[DIGIT_WORDS[d]]["verdict"] for d in erased},
        "others_mean_drop": statistics.mean(drops.values()),
        "others_worst_drop": max(drops.values()),
        "steps": result.record["steps"],
        "stopped_early": result.record["stopped_early"],
        "seconds": seconds,
    }


def summary(runs: list[dict]) -> dict:
    judged_gone = [run["erased_after"][d] <= ERASED_AT_MOST for run in runs for d in run["digits"]]
    said_gone = [run["verdicts"][d] == "erased" for run in runs for d in run["digits"]]
    return {
        "runs": len(runs),
        "digits_erased": f"{sum(judged_gone)} of {len(judged_gone)}",
        "runs_fully_erased": sum(all(run["erased_after"][d] <= ERASED_AT_MOST for d in run["digits"]) for run in runs),
        "runs_within_collateral": sum(run["others_worst_drop"] <= COLLATERAL_AT_MOST for run in runs),
        "others_mean_drop_points": 100 * statistics.mean(run["others_mean_drop"] for run in runs),
        "others_worst_drop_points": 100 * max(run["others_worst_drop"] for run in runs),
        "verdict_agrees_with_judge": f"{sum(j == s for j, s in zip(judged_gone, said_gone))} of {len(judged_gone)}",
        "said_erased_but_drawn": sum(s and not j for j, s in zip(judged_gone, said_gone)),
        "said_not_erased_but_gone": sum(j and not s for j, s in zip(judged_gone, said_gone)),
        "steps_mean": statistics.mean(run["steps"] for run in runs),
        "steps_max": max(run["steps"] for run in runs),
        "seconds_mean": statistics.mean(run["seconds"] for run in runs),
    }


def tables(report: dict) -> str:
    """The figures as the docs show them: each picture set's run, and the pairs as a matrix of "first/second" drawn."""
    lines = []
    if report.get("picture_sets"):
        lines += ["| digit | " + " | ".join(f"set {n} ({run['split']})" for n, run in enumerate(
            r for r in report["picture_sets"] if r["digits"] == report["picture_sets"][0]["digits"])) + " |"]
        by_digit = {}
        for run in report["picture_sets"]:
            by_digit.setdefault(run["digits"][0], []).append(run)
        lines += ["|---" * (1 + max(map(len, by_digit.values()))) + "|"]
        for digit, runs in by_digit.items():
            cells = [f"{100 * run['erased_after'][digit]:.0f}% ({run['verdicts'][digit]}, {run['steps']})" for run in runs]
            lines.append(f"| {DIGIT_WORDS[digit]} | " + " | ".join(cells) + " |")
        lines.append("")
    if report.get("pairs"):
        drawn = {tuple(run["digits"]): run for run in report["pairs"]}
        lines += ["| | " + " | ".join(DIGIT_WORDS[d] for d in range(1, 10)) + " |", "|---" * 10 + "|"]
        for first in range(9):
            cells = []
            for second in range(1, 10):
                run = drawn.get((first, second))
                cells.append(f"{100 * run['erased_after'][first]:.0f}/{100 * run['erased_after'][second]:.0f}"
                             if run else "")
            lines.append(f"| {DIGIT_WORDS[first]} | " + " | ".join(cells) + " |")
    failed = [run for run in report.get("triples", []) if max(run["erased_after"].values()) > ERASED_AT_MOST]
    if report.get("triples"):
        lines += ["", f"Triples: {len(report['triples']) - len(failed)} of {len(report['triples'])} fully erased"
                  + "".join(f"; {'+'.join(DIGIT_WORDS[d] for d in run['digits'])}: "
                            + "/".join(f"{100 * v:.0f}%" for v in run["erased_after"].values()) for run in failed)]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=int, default=0, help="other picture sets per digit (half training, half held-out)")
    parser.add_argument("--pairs", action="store_true", help="every pair of digits, with the shipped pictures")
    parser.add_argument("--triples", action="store_true", help="every three digits at once, with the shipped pictures")
    parser.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
    parser.add_argument("--images", type=int, default=30, help="judged images per prompt")
    parser.add_argument("-o", "--output", type=Path)
    parser.add_argument("--tables", type=Path, metavar="RESULTS", help="print a results file's figures as markdown")
    args = parser.parse_args(argv)
    if args.tables:
        report = json.loads(args.tables.read_text())
        for kind in KINDS:  # JSON made the digits strings
            for run in report.get(kind, []):
                for key in ("erased_after", "verdicts"):
                    run[key] = {int(d): value for d, value in run[key].items()}
        print(tables(report))
        return report
    if not args.sets and not args.pairs and not args.triples:
        parser.error("give --sets N, --pairs and/or --triples")
    if args.images < 1 or args.sets < 0:
        parser.error("--images must be at least 1 and --sets zero or more")
    import torch

    torch.set_num_threads(1)
    digits = [int(d) for d in args.digits.split(",")]
    seeds = list(range(3000, 3000 + args.images))
    parts, generation = load_base()
    base = accuracy_table(parts.pipeline, seeds, generation, kinds=("word",))
    report = {"images": args.images, "base": {d: base[d]["word"] for d in range(10)}, **{kind: [] for kind in KINDS}}
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        for digit in digits if args.sets else ():
            for number, chosen in enumerate(picture_sets(digit, args.sets)):
                folder = write_set(work / f"{digit}-{number}", DIGIT_WORDS[digit], chosen["scans"])
                run = judged_run(parts, generation, base, {digit: folder}, seeds, work)
                run.update(split=chosen["split"], scans=[index for _, index in chosen["scans"]])
                report["picture_sets"].append(run)
                print(f"{DIGIT_WORDS[digit]} set {number} ({chosen['split']}): {100 * run['erased_after'][digit]:.0f}% "
                      f"drawn, said {run['verdicts'][digit]}, worst other -{100 * run['others_worst_drop']:.0f}, "
                      f"{run['steps']} steps", flush=True)
        groups = [("pairs", g) for g in itertools.combinations(digits, 2) if args.pairs]
        groups += [("triples", g) for g in itertools.combinations(digits, 3) if args.triples]
        for kind, group in groups:
            run = judged_run(parts, generation, base, {d: SAMPLES / DIGIT_WORDS[d] for d in group}, seeds, work)
            report[kind].append(run)
            print("+".join(DIGIT_WORDS[d] for d in group) + ": " + ", ".join(
                f"{100 * run['erased_after'][d]:.0f}% ({run['verdicts'][d]})" for d in group)
                + f", worst other -{100 * run['others_worst_drop']:.0f}, {run['steps']} steps", flush=True)
    report["summary"] = {kind: summary(report[kind]) for kind in KINDS if report[kind]}
    print(json.dumps(report["summary"], indent=2))
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
