"""Structured output: every reply drawn under a JSON schema's grammar, over many seeds, parses and validates
(jsonschema is the oracle), batched or alone; no whitespace between JSON tokens; the grammar is a stage."""
import json
import subprocess
import sys

import jsonschema
import pytest
import torch

from minigpt.batching import Stream, decode
from minigpt.generation import generate, new_history
from minigpt.json_output import ANY_OBJECT, SchemaError, compile_schema
from minigpt.sampling import SamplingParams, filter_stages
from tests.helpers import REPO

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["colour", "n", "ok", "name"],
          "properties": {"colour": {"enum": ["red", "green", "blue"]}, "n": {"type": "integer", "minimum": 0,
                                                                           "maximum": 99},
                         "ok": {"type": "boolean"}, "name": {"type": "string", "maxLength": 6}}}


def text_of(tokenizer, events):
    return "".join(e.text for e in events), events[-1].finish_reason


@pytest.mark.parametrize("seed", range(12))
def test_sampled_replies_parse_and_validate_against_the_schema(tiny_model, seed):
    model, tokenizer, _ = tiny_model
    params = SamplingParams(temperature=1.0, json_schema=json.dumps(SCHEMA))
    text, finish = text_of(tokenizer, list(generate(model, tokenizer, tokenizer.encode("Answer:"), 60, params,
                                                    seed=seed)))
    assert finish == "eos", text  # the document ended, and only the end-of-text token was allowed after it
    jsonschema.validate(json.loads(text), SCHEMA)
    assert json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False) == text  # no whitespace


def test_json_object_gives_any_object_and_batched_streams_follow_their_own_grammar(tiny_model):
    model, tokenizer, _ = tiny_model
    streams = [Stream(model, tokenizer, tokenizer.encode("Hi"), 40, SamplingParams(
        temperature=1.0, json_schema=schema, repetition_penalty=1.2), seed)
        for seed, schema in enumerate([json.dumps(SCHEMA), ANY_OBJECT, json.dumps(SCHEMA)])]
    events = [s.prefill(100) for s in streams]
    while not all(s.finished for s in streams):
        live = [i for i, s in enumerate(streams) if not s.finished]
        for i, event in zip(live, decode([streams[i] for i in live])):
            events[i].append(event)
    for i, stream_events in enumerate(events):
        text, finish = text_of(tokenizer, stream_events)
        if finish == "eos":
            document = json.loads(text)
            assert isinstance(document, dict)
            if i != 1:
                jsonschema.validate(document, SCHEMA)
        else:  # a budget cut the document short: still a prefix of one (json_object may nest deep)
            assert i == 1 and finish == "length" and text.startswith("{")


def test_the_grammar_is_the_first_stage_and_leaves_only_what_can_follow(tiny_model):
    _, tokenizer, _ = tiny_model
    params = SamplingParams(temperature=0.9, json_schema=json.dumps(SCHEMA))
    history = new_history(params, tokenizer, [1, 2])
    stages = filter_stages(torch.zeros(tokenizer.n_vocab), params, history)
    assert [name for name, _ in stages][:2] == ["raw", "JSON grammar"]
    allowed = torch.isfinite(stages[1][1]).nonzero().flatten().tolist()
    assert allowed and all(tokenizer.decode([t]) in ("{", '{"') for t in allowed)


@pytest.mark.parametrize("schema, words", [("not json", "not a JSON schema"), ('{"type": "bogus"}', "bogus")])
def test_a_schema_that_cannot_be_compiled_says_why(tiny_model, schema, words):
    with pytest.raises(SchemaError, match=words):
        compile_schema(schema, tiny_model[1])


def test_commands_start_without_torch_compiles_stack():
    """The grammar's mask goes through llguidance's numpy helpers: its torch helpers import torch.compile's
    stack (torch._dynamo, sympy), seconds at every command's start. Listed with -X importtime, not timed."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-c", "import minigpt.generate, minigpt.json_output"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert run.returncode == 0 and "minigpt.json_output" in imported
    assert "torch._dynamo" not in imported and "sympy" not in imported
