"""MiniGPT: GPT-2 from scratch, loading the real Hub weights, with KV-cached streaming generation."""
from .config import PRESETS, GPTConfig
from .errors import CheckpointError
from .generation import TokenEvent, fit_to_context, generate
from .model import GPT, KVCache
from .sampling import SamplingParams
from .weights import load_pretrained

__all__ = ["GPT", "GPTConfig", "PRESETS", "KVCache", "CheckpointError", "SamplingParams", "TokenEvent",
           "fit_to_context", "generate", "load_pretrained"]
