"""Every command, script, ``make`` target, console script and file the Markdown pages name exists.

The pages are README.md, docs/*.md and benchmarks/README.md. Only code is read: fenced blocks and inline
code spans. Each ``python -m MODULE`` and each named script must answer ``--help`` with exit code 0; to stay
fast, one subprocess runs every ``--help`` in turn (the imports they share are paid once), and whatever
fails there is run again alone, so only a command that fails by itself fails the test.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]
# Where a repo-relative path in backticks starts; paths elsewhere (results/trials.csv) are the user's.
TOP_LEVEL = ("mri_models/", "ray_jobs/", "sweeps/", "analysis/", "tests/", "benchmarks/", "docs/")
ROOT_FILES = {"Makefile", "pyproject.toml", "cluster.yaml", "README.md"}
PLACEHOLDER = re.compile(r"[<>*$\[\]{}]|\.\.\.")  # <study>, $EXP, *.h5: a pattern, not a file
# Modules whose command takes no arguments: `--help` would run it (here: connect to a Ray cluster), so they
# only have to be importable.
NO_ARGUMENTS = {"ray_jobs.cli"}

MODULE = re.compile(r"(?<![\w.])python3? -m ([A-Za-z_][\w.]*\w)")
SCRIPT = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.py)\b")
MAKE = re.compile(r"(?<![\w/-])make ([a-z][\w-]*)")
CONSOLE = re.compile(r"^mri-[a-z][\w-]*")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")

# Runs ``--help`` of each target (a module name, or a script path) in this one process and prints, as JSON,
# {target: exit code}. Output of the commands themselves goes to a buffer. A script sees its own directory
# first on sys.path, as under ``python path.py``.
HELP_RUNNER = r"""
import contextlib, io, json, os, runpy, sys
codes = {}
for target in json.loads(sys.argv[1]):
    script = target.endswith(".py")
    sys.argv = [target, "--help"]
    sys.path[0] = os.path.dirname(os.path.abspath(target)) if script else os.getcwd()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            (runpy.run_path if script else runpy.run_module)(target, run_name="__main__")
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:
        code = 1
    codes[target] = code if "usage:" in out.getvalue() else code or 1
sys.stdout = sys.__stdout__
print(json.dumps(codes))
"""


@dataclass
class Named:
    """What the pages name, each with the pages that name it."""

    modules: dict[str, set[str]] = field(default_factory=dict)
    scripts: dict[str, set[str]] = field(default_factory=dict)
    run_as_scripts: set[str] = field(default_factory=set)  # ``python path.py``, sweeps' and benchmarks'
    make_targets: dict[str, set[str]] = field(default_factory=dict)
    console_scripts: dict[str, set[str]] = field(default_factory=dict)
    paths: dict[str, set[str]] = field(default_factory=dict)


def code_of(text: str) -> list[str]:
    """The page's code: each line of its fenced blocks, then each inline code span outside them."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)
    return [line for block in fenced for line in block.splitlines()] + re.findall(r"`([^`\n]+)`", prose)


def _add(table: dict[str, set[str]], key: str, page: str) -> None:
    table.setdefault(key, set()).add(page)


def _is_repo_path(span: str) -> bool:
    return (span.startswith(TOP_LEVEL) or span in ROOT_FILES) and not PLACEHOLDER.search(span)


@cache
def named() -> Named:
    found = Named()
    for page in PAGES:
        name = page.relative_to(REPO).as_posix()
        for code in code_of(page.read_text(encoding="utf-8")):
            code = code.strip()
            for module in MODULE.findall(code):
                _add(found.modules, module, name)
            for script in SCRIPT.findall(code):
                invoked = re.search(rf"python3? {re.escape(script)}", code) is not None
                if "/" in script or invoked:
                    _add(found.scripts, script, name)
                if invoked or script.startswith(("sweeps/", "benchmarks/")):
                    found.run_as_scripts.add(script)
            for target in MAKE.findall(code):
                _add(found.make_targets, target, name)
            if console := CONSOLE.match(code):
                _add(found.console_scripts, console.group(0), name)
            path = code.rstrip(".,:;").split(":")[0]  # ray_jobs/data.py:prepare_data names the file
            if " " not in code and _is_repo_path(path):
                _add(found.paths, path, name)
    return found


