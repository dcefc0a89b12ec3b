"""The versions the suite is run with sit inside the ranges setup.cfg declares: constraints.txt (CI's) and
constraints-newest.txt inside them, constraints-oldest.txt at their lower bounds (README, Install)."""

import configparser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def declared() -> dict[str, Requirement]:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    lines = config["options"]["install_requires"].splitlines() + config["options.extras_require"]["test"].splitlines()
    requirements = [Requirement(line) for line in lines if line.strip() and not line.strip().startswith("#")]
    return {canonicalize_name(r.name): r for r in requirements}


def pinned(name: str) -> dict[str, Version]:
    lines = (REPO / name).read_text().splitlines()
    pins = [line.split("==") for line in lines if line.strip() and not line.startswith("#")]
    return {canonicalize_name(package): Version(version) for package, version in pins}


@pytest.mark.parametrize("constraints", ["constraints.txt", "constraints-newest.txt", "constraints-oldest.txt"])
def test_every_pinned_dependency_is_inside_its_declared_range(constraints):
    ranges = declared()
    outside = {name: str(version) for name, version in pinned(constraints).items()
               if name in ranges and version not in ranges[name].specifier}
    assert not outside


def test_the_oldest_set_is_every_lower_bound():
    lower = {name: Version(spec.version) for name, requirement in declared().items()
             for spec in requirement.specifier if spec.operator == ">="}
    oldest = pinned("constraints-oldest.txt")
    oldest.pop("tokenizers")  # not ours to bound: the release transformers 5.24 resolved to
    assert oldest == lower
