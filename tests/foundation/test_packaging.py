"""A built wheel, installed (not editable) in a fresh venv, works outside the source tree."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["pyproject.toml", "README.md", "sorna_server", "sorna_agent",
           "sorna_cli", "fixtures", "migrations"]


def test_every_package_is_listed_in_pyproject() -> None:
    """A sub-package missing from [tool.setuptools] packages would be left out of the wheel."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    mapped = {folder: package for package, folder in setup["package-dir"].items()}
    found = set()
    for top in ("sorna_server", "sorna_agent", "sorna_cli", "fixtures", "migrations"):
        for init in (ROOT / top).rglob("__init__.py"):
            folder = init.parent.relative_to(ROOT).as_posix()
            found.add(mapped.get(folder, folder.replace("/", ".")))
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding only the wheel; dependencies come from the test venv via a .pth file."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "src"
    source.mkdir()
    for name in SOURCES:
        origin = ROOT / name
        if origin.is_dir():
            shutil.copytree(origin, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(origin, source / name)
    dist = base / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(dist), str(source)],
                   check=True, capture_output=True, timeout=120)
    wheel = next(dist.glob("sorna_server-*.whl"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; "
                                   "print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    # Only the directories, not their .pth files: the editable install stays invisible.
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (purelib / "zz_test_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=120)
    return venv


def _run(venv: Path, cwd: Path, *args: str, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("SORNA_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(venv / "bin" / "sorna"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env={**clean, **(env or {})})


@pytest.mark.slow
def test_installed_wheel_outside_the_tree(installed: Path, db_url: str, tmp_path: Path) -> None:
    workdir = tmp_path / "empty"
    workdir.mkdir()
    probe = subprocess.run(
        [str(installed / "bin" / "python"), "-c",
         "import sorna_server.schema as s, sorna_server.fixture_loader as f; "
         "print(s.migrations_dir()); print(f.fixtures_dir())"],
        cwd=workdir, capture_output=True, text=True, check=True)
    for line in probe.stdout.split():
        assert Path(line).is_relative_to(installed), probe.stdout

    env = {} if db_url.startswith("sqlite") else {"SORNA_DB_URL": db_url}
    assert "schema" in _run(installed, workdir, "--help").stdout
    created = _run(installed, workdir, "schema", "oneshot", "head", env=env)
    assert created.returncode == 0, created.stderr
    if not env:
        assert (workdir / "sorna-data" / "sorna.db").is_file()
    for expected_inserted in (1, 0):
        populated = _run(installed, workdir, "fixture", "populate", "example_keypair", "--json",
                         env=env)
        assert populated.returncode == 0, populated.stderr
        assert json.loads(populated.stdout)["inserted"] == expected_inserted
    listed = _run(installed, workdir, "keypair", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [row["access_key"] for row in rows] == ["AKIAIOSFODNN7EXAMPLE"]
    assert "secret_key" not in rows[0]
    unknown = _run(installed, workdir, "fixture", "populate", "no_such_fixture", env=env)
    assert unknown.returncode != 0
    assert "Traceback" not in unknown.stderr and "example_keypair" in unknown.stderr
