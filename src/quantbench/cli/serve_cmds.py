"""``quantbench generate``, ``quantbench chat`` and ``quantbench serve``."""

from __future__ import annotations

import sys
import time

import typer
from rich.console import Console

from quantbench.cli import app

err = Console(stderr=True, soft_wrap=True)

MODEL_HELP = "packaged model name, HF directory, .gguf file or quantbench checkpoint"
METHOD_HELP = "quantize on the fly with this spec (e.g. nf4:block=64,dq=1); not for checkpoints"
CALIB_HELP = (
    "calibration data for gptq/awq/smoothquant: corpus[:NxL] or a .txt/.jsonl file (default: kjv-calib)"
)


def _load(model: str, method: str | None, device: str | None, dtype: str, backend: str, calib: str | None):
    from quantbench.models import MODEL_ALIASES
    from quantbench.serve.generate import Generator, load_for_serving

    t0 = time.perf_counter()
    model_obj, tokenizer = load_for_serving(model, method, device, dtype, calib=calib)
    generator = Generator(model_obj, tokenizer, backend=backend)
    config = getattr(model_obj, "quantbench_config", None)
    quant = (
        config.spec if config is not None else str(next(model_obj.parameters()).dtype).replace("torch.", "")
    )
    name = MODEL_ALIASES.get(model, model)
    err.print(f"[dim]loaded {name} ({quant}) in {time.perf_counter() - t0:.1f}s; {generator.path}[/]")
    return generator


def _params(
    max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None, stop: list[str]
):
    from quantbench.serve.generate import SamplingParams

    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=tuple(stop or ()),
    )
    params.check()
    return params


def _stream(generator, ids: list[int], params) -> object:
    from quantbench.serve.generate import Sequence

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    seq = Sequence(ids, params, on_text=show)
    generator.run([seq])
    if not seq.text.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    return seq


def _stats(seq) -> str:
    n = len(seq.token_ids)
    rest = seq.total_s - seq.first_token_s
    rate = f", {(n - 1) / rest:.1f} tok/s after the first" if n > 1 and rest > 0 else ""
    return f"{n} tokens in {seq.total_s:.2f}s (first token {seq.first_token_s * 1e3:.0f} ms{rate}); stop: {seq.finish_reason}"


@app.command()
def generate(
    model: str = typer.Argument("default", help=MODEL_HELP),
    prompt: str = typer.Option(..., "--prompt", "-p", help="the prompt ('-' reads it from stdin)"),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the tokenizer's chat template"),
    system: str = typer.Option(None, "--system", help="system message (with --chat)"),
    method: str = typer.Option(None, "--method", "-m", help=METHOD_HELP),
    calib: str = typer.Option(None, "--calib", help=CALIB_HELP),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="tokens to generate at most"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy"),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling mass (with temperature > 0)"),
    top_k: int = typer.Option(0, "--top-k", help="sample from the k most likely tokens (0 = all)"),
    seed: int = typer.Option(None, "--seed", help="random seed for sampling"),
    stop: list[str] = typer.Option(None, "--stop", help="stop string (repeatable)"),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available)"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (fp32 on CPU, bf16 on CUDA), bf16, fp16, fp32"),
    backend: str = typer.Option("auto", "--backend", help="auto (engine on CUDA), hf or engine"),
    stats: bool = typer.Option(True, "--stats/--no-stats", help="print token count and speed on stderr"),
) -> None:
    """Continue PROMPT with MODEL, streaming the text to stdout."""
    params = _params(max_new_tokens, temperature, top_p, top_k, seed, stop)
    text = sys.stdin.read() if prompt == "-" else prompt
    generator = _load(model, method, device, dtype, backend, calib)
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": text}
        ]
        ids = generator.encode_chat(messages)
    else:
        ids = generator.encode(text)
    seq = _stream(generator, ids, params)
    if stats:
        err.print(f"[dim]{len(ids)} prompt tokens; {_stats(seq)}[/]")


