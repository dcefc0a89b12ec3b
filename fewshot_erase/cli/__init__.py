"""The `fewshot-erase` command line: parses, calls the API, renders with rich. No method logic lives here, and
nothing heavy is imported until a command runs, so `--help` and usage errors answer at once."""

from __future__ import annotations

import sys

import click

from .. import __version__
from .apply import apply_command
from .audit import audit_command
from .batch import batch_command
from .compare import compare_command
from .erase import erase_command
from .export import export_command
from .inspect import inspect_command
from .memory import memory_command
from .render import exit_interrupted


class Commands(click.Group):
    """click's usage errors take four lines (usage, a hint, a blank, the error); the tool promises one."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as error:
            command = error.ctx.command_path if error.ctx else "fewshot-erase"
            click.echo(f"error: {error.format_message()} ('{command} --help' lists the options)", err=True)
            sys.exit(error.exit_code)
        except click.ClickException as error:
            click.echo(f"error: {error.format_message()}", err=True)
            sys.exit(error.exit_code)
        except click.Abort:
            exit_interrupted()
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="fewshot-erase")
def main():
    """Erase a concept from a Stable Diffusion model with a few real images of it.

    Updates only the feed-forward layers of the CLIP text encoder (Fuchi & Takagi, BMVC 2024) and writes a patched
    text encoder any SD pipeline can load. Exit codes: 0 done, 2 bad usage or bad input, 1 failure while running,
    130 interrupted.
    """


main.add_command(erase_command)
main.add_command(compare_command)
main.add_command(apply_command)
main.add_command(export_command)
main.add_command(inspect_command)
main.add_command(batch_command)
main.add_command(audit_command)
main.add_command(memory_command)
