"""Concurrent streaming API clients: MiniGPT's app.py vs llama.cpp's llama-server, same random GPT-2 124M.

    python -m bench.serving --llama-cpp ~/llama.cpp                  # 1,2,4,8,16 clients, float32 and int8
    python -m bench.serving --llama-cpp ~/llama.cpp --clients 1,2 --precisions int8 --rounds 1
    python -m bench.serving                                          # MiniGPT alone (no llama.cpp build)
    python -m bench.serving --app /tmp/head/app.py ...               # another checkout's app.py, e.g. HEAD's

For each precision and client count N it starts `python app.py --model CKPT --no-adapter --precision P
--concurrency N` (OMP_NUM_THREADS=--threads) and, with --llama-cpp, `llama-server -m GGUF -np N
-c N*ctx -t THREADS --cont-batching` (f32 GGUF for float32, q8_0 for int8; ctx = prompt + new tokens
rounded up to 256), then N threads of the official openai client each stream one /v1/completions
request at once: the same prompt of exactly --prompt-tokens GPT-2 tokens, --new-tokens new tokens,
greedy (temperature 0), or with --sampling chat the chat's default settings (temperature 0.7, top-k 40,
top-p 0.95; each stream then draws its own tokens, so the servers' texts differ). llama-server gets
`ignore_eos` (all --new-tokens come) and `cache_prompt: false` (each request prefills its prompt, as
MiniGPT does); MiniGPT's API has no way to ignore the end-of-text token, so a stream may stop early:
token counts are the server's usage figures and rates use them.
A warm-up round of short requests precedes the measured rounds; each configuration runs --rounds
rounds, and more with few clients so there are at least 5 streams for the time-to-first-token figures.

Per configuration: aggregate tokens/s (all streams' tokens / time from the first request sent to the
last token, median over rounds), per-stream tokens/s (median over streams of tokens after the first /
time after the first), time to first token (TTFT, from sending to the first text) p50 and p95 over all
streams. Then the project's targets: 8 streams >= 4x the aggregate of 1 stream, aggregate >=
llama-server's at the same precision and N, TTFT p95 at 8 streams <= 3x the TTFT (p50) of a lone request.

DIR is a llama.cpp checkout as for python -m bench.llama_cpp, with build/bin/llama-server built too:
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_USE_PREBUILT_UI=OFF
    cmake --build build -j2 --target llama-server llama-bench
(-DLLAMA_USE_PREBUILT_UI=OFF: the server is built without its web page instead of downloading it.)
If llama-server crashes while warming up on a GGUF (this build's AMX kernel does, with q8_0, on some
AMX machines: SIGSEGV or SIGILL), it runs with --no-repack, which turns the AMX and repacked weight layouts off;
the runs record the extra arguments.
Before each precision it waits while the 1-minute load average is above --max-load (as bench.llama_cpp
does), and before each configuration while other work keeps the CPUs more than --max-busy % busy (its
own load lingers in the load average, so that is sampled for 1 s while no server of its own runs):
llama-server's threads spin while they wait for each other, so other work on the machine can slow it
several-fold. Each configuration records the load before and after it and the CPU sample. Results go to
bench/results/serving-<UTC date-time>.json. Any failure is one `error: ...` line and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import openai
import psutil

from bench.decode import machine_info
from bench.llama_cpp import convert, wait_for_quiet, write_checkpoint
from bench.load import percentile
from bench.load_api import api
from minigpt.tokenizer import load_tokenizer
from tests.helpers import REPO as ROOT
from tests.helpers.app_server import free_port, stop

GGUF_TYPE = {"float32": "f32", "int8": "q8_0"}
PROMPT_TEXT = ("The old lighthouse keeper climbed the winding stairs every evening at dusk, carrying a lantern "
               "and a notebook in which he wrote down the ships he saw, the weather, and the birds that rested "
               "on the railing before flying south for the winter.")
MIN_STREAMS = 5  # streams per configuration at least, so TTFT percentiles mean something
WARM_UP_TOKENS = 4
SAMPLING = {"greedy": {"temperature": 0},  # sent in each request's body (top_k is not an OpenAI parameter)
            "chat": {"temperature": 0.7, "top_k": 40, "top_p": 0.95}}


class Failure(Exception):
    """One line for the user: main prints it as `error: ...` and exits with status 2."""


class Crashed(Failure):
    """A server killed by a signal while starting."""

    def __init__(self, message: str, died: str):
        super().__init__(message)
        self.died = died


@dataclass
class Stream:
    sent: float  # perf_counter when the request was sent
    first: float  # ... when its first text arrived
    last: float  # ... when its last chunk arrived
    tokens: int  # completion tokens, from the usage chunk
    prompt_tokens: int
    finish: str  # stop (end-of-text) or length


def exact_prompt(checkpoint: Path, tokens: int) -> str:
    """The first `tokens` GPT-2 tokens of PROMPT_TEXT (repeated as needed) as text that encodes back to them."""
    encoding = load_tokenizer(checkpoint)
    ids = encoding.encode_ordinary(" ".join([PROMPT_TEXT] * (tokens // 40 + 1)))[:tokens]
    text = encoding.decode(ids)
    if encoding.encode_ordinary(text) != ids:
        raise Failure(f"the first {tokens} tokens of the prompt text do not encode back to {tokens} tokens")
    return text


def stream_one(client: openai.OpenAI, prompt: str, new_tokens: int, extra_body: dict,
               start: threading.Barrier) -> Stream:
    """One streamed completion, sent when all the round's clients are ready."""
    start.wait()
    sent = time.perf_counter()
    first = last = finish = usage = None
    for chunk in client.completions.create(model="minigpt-base", prompt=prompt, max_tokens=new_tokens, stream=True,
                                           stream_options={"include_usage": True}, extra_body=extra_body):
        now = time.perf_counter()
        if chunk.choices:
            choice = chunk.choices[0]
            if first is None and (choice.text or choice.finish_reason):
                first = now
            finish = choice.finish_reason or finish
            last = now
        usage = chunk.usage or usage
    if first is None or usage is None:
        raise Failure(f"a stream ended without {'text' if first is None else 'a usage chunk'}")
    return Stream(sent, first, last, usage.completion_tokens, usage.prompt_tokens, finish or "")


