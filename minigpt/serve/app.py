"""The chat app's page and server: the tabs laid out and wired to their handlers (minigpt/serve/handlers.py,
compare.py, score.py, inspect_panels.py), the /v1 API mounted beside Gradio's routes, and `serve`, which
loads the models and computes every forward pass in the thread that calls it. The options are in launch.py.
"""
from __future__ import annotations

import argparse
import errno
import functools
import os
import socket
import sys
from collections.abc import Callable
from inspect import isasyncgenfunction, iscoroutinefunction, isgeneratorfunction
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported: no calls home

import gradio as gr  # noqa: E402
from gradio.components import Component  # noqa: E402
import plotly  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402
from starlette.responses import FileResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from minigpt import CheckpointError  # noqa: E402
from minigpt.cli import ctrl_c_exits_now, warn_if_compile  # noqa: E402
from minigpt.errors import DeviceError  # noqa: E402
from minigpt.serve.conversation import (  # noqa: E402
    BASE,
    MAX_NEW_TOKENS,
    MAX_TEMPERATURE,
    MODES,
    TUNED,
)
from minigpt.serve.compare import DIFF_HINT, CompareHandlers, CompareSession, side_outputs  # noqa: E402
from minigpt.serve.engine import Engine, load_engine  # noqa: E402
from minigpt.serve.files import MAX_FILE, UPLOAD_CLEANUP_S, UploadGuard  # noqa: E402
from minigpt.serve.handlers import BUTTONS, ChatHandlers, unlock  # noqa: E402
from minigpt.serve.inspect_panels import InspectHandlers  # noqa: E402
from minigpt.serve.openai_api import access_for, api_routes, describe  # noqa: E402
from minigpt.serve.payloads import check_payloads  # noqa: E402
from minigpt.serve.score import ScoreHandlers  # noqa: E402
from minigpt.serve.session import Session  # noqa: E402
from minigpt.lora_scale import MAX_SCALE  # noqa: E402
from minigpt.sampling import MAX_PENALTY, MAX_REPETITION_PENALTY  # noqa: E402


CSS = Path(__file__).with_name("app.css")
EXAMPLE_SCHEMA = ('{"type": "object", "properties": {"answer": {"type": "string", "maxLength": 60},\n'
                  ' "confidence": {"type": "integer", "minimum": 1, "maximum": 10}},\n'
                  ' "required": ["answer", "confidence"], "additionalProperties": false}')
# The page's own scripts, served beside Gradio's routes: Plotly (the charting library, from its Python
# package: the page needs no CDN) and the glue that draws the "look inside" views with it.
SCRIPTS = {"/minigpt/plotly.min.js": Path(plotly.__file__).parent / "package_data" / "plotly.min.js",
           "/minigpt/inspect.js": Path(__file__).with_name("inspect.js")}
HEAD = "".join(f'<script defer src=".{path}"></script>' for path in SCRIPTS)
EXAMPLES = ["Give three tips for staying healthy.", "What is the capital of France?",
            "Write a short poem about the sea.", "Explain what a neural network is in one sentence."]


def build_app(engine: Engine) -> gr.Blocks:
    """The page: one tab per view, each laid out by its own function below."""
    with gr.Blocks(title="MiniGPT chat", analytics_enabled=False,
                   delete_cache=(UPLOAD_CLEANUP_S, UPLOAD_CLEANUP_S)) as demo:
        gr.Markdown("**MiniGPT chat** · GPT-2 written from scratch, with real OpenAI weights, and its Alpaca "
                    "LoRA. Replies stream token by token; the panels beside the chat look inside.", elem_id="title")
        with gr.Tab("Chat", id="chat-tab"):
            chat_tab(engine)
        with gr.Tab("Compare", id="compare-tab"):
            compare_tab(engine)
        with gr.Tab("Score", id="score-tab"):
            score_tab(engine)
    check_payloads(demo)
    return demo


def scale_slider(engine: Engine, elem_id: str) -> gr.Slider:
    return gr.Slider(0, MAX_SCALE, value=1, step=0.05, label="LoRA scale", elem_id=elem_id,
                     interactive=TUNED in engine.models,
                     info="scales the adapter's update: 0 = base, 1 = as trained, 2 = doubled")


