"""The one generation loop (``engine.scheduler``) with continuous batching, and the one sampler.

CPU, float32, 2-layer random models of real architectures: a request's greedy tokens are the same alone
and joining a running batch mid-way (on the engine's slots and on the HF forward's), and equal HF
``generate``'s; the sampler follows the truncated distribution, keeps greedy rows exact and seeded rows
reproducible whatever shares their batch; a cancelled request frees its slot; a prompt that breaks the
prompt pass fails alone.
"""

from __future__ import annotations

import pytest
import torch

import quantbench
from quantbench.engine import Engine, Request, Sampling, Scheduler, sample_tokens
from quantbench.engine.hf_slots import HFSlots

SMALL = dict(
    num_hidden_layers=2, vocab_size=384, hidden_size=128, intermediate_size=256, num_attention_heads=4
)
ARCHS = ["qwen2.5-0.5b", "llama-3-8b"]


def _model(arch: str, seed: int = 0):
    """A random model with a scaled LM head: greedy choices have clear margins (random weights give
    near-ties that 1e-7 differences in summation order could flip)."""
    torch.manual_seed(seed)
    extra = {"head_dim": 32} if arch != "qwen2.5-0.5b" else {}
    model = quantbench.random_model(arch, dtype="fp32", num_key_value_heads=2, **SMALL, **extra)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    model.generation_config.eos_token_id = None
    return model


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
        do_sample=False, pad_token_id=0,
    )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def _slots(kind: str, model):
    if kind == "engine":
        slots = Engine(model).serving_slots(512)
        assert slots.name == "engine"
        return slots
    return HFSlots(model, 1, 1)


