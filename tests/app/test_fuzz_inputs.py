"""Hypothesis fuzzing of the app-side and training-side entry points: the chat settings, chat histories,
model names and adapter paths, adapter_config.json, and Alpaca training records. Each input gives a
valid result or the entry point's own error type with a one-line message; no other exception escapes.
"""
import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora.alpaca import parse_records, read_raw
from lora.batches import tokenize
from minigpt import CheckpointError
from minigpt.adapters import AdapterConfig, AdapterError, read_adapter, resolve_adapter
from minigpt.serve.conversation import (
    BASE,
    MAX_SEED,
    MAX_TEMPERATURE,
    MODES,
    ChatInputError,
    build_prompt,
    read_request,
)
from minigpt.tokenizer import EOT_ID
from minigpt.weights import resolve_snapshot
from tests.minigpt.test_fuzz import ODD_PIECES, odd_text

pytestmark = pytest.mark.slow

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.function_scoped_fixture])
json_scalar = (st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats() | st.text(max_size=10)
               | st.sampled_from(ODD_PIECES))
json_value = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
# What a Gradio slider, number box or API client can hand over.
control = (json_scalar | st.sampled_from([float("nan"), float("inf"), -1e308, 1e-320, 10**400, "1e400", " 7 ", ""])
           | st.lists(st.integers(), max_size=2))


def one_line(error: Exception) -> bool:
    return bool(str(error)) and "\n" not in str(error) and "Traceback" not in str(error)


@FUZZ
@given(temperature=control, top_k=control, top_p=control, max_new=control, seed=control,
       context=st.sampled_from([16, 128, 1024]))
def test_chat_settings_are_valid_or_refused_with_a_message(temperature, top_k, top_p, max_new, seed, context):
    try:
        result, notices = read_request(BASE, temperature, top_k, top_p, max_new, seed, 1.0, context)
    except ChatInputError as e:
        assert one_line(e)
        return
    p = result.params
    assert 0 <= p.temperature <= MAX_TEMPERATURE and 0 < p.top_p <= 1 and p.top_k >= 0
    assert 1 <= result.max_new_tokens <= context // 2
    assert result.seed is None or 0 <= result.seed <= MAX_SEED
    assert all(one_line(ValueError(n)) for n in notices)


text_part = st.fixed_dictionaries({"type": st.just("text"), "text": odd_text})
content = st.one_of(odd_text, st.lists(text_part | json_value, max_size=3), st.none(), json_scalar)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", ""]),
                                 "content": content})


@FUZZ
@given(history=st.lists(message, max_size=8), mode=st.sampled_from([*MODES, "", "GPT-5", "\ud800"]),
       budget=st.integers(1, 1024))
def test_any_chat_history_gives_a_fitting_prompt_or_a_message(tiny_model, history, mode, budget):
    _, tokenizer, _ = tiny_model
    try:
        prompt = build_prompt(mode, history, tokenizer, budget)
    except ChatInputError as e:
        assert one_line(e)
        return
    assert len(prompt.ids) <= budget and EOT_ID not in prompt.ids
    assert prompt.ids == tokenizer.encode_ordinary(prompt.text)
    assert prompt.text.endswith("Assistant:") if mode == BASE else prompt.text.endswith("### Response:\n")


@FUZZ
@given(raw=st.lists(json_value | st.fixed_dictionaries({"instruction": odd_text, "output": odd_text},
                                                       optional={"input": odd_text | json_scalar}), max_size=10),
       max_len=st.integers(2, 64))
def test_training_records_are_kept_or_reported_by_index(tiny_model, raw, max_len):
    _, tokenizer, _ = tiny_model
    records, problems = parse_records(raw)
    assert len(records) + len(problems) == len(raw)
    indices = [int(re.match(r"record (\d+): \S", p).group(1)) for p in problems]
    assert indices == sorted(set(indices)) and all(i < len(raw) for i in indices)
    examples, report = tokenize(records, tokenizer, max_len)
    assert report.kept == len(examples) and report.kept + report.dropped == len(records)
    for example in examples:
        assert 1 <= example.n_prompt < len(example.ids) <= max_len


@FUZZ
@given(data=st.binary(max_size=200) | json_value.map(lambda v: json.dumps(v).encode()),
       suffix=st.sampled_from([".json", ".jsonl"]))
def test_any_data_file_gives_items_or_a_value_error(tmp_path, data, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(data)
    try:
        items = read_raw(path)
    except ValueError as e:
        assert one_line(e)
        return
    assert isinstance(items, list)
    parse_records(items)  # every item, however odd, is either a record or a reported problem


@FUZZ
@given(config=json_value | st.fixed_dictionaries(
    {"peft_type": st.sampled_from(["LORA", "IA3", None])},
    optional={"r": json_scalar, "lora_alpha": json_scalar, "lora_dropout": json_scalar, "bias": json_scalar,
              "target_modules": json_value, "use_dora": json_scalar}))
def test_any_adapter_config_is_read_or_refused(config):
    try:
        parsed = AdapterConfig.from_peft_json(config)
    except AdapterError as e:
        assert one_line(e)
        return
    assert isinstance(parsed.r, int) and parsed.r >= 1  # a NaN lora_alpha is refused at load: test_faults
    assert 0 <= parsed.lora_dropout < 1


@FUZZ
@given(config_bytes=st.binary(max_size=100) | st.sampled_from([b"", b"{}", b"\xff\xfe", b"[]", b"null"]),
       weights_bytes=st.binary(max_size=100))
def test_garbage_adapter_files_are_an_adapter_error(tmp_path, config_bytes, weights_bytes):
    (tmp_path / "adapter_config.json").write_bytes(config_bytes)
    (tmp_path / "adapter_model.safetensors").write_bytes(weights_bytes)
    try:
        read_adapter(tmp_path)
    except AdapterError as e:
        assert one_line(e)
    else:
        raise AssertionError("garbage accepted")


names = st.text(max_size=100) | st.sampled_from(["../../etc", "/etc/passwd", "a/b/c", "\x00", "\ud800", " ",
                                                 "org/" + "n" * 90, "https://example.com/x", "gpt2-nope",
                                                 "n" * 300, "org/" + "n" * 300])


@settings(max_examples=40, deadline=None)
@given(name=names)
def test_unknown_model_names_and_adapter_paths_are_one_line_errors_offline(name):
    """HF_HUB_OFFLINE=1 (conftest): nothing is fetched; a name is a folder, a cached repo, or an error."""
    for resolve, error in ((resolve_snapshot, CheckpointError), (resolve_adapter, AdapterError)):
        try:
            folder = resolve(name)
        except error as e:
            assert one_line(e)
        else:
            assert folder.is_dir()
