"""`fewshot-erase erase CONCEPT IMAGE_OR_DIR... -o OUT`"""

from __future__ import annotations

import click

from ..settings import TRAIN_CHOICES, parse_layers
from .render import effect_lines, handled, headline, print_json, rich_progress


@click.command("erase")
@click.argument("concept", required=False)
@click.argument("images", nargs=-1, metavar="IMAGE_OR_DIR...")
@click.option("-o", "--output", required=True, type=click.Path(), help="Folder to write the patched text encoder to.")
@click.option("--model", help="Diffusers folder, Hub id or .safetensors checkpoint. Default: the embedded demo model.")
@click.option("--style", is_flag=True, help="The concept is a style: use the style caption templates.")
@click.option("--template", "templates", multiple=True, help="Caption template with {} for the concept (repeatable).")
@click.option("--seed", type=int, help="Random seed (default 0); the same seed gives the same weights on CPU.")
@click.option("--steps", type=int, help="Training steps (default: --epochs over the images).")
@click.option("--epochs", type=int, help="Passes over the images (default 4).")
@click.option("--lr", type=float, help="Adam learning rate (default 1e-5 for SD).")
@click.option("--batch-size", type=int, help="Images per step (default 2).")
@click.option("--resolution", type=int, help="Training resolution in pixels (default: the model's).")
@click.option("--train", type=click.Choice(TRAIN_CHOICES), help="Which weights to train (default ffn).")
@click.option("--encoder", help="Which text encoder(s) to erase in: all, or names/positions such as clip-l,clip-g,t5 or 1,2 "
                                 "(default all).")
@click.option("--t5-layers", help="SD 3.x / FLUX.1: the T5 blocks whose feed-forward weights train, e.g. 0-5 or 0,2,4 (default all; fewer need less memory).")
@click.option("--max-sequence-length", type=int, help="SD 3.x / FLUX.1: T5 tokens per caption, as you generate (default: the pipeline's).")
@click.option("--concept", "concept_options", multiple=True, metavar="NAME=DIR", help="Erase several concepts in one run (repeatable).")
@click.option("--manifest", type=click.Path(), help="JSON/YAML list of {concept, images, style, anchor} to erase in one run.")
@click.option("--anchor", help="Steer the concept to generate this concept instead of pure erasure.")
@click.option("--preserve", multiple=True, help="A concept to keep intact (repeatable); replaces the automatic set.")
@click.option("--preserve-file", type=click.Path(), help="A file of concepts to keep, one per line.")
@click.option("--preserve-weight", type=float, help="Weight of the term that keeps preserved concepts' conditioning.")
@click.option("--no-preserve", is_flag=True, help="The bare published method: no preservation term.")
@click.option("--until", type=click.Choice(["gone", "steps"]),
              help="gone: stop once each concept's captions push the denoising of its images away as strongly as they "
                   "pulled before, or hold them pushed away for two checks, and no kept caption has drifted past the bound "
                   "(retain-only repair steps until then; --steps is the cap); steps: run every step (the published "
                   "method; the demo's default is gone).")
