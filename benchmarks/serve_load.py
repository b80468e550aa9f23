"""Load test of ``quantbench serve``: concurrent OpenAI requests against an in-process server on 127.0.0.1.

Streams (continuous batching): for each N of ``--streams``, N clients each keep one streaming completion in
flight (``--prompt-tokens`` random token ids, ``--max-tokens`` new tokens, ``ignore_eos``), ``--rounds``
requests back to back, after one shorter unmeasured round at N (CUDA-graph capture). Per N: aggregate
generated tokens/s (all tokens / the level's wall time), time to first token p50 / p99, inter-token latency
p50 / p99 (gaps between streamed chunks; a chunk can carry more than one token when a character spans
tokens), time per output token p50. Prints a table, writes JSON. The clients run in a separate process, so
their Python does not compete with the server's for the interpreter lock.

Target: aggregate tokens/s at 64 streams >= 10x one stream (a decode step reads the weights once for the
whole batch).

    python benchmarks/serve_load.py --streams 1,2 --max-tokens 8 --prompt-tokens 16       # CPU smoke, tiny model
    python benchmarks/serve_load.py --streams 1,2 --max-tokens 8 --prompt-tokens 16 --backend engine
    python benchmarks/serve_load.py --model random:qwen2.5-7b --device cuda --streams 1,8,32,64 \\
        --max-tokens 256 --json serve-7b.json                                  # Qwen2.5-7B shapes, random bf16
    python benchmarks/serve_load.py --model random:qwen2.5-7b --method int4:group=128 --device cuda ...

Burst (``--requests N`` without ``--streams``): N requests at once (half streaming chats, half plain
completions), bounded by ``--timeout``: answered / refused (503) / failed counts, latency percentiles,
tokens per second, the server's prompt batches.

``--model``: ``tiny`` (2-layer random Qwen2.5 with the real tokenizer, the default), ``random:ARCH`` (random
weights of a real architecture built straight on ``--device``, e.g. ``random:qwen2.5-7b``, with the
tokenizer of ``--tokenizer DIR``, default the packaged Qwen model's) or any quantbench model spec.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def build_generator(args, max_batch: int):
    from quantbench.serve.generate import Generator, load_for_serving

    if args.model == "tiny":
        from tinyqwen import real_tokenizer, tiny_qwen

        model = tiny_qwen(spread=0.5)
        if args.device:
            model = model.to(args.device)
        return Generator(model, real_tokenizer(), backend=args.backend, max_batch=max_batch)
    model, tokenizer = load_for_serving(args.model, args.method, args.device)
    if tokenizer is None or args.tokenizer:
        from transformers import AutoTokenizer

        import quantbench
        from quantbench.models import resolve_model_dir

        where = args.tokenizer or str(resolve_model_dir(quantbench.DEFAULT_MODEL))
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True)
    return Generator(model, tokenizer, backend=args.backend, max_batch=max_batch)


def start_server(app):
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, server.servers[0].sockets[0].getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


# ---------------------------------------------------------------------------------------------------------
# Streams mode (the client side runs in a child process)


async def _stream_clients(url: str, name: str, streams: int, rounds: int, max_tokens: int, prompts) -> list:
    import httpx

    async def one(client, prompt) -> dict:
        body = {
            "model": name,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        t0 = time.perf_counter()
        chunks, tokens = [], 0
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            status = resp.status_code
            async for line in resp.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices") or [{}]
                if choices[0].get("text"):
                    chunks.append(time.perf_counter())
        return {"status": status, "start": t0, "end": time.perf_counter(), "chunks": chunks, "tokens": tokens}

    async def stream(client, i: int) -> list[dict]:
        return [await one(client, prompts[(i * rounds + r) % len(prompts)]) for r in range(rounds)]

    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=None) as client:
        per_stream = await asyncio.gather(*(stream(client, i) for i in range(streams)))
    return [r for results in per_stream for r in results]


def _client_process(url, name, streams, rounds, max_tokens, prompts, out) -> None:
    out.put(asyncio.run(_stream_clients(url, name, streams, rounds, max_tokens, prompts)))


def run_level(ctx, url: str, streams: int, rounds: int, max_tokens: int, prompts, timeout: float) -> list:
    results = ctx.Queue()
    proc = ctx.Process(
        target=_client_process, args=(url, "bench", streams, rounds, max_tokens, prompts, results)
    )
    proc.start()
    try:
        return results.get(timeout=timeout)
    finally:
        proc.join(30)


def summarize(streams: int, records: list[dict]) -> dict:
    ok = [r for r in records if r["status"] == 200 and r["chunks"]]
    wall = max(r["end"] for r in records) - min(r["start"] for r in records)
    tokens = sum(r["tokens"] for r in ok)
    ttft = [(r["chunks"][0] - r["start"]) * 1e3 for r in ok]
    gaps = [(b - a) * 1e3 for r in ok for a, b in zip(r["chunks"], r["chunks"][1:], strict=False)]
    tpot = [(r["chunks"][-1] - r["chunks"][0]) * 1e3 / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]

    def rounded(v):
        return None if v is None else round(v, 2)

    return {
        "streams": streams,
        "requests": len(records),
        "failed": len(records) - len(ok),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
        "ttft_p50_ms": rounded(percentile(ttft, 50)),
        "ttft_p99_ms": rounded(percentile(ttft, 99)),
        "itl_p50_ms": rounded(percentile(gaps, 50)),
        "itl_p99_ms": rounded(percentile(gaps, 99)),
        "tpot_p50_ms": rounded(percentile(tpot, 50)),
    }


def streams_mode(args, generator, url: str) -> dict:
    ctx = multiprocessing.get_context("spawn")
    vocab = min(generator.model.config.vocab_size, len(generator.tokenizer))
    rng = random.Random(0)
    levels = []
    for n in args.streams:
        prompts = [
            [rng.randrange(100, vocab) for _ in range(args.prompt_tokens)] for _ in range(n * args.rounds)
        ]
        run_level(ctx, url, n, 1, min(16, args.max_tokens), prompts, args.timeout)  # warm-up (graph capture)
        records = run_level(ctx, url, n, args.rounds, args.max_tokens, prompts, args.timeout)
        levels.append(summarize(n, records))
        print(json.dumps(levels[-1]), flush=True)
    by_n = {lv["streams"]: lv["tokens_per_s"] for lv in levels}
    speedup = None
    if 1 in by_n and max(by_n) > 1 and by_n[1]:
        speedup = round(by_n[max(by_n)] / by_n[1], 2)
    return {"levels": levels, f"speedup_{max(by_n)}_vs_1": speedup}


def print_table(levels: list[dict]) -> None:
    cols = [("streams", "streams"), ("tokens_per_s", "tok/s"), ("ttft_p50_ms", "TTFT p50 ms"),
            ("ttft_p99_ms", "TTFT p99 ms"), ("itl_p50_ms", "ITL p50 ms"), ("itl_p99_ms", "ITL p99 ms"),
            ("tpot_p50_ms", "TPOT p50 ms"), ("failed", "failed")]  # fmt: skip
    print("  ".join(f"{title:>12}" for _, title in cols))
    for lv in levels:
        print("  ".join(f"{'-' if lv[key] is None else lv[key]:>12}" for key, _ in cols))


# ---------------------------------------------------------------------------------------------------------
# Burst mode


async def burst(url: str, name: str, n: int, max_tokens: int, timeout: float) -> list[dict]:
    import httpx

    async def one(client, i):
        t0 = time.perf_counter()
        first = None
        if i % 2:
            body = {"model": name, "prompt": f"Request {i}. Write a haiku about", "max_tokens": max_tokens}
            resp = await client.post("/v1/completions", json=body)
            tokens = resp.json()["usage"]["completion_tokens"] if resp.status_code == 200 else 0
        else:
            body = {
                "model": name,
                "messages": [{"role": "user", "content": f"Request {i}: say something short."}],
                "max_tokens": max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            tokens = 0
            async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                async for line in resp.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    choices = chunk.get("choices") or [{}]
                    if first is None and choices[0].get("delta", {}).get("content"):
                        first = time.perf_counter() - t0  # first generated text, not the role chunk
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
        return {
            "status": resp.status_code,
            "seconds": time.perf_counter() - t0,
            "first": first,
            "tokens": tokens,
        }

    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(n))), timeout)


def burst_mode(args, url: str) -> dict:
    import httpx

    t0 = time.perf_counter()
    results = asyncio.run(burst(url, "bench", args.requests, args.max_tokens, args.timeout))
    wall = time.perf_counter() - t0
    health = httpx.get(url + "/health", timeout=10)
    ok = [r for r in results if r["status"] == 200]
    refused = sum(r["status"] == 503 for r in results)
    lat = sorted(r["seconds"] for r in ok)
    firsts = sorted(r["first"] for r in ok if r["first"] is not None)
    tokens = sum(r["tokens"] for r in ok)
    return {
        "requests": args.requests,
        "answered": len(ok),
        "refused_503": refused,
        "failed": len(results) - len(ok) - refused,
        "wall_s": round(wall, 2),
        "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
        "latency_max_s": round(lat[-1], 3) if lat else None,
        "stream_first_text_p50_s": round(statistics.median(firsts), 3) if firsts else None,
        "generated_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "batches": health.json().get("batches"),
        "healthy_after": health.status_code == 200 and health.json().get("pending") == 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny', random:ARCH or any quantbench model spec")
    parser.add_argument("--method", default=None, help="quantize on the fly with this spec")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (random:ARCH models)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--backend", default="auto", help="auto (the engine on CUDA), hf or engine")
    parser.add_argument("--streams", default=None, help="concurrent streams per level, e.g. 1,8,32,64")
    parser.add_argument("--rounds", type=int, default=2, help="requests per stream per level (streams mode)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (streams mode)")
    parser.add_argument("--requests", type=int, default=200, help="burst mode: requests at once")
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="new tokens (default: 128 streams, 4 burst)"
    )
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument(
        "--max-batch", type=int, default=None, help="default: the largest stream count, or 32"
    )
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.streams is not None:
        try:
            args.streams = sorted({int(v) for v in args.streams.split(",") if v.strip()})
        except ValueError:
            parser.error("--streams takes integers, e.g. 1,8,32,64")
        if not args.streams or not all(1 <= n <= 256 for n in args.streams):
            parser.error("--streams values must be in 1..256")
    elif not 1 <= args.requests <= 1000:
        parser.error("--requests must be in 1..1000")
    if args.max_tokens is None:
        args.max_tokens = 128 if args.streams else 4
    max_batch = args.max_batch or (max(args.streams) if args.streams else 32)

    from quantbench.serve.server import ServeSettings, create_app

    generator = build_generator(args, max_batch)
    settings = ServeSettings("bench", max_queue=max(args.max_queue, max_batch), max_batch=max_batch)
    server, thread, port = start_server(create_app(generator, settings))
    url = f"http://127.0.0.1:{port}"
    try:
        result = streams_mode(args, generator, url) if args.streams else burst_mode(args, url)
    finally:
        server.should_exit = True
        thread.join(10)
    summary = {
        "model": args.model,
        "method": args.method,
        "device": str(generator.device),
        "path": generator.path,
        "max_batch": max_batch,
        "max_tokens": args.max_tokens,
        **({"prompt_tokens": args.prompt_tokens, "rounds": args.rounds} if args.streams else {}),
        **result,
    }
    if args.streams:
        print(
            f"\n{generator.path}; prompt {args.prompt_tokens} tokens, {args.max_tokens} new, {args.rounds} rounds"
        )
        print_table(result["levels"])
        speed = next(k for k in result if k.startswith("speedup"))
        print(f"{speed}: {result[speed]}")
    else:
        width = max(len(k) for k in summary)
        for key, value in summary.items():
            print(f"{key:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
