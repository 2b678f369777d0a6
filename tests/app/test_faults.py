"""Fault injection beyond the loader's own tests: broken files at app start-up, the Hub unreachable with
an empty cache, and a training run killed with SIGKILL, then resumed."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minigpt.serve import app, launch
from lora.train import main as train_main
from minigpt.adapters import CONFIG_FILE, WEIGHTS_FILE, read_adapter
from minigpt.train_state import STATE_FILE, load_state
from tests.helpers import REPO, interruptible, run_all
from tests.helpers.app_server import free_port, make_adapter
from tests.helpers.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny checkpoint, an adapter for it, and an adapter for a 3-layer model of the same width."""
    root = tmp_path_factory.mktemp("parts")
    model, _ = make_checkpoint(root / "model")
    deeper, _ = make_checkpoint(root / "deeper", n_layer=3)
    return model, make_adapter(model, root / "adapter"), make_adapter(deeper, root / "deeper-adapter")


def edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def edit_json(path: Path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


MODEL_FAULTS = {
    "truncated weights": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
                          "model.safetensors is truncated or corrupt"),
    "renamed tensor": (lambda d: edit_tensors(d, lambda t: t.update({"h.0.mlp.fc.weight": t.pop("h.0.mlp.c_fc.weight")})),
                       "checkpoint is missing tensor transformer.h.0.mlp.c_fc.weight"),
    "reshaped tensor": (lambda d: edit_tensors(d, lambda t: t.update({"wpe.weight": t["wpe.weight"][:64].contiguous()})),
                        r"tensor transformer.wpe.weight has shape (64, 64), expected (128, 64)"),
    "missing tokenizer file": (lambda d: (d / "vocab.json").unlink(), "missing tokenizer file vocab.json"),
}
ADAPTER_FAULTS = {
    "corrupt adapter_config.json": (lambda d: (d / CONFIG_FILE).write_text('{"peft_type": "LORA", "r": 4,'),
                                    "adapter_config.json is not valid JSON"),
    "missing adapter weights": (lambda d: (d / WEIGHTS_FILE).unlink(), "missing adapter_model.safetensors"),
    "NaN lora_alpha": (lambda d: edit_json(d / CONFIG_FILE, lambda c: {**c, "lora_alpha": float("nan")}),
                       "adapter makes the weight of transformer.h.0.attn.c_attn NaN or infinite"),
    "adapter for another model size": (None, "a module this 2-layer model does not have"),
}


def start_app(argv: list[str], monkeypatch, capsys) -> str:
    """app.main with the UI builder booby-trapped: a load fault must stop it before any UI exists."""
    def no_ui(*_):
        raise AssertionError("the app went on to build its UI")
    monkeypatch.setattr(app, "build_app", no_ui)
    assert launch.main([*argv, "--device", "cpu"]) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("fault", MODEL_FAULTS)
def test_a_broken_model_stops_the_app_with_one_specific_line(parts, tmp_path, monkeypatch, capsys, fault):
    damage, message = MODEL_FAULTS[fault]
    folder = Path(shutil.copytree(parts[0], tmp_path / "model"))
    damage(folder)
    err = start_app(["--model", str(folder), "--adapter", str(parts[1])], monkeypatch, capsys)
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


@pytest.mark.parametrize("fault", ADAPTER_FAULTS)
def test_a_broken_adapter_stops_the_app_with_one_specific_line(parts, tmp_path, monkeypatch, capsys, fault):
    damage, message = ADAPTER_FAULTS[fault]
    folder = Path(shutil.copytree(parts[2] if damage is None else parts[1], tmp_path / "adapter"))
    if damage:
        damage(folder)
    err = start_app(["--model", str(parts[0]), "--adapter", str(folder)], monkeypatch, capsys)
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


UNCACHED = {"model": ["--model", "someone/gpt2-not-cached"],
            "adapter": ["--model", "{model}", "--adapter", "someone/lora-not-cached"]}


