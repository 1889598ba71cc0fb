"""Bounds on what a request may make the service read: body sizes, JSON depth, field lengths.

Every request body is bounded before it is read (:class:`BodyLimits`, an ASGI middleware in front of
the app): its ``Content-Length`` is checked when the app first asks for the body, and a body sent
without one (chunked) is counted as it arrives, so neither is ever read past its limit:

- a request without the service's token (``POST /login`` among them): :data:`MAX_ANONYMOUS_BODY`;
- a form with files (``multipart/form-data``: a task's uploads, predict's file): ten times
  ``--max-upload-mb`` (each file is then checked against ``--max-upload-mb`` itself);
- any other body (a task as JSON): :data:`MAX_JSON_BODY`.

Over the limit the answer is 413 (``Connection: close``, so the rest of the body is never read); a
request answered before its body was read (a 401) closes its connection too. A JSON body is read
whole (within its limit) and its nesting depth checked (:func:`fedmdh.jsonsafe.check_depth`) before
the app sees a byte of it: deeper than :data:`fedmdh.jsonsafe.MAX_DEPTH` is a 422, whatever Python's
recursion limit is (the eth packages raise it to 100,000, and then ``json.loads`` of
``'[' * 200000 + ']' * 200000`` overflows the C stack and kills the process).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fedmdh.jsonsafe import MAX_DEPTH, JSONTooDeep, check_depth

#: the most a request without the token may carry (the sign-in form: the token and a path)
MAX_ANONYMOUS_BODY = 16_000
#: the most a body other than a form with files may carry (a task as JSON is a few kilobytes)
MAX_JSON_BODY = 1_000_000
#: the longest value of a name field (target, algorithm, ledger, each excluded column)
MAX_NAME_CHARS = 256
#: the longest server path (institutions, test) or chain address a request may give
MAX_PATH_CHARS = 4096
#: the longest rounds or seed value (as text)
MAX_NUMBER_CHARS = 32

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class RequestRefused(Exception):
    """A request the service will not read further: HTTP ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def shown(value: Any, limit: int = 40) -> str:
    """``repr`` of ``value`` cut to ``limit`` characters (its length said), for messages: never the whole value."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value):,} characters)"
    text = repr(value)
    return text if len(text) <= limit + 2 else f"{text[:limit]}... ({len(text):,} characters)"


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def is_json(content_type: str | None) -> bool:
    """A JSON media type (``application/json``, ``application/*+json``), parameters ignored."""
    kind = (content_type or "").split(";")[0].strip().lower()
    return kind.endswith("/json") or kind.endswith("+json")


class BodyLimits:
    """ASGI middleware bounding every HTTP request's body (see the module docstring).

    ``signed_in(scope)`` says whether the request carries the service's token (bearer or cookie);
    ``upload_bytes`` is the most a form with files may carry.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], signed_in: Callable[[Scope], bool],
                 upload_bytes: int) -> None:
        self.app, self.signed_in, self.upload_bytes = app, signed_in, upload_bytes

    def limit(self, scope: Scope) -> tuple[int, str]:
        """The most this request's body may hold, and what to call that limit in a message."""
        if not self.signed_in(scope):
            return MAX_ANONYMOUS_BODY, f"{megabytes(MAX_ANONYMOUS_BODY)} a request without the service's token may carry"
        if (_header(scope, b"content-type") or "").split(";")[0].strip().lower() == "multipart/form-data":
            return self.upload_bytes, f"service's limit of {self.upload_bytes / 1e6:g} MB per request"
        return MAX_JSON_BODY, f"{megabytes(MAX_JSON_BODY)} a request other than an upload form may carry"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        chunked = "chunked" in (_header(scope, b"transfer-encoding") or "").lower()
        state = {"expected": chunked or (length is not None and length.strip() not in ("", "0")),
                 "done": False, "checked": False, "read": 0, "started": False}
        json_body = is_json(_header(scope, b"content-type"))

        def too_large(n: int, exact: bool) -> RequestRefused:
            _, what = self.limit(scope)
            size = f"is {megabytes(n)}, over" if exact else "is over"  # a chunked body's size is not known
            if what.startswith("service's limit"):  # the upload form: the message names the knob that raises it
                return RequestRefused(413, f"the request {size} the {what}; send smaller files or start the "
                                           "service with a larger --max-upload-mb.")
            return RequestRefused(413, f"the request body {size} the {what}.")

        def check_declared() -> int:
            cap, _ = self.limit(scope)
            if length is not None:
                value = length.strip()
                if not value.isascii() or not value.isdigit():
                    raise RequestRefused(400, f"the Content-Length header {shown(length)} is not a number of bytes.")
                if int(value) > cap:
                    raise RequestRefused(413, too_large(int(value), True).message)
            return cap

        async def next_chunk(cap: int) -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                if not message.get("more_body", False):
                    state["done"] = True
                if state["read"] > cap:
                    raise too_large(state["read"], False)
            return message

        async def bounded_receive() -> Message:
            if state["done"] or not state["expected"]:
                return await receive()
            cap = check_declared()
            if not json_body or state["checked"]:
                return await next_chunk(cap)
            # a JSON body: read whole (bounded), its depth checked before the app parses a byte of it
            state["checked"] = True
            parts: list[bytes] = []
            while True:
                message = await next_chunk(cap)
                if message["type"] != "http.request":
                    return message  # the client went away
                parts.append(message.get("body", b""))
                if state["done"]:
                    break
            body = b"".join(parts)
            try:
                check_depth(body)
            except JSONTooDeep as exc:
                raise RequestRefused(422, f"the request body is JSON nested more than {MAX_DEPTH} levels deep (at "
                                          f"least {exc.depth}); a task is one JSON object of its fields.") from None
            return {"type": "http.request", "body": body, "more_body": False}

        async def guarded_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
                if state["expected"] and not state["done"]:
                    # answered before the body was read: close, so the rest of it is never read either
                    headers = [h for h in message.get("headers", []) if h[0].lower() != b"connection"]
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, bounded_receive, guarded_send)
        except RequestRefused as exc:  # raised where no exception handler of the app saw it
            if state["started"]:
                raise
            await refuse(exc, guarded_send)


async def refuse(exc: RequestRefused, send: Send) -> None:
    """Answer ``exc`` as ``{"detail": message}`` and close the connection."""
    import json

    body = json.dumps({"detail": exc.message}).encode("utf-8")
    await send({"type": "http.response.start", "status": exc.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
