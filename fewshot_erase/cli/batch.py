"""`fewshot-erase batch MANIFEST [--ray [ADDRESS]] [--shard I/N]`"""

from __future__ import annotations

import contextlib
import sys

import click

from .render import handled, stderr, verdict


@click.command("batch")
@click.argument("manifest", type=click.Path())
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Run the jobs on a Ray cluster: a new one on this machine when no ADDRESS is given (put it after "
                   "MANIFEST), 'auto' for the one `ray start --head` started here, or HOST:PORT / ray://HOST:PORT.")
@click.option("--workers", type=click.IntRange(min=1), help="With --ray and no address: CPUs of the local cluster, so "
              "jobs at once (default: this machine's CPUs).")
@click.option("--ray-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="Seconds to wait for the Ray cluster at ADDRESS to answer.")
@click.option("--shard", metavar="I/N", help="Run only the I-th of N slices of the jobs (every N-th job from the "
              "I-th), e.g. $SLURM_ARRAY_TASK_ID/N.")
@click.option("--results", type=click.Path(), help="Where to write one JSON line per job (default: results.jsonl "
              "beside the manifest; results.shard-I-of-N.jsonl with --shard).")
@click.option("--overwrite", is_flag=True, help="Replace outputs that exist but hold another erase (atomically); "
              "outputs that hold their job's erase are always kept.")
@click.option("-q", "--quiet", is_flag=True, help="No progress, no summary; errors only.")
def batch_command(manifest, ray_address, workers, ray_timeout, shard, results, overwrite, quiet):
    """Run the jobs of MANIFEST (YAML, or JSON Lines: one job per line), each an erase and what to do with its
    output (apply, export), skipping jobs whose output already holds their erase.

    One job's failure does not stop the others. Exit codes: 0 every job done or skipped, 1 some failed (listed),
    2 bad input (nothing run). The manifest format: docs/batch.md."""
    with handled(quiet):
        from .. import batch
        from ..batch_manifest import parse_shard, read_jobs
        from ..batch_manifest import shard as slice_of
        from ..errors import BadInput

        chosen = parse_shard(shard) if shard else None
        if workers is not None and ray_address is None:
            raise BadInput("--workers sizes the local Ray cluster; pass --ray too, or drop --workers")
        jobs = read_jobs(manifest)
        jobs = slice_of(jobs, *chosen) if chosen else jobs
        results_path = batch.check_results_path(results or batch.default_results(manifest, chosen))
        bars = _Bars(len(jobs), quiet)
        if ray_address is None:
            lines = batch.run_local(jobs, overwrite=overwrite, progress=bars, starting=bars.starting)
        else:  # connects now: a cluster that does not answer leaves the last run's results file as it was
            lines = batch.run_ray(jobs, address=ray_address, workers=workers, timeout=ray_timeout, overwrite=overwrite)
        finished = []
        try:
            with bars, batch.ResultsFile(results_path) as written:
                for line in lines:
                    written.write(line)
                    finished.append(line)
                    bars.finished(line)
        except KeyboardInterrupt:
            stderr.print(f"[red]interrupted:[/] {len(finished)} of {len(jobs)} jobs finished and are kept "
                         f"({results_path}); a rerun skips them", soft_wrap=True)
            sys.exit(130)
    if not quiet:
        _summary(finished, results_path)
    failed = [line for line in finished if line["status"] == batch.FAILED]
    for line in failed:
        stderr.print(f"[red]failed:[/] job {line['job']} (line {line['line']}, {line['name']}): {line['error']}",
                     soft_wrap=True)
    sys.exit(1 if failed else 0)


class _Bars:
    """A bar over the jobs and, for a local run, one over the current job's phase (it is the API's Progress)."""

    def __init__(self, total: int, quiet: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.bars = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=stderr, disable=quiet)
        self.jobs = self.bars.add_task("jobs", total=total, info="")

    def __enter__(self):
        self.bars.__enter__()
        return self

    def __exit__(self, *exc):
        self.bars.__exit__(*exc)

    def starting(self, job) -> None:
        self.bars.update(self.jobs, info=job.name)

    def finished(self, line: dict) -> None:
        self.bars.update(self.jobs, advance=1, info=line["name"])

    @contextlib.contextmanager
    def phase(self, name: str, total: int | None = None):
        task = self.bars.add_task(f"  {name}", total=total, info="")

        def advance(count=1, note=None, **info):
            text = note or "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
            self.bars.update(task, advance=count, info=text)

        try:
            yield advance
        finally:
            self.bars.remove_task(task)


def _summary(lines: list[dict], results_path) -> None:
    from rich.table import Table

    table = Table("status", "jobs", "seconds (in workers)", box=None)
    for status in ("done", "skipped", "failed"):
        chosen = [line for line in lines if line["status"] == status]
        if chosen:
            table.add_row(status, str(len(chosen)), f"{sum(line['seconds'] for line in chosen):.1f}")
    stderr.print(table)
    wall = max((line["finished_at"] for line in lines), default=0.0)
    stderr.print(f"{len(lines)} job{'' if len(lines) == 1 else 's'} in {wall:.1f} s; one line per job in {results_path}",
                 soft_wrap=True)
    for line in lines:
        left = not_erased(line)
        if left:
            stderr.print(f"[yellow]not erased:[/] job {line['job']} (line {line['line']}, {line['name']}) ran, but "
                         f"{', '.join(map(repr, left))} {'is' if len(left) == 1 else 'are'} not erased; give it a "
                         "higher lr or more steps", soft_wrap=True)


def not_erased(line: dict) -> list[str]:
    """The concepts a finished job's erase left by its verdict (the erase command's own wording: render.verdict)."""
    report = (line.get("erase") or {}).get("report") or {}
    effects = report.get("effects", {}).get("erased", {})
    return [concept for concept, effect in effects.items() if verdict(effect) == "not erased"]
