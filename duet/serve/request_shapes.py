"""The request side of the HTTP API: the bodies of OpenAI's chat and text completions (pydantic), their
validation beyond the schema (roles, text-only content, unsupported options refused), and the errors answered
in OpenAI's shape (`APIError`)."""

from __future__ import annotations

from typing import Any, Optional, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

MAX_TOP_LOGPROBS = 20


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", *,
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(" ".join(str(message).split()))
        self.status, self.type, self.param, self.code, self.headers = status, type, param, code, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we do not use (user, metadata, ...)

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=0)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: Optional[int] = Field(None, ge=1)
    stream: Optional[bool] = False
    stream_options: Optional[dict[str, Any]] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    ignore_eos: Optional[bool] = False  # vLLM: generate max_tokens even past the end of the turn


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class ChatBody(RequestBody):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: Optional[bool] = True
    continue_final_message: Optional[bool] = False
    tools: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None


class CompletionBody(RequestBody):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: Optional[bool] = False
    suffix: Optional[str] = None


def usage_requested(body: RequestBody) -> bool:
    return bool((body.stream_options or {}).get("include_usage"))


def chat_role(role: str) -> str:
    if role == "developer":  # OpenAI's newer name for the system message
        return "system"
    if role not in ("system", "user", "assistant"):
        raise APIError(400, f"messages: role {role!r} is not supported (system, user, assistant)", param="messages")
    return role


def message_text(content: Any, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"messages[{index}]: only text content parts are supported", param="messages")
        parts.append(part["text"])
    return "".join(parts)


def refuse_unsupported(body: Any) -> None:
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name, None):
            raise APIError(400, f"{name} is not supported by duet serve", param=name)
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported by duet serve", param="logit_bias")
    if getattr(body, "tools", None):
        raise APIError(400, "tools are not supported by duet serve", param="tools")
    response_format = getattr(body, "response_format", None)
    if response_format and response_format.get("type", "text") != "text":
        raise APIError(400, "response_format other than text is not supported by duet serve",
                       param="response_format")
