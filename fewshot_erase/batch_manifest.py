"""The batch manifest: jobs read from YAML or JSON Lines and checked whole before anything runs, and the
deterministic slice of them that `--shard I/N` runs. Reading and checking only: no picture or model is opened.

A job is one erase (`erase_concepts`'s inputs and an output folder) and what to do with it afterwards (`apply` to
checkpoints, `export` a delta or LoRA). Relative paths are resolved against the manifest's folder. A problem is
raised as BadInput naming the manifest line (and field) it is on: in a thousand-job file, the line is the fix."""

from __future__ import annotations

import json
import os
import typing
from dataclasses import dataclass
from pathlib import Path

from .concepts import MANIFEST_FIELDS as CONCEPT_FIELDS
from .concepts import REQUIRED_FIELDS as CONCEPT_REQUIRED
from .concepts import ConceptSpec, read_manifest
from .errors import BadInput
from .models import HUB_ID, PICKLE_SUFFIXES
from .prompts import check_concept, check_templates
from .settings import EraseSettings
from .writers import EXPORT_FORMATS

# Every EraseSettings field but the ones a concept carries; `style` is both (the concept's, and the default
# template set of a job's concepts), as in `erase`.
SETTING_TYPES = {name: hint for name, hint in typing.get_type_hints(EraseSettings).items()
                 if name not in ("concept", "anchor")}
JOB_FIELDS = {"name", "output", "model", "config", "allow_pickle", "concept", "images", "anchor", "concepts",
              "apply", "export", *SETTING_TYPES}
CONCEPT_GROUP = ("concept", "images", "anchor", "concepts")
APPLY_FIELDS = {"checkpoint", "output", "force", "allow_pickle"}
EXPORT_FIELDS = {"format", "output", "rank", "model"}


@dataclass(frozen=True)
class FollowUp:
    """What is done with a job's erase output once it exists: `apply` it to a checkpoint, or `export` it."""

    kind: str  # "apply" | "export"
    output: Path
    options: dict  # apply: checkpoint, force, allow_pickle; export: fmt, rank, model


@dataclass(frozen=True)
class Job:
    number: int  # 1-based position in the manifest: the job's identity in results.jsonl and in --shard
    line: int  # where the job starts in the manifest
    name: str  # default: the output's name
    specs: tuple[ConceptSpec, ...]
    output: Path
    model: str | None  # None: the embedded demo
    settings: dict  # EraseSettings fields the job chose
    loading: dict  # erase_concepts's config and allow_pickle, where given
    follow_ups: tuple[FollowUp, ...] = ()

    @property
    def where(self) -> str:
        return f"line {self.line} (job {self.number})"


class _Located(dict):
    """A mapping from the manifest, with the line it starts on and each key's line."""

    def __init__(self, data=(), line: int = 1, key_lines: dict | None = None):
        super().__init__(data)
        self.line, self.key_lines = line, key_lines or {}

    def line_of(self, key) -> int:
        return self.key_lines.get(key, self.line)


@dataclass(frozen=True)
class _Place:
    """Where in the manifest a job is: every problem found in it is raised through `problem`."""

    manifest: str
    number: int

    def problem(self, entry: _Located, field: str, text: str) -> BadInput:
        return BadInput(f"manifest {self.manifest}, line {entry.line_of(field)} (job {self.number}), "
                        f"field {field!r}: {text}")


