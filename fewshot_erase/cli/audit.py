"""`fewshot-erase audit OUT [IMAGES...]`"""

from __future__ import annotations

import click

from .render import handled, print_json, rich_progress


@click.command("audit")
@click.argument("output", metavar="OUT")
@click.argument("images", nargs=-1, metavar="[IMAGES...]")
@click.option("--attack", "attacks", multiple=True, metavar="NAME",
              help="prompts, soft, hard or inversion (repeatable). Default: all four.")
@click.option("--budget", "budget", multiple=True, metavar="[ATTACK=]N",
              help="Phrasings (prompts) or Adam steps (the others): N for every attack, or ATTACK=N (repeatable). "
                   "Default: 64 each.")
@click.option("--prompt", "prompts", multiple=True, help="A phrasing for the prompts attack ({} takes the concept; repeatable).")
@click.option("--prompt-file", type=click.Path(), help="A file of phrasings, one per line.")
@click.option("--concept", help="Which concept to audit, when the erase removed several.")
@click.option("--model", help="The base model, if not where OUT's erase.json says.")
@click.option("--config", type=click.Path(), help="Single-file checkpoints: configs for a non-standard architecture.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the attacks' starts and noise.")
@click.option("--judge-images", type=int, default=10, show_default=True,
              help="Images generated per attack for the demo's classifier judge.")
@click.option("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available).")
@click.option("--json", "as_json", is_flag=True, help="Print the audit record as one JSON object on stdout and nothing else there.")
@click.option("-q", "--quiet", is_flag=True, help="No progress, no table; errors only.")
def audit_command(output, images, attacks, budget, prompts, prompt_file, concept, model, config, seed, judge_images,
                  device, as_json, quiet):
    """Attack the erased text encoder in OUT and report how much of the concept comes back.

    Each attack is fitted on half of the concept's pictures (the erase's, or IMAGES) and scored on the other half:
    recovery 0 is no better than the empty prompt, 1 the concept fully back. Writes OUT/audit.json."""
    with handled(quiet):
        from ..audit import audit, parse_budget

        result = audit(output, list(images) or None, attacks=attacks or None, budget=parse_budget(budget),
                       prompts=prompts, prompt_file=prompt_file, concept=concept, model=model, config=config,
                       seed=seed, judge_images=judge_images, device=device,
                       progress=rich_progress(quiet))
    if as_json:
        print_json(result.record)
    elif not quiet:
        _show(result.record)


def _show(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    judged = record["erased_captions"].get("judged_success") is not None
    table = Table("attack", "recovery", *(["judged"] if judged else []), "budget", "seconds", "found", box=None)
    for name, result in record["attacks"].items():
        table.add_row(name, _share(result["recovery"]), *([_share(result["judged_success"])] if judged else []),
                      _spent(result), f"{result['seconds']:.1f}", result["found"])
    console = Console(highlight=False)
    console.print(table)
    erased = record["erased_captions"]
    judge = (f"; judged {erased['original_judged_success']:.0%} before the erase, {erased['judged_success']:.0%} after"
             if judged else "")
    if "hard" in record["attacks"]:
        click.echo(f"the hard prompt: {record['attacks']['hard']['prompt']!r}")
    click.echo(f"{record['concept']!r}: its own captions now recover {_share(erased['recovery'])}{judge}")
    click.echo(f"the erase {record['verdict']}; wrote {record['output']}/audit.json")


def _share(value) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _spent(result: dict) -> str:
    """The budget, and what was used of it where that is less (a battery of 64 phrasings under --budget 100000)."""
    budget, steps = result["budget"], result["steps"]
    return str(budget) if steps >= budget else f"{steps} of {budget}"
