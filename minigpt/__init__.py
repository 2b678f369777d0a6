"""MiniGPT: GPT-2 from scratch, loading the real Hub weights, with KV-cached streaming generation."""
from .adapters import AdapterConfig, AdapterError, load_tuned_model
from .config import PRESETS, GPTConfig
from .errors import CheckpointError
from .generation import TokenEvent, fit_to_context, generate
from .inference import PRECISIONS, load_for_inference
from .model import GPT, KVCache
from .sampling import SamplingParams
from .speed.decoder import Decoder
from .weights import load_pretrained

__all__ = ["GPT", "GPTConfig", "PRESETS", "PRECISIONS", "KVCache", "CheckpointError", "AdapterConfig", "AdapterError",
           "Decoder", "SamplingParams", "TokenEvent", "fit_to_context", "generate", "load_for_inference",
           "load_pretrained", "load_tuned_model"]
