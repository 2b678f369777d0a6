"""What each precision costs in quality, MiniGPT's and llama.cpp's, against their own float32, on one text.

    python -m bench.quality --llama-cpp ~/llama.cpp                 # GPT-2 124M shape, 4096 tokens
    python -m bench.quality --llama-cpp ~/llama.cpp --shape gpt2-xl --precisions int4 --types q4_0

The same random checkpoint for both engines (bench/llama_cpp.py writes it; --shape picks GPT-2's size),
and the first --tokens tokens of --file (default: the GPL-3 text Debian ships, a fixed English text).
MiniGPT: `python -m minigpt.perplexity --precision P --kl-base float32 --json` (windows of 1024 moved by
512: every token but the first scored). llama.cpp: its f32 GGUF writes the base logits
(`llama-perplexity --kl-divergence-base`, windows of -c 1024, each scoring its second half), then each
type is compared with them (`--kl-divergence`); q8_0 converts from the checkpoint, the other types
through `llama-quantize` from f32 (q4_0 and q4_K_M keep the tied embedding in q6_K, as llama-quantize
does). Reports mean KL divergence (nats), its 99th percentile, and the share of positions whose top-1
token is float32's. Quality does not depend on the machine's load. Writes bench/results/quality-<date>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from bench.decode import machine_info
from bench.llama_cpp import convert, write_checkpoint
from minigpt.tokenizer import load_tokenizer
from tests.helpers import REPO as ROOT

SHAPES = {"gpt2": {}, "gpt2-medium": {"n_embd": 1024, "n_layer": 24, "n_head": 16},
          "gpt2-xl": {"n_embd": 1600, "n_layer": 48, "n_head": 25}}
CONVERTED = ("f32", "f16", "bf16", "q8_0")  # what convert_hf_to_gguf.py writes itself


def gguf(llama_cpp: Path, folder: Path, outtype: str, tmp: Path) -> Path:
    """The checkpoint as a GGUF of outtype: converted, or quantized by llama-quantize from the f32 GGUF."""
    out = tmp / f"{outtype}.gguf"
    if outtype in CONVERTED:
        return convert(llama_cpp, folder, outtype, out)
    f32 = tmp / "f32.gguf"
    if not f32.exists():
        convert(llama_cpp, folder, "f32", f32)
    subprocess.run([str(llama_cpp / "build" / "bin" / "llama-quantize"), str(f32), str(out), outtype.upper()],
                   check=True, capture_output=True, text=True)
    return out


def llama_kl(llama_cpp: Path, model: Path, base: Path, text: Path, threads: int, write_base: bool) -> dict:
    """llama-perplexity's KL statistics of model against the base logits file (written first by the f32 run)."""
    cmd = [str(llama_cpp / "build" / "bin" / "llama-perplexity"), "-m", str(model), "-c", "1024", "-b", "1024",
           "-t", str(threads), "--no-repack", "--kl-divergence-base", str(base)]  # its AMX repack crashes on some CPUs
    cmd += ["-f", str(text)] if write_base else ["--kl-divergence"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"error: llama-perplexity failed ({' '.join(cmd[1:])}):\n{run.stderr[-2000:]}")
    if write_base:
        return {}
    log = run.stdout + run.stderr

    def number(pattern: str) -> float:
        return float(re.search(pattern, log).group(1))

    return {"kl_mean": number(r"Mean\s+KLD:\s+([-\d.]+)"), "kl_p99": number(r"99\.0%\s+KLD:\s+([-\d.]+)"),
            "kl_max": number(r"Maximum KLD:\s+([-\d.]+)"),
            "top1_agreement": number(r"Same top p:\s+([\d.]+)") / 100,
            "file_mb": model.stat().st_size / 2**20}


def minigpt_kl(folder: Path, precision: str, text: Path, threads: int) -> dict:
    cmd = [sys.executable, "-m", "minigpt.perplexity", "--model", str(folder), "--file", str(text), "--device", "cpu",
           "--precision", precision, "--kl-base", "float32", "--max-length", "1024", "--stride", "512", "--json"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if run.returncode:
        raise SystemExit(f"error: {' '.join(cmd[2:])} failed:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-cpp", type=Path, required=True, help="a built llama.cpp checkout (llama-perplexity, "
                   "llama-quantize)")
    p.add_argument("--file", type=Path, default=Path("/usr/share/common-licenses/GPL-3"))
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--shape", choices=SHAPES, default="gpt2")
    p.add_argument("--precisions", default="bfloat16,int8,int4", help="MiniGPT's, compared with its float32")
    p.add_argument("--types", default="q8_0,q4_0,q4_K_M", help="llama.cpp's, compared with its f32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    llama_cpp = args.llama_cpp.expanduser().resolve()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = write_checkpoint(tmp / "checkpoint", **SHAPES[args.shape])
        encoding = load_tokenizer(folder)
        ids = encoding.encode_ordinary(args.file.read_text(encoding="utf-8"))[:args.tokens]
        text = tmp / "text.txt"
        text.write_text(encoding.decode(ids), encoding="utf-8")
        print(f"{args.shape}: {len(ids)} tokens of {args.file}", flush=True)
        for precision in filter(None, args.precisions.split(",")):
            rows[f"MiniGPT {precision}"] = minigpt_kl(folder, precision, text, args.threads)
            print(f"  MiniGPT {precision}: {rows[f'MiniGPT {precision}']}", flush=True)
        base = tmp / "f32.kld"
        llama_kl(llama_cpp, gguf(llama_cpp, folder, "f32", tmp), base, text, args.threads, write_base=True)
        for outtype in filter(None, args.types.split(",")):
            rows[f"llama.cpp {outtype}"] = llama_kl(llama_cpp, gguf(llama_cpp, folder, outtype, tmp), base, text,
                                                    args.threads, write_base=False)
            print(f"  llama.cpp {outtype}: {rows[f'llama.cpp {outtype}']}", flush=True)
    print(f"\n{'engine':<22}{'KL mean (nats)':>16}{'KL 99%':>12}{'same top-1':>12}")
    for name, row in rows.items():
        print(f"{name:<22}{row['kl_mean']:>16.6f}{row['kl_p99']:>12.6f}{100 * row['top1_agreement']:>11.2f}%")
    stamp = datetime.now(timezone.utc)
    out = args.out or ROOT / "bench" / "results" / f"quality-{stamp:%Y%m%d-%H%M}-{args.shape}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": stamp.isoformat(timespec="seconds"), "command": " ".join(["python", *sys.argv]),
                               "machine": machine_info(), "shape": args.shape, "text": str(args.file),
                               "tokens": len(ids), "rows": rows}, indent=2))
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
