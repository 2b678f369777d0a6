"""Which int4 layout: quality of symmetric and asymmetric 4-bit groups of 32, 64 and 128 columns, vs float32.

    python -m bench.int4_groups [--file /usr/share/common-licenses/GPL-3] [--tokens 4096]

Rounds the weights of the random GPT-2 124M checkpoint (bench/llama_cpp.py's) in place ("fake
quantization": the float32 model with each weight replaced by what a layout stores), then scores the first
--tokens tokens of --file in windows of 1024 and prints, per layout, the KL divergence of the
next-token distributions from float32's (mean and 99th percentile, nats) and top-1 agreement. Layouts:
  sym7   q in -7..7, scale max|w| / 7
  sym8   q in -8..7, scale = the largest-magnitude weight / -8 (llama.cpp q4_0's; int4.py's)
  asym   u in 0..15, w = u * scale + min, scale (max - min) / 15, a float16 minimum per group too
Scales (and minimums) are float16; the lm_head (tied token embedding) int8 as quantize.py, or int4 in the
same layout ("head int4"). 4.5 bits a weight: sym G32, asym G64; 5 bits: asym G32.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench.llama_cpp import write_checkpoint
from minigpt.weights import load_pretrained


def fake_int4(w: torch.Tensor, group: int, layout: str) -> torch.Tensor:
    out_features, in_features = w.shape
    g = w.reshape(out_features, in_features // group, group)
    if layout == "sym7":
        s = (g.abs().amax(-1, keepdim=True) / 7).half().float()
        return (torch.round(g / s).clamp(-7, 7) * s).reshape(w.shape)
    if layout == "sym8":
        extreme = g.gather(-1, g.abs().argmax(-1, keepdim=True))
        s = (extreme / -8).half().float()
        s = torch.where(s == 0, torch.ones_like(s), s)
        return (torch.round(g / s).clamp(-8, 7) * s).reshape(w.shape)
    low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s, zero = ((high - low) / 15).half().float(), low.half().float()
    return (torch.round((g - zero) / s).clamp(0, 15) * s + zero).reshape(w.shape)


def fake_int8(w: torch.Tensor) -> torch.Tensor:
    s = (w.abs().amax(1, keepdim=True) / 127).bfloat16().float()  # quantize.py's per-row scale
    return torch.round(w / s).clamp(-127, 127) * s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file", type=Path, default=Path("/usr/share/common-licenses/GPL-3"))
    p.add_argument("--tokens", type=int, default=4096)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = load_pretrained(write_checkpoint(Path(tmp) / "gpt2-random"), device="cpu")
    ids = tokenizer.encode_ordinary(args.file.read_text(encoding="utf-8"))[:args.tokens]
    original = {name: t.detach().clone() for name, t in model.named_parameters()}

    @torch.inference_mode()
    def log_probs() -> torch.Tensor:
        return torch.cat([model(torch.tensor([ids[i:i + 1024]]))[0] for i in range(0, len(ids), 1024)]).log_softmax(-1)

    base = log_probs()

    def measure(label: str, group: int, layout: str, head_int4: bool) -> None:
        with torch.no_grad():
            for name, t in model.named_parameters():
                if t.dim() != 2 or "wpe" in name:
                    continue
                if "wte" in name:  # the tied lm_head
                    t.copy_(fake_int4(original[name], group, layout) if head_int4 else fake_int8(original[name]))
                else:
                    t.copy_(fake_int4(original[name], group, layout))
        logp = log_probs()
        kl = (base.exp() * (base - logp)).sum(-1)
        same = (base.argmax(-1) == logp.argmax(-1)).float().mean()
        print(f"{label:<24}{kl.mean():>12.6f}{kl.quantile(0.99):>12.6f}{100 * same:>11.2f}%", flush=True)

    print(f"{len(ids)} tokens of {args.file}\n{'layout':<24}{'KL mean':>12}{'KL 99%':>12}{'same top-1':>12}")
    for group in (32, 64, 128):
        for layout in ("sym7", "sym8", "asym"):
            measure(f"{layout} G{group}", group, layout, head_int4=False)
    for layout in ("sym8", "asym"):
        for group in (32, 64):
            measure(f"{layout} G{group} head int4", group, layout, head_int4=True)


if __name__ == "__main__":
    main()
