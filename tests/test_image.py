"""The container image: the Dockerfile installs every package of pyproject.toml,
and (where buildah runs) scripts/build-image.sh builds the CPU image and
scripts/check_image.py runs it as manifests/overlays/cpu's pods do.

The build + run check takes minutes and needs root: it runs where `buildah` is
installed, or with BRAID_IMAGE_TEST=1 (build-image.sh then installs buildah and
mmdebstrap with apt); BRAID_IMAGE_TEST=0 or `-m "not image"` skips it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT_S = 1800
CHECK_TIMEOUT_S = 900


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _package_folders() -> dict[str, Path]:
    """Every Python package under pyproject's package-dir roots, by dotted name."""
    found = {}
    for name, folder in _pyproject()["tool"]["setuptools"]["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            if "__pycache__" not in rel.parts:
                found[".".join([name, *rel.parts])] = init.parent
    return found


def test_every_package_is_installed():
    """A package missing from `packages` is absent from the wheel, and so from the image."""
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    missing = sorted(set(_package_folders()) - listed)
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {missing}"


def test_dockerfile_copies_every_package_folder():
    text = (ROOT / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+) \./\1$", text, flags=re.M))
    folders = {f for f in _pyproject()["tool"]["setuptools"]["package-dir"].values() if (ROOT / f).is_dir()}
    assert folders <= copied, f"the Dockerfile does not COPY {sorted(folders - copied)}"


def test_dockerfile_build_args_and_wheels_folder():
    """The CUDA and NPU variants' build args are still there; wheels/ (bind-mounted
    for pip) is in the build context."""
    text = (ROOT / "Dockerfile").read_text()
    for arg in ("BASE_IMAGE", "EXTRAS", "TORCH_INDEX_URL", "APT_PACKAGES", "PIP_EXTRA_ARGS"):
        assert re.search(rf"^ARG {arg}=", text, flags=re.M), arg
    assert "--mount=type=bind,source=wheels," in text
    assert (ROOT / "wheels" / "README.md").is_file()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not {"wheels", "wheels/", "*"} & set(ignored)


def _image_test_enabled() -> tuple[bool, str]:
    flag = os.environ.get("BRAID_IMAGE_TEST", "")
    if flag == "0":
        return False, "BRAID_IMAGE_TEST=0"
    if os.geteuid() != 0:
        return False, "the image build and check need root (buildah --isolation chroot, a read-only bind mount)"
    if flag != "1" and shutil.which("buildah") is None:
        return False, ("buildah is not installed: apt-get install buildah mmdebstrap, or BRAID_IMAGE_TEST=1 "
                       "(scripts/build-image.sh installs them)")
    return True, ""


def _run(cmd: list[str], timeout: float) -> tuple[str, float]:
    """(stdout, seconds) of a command that must succeed."""
    t0 = time.monotonic()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    took = time.monotonic() - t0
    text = out.stdout + out.stderr
    assert out.returncode == 0, f"{' '.join(cmd)} failed ({out.returncode}) after {took:.0f} s:\n{text[-6000:]}"
    return out.stdout, took


@pytest.mark.image
@pytest.mark.timeout(BUILD_TIMEOUT_S + CHECK_TIMEOUT_S + 60)
def test_image_builds_and_runs_as_the_cpu_overlay_pods():
    enabled, why = _image_test_enabled()
    if not enabled:
        pytest.skip(why)
    built, build_s = _run(["bash", "scripts/build-image.sh"], BUILD_TIMEOUT_S)
    image, size = built.strip().splitlines()[-1].split(" ", 1)
    checked, check_s = _run([sys.executable, "scripts/check_image.py", "--image", image], CHECK_TIMEOUT_S)
    assert "check-image: passed" in checked
    print(f"image {image}: {size}; build {build_s:.0f} s, run check {check_s:.0f} s")
