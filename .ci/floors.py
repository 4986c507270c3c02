"""pip constraints that pin every dependency pyproject.toml names to the oldest version it says it supports.

CI installs the project under them and runs the whole suite, so a floor that pyproject states is a floor that is
tested: raise one there and this run follows. Left to the resolver: numpy and tokenizers, whose floors CI tests
apart (transformers wants a newer tokenizers, and pyarrow, under Ray Data, a newer numpy; neither says so to pip),
and anything pinned exactly already (torch). Added: bounds a floor needs that its package does not declare.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

TESTED_APART = {"numpy", "tokenizers"}
# Ray before 2.57 reads FieldDescriptor.label, which protobuf 7 removed (Serve fails to deploy), and does not say so
UNDECLARED = {"protobuf": "<7"}


def floors(pyproject: Path) -> dict[str, str]:
    """Each named dependency's lowest supported version (its >= bound), by name."""
    project = tomllib.loads(pyproject.read_text())["project"]
    lowest: dict[str, str] = {}
    for spec in [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]:
        requirement = Requirement(spec)
        if requirement.name == project["name"] or requirement.name in TESTED_APART:
            continue
        bounds = [s.version for s in requirement.specifier if s.operator == ">="]
        if bounds:
            lowest[requirement.name] = bounds[0]
    return lowest


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parents[1] / "pyproject.toml"
    print("\n".join([*(f"{name}=={version}" for name, version in sorted(floors(path).items())),
                     *(f"{name}{bound}" for name, bound in UNDECLARED.items())]))
