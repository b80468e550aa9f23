"""Issue 23, server side: field types and ranges at the door (and a fuzz over the body fields), one request's
failure never fails another, a body size cap, tokenizing off the event loop, constant-time API key.

Same in-process server and tiny model as ``test_serve.py``; every request loop is bounded."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import httpx
import pytest

from quantbench.serve.generate import Generator, SamplingParams, Sequence
from test_serve import _Server
from tinyqwen import real_tokenizer, tiny_qwen

MODEL = "tiny-qwen"


@pytest.fixture(scope="module")
def generator():
    return Generator(tiny_qwen(spread=0.5), real_tokenizer())


def _start(generator, **settings):
    from quantbench.serve.server import ServeSettings, create_app

    return _Server(
        create_app(generator, ServeSettings(MODEL, max_batch=16, max_prompt_tokens=200, **settings))
    )


@pytest.fixture(scope="module")
def server(generator):
    srv = _start(generator)
    yield srv
    srv.stop()


def _post(server, path, body, **kw):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        server.url + path, content=content, headers={"content-type": "application/json"}, timeout=60, **kw
    )


def _assert_openai_error(resp, status, param=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert param in (err["param"], err["code"]), err


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", 2**80),
        ("seed", -1),
        ("max_tokens", True),
        ("max_tokens", "5"),
        ("max_tokens", 2.0),
        ("n", True),
        ("temperature", True),
        ("temperature", "0.5"),
        ("stream", 1),
        ("top_k", 1.5),
        ("stop", [1]),
    ],
)
def test_field_types_and_ranges_are_checked_at_the_door(server, field, value):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, field: value}
    _assert_openai_error(_post(server, "/v1/completions", body), 400, field)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value}
    _assert_openai_error(_post(server, "/v1/chat/completions", chat), 400, field)


def test_nan_and_infinity_literals_are_not_json(server):
    for literal in (b"NaN", b"Infinity", b"-Infinity"):
        raw = b'{"model": "%s", "prompt": "hi", "temperature": %s}' % (MODEL.encode(), literal)
        _assert_openai_error(_post(server, "/v1/completions", raw), 400)


def test_largest_seed_with_several_choices_works(server):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "seed": 2**63 - 1, "n": 3, "temperature": 1.0}
    resp = _post(server, "/v1/completions", body)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["choices"]) == 3


def test_a_request_that_breaks_generation_fails_alone(generator, monkeypatch):
    """The prompt pass fails on any batch holding the poisoned request: it gets its error, the two others
    their text (prefilled again without it when they shared its batch; ``test_scheduler`` checks that
    retry deterministically)."""
    from quantbench.serve.server import Job, Worker

    slots = generator.scheduler.slots
    prefill = slots.prefill

    def flaky(prompts, pads, where):
        if any(int(p[0]) == 7 for p in prompts):
            raise OverflowError("Overflow when unpacking long long")
        return prefill(prompts, pads, where)

    monkeypatch.setattr(slots, "prefill", flaky)
    worker = Worker(generator, max_queue=8, max_batch=16)
    loop = asyncio.new_event_loop()
    try:
        jobs = []
        for first, seed in ((1, None), (7, None), (2, None), (3, 2**80)):
            job = Job(seqs=[Sequence([first, 5, 6], SamplingParams(max_new_tokens=2, seed=seed))], loop=loop)
            job.done = loop.create_future()
            seq = job.seqs[0]
            seq.on_finish = lambda _s, job=job: job.seq_done(0)
            seq.is_cancelled = lambda job=job: job.cancelled
            jobs.append(job)
        for job in jobs:
            worker.submit(job)
        done = asyncio.wait_for(asyncio.gather(*(job.done for job in jobs)), 120)
        results = loop.run_until_complete(done)
    finally:
        worker.close()
        loop.close()
    assert results[0] is None and results[2] is None, results
    assert isinstance(results[1], OverflowError)
    assert "seed" in str(results[3])  # refused before it reached the loop
    assert all(len(j.seqs[0].token_ids) == 2 for j in (jobs[0], jobs[2]))


def test_concurrent_requests_with_a_bad_seed_do_not_fail_the_others(server):
    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            good = {"model": MODEL, "prompt": "x", "max_tokens": 3, "temperature": 0.5, "seed": 1}
            bad = {**good, "seed": 2**80}
            reqs = [client.post("/v1/completions", json=bad if i % 4 == 0 else good) for i in range(12)]
            return await asyncio.wait_for(asyncio.gather(*reqs), 120)

    codes = [r.status_code for r in asyncio.run(burst())]
    assert codes.count(400) == 3 and codes.count(200) == 9, codes


def test_body_size_is_capped_with_413(server, generator):
    big = {"model": MODEL, "prompt": "a" * (5 * 2**20), "max_tokens": 1}  # over the 4 MiB default
    _assert_openai_error(_post(server, "/v1/completions", big), 413, "request_too_large")
    srv = _start(generator, max_body_bytes=64 * 1024)  # configurable (serve --max-body-bytes)

    def chunks():  # no Content-Length: the cap holds while streaming the body in
        yield b'{"model": "tiny-qwen", "prompt": "'
        for _ in range(100):
            yield b"a" * 1024
        yield b'"}'

    try:
        resp = httpx.post(srv.url + "/v1/completions", content=chunks(), timeout=60)
        _assert_openai_error(resp, 413)
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
    finally:
        srv.stop()


def test_tokenizing_runs_off_the_event_loop(generator, monkeypatch):
    """While one request's prompt is being tokenized (held here by an event), /health still answers."""
    srv = _start(generator)
    entered, release = threading.Event(), threading.Event()
    encode = generator.encode

    def slow_encode(text):
        if text == "hold me":
            entered.set()
            release.wait(30)
        return encode(text)

    monkeypatch.setattr(generator, "encode", slow_encode)
    result = {}

    def request():
        body = {"model": MODEL, "prompt": "hold me", "max_tokens": 1}
        result["resp"] = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)

    thread = threading.Thread(target=request)
    thread.start()
    try:
        assert entered.wait(30)
        t0 = time.perf_counter()
        health = httpx.get(srv.url + "/health", timeout=5)  # raises ReadTimeout if the loop is blocked
        assert health.status_code == 200 and time.perf_counter() - t0 < 5
    finally:
        release.set()
        thread.join(60)
        srv.stop()
    assert result["resp"].status_code == 200


