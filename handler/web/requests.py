"""From an HTTP request to the queue's job input, and from a job's outcome to the HTTP answer.

A raw image body takes its options from the query, named as the queue input's fields and
converted to their types there; a JSON body is the queue's input itself (`{"input": {...}}`
or the bare object). Either way `handler.inputs.parse_request` validates it, so both ways in
accept and refuse exactly the same options with the same messages.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from engine.io.images import ImageDecodeError
from engine.splats.formats import EncodedSplat

from ..fetch import FetchError
from ..inputs import SCHEMA, InputError
from ..storage import UploadError
from ..worker import Outcome

# `?response=json`, or `Accept: application/json`: the queue's JSON result instead of the file.
RESPONSE_PARAM = "response"
# Phrases of the size-limit messages (images, downloads, pixels): those failures are 413s.
_TOO_LARGE = ("larger than", "above the limit", "more pixels than")


class UnsupportedBody(ValueError):
    """The body is of a kind /predict does not take; the message says what to send."""


@dataclass(frozen=True)
class PredictRequest:
    job_input: dict[str, Any]
    image_data: bytes | None  # the raw body, when it is the image
    wants_json: bool


def is_json(content_type: str) -> bool:
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def wants_json(accept: str, query: Iterable[tuple[str, str]]) -> bool:
    flags = [value.lower() for name, value in query if name == RESPONSE_PARAM]
    if flags:
        return flags[-1] == "json"
    return "application/json" in accept.lower()


def predict_request(
    content_type: str, accept: str, query: list[tuple[str, str]], body: bytes
) -> PredictRequest:
    """The job input of one /predict request; raises InputError or UnsupportedBody."""
    options = [(name, value) for name, value in query if name != RESPONSE_PARAM]
    as_json = wants_json(accept, query)
    if is_json(content_type):
        if options:
            raise InputError(
                "with a JSON body, put the options in the JSON, not in the query: "
                + ", ".join(sorted({name for name, _ in options}))
            )
        return PredictRequest(_json_input(body), None, as_json)
    # Any other type is the image's bytes: curl --data-binary sends them as a urlencoded form.
    if content_type.split(";")[0].strip().lower() == "multipart/form-data":
        raise UnsupportedBody(
            "a multipart/form-data body is not taken: send the image file's bytes as the body "
            "(curl --data-binary @photo.jpg), or the queue's JSON input"
        )
    return PredictRequest(query_fields(options), body or None, as_json)


def _json_input(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"the body is not valid JSON ({error})") from None
    if isinstance(value, dict) and set(value) == {"input"}:
        value = value["input"]  # the queue's whole request, {"input": {...}}
    return value  # parse_request explains anything but an object


def query_fields(options: list[tuple[str, str]]) -> dict[str, Any]:
    """Query parameters as job input fields, numbers as numbers (left as text when not one)."""
    fields: dict[str, Any] = {}
    for name, value in options:
        if name in fields:
            raise InputError(f"{name} is given more than once in the query")
        fields[name] = _typed(SCHEMA.get(name, {}).get("type"), value)
    return fields


def _typed(kind: Any, value: str) -> Any:
    try:
        if kind is int:
            return int(value)
        if kind is float:
            return float(value)
    except ValueError:
        pass  # the validator names the field and the type it wants
    return value


def error_status(outcome: Outcome) -> int:
    """The HTTP status of a failed job: the client's errors are 4xx, the worker's 5xx."""
    error_type, message = outcome.error_type, str(outcome.result.get("error", ""))
    if error_type is None:
        return 500
    if outcome.result.get("refresh_worker"):
        return 503
    if not outcome.client_error:
        return 500
    if issubclass(error_type, UploadError):
        return 502  # the bucket failed, not the request
    if issubclass(error_type, (InputError, FetchError, ImageDecodeError)) and any(
        phrase in message for phrase in _TOO_LARGE
    ):
        return 413
    if issubclass(error_type, ImageDecodeError):
        return 415
    return 422


def result_headers(result: dict[str, Any], output: EncodedSplat) -> dict[str, str]:
    """The result's metadata as X-Sharp-* headers (nested fields joined by '-'), and timings."""
    headers = {"Content-Disposition": f'inline; filename="splat{output.extension}"'}
    for name, value in _flat(result):
        if name not in ("status", "delivery", output.format):
            headers["X-Sharp-" + "-".join(p.capitalize() for p in name.split("_"))] = value
    timings = result.get("timings_ms", {})
    headers["Server-Timing"] = ", ".join(f"{stage};dur={ms}" for stage, ms in timings.items())
    return headers


def _flat(fields: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, str]]:
    for key, value in fields.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}_")
        elif isinstance(value, bool):
            yield prefix + key, "true" if value else "false"
        elif isinstance(value, float) and math.isfinite(value):
            yield prefix + key, repr(value)
        else:
            yield prefix + key, quote(str(value), safe=" !#$&'()*+,/:;=?@[]~")
