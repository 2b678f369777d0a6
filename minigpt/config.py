"""Model hyper-parameters: one dataclass, the four GPT-2 presets, and Hub config.json parsing."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# Sanity bounds: far above every GPT-2 (gpt2-xl: 1.6 billion parameters, 1024 positions), far below what
# would make building the model an out-of-memory crash instead of a message.
MAX_SIZES = {"vocab_size": 1_000_000, "n_positions": 65_536, "n_embd": 65_536, "n_layer": 1_024, "n_head": 1_024,
             "n_inner": 262_144}
MAX_PARAMETERS = 20_000_000_000  # 80 GB of float32 weights


@dataclass(frozen=True)
class GPTConfig:
    # Field names follow the Hub's config.json, so from_hf_config is a plain lookup.
    vocab_size: int = 50257  # 50,000 BPE merges + 256 byte tokens + <|endoftext|>
    n_positions: int = 1024  # context window: prompt + generated tokens never exceed it
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        for name, limit in MAX_SIZES.items():
            value = getattr(self, name)
            if value is None and name == "n_inner":
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
            if not 1 <= value <= limit:
                raise ValueError(f"{name} must be between 1 and {limit:,}, got {value:,}")
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < 1):
            raise ValueError(f"layer_norm_epsilon must be a number between 0 and 1, got {eps!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

        if (n := self.n_parameters) > MAX_PARAMETERS:
            raise ValueError(f"this config describes {n / 1e9:,.0f} billion parameters ({4 * n / 2**30:,.0f} GiB in "
                             f"float32); refusing anything over {MAX_PARAMETERS / 1e9:.0f} billion")

    @property
    def n_parameters(self) -> int:
        """Weights in the model (the tied lm_head counted once)."""
        d, mlp = self.n_embd, self.mlp_dim
        per_layer = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (2 * d * mlp + mlp + d)
        return (self.vocab_size + self.n_positions) * d + self.n_layer * per_layer + 2 * d

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_name(cls, name: str) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[name]

    @classmethod
    def from_hf_config(cls, hf: dict) -> "GPTConfig":
        """Build from a transformers GPT-2 config.json, refusing variants this model does not implement
        and sizes that are not whole, positive and sane (__post_init__)."""
        if not isinstance(hf, dict):
            raise ValueError(f"config.json must hold a JSON object, found {type(hf).__name__}")
        if hf.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"config.json describes a {hf['model_type']!r} model, not gpt2")
        unsupported = {
            "activation_function": ("gelu_new", hf.get("activation_function", "gelu_new")),
            "scale_attn_weights": (True, hf.get("scale_attn_weights", True)),
            "scale_attn_by_inverse_layer_idx": (False, hf.get("scale_attn_by_inverse_layer_idx", False)),
            "reorder_and_upcast_attn": (False, hf.get("reorder_and_upcast_attn", False)),
        }
        for key, (expected, found) in unsupported.items():
            if found != expected:
                raise ValueError(f"config.json sets {key}={found!r}; only {expected!r} is supported")
        fields = {name: hf[name] for name in cls.__dataclass_fields__ if name in hf}
        return replace(cls(), **fields)

    def to_hf_config(self) -> dict:
        """A transformers GPT-2 config.json for this model (the inverse of from_hf_config)."""
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new",
                **asdict(self), "n_ctx": self.n_positions, "bos_token_id": 50256, "eos_token_id": 50256}

    @classmethod
    def from_json_file(cls, path: str | Path) -> "GPTConfig":
        try:
            hf = json.loads(Path(path).read_text(encoding="utf-8"))
        except RecursionError:
            raise ValueError("config.json is nested too deeply to be a model config") from None
        return cls.from_hf_config(hf)


PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(),  # 124M
    "gpt2-medium": GPTConfig(n_embd=1024, n_layer=24, n_head=16),  # 350M
    "gpt2-large": GPTConfig(n_embd=1280, n_layer=36, n_head=20),  # 774M
    "gpt2-xl": GPTConfig(n_embd=1600, n_layer=48, n_head=25),  # 1558M
}
