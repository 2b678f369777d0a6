"""Training runs that go further: extended with --resume, stopped by SIGTERM, split into micro-batches,
kept at their best, fully fine-tuned (against transformers + torch's AdamW), logged to TensorBoard."""
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

import minigpt.training
from lora import lora_parameters
from lora.train import main
from minigpt.adapters import WEIGHTS_FILE
from minigpt.train_state import STATE_FILE, load_state
from tests.helpers import REPO, without_timings
from tests.lora.test_train import RECORDS, cli, losses


def test_a_finished_run_is_extended_by_a_new_schedule_segment(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    options = ["--batch-size", "3", "--val-fraction", "0", "--lr", "1e-2", "--warmup-steps", "1"]
    assert main(cli(workdir, out, *options, "--max-steps", "4")) == 0
    first = load_file(out / WEIGHTS_FILE)
    capsys.readouterr()
    assert main(cli(workdir, out, *options, "--resume")) == 2
    assert "is finished (step 4 of 4): to train on, pass --resume with a larger --max-steps" in capsys.readouterr().err
    assert main(cli(workdir, out, *options, "--resume", "--max-steps", "3")) == 2
    assert "is at step 4 already" in capsys.readouterr().err

    assert main(cli(workdir, out, *options, "--resume", "--max-steps", "7")) == 0
    err = capsys.readouterr().err
    assert "plan: steps 5-7 (extending the run to step 7 (--max-steps))" in err
    assert "lr warm-up over 1 steps to 0.01 again (a new segment after the finished run), then cosine to 0 at step 7" \
        in err
    log = [r for r in losses(out) if "loss" in r]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6, 7]
    assert log[3]["lr"] < log[4]["lr"] == 1e-2 and log[6]["lr"] < log[5]["lr"] <= 1e-2  # re-warmed, decaying
    assert load_state(out / STATE_FILE).schedule.total == 7
    assert not torch.equal(first[next(iter(first))], load_file(out / WEIGHTS_FILE)[next(iter(first))])

    # a finished run given only a time budget trains on for what fits it
    assert main(cli(workdir, out, *options, "--resume", "--time-budget", "6s")) == 0
    err = capsys.readouterr().err
    assert "plan: steps 8-" in err and "(extending the run by what fits the 6 s time budget)" in err


