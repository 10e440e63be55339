"""The OpenAI request bodies this server reads, and its OpenAI-style errors.

Requests follow the OpenAI API; the diffusion settings ride under one extra key,
``diffusion`` (with the ``openai`` client: ``extra_body={"diffusion": {...}}``). Fields a
client leaves out take the server's configured defaults. OpenAI fields with no meaning for
a diffusion sampler are refused when set (``UNSUPPORTED``); other unknown fields are ignored,
as OpenAI ignores ``user`` or ``metadata``.

Every known field is strict: ``"8"`` and ``true`` are not integers, ``1`` is not a boolean
(lax coercion made ``max_tokens: true`` one token). Numbers are bounded here, so a bad
request is refused before any tokenising or sampling, never by a failing sampler (a
temperature of 1e308 or 1e-40 turns every probability into NaN).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
)
from pydantic_core import PydanticCustomError

from unmask.sampling.remasking import REMASKING

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
MIN_TEMPERATURE = 0.01  # above 0 (greedy) but below this, logits / temperature can overflow
MAX_TEMPERATURE = 2.0  # OpenAI's bound
MAX_STOPS = 4  # OpenAI's bound
STRICT = ConfigDict(strict=True, allow_inf_nan=False)


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
        """The OpenAI-style JSON error body."""
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


def _one_of(message: str) -> WrapValidator:
    """One plain error for a union field, instead of one per member type tried."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("invalid_type", message) from None

    return WrapValidator(validate)


def _invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", message)


class DiffusionOptions(BaseModel):
    """Sampler settings a request may change (``diffusion`` key); unknown keys are refused.

    ``steps`` counts denoising steps over the whole completion (LLaDA's meaning) and is
    spread evenly over the blocks, rounded up; ``steps_per_block`` sets them per block.
    ``stream_canvas`` streams every step's canvas, masks shown as the server's placeholder.
    """

    model_config = ConfigDict(extra="forbid", **STRICT)

    block_length: int | None = Field(default=None, ge=1)
    steps: int | None = Field(default=None, ge=1)
    steps_per_block: int | None = Field(default=None, ge=1)
    remasking: str | None = None
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    stream_canvas: bool = False

    @field_validator("steps_per_block")
    @classmethod
    def _not_with_steps(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("steps") is not None:
            raise _invalid("give diffusion.steps or diffusion.steps_per_block, not both")
        return value

    @field_validator("remasking")
    @classmethod
    def _known_rule(cls, value: str | None) -> str | None:
        if value is not None and value not in REMASKING:
            raise _invalid(f"remasking must be one of {list(REMASKING)}, got {value!r}")
        return value


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class GenerationRequest(BaseModel):
    """The fields completions and chat completions share, with their types and bounds."""

    model_config = ConfigDict(extra="allow", **STRICT)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # as vLLM: -1 and 0 turn it off
    n: int | None = Field(default=None, ge=1)
    stop: Annotated[
        str | list[str] | None, _one_of("stop must be a string or a list of strings")
    ] = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)  # what torch takes
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    diffusion: DiffusionOptions | None = None

    @field_validator("temperature")
    @classmethod
    def _finite_logits(cls, value: float | None) -> float | None:
        if value is not None and 0.0 < value < MIN_TEMPERATURE:
            raise _invalid(
                f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]"
            )
        return value

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise _invalid(f"stop takes at most {MAX_STOPS} non-empty strings")
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_streamed(cls, value: StreamOptions | None, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("stream"):
            raise _invalid("stream_options is only allowed with stream: true")
        return value

    def unsupported(self) -> str | None:
        """The first set field this server cannot honour, if any."""
        extra = self.model_extra or {}
        for name in UNSUPPORTED:
            if extra.get(name) not in (None, False, 0, [], {}):
                return name
        return None

    def stops(self) -> list[str]:
        """The stop strings as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(GenerationRequest):
    prompt: Annotated[
        str | list[str] | list[int] | list[list[int]],
        _one_of(
            "prompt must be a string, a list of strings, a list of token ids or a list of "
            "token-id lists"
        ),
    ]

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a list of prompts (texts, or token-id lists)."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]  # type: ignore[return-value]
        return prompt  # type: ignore[return-value]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", **STRICT)

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", **STRICT)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[
        str | list[ContentPart] | None,
        _one_of("content must be a string, a list of content parts or null"),
    ] = None

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
