"""The extras a user types resolve to exactly one onnxruntime package, and a broken install is named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import onnxgen
from onnxgen.errors import ProviderError
from onnxgen.runtime import onnxruntime_conflict

ROOT = Path(__file__).parents[1]


EXTRAS = [
    ("cpu", {"onnxruntime"}), ("gpu", {"onnxruntime-gpu"}),
    ("cpu,export", {"onnxruntime"}), ("gpu,export", {"onnxruntime-gpu"}),
    ("export", set()),  # export needs cpu or gpu beside it; the CLI says so
    ("gpu,export,bench,serve,ray,test", {"onnxruntime-gpu"}),  # the README's GPU install line
]
EMBEDDING = (str(ROOT), "onnxruntime>=1.31,<1.33")  # `pip install onnxgen onnxruntime`


@pytest.fixture(scope="module")
def resolve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., set[str]]]:
    """resolve(*requirements): the names of what pip's resolver on the real index would install (as a user's
    `pip install ".[gpu,export]"`), nothing installed. Every resolution this module asks for starts at once, each in a
    pip of its own: pip spends them downloading wheels whole (GBs for the CUDA ones), two minutes one after another."""
    wanted = [(f"{ROOT}[{extras}]",) for extras, _ in EXTRAS] + [EMBEDDING]
    reports = tmp_path_factory.mktemp("pip-reports")

    def names(i: int, requirements: tuple[str, ...]) -> set[str]:
        report = reports / f"{i}.json"
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                            "--report", str(report), *requirements], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        return {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}

    with ThreadPoolExecutor(len(wanted)) as pool:
        resolutions = {requirements: pool.submit(names, i, requirements) for i, requirements in enumerate(wanted)}
        yield lambda *requirements: resolutions[requirements].result()


@pytest.mark.parametrize(("extras", "expected"), EXTRAS)
def test_extras_resolve_to_one_onnxruntime(extras: str, expected: set[str], resolve: Callable[..., set[str]]) -> None:
    assert resolve(f"{ROOT}[{extras}]") & {"onnxruntime", "onnxruntime-gpu"} == expected


def _resolves(requirement: str, python: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """pip's resolver for a user on another Python (wheels only, as pip takes them for another interpreter)."""
    return subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--python-version", python,
                           "--only-binary=:all:", "--target", str(tmp_path / python), requirement], capture_output=True, text=True)


def test_requires_python_is_the_oldest_python_onnxruntime_has_wheels_for(tmp_path: Path) -> None:
    """onnxruntime 1.31 and 1.32 have no wheels for Python 3.10, so onnxgen's metadata starts at 3.11: pip then tells a
    3.10 user which Python onnxgen needs, not that it found no onnxruntime (3.11 installs: the test above). A current pip
    (the README's install upgrades it): Python 3.11's own pip 23.2 answers "no matching distribution" for onnxgen too."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    onnxruntime = project["optional-dependencies"]["cpu"][0]
    assert project["requires-python"] == ">=3.11" and onnxruntime.startswith("onnxruntime>=")
    assert "No matching distribution found for onnxruntime" in _resolves(onnxruntime, "3.10", tmp_path).stderr
    assert "requires a different Python: 3.10.0 not in '>=3.11'" in _resolves(f"{ROOT}[cpu]", "3.10", tmp_path).stderr


def _dist_info(folder: Path, name: str, version: str) -> None:
    info = folder / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_both_onnxruntimes_in_one_folder_are_refused(tmp_path: Path) -> None:
    _dist_info(tmp_path / "site", "onnxruntime", "1.32.0")
    _dist_info(tmp_path / "site", "onnxruntime-gpu", "1.31.1")
    message = onnxruntime_conflict([str(tmp_path / "site")])
    assert message and "overwrite each other" in message and "pip uninstall -y onnxruntime onnxruntime-gpu" in message
    # One shadowing the other from another folder (a --target install on PYTHONPATH) is a working install.
    _dist_info(tmp_path / "gpu", "onnxruntime-gpu", "1.31.1")
    _dist_info(tmp_path / "cpu", "onnxruntime", "1.32.0")
    assert onnxruntime_conflict([str(tmp_path / "gpu"), str(tmp_path / "cpu")]) is None
    assert onnxruntime_conflict(None) is None  # this environment: one onnxruntime
    # By default the folder onnxruntime is imported from is the one looked at: a broken one first on the path.
    (tmp_path / "site" / "onnxruntime").mkdir()
    (tmp_path / "site" / "onnxruntime" / "__init__.py").write_text("")
    code = "from onnxgen.runtime import onnxruntime_conflict; print(onnxruntime_conflict())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert "overwrite each other" in r.stdout, r.stderr


def test_missing_onnxruntime_names_the_fix(exported: Path) -> None:
    code = (
        "import sys, onnxgen\n"
        "sys.modules['onnxruntime'] = None  # as if not installed: import raises ImportError\n"
        "try:\n"
        f"    onnxgen.load({str(exported)!r})\n"
        "except onnxgen.ProviderError as e:\n"
        "    print(e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "pip install 'onnxgen[cpu]'" in r.stdout, r.stderr
    assert issubclass(ProviderError, onnxgen.OnnxgenError)


def test_the_embedding_install_has_no_command_line_stack(resolve: Callable[..., set[str]]) -> None:
    """`pip install onnxgen onnxruntime`: the runtime without typer, rich and what they bring; the cpu extra adds them."""
    cli = {"typer", "rich", "pydantic", "pygments"}  # (click comes anyway: huggingface_hub, which tokenizers needs, has a CLI)
    assert not resolve(*EMBEDDING) & cli
    assert cli <= resolve(f"{ROOT}[cpu]")


def _not_installed(*packages: str) -> str:
    """Python code that makes these packages' imports fail, as where they are not installed."""
    return ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            f"        if name.split('.')[0] in {packages!r}: raise ImportError(name)\n"
            "sys.meta_path.insert(0, Block())\n")