@pytest.fixture(scope="module")
def hub_unreachable(parts, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """A real `python app.py` for each of UNCACHED, side by side: online mode, the Hub endpoint a closed
    loopback port, an empty HF_HOME."""
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path_factory.mktemp("hf")),
           "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    runs = run_all(env, *([sys.executable, "app.py", *[a.format(model=parts[0]) for a in args], "--device", "cpu",
                           "--port", str(free_port())] for args in UNCACHED.values()))
    return dict(zip(UNCACHED, runs))


@pytest.mark.parametrize("which", UNCACHED)
def test_hub_unreachable_with_an_empty_cache_exits_with_one_line(hub_unreachable, which):
    run = hub_unreachable[which]
    assert run.returncode == 2 and "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not-cached" in lines[0]
    assert "Running on" not in run.stdout  # it never served a page


RECORDS = [{"instruction": f"Say {w}.", "input": "", "output": f"{w.capitalize()}, {w}, {w}."}
           for w in ("yes", "no", "maybe", "hello", "blue", "red", "green", "one", "two", "three")]
TRAIN = ["--device", "cpu", "--max-len", "64", "--max-steps", "16", "--save-every", "3", "--eval-every", "100",
         "--batch-size", "4", "--val-fraction", "0", "--dropout", "0.1", "--seed", "3"]


