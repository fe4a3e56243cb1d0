#!/usr/bin/env python3
"""mypy and import-linter over the stepstream package as it installs. ./dev lint runs both.

    .ci/lint_package.py mypy [MYPY OPTIONS...]     # options from pyproject.toml's [tool.mypy]
    .ci/lint_package.py imports                    # the contracts in [tool.importlinter]

pyproject.toml maps the top-level server/, tasks/ and static/ into the package
(``[tool.setuptools] package-dir``): ``stepstream.server.app`` lives in ``server/app.py``. Neither
tool can follow that mapping. Both find a package by its folder on ``sys.path`` and name its
modules after the folders below it; the editable install maps ``stepstream.server`` with an
import hook, which they do not run; and setuptools' ``editable_mode=strict`` builds a tree of links
under build/ that mypy takes for an installed package (skipped, and reported under the link's
path) and that tracebacks would name instead of the file being edited. So this script reads the
mapping from the two tables setuptools uses and hands it over:

- to mypy, every file with its module name: it checks ``server/app.py`` as
  ``stepstream.server.app`` and reports errors at ``server/app.py``;
- to import-linter, a copy of the package as the wheel lays it out, in a temporary folder: it
  reads the imports there and reports violations by module name and line (the docs build
  hands mkdocstrings the same copy, ``write_tree``).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_modules(root: Path = ROOT) -> dict[str, str]:
    """Each Python file of the packages pyproject.toml lists (its path relative to ``root``) and
    the module name it installs as."""
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir: dict[str, str] = setuptools.get("package-dir", {})
    modules: dict[str, str] = {}
    for package in setuptools["packages"]:
        # As setuptools does: the longest mapped package that contains this one names its folder.
        mapped = [name for name in package_dir if package == name or package.startswith(name + ".")]
        if mapped:
            parent = max(mapped, key=len)
            folder = Path(package_dir[parent], *package.split(".")[parent.count(".") + 1 :])
        else:
            folder = Path(*package.split("."))
        for file in sorted((root / folder).glob("*.py")):
            name = package if file.stem == "__init__" else f"{package}.{file.stem}"
            modules[file.relative_to(root).as_posix()] = name
    return modules


def write_tree(tree: Path, root: Path = ROOT) -> None:
    """Copy the package's Python files into ``tree`` as the wheel lays them out, for tools that
    read packages from folders (import-linter here; mkdocstrings in docs/site_hooks.py)."""
    for path, module in package_modules(root).items():
        parts = module.split(".")
        dest = Path(tree, *parts, "__init__.py") if path.endswith("/__init__.py") else None
        dest = dest or Path(tree, *parts[:-1], parts[-1] + ".py")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / path, dest)


def mypy(argv: list[str]) -> int:
    from mypy import util
    from mypy.fscache import FileSystemCache
    from mypy.main import process_options, run_build
    from mypy.modulefinder import BuildSource

    started = time.time()
    modules = package_modules()
    os.chdir(ROOT)
    fscache = FileSystemCache()
    # mypy's own option parsing (pyproject.toml, then argv); only the module names are ours.
    sources, options = process_options([*argv, *modules], fscache=fscache)
    sources = [BuildSource(source.path, modules[str(source.path)]) for source in sources]
    _, messages, blockers = run_build(sources, options, fscache, started, sys.stdout, sys.stderr)
    formatter = util.FancyFormatter(sys.stdout, sys.stderr, options.hide_error_codes)
    errors, _, files = util.count_stats(messages)
    if errors:
        print(formatter.format_error(errors, files, len(sources), blockers=blockers))
        return 2 if blockers else 1
    print(formatter.format_success(len(sources)))
    return 0


def imports(argv: list[str]) -> int:
    from importlinter.cli import lint_imports

    if argv:
        print("lint_package.py imports takes no options", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="stepstream-imports-") as tree:
        write_tree(Path(tree))
        # lint-imports looks packages up from its working directory first: the copy of
        # stepstream there, then bench/ and tests/ from this checkout.
        sys.path.append(str(ROOT))
        os.chdir(tree)
        config = str(ROOT / "pyproject.toml")
        return lint_imports(config_filename=config, no_cache=True, no_logo=True)


if __name__ == "__main__":
    commands = {"mypy": mypy, "imports": imports}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(commands[sys.argv[1]](sys.argv[2:]))
