"""MiniGPT chat: GPT-2 written from scratch, and its Alpaca LoRA, streaming side by side with attention
and log-prob panels. Arguments, layout and wiring only: the handlers are in minigpt/serve/handlers.py.

    python app.py --model gpt2 --adapter checkpoints/alpaca-lora --host 127.0.0.1 --port 7860
"""
from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from pathlib import Path

from minigpt.cli import add_precision_arguments, warn_if_compile

DEFAULT_ADAPTER = Path(__file__).resolve().parent / "checkpoints" / "alpaca-lora"  # the project's, whatever the cwd
UPLOAD_CLEANUP_S = 3600  # the app takes no files; anything in Gradio's cache goes after an hour
SESSIONS_KEPT = 64  # per-session state (last reply, panels) kept for the most recent sessions: memory levels off


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    on_space = "SPACE_ID" in os.environ  # a Hugging Face Space serves from inside its container
    p = argparse.ArgumentParser(prog="python app.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2", help="gpt2[-medium|-large|-xl], a Hub repo id, or a local folder")
    adapter = p.add_mutually_exclusive_group()
    adapter.add_argument("--adapter", default=None,
                         help="PEFT GPT-2 LoRA adapter: a folder or a Hub repo id (default: checkpoints/alpaca-lora "
                              "next to app.py, if it is there and fits the model)")
    adapter.add_argument("--no-adapter", action="store_true", help="serve the base model alone, even if "
                                                                   "checkpoints/alpaca-lora is there")
    p.add_argument("--host", default="0.0.0.0" if on_space else "127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a temporary public *.gradio.live link")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    add_precision_arguments(p)
    p.add_argument("--speculative", action="store_true",
                   help="an int8 copy proposes tokens, the model checks several per pass: same model, faster on CPU")
    p.add_argument("--concurrency", type=int, default=2,
                   help="replies computed at the same time, chat and API together (the rest queue)")
    p.add_argument("--api-key", default=os.environ.get("MINIGPT_API_KEY"),
                   help="every /v1 (OpenAI-compatible API) request must send it as a bearer token "
                        "(default: $MINIGPT_API_KEY; none: /v1 is open on loopback, off beyond it)")
    p.add_argument("--open-api", action="store_true",
                   help="serve /v1 without a key even when bound beyond loopback (--host 0.0.0.0, a Space)")
    args = p.parse_args(argv)
    if args.concurrency < 1:
        p.error(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.speculative and args.precision == "int8":
        p.error("--speculative checks an int8 draft with the float model: use it with a float --precision")
    return args


if __name__ == "__main__":
    parse_args()  # answer --help and refuse bad options before the slow imports below (gradio)

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported: no calls home

import gradio as gr  # noqa: E402
from starlette.routing import Mount  # noqa: E402

from minigpt import CheckpointError  # noqa: E402
from minigpt.errors import DeviceError  # noqa: E402
from minigpt.serve.conversation import (  # noqa: E402
    BASE,
    MAX_NEW_TOKENS,
    MAX_TEMPERATURE,
    MODES,
    TUNED,
)
from minigpt.serve.engine import Engine, load_engine  # noqa: E402
from minigpt.serve.handlers import ATTENTION_HINT, ChatHandlers, unlock  # noqa: E402
from minigpt.serve.openai_api import access_for, api_app, describe  # noqa: E402
from minigpt.serve.panels import BAND_COLOURS  # noqa: E402
from minigpt.serve.payloads import check_chat_payloads  # noqa: E402
from minigpt.serve.session import Session  # noqa: E402

ASSETS = Path(__file__).parent / "assets"
EXAMPLES = ["Give three tips for staying healthy.", "What is the capital of France?",
            "Write a short poem about the sea.", "Explain what a neural network is in one sentence."]


def build_app(engine: Engine) -> gr.Blocks:
    """The page: one tab per view, each laid out by its own function below."""
    with gr.Blocks(title="MiniGPT chat", analytics_enabled=False,
                   delete_cache=(UPLOAD_CLEANUP_S, UPLOAD_CLEANUP_S)) as demo:
        gr.Markdown("# MiniGPT chat\nGPT-2 written from scratch, with real OpenAI weights, and its Alpaca "
                    "LoRA. Replies stream token by token; open the panels below to look inside.")
        with gr.Tab("Chat", id="chat-tab"):
            chat_tab(engine)
    check_chat_payloads(demo)
    return demo


def chat_tab(engine: Engine) -> None:
    """The chat, its sampling controls and its log-prob and attention panels."""
    config = engine.models[BASE].config
    handlers = ChatHandlers(engine)
    session = gr.State(Session())
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            chat = gr.Chatbot(elem_id="chat", label="Conversation", height=440, render_markdown=False,
                              sanitize_html=True, allow_tags=False, buttons=["copy", "copy_all"],
                              placeholder="Ask something, or pick an example below.")
            with gr.Row():
                msg = gr.Textbox(elem_id="msg", show_label=False, placeholder="Message MiniGPT…", scale=5,
                                 autofocus=True)
                send = gr.Button("Send", elem_id="send", variant="primary", scale=1, min_width=80)
                stop_btn = gr.Button("Stop", elem_id="stop", variant="stop", scale=1, min_width=80)
            with gr.Row():
                retry_btn = gr.Button("↻ Retry", elem_id="retry", size="sm")
                undo_btn = gr.Button("↶ Undo", elem_id="undo", size="sm")
                clear_btn = gr.Button("✕ Clear", elem_id="clear", size="sm")
            stats = gr.Markdown(handlers.ready, elem_id="stats")
            gr.Examples(EXAMPLES, inputs=msg, label="Examples")
        with gr.Column(scale=2):
            mode = gr.Radio(list(MODES), value=BASE, label="Model", elem_id="mode",
                            interactive=TUNED in engine.models,
                            info=("Base GPT-2 continues a plain dialogue; Alpaca LoRA follows instructions."
                                  if TUNED in engine.models else f"Alpaca LoRA is off: {engine.adapter_hint}"))
            with gr.Accordion("Sampling", open=True):
                temperature = gr.Slider(0, MAX_TEMPERATURE, value=0.7, step=0.05, label="Temperature",
                                        info="0 = greedy", elem_id="temperature")
                top_k = gr.Slider(0, 200, value=40, step=1, label="Top-k", info="0 = off", elem_id="top_k")
                top_p = gr.Slider(0.05, 1, value=0.95, step=0.01, label="Top-p", info="1 = off",
                                  elem_id="top_p")
                max_new_tokens = gr.Slider(1, min(MAX_NEW_TOKENS, config.n_positions // 2), value=128, step=1,
                                           label="Max new tokens", elem_id="max_new_tokens")
                seed = gr.Textbox("", label="Seed", info="a whole number repeats a reply; blank = random",
                                  placeholder="random", elem_id="seed")
            with gr.Accordion("Prompt sent to the model", open=False):
                prompt_view = gr.Textbox(elem_id="prompt", show_label=False, lines=8, max_lines=20,
                                         interactive=False, buttons=["copy"])
    with gr.Accordion("Token log-probabilities", open=False, elem_id="logprob_panel"):
        tokens = gr.HighlightedText(elem_id="tokens", label="Last reply, coloured by the probability of each token",
                                    color_map=BAND_COLOURS, show_legend=True, show_inline_category=False)
        with gr.Row():
            with gr.Column(scale=2):
                position = gr.Slider(1, 2, value=1, step=1, label="Token position (or click a token)",
                                     elem_id="position")
                caption = gr.Markdown(elem_id="caption")
            alts = gr.Label(elem_id="alternatives", label="Top-5 alternatives (raw model distribution)",
                            num_top_classes=5, scale=3)
    with gr.Accordion("Attention map", open=False, elem_id="attention_panel") as attention_acc:
        with gr.Row():
            layer = gr.Dropdown([(f"Layer {i + 1}", i) for i in range(config.n_layer)], value=0,
                                label="Layer", elem_id="layer")
            head = gr.Dropdown([("Average over heads", -1)] + [(f"Head {h + 1}", h) for h in range(config.n_head)],
                               value=-1, label="Head", elem_id="head")
        attention_note = gr.Markdown(ATTENTION_HINT, elem_id="attention_note")
        plot = gr.Plot(elem_id="heatmap", show_label=False)

    controls = [mode, temperature, top_k, top_p, max_new_tokens, seed]
    lockable = [send, retry_btn, undo_btn, clear_btn]
    panels = [prompt_view, tokens, position, caption, alts, plot, attention_note]

    def reply_chain(trigger, check, check_inputs, step, step_inputs, api_name=None):
        """check refuses bad input (queued, so its message shows; no outputs, so nothing is covered by an error
        badge); step adds the message and locks the controls (no queue); then the reply streams; then unlock."""
        trigger(check, [*check_inputs, *controls], None, api_visibility="private", show_progress="hidden").success(
            step, [session, *step_inputs], [msg, chat, *lockable], queue=False, api_visibility="private").success(
            handlers.respond, [session, chat, *controls, layer, head], [chat, stats, *panels], api_name=api_name,
            api_visibility="public" if api_name else "private").then(
            unlock, None, [msg, *lockable], queue=False, api_visibility="private")

    reply_chain(msg.submit, handlers.check_message, [msg, chat], handlers.add_message, [msg, chat], api_name="chat")
    reply_chain(send.click, handlers.check_message, [msg, chat], handlers.add_message, [msg, chat])
    reply_chain(retry_btn.click, handlers.check_retry, [chat], handlers.retry, [chat])
    undo_btn.click(handlers.undo, chat, [msg, chat], queue=False, api_visibility="private")
    clear_btn.click(handlers.clear, session, [chat, stats, *panels], queue=False, api_visibility="private")
    stop_btn.click(handlers.stop, session, None, queue=False, api_name="stop")
    position.release(handlers.alternatives_at, [session, position], [caption, alts], api_name="alternatives")
    tokens.select(handlers.pick_token, session, [tokens, position, caption, alts], api_visibility="private")
    attention_acc.expand(handlers.open_attention, [session, layer, head], [plot, attention_note],
                         api_visibility="private")
    attention_acc.collapse(handlers.close_attention, session, None, queue=False, api_visibility="private")
    for selector in (layer, head):
        selector.change(handlers.attention_panel, [session, layer, head], [plot, attention_note],
                        api_visibility="private")


class PortBusy(Exception):
    def __init__(self, host: str, port: int, cause: OSError):
        in_use = cause.errno in (errno.EADDRINUSE, None)  # Gradio's own "Cannot find empty port" has no errno
        super().__init__(f"port {port} on {host} is already in use: pick another with --port" if in_use else
                         f"cannot listen on {host}:{port} ({cause.strerror or cause}): check --host and --port")


def check_port(host: str, port: int) -> None:
    """Bind and release, as Gradio does before it serves (SO_REUSEADDR included): PortBusy if that fails."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise PortBusy(host, port, e) from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warn_if_compile(args)
    try:
        check_port(args.host, args.port)  # before the minutes of loading, not after
        engine = load_engine(args.model, args.adapter, args.device, args.precision, args.speculative,
                             default_adapter=None if args.no_adapter else DEFAULT_ADAPTER, concurrency=args.concurrency)
    except (CheckpointError, DeviceError, PortBusy) as e:  # CheckpointError includes AdapterError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if TUNED not in engine.models:
        print(f"note: {TUNED} mode is off: {engine.adapter_hint}", file=sys.stderr)
    demo = build_app(engine)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=64)
    access = access_for(args.host, args.share, args.api_key, args.open_api)
    print(describe(access, f"http://{args.host}:{args.port}"), flush=True)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True,
                    theme=gr.themes.Soft(primary_hue="indigo", secondary_hue="pink"),
                    css_paths=[ASSETS / "app.css"], footer_links=["api"],
                    max_file_size=0,  # the app takes no files: every upload is refused (413)
                    state_session_capacity=SESSIONS_KEPT,
                    # The API's routes go first in the FastAPI app Gradio builds: /v1 is ours, the rest Gradio's.
                    app_kwargs={"routes": [Mount("/v1", api_app(engine, access))]})
    except OSError as e:  # the port was taken while the models loaded
        print(f"error: {PortBusy(args.host, args.port, e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
