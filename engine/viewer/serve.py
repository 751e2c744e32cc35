"""`sharp-runpod view FILE`: the viewer page and one splat file on a local port.

Python's own HTTP server on 127.0.0.1: the page at `/`, the file at `/file/<name>`, and, when
a local `node_modules` is given, its files at `/modules/` (else the page uses the CDN).
"""

from __future__ import annotations

import webbrowser
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from engine.splats.formats import FORMATS

from . import page_html

_MODULE_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm"}


class ViewError(ValueError):
    """The file cannot be shown; the message says why."""


def check_viewable(path: Path) -> str:
    """The file's format, or ViewError."""
    if not path.is_file():
        raise ViewError(f"{path} is not a file")
    format = path.suffix.lower().lstrip(".")
    if format not in FORMATS:
        raise ViewError(f"{path}: the viewer shows .{', .'.join(FORMATS)} files")
    return format


def view(
    path: Path, *, port: int, modules: Path | None, open_browser: bool, fovy_deg: float | None
) -> None:
    """Serve until interrupted; prints the page's address (and opens it when asked)."""
    check_viewable(path)
    file_url = f"/file/{quote(path.name)}"
    page = page_html("/modules/" if modules else None, file_url, fovy_deg).encode()
    handler = partial(_Handler, page=page, file_url=file_url, path=path, modules=modules)
    with ThreadingHTTPServer(("127.0.0.1", port), handler) as server:
        address = f"http://127.0.0.1:{server.server_address[1]}/"
        print(f"Showing {path} at {address} (Ctrl-C stops)", flush=True)
        if open_browser:
            webbrowser.open(address)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


class _Handler(BaseHTTPRequestHandler):
    def __init__(self, *args, page: bytes, file_url: str, path: Path, modules: Path | None):
        self.page, self.file_url, self.path_on_disk, self.modules = page, file_url, path, modules
        super().__init__(*args)

    def do_GET(self) -> None:
        route = urlsplit(self.path).path
        if route == "/":
            self._send(self.page, "text/html; charset=utf-8")
        elif route == self.file_url:
            self._send(self.path_on_disk.read_bytes(), "application/octet-stream")
        elif self.modules is not None and route.startswith("/modules/"):
            root = self.modules.resolve()
            target = (root / unquote(route.removeprefix("/modules/"))).resolve()
            if target.is_relative_to(root) and target.is_file():
                kind = _MODULE_TYPES.get(target.suffix, "application/octet-stream")
                self._send(target.read_bytes(), kind)
            else:
                self.send_error(404)
        else:
            self.send_error(404)

    def _send(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass
