"""Errors as the OpenAI API returns them: {"error": {"message", "type", "param", "code"}} with an HTTP status.

  400 invalid_request_error   a bad field (named in `param` and the message), a prompt beyond the context,
                              token ids outside the vocabulary, a chat request for a model without a template
  404 not_found_error         an unknown model
  429 rate_limit_error        the server's queue is full (retry later)
  503 service_unavailable     the server is shutting down, or its engine failed
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("jaxinfer.serve")

TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
         429: "rate_limit_error", 500: "internal_error", 503: "service_unavailable"}


class APIError(Exception):
  def __init__(self, status: int, message: str, param: str | None = None, type: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param = status, message, param
    self.type = type or TYPES.get(status, "invalid_request_error")

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}

  def response(self) -> JSONResponse:
    return JSONResponse(self.body(), status_code=self.status)


def bad_request(message: str, param: str | None = None) -> APIError:
  return APIError(400, message, param)


def _field(loc) -> str:
  parts = [str(p) for p in loc if p != "body"]
  # pydantic names the member of a union it tried ("prompt.str"): keep the field path the client wrote
  return ".".join(p for p in parts if p not in ("str", "int", "list[str]", "list[int]", "list[list[int]]")
                  and not p.startswith(("function-", "list[", "TextPart"))) or "body"


def validation_error(exc: RequestValidationError) -> APIError:
  errors = exc.errors()
  first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
  field = _field(first.get("loc", ()))
  message = first.get("msg", "invalid")
  if first.get("type") == "extra_forbidden":
    message = "unknown field (not supported by this server)"
  elif first.get("type") == "json_invalid":
    field, message = "body", f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})"
  return bad_request(f"{field}: {message.removeprefix('Value error, ')}", field)


def install(app: FastAPI) -> None:
  @app.exception_handler(APIError)
  async def _api(_: Request, exc: APIError):
    return exc.response()

  @app.exception_handler(RequestValidationError)
  async def _invalid(_: Request, exc: RequestValidationError):
    return validation_error(exc).response()

  @app.exception_handler(HTTPException)
  async def _http(_: Request, exc: HTTPException):
    return APIError(exc.status_code, str(exc.detail)).response()

  @app.exception_handler(Exception)
  async def _crash(_: Request, exc: Exception):
    log.exception("serve: request failed")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()