def run_round(url: str, clients: int, prompt: str, new_tokens: int, extra_body: dict) -> list[Stream]:
    """`clients` threads, each with its own openai client, send one streaming request at the same moment."""
    connections = [api(url) for _ in range(clients)]
    start = threading.Barrier(clients)
    results: list[Stream | Exception | None] = [None] * clients

    def worker(i: int) -> None:
        try:
            results[i] = stream_one(connections[i], prompt, new_tokens, extra_body, start)
        except Exception as e:  # reported below, from the main thread
            results[i] = e
            start.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for connection in connections:
        connection.close()
    for result in results:
        if isinstance(result, Failure):
            raise result
        if isinstance(result, Exception) and not isinstance(result, threading.BrokenBarrierError):
            raise Failure(f"a streaming request failed: {type(result).__name__}: {result}")
    return results


def summarize(rounds: list[list[Stream]], new_tokens: int) -> dict:
    streams = [s for r in rounds for s in r]
    aggregates = [sum(s.tokens for s in r) / (max(s.last for s in r) - min(s.sent for s in r)) for r in rounds]
    per_stream = [(s.tokens - 1) / (s.last - s.first) for s in streams if s.tokens > 1 and s.last > s.first]
    ttft = [s.first - s.sent for s in streams]
    return {"aggregate_tok_s": statistics.median(aggregates), "aggregate_tok_s_per_round": aggregates,
            "per_stream_tok_s": statistics.median(per_stream) if per_stream else math.nan,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
            "early_stops": sum(s.tokens < new_tokens for s in streams),
            "prompt_tokens": sorted({s.prompt_tokens for s in streams}),
            "streams": [{"ttft_s": s.first - s.sent, "after_first_s": s.last - s.first, "tokens": s.tokens,
                         "prompt_tokens": s.prompt_tokens, "finish": s.finish} for s in streams]}


def measure(url: str, clients: int, rounds: int, prompt: str, new_tokens: int, extra_body: dict) -> dict:
    """A warm-up (one request, then all clients with short replies), then the measured rounds."""
    run_round(url, 1, prompt, WARM_UP_TOKENS, extra_body)  # the openai client's first use, on its own
    run_round(url, clients, prompt, WARM_UP_TOKENS, extra_body)
    rounds = max(rounds, math.ceil(MIN_STREAMS / clients))
    return summarize([run_round(url, clients, prompt, new_tokens, extra_body) for _ in range(rounds)], new_tokens)


def log_tail(log: Path, lines: int = 3) -> str:
    tail = log.read_text(errors="replace").strip().splitlines()[-lines:] if log.exists() else []
    return " | ".join(line.strip() for line in tail) or "(empty)"


