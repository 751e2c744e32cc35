"""Build and run the project's image without a Docker daemon: Debian's buildah, as root.

The real base (pytorch/pytorch, CUDA) cannot be pulled here, so the image is built on a
stand-in made with mmdebstrap: Debian's externally managed system Python, no `python`
command, CPU torch in the system site-packages (standin-base.Containerfile). The project's
Dockerfile is built on it unchanged apart from its build arguments. The build container
reaches the package index the way the host's pip does: its configuration files and the
local paths they name are mounted read-only into the build's RUN steps, never into the image.
Storage is vfs and isolation chroot, the setup that works as root without a daemon.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SUITE = "bookworm"  # its python3 is 3.11, the one the local CPU torch wheel is built for
TORCH_VERSION = "2.13.0"
BASE_TAG = f"localhost/sharp-standin-base:{SUITE}-torch{TORCH_VERSION}-cpu"
IMAGE_TAG = "localhost/sharp-runpod:image-check"
ENV = {**os.environ, "STORAGE_DRIVER": "vfs", "BUILDAH_ISOLATION": "chroot"}
# Where pip's configuration lives and what it may name: mounted only where present.
PIP_CONFIG_FILES = (Path("/etc/pip.conf"), Path("/etc/xdg/pip"))
PIP_PATH_KEYS = ("cert", "find-links", "index-url", "extra-index-url", "constraint")


def missing_requirement() -> str | None:
    """Why the image cannot be built and run here, or None when it can."""
    if os.geteuid() != 0:
        return "building and running the image needs root (buildah with chroot isolation)"
    for tool in ("buildah", "mmdebstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install buildah mmdebstrap)"
    if _torch_wheel() is None:
        return f"no CPU torch {TORCH_VERSION} cp311 wheel in pip's find-links for the stand-in"
    return None


def _buildah(*args: str, log: Path | None = None, capture: bool = False) -> str:
    with open(log or os.devnull, "ab") as out:
        done = subprocess.run(
            ["buildah", *args],
            env=ENV,
            stdout=subprocess.PIPE if capture else out,
            stderr=out,
            check=False,
        )
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:] if log else ""
        raise RuntimeError(f"buildah {args[0]} failed ({done.returncode}):\n{tail}")
    return done.stdout.decode() if capture else ""


def image_exists(tag: str) -> bool:
    done = subprocess.run(
        ["buildah", "inspect", "--type", "image", tag], env=ENV, capture_output=True, check=False
    )
    return done.returncode == 0


def _pip_config() -> dict[str, str]:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    )
    values: dict[str, str] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition("=")
        values[key.rsplit(".", 1)[-1]] = value.strip("'\"")
    for name, value in os.environ.items():
        if name.startswith("PIP_"):
            values[name[4:].lower().replace("_", "-")] = value
    return values


def _torch_wheel() -> Path | None:
    links = _pip_config().get("find-links", "").split()
    name = f"torch-{TORCH_VERSION}+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    found = [Path(link) / name for link in links if (Path(link) / name).is_file()]
    return found[0] if found else None


def pip_mounts() -> list[str]:
    """`--volume` arguments that give RUN steps the host's pip configuration, read-only."""
    paths = {path for path in PIP_CONFIG_FILES if path.exists()}
    for key, value in _pip_config().items():
        if key not in PIP_PATH_KEYS:
            continue
        for item in value.split():
            local = Path(item.removeprefix("file://"))
            if local.is_absolute() and local.exists():
                # an index page links to its files beside it: mount the index's parent
                paths.add(local.parent if item.startswith("file://") else local)
    outer = [path for path in paths if not any(p in path.parents for p in paths)]
    return [arg for path in sorted(outer) for arg in ("--volume", f"{path}:{path}:ro")]


def build_standin_base(log: Path) -> str:
    """The stand-in base image, built once and then kept in buildah's storage."""
    if image_exists(BASE_TAG):
        return BASE_TAG
    wheel = _torch_wheel()
    assert wheel is not None, "missing_requirement() checks for the wheel"
    rootfs = [
        "mmdebstrap", "--variant=apt", "--include=python3,python3-pip,ca-certificates",
        "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
        SUITE,
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="standin-", dir="/var/tmp") as context:
        with open(log, "ab") as out:
            subprocess.run([*rootfs, f"{context}/rootfs.tar"], stdout=out, stderr=out, check=True)
        shutil.copy(HERE / "standin-base.Containerfile", f"{context}/Containerfile")
        _buildah(
            "bud", "--layers=false", "--force-rm", *pip_mounts(),
            "--build-arg", f"TORCH_WHEEL={wheel}", "-t", BASE_TAG, context, log=log,
        )  # fmt: skip
    return BASE_TAG


def build_project_image(base: str, log: Path) -> str:
    """The project's Dockerfile on `base`, torch-tensorrt left out, no build cache kept."""
    _buildah(
        "bud", "--layers=false", "--force-rm", *pip_mounts(),
        "--build-arg", f"BASE_IMAGE={base}", "--build-arg", "TORCH_TENSORRT_VERSION=",
        "-t", IMAGE_TAG, "-f", str(REPO / "Dockerfile"), str(REPO), log=log,
    )  # fmt: skip
    return IMAGE_TAG


def remove_image(tag: str) -> None:
    _buildah("rmi", "--force", tag)


def remove_images() -> None:
    """The check's images, the cached stand-in base included; nothing else in the storage."""
    for tag in (IMAGE_TAG, BASE_TAG):
        if image_exists(tag):
            remove_image(tag)


def image_cmd(image: str) -> list[str]:
    """The image's own start command, as `docker run` would use it."""
    config = json.loads(_buildah("inspect", "--type", "image", image, capture=True))
    return config["OCIv1"]["config"]["Cmd"]


@contextmanager
def running_container(
    image: str, env: dict[str, str], args: list[str], log: Path
) -> Iterator[subprocess.Popen]:
    """The image's command (plus `args`) in a container on the host's network, stopped after.

    Chroot isolation shares the host's network namespace, so the worker's port and a local
    image host on 127.0.0.1 reach each other as they would through `docker run -p`.
    """
    name = _buildah("from", "--pull-never", image, capture=True).strip()
    env_args = [arg for key, value in env.items() for arg in ("--env", f"{key}={value}")]
    try:
        with open(log, "ab") as out:
            process = subprocess.Popen(
                ["buildah", "run", *env_args, name, "--", *image_cmd(image), *args],
                env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            yield process
        finally:
            _stop(process)
    finally:
        _buildah("rm", name)


def run_once(image: str, command: list[str]) -> str:
    """`command` in a fresh container of `image`; its standard output."""
    name = _buildah("from", "--pull-never", image, capture=True).strip()
    try:
        return _buildah("run", name, "--", *command, capture=True)
    finally:
        _buildah("rm", name)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the container's process group, as `docker stop` sends; SIGKILL after 30 s."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
