"""app.py without a server: command line, loading the models once, the mode switch without an adapter."""
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from minigpt.serve import app, launch
from minigpt import AdapterError
from minigpt.serve.conversation import BASE, TUNED, ChatInputError
from minigpt.serve.engine import load_engine
from tests.helpers import REPO, interruptible
from tests.helpers.app_server import answers, free_port, make_adapter
from tests.helpers.checkpoints import make_checkpoint


def test_defaults_bind_to_localhost_7860(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    args = launch.parse_args([])
    assert (args.model, args.adapter, args.host, args.port, args.share, args.precision, args.concurrency,
            args.queue_size, args.sessions_kept) == ("gpt2", None, "127.0.0.1", 7860, False, "float32", 8, 256, 64)


def test_on_a_space_it_binds_all_interfaces(monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/minigpt")
    assert launch.parse_args([]).host == "0.0.0.0"
    assert launch.parse_args(["--host", "127.0.0.1"]).host == "127.0.0.1"


@pytest.mark.parametrize("argv, message", [(["--concurrency", "0"], "--concurrency must be >= 1"),
                                           (["--sessions-kept", "0"], "--sessions-kept must be >= 1"),
                                           (["--dtype", "float64"], "invalid choice: 'float64'"),
                                           (["--dtype", "int8", "--speculative"], "use it with a float --precision"),
                                           (["--precision", "int4", "--speculative"], "use it with a float --precision"),
                                           (["--port", "99999"], "--port must be between 1 and 65535, got 99999"),
                                           (["--port", "-1"], "--port must be between 1 and 65535, got -1")])
def test_bad_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        launch.parse_args(argv)
    assert message in capsys.readouterr().err


def test_without_an_adapter_only_base_mode_runs_and_the_hint_says_how_to_get_one(tiny_checkpoint, tmp_path):
    default = tmp_path / "checkpoints" / "alpaca-lora"  # not there
    engine = load_engine(str(tiny_checkpoint[0]), None, "cpu", "float32", default_adapter=default)
    assert list(engine.models) == [BASE] and engine.device == "cpu float32 (C decode step)"
    assert "python -m lora.train" in engine.adapter_hint and "--adapter" in engine.adapter_hint
    with pytest.raises(ChatInputError, match="Alpaca LoRA mode is off: no adapter in checkpoints/alpaca-lora. Train"):
        engine.model(TUNED)
    assert engine.adapter_note.startswith(f"no adapter in {default}. Train")  # the server's log has the path


@pytest.mark.parametrize("leftover, why", [
    ("log only", "missing adapter_config.json"),  # a training run stopped before its first checkpoint
    ("another model", "a module this 2-layer model does not have"),
])
def test_a_default_adapter_that_cannot_be_used_leaves_base_mode_and_says_why(tiny_checkpoint, tmp_path, leftover,
                                                                             why):
    default = tmp_path / "checkpoints" / "alpaca-lora"
    if leftover == "log only":
        default.mkdir(parents=True)
        (default / "log.jsonl").write_text('{"step": 1, "loss": 2.5}\n')
    else:
        make_adapter(make_checkpoint(tmp_path / "deeper", n_layer=3)[0], default)
    engine = load_engine(str(tiny_checkpoint[0]), None, "cpu", "float32", default_adapter=default)
    assert list(engine.models) == [BASE]
    assert engine.adapter_note.startswith(f"the adapter in {default} cannot be used (") and why in engine.adapter_note
    # what the page (Model switch, Compare, Score) and /v1 show: no path of the server's disk, no file names
    assert engine.adapter_hint.startswith("the adapter in checkpoints/alpaca-lora cannot be used (it is incomplete")
    config = json.dumps(app.build_app(engine).get_config_file(), default=str)
    assert "checkpoints/alpaca-lora cannot be used" in config and str(tmp_path) not in config and why not in config
    with pytest.raises(ChatInputError) as off:
        engine.model(TUNED)
    assert str(tmp_path) not in str(off.value) and "checkpoints/alpaca-lora" in str(off.value)
    with pytest.raises(AdapterError, match=why):  # the same folder named with --adapter stays an error
        load_engine(str(tiny_checkpoint[0]), str(default), "cpu", "float32", default_adapter=default)


def test_the_default_adapter_is_beside_app_py_whatever_the_cwd_and_can_be_turned_off(monkeypatch, tmp_path, capsys):
    served = []
    monkeypatch.setattr(app, "serve", lambda args, default_adapter: served.append(default_adapter) or 0)
    monkeypatch.chdir(tmp_path)
    for argv in ([], ["--no-adapter"]):
        monkeypatch.setattr(sys, "argv", ["app.py", *argv])
        with pytest.raises(SystemExit) as exit:
            runpy.run_path(str(REPO / "app.py"), run_name="__main__")
        assert exit.value.code == 0
    assert launch.main([]) == 0  # the installed command: the cwd's checkpoints/alpaca-lora
    assert served == [REPO / "checkpoints" / "alpaca-lora", None, tmp_path / "checkpoints" / "alpaca-lora"]
    with pytest.raises(SystemExit):
        launch.parse_args(["--adapter", "x", "--no-adapter"])
    assert "not allowed with argument --adapter" in capsys.readouterr().err


def test_a_busy_port_is_one_line_naming_our_option(tiny_checkpoint, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert launch.main(["--model", str(tiny_checkpoint[0]), "--port", str(port), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: port {port} on 127.0.0.1 is already in use: pick another with --port\n"


@pytest.mark.slow
@pytest.mark.parametrize("when", ["importing", "starting the server", "serving"])
def test_ctrl_c_is_one_line_130_and_leaves_no_export_folder(tiny_checkpoint, tmp_path, when):
    """SIGINT early (torch and Gradio are being imported), once the models are loaded (the page is being built, or
    Gradio's server is starting and checking itself), or while the page answers: whichever step it lands in, one
    line, status 130 without waiting for the server's threads, and the export folder (made with the page) gone."""
    port = free_port()
    run = subprocess.Popen([sys.executable, "app.py", "--model", str(tiny_checkpoint[0]), "--no-adapter", "--device",
                            "cpu", "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, preexec_fn=interruptible,
                           env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path)})
    if when == "importing":
        time.sleep(0.3)
    else:
        assert run.stdout.readline().startswith("Serving ")  # the models are loaded; build_app and launch follow
    if when == "serving":
        while not answers(f"http://127.0.0.1:{port}/health"):
            assert run.poll() is None, run.communicate()
            time.sleep(0.2)
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 130 and "Traceback" not in err, err
    assert [line for line in err.splitlines() if line and not line.startswith("note: ")] == ["interrupted"]
    assert not list(tmp_path.glob("minigpt-exports-*"))


def test_help_answers_before_gradio_or_a_model_is_imported():
    """The imports are listed, not timed: -X importtime names every module a run imports."""
    run = subprocess.run([sys.executable, "-X", "importtime", "app.py", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "--no-adapter" in run.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "argparse" in imported and "gradio" not in imported and "minigpt.serve.app" not in imported


def test_the_tuned_model_shares_the_base_weights_but_its_lora_targets(tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint[0]
    engine = load_engine(str(folder), str(make_adapter(folder, tmp_path / "adapter")), "cpu", "bfloat16")
    base, tuned = engine.models[BASE].model, engine.models[TUNED].model
    assert engine.device == "cpu bfloat16" and tuned.lm_head.weight.dtype == torch.bfloat16
    assert tuned.transformer.wte.weight is base.transformer.wte.weight
    assert tuned.transformer.h[0].mlp.c_fc.weight is base.transformer.h[0].mlp.c_fc.weight
    assert not torch.equal(tuned.transformer.h[0].attn.c_attn.weight, base.transformer.h[0].attn.c_attn.weight)


@pytest.mark.parametrize("broken", ["model", "adapter"])
def test_unloadable_weights_end_with_a_one_line_error_naming_them(tiny_checkpoint, tmp_path, broken, capsys):
    missing = str(tmp_path / f"no-such-{broken}")
    model, adapter = (missing, []) if broken == "model" else (str(tiny_checkpoint[0]), ["--adapter", missing])
    assert launch.main(["--model", model, *adapter, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and missing in err and err.count("\n") == 1


def test_the_app_exposes_chat_stop_and_alternatives_and_cleans_gradios_cache(tiny_checkpoint):
    demo = app.build_app(load_engine(str(tiny_checkpoint[0]), None, "cpu", "float32"))
    names = {fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public"}
    assert names == {"chat", "stop", "alternatives"}
    assert demo.delete_cache == (app.UPLOAD_CLEANUP_S, app.UPLOAD_CLEANUP_S)


def test_speculative_engine_drafts_each_mode_and_replies_as_without(tiny_checkpoint, tmp_path):
    import threading

    from minigpt.serve.conversation import Prompt, read_request
    from minigpt.serve.replies import stream_reply
    from minigpt.speed.quantize import Int8Linear
    folder = tiny_checkpoint[0]
    engine = load_engine(str(folder), str(make_adapter(folder, tmp_path / "adapter")), "cpu", "float32",
                         speculative=True)
    assert list(engine.drafts) == [BASE, TUNED] and engine.device == "cpu float32 (C decode step) + int8 draft"
    assert isinstance(engine.drafts[TUNED].model.transformer.h[0].attn.c_attn, Int8Linear)
    prompt = Prompt("", engine.tokenizer.encode_ordinary("User: Hello there\nAssistant:"), 0, stop=())
    for mode in (BASE, TUNED):
        request = read_request(mode, 0, 0, 1.0, 24, None, 1.0, context=128)[0]
        replies = [list(stream_reply(engine.models[mode], engine.tokenizer, prompt, request, threading.Event(),
                                     draft))[-1] for draft in (None, engine.drafts[mode])]
        assert replies[0].token_ids == replies[1].token_ids and replies[0].text == replies[1].text


def test_precision_is_one_flag_with_dtype_as_its_alias_and_compile_is_ignored(tiny_checkpoint, capsys):
    assert launch.parse_args(["--precision", "int8"]).precision == launch.parse_args(["--dtype", "int8"]).precision == "int8"
    from minigpt.cli import warn_if_compile
    warn_if_compile(launch.parse_args(["--compile"]))
    assert capsys.readouterr().err == ("note: --compile is no longer needed and is ignored: the fastest decode step "
                                       "is chosen at load time\n")


@pytest.mark.parametrize("device", ["gpu", "cuda:7"])
def test_a_device_this_machine_lacks_ends_with_one_line(tiny_checkpoint, device, capsys):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that device")
    assert launch.main(["--model", str(tiny_checkpoint[0]), "--device", device, "--no-adapter"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and repr(device) in err and err.count("\n") == 1
