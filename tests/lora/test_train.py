"""The training loop and CLI on a tiny random GPT-2 and a hand-written instruction set."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import minigpt.training
from lora import load_tuned_model
from lora.train import main
from minigpt import load_pretrained
from minigpt.adapters import WEIGHTS_FILE
from minigpt.schedule import Segment
from tests.helpers import without_timings

RECORDS = [
    {"instruction": "Say yes.", "input": "", "output": "Yes."},
    {"instruction": "Say no.", "input": "", "output": "No."},
    {"instruction": "Count to three.", "input": "", "output": "One, two, three."},
    {"instruction": "Greet the reader.", "input": "", "output": "Hello there!"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
]


def cli(workdir, out, *extra):
    return ["--model", str(workdir / "model"), "--data", str(workdir / "data.json"), "--out", str(out),
            "--device", "cpu", "--max-len", "128", *extra]


def losses(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_training_drives_the_loss_towards_zero(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli(workdir, out, "--max-steps", "30", "--lr", "2e-2", "--batch-size", "6", "--rank", "8",
                    "--targets", "c_attn,c_proj,c_fc", "--dropout", "0", "--val-fraction", "0",
                    "--warmup-steps", "0")) == 0
    err = capsys.readouterr().err
    # 2 layers x (c_attn 8*(64+192) + attn.c_proj 8*(64+64) + c_fc 8*(64+256) + mlp.c_proj 8*(256+64))
    assert f"trainable parameters: {2 * 8 * (256 + 128 + 320 + 320):,} of " in err
    assert "data: 6 records, 0 malformed and skipped" in err and "tokens: 6 examples kept" in err
    log = losses(out)
    train = [r["loss"] for r in log if "loss" in r]
    assert len(train) == 30 and train[0] > 10
    assert train[-1] < 1.0 and train[-1] < 0.1 * train[0]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the written adapter is what was trained: loaded for serving, it scores the data as the log says
    from lora.alpaca import Record
    from lora.batches import collate, tokenize
    from minigpt.training import lm_loss_sum
    base, tokenizer = load_pretrained(workdir / "model", device="cpu")
    tuned = load_tuned_model(base, out)
    inputs, targets = collate(tokenize([Record(**r) for r in RECORDS], tokenizer, 128)[0])
    n = (targets != -100).sum()
    with torch.no_grad():
        tuned_loss = lm_loss_sum(tuned, inputs, targets) / n
        base_loss = lm_loss_sum(base, inputs, targets) / n
    assert tuned_loss < 1.0 < 10 < base_loss


class Crash(Exception):
    pass


def test_resumed_run_repeats_the_uninterrupted_losses(workdir, tmp_path, monkeypatch):
    # dropout on, two micro-batches per step and a held-out split: RNG, data order and optimizer all matter
    options = ["--max-steps", "6", "--lr", "1e-2", "--batch-size", "2", "--grad-accum", "2", "--dropout", "0.1",
               "--val-fraction", "0.2", "--eval-examples", "1000",  # all held out: the default cap is timed
               "--eval-every", "2", "--save-every", "3", "--targets", "c_attn,c_fc"]
    assert main(cli(workdir, tmp_path / "whole", *options)) == 0

    real_evaluate = minigpt.training.evaluate
    calls = []

    def crash_at_step_4(*args):
        calls.append(1)
        if len(calls) == 2:  # evaluations run after steps 2, 4, 6; the checkpoint was taken after step 3
            raise Crash
        return real_evaluate(*args)

    monkeypatch.setattr(minigpt.training, "evaluate", crash_at_step_4)
    with pytest.raises(Crash):
        main(cli(workdir, tmp_path / "split", *options))
    assert [r["step"] for r in losses(tmp_path / "split")] == [1, 2, 2, 3, 4]
    monkeypatch.setattr(minigpt.training, "evaluate", real_evaluate)
    assert main(cli(workdir, tmp_path / "split", *options, "--resume")) == 0

    whole, resumed = without_timings(losses(tmp_path / "whole")), without_timings(losses(tmp_path / "split"))
    assert [r["step"] for r in resumed] == [1, 2, 2, 3, 4, 4, 5, 6, 6]
    assert resumed == whole  # bit-identical losses, learning rates and held-out losses
    a, b = load_file(tmp_path / "whole" / WEIGHTS_FILE), load_file(tmp_path / "split" / WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_and_overwrite_guards(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    options = ["--max-steps", "1", "--batch-size", "6", "--val-fraction", "0"]
    assert main(cli(workdir, out, *options, "--resume")) == 2
    assert "--resume: no checkpoint (training_state.safetensors) in" in capsys.readouterr().err
    assert main(cli(workdir, out, *options)) == 0
    assert main(cli(workdir, out, *options)) == 2
    assert "already holds a training run: pass --resume" in capsys.readouterr().err
    assert main(cli(workdir, out, *options, "--rank", "4", "--resume")) == 2
    assert "made with other options (--rank 8 -> 4)" in capsys.readouterr().err


def test_unreachable_default_dataset_is_a_one_line_error(workdir, tmp_path, capsys):
    assert main(["--model", str(workdir / "model"), "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot download dataset yahma/alpaca-cleaned") and "\n" not in err


def test_malformed_records_are_skipped_not_fatal(workdir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [RECORDS[0], {"instruction": 1, "output": "x"}, RECORDS[2]]))
    assert main(["--model", str(workdir / "model"), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--device", "cpu", "--max-len", "128", "--max-steps", "1", "--val-fraction", "0"]) == 0
    err = capsys.readouterr().err
    assert "skipped record 1: field 'instruction' is int, expected a string" in err
    assert "data: 3 records, 1 malformed and skipped\n" in err and "tokens: 2 examples kept" in err


def test_warmup_then_cosine():
    factor = Segment(0, 14, 4).factor
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factor(14) == pytest.approx(0.0) and factor(20) == pytest.approx(0.0)


def test_gradient_accumulation_equals_one_big_batch(tiny_model):
    import copy

    from lora import inject_lora, lora_parameters
    from lora.alpaca import Record
    from lora.batches import micro_batch, tokenize
    from minigpt.training import Ranks, accumulate_gradients
    model, tokenizer, _ = tiny_model
    examples, _ = tokenize([Record(**r) for r in RECORDS], tokenizer, 128)
    grads, losses_ = [], []
    for micro_batches in ([examples[:2], examples[2:3], examples[3:]], [examples]):
        lora_model = copy.deepcopy(model)
        torch.manual_seed(0)
        inject_lora(lora_model, ["c_attn", "c_fc"], r=4, alpha=8)
        for name, p in lora_parameters(lora_model).items():
            if "lora_B" in name:  # non-zero B, so A gets a gradient too
                torch.nn.init.normal_(p, std=0.1)
        micro = [micro_batch(b, list(range(len(b)))) for b in micro_batches]
        losses_.append(accumulate_gradients(lora_model, micro, Ranks(0, 1, torch.device("cpu")))[0])
        grads.append({n: p.grad for n, p in lora_parameters(lora_model).items()})
    assert losses_[0] == pytest.approx(losses_[1], rel=1e-5)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7, msg=name)


def test_time_budget_fits_the_schedule_and_ends_with_a_usable_adapter(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli(workdir, out, "--epochs", "1000", "--time-budget", "3s", "--batch-size", "3",
                    "--val-fraction", "0.2", "--eval-every", "1000")) == 0
    err = capsys.readouterr().err
    assert "what fits the 3 s time budget, out of 2000 steps for 1000 epoch(s)" in err  # 5 examples: 2 steps/epoch
    plan = next(line for line in err.splitlines() if line.startswith("plan: "))
    assert "in all: training " in plan and "evaluation " in plan and "checkpoints " in plan and "plot " in plan
    assert "evaluation: 1 of 1 held-out examples each time (default: evaluation within 10% of" in err
    log = losses(out)
    last = max(r["step"] for r in log)
    assert "val_loss" in [r for r in log if r["step"] == last][-1]  # a final held-out evaluation
    from minigpt.train_state import STATE_FILE, load_state
    assert load_state(out / STATE_FILE).step == last
    base, _ = load_pretrained(workdir / "model", device="cpu")
    load_tuned_model(base, out)  # the adapter is complete and loads


def test_a_cpu_run_without_a_size_is_sized_to_the_machine(workdir, tmp_path, capsys):
    assert main(cli(workdir, tmp_path / "run", "--batch-size", "6", "--val-fraction", "0")) == 0
    err = capsys.readouterr().err
    assert "this run trains for 20m (--time-budget 20m); to train on the whole set pass --epochs 1" in err
    assert "plan: steps 1-1 (1 epoch(s), within the time budget)" in err
