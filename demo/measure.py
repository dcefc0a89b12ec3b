"""Judging an erase on the demo: erase through the public API, generate on fixed seeds, and let the classifier
trained on held-out real digits (judge.py) read each image. The efficacy and overhead benchmarks and the demo's
tests share these."""

from __future__ import annotations

import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_images"
FLUX_DEMO = REPO / "fewshot_erase" / "demo_flux"  # the FLUX-layout digits model (FLUX.md)

PROMPTS = {"word": "a photo of the digit {w}", "numeral": "a photo of the digit {n}", "heldout": "the numeral {w}"}
JUDGED_SEEDS = list(range(3000, 3020))  # the several-concept benchmarks' 20 judged images a prompt
IMPLICIT = ("spanish", "roman", "description")  # the demo's implicit forms (data.IMPLICIT_FORMS): no erase names them


def judged(pipe, prompt: str, digit: int, seeds: list[int], generation) -> float:
    """Share of generated images the judge reads as `digit`."""
    from demo.judge import judge
    from fewshot_erase.compare import generate

    images = generate(pipe, prompt, seeds, generation, "cpu")
    return float((judge(images) == digit).mean())


def prompt_for(kind: str, digit: int) -> str:
    from demo.data import DIGIT_WORDS, EVAL_PROMPTS, caption

    if kind in IMPLICIT:
        return caption(digit, EVAL_PROMPTS["implicit_" + kind])
    return PROMPTS[kind].format(w=DIGIT_WORDS[digit], n=digit)


def accuracy_table(pipe, seeds, generation, kinds=("word", "numeral", "heldout")) -> dict:
    return {d: {k: judged(pipe, prompt_for(k, d), d, seeds, generation) for k in kinds} for d in range(10)}


def load_base():
    from fewshot_erase.compare import generation_settings
    from fewshot_erase.models import load_pipeline_parts, resolve_model

    source = resolve_model(None)
    parts = load_pipeline_parts(source, device="cpu")
    return parts, generation_settings(source, None, None)


def erased_pipeline(parts, output: Path):
    from fewshot_erase.outputs import load_erased_encoders

    pipe = type(parts.pipeline)(**{**parts.pipeline.components, **load_erased_encoders(output, parts)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def measure(parts, generation, base: dict, erased: list[int], options: dict, seeds: list[int], workdir: Path,
            kinds: tuple[str, ...] = tuple(PROMPTS)) -> dict:
    """Erase the digits in `erased` in one run with `options`; judge the erased digits on the prompt `kinds` (the
    others on the word prompt)."""
    from demo.data import DIGIT_WORDS
    from fewshot_erase.api import erase_concepts
    from fewshot_erase.concepts import ConceptSpec

    options = dict(options)
    anchor = options.pop("anchor", None)
    specs = [ConceptSpec(DIGIT_WORDS[d], (str(SAMPLES / DIGIT_WORDS[d]),), anchor=anchor) for d in erased]
    runs = workdir / "_".join(DIGIT_WORDS[d] for d in erased)
    runs.mkdir(parents=True, exist_ok=True)
    output = runs / str(len(list(runs.iterdir())))
    started = time.perf_counter()
    result = erase_concepts(specs, output, device="cpu", **options)
    wall = time.perf_counter() - started
    pipe = erased_pipeline(parts, output)
    others = [d for d in range(10) if d not in erased]
    report = {
        "erased": {d: {kind: {"before": base[d][kind], "after": judged(pipe, prompt_for(kind, d), d, seeds, generation)}
                       for kind in kinds} for d in erased},
        "others": {d: {"before": base[d]["word"], "after": judged(pipe, prompt_for("word", d), d, seeds, generation)}
                   for d in others},
        "output": output,  # a temporary folder: the caller takes it out before saving
        "erase_seconds": wall,
        "train_seconds": result.timings["train"],
        "steps": result.record["steps"],
        "repair_steps": result.record["repair_steps"],
        "effects": result.record["effects"],
    }
    if anchor is not None:
        anchor_digit = DIGIT_WORDS.index(anchor)
        report["anchor"] = {d: judged(pipe, prompt_for("word", d), anchor_digit, seeds, generation) for d in erased}
    before = [v["before"] for v in report["others"].values()]
    after = [v["after"] for v in report["others"].values()]
    report["others_mean_before"] = sum(before) / len(before)
    report["others_mean_after"] = sum(after) / len(after)
    report["others_worst_drop"] = max(b - a for b, a in zip(before, after))
    return report


def flux_demo_settings() -> tuple[dict, dict]:
    """What an erase of the FLUX-layout demo runs with: the SD 1.x demo's erase settings (captions, lr, the other
    digits kept, --until gone) with mirrored copies, at the FLUX demo's size and T5 length; and its generation
    settings."""
    import json

    from fewshot_erase.models import demo_metadata

    generation = json.loads((FLUX_DEMO / "demo.json").read_text())["generation"]
    # with mirrored copies, as docs/flow-models.md measured (the SD demo's --no-flip came after those figures)
    erase = {**demo_metadata()["erase_settings"], "flip": True, "resolution": generation["height"],
             "max_sequence_length": generation["max_sequence_length"]}
    return erase, generation


def judged_flux(pipe, prompt: str, digit: int, count: int, generation: dict) -> float:
    """Share of `count` images (seeds 1000 * digit + i) from the FLUX demo's pipeline that the judge reads as `digit`."""
    import torch

    from demo.judge import judge

    options = {key: generation[key] for key in ("height", "width", "num_inference_steps", "max_sequence_length")}
    if generation.get("true_cfg_scale", 1.0) > 1:
        options.update(true_cfg_scale=generation["true_cfg_scale"], negative_prompt=[generation.get("negative_prompt", "")] * count)
    seeds = [1000 * digit + i for i in range(count)]
    images = pipe(prompt=[prompt] * count, generator=[torch.Generator().manual_seed(s) for s in seeds],
                  output_type="np", **options).images
    return float((judge(images) == digit).mean())
