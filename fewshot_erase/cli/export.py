"""`fewshot-erase export OUT --format delta|lora-kohya|lora-diffusers -o FILE`, `--format drop-in -o FOLDER`"""

from __future__ import annotations

import contextlib

import click

from ..writers import EXPORT_FORMATS
from .render import handled, print_json, stderr


@click.command("export")
@click.argument("output", metavar="OUT")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), required=True,
              help="delta: the fp16 feed-forward differences; lora-kohya / lora-diffusers: their low-rank factors; "
                   "drop-in: each erased encoder whole, as ComfyUI/Forge load it (clip_l, clip_g, t5xxl_fp16).")
@click.option("--rank", type=int, help="LoRA rank (default: the smallest that keeps 99% of the erase's effect on the erased prompts).")
@click.option("-o", "--file", "target", required=True, type=click.Path(), help="The .safetensors file to write (drop-in: a folder).")
@click.option("--model", help="The base model, if not where OUT's erase.json says (the differences need it).")
@click.option("--overwrite", is_flag=True, help="Replace an existing FILE (atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON report on stdout and nothing else there.")
@click.option("-q", "--quiet", is_flag=True, help="No report; errors only.")
def export_command(output, fmt, rank, target, model, overwrite, as_json, quiet):
    """Write the erase in OUT as a small patch file that `apply`, A1111, ComfyUI or diffusers load.

    A LoRA's report gives each layer's relative reconstruction error and how far its embeddings of the erased
    prompts stay from the full patch's."""
    with handled(quiet):
        from ..export import export

        status = contextlib.nullcontext() if quiet or as_json else stderr.status(f"exporting {fmt}")
        with status:
            result = export(output, fmt, target, rank=rank, model=model, overwrite=overwrite)
    if as_json:
        print_json(result.summary())
    elif not quiet:
        _show(result)


def _show(result) -> None:
    report = result.report
    if "layers" in report:
        from rich.console import Console
        from rich.table import Table

        table = Table("layer", "relative error", box=None)
        for layer, error in report["layers"].items():
            table.add_row(layer, f"{error:.4f}")
        Console(highlight=False).print(table)
        asked = report.get("rank_asked")
        capped = f" (asked {asked}: the differences have no higher rank)" if isinstance(asked, int) and asked > report["rank"] else ""
        click.echo(f"rank {report['rank']}{capped}: embeddings of the {report['prompts']} erased prompts within "
                   f"{report['embedding_error']:.2%} of the full patch's; {report['effect_error']:.2%} of its effect "
                   f"missed (biases {report['biases']})")
    elif "files" in report:
        click.echo(f"{', '.join(report['files'].values())} in fp16 (the erased tensors' rounding error at most {report['rounding_error']:.2e})")
    else:
        click.echo(f"{report['tensors']} differences in fp16 (rounding error at most {report['rounding_error']:.2e})")
    click.echo(f"wrote {result.output}")