def test_resume_refuses_a_changed_max_grad_norm(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    options = ["--max-steps", "1", "--batch-size", "6", "--val-fraction", "0"]
    assert main(cli(workdir, out, *options)) == 0
    assert main(cli(workdir, out, *options, "--max-steps", "2", "--max-grad-norm", "0.5", "--resume")) == 2
    assert "made with other options (--max-grad-norm 1.0 -> 0.5)" in capsys.readouterr().err


def test_accumulation_trains_what_one_big_batch_trains_with_dropout_on(workdir, tmp_path):
    # the default dropout (0.05): each example's masks are keyed by its place in the step, not its micro-batch
    common = ["--max-steps", "4", "--lr", "1e-2", "--val-fraction", "0", "--targets", "c_attn,c_fc"]
    assert main(cli(workdir, tmp_path / "big", *common, "--batch-size", "6")) == 0
    assert main(cli(workdir, tmp_path / "accum", *common, "--batch-size", "2", "--grad-accum", "3")) == 0
    assert main(cli(workdir, tmp_path / "off", *common, "--batch-size", "6", "--dropout", "0")) == 0
    big, accum, off = (load_file(tmp_path / name / WEIGHTS_FILE) for name in ("big", "accum", "off"))
    for key in big:
        # float rounding (Adam's first steps magnify it where a gradient is near 0), 1000x below dropout's effect
        torch.testing.assert_close(accum[key], big[key], rtol=1e-4, atol=2e-5, msg=key)
        assert (big[key] - off[key]).abs().max() > 0.02  # dropout was on, and it mattered
    for r1, r2 in zip(without_timings(losses(tmp_path / "big")), without_timings(losses(tmp_path / "accum")), strict=True):
        assert r1.keys() == r2.keys() and all(r2[k] == pytest.approx(r1[k], rel=1e-5) for k in r1)


def test_the_best_held_out_output_is_kept_and_patience_stops_the_run(workdir, tmp_path, monkeypatch, capsys):
    scripted = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    seen = []  # the adapter at each evaluation

    def fake_evaluate(model, batches, ranks):
        seen.append({k: p.detach().clone() for k, p in lora_parameters(model).items()})
        return next(scripted)

    monkeypatch.setattr(minigpt.training, "evaluate", fake_evaluate)
    out = tmp_path / "run"
    assert main(cli(workdir, out, "--max-steps", "50", "--lr", "1e-2", "--batch-size", "2", "--val-fraction", "0.2",
                    "--eval-every", "1", "--patience", "2")) == 0
    assert "step 4: no better held-out loss in 2 evaluations (--patience), stopping; the best (step 2)" in \
        capsys.readouterr().err
    log = losses(out)
    assert [r["step"] for r in log if "best" in r] == [1, 2]
    assert max(r["step"] for r in log) == 4 and len(seen) == 4
    best, last = load_file(out / "best" / WEIGHTS_FILE), load_file(out / WEIGHTS_FILE)
    for key, ours in seen[1].items():
        name = "base_model.model." + key
        assert torch.equal(best[name], ours) and torch.equal(last[name], seen[3][key])
    assert not all(torch.equal(best[k], last[k]) for k in best)
    assert load_state(out / STATE_FILE).evaluation == {"examples": 1, "best_loss": 2.0, "best_step": 2,
                                                       "since_best": 2}


def test_sigterm_writes_a_checkpoint_and_exits_130(workdir, tmp_path):
    out = tmp_path / "run"
    args = cli(workdir, out, "--batch-size", "2", "--val-fraction", "0", "--save-every", "1000")
    run = subprocess.Popen([sys.executable, "-m", "lora.train", *args, "--max-steps", "100000"], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def steps():
        return [r["step"] for r in losses(out) if "loss" in r] if (out / "log.jsonl").exists() else []

    deadline = time.monotonic() + 240
    while run.poll() is None and len(steps()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130 and "Traceback" not in err
    done = max(steps())
    assert load_state(out / STATE_FILE).step == done  # long before the first --save-every: nothing lost
    assert err.splitlines()[-1] == f"interrupted at step {done}, checkpoint written; continue with --resume --out {out}"
    assert main([*args, "--max-steps", "100000", "--resume", "--max-steps", str(done + 2)]) == 0
    assert steps() == list(range(1, done + 3))


def test_full_fine_tuning_equals_transformers_with_torch_adamw(workdir, tmp_path):
    """Two steps of --full against GPT2LMHeadModel + torch.optim.AdamW on the same batch: weight decay on the
    matrices only, the betas asked for (they matter from the second step), clipping, the cosine's lr."""
    from lora.alpaca import Record
    from lora.batches import collate, tokenize
    from minigpt import load_pretrained
    out = tmp_path / "full"
    assert main(cli(workdir, out, "--full", "--max-steps", "2", "--batch-size", "6", "--val-fraction", "0",
                    "--lr", "1e-3", "--weight-decay", "0.1", "--betas", "0.8", "0.95", "--max-grad-norm", "0.5")) == 0

    _, tokenizer = load_pretrained(workdir / "model", device="cpu")
    inputs, targets = collate(tokenize([Record(**r) for r in RECORDS], tokenizer, 128)[0])  # every step's batch
    theirs = GPT2LMHeadModel.from_pretrained(workdir / "model").eval()  # eval: no dropout (ours has none)
    params = dict(theirs.named_parameters())
    optimizer = torch.optim.AdamW([{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.8, 0.95))
    their_losses = []
    for lr in (1e-3, 5e-4):  # --max-steps 2, no warm-up: cosine from 1 to 0 gives 1, then 0.5
        optimizer.param_groups[0]["lr"] = optimizer.param_groups[1]["lr"] = lr
        loss = F.cross_entropy(theirs(inputs).logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 0.5)
        optimizer.step()
        optimizer.zero_grad()
        their_losses.append(loss.item())

    assert [r["loss"] for r in losses(out) if "loss" in r] == pytest.approx(their_losses, rel=1e-5)
    trained = dict(GPT2LMHeadModel.from_pretrained(out).named_parameters())
    before = dict(GPT2LMHeadModel.from_pretrained(workdir / "model").named_parameters())
    assert trained.keys() == params.keys()
    for name, p in params.items():
        # Adam's early steps are about lr * sign(gradient): where a gradient is rounding noise around 0, the two
        # sides' noise can point either way. The attention's key bias is all such (softmax ignores it): skipped.
        diff = (trained[name] - p.detach()).abs()
        if name.endswith("c_attn.bias"):
            width = diff.numel() // 3
            diff = torch.cat([diff[:width], diff[2 * width:]])
        assert (diff > 2e-6).float().mean() < 0.01 and diff.max() < 3e-4, name
        assert (trained[name] - before[name]).abs().max() > 1e-4, name  # every tensor trained
    for name in ("transformer.h.0.ln_1.weight", "transformer.ln_f.bias", "transformer.h.1.mlp.c_proj.bias"):
        torch.testing.assert_close(trained[name], params[name].detach(), rtol=0, atol=2e-6, msg=name)  # not decayed


def test_tensorboard_gets_the_logged_scalars(workdir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    assert main(cli(workdir, out, "--max-steps", "3", "--batch-size", "2", "--val-fraction", "0.2",
                    "--eval-every", "2", "--log", "tensorboard")) == 0
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    log = losses(out)
    for tag, key in [("loss/train", "loss"), ("loss/held_out", "val_loss"), ("lr", "lr"),
                     ("tokens_per_s", "tokens_per_s")]:
        expected = [r for r in log if key in r]
        assert [e.step for e in events.Scalars(tag)] == [r["step"] for r in expected], tag
        assert [e.value for e in events.Scalars(tag)] == pytest.approx([r[key] for r in expected], rel=1e-6), tag
    assert [e.step for e in events.Scalars("loss/held_out")] == [2, 3]


def test_a_budget_used_up_by_loading_says_so_and_still_saves(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli(workdir, out, "--time-budget", "0.001s", "--batch-size", "3", "--val-fraction", "0.2")) == 0
    err = capsys.readouterr().err
    assert "note: loading and measuring left 0 s of the time budget, less than one step" in err
    assert [r for r in losses(out) if "stopped" in r] == [{"step": 0, "stopped": "time budget"}]
    assert load_state(out / STATE_FILE).step == 0 and (out / WEIGHTS_FILE).is_file()  # an output all the same