def _prompts(n: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [11, 5, 17, 3, 9, 14][:n]
    return [torch.randint(1, 384, (k,), generator=gen).tolist() for k in lengths]


# (prompt index, new tokens, the step at which it is submitted): requests join while others run (the
# engine's cache grows from 1 to 2 to 4 rows under them), leave at different times, and the last two
# arrive together into slots 0 and 2 while slot 1 is busy.
SCHEDULE = [(0, 4, 0), (1, 14, 1), (2, 5, 2), (3, 6, 3), (4, 6, 8), (5, 5, 8)]


def _run_schedule(slots, prompts, schedule, sampling=None) -> tuple[list[Request], list[int]]:
    sched = Scheduler(slots, max_running=4, sync_every=1)
    requests = {}
    step, slot_of = 0, []
    while len(requests) < len(schedule) or sched.busy:
        for i, (p, n, at) in enumerate(schedule):
            if at == step and i not in requests:
                requests[i] = Request(prompts[p], n, sampling[i] if sampling else Sampling())
                sched.submit(requests[i])
        sched.step()
        slot_of += [r.slot for r in requests.values() if r.slot >= 0 and r.slot not in slot_of]
        step += 1
        assert step < 200
    return [requests[i] for i in range(len(schedule))], slot_of


@pytest.mark.parametrize("kind", ["engine", "hf"])
@pytest.mark.parametrize("arch", ARCHS)
def test_tokens_do_not_depend_on_who_shares_the_batch(arch: str, kind: str) -> None:
    model = _model(arch)
    prompts = _prompts(6, seed=1)
    together, _ = _run_schedule(_slots(kind, model), prompts, SCHEDULE)
    assert [r.finish_reason for r in together] == ["length"] * len(SCHEDULE)
    for (p, n, _), req in zip(SCHEDULE, together, strict=True):
        alone, _ = _run_schedule(_slots(kind, model), prompts, [(p, n, 0)])
        assert req.tokens == alone[0].tokens
        assert req.tokens == _hf_greedy(model, prompts[p], n)


def test_hf_slots_keep_sliding_window_cohorts_apart() -> None:
    """A sliding-window model (its cache layers are not merged): requests admitted at different steps run
    as separate forwards of the same step and still give HF ``generate``'s tokens, past the window too."""
    torch.manual_seed(2)
    model = quantbench.random_model(
        "mistral-7b", dtype="fp32", num_key_value_heads=2, head_dim=32, sliding_window=6, **SMALL
    )
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    model.generation_config.eos_token_id = None
    assert Engine(model).serving_slots(512).name == "hf"  # the engine does not run past a window
    prompts = _prompts(6, seed=3)
    slots = HFSlots(model, 1, 1)
    requests, _ = _run_schedule(slots, prompts, SCHEDULE)
    for (p, n, _), req in zip(SCHEDULE, requests, strict=True):
        assert req.tokens == _hf_greedy(model, prompts[p], n)


def test_engine_slots_grow_and_scatter_while_running() -> None:
    """The schedule above makes the engine's cache grow (1 -> 2 -> 4 rows) with requests running in it and
    prefills two joining requests into rows 0 and 2 at once (a scratch cache copied into both)."""
    model = _model("qwen2.5-0.5b")
    slots = _slots("engine", model)
    requests, _ = _run_schedule(slots, _prompts(6, seed=1), SCHEDULE)
    assert slots.capacity == 4
    assert [requests[4].slot, requests[5].slot] == [0, 2]


def test_cache_positions_a_row_never_wrote_are_never_read() -> None:
    """Rows of different lengths share the cache: past its own length a row sees whatever the memory held
    (here NaN everywhere before the first request), and must not let it into its attention."""
    model = _model("llama-3-8b", seed=1)
    prompts = _prompts(6, seed=1)
    slots = _slots("engine", model)
    slots.ensure(4, 256)
    slots.em.k_cache.fill_(float("nan"))
    slots.em.v_cache.fill_(float("nan"))
    requests, _ = _run_schedule(slots, prompts, SCHEDULE)
    for (p, n, _), req in zip(SCHEDULE, requests, strict=True):
        assert req.tokens == _hf_greedy(model, prompts[p], n)


def test_engine_generate_runs_a_fixed_batch_through_the_loop() -> None:
    model = _model("llama-3-8b", seed=3)
    prompts = _prompts(3, seed=2)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = Engine(model).generate(ids, mask, max_new_tokens=7, ignore_eos=True)
    assert [row.tolist() for row in out] == [_hf_greedy(model, p, 7) for p in prompts]


# ---------------------------------------------------------------------------------------------------------
# The sampler


@pytest.mark.parametrize(("top_p", "top_k"), [(1.0, 0), (0.9, 0), (1.0, 5), (0.7, 8)])
def test_sampling_follows_the_truncated_distribution(top_p: float, top_k: int) -> None:
    """20000 rows with the same logits and different noise positions: each token's frequency is within 5
    standard errors (< 0.018) of its probability after temperature, top-k and top-p truncation (float64)."""
    n, vocab, temp = 20000, 50, 0.8
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(1)) * 2
    probs = torch.softmax(logits.double() / temp, -1)
    ranked, order = torch.sort(probs, descending=True)
    keep = top_k or vocab
    if top_p < 1:
        renorm = ranked[:keep] / ranked[:keep].sum()
        keep = min(keep, int((renorm.cumsum(0) - renorm < top_p).sum()))
    expected = torch.zeros(vocab, dtype=torch.float64)
    expected[order[:keep]] = ranked[:keep] / ranked[:keep].sum()
    tokens = sample_tokens(
        logits.expand(n, vocab),
        torch.full((n,), temp),
        torch.full((n,), top_k),
        torch.full((n,), top_p),
        torch.full((n,), 12345),
        torch.arange(n),
    )
    counts = torch.bincount(tokens, minlength=vocab)
    assert (counts.double() / n - expected).abs().max() < 0.018
    assert set(torch.nonzero(counts).flatten().tolist()) <= set(order[:keep].tolist())


