"""Request bodies of the OpenAI API (and vLLM's extra sampling fields), validated by pydantic.

Unknown fields are accepted and ignored, as OpenAI does; fields we cannot honour
(`logit_bias`, `suffix`, `best_of` other than `n`) are refused by name. The output constraints
(`response_format`, `structured_outputs`, `tools`/`tool_choice`) live in `structured_fields.py`.
Strings with lone surrogates are refused wherever they sit. Numeric fields
carry their bounds (`sampling_params.BOUNDS`) in the schema; `SamplingParams`
enforces them, so the offline API and the server say the same thing.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.openai.structured_fields import ConstrainedOutputFields, ToolFields, arguments_text
from serving.sampling_params import BOUNDS, SamplingParams
from serving.structured.params import StructuredOutputsParams
from serving.text_input import find_lone_surrogate


# Strict types: JSON's true is not the integer 1, nor "1" a number (as the schema says).
STRICT = ConfigDict(extra="allow", strict=True)


def bounded(name: str, default: Any = None) -> Any:
    """A field whose JSON schema states the range `SamplingParams` enforces for `name`."""
    bound = BOUNDS[name]
    low = {"exclusiveMinimum": bound.low} if bound.low_open else {"minimum": bound.low}
    return Field(default, json_schema_extra={**low, "maximum": bound.high})


class _Request(BaseModel):
    model_config = STRICT

    @model_validator(mode="before")
    @classmethod
    def _refuse_lone_surrogates(cls, data: Any) -> Any:
        if (where := find_lone_surrogate(data)) is not None:
            raise ValueError(f"{where} holds a lone UTF-16 surrogate (not valid Unicode text)")
        return data


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class _SamplingFields(ConstrainedOutputFields, _Request):
    model: str
    n: int = bounded("n", 1)
    temperature: float | None = bounded("temperature")
    top_p: float | None = bounded("top_p")
    top_k: int | None = bounded("top_k")
    min_p: float | None = bounded("min_p")
    presence_penalty: float | None = bounded("presence_penalty")
    frequency_penalty: float | None = bounded("frequency_penalty")
    repetition_penalty: float | None = bounded("repetition_penalty")
    seed: int | None = bounded("seed")
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's beam search: `n` beams, ranked by cum_logprob / len ** length_penalty (serving/beam_search.py).
    use_beam_search: bool = False
    length_penalty: float = Field(1.0, ge=-10.0, le=10.0)

    def _check_beam_search(self, wants_logprobs: bool) -> None:
        if self.use_beam_search and (self.stream or wants_logprobs or self.output_constraint()):
            raise ValueError("use_beam_search returns whole beams: no stream, logprobs or structured output")

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def constraint(self) -> StructuredOutputsParams | None:
        """The grammar the output must follow, if any."""
        return self.output_constraint()

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        given = {
            k: v
            for k, v in dict(
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                min_p=self.min_p,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty,
            ).items()
            if v is not None
        }
        return SamplingParams(
            n=self.n,
            seed=self.seed,
            max_tokens=max_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids or [],
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            logprobs=logprobs,
            structured_outputs=self.constraint(),
            **given,
        )


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = bounded("max_tokens", 16)
    logprobs: int | None = bounded("logprobs")
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.suffix:
            raise ValueError("suffix is not supported")
        self._check_beam_search(self.logprobs is not None)
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of different from n is not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: strings or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ImageURL(BaseModel):
    model_config = STRICT

    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(BaseModel):
    """One part of a message's content: text, or an image (`image_url`: data:, http(s) or file: URL)."""

    model_config = STRICT

    type: str
    text: str | None = None
    image_url: ImageURL | None = None

    @model_validator(mode="after")
    def _known_kind(self):
        if self.type not in ("text", "image_url"):
            raise ValueError(f"message content of type {self.type!r} is not supported (text, image_url)")
        if self.type == "text" and self.text is None:
            raise ValueError("a text content part needs a string `text`")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("an image_url content part needs `image_url` with a `url`")
        return self


class CalledFunction(BaseModel):
    model_config = STRICT

    name: str
    arguments: str | dict[str, Any] = "{}"


class MessageToolCall(BaseModel):
    """A call an assistant message made (sent back in the conversation)."""

    model_config = STRICT

    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text or "" for part in self.content)

    @property
    def has_images(self) -> bool:
        return isinstance(self.content, list) and any(part.type == "image_url" for part in self.content)

    def template_message(self) -> dict[str, Any]:
        """The message as chat templates take it: calls' arguments as objects (most templates
        serialise them), the tool message's `tool_call_id` and `name` kept."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": _arguments_object(call.function.arguments)}}
                for call in self.tool_calls
            ]
        return message


def _arguments_object(arguments: str | dict[str, Any]) -> Any:
    """A call's arguments parsed from their JSON string (left as text when they are not JSON)."""
    if isinstance(arguments, dict):
        return arguments
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments_text(arguments)


class ChatCompletionRequest(ToolFields, _SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = bounded("max_tokens")
    max_completion_tokens: int | None = bounded("max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = bounded("logprobs")
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _check(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        self._check_beam_search(self.logprobs)
        return self

    def constraint(self) -> StructuredOutputsParams | None:
        tool_grammar, output_grammar = self.tool_constraint(), self.output_constraint()
        if tool_grammar is not None and output_grammar is not None:
            raise ValueError("tool_choice required or a named function cannot be combined with response_format "
                             "or structured_outputs")
        return tool_grammar or output_grammar

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
