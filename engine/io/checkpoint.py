"""Finding, downloading, validating and loading SHARP checkpoints.

A checkpoint is named by a local path, an http(s) URL, a Hugging Face reference
(`hf://owner/repo[/file]`), or `tiny-untrained`: a small randomly initialised model built
here, for offline demos and tests only. Downloads land in a cache directory (a RunPod
network volume when one is mounted), resume after an interruption, and appear under their
final name only when complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.network import UNUSED_CHECKPOINT_PREFIXES, SharpNetwork
from engine.network.config import SharpConfig
from engine.settings import DEFAULT_CHECKPOINT_URL, default_cache_dir

logger = logging.getLogger(__name__)

HF_DEFAULT_FILENAME = "sharp_2572gikvuh.pt"
TINY_UNTRAINED = "tiny-untrained"
_DOWNLOAD_CHUNK = 1 << 20
_DOWNLOAD_TIMEOUT_S = 60


class CheckpointError(RuntimeError):
    """A checkpoint could not be found, downloaded, read, or does not fit the network."""


@dataclass(frozen=True)
class CheckpointInfo:
    name: str  # what the caller asked for
    path: Path | None  # the local file; None for the built-in untrained model
    config: SharpConfig
    untrained: bool = False


def resolve_checkpoint(spec: str | os.PathLike | None, cache_dir: Path | None = None) -> Path:
    """The local file for a checkpoint spec, downloading it into `cache_dir` if needed
    (default: `engine.settings.default_cache_dir()`)."""
    spec = str(spec) if spec is not None else DEFAULT_CHECKPOINT_URL
    if spec.startswith("hf://"):
        spec = HubFile.parse(spec).url
    if spec.startswith(("http://", "https://")):
        name = Path(urllib.parse.urlparse(spec).path).name or "checkpoint.pt"
        target = (cache_dir or default_cache_dir()) / name
        if not target.exists():
            download(spec, target)
        return target
    path = Path(spec).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint '{spec}' not found: give a local .pt file, an http(s) URL, "
            f"'hf://owner/repo[/file]', or '{TINY_UNTRAINED}'"
        )
    return path


@dataclass(frozen=True)
class HubFile:
    """A file of a Hugging Face model repository, from `hf://owner/repo[/file]`."""

    owner: str
    repo: str
    filename: str = HF_DEFAULT_FILENAME

    @classmethod
    def parse(cls, spec: str) -> HubFile:
        parts = spec.removeprefix("hf://").strip("/").split("/")
        if not spec.startswith("hf://") or len(parts) < 2 or not all(parts[:2]):
            raise CheckpointError(f"'{spec}' is not of the form hf://owner/repo[/file]")
        return cls(parts[0], parts[1], "/".join(parts[2:]) or HF_DEFAULT_FILENAME)

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.owner}/{self.repo}/resolve/main/{self.filename}"


def download(url: str, target: Path) -> None:
    """Download to `target` with a progress bar; resumes a partial file; atomic rename."""
    from tqdm import tqdm  # a progress bar for downloads only: bare GPU setups lack it

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(
            f"cannot create the cache folder {target.parent} ({error.strerror or error}); "
            "set SHARP_CACHE_DIR to a writable folder"
        ) from None
    partial = target.with_name(target.name + ".partial")
    with _exclusive_lock(target.with_name(target.name + ".lock")):
        if target.exists():  # another worker finished it while we waited
            return
        offset = partial.stat().st_size if partial.exists() else 0
        request = urllib.request.Request(
            url, headers={"Range": f"bytes={offset}-"} if offset else {}
        )
        logger.info("Downloading %s to %s", url, target)
        try:
            with urllib.request.urlopen(request, timeout=_DOWNLOAD_TIMEOUT_S) as response:
                if offset and response.status != 206:  # server ignored the range: start over
                    offset = 0
                length = response.headers.get("Content-Length")
                total = offset + int(length) if length is not None else None
                with (
                    open(partial, "ab" if offset else "wb") as out,
                    tqdm(
                        total=total, initial=offset, unit="B", unit_scale=True, desc=target.name
                    ) as progress,
                ):
                    while chunk := response.read(_DOWNLOAD_CHUNK):
                        out.write(chunk)
                        progress.update(len(chunk))
        except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
            raise CheckpointError(
                f"downloading {url} failed: {error}; run again to resume "
                f"({partial} keeps what arrived)"
            ) from error
        size = partial.stat().st_size
        if total is not None and size != total:
            raise CheckpointError(
                f"download of {url} ended early ({size} of {total} bytes); run again to resume"
            )
        os.replace(partial, target)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Serialises downloads of one file across workers that share the cache."""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # some network filesystems have no locks; go on unlocked
            logger.warning("Cannot lock %s; downloading without a lock", path)
        yield


