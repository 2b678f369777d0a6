"""MiniGPT chat: GPT-2 written from scratch, and its Alpaca LoRA, streaming side by side with attention
and log-prob panels. Layout and wiring only: the logic is in minigpt/chat.py, replies.py and panels.py.

    python app.py --model gpt2 --adapter checkpoints/alpaca-lora --host 127.0.0.1 --port 7860
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported: no calls home

import gradio as gr  # noqa: E402
import tiktoken  # noqa: E402

from minigpt import GPT, CheckpointError  # noqa: E402
from minigpt.chat import (BASE, MAX_NEW_TOKENS, MAX_TEMPERATURE, MODES, TUNED, ChatInputError,  # noqa: E402
                          as_chat_text, build_prompt, context_note, message_text, read_settings, without_last_reply)
from minigpt.inference import PRECISIONS, load_for_inference, speculative_drafts  # noqa: E402
from minigpt.panels import (BAND_COLOURS, alternatives, attention_window, heatmap, position_caption,  # noqa: E402
                            token_highlights)
from minigpt.replies import Reply, stats_line, stream_reply  # noqa: E402

DEFAULT_ADAPTER = Path("checkpoints/alpaca-lora")
ASSETS = Path(__file__).parent / "assets"
EXAMPLES = ["Give three tips for staying healthy.", "What is the capital of France?",
            "Write a short poem about the sea.", "Explain what a neural network is in one sentence."]
ATTENTION_HINT = "The attention of the last reply is computed when this panel is open."


@dataclass
class Engine:
    """What every session shares: the weights, loaded once per process. Nothing per request lives here."""
    models: dict[str, GPT]  # mode -> model; the tuned one shares every tensor but the merged LoRA targets
    tokenizer: tiktoken.Encoding
    adapter_hint: str  # why there is no tuned mode ('' when there is)
    drafts: dict[str, GPT] = field(default_factory=dict)  # mode -> its int8 draft, with --speculative

    @property
    def device(self) -> str:
        base = self.models[BASE]
        weight = base.lm_head.weight
        kernel = " (C decode step)" if base.native_step is not None else ""
        draft = " + int8 draft" if self.drafts else ""
        return f"{weight.device.type} {str(weight.dtype).removeprefix('torch.')}{kernel}{draft}"

    def model(self, mode: str) -> GPT:
        if mode not in self.models:
            raise ChatInputError(f"{mode} mode is off: {self.adapter_hint}")
        return self.models[mode]


def load_engine(model: str, adapter: str | None, device: str | None, dtype: str, compile: bool = False,
                speculative: bool = False) -> Engine:
    if adapter is None and DEFAULT_ADAPTER.is_dir():
        adapter = str(DEFAULT_ADAPTER)
    base, tuned, tokenizer = load_for_inference(model, adapter, device, dtype, compile)
    models = {BASE: base} if tuned is None else {BASE: base, TUNED: tuned}
    drafts = dict(zip(models, speculative_drafts(*models.values()))) if speculative else {}
    hint = "" if tuned is not None else (f"no adapter in {DEFAULT_ADAPTER}. Train one with `python -m lora.train` or "
                                         "pass `--adapter` (a folder or a Hub repo id of a PEFT GPT-2 LoRA adapter).")
    return Engine(models, tokenizer, hint, drafts)


def build_app(engine: Engine) -> gr.Blocks:
    config = engine.models[BASE].config
    stops: dict[str, threading.Event] = {}  # session -> its Stop flag, present while a reply is pending
    attention_open: set[str] = set()  # sessions whose attention panel is open (it may open mid-reply)
    ready = f"Ready · {engine.device}"

    def locked():  # Send, Retry, Undo and Clear (and the message box) wait while a reply streams; Stop does not
        return [gr.Button(interactive=False)] * 4

    def unlock():
        return gr.Textbox(interactive=True), *[gr.Button(interactive=True)] * 4

    def prepare(history, mode, temperature, top_k, top_p, max_new_tokens, seed):
        """Everything a reply needs, validated; bad input becomes a message for the user."""
        try:
            model = engine.model(mode)
            settings, notices = read_settings(temperature, top_k, top_p, max_new_tokens, seed, config.n_positions)
            prompt = build_prompt(mode, history, engine.tokenizer, config.n_positions - settings.max_new_tokens)
        except ChatInputError as e:
            raise gr.Error(str(e), print_exception=False) from None
        return model, settings, notices, prompt

    def add_message(request: gr.Request, message, history, *controls):  # controls as in prepare()
        if not message.strip():
            raise gr.Error("Type a message first.", print_exception=False)
        history = [*history, {"role": "user", "content": as_chat_text(message)}]
        prepare(history, *controls)  # refuse now, while the message is still in the box
        stops[request.session_hash] = threading.Event()
        return gr.Textbox(value="", interactive=False), history, *locked()

    def retry(request: gr.Request, history, *controls):
        history = without_last_reply(history)
        prepare(history, *controls)
        stops[request.session_hash] = threading.Event()
        return gr.Textbox(interactive=False), history, *locked()

    def undo(history):
        """Take back the last exchange; the message returns to the box for editing."""
        history = without_last_reply(history)
        if not history:
            return gr.skip(), history
        return message_text(history[-1]), history[:-1]

    def stop(request: gr.Request):
        if event := stops.get(request.session_hash):
            event.set()

    def respond(history, mode, temperature, top_k, top_p, max_new_tokens, seed, layer, head, request: gr.Request):
        model, settings, notices, prompt = prepare(history, mode, temperature, top_k, top_p, max_new_tokens, seed)
        notes = [*notices, context_note(prompt, config.n_positions)]
        for note in filter(None, notes):
            gr.Warning(note)
        session = request.session_hash
        flag = stops.setdefault(session, threading.Event())
        history = [*history, {"role": "assistant", "content": ""}]
        try:
            for reply in stream_reply(model, engine.tokenizer, mode, prompt, settings, flag, engine.drafts.get(mode)):
                history[-1] = {"role": "assistant", "content": as_chat_text(reply.text.strip())}
                status = "\n\n".join(filter(None, [stats_line(reply, engine.device), *notes]))
                if reply.finish_reason is None:
                    yield history, status, *[gr.skip()] * 9
            wanted = session in attention_open and reply.token_ids
            window = attention_window(model, engine.tokenizer, reply) if wanted else None
            yield (history, status, prompt.text, *log_prob_panel(reply, len(reply.token_ids)),
                   *attention_panel(window, layer, head), reply, window)
        finally:
            if stops.get(session) is flag:
                del stops[session]

    def log_prob_panel(reply: Reply | None, position: int):
        if reply is None or not reply.token_ids:
            return [], gr.Slider(1, 2, value=1), "No reply yet.", None
        position = min(max(int(position), 1), len(reply.token_ids))  # a slider cannot span a single value
        return (token_highlights(reply, engine.tokenizer), gr.Slider(1, max(len(reply.token_ids), 2), value=position),
                position_caption(reply, engine.tokenizer, position), alternatives(reply, engine.tokenizer, position))

    def attention_panel(window, layer, head):
        if window is None:
            return None, ATTENTION_HINT
        return heatmap(window, layer, None if head < 0 else head), window.note

    def open_attention(request: gr.Request, reply, window, layer, head):
        attention_open.add(request.session_hash)
        if window is None and reply is not None and reply.token_ids:
            window = attention_window(engine.models[reply.mode], engine.tokenizer, reply)
        return window, *attention_panel(window, layer, head)

    def close_attention(request: gr.Request):
        attention_open.discard(request.session_hash)

    def pick_token(reply, event: gr.SelectData):
        return log_prob_panel(reply, event.index + 1)

    def clear():
        return [], ready, "", *log_prob_panel(None, 1), *attention_panel(None, 0, -1), None, None

    with gr.Blocks(title="MiniGPT chat", analytics_enabled=False) as demo:
        gr.Markdown("# MiniGPT chat\nGPT-2 written from scratch, with real OpenAI weights, and its Alpaca "
                    "LoRA. Replies stream token by token; open the panels below to look inside.")
        reply_state, window_state = gr.State(None), gr.State(None)
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
                stats = gr.Markdown(ready, elem_id="stats")
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

        reply_outputs = [chat, stats, prompt_view, tokens, position, caption, alts, plot, attention_note,
                         reply_state, window_state]
        reply_inputs = [chat, *controls, layer, head]

        def reply_chain(trigger, step, step_inputs, api_name=None):
            """step checks the input and locks the controls (no queue); then the reply streams; then unlock."""
            trigger(step, step_inputs, [msg, chat, *lockable], queue=False, api_visibility="private").success(
                respond, reply_inputs, reply_outputs, api_name=api_name,
                api_visibility="public" if api_name else "private").then(
                unlock, None, [msg, *lockable], queue=False, api_visibility="private")

        reply_chain(msg.submit, add_message, [msg, chat, *controls], api_name="chat")
        reply_chain(send.click, add_message, [msg, chat, *controls])
        reply_chain(retry_btn.click, retry, [chat, *controls])
        undo_btn.click(undo, chat, [msg, chat], queue=False, api_visibility="private")
        clear_btn.click(clear, None, [chat, stats, prompt_view, tokens, position, caption, alts, plot,
                                      attention_note, reply_state, window_state], queue=False,
                        api_visibility="private")
        stop_btn.click(stop, None, None, queue=False, api_name="stop")
        position.release(lambda reply, p: log_prob_panel(reply, p)[2:], [reply_state, position], [caption, alts],
                         api_name="alternatives")
        tokens.select(pick_token, reply_state, [tokens, position, caption, alts], api_visibility="private")
        attention_acc.expand(open_attention, [reply_state, window_state, layer, head],
                             [window_state, plot, attention_note], api_visibility="private")
        attention_acc.collapse(close_attention, None, None, queue=False, api_visibility="private")
        demo.unload(close_attention)
        for selector in (layer, head):
            selector.change(lambda w, la, h: attention_panel(w, la, h), [window_state, layer, head],
                            [plot, attention_note], api_visibility="private")
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    on_space = "SPACE_ID" in os.environ  # a Hugging Face Space serves from inside its container
    p = argparse.ArgumentParser(prog="python app.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2", help="gpt2[-medium|-large|-xl], a Hub repo id, or a local folder")
    p.add_argument("--adapter", default=None,
                   help=f"PEFT GPT-2 LoRA adapter: a folder or a Hub repo id (default: {DEFAULT_ADAPTER} if present)")
    p.add_argument("--host", default="0.0.0.0" if on_space else "127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a temporary public *.gradio.live link")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--dtype", default="float32", choices=list(PRECISIONS))
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: for int8 (1.07x after a warm-up of seconds); float32 loses")
    p.add_argument("--speculative", action="store_true",
                   help="an int8 copy proposes tokens, the model checks several per pass: same model, faster on CPU")
    p.add_argument("--concurrency", type=int, default=2, help="replies computed at the same time (the rest queue)")
    args = p.parse_args(argv)
    if args.concurrency < 1:
        p.error(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.speculative and args.dtype == "int8":
        p.error("--speculative checks an int8 draft with the float model: use it with a float --dtype")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        engine = load_engine(args.model, args.adapter, args.device, args.dtype, args.compile, args.speculative)
    except CheckpointError as e:  # includes lora.AdapterError
        print(f"error: {e}", file=sys.stderr)
        return 2
    demo = build_app(engine)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=64)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True,
                theme=gr.themes.Soft(primary_hue="indigo", secondary_hue="pink"),
                css_paths=[ASSETS / "app.css"], footer_links=["api"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