def test_api_key_is_compared_in_constant_time(generator, monkeypatch):
    import hmac

    import quantbench.serve.server as server_mod

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(server_mod.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    srv = _start(generator, api_key="s3cret")
    try:
        url = srv.url + "/v1/models"
        assert httpx.get(url, timeout=10).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer s3cre"}, timeout=10).status_code == 401
        assert httpx.get(url, headers={"Authorization": b"Bearer \xff\xfe"}, timeout=10).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer s3cret"}, timeout=10).status_code == 200
    finally:
        srv.stop()
    assert len(calls) >= 4


def test_serve_reads_the_api_key_from_the_environment(monkeypatch):
    import quantbench.cli.serve_cmds as serve_cmds
    from quantbench.cli import main

    seen = {}

    def fake_load(*_args, **_kwargs):
        class G:
            context_length = 512

        return G()

    monkeypatch.setattr(serve_cmds, "_load", fake_load)
    monkeypatch.setattr(
        "quantbench.serve.server.serve", lambda _gen, settings, **_kw: seen.update(key=settings.api_key)
    )
    monkeypatch.setenv("QUANTBENCH_API_KEY", "from-env")
    main(["serve", "x", "--port", "8123"])
    assert seen["key"] == "from-env"


# ---------------------------------------------------------------------------------------------------------
# Fuzz over the body fields: any value in any field ends in 200 or a 4xx OpenAI error, never a 500

VALUES = [
    None, True, False, 0, 1, -1, 2, 3, 2**31, 2**63, 2**80, -(2**70), 0.0, 0.5, 1.0, 2.5, -0.1, 1e308, "", "x",
    "5", "\ud800", "\x00", "tiny-qwen", [], [1], [1, 2], [[1, 2]], [True], [10**12], [-1], ["a", "b"],
    [{"role": "user", "content": "hi"}], [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    [{"role": "user"}], [{"role": 5, "content": "x"}], {}, {"include_usage": True}, {"a": [1, {"b": None}]},
]  # fmt: skip
FIELDS = [
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
    "stream", "stream_options", "stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias", "user",
    "ignore_eos", "echo", "logprobs", "best_of", "suffix", "tools", "response_format", "top_logprobs",
]  # fmt: skip


def test_fuzz_request_body_fields(server):
    rng = random.Random(2323)
    base_completion = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    base_chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    seen: dict[int, int] = {}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for _ in range(250):
            path, base = rng.choice(
                [("/v1/completions", base_completion), ("/v1/chat/completions", base_chat)]
            )
            body = dict(base)
            for field in rng.sample(FIELDS, rng.randint(1, 3)):
                body[field] = rng.choice(VALUES)
            if body.get("max_tokens") not in (None, 1, 2, 3) and rng.random() < 0.7:
                body["max_tokens"] = 2  # keep most valid ones cheap
            raw = json.dumps(body).encode("utf-8", "surrogatepass")
            resp = client.post(path, content=raw, headers={"content-type": "application/json"})
            seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
            assert resp.status_code in (200, 400, 404, 413), (body, resp.status_code, resp.text[:300])
            if resp.status_code != 200:
                _assert_openai_error(resp, resp.status_code)
            elif body.get("stream") is True:
                assert resp.text.rstrip().endswith("data: [DONE]")
                assert '"error"' not in resp.text, (body, resp.text[-300:])
    assert seen.get(200, 0) > 10 and seen.get(400, 0) > 100, seen
    assert client is not None and httpx.get(server.url + "/health", timeout=10).json()["errors"] == 0
