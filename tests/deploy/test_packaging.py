"""Every code folder is a package the wheel ships: an editable install finds sub-packages through the folders, a
real install (pip install ., the Docker images) only those pyproject lists."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_every_code_folder_is_a_listed_package():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    folders = set()
    for top, name in ((folder, f"optiserve.{folder}") for folder in ("server", "engine", "kernels", "optimize")):
        assert setuptools["package-dir"][name] == top
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            folders.add(".".join([name, *rel.parts]))
    assert folders <= listed, f"not in pyproject's packages: {sorted(folders - listed)}"
