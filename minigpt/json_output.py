"""Structured output: the tokens that keep a reply on course to be JSON matching a schema, step by step.

The grammar library is llguidance (docs/openai-api.md says why: measured by bench/grammar.py, no
dependencies of its own, kept by the guidance project and used by llama.cpp and vLLM). It compiles a JSON
schema for GPT-2's vocabulary and, at each step, gives the bitmask of the tokens allowed next; the sampler
applies it as its first stage ("JSON grammar", minigpt.sampling). No whitespace is allowed between JSON
tokens (as vLLM's disable_any_whitespace): a small model would otherwise spend its budget on newlines.
When the document is complete, only the end-of-text token is allowed, so the reply ends there.
"""
from __future__ import annotations

import json
from functools import lru_cache

import llguidance
import numpy as np
import llguidance.numpy as llnp  # not llguidance.torch: it imports torch.compile's stack (seconds)
import tiktoken
import torch
from llguidance.tiktoken import lltokenizer_from_encoding

from .tokenizer import EOT

ANY_OBJECT = '{"type": "object"}'  # OpenAI's json_object: any JSON object
COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


class SchemaError(ValueError):
    """A schema the grammar library cannot compile (or that is not JSON)."""


@lru_cache(maxsize=4)
def _lltokenizer(tokenizer: tiktoken.Encoding) -> llguidance.LLTokenizer:
    """The vocabulary as llguidance reads it: built once per tokenizer (about a second for GPT-2's)."""
    return lltokenizer_from_encoding(tokenizer, n_vocab=tokenizer.n_vocab,
                                     eos_token=tokenizer.encode_single_token(EOT))


def compile_schema(schema: str, tokenizer: tiktoken.Encoding) -> str:
    """The grammar of JSON validated by `schema` (a JSON schema's text), checked against the vocabulary:
    SchemaError says what is wrong with it."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.loads(schema), overrides=COMPACT)
    except (ValueError, TypeError) as e:
        raise SchemaError(f"not a JSON schema: {e}") from None
    failed, problems = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, _lltokenizer(tokenizer))
    if failed:
        raise SchemaError(problems[0])
    return grammar


class JsonGrammar:
    """One reply's position in the grammar of a schema: allowed() the next tokens, accept() the chosen one."""

    def __init__(self, schema: str, tokenizer: tiktoken.Encoding):
        lltokenizer = _lltokenizer(tokenizer)
        self.matcher = llguidance.LLMatcher(lltokenizer, compile_schema(schema, tokenizer))
        self.bitmask = llnp.allocate_token_bitmask(1, lltokenizer.vocab_size)
        self.vocab_size = lltokenizer.vocab_size

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """Bool (vocab_size,): the tokens that keep the text a prefix of a valid document (or end it); tokens
        beyond the tokenizer's vocabulary (a padded embedding) never are."""
        llnp.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        # Bit i of 32-bit word j is token 32j + i: little-endian bytes, each unpacked low bit first.
        bits = np.unpackbits(self.bitmask[0].view(np.uint8), bitorder="little")[:self.vocab_size]
        return torch.from_numpy(np.pad(bits, (0, max(0, vocab_size - bits.size)))[:vocab_size].astype(bool))

    def accept(self, token: int) -> None:
        """Follow the chosen token; a token the grammar forbids (forced by a branch) ends its guidance."""
        self.matcher.consume_token(token)