@contextmanager
def serving(name: str, cmd: list[str], ready: str, log: Path, env: dict | None = None,
            cwd: Path | None = None, startup_s: float = 300) -> Iterator[None]:
    """Run cmd, its output in log, until the block ends; first wait until `ready` answers 200."""
    with log.open("w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if process.poll() is not None:
                code = process.returncode
                died = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
                message = f"{name} stopped with {died} while starting (log {log}: {log_tail(log)})"
                raise Crashed(message, died) if code < 0 else Failure(message)
            try:
                with urllib.request.urlopen(ready, timeout=2):
                    break
            except OSError:  # not listening yet, or 503 while llama-server loads
                pass
            if time.monotonic() > deadline:
                raise Failure(f"{name} did not answer in {startup_s:.0f} s (log {log}: {log_tail(log)})")
            time.sleep(0.5)
        try:
            yield
        except Failure as e:
            raise Failure(f"{e} ({name} log {log}: {log_tail(log)})") from None
    finally:
        stop(process, timeout_s=15)


@contextmanager
def minigpt_server(app: Path, checkpoint: Path, precision: str, clients: int, threads: int,
                   log: Path) -> Iterator[str]:
    """app.py serving checkpoint with `clients` replies computed at once; yields its URL."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": str(threads)}
    env.pop("MINIGPT_API_KEY", None)
    cmd = [sys.executable, str(app), "--model", str(checkpoint), "--no-adapter", "--device", "cpu",
           "--precision", precision, "--port", str(port), "--concurrency", str(clients)]
    with serving("app.py", cmd, f"http://127.0.0.1:{port}/v1/models", log, env, cwd=app.parent):
        yield f"http://127.0.0.1:{port}/"


@contextmanager
def llama_server(llama_cpp: Path, gguf: Path, clients: int, threads: int, ctx: int, log: Path,
                 extra: Sequence[str] = ()) -> Iterator[str]:
    """llama-server with `clients` slots of ctx tokens each, batched continuously; yields its URL."""
    port = free_port()
    cmd = [str(llama_cpp / "build" / "bin" / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1",
           "--port", str(port), "-np", str(clients), "-c", str(clients * ctx), "-t", str(threads),
           "--cont-batching", "--no-webui", *extra]
    with serving("llama-server", cmd, f"http://127.0.0.1:{port}/health", log):
        yield f"http://127.0.0.1:{port}/"


def llama_server_args(llama_cpp: Path, gguf: Path, threads: int, ctx: int, log: Path) -> list[str]:
    """[] if llama-server starts on gguf (its warm-up runs a 2-token batch); ["--no-repack"] if it crashes
    there and starts with it: on some AMX machines this build's AMX kernel (an extra buffer type, which
    --no-repack turns off) dies of SIGSEGV or SIGILL on q8_0 batches of more than one row."""
    try:
        with llama_server(llama_cpp, gguf, 2, threads, ctx, log):
            return []
    except Crashed as e:
        print(f"  llama-server stopped with {e.died} while warming up: trying --no-repack", flush=True)
    with llama_server(llama_cpp, gguf, 2, threads, ctx, log, ["--no-repack"]):
        return ["--no-repack"]


def wait_for_idle_cpus(max_busy: float, tries: int = 60) -> float:
    """Sample the CPUs for 1 s (no server of ours runs then, so what keeps them busy is others' work) every
    10 s until they are at most max_busy % busy, 10 minutes at most; return the last sample."""
    for _ in range(tries):
        if (busy := psutil.cpu_percent(interval=1)) <= max_busy:
            break
        print(f"  CPUs {busy:.0f}% busy with other work > {max_busy:.0f}%, waiting 10 s", flush=True)
        time.sleep(9)
    return busy


def llama_server_version(llama_cpp: Path) -> str:
    binary = llama_cpp / "build" / "bin" / "llama-server"
    if not binary.is_file():
        raise Failure(f"no {binary}: build it as this module's docstring says")
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    return next((line for line in (out.stdout + out.stderr).splitlines() if line.startswith("version")), "unknown")


def checks(runs: list[dict]) -> list[str]:
    """The project's serving targets, one line each, for every precision (and engine) the runs allow."""
    by = {(r["engine"], r["precision"], r["clients"]): r for r in runs}
    lines = []
    for engine, precision in dict.fromkeys((r["engine"], r["precision"]) for r in runs):
        one, eight = by.get((engine, precision, 1)), by.get((engine, precision, 8))
        if one and eight:
            ratio = eight["aggregate_tok_s"] / one["aggregate_tok_s"]
            lines.append(f"{engine} {precision}: 8 streams >= 4x the aggregate of 1 stream: {ratio:.2f}x "
                         f"({'met' if ratio >= 4 else 'not met'})")
            ratio = eight["ttft_p95_s"] / one["ttft_p50_s"]
            lines.append(f"{engine} {precision}: TTFT p95 at 8 streams <= 3x TTFT of a lone request: "
                         f"{eight['ttft_p95_s']:.3f} s / {one['ttft_p50_s']:.3f} s = {ratio:.2f}x "
                         f"({'met' if ratio <= 3 else 'not met'})")
        if engine == "minigpt":
            ratios = {n: r["ratio_vs_llama_server"] for (e, p, n), r in by.items()
                      if e == engine and p == precision and r.get("ratio_vs_llama_server")}
            if ratios:
                missed = [n for n, x in ratios.items() if x < 1]
                lines.append(f"minigpt {precision}: aggregate >= llama-server's at same precision and N: "
                             + ", ".join(f"N={n} {x:.2f}x" for n, x in ratios.items())
                             + (f" (not met at N={','.join(map(str, missed))})" if missed else " (met)"))
    return lines


def table(runs: list[dict]) -> str:
    rows = [f"{'precision':<10}{'engine':<14}{'clients':>8}{'aggregate tok/s':>17}{'per-stream tok/s':>18}"
            f"{'TTFT p50 s':>12}{'TTFT p95 s':>12}{'MiniGPT/llama':>15}{'early EOS':>11}"]
    for r in runs:
        ratio = f"{r['ratio_vs_llama_server']:.2f}x" if r.get("ratio_vs_llama_server") else "-"
        rows.append(f"{r['precision']:<10}{r['engine']:<14}{r['clients']:>8}{r['aggregate_tok_s']:>17.1f}"
                    f"{r['per_stream_tok_s']:>18.1f}{r['ttft_p50_s']:>12.3f}{r['ttft_p95_s']:>12.3f}{ratio:>15}"
                    f"{r['early_stops']:>6}/{len(r['streams'])}")
    return "\n".join(rows)


def run(args: argparse.Namespace, work: Path) -> dict:
    info = machine_info()
    print(f"{info['cpu']}, {info['cores']} cores, {','.join(info['simd'])}; load average {os.getloadavg()[0]:.2f}")
    llama_cpp = args.llama_cpp.expanduser().resolve() if args.llama_cpp else None
    version = llama_server_version(llama_cpp) if llama_cpp else None
    if version:
        print(f"llama-server {version} ({llama_cpp})")
    print("  writing the random GPT-2 124M checkpoint ...", flush=True)
    checkpoint = write_checkpoint(work / "gpt2-random")
    prompt = exact_prompt(checkpoint, args.prompt_tokens)
    ctx = math.ceil((args.prompt_tokens + args.new_tokens) / 256) * 256
    runs = []
    for precision in args.precisions:
        gguf, extra = None, []
        if llama_cpp:
            print(f"  converting to {GGUF_TYPE[precision]} ...", flush=True)
            try:
                gguf = convert(llama_cpp, checkpoint, GGUF_TYPE[precision], work / f"gpt2-{precision}.gguf")
            except subprocess.CalledProcessError as e:
                last = (e.stderr or "").strip().splitlines()[-1:]
                raise Failure(f"convert_hf_to_gguf.py failed: {last[0] if last else e}") from None
            extra = llama_server_args(llama_cpp, gguf, args.threads, ctx, work / f"llama-server-{precision}.log")
        wait_for_quiet(args.max_load)
        sampling = SAMPLING[args.sampling]
        for clients in args.clients:
            engines = [("minigpt", sampling, partial(minigpt_server, args.app, checkpoint, precision, clients,
                                                     args.threads, work / f"app-{precision}-{clients}.log"))]
            if gguf:
                engines.append(("llama-server", {**sampling, "ignore_eos": True, "cache_prompt": False},
                                partial(llama_server, llama_cpp, gguf, clients, args.threads, ctx,
                                        work / f"llama-server-{precision}-{clients}.log", extra)))
            for engine, extra_body, server in engines:
                busy, load_before = wait_for_idle_cpus(args.max_busy), os.getloadavg()
                print(f"  {engine} {precision}, {clients} clients (load {load_before[0]:.2f}, "
                      f"CPUs {busy:.0f}% busy) ...", flush=True)
                with server() as url:
                    result = measure(url, clients, args.rounds, prompt, args.new_tokens, extra_body)
                runs.append({"precision": precision, "engine": engine, "clients": clients, **result,
                             **({"llama_server_args": extra} if engine == "llama-server" else {}),
                             "load_average_before": load_before, "cpu_busy_percent_before": busy,
                             "load_average_after": os.getloadavg()})
            if gguf:
                runs[-2]["ratio_vs_llama_server"] = runs[-2]["aggregate_tok_s"] / runs[-1]["aggregate_tok_s"]
    return {"machine": info, "llama_server": version and {"dir": str(llama_cpp), "version": version},
            "prompt": prompt, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.splitlines()[0])
    p.add_argument("--llama-cpp", type=Path,
                   help="a llama.cpp checkout with build/bin/llama-server (none: MiniGPT alone)")
    p.add_argument("--clients", default="1,2,4,8,16", help="client counts, comma-separated")
    p.add_argument("--precisions", default="float32,int8", help=f"comma-separated, of {','.join(GGUF_TYPE)}")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="compute threads of each server")
    p.add_argument("--sampling", choices=SAMPLING, default="greedy",
                   help="greedy, or the chat's default sampling (temperature 0.7, top-k 40, top-p 0.95)")
    p.add_argument("--rounds", type=int, default=2,
                   help=f"measured rounds per configuration (more with few clients: {MIN_STREAMS} streams at least)")
    p.add_argument("--max-load", type=float, default=1.5, help="wait while the 1-minute load is above this")
    p.add_argument("--max-busy", type=float, default=25,
                   help="before each configuration, wait while other work keeps the CPUs more busy than this (%%)")
    p.add_argument("--app", type=Path, default=ROOT / "app.py", help="the app.py to serve (e.g. a clean worktree's)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: bench/results/serving-<date>.json)")
    args = p.parse_args(argv)
    try:
        args.clients = [int(n) for n in args.clients.split(",")]
    except ValueError:
        p.error(f"--clients must be whole numbers, comma-separated, got {args.clients!r}")
    args.precisions = args.precisions.split(",")
    if bad := [x for x in args.precisions if x not in GGUF_TYPE]:
        p.error(f"unknown precision {bad[0]!r} (choose from {', '.join(GGUF_TYPE)})")
    if not args.app.is_file():
        p.error(f"--app: no file {args.app}")
    if min(args.clients) < 1 or args.rounds < 1 or args.new_tokens < 2 or args.prompt_tokens < 1:
        p.error("--clients, --rounds and --prompt-tokens must be at least 1, --new-tokens at least 2")

    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))  # the checkpoint, GGUF files and server logs
    try:
        result = run(args, work)
    except (Failure, Exception, KeyboardInterrupt) as e:
        for path in work.iterdir():  # the server logs stay for the error message to point at
            if path.suffix != ".log":
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        if not any(work.iterdir()):
            work.rmdir()
        message = str(e) if isinstance(e, Failure) else "interrupted" if isinstance(e, KeyboardInterrupt) \
            else f"{type(e).__name__}: {e}" + (f" (server logs in {work})" if work.exists() else "")
        print(f"error: {message}", file=sys.stderr)
        return 2
    shutil.rmtree(work)

    print(f"\n{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, {args.sampling}, {args.threads} threads")
    print(table(result["runs"]))
    for line in checks(result["runs"]):
        print(line)
    for r in result["runs"]:
        if r["prompt_tokens"] != [args.prompt_tokens]:
            print(f"note: {r['engine']} {r['precision']} at {r['clients']} clients counted {r['prompt_tokens']} "
                  f"prompt tokens, not {args.prompt_tokens}")
    stamp = datetime.now(timezone.utc)
    out = args.out or ROOT / "bench" / "results" / f"serving-{stamp:%Y%m%d-%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": stamp.isoformat(timespec="seconds"),
        "command": " ".join(["python", "-m", "bench.serving", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {"model": "random gpt2 124M", "clients": args.clients, "precisions": args.precisions,
                     "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "threads": args.threads,
                     "rounds": args.rounds, "min_streams": MIN_STREAMS, "app": str(args.app),
                     "sampling": SAMPLING[args.sampling]},
        **result, "checks": checks(result["runs"]),
    }, indent=2))
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
