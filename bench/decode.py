"""Decode and prefill speed of MiniGPT vs transformers' GPT2LMHeadModel.generate, same weights, same run.

    python -m bench.decode                      # GPT-2 124M shape, random weights, 5 reps each
    python -m bench.decode --model gpt2         # the real weights, if they are in the Hugging Face cache
    python -m bench.decode --quick              # 1 rep and short runs: a smoke test, not a measurement
    python -m bench.decode --shape gpt2-xl --engines minigpt --no-quality   # a bigger shape, random weights
    MINIGPT_ISA=avx2 python -m bench.decode     # the C step's AVX2 variant on an AVX-512 machine

MiniGPT loads as the CLI and the app do (minigpt.inference.load_for_inference): int8 decodes through
the C step (minigpt/speed/native.py) where it builds; the `minigpt+pytorch` int8 row is the same model on
PyTorch's int8 kernel, for comparison. MiniGPT float32 and bfloat16 also run with speculative
decoding (`minigpt+draft` rows: an int8 copy of the same weights proposes tokens, the model checks
them), each in its own process.

For each engine and precision it reports decode tokens/s and time to first token (32-token prompt,
128 new greedy tokens), prefill tokens/s (512-token prompt / its time to first token), peak RSS,
and MiniGPT/transformers ratios, all medians over the repetitions. Every (engine, precision) pair runs in
its own process, so peak memory is its own; between its reps this process measures the machine's memory
read rate, and each MiniGPT row is printed as a share of what those reads allow for its weight bytes a
token. Then the quality cost of each reduced precision, through the path decoding takes: max logit
deviation and greedy-token agreement vs MiniGPT float32 over a fixed prompt set. Results go to
bench/results/decode-<date>.json. Speed does not depend on weight values, so random weights are
fine for speed; quality on random weights is only a sanity check. The quality prompt set is large
enough (24 prompts x 128 tokens = 3072 positions by default) that 1% is 30 disagreements.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from minigpt import load_pretrained
from minigpt.generation import DRAFT_TOKENS, generate
from minigpt.inference import load_for_inference, speculative_drafts
from minigpt.sampling import SamplingParams
from minigpt.speed.decoder import Decoder
from minigpt.speed.hugepages import move_to_huge_pages
from minigpt.speed.onednn import OneDNNLinear
from minigpt.weights import resolve_snapshot
from tests.helpers import REPO as ROOT
from tests.helpers.checkpoints import make_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PRECISIONS = {"minigpt": ["float32", "bfloat16", "int8", "int4"], "transformers": ["float32", "bfloat16"]}
READ_NOW = "measure memory reads now"  # a worker's line to run_in_subprocess
QUALITY_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    ",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "The theory of relativity states that",
    "1, 2, 3, 5, 8, 13,",
    "In 2024 the stock market",
    "She opened the door and saw",
    "The recipe calls for two cups of flour,",
    "import numpy as np\nimport torch\n\n",
    "Dear Sir or Madam, I am writing to",
    "The best way to learn a new language is",
    "Q: What is the boiling point of water?\nA:",
    "The history of the Roman Empire begins",
    "<html>\n<head>\n<title>",
    "My favourite movie is",
    "Scientists have discovered a new species of",
    "The quarterly report shows that revenue",
    "To install the package, run",
    "It was the best of times, it was the worst of times,",
    "The patient was admitted to the hospital with",
    "In the beginning God created",
    "SELECT name, age FROM users WHERE",
    "The weather today is",
]
# Random-weight checkpoints of the GPT-2 family's shapes (--shape).
SHAPES = {"gpt2": dict(n_embd=768, n_layer=12, n_head=12), "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
          "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20), "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25)}


# ---- one engine, one precision (runs in a worker process) -----------------------------------------

def load_minigpt(folder: Path, precision: str, draft_tokens: int = 0, c_step: bool = True):
    """(model, tokenizer, draft, draft_tokens) as the CLI loads them; with draft_tokens, an int8 draft for
    speculative decoding (else the draft is None); c_step=False keeps int8 on PyTorch's kernel."""
    model, _, tokenizer = load_for_inference(folder, device="cpu", precision=precision)
    if not c_step:
        model = Decoder(model.model)  # PyTorch for every step
    return model, tokenizer, (speculative_drafts(model)[0] if draft_tokens else None), draft_tokens


