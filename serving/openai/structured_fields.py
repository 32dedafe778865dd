"""Request fields that constrain the output: `response_format`, vLLM's `structured_outputs`, `tools` and
`tool_choice`; and how they become one `StructuredOutputsParams`.

`tool_choice` "required" and a named function are enforced by a grammar (as vLLM does): a named
function's output is its arguments object (schema: the function's `parameters`); "required"
makes the model write a JSON list of `{"name", "parameters"}` objects, one of the tools each.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.structured.params import MAX_CHOICES, StructuredOutputsParams

STRICT = ConfigDict(extra="allow", strict=True)
MAX_TOOLS = 128


class JsonSchemaFormat(BaseModel):
    model_config = STRICT

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = STRICT

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        return self


class StructuredOutputsRequest(BaseModel):
    """vLLM's `structured_outputs` request field."""

    model_config = STRICT

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = Field(None, max_length=MAX_CHOICES)
    grammar: str | None = None
    whitespace_flexible: bool = False

    def params(self) -> StructuredOutputsParams:
        return StructuredOutputsParams(json=self.json_, json_object=bool(self.json_object), regex=self.regex,
                                       choice=self.choice, grammar=self.grammar,
                                       whitespace_flexible=self.whitespace_flexible)


class FunctionDefinition(BaseModel):
    model_config = STRICT

    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = STRICT

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = STRICT

    name: str


class NamedToolChoice(BaseModel):
    model_config = STRICT

    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def _parameters(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}


def required_calls_schema(tools: list[Tool], parallel: bool = True) -> dict[str, Any]:
    """A non-empty JSON list of calls, each `{"name": <a tool>, "parameters": <its arguments>}` (one call
    only when not `parallel`)."""
    calls = [
        {"type": "object", "properties": {"name": {"const": t.function.name}, "parameters": _parameters(t)},
         "required": ["name", "parameters"]}
        for t in tools
    ]
    schema = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    return schema if parallel else {**schema, "maxItems": 1}


class ConstrainedOutputFields(BaseModel):
    """The constraint fields every generation request takes (mixed into the request models)."""

    model_config = STRICT

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None

    def output_constraint(self) -> StructuredOutputsParams | None:
        fmt = self.response_format
        if fmt is not None and fmt.type != "text" and self.structured_outputs is not None:
            raise ValueError("give either response_format or structured_outputs, not both")
        if self.structured_outputs is not None:
            return self.structured_outputs.params()
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        return StructuredOutputsParams(json=fmt.json_schema.schema_)


class ToolFields(BaseModel):
    """`tools` and `tool_choice` of a chat request."""

    model_config = STRICT

    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None  # False: tool_choice "required" makes exactly one call

    @model_validator(mode="after")
    def _check_tools(self):
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names function {self.tool_choice.function.name!r}, which is not in tools")
        return self

    @property
    def effective_tool_choice(self) -> ToolChoice:
        """What the request asks for: OpenAI's default is "auto" with tools, "none" without."""
        if self.tool_choice is not None:
            return self.tool_choice if self.tools else "none"
        return "auto" if self.tools else "none"

    def named_tool(self) -> Tool | None:
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return next(t for t in self.tools if t.function.name == choice.function.name)
        return None

    def tool_constraint(self) -> StructuredOutputsParams | None:
        """The grammar that enforces "required" or a named function (None for "auto" and "none")."""
        if (tool := self.named_tool()) is not None:
            return StructuredOutputsParams(json=_parameters(tool))
        if self.effective_tool_choice == "required":
            return StructuredOutputsParams(json=required_calls_schema(self.tools, self.parallel_tool_calls is not False))
        return None

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template gets them (none for tool_choice "none")."""
        if not self.tools or self.effective_tool_choice == "none":
            return None
        return [t.model_dump(by_alias=True, exclude_none=True) for t in self.tools]


def arguments_text(arguments: Any) -> str:
    """A call's arguments as the OpenAI API sends them: a JSON string."""
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
