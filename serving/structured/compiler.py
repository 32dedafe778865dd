"""Compiling `StructuredOutputsParams` into xgrammar grammars, once per distinct constraint.

`GrammarCompiler` holds the tokenizer's xgrammar view (every token's bytes, the stop tokens)
and an LRU cache of compiled grammars keyed by (kind, spec, whitespace), so a schema that
many requests share compiles once. Compiling is thread-safe: the server compiles while it
validates a request (a bad schema is its 400), the engine gets the cached grammar when the
request is added. A matcher (per sequence) walks a compiled grammar token by token and
fills that sequence's row of the token bitmask.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any, Iterable

from serving.structured.params import StructuredOutputsParams
from serving.structured.schema_check import unsupported_features

DEFAULT_CACHE_SIZE = 256  # compiled grammars kept (least recently used dropped first)


def bitmask_width(vocab_size: int) -> int:
    """int32 words per bitmask row: bit (t % 32) of word (t // 32) allows token t."""
    return -(-vocab_size // 32)


def _choice_grammar(choices: Iterable[str]) -> str:
    # EBNF string literals take JSON's escapes.
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _schema(spec: str) -> Any:
    try:
        return json.loads(spec)
    except json.JSONDecodeError as e:
        raise ValueError(f"the JSON schema is not valid JSON: {e}") from None


class GrammarCompiler:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int], *,
                 cache_size: int = DEFAULT_CACHE_SIZE, max_threads: int = 1):
        try:
            import xgrammar as xgr
        except ImportError:
            raise ValueError("structured output is not available on this server: xgrammar is not installed "
                             "(pip install 'jaxllm[structured]')") from None

        if tokenizer is None:
            raise ValueError("structured output needs the model's tokenizer")
        self._xgr = xgr
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=sorted(stop_token_ids) or None)
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=max_threads, cache_enabled=False)
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._cache_size = max(1, cache_size)
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled grammar of `params` (cached); ValueError naming what is wrong with it."""
        key = params.key
        with self._lock:
            if key in self._cache:
                self.hits += 1
                self._cache.move_to_end(key)
                return self._cache[key]
        compiled = self._compile(params)
        with self._lock:
            self.misses += 1
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, params: StructuredOutputsParams) -> Any:
        kind, spec = params.kind, params.spec
        if kind == "json":
            schema = _schema(spec)
            if not isinstance(schema, (dict, bool)):
                raise ValueError("the JSON schema must be an object")
            if problems := unsupported_features(schema):
                raise ValueError(f"the JSON schema uses features structured output does not support: "
                                 f"{', '.join(problems)}")
        try:
            if kind == "json":
                return self._compiler.compile_json_schema(spec, any_whitespace=params.whitespace_flexible,
                                                          strict_mode=True)
            if kind == "json_object":
                return self._compiler.compile_json_schema('{"type": "object"}',
                                                          any_whitespace=params.whitespace_flexible)
            if kind == "regex":
                return self._compiler.compile_regex(spec)
            if kind == "choice":
                return self._compiler.compile_grammar(_choice_grammar(params.choice))
            return self._compiler.compile_grammar(spec)
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar's parse errors: the first line says what is wrong
            reason = str(e).strip().splitlines()[0].split(": ", 1)[-1] if str(e).strip() else repr(e)
            raise ValueError(f"structured_outputs.{kind} could not be compiled: {reason}") from None

    def matcher(self, params: StructuredOutputsParams) -> Any:
        """A fresh matcher (one per sequence) over `params`' compiled grammar."""
        return self._xgr.GrammarMatcher(self.compile(params))