def _load_failure(error: Exception) -> str:
    """torch.load's reason in one short sentence, without its advice to load with
    weights_only=False, which would run whatever code a downloaded file holds."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    sentence = line.split(". ", 1)[0].rstrip(".")
    if len(sentence) > 120:
        sentence = f"{sentence[:120]}..."
    return f"{type(error).__name__}: {sentence}" if sentence else type(error).__name__


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Memory-maps the checkpoint, so loading 2.8 GB does not need twice that in RAM."""
    try:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except Exception as error:  # torch raises many types for a damaged file
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated, damaged or not a PyTorch "
            f"state dict ({_load_failure(error)}); delete it and download it again"
        ) from None
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return dict(state)


def check_state_dict(state_dict: Mapping[str, torch.Tensor], model: SharpNetwork) -> None:
    """Raise with the first mismatches if keys or shapes differ from the network's."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [
        f"{k}: checkpoint {given[k]} vs network {expected[k]}"
        for k in expected
        if k in given and given[k] != expected[k]
    ]
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:5])}{', ...' if len(items) > 5 else ''}"
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape", mismatched),
        )
        if items
    ]
    if problems:
        raise CheckpointError("checkpoint does not fit the SHARP network; " + "; ".join(problems))


def network_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> SharpNetwork:
    """Builds the network the state dict describes and loads it without copying weights."""
    used = {k: v for k, v in state_dict.items() if not k.startswith(UNUSED_CHECKPOINT_PREFIXES)}
    try:
        config = SharpConfig.from_state_dict(used)
    except KeyError as error:
        raise CheckpointError(f"not a SHARP checkpoint: {error.args[0]}") from error
    with torch.device("meta"):
        model = SharpNetwork(config)
    check_state_dict(used, model)
    # assign=True adopts the (memory-mapped) tensors instead of copying into new ones.
    model.load_state_dict({k: v.float() for k, v in used.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def build_untrained(config: SharpConfig | None = None, seed: int = 0) -> SharpNetwork:
    """A deterministic, randomly initialised network: NOT a model of anything real."""
    config = config or SharpConfig.tiny()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SharpNetwork(config)
        for name, param in model.named_parameters():
            if name.endswith("gamma"):  # LayerScale starts small, as in training
                torch.nn.init.constant_(param, 1e-5)
            elif name.endswith(("cls_token", "pos_embed")):
                torch.nn.init.normal_(param, std=0.02)
        # Keep the disparity head's output positive so depth stays finite and varied.
        torch.nn.init.constant_(model.monodepth_model.monodepth_predictor.head[4].bias, 0.5)
    return model.eval().requires_grad_(False)


def load_network(
    spec: str | os.PathLike | None = None, cache_dir: Path | None = None
) -> tuple[SharpNetwork, CheckpointInfo]:
    """The network for a checkpoint spec (see module docstring), on the CPU, in eval mode."""
    if str(spec) == TINY_UNTRAINED:
        logger.warning(
            "Using '%s': a small UNTRAINED model for offline testing. Its splats are not a "
            "reconstruction of the photo.",
            TINY_UNTRAINED,
        )
        model = build_untrained()
        return model, CheckpointInfo(TINY_UNTRAINED, None, model.config, untrained=True)
    path = resolve_checkpoint(spec, cache_dir)
    model = network_from_state_dict(read_state_dict(path))
    name = str(spec) if spec is not None else DEFAULT_CHECKPOINT_URL
    return model, CheckpointInfo(name, path, model.config)


def file_digest(path: Path) -> str:
    """SHA-256 of a file, cached beside it (keyed by size and mtime) since 2.8 GB takes seconds."""
    stat = path.stat()
    sidecar = path.with_name(path.name + ".sha256")
    key = f"{stat.st_size}:{stat.st_mtime_ns}"
    with contextlib.suppress(OSError, ValueError):
        cached_key, digest = sidecar.read_text().split()
        if cached_key == key:
            return digest
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_DOWNLOAD_CHUNK):
            sha.update(chunk)
    digest = sha.hexdigest()
    with contextlib.suppress(OSError):
        sidecar.write_text(f"{key} {digest}\n")
    return digest