def minigpt_timestamps(loaded, prompt: list[int], new_tokens: int) -> tuple[list[float], list[int]]:
    """Time of the call, then of each token as generate() yields it; and the tokens."""
    model, tokenizer, draft, draft_tokens = loaded
    times, tokens = [time.perf_counter()], []
    for event in generate(model, tokenizer, prompt, new_tokens, SamplingParams(temperature=0), draft=draft,
                          draft_tokens=draft_tokens):
        times.append(time.perf_counter())
        tokens.append(event.token_id)
    return times, tokens


def load_transformers(folder: Path, precision: str, draft_tokens: int = 0, c_step: bool = True):
    """transformers' model; the other options are MiniGPT's, accepted for a uniform signature."""
    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained(folder, dtype=DTYPES[precision]).eval()
    model.generation_config.eos_token_id = None  # always produce every requested token
    return model


def transformers_timestamps(model, prompt: list[int], new_tokens: int) -> tuple[list[float], list[int]]:
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):  # called once with the prompt, then once per new token
            self.times.append(time.perf_counter())

        def end(self):
            pass

    clock, start = Clock(), time.perf_counter()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                             streamer=clock, pad_token_id=0)
    return [start] + clock.times[1:], out[0, len(prompt):].tolist()


ENGINES = {"minigpt": (load_minigpt, minigpt_timestamps),
           "transformers": (load_transformers, transformers_timestamps)}


