"""What every session shares: the models, loaded once per process, and the slots replies compute in.
Nothing per request lives here."""
from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import tiktoken

from ..adapters import AdapterError
from ..generation import prompt_logprobs
from ..inference import load_with_scale, speculative_drafts
from ..speed.decoder import Decoder
from ..lora_scale import AdapterScale
from .conversation import BASE, TUNED, ChatInputError, Prompt, Settings
from .replies import TOP_N, Reply, stream_reply

GET_AN_ADAPTER = ("Train one with `python -m lora.train` or pass `--adapter` (a folder or a Hub repo id of a PEFT "
                  "GPT-2 LoRA adapter).")


@dataclass
class Engine:
    models: dict[str, Decoder]  # mode -> its decoder; the tuned model shares every tensor but the merged LoRA targets
    tokenizer: tiktoken.Encoding
    adapter_hint: str  # why there is no tuned mode ('' when there is)
    drafts: dict[str, Decoder] = field(default_factory=dict)  # mode -> its int8 draft, with --speculative
    # --concurrency: replies computed at once, chat and API together; the rest wait for a slot
    slots: threading.Semaphore = field(default_factory=lambda: threading.BoundedSemaphore(2))
    scale: AdapterScale | None = None  # the tuned model at any LoRA scale (None without an adapter)

    @property
    def device(self) -> str:
        """'cpu float32', 'cpu int8 (C decode step)', 'cpu float32 + int8 draft': for the stats line."""
        base = self.models[BASE]
        weight = base.model.lm_head.weight
        kernel = f" ({base.kernel})" if base.step is not None else ""
        draft = " + int8 draft" if self.drafts else ""
        return f"{weight.device.type} {str(weight.dtype).removeprefix('torch.')}{kernel}{draft}"

    @property
    def n_positions(self) -> int:
        return self.models[BASE].config.n_positions

    def model(self, mode: str, scale: float = 1.0) -> Decoder:
        """The decoder of a mode; for tuned mode, with the adapter's update scaled by scale."""
        if mode not in self.models:
            raise ChatInputError(f"{mode} mode is off: {self.adapter_hint}")
        if mode != TUNED or self.scale is None:
            return self.models[mode]
        try:
            return self.scale.decoder(scale)
        except ValueError as e:
            raise ChatInputError(f"{e}.") from None

    @contextmanager
    def compute_slot(self, stop: threading.Event) -> Iterator[bool]:
        """Hold one of the compute slots: True once it is ours, False if `stop` was set while waiting."""
        while not self.slots.acquire(timeout=0.05):
            if stop.is_set():
                yield False
                return
        try:
            yield True
        finally:
            self.slots.release()

    def stream_reply(self, mode: str, prompt: Prompt, settings: Settings, stop: threading.Event,
                     top_n: int = TOP_N, scale: float = 1.0, forced: Sequence[int] = ()) -> Iterator[Reply]:
        """replies.stream_reply in `mode`'s model (and its draft), inside a compute slot: the one path by
        which the chat and the API generate. Stopped while waiting, it yields one empty "stopped" Reply."""
        with self.compute_slot(stop) as computing:
            if not computing:
                yield Reply(mode, list(prompt.ids), finish_reason="stopped")
                return
            yield from stream_reply(self.model(mode, scale), self.tokenizer, mode, prompt, settings, stop,
                                    self.drafts.get(mode), top_n, forced, scale)

    def score(self, mode: str, ids: Sequence[int], top_n: int, stop: threading.Event
              ) -> list[tuple[float, list[tuple[int, float]]]] | None:
        """generation.prompt_logprobs in `mode`'s model, inside a compute slot (None if stopped while waiting)."""
        with self.compute_slot(stop) as computing:
            return prompt_logprobs(self.model(mode), ids, top_n) if computing else None


def load_engine(model: str, adapter: str | None, device: str | None, precision: str,
                speculative: bool = False, default_adapter: Path | None = None,
                concurrency: int = 2) -> Engine:
    """The base model, and the tuned one from `adapter` (an adapter that cannot be used is an error), or
    else from the `default_adapter` folder when it exists. The default is a convenience: when it is
    incomplete (a training run stopped before its first checkpoint) or made for another model, the base
    is served alone and adapter_hint says why."""
    problems: list[AdapterError] = []
    use_default = adapter is None and default_adapter is not None and default_adapter.is_dir()
    base, scale, tokenizer = load_with_scale(model, default_adapter if use_default else adapter, device,
                                                   precision, on_adapter_error=problems.append if use_default else None)
    models = {BASE: base} if scale is None else {BASE: base, TUNED: scale.tuned}
    drafts = dict(zip(models, speculative_drafts(*models.values()))) if speculative else {}
    hint = "" if scale is not None else adapter_hint(default_adapter, problems)
    return Engine(models, tokenizer, hint, drafts, threading.BoundedSemaphore(concurrency), scale)


def adapter_hint(default_adapter: Path | None, problems: list[AdapterError]) -> str:
    """Why the tuned mode is off, and how to turn it on."""
    if default_adapter is None:
        return f"no adapter given. {GET_AN_ADAPTER}"
    if problems:
        return f"the adapter in {default_adapter} cannot be used ({problems[0]}). {GET_AN_ADAPTER}"
    return f"no adapter in {default_adapter}. {GET_AN_ADAPTER}"
