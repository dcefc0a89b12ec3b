"""`fewshot-erase memory [--family F] [--resolution N] [--low-memory] [--encoder E] [--t5-layers L] [--json]`"""

from __future__ import annotations

import click

from .render import handled, print_json


@click.command("memory")
@click.option("--family", "family_names", multiple=True, metavar="sd1|sd2|sdxl|sd3|flux",
              help="Architecture to estimate (repeatable; default sd1, sd2, sdxl), at its full size (sd3: SD 3.5 Large, flux: FLUX.1 [dev]).")
@click.option("--resolution", type=int, help="Training resolution in pixels (default: each family's native one).")
@click.option("--preset", default="default", show_default=True, metavar="default|published|preserve",
              help="default: `erase` with no options; published: --no-preserve; preserve: 12 kept concepts and --until gone.")
@click.option("--low-memory", is_flag=True, help="Estimate an erase with --low-memory.")
@click.option("--dtype", default="bfloat16", show_default=True, help="The GPU's compute dtype (bfloat16, float16).")
@click.option("--encoder", help="As erase's --encoder (e.g. clip-l, t5, all).")
@click.option("--t5-layers", help="As erase's --t5-layers (e.g. 0-5).")
@click.option("--max-sequence-length", type=int, help="As erase's --max-sequence-length.")
@click.option("--json", "as_json", is_flag=True, help="Print the estimates as JSON on stdout.")
def memory_command(family_names, resolution, preset, low_memory, dtype, encoder, t5_layers, max_sequence_length, as_json):
    """Will an erase fit on my GPU? Runs the real erase on fake tensors (no GPU, no weights, no memory): peak GPU
    memory by kind, FLOPs per step against the bare denoiser's, and predicted times on a few cards."""
    with handled():
        from .. import gpu_memory
        from ..settings import parse_layers

        names = list(family_names) or ["sd1", "sd2", "sdxl"]
        gpu_memory.check_request(names, resolution, preset, dtype)
        layers = parse_layers(t5_layers) if t5_layers else None
        results = [gpu_memory.report(gpu_memory.estimate(name, resolution, preset, low_memory, dtype, encoder=encoder,
                                                         t5_layers=layers, sequence_length=max_sequence_length))
                   for name in names]
    if as_json:
        print_json({"estimates": results})
        return
    for result in results:
        kinds = ", ".join(f"{kind} {size:.2f}" for kind, size in result["at_peak_gib"].items() if size >= 0.005)
        fits = ", ".join(f"{card} {'yes' if ok else 'no'}" for card, ok in result["fits"].items())
        times = ", ".join(f"{card} {seconds:.1f} s" for card, seconds in result["predicted_seconds"].items())
        mode = ", --low-memory" if result["low_memory"] else ""
        mode += "".join(f", {option} {result[key]}" for option, key in (("--encoder", "encoder"), ("--t5-layers", "t5_layers"))
                        if result.get(key))
        click.echo(f"{result['family']} at {result['resolution']} px ({result['preset']}{mode}, {result['dtype']}): "
                   f"peak {result['peak_gib']:.2f} GiB ({kinds}); while encoding {result['encode_peak_gib']:.2f} GiB")
        click.echo(f"  fits (with {result['context_gib_allowed']} GiB for the CUDA context): {fits}")
        click.echo(f"  a step {result['tflops']['step']:.2f} TFLOPs, {result['loop_over_floor']:.2f}x the bare denoiser's; "
                   f"predicted for the {result['published_schedule_steps']}-step schedule "
                   f"(at {result['utilisation_assumed']:.0%} of peak): {times}")
