"""The real download path, end to end, against a fake Hub on 127.0.0.1 (tests/hub_server.py): first download,
offline reuse, HTTP 500, a connection dropped mid-file (once: resumed by huggingface_hub; always: one line), a
stalled server, a truncated body, a damaged cached file (healed), an unknown repo, Ctrl-C. For the model
(`python -m minigpt.generate`, the path app.py start-up shares through minigpt/hub.py) and for the training
data (`python -m lora.train`). Every error is one line without a traceback; nothing partial is left in the
cache; a retry once the server behaves succeeds."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, run_all
from tests.helpers.app_server import make_adapter
from tests.helpers.checkpoints import make_checkpoint
from tests.helpers.hub_server import FakeHub, Fault

pytestmark = pytest.mark.slow  # subprocesses against a local server
MODEL, ADAPTER, DATASET, DATA_FILE = "someone/tiny-gpt2", "someone/tiny-lora", "someone/alpaca-mini", "data.json"
RECORDS = [{"instruction": f"Say {w}.", "input": "", "output": f"{w.capitalize()}."} for w in ("yes", "no", "maybe")]
FAULTS = {"500": ("500", "the Hub answered HTTP 500"),  # the fault, what the one error line says of it
          "dropped always": ("drop", "the connection dropped in the middle of a file"),
          "truncated": ("truncate", "a file arrived incomplete"),
          "stalled": ("stall", "the Hub stopped answering (timed out after 1 s")}


def faulty(fault: str) -> tuple[str, str]:
    """The model and the dataset repo that serve with this fault, one pair per fault: all run at once."""
    return f"{MODEL}-{fault.replace(' ', '-')}", f"{DATASET}-{fault.replace(' ', '-')}"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    model, _ = make_checkpoint(root / "model")
    with FakeHub() as hub:
        hub.add_repo(MODEL, model)
        hub.add_repo(ADAPTER, make_adapter(model, root / "adapter"))
        data = {DATA_FILE: json.dumps(RECORDS).encode()}
        hub.add_repo(DATASET, data, "dataset")
        for name in FAULTS:
            faulty_model, faulty_dataset = faulty(name)
            hub.add_repo(faulty_model, model)
            hub.add_repo(faulty_dataset, data, "dataset")
        hub.model_folder = model
        yield hub


@pytest.fixture
def env(hub, tmp_path):
    hub.faults = []
    return hub_env(hub, tmp_path / "hf")


def hub_env(hub: FakeHub, hf_home: Path) -> dict:
    return {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(hf_home),
            "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


QUICK_RETRIES = [sys.executable, "-m", "tests.helpers.quick_retries"]  # huggingface_hub's retry waits, shortened


def generate_cmd(*args: str) -> list[str]:
    return [*QUICK_RETRIES, "minigpt.generate", "--model", MODEL, "--prompt", "Hi", "--max-new-tokens", "2",
            "--device", "cpu", *args]


def train_cmd(hub: FakeHub, out: Path, data: str = f"{DATASET}/{DATA_FILE}", model: str | None = None) -> list[str]:
    """Training on a Hub dataset; the model a local folder unless given (a Hub repo: both are downloaded)."""
    return [*QUICK_RETRIES, "lora.train", "--model", model or str(hub.model_folder), "--data", data, "--out", str(out),
            "--device", "cpu", "--max-steps", "1", "--batch-size", "1", "--max-len", "64", "--val-fraction", "0"]


def generate(env: dict, *args: str) -> subprocess.CompletedProcess:
    return run_all(env, generate_cmd(*args))[0]


def one_error(run: subprocess.CompletedProcess, *words: str) -> str:
    """The run failed with exactly one `error:` line, the last one, holding words; no traceback."""
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and run.stderr.rstrip().endswith(errors[0]), run.stderr
    assert all(word in errors[0] for word in words), errors[0]
    return errors[0]


def succeeded(run: subprocess.CompletedProcess) -> None:
    assert run.returncode == 0 and "error" not in run.stderr, run.stderr


def clean_cache(env: dict) -> None:
    """No partial download anywhere, and every blob holds exactly the bytes its name (the git blob id) says."""
    hub_cache = Path(env["HF_HOME"]) / "hub"
    assert not list(hub_cache.rglob("*.incomplete"))
    for blob in hub_cache.glob("*/blobs/*"):
        if blob.suffix != ".lock":
            data = blob.read_bytes()
            assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == blob.name, f"damaged {blob}"


def model_blob(env: dict) -> Path:
    return (Path(env["HF_HOME"]) / "hub" / f"models--{MODEL.replace('/', '--')}" / "snapshots").glob(
        "*/model.safetensors").__next__().resolve()


# The model (python -m minigpt.generate) and the training data (python -m lora.train)

@pytest.fixture(scope="module")
def fault_runs(hub, tmp_path_factory) -> dict[str, tuple[dict, list[subprocess.CompletedProcess],
                                                         subprocess.CompletedProcess]]:
    """For each of FAULTS, its own repos and cache: (its environment, the model and data runs while the fault
    lasts, one training run once the Hub behaves, which downloads both). Every fault at once: side by side,
    the runs' Python starts and waits overlap."""
    envs = {name: hub_env(hub, tmp_path_factory.mktemp("hf")) for name in FAULTS}
    out = tmp_path_factory.mktemp("out")
    hub.faults = [Fault(FAULTS[name][0], file, repo=repo) for name in FAULTS
                  for repo, file in zip(faulty(name), ("model.safetensors", DATA_FILE))]
    while_faulty = []
    for name in FAULTS:
        model, dataset = faulty(name)
        env = {**envs[name], "HF_HUB_DOWNLOAD_TIMEOUT": "1"}
        while_faulty += [(env, generate_cmd("--model", model)),
                         (env, train_cmd(hub, out / f"{name}-failed", f"{dataset}/{DATA_FILE}"))]
    failed = run_all({}, *while_faulty)
    for name in FAULTS:
        clean_cache(envs[name])
    hub.faults = []
    again = run_all({}, *[(envs[name], train_cmd(hub, out / name, f"{faulty(name)[1]}/{DATA_FILE}", faulty(name)[0]))
                          for name in FAULTS])
    return {name: (envs[name], failed[2 * i:2 * i + 2], again[i]) for i, name in enumerate(FAULTS)}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_failed_download_is_one_line_leaves_nothing_partial_and_a_retry_succeeds(fault_runs, fault):
    """The model file (python -m minigpt.generate) and the training data (python -m lora.train) at once."""
    env, (model, data), again = fault_runs[fault]
    words = FAULTS[fault][1]
    faulty_model, faulty_dataset = faulty(fault)
    one_error(model, f"could not download model '{faulty_model}': {words}", "Nothing partial was kept",
              "--model also takes a local folder")
    one_error(data, f"cannot download dataset {faulty_dataset}: {words}", "--data path/to/alpaca.json")
    succeeded(again)
    clean_cache(env)