def test_one_batch_mixes_sampling_parameters() -> None:
    """Greedy rows are exactly argmax beside sampled ones; top-k 1 and a tiny top-p are argmax too; a
    top-k row stays in its top k; a row's draws depend on its own key and position only."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 300, generator=gen) * 3
    temperature = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.3, 0.0])
    top_k = torch.tensor([0, 1, 0, 4, 0, 7])
    top_p = torch.tensor([1.0, 1.0, 1e-6, 1.0, 0.95, 0.5])
    keys = torch.tensor([1, 2, 3, 4, 5, 6])
    best = logits.argmax(-1)
    top4 = logits[3].topk(4).indices.tolist()
    draws = []
    for step in range(40):
        counters = torch.full((6,), step)
        tokens = sample_tokens(logits, temperature, top_k, top_p, keys, counters)
        assert tokens[[0, 1, 2, 5]].tolist() == best[[0, 1, 2, 5]].tolist()
        assert int(tokens[3]) in top4
        draws.append(tokens)
        # the same row alone (its own key and position) draws the same token
        alone = sample_tokens(logits[4:5], temperature[4:5], top_k[4:5], top_p[4:5], keys[4:5], counters[4:5])
        assert int(alone) == int(tokens[4])
    assert len({int(t[4]) for t in draws}) > 3  # temperature 1.3 over 300 tokens: the row does vary


def test_tied_scores_are_kept_or_cut_together_whatever_the_batch() -> None:
    """bf16 logits tie often: a top-k or top-p boundary inside a group of equal scores keeps the whole
    group, so a row draws the same tokens whichever rows (and so whichever sorts) share its batch."""
    logits = torch.tensor([4.0, 3.0, 2.0, 2.0, 2.0, 1.0, 0.5, 0.0]).repeat(3, 1)
    temperature = torch.ones(3)
    keys = torch.tensor([9, 9, 9])
    cases = [
        (torch.tensor([3, 0, 8]), torch.tensor([1.0, 1.0, 0.5])),  # next to a top-p row and an open row
        (torch.tensor([3, 3, 3]), torch.tensor([1.0, 1.0, 1.0])),  # next to top-k rows only
    ]
    seen, draws = set(), []
    for top_k, top_p in cases:
        tokens = [
            sample_tokens(logits, temperature, top_k, top_p, keys, torch.full((3,), c)) for c in range(400)
        ]
        draws.append([int(t[0]) for t in tokens])
        seen |= set(draws[-1])
    assert draws[0] == draws[1]
    assert seen == {0, 1, 2, 3, 4}  # top-3 by score, and the two tokens tied with the third
    probs = torch.softmax(logits[0].double(), -1)
    above = float(probs[:2].sum())  # the mass better than the tied group: 0.731
    for top_p, allowed in ((above + 0.02, {0, 1, 2, 3, 4}), (above - 0.02, {0, 1})):
        drawn = {
            int(sample_tokens(logits[:1], temperature[:1], torch.zeros(1, dtype=torch.long),
                              torch.tensor([top_p]), keys[:1], torch.tensor([c]))[0])
            for c in range(300)
        }  # fmt: skip
        assert drawn == allowed, top_p


@pytest.mark.parametrize("kind", ["engine", "hf"])
def test_seeded_sampled_requests_are_reproducible_in_any_batch(kind: str) -> None:
    model = _model("qwen2.5-0.5b", seed=5)
    prompts = _prompts(6, seed=6)
    hot = Sampling(temperature=1.5, top_p=0.95, seed=11)
    warm = Sampling(temperature=0.7, top_k=20, seed=3)
    mixed = [hot, Sampling(), warm, Sampling(temperature=1.0), hot, Sampling()]
    together, _ = _run_schedule(_slots(kind, model), prompts, SCHEDULE, mixed)
    for i in (0, 2, 4):
        p, n, _ = SCHEDULE[i]
        alone, _ = _run_schedule(_slots(kind, model), prompts, [(p, n, 0)], [mixed[i]])
        assert together[i].tokens == alone[0].tokens, i
    assert together[1].tokens == _hf_greedy(model, prompts[1], SCHEDULE[1][1])  # greedy beside sampled
    again, _ = _run_schedule(_slots(kind, model), prompts, SCHEDULE, mixed)
    assert [r.tokens for r in again][:3] == [r.tokens for r in together][:3]


def test_engine_generate_seed() -> None:
    model = _model("llama-3-8b", seed=2)
    ids = torch.randint(0, 384, (2, 5), generator=torch.Generator().manual_seed(0))
    engine = Engine(model)
    kwargs = dict(max_new_tokens=8, do_sample=True, top_k=20, top_p=0.9, temperature=0.8)
    a = engine.generate(ids, **kwargs, seed=5)
    assert torch.equal(a, engine.generate(ids, **kwargs, seed=5))
    assert not torch.equal(a, engine.generate(ids, **kwargs, seed=6))
    # row b draws with seed + b: the second row alone with seed 6 draws what it drew in the batch
    assert torch.equal(a[1:], engine.generate(ids[1:], **kwargs, seed=6))


# ---------------------------------------------------------------------------------------------------------
# Leaving early


@pytest.mark.parametrize("kind", ["engine", "hf"])
def test_a_cancelled_request_frees_its_slot(kind: str) -> None:
    model = _model("qwen2.5-0.5b", seed=7)
    prompts = _prompts(3, seed=8)
    sched = Scheduler(_slots(kind, model), max_running=2, sync_every=1)
    first, second, third = (Request(p, 40) for p in prompts)
    for req in (first, second, third):
        sched.submit(req)
    for _ in range(3):
        sched.step()
    assert first.slot == 0 and second.slot == 1 and third.slot == -1  # no slot for the third yet
    second.cancel()
    sched.step()
    assert second.finish_reason == "cancelled" and 0 < len(second.tokens) < 40
    assert third.slot == 1 and len(third.tokens) == 2  # joined at once: its first token and one step
    if kind == "hf":
        assert len(sched.slots.cohorts) == 1  # the joining request's cache merged into the running batch
    sched.run()
    assert first.tokens == _hf_greedy(model, prompts[0], 40)
    assert third.tokens == _hf_greedy(model, prompts[2], 40)


def test_stop_ids_and_a_callback_end_requests() -> None:
    model = _model("qwen2.5-0.5b", seed=9)
    prompt = _prompts(1, seed=10)[0]
    full = _hf_greedy(model, prompt, 12)
    slots = _slots("engine", model)
    stop_at = Request(prompt, 12, stop_ids=frozenset([full[4]]))
    seen: list[int] = []
    by_callback = Request(prompt, 12, on_token=lambda t: seen.append(t) or len(seen) == 3)
    sched = Scheduler(slots, max_running=4)
    for req in (stop_at, by_callback):
        sched.submit(req)
    sched.run()
    first = full.index(full[4])
    assert stop_at.tokens == full[: first + 1] and stop_at.finish_reason == "stop"
    assert by_callback.tokens == full[:3] == seen and by_callback.finish_reason == "stop"


def test_a_prompt_that_breaks_the_prompt_pass_fails_alone() -> None:
    model = _model("qwen2.5-0.5b", seed=11)
    prompts = _prompts(3, seed=12)
    prompts[1][0] = 7
    slots = _slots("engine", model)
    prefill = slots.prefill

    def flaky(batch, pads, where):
        if any(int(p[0]) == 7 for p in batch):
            raise OverflowError("bad prompt")
        return prefill(batch, pads, where)

    slots.prefill = flaky
    sched = Scheduler(slots, max_running=4)
    requests = [Request(p, 5) for p in prompts]
    for req in requests:
        sched.submit(req)
    sched.run()
    assert [r.finish_reason for r in requests] == ["length", "error", "length"]
    assert isinstance(requests[1].error, OverflowError)
    assert requests[2].tokens == _hf_greedy(model, prompts[2], 5)


def test_requests_that_do_not_fit_are_refused() -> None:
    from quantbench.errors import GenerationError

    sched = Scheduler(_slots("engine", _model("qwen2.5-0.5b")), max_running=2, max_columns=20)
    with pytest.raises(GenerationError, match="positions"):
        sched.submit(Request(list(range(1, 16)), 8))
    with pytest.raises(GenerationError, match="top_p"):
        sched.submit(Request([1, 2], 3, Sampling(temperature=1.0, top_p=0.0)))
    with pytest.raises(GenerationError, match="empty"):
        sched.submit(Request([], 3))


# ---------------------------------------------------------------------------------------------------------
# CUDA: graph replays per batch / cache-length bucket


@pytest.mark.cuda
def test_continuous_batching_with_cuda_graphs_matches_eager_cuda() -> None:
    """bf16 int4 (Triton kernels): the schedule above, greedy and seeded sampled requests mixed, gives the
    same tokens with captured decode steps (captured while other requests run) as eagerly."""
    model = quantbench.random_model(
        "mistral-7b", dtype="bf16", device="cuda", num_hidden_layers=2, vocab_size=1024
    )
    quantbench.quantize(model, "int4:group=128")
    prompts = [[t % 1024 for t in p] for p in _prompts(6, seed=13)]
    mixed = [Sampling(), Sampling(temperature=0.8, top_p=0.9, seed=1), Sampling(), Sampling(),
             Sampling(temperature=1.0, top_k=10, seed=2), Sampling()]  # fmt: skip
    runs = {}
    for graphs in (True, False):
        slots = Engine(model, cuda_graphs=graphs).serving_slots(512)
        runs[graphs], _ = _run_schedule(slots, prompts, SCHEDULE, mixed)
        if graphs:
            assert slots.graphs.error is None and slots._step_graphs, slots.describe()
    assert [r.tokens for r in runs[True]] == [r.tokens for r in runs[False]]


@pytest.mark.cuda
def test_continuous_batching_cuda_matches_a_lone_request_cuda() -> None:
    """float32 (per-row kernels; the attention split count does not change with the batch at these
    lengths): each request of the schedule, run on CUDA graphs beside the others, gives the tokens it
    gives alone. (HF ``generate`` is the reference on CPU above: on CUDA the engine's attention multiplies
    in TF32.)"""
    model = _model("qwen2.5-0.5b").to("cuda")
    prompts = _prompts(6, seed=14)
    engine = Engine(model)
    assert engine.cuda_graphs
    slots = engine.serving_slots(512)
    together, _ = _run_schedule(slots, prompts, SCHEDULE)
    assert slots.graphs.error is None and slots._step_graphs, slots.describe()
    for (p, n, _), req in zip(SCHEDULE, together, strict=True):
        alone, _ = _run_schedule(engine.serving_slots(512), prompts, [(p, n, 0)])
        assert req.tokens == alone[0].tokens
