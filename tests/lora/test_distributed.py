"""Data-parallel LoRA training under torchrun (gloo, CPU, 2 processes) against one process."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lora.train import main
from minigpt.adapters import WEIGHTS_FILE
from tests.helpers import REPO, without_timings
from tests.helpers.checkpoints import make_checkpoint
from tests.lora.test_train import RECORDS

pytestmark = pytest.mark.slow  # torchrun-style subprocesses

# 6 records: 5 for training, 1 held out. A global batch of 4 leaves a last batch of 1 in each epoch,
# so rank 1 gets no example there, and no held-out batch at all: both must still join every step.
# LoRA dropout is on (the default 0.05): masks are keyed by the example's place in the step, not the rank.
OPTIONS = ["--max-steps", "6", "--lr", "1e-2", "--grad-accum", "2", "--val-fraction", "0.2",
           "--eval-examples", "1000",  # every held-out example: the default cap follows measured times
           "--eval-every", "2", "--save-every", "3", "--targets", "c_attn,c_fc", "--device", "cpu", "--max-len", "128"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    make_checkpoint(folder / "model", initializer_range=0.2)
    (folder / "data.json").write_text(json.dumps(RECORDS))
    return folder


def args(folder, out, *extra):
    return ["--model", str(folder / "model"), "--data", str(folder / "data.json"), "--out", str(out), *OPTIONS, *extra]


def torchrun(module_args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", *module_args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_processes(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-run") / "run"
    done = torchrun(["lora.train", *args(setup, out, "--batch-size", "2")])
    assert "global batch 2 process(es) x 2 sequences x 2 micro-batch(es)" in done.stderr
    assert done.stderr.count("plan: ") == done.stderr.count("step 2: held-out loss") == 1  # rank 0 alone speaks
    return out


def test_two_processes_train_the_adapter_one_process_trains(setup, two_processes, tmp_path):
    # 2 processes x batch 2 x accumulation 2 against 1 process x batch 8 x no accumulation
    one = tmp_path / "one"
    assert main(args(setup, one, "--batch-size", "8", "--grad-accum", "1")) == 0
    a, b = load_file(one / WEIGHTS_FILE), load_file(two_processes / WEIGHTS_FILE)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=2e-5, msg=key)  # float rounding
    assert not torch.equal(a[next(k for k in a if "lora_B" in k)], torch.zeros(1))  # it did train
    single, double = without_timings(log(one)), without_timings(log(two_processes))
    assert [r["step"] for r in double] == [1, 2, 2, 3, 4, 4, 5, 6, 6]
    for r1, r2 in zip(single, double, strict=True):
        assert r1.keys() == r2.keys()
        for key in r1:
            assert r2[key] == pytest.approx(r1[key], rel=1e-4), (r1, r2)
    assert (two_processes / "loss.png").is_file()  # written once, by rank 0


def test_a_killed_two_process_run_resumes_to_the_same_losses(setup, two_processes, tmp_path):
    out = tmp_path / "split"
    # both ranks die at the 2nd evaluation (after step 4); the last checkpoint was after step 3
    crashed = torchrun(["tests.helpers.crash_training", "2", *args(setup, out, "--batch-size", "2")], check=False)
    assert crashed.returncode != 0
    assert [r["step"] for r in log(out)] == [1, 2, 2, 3, 4]
    torchrun(["lora.train", *args(setup, out, "--batch-size", "2", "--resume")])
    assert without_timings(log(out)) == without_timings(log(two_processes))
    a, b = load_file(out / WEIGHTS_FILE), load_file(two_processes / WEIGHTS_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_process_count(setup, two_processes, capsys):
    assert main(args(setup, two_processes, "--batch-size", "2", "--resume")) == 2
    assert "made with other options (--nproc-per-node 2 -> 1)" in capsys.readouterr().err
