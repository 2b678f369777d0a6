"""What each "look inside" view costs, in ms, for one 128-token reply on the GPT-2 124M shape (random weights).

    python -m bench.inspect_views               # 3 repetitions, medians
    python -m bench.inspect_views --reps 1      # a smoke test, not a measurement

The model loads as the app loads it (load_engine: float32 through oneDNN on CPU). A sampled reply of
128 tokens after a 32-token prompt is generated once; then each view is computed from scratch (its
cache cleared) through the app's own handler, figure rendering included. Gradio's encoding of the
figure for the browser is not counted. None of this runs while a reply streams.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

from minigpt.serve.conversation import BASE, Prompt, read_request
from minigpt.serve.engine import load_engine
from minigpt.serve.inspect_panels import InspectHandlers
from minigpt.serve.replies import stream_reply
from minigpt.serve.session import Session
from tests.helpers.checkpoints import make_checkpoint

PROMPT = ("The history of the city goes back to the Roman era, when a small settlement grew on the river banks "
          "and traders from the south brought wine, oil and new ideas about building, farming and law")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Glyph")  # token texts in scripts the default font lacks
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder, _ = make_checkpoint(Path(tmp) / "gpt2-random", n_embd=768, n_layer=12, n_head=12, n_positions=1024)
        engine = load_engine(str(folder), None, "cpu", "float32")
    inspect = InspectHandlers(engine)
    ids = engine.tokenizer.encode_ordinary(PROMPT)[:32]
    request = read_request(BASE, 0.7, 40, 0.95, 128, 1, 1.0, context=1024)[0]
    reply = list(stream_reply(engine.models[BASE], engine.tokenizer, Prompt(PROMPT, ids, 0, ()), request,
                              threading.Event()))[-1]
    print(f"reply: {len(reply.token_ids)} tokens after a {len(ids)}-token prompt, {reply.tokens_per_s:.1f} tokens/s; "
          f"{args.threads} threads", flush=True)

    def fresh() -> Session:
        session = Session()
        session.show(reply)
        session.position = 64
        return session

    history = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": reply.text}]
    sequence = torch.tensor([reply.prompt_ids + reply.token_ids])
    views = {
        "(scale: one forward pass over prompt + reply)": lambda s: engine.models[BASE](sequence, None, last_only=True),
        "token panel (highlights, caption, top-5)": lambda s: inspect.views(s, 0, -1),
        "sampling pipeline at one position": lambda s: inspect.sampling_view(s),
        "logit lens (13 layers x 159 positions) + grid": lambda s: inspect.lens_view(s),
        "logit lens, another token selected (cached)": lambda s: inspect.lens_view(s),
        "attention: heatmap window, entropy, similarity": lambda s: inspect.attention_view(s, 5, -1),
        "timeline": lambda s: inspect.timeline_view(s),
        "export JSON": lambda s: inspect.export(s, history),
    }
    for name, view in views.items():
        times = []
        for _ in range(args.reps):
            session = fresh()
            session.view = "none"
            if "cached" in name:
                inspect.lens_view(session)
                session.position = 65
            start = time.perf_counter()
            view(session)
            times.append((time.perf_counter() - start) * 1000)
        print(f"{name:50s} {statistics.median(times):8.1f} ms  (min {min(times):.1f}, max {max(times):.1f})",
              flush=True)


if __name__ == "__main__":
    main()
