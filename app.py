"""MiniGPT chat: GPT-2 written from scratch, and its Alpaca LoRA, streaming side by side with attention
and log-prob panels. Arguments, layout and wiring only: the handlers are in minigpt/serve/handlers.py.

    python app.py --model gpt2 --adapter checkpoints/alpaca-lora --host 127.0.0.1 --port 7860
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported: no calls home

import gradio as gr  # noqa: E402

from minigpt import CheckpointError  # noqa: E402
from minigpt.cli import add_precision_arguments, warn_if_compile  # noqa: E402
from minigpt.serve.conversation import (  # noqa: E402
    BASE,
    MAX_NEW_TOKENS,
    MAX_TEMPERATURE,
    MODES,
    TUNED,
)
from minigpt.serve.compare import DIFF_HINT, CompareHandlers, CompareSession  # noqa: E402
from minigpt.serve.engine import DEFAULT_ADAPTER, Engine, load_engine  # noqa: E402
from minigpt.serve.handlers import ATTENTION_HINT, ChatHandlers, unlock  # noqa: E402
from minigpt.serve.panels import BAND_COLOURS  # noqa: E402
from minigpt.serve.score import ScoreHandlers  # noqa: E402
from minigpt.serve.session import Session  # noqa: E402
from minigpt.strength import MAX_STRENGTH  # noqa: E402

ASSETS = Path(__file__).parent / "assets"
EXAMPLES = ["Give three tips for staying healthy.", "What is the capital of France?",
            "Write a short poem about the sea.", "Explain what a neural network is in one sentence."]


def build_app(engine: Engine) -> gr.Blocks:
    """The page: one tab per view, each laid out by its own function below."""
    with gr.Blocks(title="MiniGPT chat", analytics_enabled=False) as demo:
        gr.Markdown("# MiniGPT chat\nGPT-2 written from scratch, with real OpenAI weights, and its Alpaca "
                    "LoRA. Replies stream token by token; open the panels below to look inside.")
        with gr.Tab("Chat", id="chat-tab"):
            chat_tab(engine)
        with gr.Tab("Compare", id="compare-tab"):
            compare_tab(engine)
        with gr.Tab("Score", id="score-tab"):
            score_tab(engine)
    return demo


def strength_slider(engine: Engine, elem_id: str) -> gr.Slider:
    return gr.Slider(0, MAX_STRENGTH, value=1, step=0.05, label="LoRA strength", elem_id=elem_id,
                     interactive=TUNED in engine.models,
                     info="scales the adapter's update: 0 = base, 1 = as trained, 2 = doubled")


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
                strength = strength_slider(engine, "strength")
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

    def reply_chain(trigger, step, step_inputs, api_name=None):
        """step checks the input and locks the controls (no queue); then the reply streams; then unlock."""
        trigger(step, [session, *step_inputs, strength], [msg, chat, *lockable], queue=False,
                api_visibility="private").success(
            handlers.respond, [session, chat, *controls, layer, head, strength], [chat, stats, *panels],
            api_name=api_name,
            api_visibility="public" if api_name else "private").then(
            unlock, None, [msg, *lockable], queue=False, api_visibility="private")

    reply_chain(msg.submit, handlers.add_message, [msg, chat, *controls], api_name="chat")
    reply_chain(send.click, handlers.add_message, [msg, chat, *controls])
    reply_chain(retry_btn.click, handlers.retry, [chat, *controls])
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
            strength = strength_slider(engine, "cmp_strength")
    note = gr.Markdown(elem_id="cmp_note")
    outputs = {}
    with gr.Row(equal_height=False):
        for mode, key in ((BASE, "base"), (TUNED, "tuned")):
            with gr.Column():
                text = gr.Textbox(label=mode, elem_id=f"cmp_{key}", lines=10, max_lines=24, interactive=False)
                stats = gr.Markdown(elem_id=f"cmp_{key}_stats")
                stop = gr.Button(f"Stop {mode}", elem_id=f"cmp_{key}_stop", variant="stop", size="sm")
            outputs[mode] = (text, stats, stop)
    with gr.Accordion("Token diff", open=True, elem_id="diff_panel"):
        with gr.Row():
            which = gr.Radio(list(MODES), value=TUNED, label="Reply to re-score", elem_id="diff_which", scale=3)
            diff_btn = gr.Button("Compare tokens", elem_id="diff_btn", scale=1)
        summary = gr.Markdown(DIFF_HINT, elem_id="diff_summary")
        tokens = gr.HighlightedText(elem_id="diff_tokens", show_legend=True, show_inline_category=False,
                                    label="log p tuned − log p base: red = the adapter made the token likelier, "
                                          "purple = less likely (±1 = ±4 nats)")
        ranked = gr.Dataframe(elem_id="diff_ranked", label="Where the adapter changed its mind (top-1 differs), "
                              "largest KL(tuned ‖ base) first", interactive=False, wrap=True)
        with gr.Accordion("Every token", open=False):
            per_token = gr.Dataframe(elem_id="diff_table", interactive=False)

    controls = [temperature, top_k, top_p, max_new_tokens, seed, strength]
    for trigger in (send.click, message.submit):  # the two sides stream as two queued events, each Stop-able
        started = trigger(handlers.start, [session, message, *controls],
                          [send, note, *outputs[BASE][:2], *outputs[TUNED][:2]], queue=False,
                          api_visibility="private")
        for mode, respond in ((BASE, handlers.respond_base), (TUNED, handlers.respond_tuned)):
            started.success(respond, session, outputs[mode][:2], api_visibility="private").then(
                handlers.unlock, session, send, queue=False, api_visibility="private")
    for mode, stop in ((BASE, handlers.stop_base), (TUNED, handlers.stop_tuned)):
        outputs[mode][2].click(stop, session, None, queue=False, api_visibility="private")
    diff_btn.click(handlers.diff, [session, which], [summary, tokens, ranked, per_token], api_visibility="private")


def score_tab(engine: Engine) -> None:
    """Paste a text: every token coloured by its surprisal under each model, and their perplexities."""
    handlers = ScoreHandlers(engine)
    text = gr.Textbox(elem_id="score_text", label="Text to score", lines=6, max_lines=20,
                      placeholder="Paste any text: each model's perplexity, and how surprised it is by each token.")
    with gr.Row():
        strength = strength_slider(engine, "score_strength")
        score = gr.Button("Score", elem_id="score_btn", variant="primary")
    summary = gr.Markdown(elem_id="score_summary")
    label = "surprisal (−log p): white = expected, red = surprising"
    base = gr.HighlightedText(elem_id="score_base", label=f"{BASE}, {label}", show_legend=False,
                              show_inline_category=False)
    tuned = gr.HighlightedText(elem_id="score_tuned", label=f"{TUNED}, {label}", show_legend=False,
                               show_inline_category=False)
    score.click(handlers.score, [text, strength], [summary, base, tuned], api_visibility="private")


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
    add_precision_arguments(p)
    p.add_argument("--speculative", action="store_true",
                   help="an int8 copy proposes tokens, the model checks several per pass: same model, faster on CPU")
    p.add_argument("--concurrency", type=int, default=2, help="replies computed at the same time (the rest queue)")
    args = p.parse_args(argv)
    if args.concurrency < 1:
        p.error(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.speculative and args.precision == "int8":
        p.error("--speculative checks an int8 draft with the float model: use it with a float --precision")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warn_if_compile(args)
    try:
        engine = load_engine(args.model, args.adapter, args.device, args.precision, args.speculative)
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
