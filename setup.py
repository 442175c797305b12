"""Package discovery for the package-dir mapping of pyproject.toml: every package under each mapped folder.

setuptools' own `packages.find` cannot prefix what it finds under `agent/` with `gradwatch.agent`, and a
hand-kept list forgets new subpackages; everything else about the build lives in pyproject.toml.
"""

import tomllib
from pathlib import Path

from setuptools import find_packages, setup

ROOTS = tomllib.loads((Path(__file__).parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


def discover(roots: dict[str, str]) -> list[str]:
    """Each mapped package and every subpackage below its folder, under the mapped name."""
    found = []
    for name, folder in roots.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(folder) if f"{name}.{sub}" not in roots]
    return found


setup(packages=discover(ROOTS))
