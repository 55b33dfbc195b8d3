"""The token listener: aiohttp's low-level server, with JSON even for broken HTTP.

The low-level ``web.Server`` skips routing and middleware (nmi routes by its
own normalised path).  aiohttp answers requests it cannot parse (an
over-long line, a malformed request line, bad bytes) itself, in plain text;
the request handler class is specialised here so that those answers are the
same IMDS-style JSON as every other error, and so that a flood of garbage is
logged at debug level instead of one traceback per request.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from . import replies

log = logging.getLogger(__name__)


class _JsonErrorRequestHandler(RequestHandler):
    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            log.error("error handling a request", exc_info=exc)
        else:
            log.debug("unparseable request: %s", message or exc)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        code = "invalid_request" if 400 <= status < 500 else "server_error"
        response = replies.error(status, code, f"{phrase}: the request could not be read")
        response.force_close()
        return response


class JsonErrorServer(web.Server):
    """``web.Server`` whose protocol-level errors are JSON."""

    def __call__(self) -> RequestHandler:
        return _JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)
