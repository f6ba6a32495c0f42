"""The lock CI installs from is the one the README's commands install from, and it satisfies pyproject's ranges."""

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    """The fenced one-line bash commands at the top of the README (set up + serve, set up + test)."""
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())[:2]


def locked_versions() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_ci_runs_the_readme_test_command_verbatim():
    serve, test = readme_commands()
    assert serve.endswith("optiserve serve --model default") and test.endswith("python -m pytest -q")
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci_lines


def test_every_pip_install_reads_the_lock():
    for command in [*readme_commands(), (ROOT / ".ci" / "run").read_text()]:
        installs = re.findall(r"pip install[^&\n]*", command)
        assert installs and all("-c constraints.txt" in i for i in installs), command


def test_lock_pins_every_dependency_within_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = locked_versions()
    for spec in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in constraints.txt"
        assert req.specifier.contains(pins[name]), f"{req.name}=={pins[name]} is outside {req.specifier}"
