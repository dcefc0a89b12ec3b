"""`compare`: the same prompts and seeds through the base and the erased text encoder, side by side in one grid."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import BadInput, python_terms
from .models import load_pipeline_parts, resolve_model
from .outputs import check_same_base, load_erased_encoders, read_record
from .writers.atomic import check_target, staged_file

SD_GUIDANCE, SD_STEPS = 7.5, 30
KEPT_SHOWN = 2  # without --prompt: the erased concepts, then the kept ones the erase moved most
MAX_IMAGES = 64  # a row a prompt: wider than this is no longer a grid to look at
BATCH = 8  # images generated at once: --images sets the grid's width, not the memory a call takes
LABEL_SIZE = 16


@dataclass(frozen=True)
class GenerationSettings:
    guidance_scale: float
    steps: int
    size: int | None = None  # None: the pipeline's own (FLUX's default is its largest, so its erases pass theirs)
    sequence_length: int | None = None  # SD 3.x / FLUX.1: T5's, as the erase used


def generation_settings(source, guidance_scale: float | None, steps: int | None) -> GenerationSettings:
    """The demo ships the guidance scale measured for it (SD's 7.5 over-guides a small model into noise)."""
    shipped = source.generation if source.kind == "demo" else {}
    return GenerationSettings(
        guidance_scale=guidance_scale if guidance_scale is not None else shipped.get("guidance_scale", SD_GUIDANCE),
        steps=steps if steps is not None else shipped.get("num_inference_steps", SD_STEPS),
    )


def generate(pipe, prompt: str, seeds: list[int], settings: GenerationSettings, device) -> list:
    import torch

    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    extra = ({"height": settings.size, "width": settings.size} if settings.size else {}) | (
        {"max_sequence_length": settings.sequence_length} if settings.sequence_length else {})
    return [image for start in range(0, len(seeds), BATCH)
            for image in pipe(prompt=[prompt] * len(generators[start:start + BATCH]),
                              generator=generators[start:start + BATCH], guidance_scale=settings.guidance_scale,
                              num_inference_steps=settings.steps, output_type="pil", **extra).images]


def default_prompts(record: dict) -> list[str]:
    """Each erased concept in its first caption template, then the kept concepts the erase moved most, in the same."""
    prompts = [concept["templates"][0].replace("{}", concept["concept"]) for concept in record["concepts"]]
    template = record["concepts"][0]["templates"][0]
    drift = record.get("effects", {}).get("kept_drift", {})  # stored by name: order it by how far each moved
    moved = sorted(drift, key=lambda kept: -drift[kept])[:KEPT_SHOWN]
    return prompts + [template.replace("{}", kept) for kept in moved]


def grid(rows: list[tuple[str, list]], cell: int) -> object:
    """One labelled row per (label, images); images scaled (nearest) so small models stay visible; the label
    column as wide as its longest label."""
    from PIL import Image, ImageDraw, ImageFont

    font, pad = ImageFont.load_default(size=LABEL_SIZE), 8
    label_width = max(int(font.getlength(label)) for label, _ in rows) + 2 * pad
    columns = max(len(images) for _, images in rows)
    sheet = Image.new("RGB", (label_width + columns * (cell + pad), len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (label, images) in enumerate(rows):
        top = pad + row * (cell + pad)
        draw.text((pad, top + cell // 2), label, fill="black", font=font, anchor="lm")
        for column, image in enumerate(images):
            scaled = image.resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(scaled, (label_width + column * (cell + pad), top))
    return sheet


@python_terms
def compare(output: str | Path, prompts: list[str] | None, grid_path: str | Path, *, model: str | None = None,
            images: int = 4, guidance_scale: float | None = None, steps: int | None = None, cell: int = 128,
            overwrite: bool = False, device: str = "auto", config: str | None = None, progress=None):
    from .api import Progress

    progress = progress or Progress()
    if not 1 <= images <= MAX_IMAGES:
        raise BadInput(f"--images must be 1 to {MAX_IMAGES} (images a prompt, one row each), got {images}")
    if Path(grid_path).suffix.lower() != ".png":
        raise BadInput(f"output {grid_path} must end in .png: the grid is written as a PNG")
    if steps is not None and steps < 1:
        raise BadInput(f"--steps must be at least 1, got {steps}")
    if guidance_scale is not None and not (math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise BadInput(f"--guidance-scale must be a finite number, zero or more, got {guidance_scale}")
    record = read_record(Path(output))
    prompts = list(prompts) if prompts else default_prompts(record)
    target = check_target(Path(grid_path), overwrite, inputs=(Path(output),))
    source = resolve_model(model if model is not None else (None if record["base"]["kind"] == "demo" else record["base"]["model"]))
    with progress.phase("loading model"):
        if source.recommended.get("threads"):
            from .api import use_threads

            use_threads(source.recommended["threads"])  # the demo's: a second thread only waits (docs/speed.md)
        parts = load_pipeline_parts(source, device=device, config=config)
        check_same_base(record, parts)
        base = parts.pipeline
        erased = type(base)(**{**base.components, **load_erased_encoders(Path(output), parts)})
        erased.set_progress_bar_config(disable=True)
    settings = generation_settings(source, guidance_scale, steps)
    if parts.family.flow_matching:  # at the size and T5 length the erase was made for
        settings = replace(settings, size=record["settings"].get("resolution"),
                           sequence_length=record["settings"].get("max_sequence_length"))
    rows = []
    with progress.phase("generating", total=2 * len(prompts)) as advance:
        for prompt in prompts:
            for label, pipe in (("base", base), ("erased", erased)):
                rows.append((f"{label}: {prompt}", generate(pipe, prompt, list(range(images)), settings, parts.device)))
                advance()
    with staged_file(target, overwrite) as staging:
        grid(rows, cell).save(staging, format="PNG")
    return target
