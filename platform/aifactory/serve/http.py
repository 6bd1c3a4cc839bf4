"""HTTP plumbing shared by the apps: JSON error responses in OpenAI's shape, never a 5xx for bad input."""

from __future__ import annotations

import logging

from aifactory.serve.schemas import APIError

logger = logging.getLogger(__name__)


def error_response(err: APIError):
    from fastapi.responses import JSONResponse

    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def install_error_handlers(app) -> None:
    """APIError -> its status; FastAPI's own validation -> 400 naming the field; anything else -> 500 JSON."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = loc[0] if loc else "body"
        return error_response(APIError(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')}", param=param))

    @app.exception_handler(HTTPException)
    async def _http(request, err: HTTPException):
        return error_response(APIError(err.status_code, str(err.detail), param=None, code="http_error"))

    @app.exception_handler(Exception)
    async def _unexpected(request, err: Exception):
        logger.exception("unexpected error serving %s", request.url.path)
        return error_response(APIError(500, f"internal error: {type(err).__name__}", code="internal_error"))
