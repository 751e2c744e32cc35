"""A web page that shows a splat in Spark (World Labs' three.js renderer), upright, to orbit.

The HTTP server serves it at `/`, where a photo dropped on it goes to `/predict` and comes back
as a .sog; `sharp-runpod view FILE` serves it with one file. Spark and three.js are npm
packages loaded at run time from the CDN URLs pinned here (the versions tests/js/package.json
pins), or from a local `node_modules` (SHARP_VIEWER_MODULES) when the page is offline.
"""

from __future__ import annotations

import json
from importlib import resources

PINNED = {"three": "0.187.0", "@sparkjsdev/spark": "2.2.0"}
CDN = "https://cdn.jsdelivr.net/npm/"


def import_map(modules_base: str | None) -> dict[str, dict[str, str]]:
    """Where the page's modules come from: a node_modules URL, or the pinned CDN packages."""

    def package(name: str) -> str:
        return f"{modules_base}{name}/" if modules_base else f"{CDN}{name}@{PINNED[name]}/"

    return {
        "imports": {
            "three": package("three") + "build/three.module.js",
            "three/addons/": package("three") + "examples/jsm/",
            "@sparkjsdev/spark": package("@sparkjsdev/spark") + "dist/spark.module.js",
        }
    }


def page_html(
    modules_base: str | None = None, file_url: str | None = None, fovy_deg: float | None = None
) -> str:
    """The page; with `file_url` it shows that file at once (its camera's vertical field of
    view `fovy_deg`) and takes no photo."""
    template = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
    config = {"file": file_url, "fovy": fovy_deg}
    return template.replace(
        "__IMPORT_MAP__", json.dumps(import_map(modules_base), indent=2)
    ).replace("__CONFIG__", json.dumps(config))