@click.option("--robust", is_flag=True, help="Harden the erase against learned-prompt attacks: rounds of the audit's soft prompt, each erased in turn (slower).")
@click.option("--flip/--no-flip", default=None, help="Add mirrored copies of the images (default on; the demo: off, mirrored digits are not digits).")
@click.option("--device", help="cpu, cuda, cuda:N (default: cuda if available).")
@click.option("--threads", type=int, help="CPU threads for torch (default: torch's own choice).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), help="Dtype of the frozen UNet and VAE.")
@click.option("--low-memory", is_flag=True, help="Trade speed for GPU memory (recompute UNet activations in the backward pass).")
@click.option("--config", type=click.Path(), help="Single-file checkpoints: a folder of diffusers configs for a non-standard architecture.")
@click.option("--allow-pickle", is_flag=True, help="Accept .ckpt/.pt/.bin checkpoints (loaded with weights_only=True).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder (atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout and nothing else there.")
@click.option("-q", "--quiet", is_flag=True, help="No progress, no summary; errors only.")
def erase_command(concept, images, output, model, style, templates, seed, steps, epochs, lr, batch_size, resolution,
                  train, encoder, t5_layers, max_sequence_length, concept_options, manifest, anchor, preserve, preserve_file, preserve_weight,
                  no_preserve, until, robust, flip, device, threads, dtype, low_memory, config, allow_pickle, overwrite, as_json,
                  quiet):
    """Erase CONCEPT using a few real images of it (files or folders).

    Several concepts at once: --concept NAME=DIR (repeated) or --manifest FILE instead of CONCEPT IMAGE_OR_DIR."""
    chosen = {
        "style": style or None, "templates": tuple(templates) or None, "seed": seed, "steps": steps, "epochs": epochs,
        "lr": lr, "batch_size": batch_size, "resolution": resolution, "train": train, "encoder": encoder,
        "max_sequence_length": max_sequence_length,
        "flip": flip, "device": device, "threads": threads, "dtype": dtype, "low_memory": low_memory or None,
        "robust": robust or None,
        "preserve_weight": 0.0 if no_preserve else preserve_weight,
    }
    with handled(quiet):
        from .. import concepts
        from ..api import erase_concepts

        chosen["t5_layers"] = parse_layers(t5_layers) if t5_layers else None

        if concept_options or manifest:
            if concept or images or anchor:
                raise click.UsageError("give either CONCEPT IMAGE_OR_DIR... (with --anchor) or --concept/--manifest, not both")
            specs = [concepts.parse_concept_option(value) for value in concept_options]
            specs += concepts.read_manifest(manifest) if manifest else []
        elif concept is None:
            raise click.UsageError("missing CONCEPT and IMAGE_OR_DIR...; e.g. fewshot-erase erase seven sample_images/seven -o erased/")
        else:
            specs = [concepts.ConceptSpec(concept, images, style, anchor)]
        kept = tuple(preserve) + (concepts.read_preserve_file(preserve_file) if preserve_file else ())
        if kept:
            chosen["preserve"] = kept
        result = erase_concepts(specs, output, model=model, overwrite=overwrite, config=config,
                                allow_pickle=allow_pickle, progress=rich_progress(quiet),
                                **{key: value for key, value in chosen.items() if value is not None},
                                # "steps" is an explicit None: it overrides a model's recommended "gone"
                                **({"until": {"gone": "gone", "steps": None}[until]} if until else {}))
    if as_json:
        print_json(result.summary())
    elif not quiet:
        s = result.summary()
        repairs = f", {s['repair_steps']} of them repair steps" if s["repair_steps"] else ""
        model = "the demo model" if s["model"] == "demo" else s["model"]
        click.echo(f"{headline(s, model)} in {s['steps']} steps{repairs} ({s['timings']['total']:.1f} s); wrote {s['output']}")
        for line in effect_lines(s["effects"]):
            click.echo(line)
        if s.get("robust_rounds"):
            click.echo(robust_line(s["robust_rounds"], s["output"]))


def robust_line(rounds: list[dict], output: str) -> str:
    """What --robust's rounds found: the most of the concept a round's soft prompts brought back, round by round."""
    named = len({r["concept"] for r in rounds}) > 1
    best: dict[tuple[int, str], float] = {}
    for r in rounds:  # several attacks a round: its strongest
        best[r["round"], r["concept"]] = max(best.get((r["round"], r["concept"]), 0.0), r["recovered"])
    shares = [f"{concept + ' ' if named else ''}{share:.0%}" for (_, concept), share in best.items()]
    found = shares[0] if len(shares) == 1 else ", ".join(shares[:-1]) + ", then " + shares[-1]
    count = max(r["round"] for r in rounds)
    return (f"  hardened in {count} round{'s' if count != 1 else ''} of the soft-prompt attack, which brought back "
            f"{found}; check it with: fewshot-erase audit {output}")

