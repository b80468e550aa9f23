"""Load test of ``quantbench serve``: N concurrent OpenAI requests against an in-process server on 127.0.0.1.

    python benchmarks/serve_load.py                          # tiny random Qwen2.5 (real tokenizer), 200 requests
    python benchmarks/serve_load.py --model qwen2.5-coder-0.5b --requests 16 --max-queue 64
    python benchmarks/serve_load.py --method nf4:block=64,dq=1 --model qwen2.5-coder-0.5b --device cuda

Half the requests are streaming chat completions, half plain completions; all are sent at once (bounded by
``--requests``, with a ``--timeout`` on the whole burst). Prints answered / refused (503) / failed counts, the
wall time, latency percentiles, generated tokens per second and the server's batch count; writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def build_generator(args):
    from quantbench.serve.generate import Generator, load_for_serving

    if args.model == "tiny":
        from tinyqwen import real_tokenizer, tiny_qwen

        return Generator(tiny_qwen(spread=0.5), real_tokenizer())
    model, tokenizer = load_for_serving(args.model, args.method, args.device)
    return Generator(model, tokenizer)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="tiny", help="'tiny' (random, 2 layers) or any quantbench model spec"
    )
    parser.add_argument("--method", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not 1 <= args.requests <= 1000:
        parser.error("--requests must be in 1..1000")

    import httpx

    from quantbench.serve.server import ServeSettings, create_app

    generator = build_generator(args)
    settings = ServeSettings("bench", max_queue=args.max_queue, max_batch=args.max_batch)
    server, thread, port = start_server(create_app(generator, settings))
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.perf_counter()
        results = asyncio.run(burst(url, "bench", args.requests, args.max_tokens, args.timeout))
        wall = time.perf_counter() - t0
        health = httpx.get(url + "/health", timeout=10)
    finally:
        server.should_exit = True
        thread.join(10)
    ok = [r for r in results if r["status"] == 200]
    refused = sum(r["status"] == 503 for r in results)
    lat = sorted(r["seconds"] for r in ok)
    firsts = sorted(r["first"] for r in ok if r["first"] is not None)
    tokens = sum(r["tokens"] for r in ok)
    summary = {
        "model": args.model,
        "method": args.method,
        "path": generator.path,
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
        "max_queue": args.max_queue,
        "max_batch": args.max_batch,
        "max_tokens": args.max_tokens,
    }
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
