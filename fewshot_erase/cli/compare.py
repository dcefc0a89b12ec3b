"""`fewshot-erase compare OUT --prompt ... -o grid.png`"""

from __future__ import annotations

import click

from .render import handled, rich_progress


@click.command("compare")
@click.argument("output", metavar="OUT")
@click.option("--prompt", "prompts", multiple=True,
              help="Prompt to generate (repeatable). Default: each erased concept, then the two kept ones it moved most.")
@click.option("-o", "--grid", "grid_path", required=True, type=click.Path(), help="PNG file to write the grid to.")
@click.option("--model", help="The base model (default: the one OUT's erase.json names).")
@click.option("--images", "--seeds", "images", type=int, default=4, show_default=True,
              help="Images per prompt and row, on seeds 0..N-1 (--seeds is the older name).")
@click.option("--guidance-scale", type=float, help="Default: the demo's measured scale, 7.5 for SD.")
@click.option("--steps", type=int, help="Inference steps (default: the demo's, 30 for SD).")
@click.option("--config", type=click.Path(), help="Single-file checkpoints: configs for a non-standard architecture.")
@click.option("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available).")
@click.option("--overwrite", is_flag=True, help="Replace an existing grid file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress.")
def compare_command(output, prompts, grid_path, model, images, guidance_scale, steps, config, device, overwrite, quiet):
    """Generate each prompt with the base and the erased text encoder (same seeds) into one labelled grid."""
    with handled(quiet):
        from ..compare import compare

        path = compare(output, list(prompts), grid_path, model=model, images=images, guidance_scale=guidance_scale,
                       steps=steps, overwrite=overwrite, device=device, config=config, progress=rich_progress(quiet))
    if not quiet:
        click.echo(f"wrote {path}")
