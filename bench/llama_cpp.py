"""llama.cpp's prefill and decode speed on the GPT-2 124M shape, same random checkpoint as bench/decode.py.

    python -m bench.llama_cpp --llama-cpp ~/llama.cpp              # f32, f16, q8_0 at 2 threads, 5 reps
    python -m bench.llama_cpp --llama-cpp ~/llama.cpp --threads 2,1 --types q8_0

DIR is a built llama.cpp checkout: it has convert_hf_to_gguf.py (with its gguf-py folder) and
build/bin/llama-bench, e.g. built with
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
    cmake --build build -j --target llama-bench

The script writes the random 124M checkpoint (tests/checkpoints.py, as bench/decode.py does), converts it
to GGUF in each type with llama.cpp's own converter, and runs `llama-bench -p 512 -n 128 -o json` per type
and thread count: pp512 is prefill tokens/s over a 512-token prompt, tg128 decode tokens/s over 128 new
tokens. Before each run it waits (60 s at a time, 10 times at most) while the 1-minute load average is
above --max-load, and records the load it ran at. Results go to bench/results/llama_cpp-<UTC date-time>.json.
Benchmark only: nothing in minigpt or tests imports it, and it needs no package beyond requirements-dev.txt.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.decode import machine_info
from tests.helpers import REPO as ROOT
from tests.helpers.checkpoints import (
    make_checkpoint,  # the Hub layout, written by transformers
)

GPT2_124M = {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024}


def write_checkpoint(folder: Path, **shape: int) -> Path:
    """bench/decode.py's random 124M checkpoint (or another shape), plus the two config keys convert_hf_to_gguf.py
    reads: `architectures` (GPT2Config.to_dict() leaves it null) and `n_ctx` (transformers 5 drops it)."""
    folder, _ = make_checkpoint(folder, key_style="transformers", **(GPT2_124M | shape))
    config = json.loads((folder / "config.json").read_text())
    config |= {"architectures": ["GPT2LMHeadModel"], "n_ctx": config["n_positions"]}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def convert(llama_cpp: Path, folder: Path, outtype: str, out: Path) -> Path:
    """One GGUF file with every weight matrix in outtype (f32, f16 or q8_0)."""
    subprocess.run([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(folder),
                    "--outtype", outtype, "--outfile", str(out)], check=True, capture_output=True, text=True)
    return out


def wait_for_quiet(max_load: float, tries: int = 10) -> tuple[float, float, float]:
    """Sleep 60 s at a time while the 1-minute load is above max_load; return the load it stopped at."""
    for _ in range(tries):
        if os.getloadavg()[0] <= max_load:
            break
        print(f"  load {os.getloadavg()[0]:.2f} > {max_load}, waiting 60 s", flush=True)
        time.sleep(60)
    return os.getloadavg()


def llama_bench(llama_cpp: Path, model: Path, threads: int, reps: int, prompt: int, gen: int) -> list[dict]:
    """llama-bench's JSON records: one for pp<prompt> (none when prompt is 0), one for tg<gen>."""
    cmd = [str(llama_cpp / "build" / "bin" / "llama-bench"), "-m", str(model), "-t", str(threads),
           "-p", str(prompt), "-n", str(gen), "-r", str(reps), "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        died = (f"signal {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
                else f"exit status {proc.returncode}")
        hint = "; its prefill test crashes on some builds: --prompt 0 measures decoding alone" if prompt else ""
        raise SystemExit(f"error: llama-bench stopped with {died} ({' '.join(cmd[1:])}){hint}")
    return json.loads(proc.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-cpp", type=Path, required=True, help="a built llama.cpp checkout")
    p.add_argument("--types", default="f32,f16,q8_0", help="GGUF weight types, comma-separated")
    p.add_argument("--threads", default="2", help="thread counts, comma-separated")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--prompt", type=int, default=512, help="prefill test length (pp; 0: decoding alone)")
    p.add_argument("--gen", type=int, default=128, help="decode test length (tg)")
    p.add_argument("--max-load", type=float, default=1.5, help="wait while the 1-minute load is above this")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: bench/results/llama_cpp-<date>.json)")
    args = p.parse_args()
    llama_cpp = args.llama_cpp.expanduser().resolve()
    info = machine_info()
    print(f"{info['cpu']}, {info['cores']} cores, {','.join(info['simd'])}; load average {os.getloadavg()[0]:.2f}")

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_checkpoint(Path(tmp) / "gpt2-random")
        for outtype in args.types.split(","):
            print(f"  converting to {outtype} ...", flush=True)
            model = convert(llama_cpp, folder, outtype, Path(tmp) / f"gpt2-random-{outtype}.gguf")
            for threads in map(int, args.threads.split(",")):
                load_before = wait_for_quiet(args.max_load)
                print(f"  llama-bench {outtype} -t {threads} (load {load_before[0]:.2f}) ...", flush=True)
                records = llama_bench(llama_cpp, model, threads, args.reps, args.prompt, args.gen)
                runs.append({"type": outtype, "threads": threads, "load_average_before": load_before,
                             "load_average_after": os.getloadavg(),
                             "file_mb": model.stat().st_size / 2**20, "llama_bench": records})

    build = runs[0]["llama_bench"][0]
    print(f"\nllama.cpp build {build['build_commit']} ({build['build_number']}), {build['cpu_info']}")
    print(f"{'type':<6}{'threads':>8}{f'pp{args.prompt} tok/s':>18}{f'tg{args.gen} tok/s':>18}"
          f"{'load before/after':>20}")
    for run in runs:
        by_test = {"pp" if r["n_gen"] == 0 else "tg": r for r in run["llama_bench"]}
        cells = [f"{by_test[t]['avg_ts']:.1f} ± {by_test[t]['stddev_ts']:.1f}" if t in by_test else "-"
                 for t in ("pp", "tg")]
        print(f"{run['type']:<6}{run['threads']:>8}{cells[0]:>18}{cells[1]:>18}"
              f"{run['load_average_before'][0]:>12.2f} / {run['load_average_after'][0]:.2f}")

    stamp = datetime.now(timezone.utc)
    out = args.out or ROOT / "bench" / "results" / f"llama_cpp-{stamp:%Y%m%d-%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": stamp.isoformat(timespec="seconds"), "command": " ".join(["python", *sys.argv]),
        "machine": info, "llama_cpp": {"dir": str(llama_cpp), "build_commit": build["build_commit"],
                                       "build_number": build["build_number"]},
        "settings": {"model": "random gpt2 124M", "reps": args.reps, "prompt": args.prompt, "gen": args.gen},
        "runs": runs,
    }, indent=2))
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
