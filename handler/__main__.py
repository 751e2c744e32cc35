"""`python -m handler`: load the model once, then hand the job handler to the RunPod SDK.

On RunPod (`RUNPOD_WEBHOOK_GET_JOB` set) the SDK takes the endpoint's jobs. Elsewhere it reads
its own arguments from the command line: `--rp_serve_api [--rp_api_host H] [--rp_api_port P]`
starts its local API server (/run, /runsync, /status), `--test_input '{...}'` runs one job;
with neither it runs the job in ./test_input.json and exits. `SHARP_LOCAL_API=1` (the image
sets it; ignored on RunPod) adds `--rp_serve_api --rp_api_host 0.0.0.0` when neither is
given, so that `docker run -p 8000:8000` serves on the SDK's default port 8000, and lifts
RunPod's 20 MB cap on inline results unless SHARP_MAX_INLINE_BYTES is set (engine/settings/).
"""

from __future__ import annotations

import atexit
import logging
import sys

import runpod
from runpod.serverless.modules.rp_logger import RunPodLogger

from engine.io.checkpoint import CheckpointError
from engine.runtime.numerics import configure_numerics
from engine.settings import Settings, SettingsError

from .model import DeviceError, load_predictor
from .storage import ResultBucket
from .worker import SharpWorker

logger = logging.getLogger("handler")

SDK_MODES = ("--rp_serve_api", "--test_input")


def sdk_arguments(argv: list[str], local_api: bool) -> list[str]:
    """The SDK's command line, with its local API on all interfaces unless a mode is given."""
    given = {arg.split("=", 1)[0] for arg in argv}
    if not local_api or given & set(SDK_MODES):
        return argv
    host = [] if "--rp_api_host" in given else ["--rp_api_host", "0.0.0.0"]
    return [*argv, "--rp_serve_api", *host]


def build_worker(settings: Settings) -> SharpWorker:
    logger.info("Settings: %s", settings)
    bucket = ResultBucket(settings.worker.bucket) if settings.worker.bucket is not None else None
    predictor = load_predictor(settings)
    atexit.register(predictor.runtime.close)  # a build still running dies with the worker
    return SharpWorker(settings, predictor, bucket)


def main() -> None:
    # The SDK configures the root logger on import; ours replaces it for the worker's lines.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    try:
        settings = Settings.from_env()
        configure_numerics()
        if settings.worker.serve == "http":  # its own server: POST /predict, GET /ping
            from .web.server import serve

            sys.exit(serve(settings))
        worker = build_worker(settings)
    except (SettingsError, DeviceError, CheckpointError) as error:
        logger.error("The worker cannot start: %s", error)
        sys.exit(1)
    sys.argv = sdk_arguments(sys.argv, settings.worker.local_api)
    # The SDK's default level is DEBUG, at which it logs every job's whole output: here tens
    # of megabytes of base64 per job. Its --rp_log_level argument still overrides this.
    RunPodLogger().set_level(settings.worker.sdk_log_level)
    runpod.serverless.start({"handler": worker})


if __name__ == "__main__":
    main()
