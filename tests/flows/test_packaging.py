"""A non-editable install carries the config presets, and the CLI reads them from the package.

Builds the wheel with setuptools' PEP 517 backend (no network, no build isolation) from a copy
of the sources, unpacks it into an empty directory and runs the CLI from there, with no source
tree on sys.path: `densepure certify` without --config must find the default preset.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ["default", "imagenet_dds", "imagenet_densepure", "cifar10_dds", "cifar10_densepure"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("densepure_core", "tasks", "flows"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp / "dist"
    build = subprocess.run([sys.executable, "-c", "import sys, setuptools.build_meta as b; "
                            "print(b.build_wheel(sys.argv[1]))", str(dist)],
                           cwd=src, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    return dist / build.stdout.strip().splitlines()[-1]


def test_the_wheel_ships_every_preset(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in PRESETS:
        assert f"densepure_core/config/presets/{preset}.yaml" in names
    assert not any(n.startswith("configs/") for n in names)


def test_the_cli_finds_the_default_config_in_the_installed_package(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    code = (
        "import sys; from pathlib import Path\n"
        "site = Path(sys.argv[1]).resolve()\n"
        "import flows.cli, densepure_core.config as c\n"
        "assert Path(flows.cli.__file__).resolve().is_relative_to(site), flows.cli.__file__\n"
        "default = c.packaged_config(flows.cli.DEFAULT_CONFIG)\n"
        "assert Path(str(default)).resolve().is_relative_to(site), default\n"
        "assert not (site / 'configs').exists()\n"
        "flows.cli.app(['config', 'show'], standalone_mode=False)\n"
        "flows.cli.app(['config', 'show', '--config', 'imagenet_dds'], standalone_mode=False)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(site))
    run = subprocess.run([sys.executable, "-c", code, str(site)], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("# config_hash: ") == 2
    assert "bundled:digits/ddpm" in run.stdout  # the default preset, read from the package
