"""Per-token cost of constraining GPT-2's 50,257-token vocabulary to a JSON schema, for each grammar library
installed (xgrammar, llguidance, outlines-core): the one-off set-up for the vocabulary, the time to compile
a schema into a matcher (once per request), and per token the time to compute the allowed-token mask, apply
it to the logits and advance the matcher by the token, walking a valid document token by token (no
whitespace between JSON tokens, as the server asks).

    python -m bench.grammar [--reps 20]

Prints milliseconds (median over the repetitions) beside a decode step's budget; libraries that are
not installed are skipped. The server uses one of them (docs/openai-api.md says which, and why).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import tiktoken
import torch

from minigpt.tokenizer import EOT_ID, load_tokenizer
from tests.helpers.checkpoints import write_tokenizer

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
DOCUMENT = '{"name":"Ada Lovelace, the first programmer","age":36,"tags":["mathematics","poetry","engines"]}'

# A library: its set-up for the vocabulary returns new(), which compiles the schema into a fresh matcher
# (per request); the matcher's step(logits, token) masks the logits and advances by the token.
Step = Callable[[torch.Tensor, int], None]


def xgrammar_matcher(tokenizer: tiktoken.Encoding) -> Callable[[], Step]:
    import xgrammar as xgr
    vocab = [tokenizer.decode_single_token_bytes(i) for i in range(tokenizer.n_vocab)]
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=tokenizer.n_vocab, stop_token_ids=[EOT_ID])
    compiler = xgr.GrammarCompiler(info)

    def new() -> Step:
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
        matcher, mask = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, info.vocab_size)

        def step(logits: torch.Tensor, token: int) -> None:
            matcher.fill_next_token_bitmask(mask)
            xgr.apply_token_bitmask_inplace(logits, mask)
            assert matcher.accept_token(token), token
        return step
    return new


def llguidance_matcher(tokenizer: tiktoken.Encoding) -> Callable[[], Step]:
    import llguidance
    import llguidance.torch as llt
    from llguidance.tiktoken import lltokenizer_from_encoding
    lltokenizer = lltokenizer_from_encoding(tokenizer, n_vocab=tokenizer.n_vocab, eos_token=EOT_ID)

    def new() -> Step:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
        matcher, mask = llguidance.LLMatcher(lltokenizer, grammar), llt.allocate_token_bitmask(1, tokenizer.n_vocab)

        def step(logits: torch.Tensor, token: int) -> None:
            llt.fill_next_token_bitmask(matcher, mask, 0)
            llt.apply_token_bitmask_inplace(logits, mask)
            assert matcher.consume_token(token), matcher.get_error()
        return step
    return new


def outlines_core_matcher(tokenizer: tiktoken.Encoding) -> Callable[[], Step]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    tokens: dict[str, list[int]] = {}
    for i in range(tokenizer.n_vocab):
        if i != EOT_ID:  # outlines-core keys tokens by text: a token that is not whole UTF-8 has no entry
            try:
                tokens.setdefault(tokenizer.decode_single_token_bytes(i).decode("utf-8"), []).append(i)
            except UnicodeDecodeError:
                pass
    vocabulary = Vocabulary(EOT_ID, tokens)

    def new() -> Step:
        guide = Guide(Index(build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern=""), vocabulary))

        def step(logits: torch.Tensor, token: int) -> None:
            allowed = torch.tensor(guide.get_tokens())
            logits.masked_fill_(~torch.zeros_like(logits, dtype=torch.bool).index_fill_(-1, allowed, True), -torch.inf)
            guide.advance(token)
        return step
    return new


LIBRARIES = {"xgrammar": xgrammar_matcher, "llguidance": llguidance_matcher, "outlines-core": outlines_core_matcher}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        write_tokenizer(Path(folder))
        tokenizer = load_tokenizer(folder)
    document = tokenizer.encode_ordinary(DOCUMENT) + [EOT_ID]
    print(f"{len(document)} tokens of a {len(DOCUMENT)}-character document, vocabulary {tokenizer.n_vocab:,}")
    for name, make in LIBRARIES.items():
        try:
            start = time.perf_counter()
            new = make(tokenizer)
        except ImportError:
            print(f"{name:14s} not installed")
            continue
        setup_s, compile_s, per_token = time.perf_counter() - start, [], []
        for _ in range(args.reps):
            start = time.perf_counter()
            step, logits = new(), torch.zeros(1, tokenizer.n_vocab)
            compile_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            for token in document[:-1]:  # the end-of-text token is allowed after the document, not consumed
                step(logits, token)
            per_token.append((time.perf_counter() - start) / (len(document) - 1))
        print(f"{name:14s} set-up {setup_s * 1e3:7.1f} ms   compile {statistics.median(compile_s) * 1e3:7.2f} ms   "
              f"per token {statistics.median(per_token) * 1e3:6.3f} ms")


if __name__ == "__main__":
    main()
