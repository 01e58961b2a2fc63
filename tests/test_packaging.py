"""The wheel carries every file the package reads at run time: the kernels' sources that `hqexport kernels build`
compiles and the demo's corpus, not only its modules (a non-editable install once had neither)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import hqexport

ROOT = Path(hqexport.__file__).parent.parent


def test_the_wheel_holds_every_package_file(tmp_path):
    project = tmp_path / "project"  # a copy without the checkout's build state (an egg-info lists files of its own)
    shutil.copytree(ROOT / "hqexport", project / "hqexport", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, project / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(project)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("hqexport-*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    package = ROOT / "hqexport"
    expected = {path.relative_to(ROOT).as_posix() for path in package.rglob("*") if path.is_file() and "__pycache__" not in path.parts}
    assert any(name.endswith(".cpp") for name in expected)
    assert expected <= packaged, sorted(expected - packaged)
