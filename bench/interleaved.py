"""Decode tok/s of MiniGPT and llama.cpp taking turns, for a machine other jobs keep busy.

    python -m bench.interleaved --llama-cpp DIR --rounds 5 --threads 1
    python -m bench.interleaved --llama-cpp DIR --precisions int4,int8 --no-avx2

python -m bench.decode and python -m bench.llama_cpp each run for minutes; when other work on the machine comes
and goes, their figures are measured under different loads. Here each round decodes --new-tokens
greedy tokens, for each of --precisions, with MiniGPT (the C step, variant as chosen or MINIGPT_ISA),
MiniGPT with MINIGPT_ISA=avx2 (x86 with AVX2 only; not with --no-avx2), and llama.cpp's GGUF type of the
same size (llama-bench -p 0: decode only): int4 vs q4_0 (made by llama-quantize), int8 vs q8_0, float32
vs f32, one after the other, so every engine sees the same conditions; medians over the rounds.
MiniGPT's figure is generate()'s: each token also gets its log-prob, top 5 and text. llama-bench only
decodes (a token fed back, its logits never read); --step-loop adds MiniGPT's engines timed the same way:
the model called on one token after the cache, greedy's token fed back, nothing else. Same
random GPT-2 124M checkpoint for all (bench/llama_cpp.py writes and converts it). DIR as in python -m
bench.llama_cpp. The machine's memory read rate (bench.decode's) is measured before each round and after the
last; each engine's bytes a token (MiniGPT: every weight once; llama.cpp: its model's size) times its tok/s,
against the mean of the reads around its round, says how close it decodes to the memory limit: an engine at
the limit follows the host's memory rate wherever it moves. Prints a table and writes
bench/results/interleaved-<date>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

from bench.decode import machine_info, read_bandwidth, shares_of_reads
from bench.llama_cpp import write_checkpoint
from bench.quality import gguf
from tests.helpers import REPO as ROOT

GGUF_TYPE = {"int4": "q4_0", "int8": "q8_0", "float32": "f32"}  # llama.cpp's type of (about) the same size
MINIGPT = r"""
import sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
from bench.decode import bytes_read_per_token
from minigpt.generation import generate
from minigpt.inference import load_for_inference
from minigpt.sampling import SamplingParams
model, _, tok = load_for_inference(sys.argv[1], device="cpu", precision=sys.argv[2])
prompt = list(range(100, 132))
for n in (8, int(sys.argv[4])):  # warm-up, then the measured run
    times = [time.perf_counter() for _ in generate(model, tok, prompt, n, SamplingParams(temperature=0))]
rate = (len(times) - 1) / (times[-1] - times[0])
print(rate, getattr(model.step, "isa", "PyTorch"), bytes_read_per_token(model.model))
"""
STEP_LOOP = r"""
import sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
from bench.decode import bytes_read_per_token
from minigpt.inference import load_for_inference
from minigpt.speed.logits import first_max
model, _, tok = load_for_inference(sys.argv[1], device="cpu", precision=sys.argv[2])
with torch.inference_mode():
    for n in (8, int(sys.argv[4])):  # warm-up, then the measured run
        cache = model.new_cache(32 + n)
        logits = model(torch.arange(100, 132)[None], cache, last_only=True)[0, -1]
        ids = torch.empty(1, 1, dtype=torch.long)
        started = time.perf_counter()
        for _ in range(n - 1):
            logits = model(ids.fill_(int(first_max(logits))), cache, last_only=True)[0, -1]
        elapsed = time.perf_counter() - started