def run_worker(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    load, timestamps = ENGINES[spec["engine"]]
    rss_start = peak_rss_mb()
    model = load(Path(spec["folder"]), spec["precision"], spec["draft_tokens"], spec["c_step"])
    step = model[0].step if isinstance(model, tuple) else None
    g = torch.Generator().manual_seed(0)
    short = torch.randint(0, 50000, (spec["prompt_len"],), generator=g).tolist()
    long = torch.randint(0, 50000, (spec["prefill_len"],), generator=g).tolist()
    start = time.perf_counter()
    for prompt in (short, long):  # warm-up: first-call allocations, lazy initialisation, compilation
        timestamps(model, prompt, 8)
    warmup_s = time.perf_counter() - start
    decode, ttft, prefill = [], [], []
    wait_for_parent()  # the memory read rate is measured before each rep and after the last
    for _ in range(spec["reps"]):
        times, tokens = timestamps(model, short, spec["new_tokens"])
        ttft.append(times[1] - times[0])
        decode.append((len(times) - 2) / (times[-1] - times[1]))  # tokens after the first / their time
        wait_for_parent()
        times, _ = timestamps(model, long, 1)
        prefill.append(spec["prefill_len"] / (times[1] - times[0]))
    return {"decode_tok_s": statistics.median(decode), "decode_runs": decode,
            "ttft_ms": 1e3 * statistics.median(ttft), "prefill_tok_s": statistics.median(prefill),
            "prefill_runs": prefill, "peak_rss_mb": peak_rss_mb(), "rss_before_load_mb": rss_start,
            "rss_end_mb": psutil.Process().memory_info().rss / 2**20, "warmup_s": warmup_s, "tokens": tokens,
            "c_step_isa": step.isa if step is not None else None,
            "bytes_per_token": bytes_read_per_token(model[0].model) if isinstance(model, tuple) else None,
            "float32_kernel": float32_kernel(model[0].model) if isinstance(model, tuple) and spec["precision"] == "float32"
            else None}


def bytes_read_per_token(model) -> int:
    """The bytes a decode step reads from memory, at least: every weight once (shared ones once), of the
    position embeddings one row."""
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    wpe = model.transformer.wpe.weight
    return sum(unique.values()) - wpe.numel() * wpe.element_size() + wpe[0].numel() * wpe.element_size()


def read_bandwidth(threads: int, mib: int = 512) -> float:
    """GB/s at which this machine reads memory: torch.sum over mib MiB in huge pages (as MiniGPT keeps
    its weights; minigpt/speed/hugepages.py), the best of 5."""
    torch.set_num_threads(threads)
    holder = torch.nn.Module()
    holder.register_buffer("data", torch.ones(mib * 2**20 // 4))
    move_to_huge_pages(holder)
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        holder.data.sum()
        best = min(best, time.perf_counter() - start)
    return mib * 2**20 / best / 1e9


def shares_of_reads(rates: list[float], bytes_per_token: int, reads: list[float]) -> list[float]:
    """Each run's tok/s x bytes a token against the mean of the read rates (GB/s) measured just before and
    after it: reads has one more entry than rates."""
    return [rate * bytes_per_token / ((a + b) / 2 * 1e9) for rate, a, b in zip(rates, reads, reads[1:])]


def print_memory_limit(results: dict, threads: int) -> None:
    """Decoding reads every weight once a token, so bandwidth / bytes per token bounds its speed. Each rep
    against the mean of the read rates measured just before and after it (run_in_subprocess); the median."""
    rows = [(e, p, r) for (e, p), r in results.items() if r.get("bytes_per_token") and e in ("minigpt", "minigpt+pytorch")]
    parts = []
    for e, p, r in rows:
        reads = r["read_gb_s"]
        shares = shares_of_reads(r["decode_runs"], r["bytes_per_token"], reads)
        parts.append(f"{e} {p} {100 * statistics.median(shares):.0f}% ({', '.join(f'{100 * x:.0f}' for x in shares)}; "
                     f"reads {min(reads):.1f}-{max(reads):.1f} GB/s)")
    if parts:
        print(f"decode tok/s against the limit of memory reads (torch.sum over 512 MiB in huge pages, {threads} "
              "threads, just before and after each rep) for the weight bytes a token, median (each rep): "
              + ", ".join(parts))


def float32_kernel(model) -> str:
    """The float32 matmul load_for_inference kept, after measuring both on this CPU (minigpt/speed/onednn.py)."""
    return "oneDNN" if any(isinstance(m, OneDNNLinear) for m in model.modules()) else "F.linear"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def wait_for_parent() -> None:
    """In a worker: let run_in_subprocess measure the memory read rate, this process idle, and go on after."""
    print(READ_NOW, flush=True)
    sys.stdin.readline()


def run_in_subprocess(spec: dict) -> dict:
    """One engine's worker; each time it waits (wait_for_parent), the machine's memory read rate is measured:
    on a shared host that rate drifts by a sixth within a minute (25.0 and 28.8 GB/s around one row), so each
    rep of decoding is held against the reads measured just before and after it."""
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen([sys.executable, "-m", "bench.decode", "--worker", json.dumps(spec)], cwd=ROOT,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True)
        reads, last = [], ""
        for line in proc.stdout:
            if line.strip() == READ_NOW:
                reads.append(read_bandwidth(spec["threads"]))
                proc.stdin.write("\n")
                proc.stdin.flush()
            else:
                last = line
        if proc.wait():
            errors.seek(0)
            raise SystemExit(f"{spec['engine']} {spec['precision']} failed:\n{errors.read()}")
    return {**json.loads(last), "read_gb_s": reads}


# ---- quality of the reduced precisions -------------------------------------------------------------

@torch.inference_mode()
def quality(folder: Path, precision: str, new_tokens: int) -> dict:
    """Teacher-forced comparison with float32: float32 greedily continues each prompt; the other
    precision reads the prompt, then steps through that same continuation one token at a time, as
    decoding does (int8 through the C step where it builds). We compare the logits that chose each token."""
    reference, tokenizer = load_pretrained(folder, device="cpu")
    other = load_minigpt(folder, precision)[0]
    agree = total = 0
    max_dev = worst_margin = 0.0  # worst_margin: the largest float32 top-1 lead the other precision overturned
    for text in QUALITY_PROMPTS:
        prompt = tokenizer.encode_ordinary(text)
        cont = [e.token_id for e in generate(reference, tokenizer, prompt, new_tokens, SamplingParams(temperature=0))]
        ids = prompt + cont
        ref_logits = reference(torch.tensor([ids]))[0, len(prompt) - 1:-1].float()
        cache = other.new_cache(len(ids))
        other(torch.tensor([prompt[:-1]]), cache)
        our_logits = torch.cat([other(torch.tensor([[t]]), cache)[0] for t in ids[len(prompt) - 1:-1]]).float()
        same = ref_logits.argmax(-1) == our_logits.argmax(-1)
        agree += int(same.sum())
        top2 = ref_logits.topk(2).values
        worst_margin = max([worst_margin, *(top2[:, 0] - top2[:, 1])[~same].tolist()])
        total += len(cont)
        max_dev = max(max_dev, float((ref_logits - our_logits).abs().max()))
    return {"greedy_agreement": agree / total, "positions": total, "max_logit_dev": max_dev,
            "largest_margin_overturned": worst_margin, "ref_logit_std": float(ref_logits.std())}


# ---- report ------------------------------------------------------------------------------------------

def machine_info() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    import transformers
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "simd": [f for f in ("avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512_bf16",
                                                  "avx512_vnni", "amx_bf16", "amx_int8", "asimd", "asimddp", "sve")
                     if f in flags],
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def ratio(results: dict, engine: str, precision: str, key: str) -> float | None:
    """MiniGPT / transformers for key, against transformers in the same precision (int8, int4: float32)."""
    peer = results.get(("transformers", precision)) or results.get(("transformers", "float32"))
    return results[(engine, precision)][key] / peer[key] if engine.startswith("minigpt") and peer else None


def print_table(results: dict) -> None:
    print(f"\n{'engine':<16}{'precision':<10}{'decode tok/s':>13}{'x hf':>6}{'prefill tok/s':>15}{'x hf':>6}"
          f"{'TTFT ms':>9}{'peak RSS MB':>13}{'end RSS MB':>12}{'warm-up s':>11}")
    for (engine, precision), r in results.items():
        x = {key: f"{v:.2f}" if (v := ratio(results, engine, precision, key)) else ""
             for key in ("decode_tok_s", "prefill_tok_s")}
        print(f"{engine:<16}{precision:<10}{r['decode_tok_s']:>13.1f}{x['decode_tok_s']:>6}{r['prefill_tok_s']:>15.0f}"
              f"{x['prefill_tok_s']:>6}{r['ttft_ms']:>9.1f}{r['peak_rss_mb']:>13.0f}{r['rss_end_mb']:>12.0f}"
              f"{r['warmup_s']:>11.1f}")
    isas = {f"{e} {p}": r["c_step_isa"] for (e, p), r in results.items() if r.get("c_step_isa")}
    if isas:
        print("C decode step variant: " + ", ".join(f"{k}: {v}" for k, v in isas.items()))
    kernels = {f"{e} {p}": r["float32_kernel"] for (e, p), r in results.items() if r.get("float32_kernel")}
    if kernels:  # load_for_inference measures which is faster on this CPU (minigpt/speed/onednn.py)
        print("float32 matmuls: " + ", ".join(f"{k}: {v}" for k, v in kernels.items()))
    print("(x hf: MiniGPT / transformers in the same precision; int8 and int4 are compared with transformers float32. "
          "minigpt int8 decodes through the C step, minigpt+pytorch int8 through PyTorch's int8 kernel)")


def print_targets(results: dict, same: dict, qualities: dict) -> None:
    """The issue's targets, checked against this run's figures."""
    def line(ok: bool | None, text: str) -> None:
        print(f"  [{'n/a' if ok is None else 'met' if ok else 'MISSED'}] {text}")

    print("targets:")
    for engine in ("minigpt", "minigpt+draft"):
        if (engine, "float32") in results and ("transformers", "float32") in results:
            r, identical = ratio(results, engine, "float32", "decode_tok_s"), same.get(f"{engine} float32")
            line(r >= 1.5 and identical, f"float32 decode >= 1.5x transformers with identical greedy tokens ({engine}):"
                 f" {r:.2f}x, identical={identical}")
    for precision in ("bfloat16", "int8"):
        if ("minigpt", precision) in results and precision in qualities:
            speed, agree = results[("minigpt", precision)]["decode_tok_s"], qualities[precision]["greedy_agreement"]
            line(speed >= 260 and agree >= 0.99, f"{precision} decode >= 260 tok/s with >= 99% greedy agreement: "
                 f"{speed:.0f} tok/s, {100 * agree:.1f}%")
    for precision in PRECISIONS["transformers"]:
        if ("minigpt", precision) in results and ("transformers", precision) in results:
            r = ratio(results, "minigpt", precision, "prefill_tok_s")
            line(r >= 1, f"{precision} prefill >= transformers: {r:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a cached Hub name or local folder (default: random weights)")
    p.add_argument("--shape", choices=SHAPES, default="gpt2", help="the random checkpoint's shape (without --model)")
    p.add_argument("--engines", default="minigpt,minigpt+pytorch,minigpt+draft,transformers",
                   help="rows to run, comma-separated (minigpt+pytorch: int8 on PyTorch's kernel)")
    p.add_argument("--no-quality", action="store_true", help="skip the quality comparison with float32")
    p.add_argument("--precisions", default="float32,bfloat16,int8")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--draft-tokens", type=int, default=DRAFT_TOKENS,
                   help="proposals per speculative round in the minigpt+draft rows (0: no such rows)")
    p.add_argument("--quick", action="store_true", help="1 rep, 16 new tokens, 64-token prefill")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: bench/results/decode-<date>.json)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return
    if args.quick:
        args.reps, args.new_tokens, args.prefill_len = 1, 16, 64
    precisions = args.precisions.split(",")

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            folder = resolve_snapshot(args.model)
        else:
            folder = make_checkpoint(Path(tmp) / f"{args.shape}-random", key_style="transformers",
                                     **SHAPES[args.shape], n_positions=1024)[0]  # not its model: gpt2-xl is 6 GB
        info = machine_info()
        print(f"{info['cpu']}, {info['cores']} cores, {','.join(info['simd'])}; torch {info['torch']}, "
              f"transformers {info['transformers']}, {args.threads} threads; load average {os.getloadavg()[0]:.2f}")
        load_before = os.getloadavg()
        spec = {"folder": str(folder), "threads": args.threads, "reps": args.reps, "new_tokens": args.new_tokens,
                "prompt_len": args.prompt_len, "prefill_len": args.prefill_len,
                "draft_tokens": args.draft_tokens, "c_step": True}
        results = {}
        engines = args.engines.split(",")
        for engine, supported in PRECISIONS.items():
            if engine not in engines:
                continue
            for precision in (p for p in precisions if p in supported):
                print(f"  {engine} {precision} ...", flush=True)
                results[(engine, precision)] = run_in_subprocess(
                    {**spec, "engine": engine, "precision": precision, "draft_tokens": 0})
                if engine != "minigpt":
                    continue
                if precision == "int8" and "minigpt+pytorch" in engines:  # the same model on PyTorch's int8 kernel
                    print(f"  {engine}+pytorch {precision} ...", flush=True)
                    results[(f"{engine}+pytorch", precision)] = run_in_subprocess(
                        {**spec, "engine": engine, "precision": precision, "draft_tokens": 0,
                         "c_step": False})
                if args.draft_tokens and precision != "int8" and "minigpt+draft" in engines:  # with an int8 draft
                    print(f"  {engine}+draft {precision} ...", flush=True)
                    results[(f"{engine}+draft", precision)] = run_in_subprocess(
                        {**spec, "engine": engine, "precision": precision,
                         "draft_tokens": args.draft_tokens})
        load_after = os.getloadavg()
        print_table(results)
        print_memory_limit(results, args.threads)

        same = {}  # engine + " " + precision -> MiniGPT's greedy tokens equal transformers' in that precision
        for (engine, precision), r in results.items():
            if engine.startswith("minigpt") and ("transformers", precision) in results:
                ours, theirs = r["tokens"], results[("transformers", precision)]["tokens"]
                same[f"{engine} {precision}"] = ours == theirs[:len(ours)]
                print(f"greedy tokens identical to transformers ({engine} {precision}): {ours == theirs[:len(ours)]}"
                      + (f" (MiniGPT stopped at <|endoftext|> after {len(ours)})" if len(ours) < len(theirs) else ""))

        qualities = {}
        for precision in (p for p in precisions if p != "float32" and not args.no_quality):
            q = quality(folder, precision, new_tokens=args.new_tokens)
            qualities[precision] = q
            print(f"quality {precision} vs float32: greedy agreement {100 * q['greedy_agreement']:.2f}% over "
                  f"{q['positions']} positions, max logit deviation {q['max_logit_dev']:.4f} (logit std "
                  f"{q['ref_logit_std']:.2f}); disagreements only where float32's lead was <= "
                  f"{q['largest_margin_overturned']:.4f}")
    print_targets(results, same, qualities)
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} (other work on the machine "
          "makes these numbers noisy)")

    stamp = datetime.now(timezone.utc)
    out = args.out or ROOT / "bench" / "results" / f"decode-{stamp:%Y%m%d-%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": stamp.isoformat(timespec="seconds"), "command": " ".join(["python", *sys.argv]),
        "machine": info, "load_average_before": load_before, "load_average_after": load_after,
        "settings": {k: v for k, v in spec.items() if k != "folder"} | {
            "model": args.model or f"random {args.shape}", "MINIGPT_ISA": os.environ.get("MINIGPT_ISA")},
        "results": [{"engine": e, "precision": p, **{k: v for k, v in r.items() if k != "tokens"}}
                    for (e, p), r in results.items()],
        "greedy_identical_to_transformers": same, "quality_vs_float32": qualities,
    }, indent=2))
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