def more_sampling_controls() -> list[Component]:
    """The sampler's other stages (minigpt.sampling), off by default, in MoreSampling's order; the API's
    fields of the same names."""
    return [gr.Slider(0, 1, value=0, step=0.01, label="Min-p", info="keep tokens at least this fraction as likely "
                      "as the top one; 0 = off", elem_id="min_p"),
            gr.Slider(0.1, MAX_REPETITION_PENALTY, value=1, step=0.05, label="Repetition penalty",
                      info="divides the logits of tokens already seen, prompt too; 1 = off",
                      elem_id="repetition_penalty"),
            gr.Slider(-MAX_PENALTY, MAX_PENALTY, value=0, step=0.1, label="Presence penalty",
                      info="subtracted once from tokens already generated; 0 = off", elem_id="presence_penalty"),
            gr.Slider(-MAX_PENALTY, MAX_PENALTY, value=0, step=0.1, label="Frequency penalty",
                      info="subtracted per time a token was generated; 0 = off", elem_id="frequency_penalty"),
            gr.Textbox("", label="Logit bias", info='added to token logits, e.g. {"50256": -100} bans the end of '
                       "text", placeholder="{}", elem_id="logit_bias"),
            gr.Checkbox(False, label="Answer as JSON matching this schema", elem_id="as_json"),
            gr.Code(EXAMPLE_SCHEMA, language="json", label="JSON schema", elem_id="schema", lines=4)]
REPLY_PANEL = """<div id="reply_panel" tabindex="0"><div class="reply-head"></div><div class="tokens"></div>
<div class="legend"></div><div class="caption"></div><div class="alternatives"></div>
<button class="undo-branch" disabled title="back to the reply before branching">↶ Undo branch</button></div>"""
VIEWS_PANEL = """<div id="views_panel"><div role="tablist" class="view-tabs">
<button role="tab" data-view="sampling" id="tab_sampling">Sampling</button>
<button role="tab" data-view="lens" id="tab_lens">Logit lens</button>
<button role="tab" data-view="attention" id="tab_attention">Attention</button>
<button role="tab" data-view="timeline" id="tab_timeline">Timeline</button></div>
<div class="view" data-view="sampling" id="view_sampling"><div class="chart"></div><div class="note"></div></div>
<div class="view" data-view="lens" id="view_lens" hidden><div class="chart"></div><div class="note"></div></div>
<div class="view" data-view="attention" id="view_attention" hidden><div class="att-controls">
<label>Layer <select id="att_layer"></select></label><label>Head <select id="att_head"></select></label>
<label><input type="checkbox" id="att_sink"> Hide the first token (attention sink)</label></div>
<div class="chart"></div><div class="heads"><div class="entropy"></div><div class="similarity"></div></div>
<div class="note"></div></div>
<div class="view" data-view="timeline" id="view_timeline" hidden><div class="chart"></div><div class="note"></div></div>
</div>"""