def test_api_runs_without_typer_and_rich_and_the_cli_names_the_fix() -> None:
    """What the embedding install can do: load and generate; the `onnxgen` command says what to install."""
    block = _not_installed("typer", "rich")
    api = block + "import onnxgen; print(onnxgen.load(threads=1).generate('It is', max_new_tokens=3)[0].token_ids)"
    r = subprocess.run([sys.executable, "-c", api], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("["), r.stderr[-2000:]
    cli = block + "import runpy; sys.argv = ['onnxgen', 'generate', 'Hi']; runpy.run_module('onnxgen', run_name='__main__')"
    r = subprocess.run([sys.executable, "-c", cli], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "onnxgen: error: the command line needs typer and rich: pip install 'onnxgen[cpu]' (or 'onnxgen[gpu]', or 'onnxgen[cli]')"]


@pytest.mark.parametrize("missing", ["optimum", "transformers"])
def test_export_and_quantize_without_the_export_stack_name_the_fix(missing: str, exported: Path, tmp_path: Path) -> None:
    """A runtime-only install (`[cpu]`): export and quantize refuse in one line, before reading their arguments' folders."""
    expected = ["onnxgen: error: export and quantize need the export stack: pip install 'onnxgen[export,cpu]' (or 'onnxgen[export,gpu]')"]
    for argv in (["export", "gpt2", "-o", str(tmp_path / "e")], ["quantize", "-m", str(exported), "-o", str(tmp_path / "q")]):
        code = _not_installed(missing) + f"import runpy; sys.argv = ['onnxgen', *{argv!r}]; runpy.run_module('onnxgen', run_name='__main__')"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode == 1 and r.stderr.strip().splitlines() == expected, r.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_every_dependency_states_the_floor_ci_tests() -> None:
    """Each requirement in pyproject.toml has a lower bound (or an exact pin), and .ci/floors.py pins every lower
    bound but those CI tests apart: a dependency added without one would escape the run at the floors."""
    import tomllib

    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]]
    outside = [r for r in requirements if r.name != "onnxgen"]
    assert all(any(s.operator in (">=", "==") for s in r.specifier) for r in outside), [str(r) for r in outside]
    floors = subprocess.run([sys.executable, str(root / ".ci" / "floors.py")], capture_output=True, text=True, check=True).stdout.split()
    pinned = {line.split("==")[0] for line in floors if "==" in line}
    assert pinned == {r.name for r in outside if any(s.operator == ">=" for s in r.specifier)} - {"numpy", "tokenizers"}
