"""`fewshot-erase apply PATCH CHECKPOINT -o NEW`"""

from __future__ import annotations

import click

from .render import handled, print_json


@click.command("apply")
@click.argument("patch", metavar="PATCH")
@click.argument("checkpoint", metavar="CHECKPOINT")
@click.option("-o", "--output", required=True, type=click.Path(), metavar="NEW",
              help="The patched copy to write: a .safetensors file, or a folder for a pipeline folder.")
@click.option("--force", is_flag=True, help="Patch CHECKPOINT even if it is not the base the patch was made from.")
@click.option("--allow-pickle", is_flag=True, help="Accept a .ckpt/.pt checkpoint (loaded with weights_only=True).")
@click.option("--overwrite", is_flag=True, help="Replace an existing NEW (atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout and nothing else there.")
@click.option("-q", "--quiet", is_flag=True, help="No summary; errors only.")
def apply_command(patch, checkpoint, output, force, allow_pickle, overwrite, as_json, quiet):
    """Write the erase in PATCH into a copy of CHECKPOINT.

    PATCH: an `erase` output folder, or a file `export` wrote (delta or LoRA). CHECKPOINT: a single-file
    checkpoint (SD 1.x, 2.x, XL in the original layout A1111 and ComfyUI use) or a diffusers pipeline folder.
    Only the text encoders' feed-forward tensors change; the input is never modified."""
    with handled(quiet):
        from ..apply import apply

        result = apply(patch, checkpoint, output, force=force, overwrite=overwrite, allow_pickle=allow_pickle)
    if as_json:
        print_json(result.summary())
    elif not quiet:
        click.echo(f"patched {result.patched} feed-forward tensors of the {result.family.label} text encoder(s) "
                   f"(patch: {result.patch_kind}): {result.output}")