def read_jobs(path: str | Path) -> list[Job]:
    """Every job of the manifest at `path`, checked alone and against each other; BadInput on the first problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise BadInput(f"cannot read manifest {path}: {reason}; check the path") from None
    entries, defaults = _parse(path, text)
    folder = Path(os.path.abspath(path.parent))
    jobs = [_job(_Place(path.name, number), folder, entry, defaults) for number, entry in enumerate(entries, start=1)]
    check_paths(path.name, jobs)
    return jobs


def _parse(path: Path, text: str) -> tuple[list[_Located], _Located]:
    """The job mappings and the defaults mapping (YAML only: `{defaults: {...}, jobs: [...]}`)."""
    defaults = _Located()
    if path.suffix.lower() == ".jsonl":
        document = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise BadInput(f"manifest {path.name}, line {number}: not valid JSON ({error.msg}, column "
                               f"{error.colno}); write one job object per line") from None
            document.append(_Located(entry, number) if isinstance(entry, dict) else entry)
    else:
        document = _load_yaml(path, text)
        if isinstance(document, dict):
            unknown = sorted(set(document) - {"defaults", "jobs"}, key=str)
            if unknown:
                raise BadInput(f"manifest {path.name}, line {document.line_of(unknown[0])}: unknown key "
                               f"{unknown[0]!r}; the top level holds 'jobs' and optionally 'defaults'")
            defaults = document.get("defaults") or _Located()
            if not isinstance(defaults, dict):
                raise BadInput(f"manifest {path.name}, line {document.line_of('defaults')}: 'defaults' must be a "
                               "mapping of job fields")
            _check_fields(path.name, defaults, JOB_FIELDS, "the defaults")
            document = document.get("jobs")
    if not isinstance(document, list) or not document:
        raise BadInput(f"manifest {path.name} holds no jobs; write a list of jobs (or 'jobs:' with one), each with "
                       "'concept', 'images' and 'output'")
    for number, entry in enumerate(document, start=1):
        if not isinstance(entry, dict):
            raise BadInput(f"manifest {path.name}, job {number}: not a mapping; write each job as fields "
                           "(concept: ..., images: ..., output: ...)")
    return document, defaults


def _load_yaml(path: Path, text: str):
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node):
        key_lines = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys may be overridden
                continue
            key = loader.construct_object(key_node, deep=True)
            if key in key_lines:
                raise BadInput(f"manifest {path.name}, line {key_node.start_mark.line + 1}: the key {key!r} is given "
                               f"twice in one mapping (first on line {key_lines[key]}); keep one")
            key_lines[key] = key_node.start_mark.line + 1
        loader.flatten_mapping(node)
        return _Located(loader.construct_mapping(node, deep=True), node.start_mark.line + 1, key_lines)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        return yaml.load(text, Loader=Loader)  # a SafeLoader: plain data only, no tags that build objects
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise BadInput(f"manifest {path.name} is not valid YAML ({at}{problem}); fix its syntax") from None


def _check_fields(manifest: str, entry: _Located, allowed: set, what: str, number: int | None = None) -> None:
    unknown = sorted(set(entry) - allowed, key=str)
    if unknown:
        key = unknown[0]
        job = f" (job {number})" if number else ""
        raise BadInput(f"manifest {manifest}, line {entry.line_of(key)}{job}: unknown field {key!r} for {what}; "
                       f"allowed are {', '.join(sorted(allowed))}")


def _job(place: _Place, folder: Path, entry: _Located, defaults: _Located) -> Job:
    _check_fields(place.manifest, entry, JOB_FIELDS, "a job", place.number)
    if "concept" in entry or "concepts" in entry:  # a job naming its concepts takes none of the defaults' ones
        kept = {key: value for key, value in defaults.items() if key not in CONCEPT_GROUP}
        defaults = _Located(kept, defaults.line, defaults.key_lines)
    job = _Located({**defaults, **entry}, entry.line, {**{k: defaults.line_of(k) for k in defaults}, **entry.key_lines})
    if "output" not in job:
        raise BadInput(f"manifest {place.manifest}, line {job.line} (job {place.number}): no 'output'; "
                       "give the folder the erase writes")
    paths = _Paths(place, folder)
    output = paths.path(job, "output")
    specs = _specs(place, paths, job)
    settings = _settings(place, job)
    loading = {}
    if "config" in job:
        loading["config"] = str(paths.path(job, "config"))
    if "allow_pickle" in job:
        loading["allow_pickle"] = _typed(place, job, "allow_pickle", bool)
    model = paths.model(job, "model") if job.get("model") is not None else None
    follow_ups = (tuple(_apply(place, paths, item) for item in _listed(place, job, "apply"))
                  + tuple(_export(place, paths, item) for item in _listed(place, job, "export")))
    name = _typed(place, job, "name", str) if "name" in job else output.name
    return Job(place.number, job.line, name, specs, output, model, settings, loading, follow_ups)


@dataclass(frozen=True)
class _Paths:
    """Paths in the manifest are relative to its folder."""

    place: _Place
    folder: Path

    def path(self, entry: _Located, field: str, value=None) -> Path:
        value = entry[field] if value is None else value
        if not isinstance(value, str) or not value.strip():
            raise self.place.problem(entry, field, f"must be a path, got {value!r}")
        return Path(os.path.abspath(self.folder / Path(value).expanduser()))

    def model(self, entry: _Located, field: str) -> str:
        """A path (one that exists beside the manifest, or is written as a path) or a Hub id, as `--model` takes it."""
        value = entry[field]
        if not isinstance(value, str) or not value.strip():
            raise self.place.problem(entry, field, "must be a diffusers folder, a .safetensors file or a Hub id")
        path_like = value.startswith((".", "/", "~")) or "/" not in value.strip("/")
        if path_like or (self.folder / value).exists() or not HUB_ID.match(value):
            return str(self.path(entry, field))
        return value


def _typed(place: _Place, entry: _Located, field: str, kind: type):
    value = entry[field]
    if not _fits(value, kind):
        raise place.problem(entry, field, f"must be {_describe(kind)}, got {value!r}")
    return value


def _specs(place: _Place, paths: _Paths, job: _Located) -> tuple[ConceptSpec, ...]:
    if "concepts" in job:
        if any(key in job for key in ("concept", "images", "anchor")):
            raise place.problem(job, "concepts", "give either 'concept' and 'images' or 'concepts', not both")
        listed = job["concepts"]
        if isinstance(listed, str):  # the file `erase --manifest` reads
            try:
                return tuple(read_manifest(paths.path(job, "concepts")))
            except BadInput as error:
                raise place.problem(job, "concepts", str(error)) from None
        if not isinstance(listed, list) or not listed:
            raise place.problem(job, "concepts", "must be a list of {concept, images, style, anchor}, or the path of "
                                "a file of them as `erase --manifest` reads")
        if not all(isinstance(item, dict) for item in listed):
            raise place.problem(job, "concepts", "each concept is a mapping {concept: ..., images: ...}")
        return tuple(_spec(place, paths, item) for item in listed)
    if "concept" not in job:
        raise BadInput(f"manifest {place.manifest}, line {job.line} (job {place.number}): no concept; name the concept "
                       "to erase ('concept' and 'images', or 'concepts')")
    return (_spec(place, paths, _Located({k: job[k] for k in CONCEPT_FIELDS if k in job}, job.line, job.key_lines)),)


def _spec(place: _Place, paths: _Paths, item: _Located) -> ConceptSpec:
    """One concept as `erase --manifest` takes it: {concept, images, style?, anchor?}."""
    unknown = sorted(set(item) - CONCEPT_FIELDS, key=str)
    if unknown:
        raise place.problem(item, unknown[0],
                            f"unknown field for a concept; allowed are {', '.join(sorted(CONCEPT_FIELDS))}")
    for required in CONCEPT_REQUIRED:
        if required not in item:
            raise BadInput(f"manifest {place.manifest}, line {item.line} (job {place.number}): concept without "
                           f"{required!r}; every concept needs 'concept' and 'images' (a folder or files of its "
                           "pictures)")
    images = item["images"] if isinstance(item["images"], list) else [item["images"]]
    if not images:
        raise place.problem(item, "images", "is empty; give a folder or files of the concept's pictures")
    resolved = tuple(str(paths.path(item, "images", image)) for image in images)
    names = {}
    for field in ("concept", "anchor"):  # written as the record writes them, so the skip check compares like with like
        if field == "concept" or item.get(field) is not None:
            text = _typed(place, item, field, str)
            try:
                names[field] = check_concept(text)
            except BadInput as error:
                raise place.problem(item, field, str(error)) from None
    style = _typed(place, item, "style", bool) if "style" in item else False
    return ConceptSpec(names["concept"], resolved, style, names.get("anchor"))


def _settings(place: _Place, job: _Located) -> dict:
    """The job's EraseSettings fields, typed and checked the way `erase` checks its options."""
    chosen = {}
    for name, hint in SETTING_TYPES.items():
        if name not in job:
            continue
        value = job[name]
        if name == "until" and value == "steps":  # as `erase --until steps`: run every step
            value = None
        if not _fits(value, hint):
            raise place.problem(job, name, f"must be {_describe(hint)}, got {value!r}")
        value = tuple(value) if isinstance(value, list) else value
        try:
            if name == "templates" and value is not None:
                check_templates(value)
            EraseSettings(concept="check", **{name: value})
        except BadInput as error:
            raise place.problem(job, name, str(error)) from None
        chosen[name] = value
    if chosen.get("steps") is not None and chosen.get("epochs") is not None:  # as erase refuses --steps with --epochs
        raise place.problem(job, "epochs", "steps and epochs both set the run's length; give one (in the job or its defaults)")
    return chosen


