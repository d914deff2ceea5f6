"""uvicorn's httptools protocol with a bound on the request head (request line + headers).

httptools buffers a header until it is complete, and uvicorn sets no limit: eight 32 MB
headers took a service from 153 MB to 655 MB of memory before the application saw the
request. This protocol counts the bytes received while a request's head is incomplete and
answers 431 (then closes the connection) once they pass `max_head_bytes`, so memory per
connection stays bounded whatever a client sends. The body has its own limit (413,
shared/limits.py). A reverse proxy in front should enforce the same (deploy/README.md)."""

import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

DEFAULT_MAX_HEAD_BYTES = 32 * 1024


class BoundedHeadProtocol(HttpToolsProtocol):
    max_head_bytes = DEFAULT_MAX_HEAD_BYTES

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        self._head_bytes = 0
        self._in_head = True
        self._refused = False
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._refuse_head()
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def _refuse_head(self) -> None:
        self._refused = True
        body = json.dumps({"detail": {"reason": "headers_too_large",
                                      "msg": f"the request line and headers exceed {self.max_head_bytes} bytes"}}
                          ).encode()
        self.transport.write(b"".join([
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
            b"content-type: application/json\r\n",
            b"content-length: ", str(len(body)).encode(), b"\r\n",
            b"connection: close\r\n\r\n", body]))
        self.transport.close()


def bounded_head_protocol(max_head_bytes: int) -> type[BoundedHeadProtocol]:
    """The protocol class for `uvicorn.run(http=...)` with this service's limit."""
    return type("BoundedHeadProtocol", (BoundedHeadProtocol,), {"max_head_bytes": max_head_bytes})