print((n - 1) / elapsed, getattr(model.step, "isa", "PyTorch"), bytes_read_per_token(model.model))
"""


def minigpt(folder: Path, precision: str, threads: int, tokens: int, isa: str | None = None,
            script: str = MINIGPT) -> tuple[float, str, int]:
    """(decode tok/s, the C step's variant, bytes read a token)."""
    env = os.environ.copy()
    env.pop("MINIGPT_ISA", None)
    if isa:
        env["MINIGPT_ISA"] = isa
    out = subprocess.run([sys.executable, "-c", script, str(folder), precision, str(threads), str(tokens)],
                         cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout.split()
    return float(out[0]), out[1], int(out[2])


def llama(llama_cpp: Path, model: Path, threads: int, tokens: int) -> tuple[float, str, int]:
    """(decode tok/s, '', the model's size) as minigpt() returns them: GPT-2's output matrix is its token
    embedding, so a token reads about the whole model."""
    cmd = [str(llama_cpp / "build" / "bin" / "llama-bench"), "-m", str(model), "-t", str(threads), "-p", "0",
           "-n", str(tokens), "-r", "1", "-o", "json"]
    result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)[0]
    return result["avg_ts"], "", result["model_size"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-cpp", type=Path, required=True, help="a built llama.cpp checkout")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--precisions", default="int4,int8,float32", help=f"MiniGPT's, of {','.join(GGUF_TYPE)}")
    p.add_argument("--no-avx2", action="store_true", help="leave out MiniGPT's avx2 variant")
    p.add_argument("--step-loop", action="store_true",
                   help="also time MiniGPT's decoding alone, as llama-bench times llama.cpp's")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    llama_cpp = args.llama_cpp.expanduser().resolve()
    info = machine_info()
    print(f"{info['cpu']}, {info['cores']} cores, {','.join(info['simd'])}; {args.threads} threads; "
          f"load average {os.getloadavg()[0]:.2f}")
    runs: dict[str, list[float]] = {}
    labels: dict[str, str] = {}
    bytes_per_token: dict[str, int] = {}
    loads = [os.getloadavg()]
    reads = [read_bandwidth(args.threads)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_checkpoint(Path(tmp) / "gpt2-random")
        engines = {}
        for precision in args.precisions.split(","):
            model = gguf(llama_cpp, folder, GGUF_TYPE[precision], Path(tmp))
            engines[f"minigpt {precision}"] = partial(minigpt, folder, precision, args.threads, args.new_tokens)
            if not args.no_avx2:
                engines[f"minigpt {precision} (MINIGPT_ISA=avx2)"] = partial(minigpt, folder, precision, args.threads,
                                                                             args.new_tokens, "avx2")
            if args.step_loop:
                engines[f"minigpt {precision}, step loop"] = partial(minigpt, folder, precision, args.threads,
                                                                     args.new_tokens, script=STEP_LOOP)
            engines[f"llama.cpp {GGUF_TYPE[precision]}"] = partial(llama, llama_cpp, model, args.threads,
                                                                  args.new_tokens)
        for r in range(args.rounds):
            for name, run in engines.items():
                tok_s, labels[name], bytes_per_token[name] = run()
                runs.setdefault(name, []).append(tok_s)
            loads.append(os.getloadavg())
            reads.append(read_bandwidth(args.threads))
            print(f"  round {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in runs.items()), flush=True)
    print(f"\n{'engine':<34}{'decode tok/s (median)':>22}{'min':>8}{'max':>8}{'MB a token':>11}"
          f"{'of the reads (min-max)':>25}")
    shares = {}
    for name, values in runs.items():
        shares[name] = shares_of_reads(values, bytes_per_token[name], reads)
        low, middle, high = min(shares[name]), statistics.median(shares[name]), max(shares[name])
        share = f"{100 * middle:.0f}% ({100 * low:.0f}-{100 * high:.0f})"
        print(f"{name:<34}{statistics.median(values):>22.1f}{min(values):>8.1f}{max(values):>8.1f}"
              f"{bytes_per_token[name] / 1e6:>11.1f}{share:>25}" + (f"  [{labels[name]}]" if labels[name] else ""))
    print(f"load average per round: {' '.join(f'{a[0]:.1f}' for a in loads)}")
    print(f"memory reads per round, GB/s: {' '.join(f'{r:.1f}' for r in reads)}")
    stamp = datetime.now(timezone.utc)
    out = args.out or ROOT / "bench" / "results" / f"interleaved-{stamp:%Y%m%d-%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": stamp.isoformat(timespec="seconds"), "command": " ".join(["python", *sys.argv]),
                               "machine": info, "load_averages": loads, "threads": args.threads,
                               "new_tokens": args.new_tokens, "runs": runs, "c_step_variant": labels,
                               "bytes_per_token": bytes_per_token, "read_gb_s": reads,
                               "share_of_reads": shares}, indent=2))
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
