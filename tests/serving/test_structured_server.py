"""Structured output and tool choice through `serve` (a tiny random model) with the official openai client.

The random model would write anything; the grammar must make every answer parse and match.
Each request's max_tokens covers the longest text its schema allows, so every answer completes.
"""

from __future__ import annotations

import json
import random
import re
import signal
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from tests.serving.helpers import start_server

pytestmark = pytest.mark.xdist_group("structured_server")

MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "Answer in JSON."}]
WORDS = ["red", "green", "blue", 1, 2.5, None, True, "a\"b"]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "stop_timer", "parameters": {
        "type": "object", "properties": {"now": {"type": "boolean"}}, "required": ["now"],
        "additionalProperties": False}}},
]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    folder, _ = tiny_checkpoint("qwen3-qknorm")
    base, proc, lines = start_server(
        [str(folder), "--served-model-name", MODEL, "--max-model-len", "256", "--page-size", "32",
         "--max-num-seqs", "8", "--max-num-batched-tokens", "8", "--log-level", "warning",
         "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"])
    yield base
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    kinds = ["integer", "boolean", "enum", "string", "pattern", "null", "const"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 200)}
    if kind == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(1, 4))}
    if kind == "const":
        return {"const": rng.choice(WORDS)}
    if kind == "string":
        return {"type": "string", "minLength": 1, "maxLength": rng.randint(1, 5)}
    if kind == "pattern":
        return {"type": "string", "pattern": "^[a-c]{1,3}x$"}
    if kind in ("boolean", "null"):
        return {"type": kind}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": rng.randint(0, 1), "maxItems": 2}
    return random_object(rng, depth)


def random_object(rng: random.Random, depth: int = 0) -> dict:
    names = rng.sample(["id", "name", "ok", "tags", "x", "value"], rng.randint(1, 3))
    return {"type": "object", "properties": {n: random_schema(rng, depth + 1) for n in names},
            "required": names, "additionalProperties": False}


def longest(schema: dict) -> int:
    """An upper bound on the characters of any compact JSON text `schema` accepts."""
    if "enum" in schema or "const" in schema:
        return max(len(json.dumps(v)) for v in schema.get("enum", [schema.get("const")]))
    kind = schema["type"]
    if kind == "integer":
        return max(len(str(schema["minimum"])), len(str(schema["maximum"])))
    if kind == "string":
        return 2 + 2 * schema.get("maxLength", 5)  # every character possibly escaped
    if kind == "object":
        return 2 + sum(len(json.dumps(k)) + 4 + longest(v) for k, v in schema["properties"].items())
    if kind == "array":
        return 2 + schema["maxItems"] * (longest(schema["items"]) + 2)
    return 5


def test_json_schema_answers_validate(client):
    rng = random.Random(0)
    schemas = []
    while len(schemas) < 50:
        schema = random_object(rng)
        if longest(schema) <= 60:
            schemas.append(schema)

    def ask(i: int) -> tuple[dict, str]:
        schema = schemas[i]
        response = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=longest(schema) + 1, temperature=1.0, seed=i,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}})
        return schema, response.choices[0]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(len(schemas))))
    for schema, choice in answers:
        assert choice.finish_reason == "stop", (schema, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_n_and_stream(client):
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=1.0, seed=3, n=3,
                                           response_format={"type": "json_object"})
    streamed = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=1.0,
                                                   seed=3, n=3, stream=True, response_format={"type": "json_object"}))
    for choice in whole.choices:
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices[0].index == choice.index)
        assert text == choice.message.content  # the same seed: the same answer, streamed or not
        assert text.startswith("{")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_regex_and_choice_always_match(client, endpoint):
    regex, choices = r"[a-d]{2,4}-[0-9]{1,2}", ["yes", "no", "maybe \"so\""]

    def ask(extra: dict, seed: int) -> str:
        common = dict(model=MODEL, max_tokens=12, temperature=1.5, seed=seed, extra_body={"structured_outputs": extra})
        if endpoint == "chat":
            return client.chat.completions.create(messages=MESSAGES, **common).choices[0].message.content
        return client.completions.create(prompt="Pick:", **common).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        regex_answers = list(pool.map(lambda s: ask({"regex": regex}, s), range(8)))
        choice_answers = list(pool.map(lambda s: ask({"choice": choices}, s), range(8)))
    assert all(re.fullmatch(regex, a) for a in regex_answers), regex_answers
    assert set(choice_answers) <= set(choices) and len(set(choice_answers)) > 1


def check_calls(calls, names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        tool = next(t for t in TOOLS if t["function"]["name"] == call.function.name)
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def streamed_calls(chunks) -> list[dict]:
    """Tool calls added up from stream deltas as the openai client documents (by index)."""
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for item in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(item.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = item.id or call["id"]
            if item.function:
                call["name"] += item.function.name or ""
                call["arguments"] += item.function.arguments or ""
    return [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_choice_gives_well_formed_calls(client, tool_choice):
    named = isinstance(tool_choice, dict)
    # One call at most (parallel_tool_calls false), so max_tokens covers the longest answer.
    common = dict(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice, max_tokens=90,
                  temperature=1.0, parallel_tool_calls=False)
    for seed in range(3):
        choice = client.chat.completions.create(seed=seed, **common).choices[0]
        check_calls(choice.message.tool_calls, {"get_weather"} if named else {"get_weather", "stop_timer"})
        assert choice.finish_reason == ("stop" if named else "tool_calls") and not choice.message.content
        chunks = list(client.chat.completions.create(seed=seed, stream=True, **common))
        calls = streamed_calls(chunks)
        assert [(c["name"], c["arguments"]) for c in calls] == \
            [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
        assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_hermes_parser_reads_scripted_calls(client):
    """The model's text is scripted with a one-string `choice` grammar; the hermes parser reads it."""
    script = ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n'
              '</tool_call>\n<tool_call>\n{"name": "stop_timer", "arguments": {"now": true}}\n</tool_call>')
    common = dict(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=200, temperature=0,
                  extra_body={"structured_outputs": {"choice": [script]}})
    message = client.chat.completions.create(**common).choices[0].message
    assert message.content == "Let me check."
    want = [("get_weather", {"city": "Oslo", "days": 2}), ("stop_timer", {"now": True})]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == want
    chunks = list(client.chat.completions.create(stream=True, **common))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Let me check."
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed_calls(chunks)] == want
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("body, named", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}, "b": {"not": {}}}}}}},
     "uniqueItems at /properties/a"),
    ({"structured_outputs": {"regex": "a(b"}}, "regex"),
    ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
])
def test_bad_constraints_are_400s_naming_the_problem(client, body, named):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, extra_body=body)
    message = caught.value.body["message"]
    assert named in message
    if named.startswith("uniqueItems"):
        assert "not at /properties/b" in message


def test_qwen3_reasoning_parser_splits_a_scripted_answer(client):
    script = "<think>The user wants JSON.</think>\n{}"
    common = dict(model=MODEL, messages=MESSAGES, max_tokens=60, temperature=0,
                  extra_body={"structured_outputs": {"choice": [script]}})
    message = client.chat.completions.create(**common).choices[0].message
    assert (message.reasoning_content, message.content) == ("The user wants JSON.", "\n{}")
    chunks = list(client.chat.completions.create(stream=True, **common))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "The user wants JSON."
    assert "".join(d.content or "" for d in deltas) == "\n{}"
