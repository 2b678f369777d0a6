"""What every session shares: the models, loaded once per process. Nothing per request lives here."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import tiktoken

from ..adapters import AdapterError
from ..inference import load_for_inference, speculative_drafts
from ..speed.decoder import Decoder
from .conversation import BASE, TUNED, ChatInputError

GET_AN_ADAPTER = ("Train one with `python -m lora.train` or pass `--adapter` (a folder or a Hub repo id of a PEFT "
                  "GPT-2 LoRA adapter).")


@dataclass
class Engine:
    models: dict[str, Decoder]  # mode -> its decoder; the tuned model shares every tensor but the merged LoRA targets
    tokenizer: tiktoken.Encoding
    adapter_hint: str  # why there is no tuned mode ('' when there is)
    drafts: dict[str, Decoder] = field(default_factory=dict)  # mode -> its int8 draft, with --speculative

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

    def model(self, mode: str) -> Decoder:
        if mode not in self.models:
            raise ChatInputError(f"{mode} mode is off: {self.adapter_hint}")
        return self.models[mode]


def load_engine(model: str, adapter: str | None, device: str | None, precision: str,
                speculative: bool = False, default_adapter: Path | None = None) -> Engine:
    """The base model, and the tuned one from `adapter` (an adapter that cannot be used is an error), or
    else from the `default_adapter` folder when it exists. The default is a convenience: when it is
    incomplete (a training run stopped before its first checkpoint) or made for another model, the base
    is served alone and adapter_hint says why."""
    problems: list[AdapterError] = []
    use_default = adapter is None and default_adapter is not None and default_adapter.is_dir()
    base, tuned, tokenizer = load_for_inference(model, default_adapter if use_default else adapter, device, precision,
                                                on_adapter_error=problems.append if use_default else None)
    models = {BASE: base} if tuned is None else {BASE: base, TUNED: tuned}
    drafts = dict(zip(models, speculative_drafts(*models.values()))) if speculative else {}
    return Engine(models, tokenizer, "" if tuned is not None else adapter_hint(default_adapter, problems), drafts)


def adapter_hint(default_adapter: Path | None, problems: list[AdapterError]) -> str:
    """Why the tuned mode is off, and how to turn it on."""
    if default_adapter is None:
        return f"no adapter given. {GET_AN_ADAPTER}"
    if problems:
        return f"the adapter in {default_adapter} cannot be used ({problems[0]}). {GET_AN_ADAPTER}"
    return f"no adapter in {default_adapter}. {GET_AN_ADAPTER}"
