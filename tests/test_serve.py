"""Generation and the OpenAI-compatible server: the official ``openai`` client (completions, chat, streaming
chat), a bounded 200-request load test, malformed bodies, unknown models, over-long prompts.

The server runs in-process (uvicorn in a thread) on a free 127.0.0.1 port, serving a 2-layer random-weight
model of the real Qwen2.5-0.5B architecture with the real model's tokenizer.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from quantbench.serve.generate import Detokenizer, Generator, SamplingParams, Sequence
from tinyqwen import real_tokenizer, tiny_qwen

MODEL_NAME = "tiny-qwen"


@pytest.fixture(scope="module")
def tokenizer():
    return real_tokenizer()


@pytest.fixture(scope="module")
def generator(tokenizer):
    return Generator(tiny_qwen(spread=0.5), tokenizer)


class _Server:
    def __init__(self, app) -> None:
        import uvicorn

        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def server(generator):
    from quantbench.serve.server import ServeSettings, create_app

    settings = ServeSettings(MODEL_NAME, max_queue=32, max_batch=8, max_prompt_tokens=200)
    srv = _Server(create_app(generator, settings))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


# ---------------------------------------------------------------------------------------------------------
# Generator


def test_detokenizer_streams_stable_text_and_cuts_at_stop(tokenizer):
    text = "héllo wörld — ünïcode ✓ and then STOP here"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = Detokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)

    detok = Detokenizer(tokenizer, stop=("STOP",))
    out = ""
    for i in ids:
        out += detok.push(i)
        assert "ST" not in out  # a stop-string prefix is never shown
        if detok.stopped:
            break
    out += detok.flush()
    assert out == "héllo wörld — ünïcode ✓ and then "


@pytest.mark.parametrize("model_name", ["qwen2.5-coder-0.5b", "gemma3-270m"])
def test_incremental_detokenizer_gives_the_full_decode(model_name):
    """Byte-level BPE (Qwen) and SentencePiece with byte fallback (Gemma): the pieces, each decoded from a
    few tokens, join into the decode of the whole sequence, for text and for random token ids."""
    import random

    from transformers import AutoTokenizer

    from quantbench.models import resolve_model_dir

    tok = AutoTokenizer.from_pretrained(str(resolve_model_dir(model_name)), local_files_only=True)
    texts = ["  leading spaces\n\ttabs, 中文字符 and emoji 🎉🎉 ok", "def f(x):\n    return x  # ✓ — ü"]
    rng = random.Random(0)
    cases = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    cases += [[rng.randrange(len(tok)) for _ in range(60)] for _ in range(20)]
    for ids in cases:
        detok = Detokenizer(tok)
        pieces = [detok.push(i) for i in ids] + [detok.flush()]
        full = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).rstrip("\ufffd")
        assert "".join(pieces) == detok.text == full


def test_batched_greedy_equals_single_and_seeded_sampling_is_batch_independent(generator):
    prompts = ["def fib(n):", "The capital of France is", "1, 2, 3,"]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    singles = [generator.generate(p, params).token_ids for p in prompts]
    batch = generator.run([Sequence(generator.encode(p), params) for p in prompts])
    assert [s.token_ids for s in batch] == singles
    assert all(s.finish_reason == "length" and len(s.token_ids) == 6 for s in batch)

    sampled = SamplingParams(max_new_tokens=6, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)
    alone = generator.generate(prompts[0], sampled).token_ids
    mixed = generator.run(
        [Sequence(generator.encode(prompts[1]), params), Sequence(generator.encode(prompts[0]), sampled)]
    )
    assert mixed[1].token_ids == alone
    assert generator.generate(prompts[0], sampled).token_ids == alone


def test_streamed_pieces_equal_the_final_text(generator):
    pieces: list[str] = []
    seq = generator.generate("Hello", SamplingParams(max_new_tokens=8, ignore_eos=True), pieces.append)
    assert "".join(pieces) == seq.text
    assert seq.text == generator.tokenizer.decode(seq.token_ids, skip_special_tokens=True)


def test_engine_backend_matches_hf_on_cpu(tokenizer):
    """The engine path (used on CUDA) gives the same greedy tokens as the HF path on CPU reference ops."""
    pytest.importorskip("quantbench.engine.model")
    hf = Generator(tiny_qwen(seed=1), tokenizer, backend="hf")
    eng = Generator(tiny_qwen(seed=1), tokenizer, backend="engine")
    assert eng.backend == "engine", eng.path
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    prompts = ["a b c", "one two three four five"]
    a = hf.run([Sequence(hf.encode(p), params) for p in prompts])
    b = eng.run([Sequence(eng.encode(p), params) for p in prompts])
    assert [s.token_ids for s in a] == [s.token_ids for s in b]


# ---------------------------------------------------------------------------------------------------------
# Server through the official openai client


def test_openai_client_completions(client, generator):
    out = client.completions.create(model=MODEL_NAME, prompt="def add(a, b):", max_tokens=6, temperature=0)
    expected = generator.generate("def add(a, b):", SamplingParams(max_new_tokens=6))
    assert out.choices[0].text == expected.text
    assert out.usage.prompt_tokens == len(generator.encode("def add(a, b):"))
    assert out.usage.completion_tokens == len(expected.token_ids)
    assert out.choices[0].finish_reason in ("length", "stop")
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


def test_openai_client_chat_and_streaming_chat(client, generator):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
    full = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0)
    expected = generator.run([Sequence(generator.encode_chat(messages), SamplingParams(max_new_tokens=8))])[0]
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].message.content == expected.text

    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert "".join(pieces) == expected.text
    assert finish in ("length", "stop")
    assert usage is not None and usage.completion_tokens == len(expected.token_ids)


def test_sse_wire_format_ends_with_done(server):
    import httpx

    body = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 3, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_client_that_goes_away_mid_stream_stops_its_generation(server):
    import httpx

    def stats() -> dict:
        return httpx.get(server.url + "/health", timeout=10).json()

    tokens_before = stats()["tokens"]
    body = {"model": MODEL_NAME, "prompt": "go", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as resp:
        lines = resp.iter_lines()
        assert next(line for line in lines if line).startswith("data: {")
    deadline = time.time() + 30
    while stats()["pending"]:
        assert time.time() < deadline
        time.sleep(0.05)
    assert stats()["tokens"] - tokens_before < 400  # stopped early, not run to max_tokens


@pytest.mark.parametrize(
    ("path", "body", "status", "code_or_param"),
    [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", b"[1, 2]", 400, None),
        ("/v1/completions", {"model": MODEL_NAME}, 400, "prompt"),
        ("/v1/completions", {"prompt": "hi"}, 400, "model"),
        ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
        ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"model": MODEL_NAME, "prompt": [], "max_tokens": 2}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL_NAME, "prompt": [10**9], "max_tokens": 2}, 400, "prompt"),
        ("/v1/chat/completions", {"model": MODEL_NAME}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": MODEL_NAME, "messages": [{"role": "wizard", "content": "x"}]},
            400,
            None,
        ),
        ("/v1/chat/completions", {"model": MODEL_NAME, "messages": "hello"}, 400, "messages"),
        ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model_not_found"),
        (
            "/v1/chat/completions",
            {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]},
            404,
            None,
        ),
        ("/v1/completions", {"model": MODEL_NAME, "prompt": "word " * 300}, 400, "context_length_exceeded"),
        (
            "/v1/completions",
            {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 600},
            400,
            "context_length_exceeded",
        ),
        ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "logprobs": 3}, 400, "logprobs"),
    ],
)
def test_bad_requests_get_openai_style_errors(server, path, body, status, code_or_param):
    import httpx

    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.post(
        server.url + path, content=content, headers={"content-type": "application/json"}, timeout=30
    )
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code_or_param is not None:
        assert code_or_param in (err["code"], err["param"])


def test_unknown_route_and_model_lookup(server):
    import httpx

    assert httpx.get(server.url + "/v1/nothing", timeout=10).status_code == 404
    assert httpx.get(server.url + f"/v1/models/{MODEL_NAME}", timeout=10).json()["id"] == MODEL_NAME
    assert httpx.get(server.url + "/v1/models/other", timeout=10).status_code == 404


@pytest.mark.parametrize("max_queue", [32, pytest.param(256, marks=pytest.mark.slow)])
def test_200_concurrent_requests_are_answered_or_cleanly_refused(generator, max_queue):
    """A bounded burst: 200 requests at once (half of them streaming chat) against a queue of 32 (most are
    refused) and of 256 (all fit). Every request is answered (200 with a complete body) or refused with 503
    and an OpenAI error; afterwards the server is healthy, idle and still answers."""
    import httpx

    from quantbench.serve.server import ServeSettings, create_app

    n_requests = 200
    srv = _Server(create_app(generator, ServeSettings(MODEL_NAME, max_queue=max_queue, max_batch=32)))

    async def one(client: httpx.AsyncClient, i: int) -> int:
        if i % 2:
            body = {"model": MODEL_NAME, "prompt": f"request {i}:", "max_tokens": 4, "temperature": 0}
            resp = await client.post("/v1/completions", json=body)
            if resp.status_code == 200:
                assert resp.json()["choices"][0]["finish_reason"] in ("length", "stop")
        else:
            body = {
                "model": MODEL_NAME,
                "messages": [{"role": "user", "content": f"request {i}"}],
                "max_tokens": 4,
                "stream": True,
            }
            async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                text = (await resp.aread()).decode()
            if resp.status_code == 200:
                assert text.rstrip().endswith("data: [DONE]")
        if resp.status_code == 503:
            assert resp.json()["error"]["code"] == "queue_full"
        return resp.status_code

    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=n_requests, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=srv.url, limits=limits, timeout=120) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(n_requests))), 180)

    try:
        t0 = time.perf_counter()
        codes = asyncio.run(burst())
        wall = time.perf_counter() - t0
        ok, refused = codes.count(200), codes.count(503)
        health = httpx.get(srv.url + "/health", timeout=10)
        stats = health.json()
        print(
            f"\nload test, queue {max_queue}: {n_requests} requests in {wall:.1f}s: {ok} answered, "
            f"{refused} refused (503); {stats['batches']} batches"
        )
        assert ok + refused == n_requests, sorted(set(codes))
        assert ok >= min(max_queue, n_requests)
        assert health.status_code == 200 and stats["status"] == "ok" and stats["pending"] == 0
        after = httpx.post(
            srv.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "still alive?", "max_tokens": 2}
        )
        assert after.status_code == 200
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------------------
# The commands


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tinyqwen import save_tiny_qwen

    return save_tiny_qwen(tmp_path_factory.mktemp("tiny") / "tiny-qwen")


def test_generate_and_chat_commands_stream_the_generator_output(tiny_dir, capsys, monkeypatch):
    import io

    import quantbench
    from quantbench.cli import main

    main(["generate", str(tiny_dir), "--prompt", "def add(a, b):", "-n", "6", "--no-stats"])
    out = capsys.readouterr().out
    model, tok = quantbench.load_model(str(tiny_dir), dtype="fp32")
    expected = Generator(model, tok).generate("def add(a, b):", SamplingParams(max_new_tokens=6)).text
    assert out == expected + ("" if expected.endswith("\n") else "\n")

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\nagain\n"))
    main(["chat", str(tiny_dir), "-n", "4", "--temperature", "0"])
    captured = capsys.readouterr()
    assert "conversation cleared" in captured.err
    replies = [line for line in captured.out.splitlines() if line]
    assert len(replies) >= 2  # one streamed reply per message


def test_serve_command_on_a_free_loopback_port(tiny_dir):
    """``quantbench serve`` as a subprocess: loopback bind, /health, a chat completion, then SIGTERM."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    entry = "import sys; from quantbench.cli import main; main(sys.argv[1:])"
    cmd = [sys.executable, "-c", entry, "serve", str(tiny_dir), "--port", str(port)]
    cmd += ["--model-name", "tiny", "--max-prompt-tokens", "100", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.3)
        openai = pytest.importorskip("openai")
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
        )
        assert reply.choices[0].message.role == "assistant"
        too_long = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "a " * 150})
        assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert "serving 'tiny' on http://127.0.0.1:" in out


@pytest.mark.slow
def test_real_model_greedy_matches_hf_generate(real_model_fp32):
    """The real Qwen2.5-Coder: greedy tokens of the Generator (alone and left-padded in a batch) equal
    ``model.generate``'s."""
    import torch

    model, tok = real_model_fp32
    gen = Generator(model, tok)
    prompts = [
        gen.encode_chat([{"role": "user", "content": "Write a Python function that adds two numbers."}]),
        gen.encode("def fibonacci(n):"),
    ]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    batch = gen.run([Sequence(p, params) for p in prompts])
    for ids, seq in zip(prompts, batch, strict=True):
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, min_new_tokens=8)
        assert seq.token_ids == out[0, len(ids) :].tolist()