def steps_logged(out: Path) -> list[int]:
    path = out / "log.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_training_killed_mid_run_resumes_from_its_last_checkpoint(parts, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(RECORDS))
    options = ["--model", str(parts[0]), "--data", str(data), *TRAIN]
    assert train_main([*options, "--out", str(tmp_path / "whole")]) == 0

    out = tmp_path / "killed"
    run = subprocess.Popen([sys.executable, "-m", "lora.train", *options, "--out", str(out)], cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while run.poll() is None and max(steps_logged(out), default=0) < 8 and time.monotonic() < deadline:
        time.sleep(0.005)
    run.send_signal(signal.SIGKILL)
    run.wait(30)
    assert run.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = max(steps_logged(out))

    saved = load_state(out / STATE_FILE)  # whatever instant the kill hit, the checkpoint is whole
    read_adapter(out)
    assert saved.step % 3 == 0 and 0 <= killed_at - saved.step <= 3  # lost: only the steps since the checkpoint

    assert train_main([*options, "--out", str(out), "--resume"]) == 0
    assert steps_logged(out) == list(range(1, 17))  # each step logged once: the lost ones were redone
    whole, resumed = load_file(tmp_path / "whole" / WEIGHTS_FILE), load_file(out / WEIGHTS_FILE)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_ctrl_c_during_training_is_one_line_and_exit_130(parts, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(RECORDS))
    out = tmp_path / "out"
    run = subprocess.Popen([sys.executable, "-m", "lora.train", "--model", str(parts[0]), "--data", str(data), *TRAIN,
                            "--max-steps", "100000", "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    deadline = time.monotonic() + 240
    while run.poll() is None and max(steps_logged(out), default=0) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130 and "Traceback" not in err
    stopped = load_state(out / STATE_FILE).step  # the step it was on when Ctrl-C came: nothing lost
    assert stopped == max(steps_logged(out)) >= 4
    assert err.splitlines()[-1] == f"interrupted at step {stopped}, checkpoint written; continue with --resume --out {out}"


def train_options(parts, tmp_path) -> list[str]:
    data = tmp_path / "data.json"
    data.write_text(json.dumps(RECORDS))
    return ["--model", str(parts[0]), "--data", str(data), *TRAIN]


def test_a_second_run_on_the_same_out_is_refused_at_once(parts, tmp_path, capsys):
    """Another process holds the folder (as a running lora.train does): this run stops before loading anything."""
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; "
                               "from minigpt.run_lock import only_run_in\nwith only_run_in(Path(sys.argv[1])):\n"
                               "    print('held', flush=True); sys.stdin.read()", str(out)],
                              cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert train_main([*train_options(parts, tmp_path), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == (f"error: {out} is in use by another training run (process {holder.pid}): wait for it to end, "
                       "or pick another --out\n")  # one line, and nothing was read or loaded before it
    finally:
        holder.communicate("", timeout=60)
    assert train_main([*train_options(parts, tmp_path), "--out", str(out), "--max-steps", "2"]) == 0  # released


def test_two_runs_started_together_on_one_out_leave_one_whole_run(parts, tmp_path):
    out = tmp_path / "out"
    options = [sys.executable, "-m", "lora.train", *train_options(parts, tmp_path), "--max-steps", "4", "--out",
               str(out)]
    runs = [subprocess.Popen(options, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = sorted((run.wait(240), run.communicate()[1]) for run in runs)
    (ok, _), (refused, err) = results
    assert (ok, refused) == (0, 2) and err.splitlines()[-1].startswith(f"error: {out} is in use by another")
    assert steps_logged(out) == [1, 2, 3, 4]  # one run's log, not two interleaved


NO_SPACE = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors' own words


def test_a_full_disk_mid_checkpoint_is_one_line_and_resume_continues(parts, tmp_path, monkeypatch, capsys):
    """The disk fills up while the adapter of the second checkpoint is written (its training state was written
    just before): one line saying how much space it needed, no half-written file, and --resume finishes the run
    with the same adapter as an uninterrupted one."""
    import minigpt.atomic
    options = [*train_options(parts, tmp_path), "--max-steps", "9"]  # checkpoints at 3, 6, 9
    assert train_main([*options, "--out", str(tmp_path / "whole")]) == 0
    real_save, calls = minigpt.atomic.save_file, []

    def fills_up(tensors, path, metadata=None):
        calls.append(Path(path).name)
        if len(calls) == 4:  # step 6: the state (3rd write), then the adapter (4th)
            Path(path).write_bytes(b"\0" * 100)  # some of it reached the disk
            raise minigpt.atomic.SafetensorError(NO_SPACE)
        real_save(tensors, path, metadata=metadata)

    out = tmp_path / "out"
    monkeypatch.setattr(minigpt.atomic, "save_file", fills_up)
    capsys.readouterr()
    assert train_main([*options, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    line = err.splitlines()[-1]
    assert "Traceback" not in err and re.fullmatch(
        f"error: the disk is full: writing {WEIGHTS_FILE} needs ([0-9.]+) kB, [0-9.,]+ (MB|kB|bytes) free in "
        f"{re.escape(str(out))}; nothing half-written was kept: free some space, then continue from the last "
        f"checkpoint with --resume --out {re.escape(str(out))}", line), line
    needed = float(re.search("needs ([0-9.]+) kB", line)[1]) * 1000
    assert 0 < needed - (tmp_path / "whole" / WEIGHTS_FILE).stat().st_size < 5000  # the file's size, near enough
    assert sorted(p.name for p in out.iterdir()) == sorted(  # no temporary file left behind
        [".lock", CONFIG_FILE, WEIGHTS_FILE, STATE_FILE, "log.jsonl"])
    assert load_state(out / STATE_FILE).step == 6
    monkeypatch.setattr(minigpt.atomic, "save_file", real_save)
    assert train_main([*options, "--out", str(out), "--resume"]) == 0
    whole, resumed = load_file(tmp_path / "whole" / WEIGHTS_FILE), load_file(out / WEIGHTS_FILE)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_too_little_space_for_the_first_checkpoint_writes_nothing(parts, tmp_path, monkeypatch, capsys):
    import minigpt.atomic
    monkeypatch.setattr(minigpt.atomic, "free_bytes", lambda folder: 1000)
    out = tmp_path / "out"
    assert train_main([*train_options(parts, tmp_path), "--out", str(out)]) == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith(f"error: the disk is full: writing {STATE_FILE} needs ") and " kB, 1.0 kB free in " in line
    assert line.endswith("then run again (no checkpoint was written yet)")
    assert not (out / STATE_FILE).exists() and not (out / WEIGHTS_FILE).exists()
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
