"""The OpenAI request bodies this server reads, and its OpenAI-style errors.

Requests follow the OpenAI API; the diffusion settings ride under one extra key,
``diffusion`` (with the ``openai`` client: ``extra_body={"diffusion": {...}}``). Fields a
client leaves out take the server's configured defaults. OpenAI fields with no meaning for
a diffusion sampler are refused when set (``UNSUPPORTED``); other unknown fields are ignored,
as OpenAI ignores ``user`` or ``metadata``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)

UNSUPPORTED: tuple[str, ...] = (
    "best_of",
    "echo",
    "frequency_penalty",
    "function_call",
    "functions",
    "logit_bias",
    "logprobs",
    "presence_penalty",
    "response_format",
    "suffix",
    "tool_choice",
    "tools",
    "top_logprobs",
)


class APIError(Exception):
    """An error answered as ``{"error": {message, type, param, code}}`` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


class DiffusionOptions(BaseModel):
    """Sampler settings a request may change (``diffusion`` key); unknown keys are refused.

    ``steps`` counts denoising steps over the whole completion (LLaDA's meaning) and is
    spread evenly over the blocks, rounded up; ``steps_per_block`` sets them per block.
    ``stream_canvas`` streams every step's canvas, masks shown as the server's placeholder.
    """

    model_config = ConfigDict(extra="forbid")

    block_length: int | None = Field(default=None, ge=1)
    steps: int | None = Field(default=None, ge=1)
    steps_per_block: int | None = Field(default=None, ge=1)
    remasking: str | None = None
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    stream_canvas: bool = False


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """The fields completions and chat completions share."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)  # what torch takes
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    diffusion: DiffusionOptions | None = None

    def unsupported(self) -> str | None:
        """The first set field this server cannot honour, if any."""
        extra = self.model_extra or {}
        for name in UNSUPPORTED:
            if extra.get(name) not in (None, False, 0, [], {}):
                return name
        return None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes at most 4 non-empty strings", param="stop")
        return stops


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _one_of_four_shapes(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(
                "prompt must be a string, a list of strings, a list of token ids or a list of "
                "token-id lists"
            ) from None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self, index: int) -> str:
        """The message as plain text; only text parts are understood."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise APIError(
                    400,
                    f"content part of type {part.type!r} is not supported: text only",
                    param=f"messages.{index}.content",
                )
        return "".join(part.text or "" for part in self.content)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
