"""Alpaca data: template, malformed records, label masking, truncation accounting, split and batches."""
import json
import os

import pytest
import torch

from lora import alpaca_prompt
from lora.alpaca import Record, load_records, parse_records, resolve_data
from lora.batches import IGNORE, Example, collate, epoch_batches, split, tokenize
from minigpt.tokenizer import EOT_ID
from minigpt.training import lm_loss_sum

RECORDS = [
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5."},
]


def test_template_with_and_without_input():
    assert alpaca_prompt("Name a colour.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a colour.\n\n### Response:\n")
    assert alpaca_prompt("Translate.", "Good morning") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate.\n\n"
        "### Input:\nGood morning\n\n### Response:\n")


def test_malformed_records_are_reported_by_index_and_skipped():
    raw = [RECORDS[0], {"instruction": "x"}, "just text", {"instruction": "x", "input": 3, "output": "y"},
           RECORDS[1], {"instruction": "x", "output": "  "}, {"instruction": "No input field.", "output": "Fine."}]
    records, problems = parse_records(raw)
    assert records == [Record(**RECORDS[0]), Record(**RECORDS[1]), Record("No input field.", "", "Fine.")]
    assert problems == ["record 1: missing field 'output'",
                        "record 2: expected an object with instruction/input/output, got str",
                        "record 3: field 'input' is int, expected a string",
                        "record 5: empty output: nothing to learn"]


def test_json_and_jsonl_files(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(RECORDS))
    (tmp_path / "a.jsonl").write_text("\n".join([json.dumps(RECORDS[0]), "{broken", "", json.dumps(RECORDS[2])]))
    assert load_records(str(tmp_path / "a.json")) == ([Record(**r) for r in RECORDS], [])
    assert load_records(str(tmp_path / "a.jsonl")) == ([Record(**RECORDS[0]), Record(**RECORDS[2])],
                                                       ["record 1: line 2 is not valid JSON: Expecting property name "
                                                        "enclosed in double quotes"])
    (tmp_path / "obj.json").write_text('{"instruction": "x"}')
    with pytest.raises(ValueError, match="must hold a JSON array of records, found dict"):
        load_records(str(tmp_path / "obj.json"))


def test_unreachable_hub_dataset_is_a_one_line_error():
    with pytest.raises(ValueError) as info:
        resolve_data("yahma/alpaca-cleaned/alpaca_data_cleaned.json")
    assert "\n" not in str(info.value) and "pass a local file with --data" in str(info.value)
    with pytest.raises(ValueError, match="no such file"):
        resolve_data("missing.json")


