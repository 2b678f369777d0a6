"""GPT-2 weights in the Hugging Face Hub layout: load from the Hub, its cache or a local folder; write a folder.

A snapshot holds config.json, model.safetensors, vocab.json and merges.txt. Only safetensors is read:
pickled `pytorch_model.bin` files are never loaded.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .atomic import atomic_write, save_tensors
from .config import GPTConfig
from .errors import CheckpointError, DamagedFileError, DeviceError
from .hub import fetch, in_hub_cache, redownload
from .model import GPT
from .tokenizer import load_tokenizer

TOKENIZER_FILES = ["vocab.json", "merges.txt"]
SNAPSHOT_FILES = ["config.json", "model.safetensors", *TOKENIZER_FILES]
HUB_ALIASES = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
# The Hub stores these four as Conv1D weights, (in, out); nn.Linear wants (out, in).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers some checkpoints carry; the model builds its mask itself.
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")
# Weight dtypes the model can use, by their safetensors names; any other (an integer, say) is refused.
WEIGHT_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
OTHER_DTYPES = {torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                torch.uint8: "U8", torch.bool: "BOOL"}


def resolve_snapshot(name_or_path: str | Path) -> Path:
    """A local folder as is; otherwise a Hub repo id (or gpt2 size alias) fetched into the Hub cache."""
    return fetch(HUB_ALIASES.get(str(name_or_path), name_or_path), SNAPSHOT_FILES, "model")


def read_config(snapshot: Path) -> GPTConfig:
    path = snapshot / "config.json"
    if not path.is_file():
        raise CheckpointError(f"missing config.json in {snapshot}")
    try:
        text = path.read_text(encoding="utf-8")
        hf = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedFileError(f"bad {path}: not valid JSON ({e})", path, f"not valid JSON: {e}") from None
    except RecursionError:
        raise CheckpointError(f"bad {path}: nested too deeply to be a model config") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    try:
        return GPTConfig.from_hf_config(hf)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"bad {path}: {e}") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        pickled = path.with_name("pytorch_model.bin").is_file()
        hint = " (only a pickled pytorch_model.bin is there; MiniGPT reads safetensors only)" if pickled else ""
        raise CheckpointError(f"missing {path.name} in {path.parent}{hint}")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise DamagedFileError(f"{path} is truncated or corrupt: {e}", path, str(e)) from None


def hub_to_minigpt(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename-free mapping: strip the optional `transformer.` prefix, drop mask buffers and the tied
    lm_head, transpose the Conv1D weights. Keys come out as in `GPT.state_dict()`."""
    state = {}
    for key, tensor in tensors.items():
        name = key.removeprefix("transformer.")
        if MASK_BUFFER.fullmatch(name) or name == "lm_head.weight":
            continue
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        state[f"transformer.{name}"] = tensor
    return state


def minigpt_to_hub(model: GPT) -> dict[str, torch.Tensor]:
    """The inverse of hub_to_minigpt: keys as in openai-community/gpt2 (no `transformer.` prefix, no
    lm_head, which is tied), Conv1D weights transposed back to (in, out)."""
    tensors = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        name = key.removeprefix("transformer.")
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        tensors[name] = tensor.detach().to("cpu", torch.float32).contiguous()
    return tensors


def save_pretrained(model: GPT, folder: str | Path, tokenizer_folder: str | Path) -> Path:
    """Write model as a Hub-layout snapshot (config.json, model.safetensors, and the tokenizer files
    copied from tokenizer_folder), loadable by load_pretrained and by transformers."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(minigpt_to_hub(model), folder / "model.safetensors", {"format": "pt"})
    with atomic_write(folder / "config.json") as tmp:
        tmp.write_text(json.dumps(model.config.to_hf_config(), indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if Path(tokenizer_folder).resolve() != folder.resolve():
            shutil.copyfile(Path(tokenizer_folder) / name, folder / name)
    return folder


def load_weights(model: GPT, tensors: dict[str, torch.Tensor]) -> None:
    """Copy Hub-layout tensors into model, strictly: every tensor present, expected and of the right shape."""
    state = hub_to_minigpt(tensors)
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing:
        raise CheckpointError(f"checkpoint is missing tensor {missing[0]}" + _and_more(missing))
    if unexpected:
        raise CheckpointError(f"checkpoint has unexpected tensor {unexpected[0]}" + _and_more(unexpected))
    for key, shape in expected.items():
        if state[key].dtype not in WEIGHT_DTYPES:
            name = OTHER_DTYPES.get(state[key].dtype, str(state[key].dtype))
            raise CheckpointError(f"tensor {key} is stored as {name}; weights must be floating point "
                                  f"({', '.join(WEIGHT_DTYPES.values())})")
        if state[key].shape != shape:
            raise CheckpointError(f"tensor {key} has shape {tuple(state[key].shape)}, "
                                  f"expected {tuple(shape)} for this config")
        if not torch.isfinite(state[key]).all():  # it would make every reply NaN, or the sampler fail
            raise CheckpointError(f"tensor {key} holds NaN or infinite values: the checkpoint is damaged")
    with torch.no_grad():
        for key, param in model.state_dict().items():
            if key != "lm_head.weight":
                param.copy_(state[key])


def _and_more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def load_pretrained(name_or_path: str | Path, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None):
    """Load a GPT-2 checkpoint and its tokenizer: (model in eval mode, tiktoken Encoding).

    name_or_path: gpt2 / gpt2-medium / gpt2-large / gpt2-xl, any Hub repo id in the GPT-2 layout,
    or a local folder holding the same four files.
    """
    snapshot = resolve_snapshot(name_or_path)
    try:
        config, tensors = read_config(snapshot), read_safetensors(snapshot / "model.safetensors")
    except DamagedFileError as e:
        if not in_hub_cache(snapshot):
            raise
        redownload(snapshot, Path(e.path).name, "model", CheckpointError, e.damage)  # then trust it once more
        config, tensors = read_config(snapshot), read_safetensors(snapshot / "model.safetensors")
    tokenizer = load_tokenizer(snapshot)
    device, dtype = resolve_device(device), dtype or torch.float32
    with torch.device("meta"):  # no memory is allocated (or randomly initialised) before the weights are read
        model = GPT(config, initialise=False)
    model.to_empty(device="cpu")
    model.lm_head.weight = model.transformer.wte.weight  # to_empty unties
    load_weights(model, tensors)
    model.to(device=device, dtype=dtype)
    return model.eval(), tokenizer


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The device a --device names, refused in one line (DeviceError) where this machine cannot use it;
    None picks the best available."""
    if name is None:
        return pick_device()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {str(name)!r}: use cuda, mps or cpu (or leave it out for the best "
                          "available)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise DeviceError(f"device {str(name)!r}: CUDA is not available here (this PyTorch is {build}, and "
                              "no usable NVIDIA GPU was found); use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(name)!r}: there are only {torch.cuda.device_count()} CUDA devices")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {str(name)!r}: Apple's MPS is not available here; use cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device {str(name)!r} is not supported: use cuda, mps or cpu")
    return device


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