def _script_path(script: str) -> Path | None:
    path = REPO / script
    return path if path.is_file() else None


def _has_command_line(path: Path) -> bool:
    """A script to run (``sweeps/sweep_command.py`` is the sweeps' shared module, not one)."""
    return re.search(r"^if __name__ == .__main__.:", path.read_text(encoding="utf-8"), flags=re.M) is not None


def _help_scripts() -> list[str]:
    """The named scripts whose ``--help`` must work, as repo-relative paths."""
    paths = [_script_path(script) for script in named().run_as_scripts]
    return sorted(p.relative_to(REPO).as_posix() for p in paths if p is not None and _has_command_line(p))


@cache
def help_exit_codes() -> dict[str, int]:
    """``--help``'s exit code of every named module and script: all in one process, failures alone."""
    targets = sorted(set(named().modules) - NO_ARGUMENTS) + _help_scripts()
    run = [sys.executable, "-c", HELP_RUNNER, json.dumps(targets)]
    done = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=240)
    lines = done.stdout.strip().splitlines()
    codes = json.loads(lines[-1]) if done.returncode == 0 and lines else dict.fromkeys(targets, 1)
    for target in [t for t, code in codes.items() if code != 0]:
        alone = [sys.executable, target] if target.endswith(".py") else [sys.executable, "-m", target]
        again = subprocess.run([*alone, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
        codes[target] = again.returncode if "usage:" in again.stdout else again.returncode or 1
    return codes


def _where(table: dict[str, set[str]], key: str) -> str:
    return ", ".join(sorted(table[key]))


def test_the_pages_name_commands_at_all():
    # The extraction itself: the README's own commands are found, so an empty match cannot pass silently.
    found = named()
    assert {"test", "demo", "study"} <= set(found.make_targets)
    assert "analysis.study_report" in found.modules and "sweeps/gamma_sweep.py" in found.scripts
    assert "mri-train" in found.console_scripts and "ray_jobs/tune.py" in found.paths


def test_every_python_module_answers_help():
    codes, modules = help_exit_codes(), named().modules
    failed = [f"python -m {m} ({_where(modules, m)})" for m in modules if codes.get(m, 0) != 0]
    missing = [m for m in NO_ARGUMENTS & set(modules) if importlib.util.find_spec(m) is None]
    failed += [f"{m} ({_where(modules, m)})" for m in missing]
    assert not failed, "--help fails or the module is missing: " + "; ".join(failed)


def test_every_script_exists_and_answers_help():
    codes, scripts = help_exit_codes(), named().scripts
    problems = [f"{s} does not exist ({_where(scripts, s)})" for s in sorted(scripts) if not _script_path(s)]
    problems += [f"python {s} --help fails ({_where(scripts, s)})" for s in _help_scripts() if codes[s] != 0]
    assert not problems, "; ".join(problems)


def test_every_make_target_exists():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", makefile, flags=re.M))
    named_targets = named().make_targets
    missing = [f"make {t} ({_where(named_targets, t)})" for t in named_targets if t not in targets]
    assert not missing, "not a Makefile target: " + "; ".join(missing)


def test_every_console_script_is_installed():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    found = named().console_scripts
    missing = [f"{name} ({_where(found, name)})" for name in found if name not in scripts]
    assert not missing, "not in pyproject.toml's [project.scripts]: " + "; ".join(missing)


def test_every_file_in_backticks_exists():
    found = named().paths
    missing = [f"{path} ({_where(found, path)})" for path in sorted(found) if not (REPO / path).exists()]
    assert not missing, "no such file in the repository: " + "; ".join(missing)


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(REPO).as_posix() for p in PAGES])
def test_every_local_link_resolves(page):
    text = re.sub(r"^```[^\n]*\n.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    local = [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]
    missing = [target for target in local if not (page.parent / target).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"
