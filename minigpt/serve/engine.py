"""What every session shares: the models, loaded once per process, and the scheduler every forward
pass goes through (minigpt/serve/scheduler.py). Nothing per request lives here."""
from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import tiktoken

from ..adapters import AdapterError
from ..inference import load_with_scale, speculative_drafts
from ..lora_scale import AdapterScale
from ..precision_cost import PrecisionCost, measure_cost
from ..request import Mode, ReplyRequest
from ..speed.decoder import Decoder
from .conversation import TUNED, ChatInputError, Prompt
from .replies import TOP_N, Reply, areplies_of, replies_of, reply_source
from .launch import how_to_set, on_space
from .scheduler import Scheduler, Ticket

DEFAULT_ROWS = 8  # --concurrency: rows decoded together (bench.serving: docs/serving.md)
DEFAULT_QUEUE = 256  # --queue-size: requests that may wait for a row; more are refused as busy
T = TypeVar("T")


@dataclass
class Engine:
    models: dict[Mode, Decoder]  # mode -> its decoder; the tuned model shares every tensor but the merged LoRA targets
    tokenizer: tiktoken.Encoding
    adapter_hint: str  # why there is no tuned mode ('' when there is), for anyone: no path of the server's disk
    drafts: dict[Mode, Decoder] = field(default_factory=dict)  # mode -> its int8 draft, with --speculative
    scheduler: Scheduler = field(default_factory=lambda: Scheduler(DEFAULT_ROWS, DEFAULT_QUEUE))
    lora: AdapterScale | None = None  # the tuned model at any LoRA scale (None without an adapter)
    adapter_note: str = ""  # adapter_hint for the server's log: the folder's full path and what is wrong with it
    cost: PrecisionCost | None = None  # the precision's cost against float32, measured at load

    @property
    def device(self) -> str:
        """'cpu float32', 'cpu int4 (C decode step)', 'cpu float32 + int8 draft': for the stats line."""
        base = self.models[Mode.BASE]
        kernel = f" ({base.kernel})" if base.step is not None else ""
        draft = " + int8 draft" if self.drafts else ""
        return f"{base.device.type} {base.precision}{kernel}{draft}"

    @property
    def n_positions(self) -> int:
        return self.models[Mode.BASE].config.n_positions

    def card(self) -> str:
        """The Model card: the model's shape, where and how it decodes, and what its precision costs."""
        config = self.models[Mode.BASE].config
        shape = (f"GPT-2, {config.n_layer} layers × {config.n_embd} wide, {config.n_head} heads, "
                 f"{config.n_positions}-token context")
        lines = [f"{shape} · {self.device}"]
        if self.cost is not None:
            lines.append(self.cost.describe())
        return "\n\n".join(lines)

    def capacity(self) -> str:
        """The start-up line: rows, the most their KV caches can take, and the queue."""
        config, weight = self.models[Mode.BASE].config, self.models[Mode.BASE].model.transformer.ln_f.weight
        row = 2 * config.n_layer * config.n_positions * config.n_embd * weight.element_size()  # keys and values
        rows, waiting = self.scheduler.max_rows, self.scheduler.max_waiting
        return (f"Serving {rows} replies at once in one batch (their KV caches take at most "
                f"{rows * row / 2**20:,.0f} MiB); up to {waiting} more wait in arrival order, beyond that "
                "requests are refused as busy.")

    def model(self, mode: Mode, scale: float = 1.0) -> Decoder:
        """The decoder of a mode; for tuned mode, with the adapter's update multiplied by scale."""
        if mode not in self.models:
            raise ChatInputError(f"{Mode(mode).value} mode is off: {self.adapter_hint}")
        if mode != TUNED or self.lora is None:
            return self.models[mode]
        try:
            return self.lora.decoder(scale)
        except ValueError as e:
            raise ChatInputError(f"{e}.") from None

    def model_for(self, request: ReplyRequest) -> Decoder:
        return self.model(request.mode, request.scale)

    def submit(self, request: ReplyRequest, prompt: Prompt, stop: threading.Event, top_n: int = TOP_N,
               forced: Sequence[int] = ()) -> Ticket:
        """Queue a reply with the scheduler (the one path by which the chat, Compare and the API generate);
        the request must have its seed (ReplyRequest.with_seed). ServerBusy when the queue is full."""
        make = partial(reply_source, self.model_for(request), self.tokenizer, prompt, request, top_n, forced,
                       self.drafts.get(request.mode))
        return self.scheduler.reply(make, stop)

    def replies(self, request: ReplyRequest, prompt: Prompt, stop: threading.Event, top_n: int = TOP_N,
                forced: Sequence[int] = ()) -> AsyncIterator[Reply]:
        """Queue a reply now (ServerBusy when the queue is full) and return its growing Reply: while it waits
        (Reply.ahead), after every token, and finished last. Awaited, so no thread waits; leaving early (or
        `stop`) ends its computation."""
        request = request.with_seed()
        return areplies_of(self.submit(request, prompt, stop, top_n, forced), request, prompt)

    def replies_blocking(self, request: ReplyRequest, prompt: Prompt, stop: threading.Event, top_n: int = TOP_N,
                         forced: Sequence[int] = ()) -> Iterator[Reply]:
        """replies(), iterated in a thread that blocks between tokens (scripts, tests)."""
        request = request.with_seed()
        return replies_of(self.submit(request, prompt, stop, top_n, forced), request, prompt)

    def compute(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args), a forward pass of a panel or of scoring, run by the scheduler in its turn; blocks."""
        return self.scheduler.run(partial(fn, *args))

    async def compute_async(self, fn: Callable[..., T], *args: Any, follow_up: bool = False) -> T:
        """compute(), awaited; follow_up: the pass belongs to a request already queued (Scheduler.submit)."""
        return await self.scheduler.run_async(partial(fn, *args), follow_up)


def load_engine(model: str, adapter: str | None, device: str | None, precision: str,
                speculative: bool = False, default_adapter: Path | None = None,
                concurrency: int = DEFAULT_ROWS, queue_size: int = DEFAULT_QUEUE, background: bool = True) -> Engine:
    """The base model, and the tuned one from `adapter` (an adapter that cannot be used is an error), or
    else from the `default_adapter` folder when it exists. The default is a convenience: when it is
    incomplete (a training run stopped before its first checkpoint) or made for another model, the base
    is served alone and adapter_hint says why. background=False: the caller runs engine.scheduler.serve()."""
    problems: list[AdapterError] = []
    use_default = adapter is None and default_adapter is not None and default_adapter.is_dir()
    base, lora, tokenizer = load_with_scale(model, default_adapter if use_default else adapter, device, precision,
                                            on_adapter_error=problems.append if use_default else None)
    models = {Mode.BASE: base} if lora is None else {Mode.BASE: base, Mode.TUNED: lora.tuned}
    drafts = dict(zip(models, speculative_drafts(*models.values()))) if speculative else {}
    hint, note = ("", "") if lora is not None else (adapter_hint(default_adapter, problems),
                                                    adapter_hint(default_adapter, problems, for_log=True))
    return Engine(models, tokenizer, hint, drafts, Scheduler(concurrency, queue_size, background=background), lora,
                  note, measure_cost(model, base, tokenizer))


def get_an_adapter() -> str:
    if on_space():
        return (f"Set {how_to_set('adapter', 'USER/ADAPTER')}, a Hub repo id of a PEFT GPT-2 LoRA adapter, or build "
                "the Space with one: `python -m minigpt.space --adapter FOLDER`.")
    return ("Train one with `python -m lora.train` or pass `--adapter` (a folder or a Hub repo id of a PEFT GPT-2 "
            "LoRA adapter).")


def adapter_hint(default_adapter: Path | None, problems: list[AdapterError], for_log: bool = False) -> str:
    """Why the tuned mode is off, and how to turn it on. Users of the page and the API see the default folder
    as checkpoints/alpaca-lora, and not the problem's details (they name files on the server's disk); the
    server's log (for_log) has both."""
    if default_adapter is None:
        return f"no adapter given. {get_an_adapter()}"
    folder = default_adapter if for_log else Path(default_adapter.parent.name, default_adapter.name)
    if problems:
        why = f"({problems[0]})" if for_log else \
            "(it is incomplete or made for another model; the server's log says why)"
        return f"the adapter in {folder} cannot be used {why}. {get_an_adapter()}"
    return f"no adapter in {folder}. {get_an_adapter()}"