def test_a_connection_dropped_once_is_resumed(hub, env):
    hub.faults = [Fault("drop", "model.safetensors", times=1)]
    succeeded(generate(env))
    clean_cache(env)
    assert hub.faults == []  # the drop happened


def test_hub_500_before_anything_is_cached_is_not_called_offline(hub, env, tmp_path):
    hub.faults = [Fault("500-api")]
    model, data = run_all(env, generate_cmd(), train_cmd(hub, tmp_path / "a"))
    for run in model, data:
        assert "offline" not in one_error(run, "the Hub answered HTTP 500", "cache").lower()


def test_unknown_repos_and_offline_with_an_empty_cache(hub, env, tmp_path):
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    hub.requests.clear()
    runs = run_all(env, generate_cmd("--model", "someone/no-such-model"),
                   train_cmd(hub, tmp_path / "a", "someone/no-such-data/x.json"),
                   (offline, generate_cmd()), (offline, train_cmd(hub, tmp_path / "b")))
    one_error(runs[0], "no model folder or Hub repository named 'someone/no-such-model'")
    one_error(runs[1], "no dataset file or Hub dataset repository named 'someone/no-such-data'")
    one_error(runs[2], "HF_HUB_OFFLINE=1", "--model also takes a local folder")
    one_error(runs[3], "HF_HUB_OFFLINE=1", "--data path/to/alpaca.json")
    assert not any("/someone/tiny-gpt2/" in r or DATASET in r for r in hub.requests)  # the offline ones asked nothing


def test_a_model_and_a_dataset_downloaded_then_reused_offline_then_damaged_are_downloaded_again(hub, env, tmp_path):
    """The model (python -m minigpt.generate) and the training data (python -m lora.train) side by side. The
    dataset is named `owner/name`: the Hub says which .json file the repo holds, and offline its cached
    snapshot does."""
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    for run in run_all(env, generate_cmd("--adapter", ADAPTER), train_cmd(hub, tmp_path / "a", DATASET)):
        succeeded(run)
    clean_cache(env)
    hub.requests.clear()
    for run in run_all(offline, generate_cmd("--adapter", ADAPTER), train_cmd(hub, tmp_path / "b", DATASET)):
        succeeded(run)
    assert hub.requests == []
    blob = model_blob(env)
    blob.write_bytes(blob.read_bytes()[:1000])  # damaged in the cache, behind the snapshot's link
    data_blob = next((Path(env["HF_HOME"]) / "hub").glob(f"datasets--*/snapshots/*/{DATA_FILE}")).resolve()
    data_blob.write_bytes(data_blob.read_bytes()[:20])

    model, data = run_all(env, (offline, generate_cmd()), train_cmd(hub, tmp_path / "c"))
    error = one_error(model, f"the cached model.safetensors of model '{MODEL}' is damaged",
                      f"hf download {MODEL} model.safetensors --force-download")
    assert str(blob) not in error
    succeeded(data)  # online: the dataset is downloaded again

    succeeded(generate(env))  # online: healed
    clean_cache(env)
    hub.requests.clear()
    succeeded(generate(offline))  # and it stays healed
    assert hub.requests == []


def test_ctrl_c_during_a_stalled_download_is_one_line_and_exit_130(hub, env):
    hub.faults = [Fault("stall", "model.safetensors")]
    hub.requests.clear()
    run = subprocess.Popen([sys.executable, "-m", "minigpt.generate", "--model", MODEL, "--device", "cpu"], cwd=REPO,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(r.startswith("GET") and r.endswith("model.safetensors") for r in hub.requests) \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=30)
    assert run.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "interrupted"
    clean_cache(env)
