"""What every command shares: rich progress on stderr, warnings as one line each, and the one place where the
tool's exceptions become exit codes."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import sys
import warnings

import click
from rich.console import Console

from ..errors import FROM_CLI, EraseError
from ..settings import EraseSettings

INTERRUPTED = 130
stderr = Console(stderr=True, highlight=False)


def rich_progress(quiet: bool):
    """The API's Progress, drawn with rich: a spinner while a phase has no length, a bar per phase otherwise."""
    from ..api import Progress

    if quiet:
        return Progress()

    class RichProgress(Progress):
        @contextlib.contextmanager
        def phase(self, name, total=None):
            from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bars

            columns = [SpinnerColumn(), TextColumn("{task.description}")]
            if total is not None:
                columns += [BarColumn(), MofNCompleteColumn()]
            columns += [TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
            with Bars(*columns, console=stderr, transient=False) as bar:
                task = bar.add_task(name, total=total, info="")

                def advance(count=1, note=None, **info):
                    text = note or "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
                    bar.update(task, advance=count, info=text)

                yield advance
                # a phase that ends short of its total (a run stopped early) still ends finished, not frozen
                done = bar.tasks[0].completed
                bar.update(task, total=done or 1, completed=done or 1)

    return RichProgress()


def _show_warning(message, category, filename, lineno, file=None, line=None):
    stderr.print(f"[yellow]warning:[/] {message}", soft_wrap=True)


@contextlib.contextmanager
def handled(quiet: bool = False):
    """Run a command body: the tool's errors become one line and their exit code; Ctrl-C becomes 130."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from ..errors import EraseWarning

        warnings.simplefilter("default" if not quiet else "ignore", EraseWarning)
        warnings.showwarning = _show_warning
        token = FROM_CLI.set(True)
        try:
            yield
        except EraseError as error:
            stderr.print(f"[red]error:[/] {error}", soft_wrap=True)
            sys.exit(error.exit_code)
        except KeyboardInterrupt:
            exit_interrupted()
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as error:  # a bug or an environment fault: one line, unless asked for the traceback
            if os.environ.get("FEWSHOT_ERASE_DEBUG"):
                raise
            first = str(error).splitlines()[0][:300] if str(error) else ""
            stderr.print(f"[red]error:[/] unexpected {type(error).__name__}: {first} "
                         "(set FEWSHOT_ERASE_DEBUG=1 for the traceback and report it)", soft_wrap=True)
            sys.exit(1)
        finally:
            FROM_CLI.reset(token)


def exit_interrupted() -> None:
    """Say so and exit 130 now, the outputs already unwound: left to the interpreter's shutdown, a run interrupted
    while its libraries were importing sometimes died by the signal instead (exit -2). A second Ctrl-C from here on
    is ignored, not left to escape as a second KeyboardInterrupt halfway through the line."""
    with contextlib.suppress(ValueError):  # off the main thread there is no handler to change
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    stderr.print("[red]interrupted:[/] stopped; nothing was written", soft_wrap=True)
    stderr.quiet = True  # the progress bar's refresh thread draws no frame after that line (seen on a loaded machine)
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()  # what libraries left for the exit: torch 2.6 removes a temporary folder of its own there
    os._exit(INTERRUPTED)


def verdict(effect: dict) -> str:
    """Records written before the verdict field carry only `gone`."""
    return effect.get("verdict") or ("erased" if effect["gone"] else "not erased")


def print_json(data: dict) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def headline(summary: dict, model: str) -> str:
    """What was done to which concepts: 'erased 'two' and 'seven'', 'steered 'seven'', 'tried to erase ...'."""
    effects = summary["effects"]["erased"]
    said = {concept: verdict(effect) for concept, effect in effects.items()}
    verb = ("tried to erase" if "not erased" in said.values() else
            "steered" if set(said.values()) == {"steered"} else "erased")
    names = [repr(concept) for concept in effects]
    named = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{verb} {named} from {model}"


DRIFT_BOUND = EraseSettings.until_drift  # the stop's default: a run it ended keeps every kept concept within it

VERDICTS = {
    "erased": "erased: its captions now push the denoising away from its pictures",
    "not erased": "NOT erased: its captions are not pushed far enough from its pictures yet; run again with a higher "
                  "--lr or more --steps",
    "steered": "steered to its anchor, which the erase rule does not judge: look with `fewshot-erase compare`",
}


# Where the concept's captions did not help draw its pictures even before the erase, "pushed away by the margin"
# can be reached while it is still drawn (zero+six+nine's nine: docs/benchmarks.md#any-pictures-any-pair).
UNSEEN = ("; its captions did not help draw its pictures even before, so this check sees little of it: "
          "look with `fewshot-erase compare` or `audit`")


def effect_line(concept: str, effect: dict) -> str:
    """One erased concept: the verdict and the caption advantage it rests on."""
    said = verdict(effect)
    unseen = UNSEEN if said == "erased" and effect["advantage_before"] <= 0 else ""
    return (f"  {concept}: {VERDICTS[said]} (caption advantage {effect['advantage_before']:+.4f} -> "
            f"{effect['advantage_after']:+.4f}){unseen}")


def effect_lines(effects: dict) -> list[str]:
    """Per erased concept its line; then the kept concepts it moved most."""
    lines = [effect_line(concept, effect) for concept, effect in effects["erased"].items()]
    if effects["kept_drift"]:
        most = sorted(effects["kept_drift"].items(), key=lambda item: -item[1])[:3]  # erase.json sorts by name
        past = (f" (past the {DRIFT_BOUND} the stop allows: they may draw differently now; a lower --lr, or --until "
                "gone, keeps them)") if most[0][1] > DRIFT_BOUND else ""
        lines.append("  most moved of the kept concepts: " + ", ".join(f"{name} {value:.4f}" for name, value in most) + past)
    return lines