def test_local_data_paths_that_are_not_files_say_what_they_are(tmp_path, monkeypatch):
    """Not huggingface_hub's "Repo id must use alphanumeric chars": a path is a path, whatever is (not) there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder.json").mkdir()
    (tmp_path / "dangling.json").symlink_to(tmp_path / "gone.json")
    os.mkfifo(tmp_path / "pipe.json")
    for spec, words in [("./mydata.json", "no such file"), (str(tmp_path / "absent.json"), "no such file"),
                        ("../elsewhere/data.jsonl", "no such file"), ("folder.json", "a folder: name the .json"),
                        (str(tmp_path / "dangling.json"), f"a link to {tmp_path / 'gone.json'}, which does not exist"),
                        ("pipe.json", "not a regular file (a pipe, a device or a socket)")]:
        with pytest.raises(ValueError) as refused:
            resolve_data(spec)
        assert str(refused.value).startswith(f"--data {spec}: {words}"), str(refused.value)
        assert "Repo id" not in str(refused.value) and "\n" not in str(refused.value)


def test_labels_cover_the_response_and_eot_only(tiny_model):
    _, tokenizer, _ = tiny_model
    examples, report = tokenize([Record(**RECORDS[1])], tokenizer, max_len=512)
    (example,) = examples
    prompt = tokenizer.encode_ordinary(alpaca_prompt("Translate to French.", "Good morning"))
    assert example.ids == prompt + tokenizer.encode_ordinary("Bonjour.") + [EOT_ID]
    inputs, targets = example.inputs_and_targets()
    assert inputs == example.ids[:-1]
    assert targets == [IGNORE] * (len(prompt) - 1) + tokenizer.encode_ordinary("Bonjour.") + [EOT_ID]
    assert (report.kept, report.truncated, report.dropped) == (1, 0, 0)


def test_masked_loss_equals_hand_computed_cross_entropy(tiny_model):
    model, tokenizer, _ = tiny_model
    examples, _ = tokenize([Record(**r) for r in RECORDS[:2]], tokenizer, max_len=512)
    inputs, targets = collate(examples)
    assert inputs.shape[0] == 2 and (targets[0] == IGNORE).sum() != (targets[1] == IGNORE).sum()
    with torch.no_grad():
        got = lm_loss_sum(model, inputs, targets) / (targets != IGNORE).sum()
        terms = []
        for e in examples:  # each sequence alone, no padding: -log p(response token | everything before it)
            logprobs = model(torch.tensor([e.ids])).log_softmax(-1)[0]
            terms += [-logprobs[j - 1, e.ids[j]] for j in range(e.n_prompt, len(e.ids))]
        expected = torch.stack(terms).mean()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_truncation_is_counted_and_never_silent(tiny_model):
    _, tokenizer, _ = tiny_model
    long = Record("Write a long answer about " + "many things, " * 20, "", "word " * 200)
    short = Record(**RECORDS[0])
    n_prompt = len(tokenizer.encode_ordinary(long.prompt))
    examples, report = tokenize([long, short], tokenizer, max_len=n_prompt + 5)
    assert (report.kept, report.truncated, report.dropped) == (2, 1, 0)
    assert len(examples[0].ids) == n_prompt + 5 and examples[0].n_prompt == n_prompt
    examples, report = tokenize([long, short], tokenizer, max_len=n_prompt)
    assert (report.kept, report.truncated, report.dropped) == (1, 0, 1)
    assert "1 dropped" in str(report) and "0 with the response truncated" in str(report)


def test_split_is_deterministic_and_disjoint():
    examples = [Example([i, i + 1], 1) for i in range(40)]
    train, val = split(examples, 0.1, seed=3)
    assert (train, val) == split(examples, 0.1, seed=3)
    assert len(val) == 4 and sorted(e.ids[0] for e in train + val) == list(range(40))
    assert split(examples, 0.1, seed=4)[1] != val
    assert split(examples[:3], 0.01, seed=0)[1] != []  # asked for a held-out set: at least one example
    assert split(examples, 0.0, seed=0) == (split(examples, 0.0, seed=0)[0], [])


def test_epoch_batches_are_reproducible_length_grouped_and_complete():
    gen = torch.Generator().manual_seed(0)
    examples = [Example(list(range(int(n))), 1) for n in torch.randint(3, 200, (300,), generator=gen)]
    batches = epoch_batches(examples, batch_size=4, seed=1, epoch=0)
    assert batches == epoch_batches(examples, batch_size=4, seed=1, epoch=0)
    assert batches != epoch_batches(examples, batch_size=4, seed=1, epoch=1)
    assert sorted(id(e) for b in batches for e in b) == sorted(id(e) for e in examples)

    def padding(bs):
        return sum(max(len(e.ids) for e in b) * len(b) - sum(len(e.ids) for e in b) for b in bs)

    random_batches = [examples[i:i + 4] for i in range(0, 300, 4)]
    assert padding(batches) < padding(random_batches) / 5


def test_a_jsonl_line_nested_too_deeply_or_not_utf8_is_skipped_not_fatal(tmp_path):
    lines = [json.dumps(RECORDS[0]).encode(), b"[" * 100_000 + b"]" * 100_000,
             json.dumps(RECORDS[1]).encode().replace(b"Bonjour", b"Bonjour \xff"), json.dumps(RECORDS[2]).encode()]
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines))
    assert load_records(str(tmp_path / "a.jsonl")) == ([Record(**RECORDS[0]), Record(**RECORDS[2])],
                                                       ["record 1: line 2 is nested too deeply",
                                                        "record 2: line 3 is not UTF-8 (byte 85)"])
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        load_records(str(tmp_path / "deep.json"))
