"""What every session shares: the models, loaded once per process. Nothing per request lives here."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import tiktoken

from ..inference import load_with_strength, speculative_drafts
from ..speed.decoder import Decoder
from ..strength import AdapterStrength
from .conversation import BASE, TUNED, ChatInputError

DEFAULT_ADAPTER = Path("checkpoints/alpaca-lora")


@dataclass
class Engine:
    models: dict[str, Decoder]  # mode -> its decoder; the tuned model shares every tensor but the merged LoRA targets
    tokenizer: tiktoken.Encoding
    adapter_hint: str  # why there is no tuned mode ('' when there is)
    drafts: dict[str, Decoder] = field(default_factory=dict)  # mode -> its int8 draft, with --speculative
    strength: AdapterStrength | None = None  # the tuned model at any LoRA strength (None without an adapter)

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

    def model(self, mode: str, strength: float = 1.0) -> Decoder:
        """The decoder of a mode; for tuned mode, with the adapter's update scaled by strength."""
        if mode not in self.models:
            raise ChatInputError(f"{mode} mode is off: {self.adapter_hint}")
        if mode != TUNED or self.strength is None:
            return self.models[mode]
        try:
            return self.strength.decoder(strength)
        except ValueError as e:
            raise ChatInputError(f"{e}.") from None


def load_engine(model: str, adapter: str | None, device: str | None, precision: str,
                speculative: bool = False) -> Engine:
    """The base model, and the tuned one when an adapter is given (or found in DEFAULT_ADAPTER)."""
    if adapter is None and DEFAULT_ADAPTER.is_dir():
        adapter = str(DEFAULT_ADAPTER)
    base, strength, tokenizer = load_with_strength(model, adapter, device, precision)
    models = {BASE: base} if strength is None else {BASE: base, TUNED: strength.tuned}
    drafts = dict(zip(models, speculative_drafts(*models.values()))) if speculative else {}
    hint = "" if strength is not None else (f"no adapter in {DEFAULT_ADAPTER}. Train one with `python -m lora.train` or "
                                         "pass `--adapter` (a folder or a Hub repo id of a PEFT GPT-2 LoRA adapter).")
    return Engine(models, tokenizer, hint, drafts, strength)
