"""Speed and memory benchmark: each phase of a real erase, the training loop against its floor, peak memory.

    python -m benchmarks.speed                                   # the demo model, default erase
    python -m benchmarks.speed --model sd1 --resolution 256 --steps 2 --device cpu
    python -m benchmarks.speed --model sd1 --model sdxl --device cuda -o speed.json

What is measured and how: benchmarks/speed_runner.py; the figures: docs/speed.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from fewshot_erase.cli.render import handled, print_json, stderr


def _resolution(value: str) -> int | None:
    if value == "default":
        return None
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither 'default' nor a number of pixels") from None


def _figure(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def case_table(report: dict):
    """One column per case (a case's figures read top to bottom, phases in the order they run)."""
    from rich.table import Table

    from benchmarks.speed_runner import PHASES

    table = Table(title="seconds per phase (API worker), loop against floor, peak memory, whole CLI run")
    table.add_column("")
    cases = report["cases"]
    for case in cases:
        table.add_column(f"{Path(case['case']['model']).name} @ {case['resolution']}", justify="right")
    rows = [
        ("device", lambda c: f"{c['device']} {c['dtype']}"),
        ("batch x steps", lambda c: f"{c['batch_size']} x {c['steps']}"),
        *((name, lambda c, name=name: _figure(c["phases"].get(name))) for name in PHASES),
        ("total", lambda c: _figure(c["phases"]["total"])),
        ("floor", lambda c: _figure(c["floor"]["seconds"])),
        ("loop / floor", lambda c: _figure(c["ratio"])),
        ("steady step / floor", lambda c: _figure(c["steady_ratio"])),
        ("best step / best floor step", lambda c: _figure(c["best_step_ratio"])),
        ("peak RSS MB", lambda c: _figure(c["memory"]["peak_rss_mb"], 0)),
        ("GPU peak MB", lambda c: _figure(c["memory"]["cuda_peak_allocated_mb"], 0)),
        ("CLI wall", lambda c: _figure(c["cli"]["wall_s"]) if "cli" in c else "-"),
        ("CLI outside API", lambda c: _figure(c["cli"]["outside_api_s"]) if "cli" in c else "-"),
        ("CLI peak RSS MB", lambda c: _figure(c["cli"]["peak_rss_mb"], 0) if "cli" in c else "-"),
        ("import floor (beside CLI)", lambda c: _figure(c["cli"]["import_floor_s"]) if "cli" in c else "-"),
        ("CLI minus import floor", lambda c: _figure(c["cli"]["over_import_floor_s"]) if "cli" in c else "-"),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(case) for case in cases))
    return table


def target_table(report: dict):
    from rich.table import Table

    load = ", ".join(f"{x:.1f}" for x in report["machine"]["load_average"] or [])
    table = Table(title=f"targets (load average at the start {load})")
    for column in ("target", "measured", "limit", "met"):
        table.add_column(column)
    for verdict in report["targets"]:
        table.add_row(verdict["target"], f"{verdict['value']} {verdict['unit']}", f"{verdict['limit']} {verdict['unit']}",
                      "[green]yes[/]" if verdict["met"] else "[red]no[/]")
    return table


@click.command("speed")
@click.option("--model", "models", multiple=True, metavar="demo|sd1|sd2|sdxl|DIR",
              help="What to erase from (repeatable; default demo). sd1/sd2/sdxl: full size, random weights.")
@click.option("--resolution", "resolutions", multiple=True, metavar="default|N",
              help="Training resolution (repeatable; default: the model's own).")
@click.option("--steps", type=int, help="Training steps (default: the default erase's).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto", show_default=True)
@click.option("--low-memory", is_flag=True, help="Erase with --low-memory (the floor then recomputes activations too).")
@click.option("--bare", is_flag=True, help="Erase with the published method alone (--no-preserve --until steps, 4 epochs unless --steps): the loop the floor prices.")
@click.option("--repeat", type=int, default=1, show_default=True, help="Runs per case; the one with the fastest loop is reported.")
@click.option("--no-cli", is_flag=True, help="Skip the whole-CLI run per case (halves the time of full-size cases).")
@click.option("--workdir", type=click.Path(), help="Where random-weight models are built once (default .bench/ in this checkout).")
@click.option("-o", "--output", type=click.Path(), help="Also write the JSON report to this file.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout and nothing else there.")
def bench_command(models, resolutions, steps, device, dtype, low_memory, bare, repeat, no_cli, workdir, output, as_json):
    """Time each phase of a real erase, compare the training loop with its floor, and report peak memory.

    The floor is one bare forward and backward of the frozen UNet with respect to the conditioning, times the
    steps, measured in the same process on the same device, batch and resolution."""
    with handled():
        from benchmarks.speed_runner import Case, default_workdir, run_benchmark

        cases = [Case(model, _resolution(resolution), steps, low_memory, bare) for model in models or ("demo",)
                 for resolution in resolutions or ("default",)]
        report = run_benchmark(cases, Path(workdir) if workdir else default_workdir(), device=device, dtype=dtype,
                               repeats=repeat, with_cli=not no_cli,
                               on_case=lambda case: stderr.print(f"measuring {case.label} ...", soft_wrap=True))
    if output:
        Path(output).write_text(json.dumps(report, indent=2) + "\n")
    for table in (case_table(report), target_table(report)):
        stderr.print(table)
    if as_json:
        print_json(report)


if __name__ == "__main__":
    bench_command(prog_name="python -m benchmarks.speed")