def chat_tab(engine: Engine) -> None:
    """The chat in the middle of three columns: the conversation, the "look inside" panels, the settings.
    The panels are drawn in the browser (inspect.js) from the reply's numbers, sent once per reply in the
    hidden #inspect_data; only branching, Undo branch, export and load ask the server."""
    handlers, inspect = ChatHandlers(engine), InspectHandlers(engine)
    session = gr.State(Session())
    with gr.Row(equal_height=False, elem_id="chat_row"):
        with gr.Column(scale=4, min_width=340, elem_id="chat_column"):
            mode = gr.Radio(list(MODES), value=BASE, label="Model", elem_id="mode",
                            interactive=TUNED in engine.models,
                            info=("Base GPT-2 continues a plain dialogue; Alpaca LoRA follows instructions."
                                  if TUNED in engine.models else f"Alpaca LoRA is off: {engine.adapter_hint}"))
            chat = gr.Chatbot(elem_id="chat", label="Conversation", height=360, render_markdown=False,
                              sanitize_html=True, allow_tags=False, buttons=["copy", "copy_all"],
                              placeholder="Ask something, or pick an example below.")
            with gr.Row():
                msg = gr.Textbox(elem_id="msg", show_label=False, placeholder="Message MiniGPT…", scale=5,
                                 autofocus=True)
                send = gr.Button("Send", elem_id="send", variant="primary", scale=1, min_width=70)
                stop_btn = gr.Button("Stop", elem_id="stop", variant="stop", scale=1, min_width=70)
            msg_note = gr.Markdown(elem_id="msg_note", elem_classes="note-beside")
            with gr.Row():
                retry_btn = gr.Button("↻ Retry", elem_id="retry", size="sm")
                undo_btn = gr.Button("↶ Undo", elem_id="undo", size="sm")
                clear_btn = gr.Button("✕ Clear", elem_id="clear", size="sm")
            stats = gr.Markdown(handlers.ready, elem_id="stats")
            gr.Examples(EXAMPLES, inputs=msg, label="Examples")
        with gr.Column(scale=5, min_width=340, elem_id="inspect"):
            gr.HTML(REPLY_PANEL, elem_id="reply_shell")
            branch_note = gr.Markdown(elem_id="branch_note", elem_classes="note-beside")
            gr.HTML(VIEWS_PANEL, elem_id="views_shell")
            with gr.Accordion("Export or load the conversation", open=False, elem_id="export_panel"):
                export_btn = gr.Button("Export the conversation as JSON", elem_id="export", size="sm")
                export_file = gr.File(label="Download", elem_id="export_file", interactive=False)
                load_file = gr.File(label="Load a conversation file to view its panels", file_types=[".json"],
                                    elem_id="load_file", type="filepath")
                export_note = gr.Markdown(elem_id="export_note", elem_classes="note-beside")
            # What the page's script reads and writes: the reply's numbers, and a branch request.
            inspect_data = gr.HTML("", elem_id="inspect_data", elem_classes="hidden-data")
            branch_request = gr.Textbox(elem_id="branch_request", elem_classes="hidden-data", show_label=False)
            branch_go = gr.Button("branch", elem_id="branch_go", elem_classes="hidden-data")
            undo_branch = gr.Button("undo branch", elem_id="undo_branch", elem_classes="hidden-data")
            api_position = gr.Number(visible=False)
            api_caption, api_alternatives = gr.Markdown(visible=False), gr.Label(visible=False)
        with gr.Column(scale=2, min_width=220, elem_id="settings"):
            with gr.Accordion("Sampling", open=True):
                temperature = gr.Slider(0, MAX_TEMPERATURE, value=0.7, step=0.05, label="Temperature",
                                        info="0 = greedy", elem_id="temperature")
                top_k = gr.Slider(0, 200, value=40, step=1, label="Top-k", info="0 = off", elem_id="top_k")
                top_p = gr.Slider(0.05, 1, value=0.95, step=0.01, label="Top-p", info="1 = off",
                                  elem_id="top_p")
                max_new_tokens = gr.Slider(1, min(MAX_NEW_TOKENS, engine.n_positions // 2), value=128, step=1,
                                           label="Max new tokens", elem_id="max_new_tokens")
                seed = gr.Textbox("", label="Seed", info="a whole number repeats a reply; blank = random",
                                  placeholder="random", elem_id="seed")
                scale = scale_slider(engine, "scale")
            with gr.Accordion("More sampling", open=False, elem_id="more_sampling"):
                more = more_sampling_controls()
            with gr.Accordion("Prompt sent to the model", open=False):
                prompt_view = gr.Textbox(elem_id="prompt", show_label=False, lines=8, max_lines=20,
                                         interactive=False, buttons=["copy"])
            with gr.Accordion("Model card", open=False, elem_id="model_card"):
                gr.Markdown(engine.card())

    ui = {"msg": msg, "chat": chat, "stats": stats, "send": send, "retry": retry_btn, "undo": undo_btn,
          "clear": clear_btn, "prompt": prompt_view, "msg_note": msg_note, "branch_note": branch_note,
          "inspect_data": inspect_data, "export_file": export_file,
          "export_note": export_note, "caption": api_caption, "alternatives": api_alternatives}
    named = functools.partial(by_name, ui=ui)

    def out(*names: str) -> list:
        return [ui[name] for name in names]

    controls = [mode, temperature, top_k, top_p, max_new_tokens, seed]
    private = {"api_visibility": "private"}
    panel_outputs = out("inspect_data")
    # The /chat API's outputs, in this order: the chat, the stats line, the prompt, then the note beside the box
    # and the panels' numbers (JSON inside the #inspect_data element).
    reply_outputs = out("chat", "stats", "prompt", "msg_note") + panel_outputs

    def reply_chain(trigger, explain, check, check_inputs, step, step_inputs, api_name=None):
        """explain puts the reason for a refusal beside the message box (or clears it); check refuses the same
        input silently, which stops the chain (no outputs: nothing is covered by an error badge); step adds
        the message, clears the panels and locks the controls (no queue); then the reply streams and its
        panels' numbers are computed; then unlock."""
        inputs = [*check_inputs, *controls, scale, *more]
        trigger(named(explain), inputs, out("msg_note"), queue=False, show_progress="hidden", **private)
        reply = trigger(check, inputs, None, show_progress="hidden", **private).success(
            named(step), [session, *step_inputs], out("msg", "chat", "branch_note", *BUTTONS) + panel_outputs,
            queue=False, **private).success(
            named(handlers.respond), [session, chat, *controls, scale, *more], reply_outputs,
            api_name=api_name, api_visibility="public" if api_name else "private")
        reply.then(named(unlock), None, out("msg", *BUTTONS), queue=False, **private)

    message = (handlers.explain_message, handlers.check_message, [msg, chat], handlers.add_message, [msg, chat])
    reply_chain(msg.submit, *message, api_name="chat")
    reply_chain(send.click, *message)
    reply_chain(retry_btn.click, handlers.explain_retry, handlers.check_retry, [chat], handlers.retry, [chat])
    undo_btn.click(named(handlers.undo), [session, chat], out("msg", "chat", "stats", "msg_note", "branch_note")
                   + panel_outputs, queue=False, **private)
    clear_btn.click(named(handlers.clear), session, out("chat", "stats", "prompt", "msg_note", "branch_note")
                    + panel_outputs, queue=False, **private)
    stop_btn.click(handlers.stop, session, None, queue=False, api_name="stop")
    branch_go.click(named(inspect.branch), [session, branch_request],
                    out("chat", "stats", "msg", "branch_note", *BUTTONS) + panel_outputs, show_progress="hidden",
                    **private)
    undo_branch.click(named(inspect.undo_branch), session, out("chat", "stats", "branch_note") + panel_outputs,
                      show_progress="hidden", **private)
    export_btn.click(named(inspect.export), session, out("export_file", "export_note"), **private)
    load_file.upload(named(inspect.load), [session, load_file],
                     out("chat", "stats", "export_note", "msg_note", "branch_note") + panel_outputs,
                     show_progress="hidden", **private)
    api_position.change(named(handlers.alternatives_at), [session, api_position], out("caption", "alternatives"),
                        api_name="alternatives")


def compare_tab(engine: Engine) -> None:
    """One message, both models answering side by side with the same settings and seed; the token diff."""
    handlers = CompareHandlers(engine)
    session = gr.State(CompareSession())
    with gr.Row():
        message = gr.Textbox(elem_id="cmp_msg", show_label=False, placeholder="One message for both models…",
                             scale=5)
        send = gr.Button("Send to both", elem_id="cmp_send", variant="primary", scale=1, min_width=120)
    with gr.Accordion("Settings (both sides)", open=False):
        with gr.Row():
            temperature = gr.Slider(0, MAX_TEMPERATURE, value=0.7, step=0.05, label="Temperature",
                                    elem_id="cmp_temperature")
            top_k = gr.Slider(0, 200, value=40, step=1, label="Top-k", elem_id="cmp_top_k")
            top_p = gr.Slider(0.05, 1, value=0.95, step=0.01, label="Top-p", elem_id="cmp_top_p")
        with gr.Row():
            max_new_tokens = gr.Slider(1, min(MAX_NEW_TOKENS, engine.n_positions // 2), value=96, step=1,
                                       label="Max new tokens", elem_id="cmp_max_new_tokens")
            seed = gr.Textbox("", label="Seed", info="blank = one random seed for both", elem_id="cmp_seed")
            scale = scale_slider(engine, "cmp_scale")
    note = gr.Markdown(elem_id="cmp_note")
    ui, stops = {"cmp_send": send, "cmp_note": note}, {}
    with gr.Row(equal_height=False):
        for mode in (BASE, TUNED):
            text_name, stats_name = side_outputs(mode)
            with gr.Column():  # Stop above the text: it stays put while the reply grows below it
                stops[mode] = gr.Button(f"Stop {mode}", elem_id=f"{text_name}_stop", variant="stop", size="sm")
                ui[text_name] = gr.Textbox(label=mode, elem_id=text_name, lines=10, max_lines=24, interactive=False)
                ui[stats_name] = gr.Markdown(elem_id=stats_name)
    with gr.Accordion("Token diff", open=True, elem_id="diff_panel"):
        with gr.Row():
            which = gr.Radio(list(MODES), value=TUNED, label="Reply to re-score", elem_id="diff_which", scale=3)
            diff_btn = gr.Button("Compare tokens", elem_id="diff_btn", scale=1)
        ui["diff_summary"] = gr.Markdown(DIFF_HINT, elem_id="diff_summary")
        ui["diff_tokens"] = gr.HighlightedText(
            elem_id="diff_tokens", show_legend=True, show_inline_category=False,
            label="log p tuned − log p base: red = the adapter made the token likelier, purple = less likely "
                  "(±1 = ±4 nats)")
        ui["diff_chart"] = gr.Plot(elem_id="diff_chart", show_label=False)
        ui["diff_ranked"] = gr.Dataframe(elem_id="diff_ranked", label="Where the adapter changed its mind (top-1 "
                                         "differs), largest KL(tuned ‖ base) first", interactive=False, wrap=True,
                                         column_widths=["6%", "9%", "12%", "9%", "9%", "7%", "24%", "24%"])
        with gr.Accordion("Every token", open=False):
            ui["diff_table"] = gr.Dataframe(elem_id="diff_table", interactive=False)
    named = functools.partial(by_name, ui=ui)

    controls = [temperature, top_k, top_p, max_new_tokens, seed, scale]
    private = {"api_visibility": "private"}
    for trigger in (send.click, message.submit):  # the two sides stream as two queued events, each Stop-able
        # explain says why a message is refused, under the settings; check stops the chain on it (no outputs, so
        # no error badge); start (no queue) registers the Stop flags
        trigger(named(handlers.explain), [message, *controls], note, queue=False, show_progress="hidden", **private)
        started = trigger(handlers.check, [message, *controls], None, show_progress="hidden", **private).success(
            named(handlers.start), [session, message, *controls],
            [send, note, *(ui[name] for mode in MODES for name in side_outputs(mode))], queue=False, **private)
        for mode, respond in ((BASE, handlers.respond_base), (TUNED, handlers.respond_tuned)):
            started.success(named(respond), session, [ui[name] for name in side_outputs(mode)], **private).then(
                named(handlers.unlock), session, send, queue=False, **private)
    for mode, stop in ((BASE, handlers.stop_base), (TUNED, handlers.stop_tuned)):
        stops[mode].click(stop, session, None, queue=False, **private)
    diff_btn.click(named(handlers.diff), [session, which],
                   [ui[name] for name in ("diff_summary", "diff_tokens", "diff_chart", "diff_ranked", "diff_table")],
                   **private)


def score_tab(engine: Engine) -> None:
    """Paste a text: every token coloured by its surprisal under each model, and their perplexities."""
    handlers = ScoreHandlers(engine)
    text = gr.Textbox(elem_id="score_text", label="Text to score", lines=6, max_lines=20,
                      placeholder="Paste any text: each model's perplexity, and how surprised it is by each token.")
    with gr.Row():
        scale = scale_slider(engine, "score_scale")
        score = gr.Button("Score", elem_id="score_btn", variant="primary")
    summary = gr.Markdown(elem_id="score_summary")
    label = "surprisal (−log p): white = expected, red = surprising"
    base = gr.HighlightedText(elem_id="score_base", label=f"{BASE}, {label}", show_legend=False,
                              show_inline_category=False)
    tuned = gr.HighlightedText(elem_id="score_tuned", label=f"{TUNED}, {label}", show_legend=False,
                               show_inline_category=False)
    ui = {"score_summary": summary, "score_base": base, "score_tuned": tuned}
    score.click(by_name(handlers.score, ui), [text, scale], list(ui.values()), api_visibility="private")


def by_name(handler: Callable, ui: dict[str, Component]) -> Callable:
    """Wire a handler that returns or yields its outputs by name ({"chat": history, ...}, only those it
    changes): Gradio gets them by component. The wrapper keeps the handler's signature (Gradio reads it
    for gr.SelectData) and its kind (function, coroutine, generator, async generator)."""
    def components(values: dict | None) -> dict:
        if not values:  # nothing changes: Gradio would take an empty dict for the value of a single output
            return gr.skip()
        return {ui[name]: value for name, value in values.items()}

    if isasyncgenfunction(handler):
        async def wired(*args):
            async for values in handler(*args):
                yield components(values)
    elif iscoroutinefunction(handler):
        async def wired(*args):
            return components(await handler(*args))
    elif isgeneratorfunction(handler):
        def wired(*args):
            for values in handler(*args):
                yield components(values)
    else:
        def wired(*args):
            return components(handler(*args))
    return functools.wraps(handler)(wired)


def script_routes() -> list[Route]:
    def route(path: str, file: Path) -> Route:
        return Route(path, lambda request: FileResponse(file, media_type="text/javascript",
                                                        headers={"Cache-Control": "max-age=3600"}))
    return [route(path, file) for path, file in SCRIPTS.items()]


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


def serve(args: argparse.Namespace, default_adapter: Path | None) -> int:
    """Load the models, open the page and serve until Ctrl-C (KeyboardInterrupt); 2 with one `error:` line if that cannot start.
    default_adapter: served when --adapter names none (if it is there and fits the model)."""
    warn_if_compile(args)
    try:
        check_port(args.host, args.port)  # before the minutes of loading, not after
        with ctrl_c_exits_now():  # leaves at once, even from a stalled download
            engine = load_engine(args.model, args.adapter, args.device, args.precision, args.speculative,
                                 default_adapter=default_adapter, concurrency=args.concurrency,
                                 queue_size=args.queue_size, background=False)
    except (CheckpointError, DeviceError, PortBusy) as e:  # CheckpointError includes AdapterError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if TUNED not in engine.models:
        print(f"note: {TUNED} mode is off: {engine.adapter_note}", file=sys.stderr)
    print(engine.capacity(), flush=True)
    if engine.cost is not None:
        print(f"Precision: {engine.cost.describe()}", flush=True)
    demo = build_app(engine)
    # Every reply waits in the scheduler's queue, not Gradio's (it orders the chat and the API together, and
    # shows each reply its place): Gradio lets every event through, up to the scheduler's own bounds.
    demo.queue(default_concurrency_limit=args.concurrency + args.queue_size, max_size=args.queue_size)
    access = access_for(args.host, args.share, args.api_key, args.open_api)
    print(describe(access, f"http://{args.host}:{args.port}", args.host, args.share), flush=True)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True,
                    theme=gr.themes.Soft(primary_hue="indigo", secondary_hue="pink"),
                    css_paths=[CSS], head=HEAD, footer_links=["api"],
                    max_file_size=MAX_FILE,  # only a conversation export is ever loaded: larger uploads get 413
                    state_session_capacity=args.sessions_kept,
                    auth=access.login(), auth_message="Log in with any user name and the server's API key.",
                    # The API's routes go first in the FastAPI app Gradio builds: /v1 and the root routes
                    # (/tokenize, /health, /metrics...) are ours, the rest Gradio's.
                    # Uploads are bounded per request, per client and in total (files.py).
                    app_kwargs={"routes": [*api_routes(engine, access), *script_routes()],
                                "middleware": [Middleware(UploadGuard)]},
                    prevent_thread_lock=True)  # the server runs in its own threads; this one computes
    except OSError as e:  # the port was taken while the models loaded
        print(f"error: {PortBusy(args.host, args.port, e)}", file=sys.stderr)
        return 2
    except ValueError as e:  # Gradio's check that its own page answers on localhost failed
        if "localhost is not accessible" not in str(e):
            raise
        print(f"error: the page at http://{args.host}:{args.port} did not answer Gradio's start-up check in "
              "time (a busy machine, or an http_proxy without no_proxy=localhost): start it again", file=sys.stderr)
        demo.close()
        return 2
    # Every forward pass, in the thread that loaded the models (Scheduler says why), until Ctrl-C raises
    # KeyboardInterrupt here: main turns it into one line and a prompt exit with 130.
    engine.scheduler.serve()

