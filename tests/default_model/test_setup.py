"""The README's first command runs scripts/setup.sh, which installs this checkout from pyproject.toml."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_the_licence_is_an_spdx_string_that_the_build_backend_reads():
    """`license = {text = ...}` made every setup.sh run print setuptools' 14-line deprecation warning (tables
    stop being accepted on 2027-02-18); PEP 639's SPDX string needs setuptools 77 or later to build."""
    data = tomllib.loads(PYPROJECT.read_text())
    assert data["project"]["license"] == "Apache-2.0"
    (requirement,) = [r for r in data["build-system"]["requires"] if r.startswith("setuptools")]
    floor = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", requirement)
    assert floor and int(floor.group(1)) >= 77, requirement
