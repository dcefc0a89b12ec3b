"""`fewshot-erase inspect PATH [--patch PATCH]`"""

from __future__ import annotations

import click

from .render import effect_lines, handled, print_json


@click.command("inspect")
@click.argument("path", metavar="PATH")
@click.option("--patch", help="An erase output folder or exported patch: does it fit the checkpoint at PATH?")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON on stdout.")
def inspect_command(path, patch, as_json):
    """What PATH is: a checkpoint, a pipeline folder, an erase output or a patch; its family, text encoders and
    erase records, and with --patch whether that patch fits it."""
    with handled():
        from ..inspect import inspect

        report = inspect(path, patch)
        text = None if as_json else _text(report)
    if as_json:
        print_json(report)
    else:
        click.echo(text)


def _text(report: dict) -> str:
    """The report as lines for a person, all or nothing: a record another tool rewrote is refused whole."""
    from ..errors import BadInput

    try:
        return "\n".join(_lines(report))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise BadInput(f"{report['path']} carries a damaged fewshot-erase record; re-create it with fewshot-erase") from None


def _lines(report: dict):
    yield f"{report['path']}: {report['kind']}, {report['family_label']}"
    for encoder, facts in report["text_encoders"].items():
        yield f"  {encoder}: {_encoder_line(facts)}"
    if not report["records"]:
        yield "  no erase record"
    for record in report["records"]:
        base = record["base"]
        settings = record["settings"]
        yield (f"  erased {record['concept']!r} with {len(record['images'])} images from {base['model']} "
               f"(lr {settings['lr']}, {record.get('steps')} steps, train {settings['train']})")
        for line in effect_lines(record["effects"]) if "effects" in record else ():
            yield "  " + line
        for encoder, identity in base["text_encoders"].items():
            yield f"    base {encoder} sha256 {identity['sha256']}"
        for image in record["images"]:
            yield f"    image {image['name']} sha256 {image['sha256']}"
        if "export" in record:
            yield (f"    exported as {record['export']['format']}" + (f", rank {record['export']['rank']}" if "rank" in record["export"] else ""))
        if "applied" in record:
            matched = "its base" if record["applied"]["base_matched"] else "another model than its base (--force)"
            yield f"    applied from the {record['applied']['patch']} to {matched}"
    if "patch" in report:
        patch = report["patch"]
        if patch["fits"]:
            yield f"  patch {patch['path']} fits: this is its base"
        elif patch.get("applied_here"):
            yield f"  patch {patch['path']} is already applied here (apply writes it into its base, not again into this)"
        else:
            reason = patch.get("reason") or f"{len(patch['differing'])} feed-forward tensors differ from its base"
            yield f"  patch {patch['path']} does not fit: {reason}"


def _encoder_line(facts: dict) -> str:
    if "patched_tensors" in facts:
        return f"{facts['patched_tensors']} feed-forward tensors patched"
    return (f"{facts['layers']} layers, {facts['width']} wide, {', '.join(facts['dtypes'])}, {facts['layout']}, "
            f"in {', '.join(facts['files'])}")
