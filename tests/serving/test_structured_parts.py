"""Structured output, tool-call and reasoning parsers without a model: scripted outputs, whole and streamed."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from serving.openai.chat_output import ChoiceStream, assistant_message
from serving.openai.reasoning import REASONING_PARSERS
from serving.openai.tool_parsers import TOOL_PARSERS
from serving.openai.tool_parsers.forced import NamedFunctionParser, RequiredCallsParser
from serving.sampling_params import SamplingParams
from serving.structured import StructuredOutputsParams
from serving.structured.bitmask import apply_token_bitmask, fill_bitmask
from serving.structured.compiler import GrammarCompiler, bitmask_width
from serving.structured.schema_check import unsupported_features
from tests.tiny_models import VOCAB, build_tokenizer

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "metric": {"type": "boolean"}, "hours": {"type": "array"}}}}}]
WEATHER = ("get_weather", {"city": "Oslo", "days": 2})
SECOND = ("get_weather", {"city": "Rome", "days": 1, "metric": True})

# (parser, scripted model output, content, calls)
SCRIPTS = [
    ("hermes", 'Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>'
               '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome", "days": 1, "metric": true}}</tool_call>',
     "Checking.", [WEATHER, SECOND]),
    ("hermes", "No tools needed <tool_ here.", "No tools needed <tool_ here.", []),
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}', None, [WEATHER]),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}', None, [WEATHER]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}; '
                    '{"name": "get_weather", "parameters": {"city": "Rome", "days": 1, "metric": true}}',
     None, [WEATHER, SECOND]),
    ("llama3_json", "  The answer is {not a call}.", "  The answer is {not a call}.", []),
    ("mistral", 'Sure. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}, '
                '{"name": "get_weather", "arguments": {"city": "Rome", "days": 1, "metric": true}}]',
     "Sure. ", [WEATHER, SECOND]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo", "days": 2}[TOOL_CALLS]get_weather[ARGS]'
                '{"city": "Rome", "days": 1, "metric": true}', None, [WEATHER, SECOND]),
    ("qwen3_coder", "Let me look.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n"
                    "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>", "Let me look.\n", [WEATHER]),
    ("qwen3_coder", "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n<parameter=days>\n1\n"
                    "</parameter>\n<parameter=metric>\ntrue\n</parameter>\n</function>\n</tool_call>", None, [SECOND]),
]


def streamed(parser, text: str, reasoning=None, step: int = 3) -> tuple[str, str, list[dict]]:
    """Feed `text` in `step`-character deltas: (content, reasoning, calls added up by index)."""
    stream = ChoiceStream(reasoning, parser)
    content, thought, calls = "", "", {}
    pieces = [text[i:i + step] for i in range(0, len(text), step)]
    for i, piece in enumerate(pieces):
        for delta in stream.feed(piece, final=i == len(pieces) - 1):
            content += delta.get("content", "")
            thought += delta.get("reasoning_content", "")
            for item in delta.get("tool_calls", []):
                call = calls.setdefault(item["index"], {"id": item.get("id"), "name": "", "arguments": ""})
                assert "id" not in item or (item["id"].startswith("call_") and item["type"] == "function")
                call["name"] += item["function"].get("name", "")
                call["arguments"] += item["function"]["arguments"]
    return content, thought, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("name, text, content, calls", SCRIPTS, ids=[f"{s[0]}-{i}" for i, s in enumerate(SCRIPTS)])
def test_tool_parsers_read_scripted_outputs_whole_and_streamed(name, text, content, calls):
    parser = TOOL_PARSERS[name](TOOLS)
    message = assistant_message(text, None, parser)
    assert message["content"] == content
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls", [])]
    assert got == calls
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in message.get("tool_calls", []))
    for step in (1, 4):
        s_content, _, s_calls = streamed(TOOL_PARSERS[name](TOOLS), text, step=step)
        assert (s_content or None) == content
        assert [(c["name"], json.loads(c["arguments"])) for c in s_calls] == calls


def test_forced_choice_outputs_become_calls():
    required = '[{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}, ' \
               '{"name": "get_weather", "parameters": {"city": "Rome", "days": 1, "metric": true}}]'
    for parser, text, want in [(RequiredCallsParser(), required, [WEATHER, SECOND]),
                               (NamedFunctionParser("get_weather"), '{"city": "Oslo", "days": 2}', [WEATHER])]:
        message = assistant_message(text, None, parser)
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == want
        assert message["content"] is None
        _, _, calls = streamed(parser, text, step=5)
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == want


@pytest.mark.parametrize("name, text, thought, answer", [
    ("deepseek_r1", "First, 2+2.</think>It is 4.", "First, 2+2.", "It is 4."),
    ("deepseek_r1", "<think>Hmm.</think>\n\nYes.", "Hmm.", "\n\nYes."),
    ("deepseek_r1", "Still thinking </thi", "Still thinking </thi", None),
    ("qwen3", "<think>a < b</think>b wins", "a < b", "b wins"),
    ("qwen3", "No thinking here </think>", None, "No thinking here </think>"),
    ("qwen3", "<thin", None, "<thin"),
])
def test_reasoning_parsers_split_whole_and_streamed(name, text, thought, answer):
    parser = REASONING_PARSERS[name]
    message = assistant_message(text, parser, None)
    assert (message["reasoning_content"], message["content"]) == (thought, answer)
    for step in (1, 3):
        content, reasoning, _ = streamed(None, text, reasoning=parser, step=step)
        assert (reasoning or None, content or None) == (thought, answer)


def test_reasoning_then_tool_calls():
    text = 'Need weather.</think>\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}</tool_call>'
    message = assistant_message(text, REASONING_PARSERS["deepseek_r1"], TOOL_PARSERS["hermes"](TOOLS))
    assert message["reasoning_content"] == "Need weather." and message["content"] is None
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == WEATHER[1]


def test_unsupported_schema_features_are_named_with_their_place():
    schema = {"type": "object", "properties": {
        "a": {"type": "array", "uniqueItems": True, "items": {"type": "string", "format": "color"}},
        "b/c": {"allOf": [{"type": "integer"}, {"minimum": 1}]},
        "d": {"if": {"type": "string"}, "then": {"minLength": 1}},
        "ok": {"type": "string", "format": "date", "pattern": "^x", "maxLength": 3}}}
    assert unsupported_features(schema) == [
        "uniqueItems at /properties/a", "format 'color' at /properties/a/items",
        "allOf with more than one schema at /properties/b~1c", "if at /properties/d", "then at /properties/d"]
    assert unsupported_features({"type": "object", "properties": {"x": {"type": "integer", "minimum": 0}}}) == []


@pytest.mark.parametrize("fields, error", [
    ({}, "exactly one"),
    ({"regex": "a", "grammar": "root ::= \"a\""}, "exactly one"),
    ({"choice": []}, "choice"),
    ({"choice": ["a", 3]}, "choice"),
    ({"json": 5}, "JSON schema"),
    ({"regex": "a" * 70000}, "longer than"),
])
def test_structured_params_refuse_bad_values(fields, error):
    with pytest.raises(ValueError, match=error):
        StructuredOutputsParams(**fields)
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"regex": "a"})


@pytest.fixture(scope="module")
def compiler():
    return GrammarCompiler(build_tokenizer(), VOCAB, [2])


def test_compiled_grammars_are_cached_and_bad_ones_named(compiler):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    first = compiler.compile(StructuredOutputsParams(json=schema))
    assert compiler.compile(StructuredOutputsParams(json=json.dumps(schema))) is first
    assert compiler.compile(StructuredOutputsParams(json=schema, whitespace_flexible=True)) is not first
    # Properties are written in the schema's order, which is part of the cache key.
    reordered = {**schema, "properties": {"m": {"type": "boolean"}, "n": {"type": "integer"}}, "required": ["n", "m"]}
    matcher = compiler.matcher(StructuredOutputsParams(json=reordered))
    assert matcher.accept_string('{"m": true, "n": 1}') and matcher.is_completed()
    any_object = compiler.matcher(StructuredOutputsParams(json_object=True))
    assert any_object.accept_string('{"a": [1, {"b": null}]}') and any_object.is_completed()
    for params, error in [(StructuredOutputsParams(regex="a(b"), "regex could not be compiled"),
                          (StructuredOutputsParams(json="{nope"), "not valid JSON"),
                          (StructuredOutputsParams(json={"not": {}}), "not at /"),
                          (StructuredOutputsParams(grammar="root ::= other"), "grammar could not be compiled")]:
        with pytest.raises(ValueError, match=error):
            compiler.compile(params)


def test_bitmask_rows_forbid_exactly_what_the_matcher_forbids(compiler):
    tokenizer = build_tokenizer()
    matcher = compiler.matcher(StructuredOutputsParams(choice=["ab", "b\"c"]))
    mask = fill_bitmask([(1, matcher)], 3, bitmask_width(VOCAB))
    assert (mask[[0, 2]] == -1).all()  # rows without a grammar: every token allowed
    logits = np.random.RandomState(0).randn(3, VOCAB).astype(np.float32)
    masked = np.asarray(apply_token_bitmask(jnp.asarray(logits), jnp.asarray(mask)))
    np.testing.assert_array_equal(masked[[0, 2]], logits[[0, 2]])
    allowed = {tokenizer.decode([t]) for t in np.flatnonzero(np.isfinite(masked[1]))}
    assert allowed == {"a", "b"}
    np.testing.assert_array_equal(masked[1][np.isfinite(masked[1])], logits[1][np.isfinite(masked[1])])
    top = np.zeros((1, 4), np.int32)
    top[0, 3] = np.int32(-2**31)  # bit 31 of the last word: token 127
    assert np.flatnonzero(np.isfinite(np.asarray(apply_token_bitmask(jnp.zeros((1, VOCAB)), jnp.asarray(top))))).tolist() == [127]


def test_draft_rows_walk_the_drafts_and_leave_the_matcher_as_it_was(compiler):
    from serving.structured.step_masks import StepMasks

    masks = StepMasks(build_tokenizer(), VOCAB, [2])
    masks._compiler = compiler  # noqa: SLF001 - share the module's compiler
    ids = {build_tokenizer().decode([t]): t for t in range(3, VOCAB)}
    a, b, c, comma, eos = ids["a"], ids["b"], ids["c"], ids[","], 2
    matcher = compiler.matcher(StructuredOutputsParams(regex="a[ab]{1,2},?"))
    assert matcher.accept_token(a)

    def expected(tokens: list[int]) -> np.ndarray:
        """The row of a fresh matcher that read `a` then `tokens`."""
        fresh = compiler.matcher(StructuredOutputsParams(regex="a[ab]{1,2},?"))
        assert all(fresh.accept_token(t) for t in [a, *tokens])
        return masks.row(fresh)

    rows, num = masks.draft_rows(matcher, [b, a, c, b], keep_rejected=False)  # c breaks the grammar
    assert num == 2 and rows.shape == (5, masks.width)
    for j, before in enumerate([[], [b], [b, a]]):
        np.testing.assert_array_equal(rows[j], expected(before))
    assert (rows[3:] == -1).all()
    assert masks.draft_rows(matcher, [b, a, c, b], keep_rejected=True)[1] == 3  # a drawn draft is tested, then rejected
    rows, num = masks.draft_rows(matcher, [b, comma, eos, a], keep_rejected=False)  # EOS ends the grammar
    assert num == 3 and (rows[3:] == -1).all()
    np.testing.assert_array_equal(rows[2], expected([b, comma]))
    rows, num = masks.draft_rows(matcher, [b], keep_rejected=False)
    assert num == 1 and np.array_equal(rows[1], expected([b]))
    np.testing.assert_array_equal(masks.row(matcher), expected([]))  # rolled back to where it stood
    assert not matcher.is_terminated()


TOOL_TEMPLATE = (
    "{% for t in tools or [] %}tool {{ t['function']['name'] }}\n{% endfor %}"
    "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %} call {{ c['id'] }} {{ c['function']['name'] }} "
    "{{ c['function']['arguments']['city'] }}{% endfor %}"
    "{% if m.get('tool_call_id') %} for {{ m['tool_call_id'] }}{% endif %}{{ '\\n' }}{% endfor %}"
)


def test_tool_messages_and_tools_reach_the_chat_template():
    from types import SimpleNamespace

    from serving.openai.app import OpenAIServer
    from serving.openai.protocol import ChatCompletionRequest

    tokenizer = build_tokenizer()
    tokenizer.chat_template = TOOL_TEMPLATE
    body = ChatCompletionRequest.model_validate({"model": "m", "tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]})
    server = SimpleNamespace(tokenizer=tokenizer, prepare=lambda text, add_special_tokens: text)
    assert OpenAIServer.chat_prompt(server, body) == (
        "tool get_weather\nuser:Weather?\nassistant: call call_1 get_weather Oslo\ntool:sunny for call_1\n")
    no_tools = body.model_copy(update={"tool_choice": "none"})
    assert not OpenAIServer.chat_prompt(server, no_tools).startswith("tool ")
