"""Every environment variable the project reads, with its default and meaning: the README's
configuration table (`python -m engine.settings` prints it)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.settings import (
    ALLOW_PRIVATE_ENV,
    BACKENDS,
    DEVICES,
    ENGINE_BUILDS,
    PRECISIONS,
    SDK_FALSE,
    SDK_TRUE,
    SERVE_MODES,
)


@dataclass(frozen=True)
class Variable:
    name: str
    default: str  # as the README shows it
    meaning: str  # the values it takes and what it does


def _one_of(values: tuple[str, ...]) -> str:
    return " / ".join(f"`{v}`" for v in values)


VARIABLES: tuple[Variable, ...] = (
    Variable(
        "SHARP_CHECKPOINT",
        "Apple's URL",
        "local `.pt` path, `http(s)` URL, `hf://owner/repo[/file]` (RunPod's model cache first), or `tiny-untrained` (tests only)",
    ),
    Variable(
        "SHARP_DEVICE",
        "`auto`",
        f"{_one_of(DEVICES)}: `auto` is the GPU when present, which must then work",
    ),
    Variable(
        "SHARP_CACHE_DIR",
        "`/runpod-volume/sharp-cache` with a network volume, else `~/.cache/sharp-runpod`",
        "where downloaded checkpoints live",
    ),
    Variable(
        "HF_HUB_CACHE",
        "`/runpod-volume/huggingface-cache/hub`",
        "where `hf://` checkpoints are looked for before downloading",
    ),
    Variable(
        "SHARP_BACKEND",
        "`auto`",
        f"{_one_of(BACKENDS)}: the artifact to serve with once validated (see Compiled engine); `auto` is TensorRT, else AOTInductor, on a GPU and eager on the CPU",
    ),
    Variable("SHARP_PRECISION", "`fp16` on a GPU, `fp32` on the CPU", f"{_one_of(PRECISIONS)}"),
    Variable(
        "SHARP_FP32_BLOCKS",
        "disparity and prediction heads",
        "comma-separated blocks kept in fp32 in half precision (`build-engine --measure-blocks` shows each block's error)",
    ),
    Variable(
        "SHARP_ENGINE_DIR",
        "`<cache dir>/engines`",
        "where engines are built and cached, keyed by GPU, versions, checkpoint, code and plan",
    ),
    Variable(
        "SHARP_PREBUILT_ENGINE_DIR",
        "`/opt/sharp/engines` in the image",
        "read-only engines looked up after `SHARP_ENGINE_DIR`",
    ),
    Variable(
        "SHARP_ENGINE_BUILD",
        "`auto`",
        f"{_one_of(ENGINE_BUILDS)}: `auto` builds a missing engine in a child process while eager serves",
    ),
    Variable(
        "SHARP_TRT_WORKSPACE_GB",
        "`4`",
        "TensorRT builder workspace in GiB, so a build fits beside the serving worker",
    ),
    Variable(
        "SHARP_MAX_INLINE_BYTES",
        "`19000000`; `200000000` with `SHARP_LOCAL_API` on",
        "largest inline result, counted as base64 text: RunPod's 20 MB less 1 MB for the JSON around it",
    ),
    Variable("SHARP_MAX_IMAGE_BYTES", "`25000000`", "largest input image, inline or downloaded"),
    Variable(
        "SHARP_MAX_PIXELS", "`40000000`", "largest input width x height, checked before decoding"
    ),
    Variable("SHARP_URL_CONNECT_TIMEOUT_S", "`5`", "`image_url`: connection timeout per address"),
    Variable(
        "SHARP_URL_TIMEOUT_S",
        "`30`",
        "`image_url`: time for the whole download, DNS and redirects included",
    ),
    Variable(
        ALLOW_PRIVATE_ENV,
        "off; on with `SHARP_LOCAL_API` off RunPod",
        f"the RunPod SDK's switch ({_one_of(SDK_TRUE)} on, {_one_of(SDK_FALSE)} off): allow `image_url` on private, loopback and link-local addresses. Leave it off on RunPod",
    ),
    Variable(
        "BUCKET_ENDPOINT_URL",
        "",
        "S3-compatible endpoint; with the next two, enables URL delivery (the RunPod SDK's names)",
    ),
    Variable("BUCKET_ACCESS_KEY_ID", "", "bucket access key"),
    Variable("BUCKET_SECRET_ACCESS_KEY", "", "bucket secret key"),
    Variable(
        "BUCKET_NAME",
        "the month, `MM-YY` (the SDK's convention)",
        "bucket for results, under `sharp/<job id>/`",
    ),
    Variable(
        "SHARP_URL_EXPIRY_S",
        "`3600`",
        "lifetime of presigned result URLs (at most 604800, S3's limit)",
    ),
    Variable(
        "AWS_DEFAULT_REGION",
        "",
        "bucket region, read by boto3, when the endpoint URL does not name it",
    ),
    Variable(
        "SHARP_LOCAL_API",
        "off; `1` in the image",
        f"{_one_of(SDK_TRUE)}: off RunPod, serve the RunPod SDK's local API on `0.0.0.0:8000` (for `docker run -p`); off: run `test_input.json` once. Ignored on RunPod",
    ),
    Variable(
        "SHARP_SERVE",
        "`queue`",
        f"{_one_of(SERVE_MODES)}: `http` serves `/predict`, `/ping` and a page at `/` (load balancing)",
    ),
    Variable("SHARP_HOST", "`0.0.0.0`", "HTTP mode: the address to listen on"),
    Variable("PORT", "`8000`", "HTTP mode: the port to listen on (RunPod sets it)"),
    Variable("PORT_HEALTH", "`PORT`", "HTTP mode: another port that answers `GET /ping`"),
    Variable("SHARP_MAX_BODY_BYTES", "`30000000`", "HTTP mode: largest request or response body"),
    Variable("SHARP_MAX_QUEUED", "`4`", "HTTP mode: requests waiting for the GPU; more get 429"),
    Variable(
        "SHARP_VIEWER_MODULES",
        "the CDN",
        "HTTP mode and `view`: a `node_modules` with `three` and `@sparkjsdev/spark` for the page",
    ),
    Variable(
        "RUNPOD_LOG_LEVEL",
        "`INFO`",
        "the RunPod SDK's log level. The SDK's own default, `DEBUG`, logs every job's whole output (megabytes of base64), so the worker lowers it unless this is set",
    ),
)


def markdown_table() -> str:
    """The README's configuration table: `python -m engine.settings` prints it."""
    rows = [f"| `{v.name}` | {v.default} | {v.meaning} |" for v in VARIABLES]
    return "\n".join(["| variable | default | meaning |", "| --- | --- | --- |", *rows])
