"""Start listening at once, then load the model in the background.

RunPod measures a load-balancing worker's cold start from its first `/ping` 204 to its first
200, and a port that is not open yet answers nothing at all; so the sockets are bound before
the model starts loading, and `/ping` says 204 until it is ready.
"""

from __future__ import annotations

import atexit
import logging
import socket
import threading

import uvicorn

from engine.io.checkpoint import CheckpointError
from engine.settings import Settings

from ..model import DeviceError, load_predictor
from ..storage import ResultBucket
from ..worker import SharpWorker
from .app import ServerState, create_app

logger = logging.getLogger(__name__)


def serve(settings: Settings) -> int:
    """Serve until stopped; the exit status: 1 when the model could not be loaded."""
    limits = settings.worker.http
    state = ServerState()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, state),
            log_config=None,  # the worker's logging, set up by handler.__main__
            access_log=False,  # RunPod polls /ping every few seconds
            timeout_graceful_shutdown=30,
        )
    )
    ports = [limits.port] + ([limits.health_port] if limits.health_port else [])
    sockets = [_listen(limits.host, port) for port in ports]
    logger.info(
        "Listening on %s port %s; loading the model", limits.host, " and ".join(map(str, ports))
    )
    threading.Thread(target=_load, args=(settings, state, server), daemon=True).start()
    server.run(sockets=sockets)
    return state.exit_code


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def _load(settings: Settings, state: ServerState, server: uvicorn.Server) -> None:
    try:
        bucket = ResultBucket(settings.worker.bucket) if settings.worker.bucket else None
        predictor = load_predictor(settings)
        atexit.register(predictor.runtime.close)  # a build still running dies with the worker
        state.worker = SharpWorker(settings, predictor, bucket)
        logger.info("Ready: POST /predict")
        return
    except (DeviceError, CheckpointError) as error:
        logger.error("The worker cannot start: %s", error)
    except Exception:
        logger.exception("The worker cannot start")
    state.exit_code = 1
    server.should_exit = True