@app.command()
def chat(
    model: str = typer.Argument("default", help=MODEL_HELP),
    system: str = typer.Option(None, "--system", help="system message"),
    method: str = typer.Option(None, "--method", "-m", help=METHOD_HELP),
    calib: str = typer.Option(None, "--calib", help=CALIB_HELP),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n", help="tokens per reply at most"),
    temperature: float = typer.Option(0.7, "--temperature", "-t", help="0 = greedy"),
    top_p: float = typer.Option(0.8, "--top-p", help="nucleus sampling mass"),
    top_k: int = typer.Option(20, "--top-k", help="sample from the k most likely tokens (0 = all)"),
    seed: int = typer.Option(None, "--seed", help="random seed for sampling"),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available)"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (fp32 on CPU, bf16 on CUDA), bf16, fp16, fp32"),
    backend: str = typer.Option("auto", "--backend", help="auto (engine on CUDA), hf or engine"),
    stats: bool = typer.Option(
        False, "--stats/--no-stats", help="print token count and speed after each reply"
    ),
) -> None:
    """Chat with MODEL in the terminal (its chat template; replies stream). /reset clears, /exit quits."""
    import dataclasses

    params = _params(max_new_tokens, temperature, top_p, top_k, seed, [])
    generator = _load(model, method, device, dtype, backend, calib)
    if not generator.has_chat_template:
        err.print("[yellow]the tokenizer has no chat template: using a plain 'role: text' one[/]")
    interactive = sys.stdin.isatty()
    history: list[dict[str, str]] = []
    turn = 0
    if interactive:
        err.print("[dim]type a message; /reset clears the conversation, /exit (or Ctrl-D) quits[/]")
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and line == "":
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history.clear()
            err.print("[dim](conversation cleared)[/]")
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        ids = generator.encode_chat(messages)
        if len(ids) + params.max_new_tokens > generator.context_length and len(history) > 1:
            history[:] = history[-1:]  # forget old turns rather than fail
            messages = ([{"role": "system", "content": system}] if system else []) + history
            ids = generator.encode_chat(messages)
        turn_params = params if params.seed is None else dataclasses.replace(params, seed=params.seed + turn)
        seq = _stream(generator, ids, turn_params)
        history.append({"role": "assistant", "content": seq.text})
        turn += 1
        if stats:
            err.print(f"[dim]{_stats(seq)}[/]")


@app.command()
def serve(
    model: str = typer.Argument("default", help=MODEL_HELP),
    port: int = typer.Option(8000, "--port", help="TCP port"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (default: loopback only)"),
    method: str = typer.Option(None, "--method", "-m", help=METHOD_HELP),
    calib: str = typer.Option(None, "--calib", help=CALIB_HELP),
    model_name: str = typer.Option(None, "--model-name", help="the model id clients send (default: MODEL)"),
    max_queue: int = typer.Option(
        64, "--max-queue", help="requests waiting or running at most; more get 503"
    ),
    max_batch: int = typer.Option(
        64, "--max-batch", help="sequences decoded together at most (requests join and leave between steps)"
    ),
    max_prompt_tokens: int = typer.Option(None, "--max-prompt-tokens", help="longer prompts get 400"),
    default_max_tokens: int = typer.Option(
        256, "--default-max-tokens", help="chat replies without max_tokens"
    ),
    api_key: str = typer.Option(
        None,
        "--api-key",
        envvar="QUANTBENCH_API_KEY",
        show_envvar=True,
        help="require this bearer token; prefer setting $QUANTBENCH_API_KEY (a flag is visible in ps)",
    ),
    max_body_bytes: int = typer.Option(
        4 * 2**20, "--max-body-bytes", help="larger request bodies are refused with 413"
    ),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available)"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (fp32 on CPU, bf16 on CUDA), bf16, fp16, fp32"),
    backend: str = typer.Option("auto", "--backend", help="auto (engine on CUDA), hf or engine"),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level"),
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models)."""
    from quantbench.serve.generate import GenerationError
    from quantbench.serve.server import ServeSettings
    from quantbench.serve.server import serve as run_server

    if not 0 < port < 65536:
        raise GenerationError(f"--port must be in 1..65535, got {port}")
    if max_queue < 1 or max_batch < 1:
        raise GenerationError("--max-queue and --max-batch must be >= 1")
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise GenerationError("--max-prompt-tokens must be >= 1")
    if max_body_bytes < 1024:
        raise GenerationError(f"--max-body-bytes must be >= 1024, got {max_body_bytes}")
    if default_max_tokens < 1:
        raise GenerationError(f"--default-max-tokens must be >= 1, got {default_max_tokens}")
    if api_key is not None and not api_key.strip():
        raise GenerationError("--api-key / $QUANTBENCH_API_KEY is empty")
    if host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"[yellow]warning: binding {host}: the server is reachable from other machines[/]")
    generator = _load(model, method, device, dtype, backend, calib)
    if model_name is None:
        from pathlib import Path

        from quantbench.models import MODEL_ALIASES

        path = Path(model)
        model_name = path.name if path.exists() else MODEL_ALIASES.get(model, model)
        if method:
            model_name += f":{method}"
    settings = ServeSettings(
        model_name=model_name,
        max_queue=max_queue,
        max_batch=max_batch,
        max_prompt_tokens=max_prompt_tokens,
        default_max_tokens=default_max_tokens,
        api_key=api_key,
        max_body_bytes=max_body_bytes,
    )
    err.print(
        f"serving '{model_name}' on http://{host}:{port}/v1 (context {generator.context_length} tokens, "
        f"queue {max_queue}, continuous batching up to {max_batch} sequences)"
    )
    run_server(generator, settings, host=host, port=port, log_level=log_level)