def _fits(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return any(_fits(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(item, args[0]) for item in value)
        return len(value) == len(args) and all(_fits(item, arg) for item, arg in zip(value, args))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union:
        return " or ".join(_describe(arg) for arg in args)
    if typing.get_origin(hint) is tuple:
        return f"a list of {_describe(args[0])}"
    names = {float: "a number", int: "a whole number", bool: "true or false", str: "text", type(None): "null"}
    return names.get(hint, str(hint))


def _listed(place: _Place, job: _Located, field: str) -> list[_Located]:
    value = job.get(field, [])
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(item, dict) for item in items):
        raise place.problem(job, field, "must be a mapping, or a list of them, each with 'output'")
    return items


def _follow_up_fields(place: _Place, item: _Located, kind: str, allowed: set, required: tuple[str, str],
                      why: str) -> None:
    unknown = sorted(set(item) - allowed, key=str)
    if unknown:
        raise place.problem(item, unknown[0], f"unknown field for {kind}; allowed are {', '.join(sorted(allowed))}")
    for field in required:
        if field not in item:
            raise BadInput(f"manifest {place.manifest}, line {item.line} (job {place.number}): {kind} without "
                           f"{field!r}; {why}")


def _apply(place: _Place, paths: _Paths, item: _Located) -> FollowUp:
    _follow_up_fields(place, item, "apply", APPLY_FIELDS, ("checkpoint", "output"),
                      "apply needs the checkpoint to patch and the output to write")
    checkpoint, output = paths.path(item, "checkpoint"), paths.path(item, "output")
    options = {"checkpoint": str(checkpoint),
               "force": _typed(place, item, "force", bool) if "force" in item else False,
               "allow_pickle": _typed(place, item, "allow_pickle", bool) if "allow_pickle" in item else False}
    # as apply decides, before any job runs: a single file is patched into a .safetensors file, a folder into a folder
    one_file = checkpoint.is_file() or not checkpoint.exists() and checkpoint.suffix.lower() in (".safetensors",) + PICKLE_SUFFIXES
    if one_file != (output.suffix.lower() == ".safetensors"):
        raise place.problem(item, "output", f"{item['output']} must {'' if one_file else 'not '}end in .safetensors: "
                                            f"a {'single-file checkpoint' if one_file else 'pipeline folder'} is "
                                            f"patched into a {'.safetensors file' if one_file else 'folder'}")
    return FollowUp("apply", output, options)


def _export(place: _Place, paths: _Paths, item: _Located) -> FollowUp:
    _follow_up_fields(place, item, "export", EXPORT_FIELDS, ("format", "output"),
                      f"export needs a format ({', '.join(EXPORT_FORMATS)}) and the file to write")
    if item["format"] not in EXPORT_FORMATS:
        raise place.problem(item, "format",
                            f"unknown format {item['format']!r}; use one of {', '.join(EXPORT_FORMATS)}")
    rank = item.get("rank")
    if rank is not None and not (_fits(rank, int) and rank >= 1):
        raise place.problem(item, "rank", f"must be a whole number of at least 1, got {rank!r}")
    if rank is not None and not item["format"].startswith("lora"):
        raise place.problem(item, "rank", f"sets a LoRA's rank, and {item['format']} is no LoRA; leave it out")
    output = paths.path(item, "output")
    if (output.suffix.lower() == ".safetensors") == (item["format"] == "drop-in"):
        raise place.problem(item, "output", f"the export {'folder' if item['format'] == 'drop-in' else 'file'} "
                                            f"{item['output']} must {'not ' if item['format'] == 'drop-in' else ''}end in .safetensors")
    model = paths.model(item, "model") if item.get("model") is not None else None
    return FollowUp("export", output, {"fmt": item["format"], "rank": rank, "model": model})


def job_outputs(job: Job) -> list[Path]:
    return [job.output, *(follow_up.output for follow_up in job.follow_ups)]


def job_inputs(job: Job) -> list[Path]:
    """The paths a job reads, except its own erase output (which its follow-ups read by design)."""
    paths = [Path(image) for spec in job.specs for image in spec.images]
    paths += [Path(job.model)] if job.model and Path(job.model).is_absolute() else []
    paths += [Path(job.loading["config"])] if "config" in job.loading else []
    for follow_up in job.follow_ups:
        for key in ("checkpoint", "model"):
            value = follow_up.options.get(key)
            if value and Path(value).is_absolute():
                paths.append(Path(value))
    return paths


def check_paths(manifest: str, jobs: list[Job]) -> None:
    """No two jobs write the same path, and no output is, holds or sits inside a path any job reads or another
    output: jobs run in any order and at once, so such a pair would clobber or delete the other's work."""
    outputs: dict[Path, Job] = {}
    for job in jobs:
        for output in job_outputs(job):
            key = output.resolve()
            if key in outputs:
                raise BadInput(f"manifest {manifest}, {job.where}: output {output} is also written by "
                               f"{outputs[key].where}; give each job its own output")
            outputs[key] = job
    inputs = {path.resolve(): job for job in jobs for path in job_inputs(job)}
    for output, job in outputs.items():
        if output in inputs:
            raise BadInput(f"manifest {manifest}, {job.where}: output {output} is an input of {inputs[output].where}; "
                           "write it somewhere else")
        for parent in output.parents:
            if parent in inputs:
                raise BadInput(f"manifest {manifest}, {job.where}: output {output} is inside {parent}, an input of "
                               f"{inputs[parent].where}; write it somewhere else")
            if parent in outputs:
                raise BadInput(f"manifest {manifest}, {job.where}: output {output} is inside {parent}, the output of "
                               f"{outputs[parent].where}; write it somewhere else")
    for path, job in inputs.items():
        for parent in path.parents:
            if parent in outputs:
                raise BadInput(f"manifest {manifest}, {job.where}: its input {path} is inside {parent}, the output "
                               f"of {outputs[parent].where}, which writing that output would replace; keep inputs "
                               "apart from outputs")


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N`, 1 <= I <= N."""
    index, sep, count = text.partition("/")
    try:
        index, count = int(index), int(count)
    except ValueError:
        raise BadInput(f"--shard {text!r} must be I/N, e.g. --shard 1/4 for the first of four slices") from None
    if not sep or count < 1 or not 1 <= index <= count:
        raise BadInput(f"--shard {text} is out of range; I must be between 1 and N, e.g. --shard 1/{max(count, 2)}")
    return index, count


def shard(jobs: list[Job], index: int, count: int) -> list[Job]:
    """The I-th of N slices: every N-th job from the I-th on. A job keeps its slice when jobs are appended to the
    manifest, and the N slices together hold every job exactly once."""
    return [job for job in jobs if (job.number - 1) % count == index - 1]
