"""The one token sampler of every generation path: per-row temperature / top-k / top-p / seed over a batch.

Greedy rows (temperature 0) take ``logits.argmax(-1)`` exactly. A sampled row draws with the Gumbel-max
trick, ``argmax(scores + G)`` with Gumbel noise ``G``, which picks token i with the probability softmax
gives it after the row's temperature, top-k and top-p truncation. The noise is a hash of (the row's seed,
how many tokens the row has drawn, the token id) instead of a random generator's state: a seeded request
draws the same tokens whichever rows share its batch, in one vectorized pass over the batch and without
host synchronisation.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from quantbench.errors import GenerationError

MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # odd and < 2**31: a 32-bit value times it stays inside int64
_GOLDEN = 0x9E3779B1  # odd: token ids map to distinct hash inputs


@dataclass(frozen=True)
class Sampling:
    """How one request picks its tokens: greedy when ``temperature`` is 0."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int | None = None  # None: a random one per request

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check(self) -> None:
        if not 0.0 <= self.temperature <= 100.0:
            raise GenerationError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise GenerationError(f"seed must be in 0..2**63-1, got {self.seed}")


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective integer hash of 32-bit values held in int64 (two multiply-xorshift rounds)."""
    x = (((x >> 16) ^ x) * _MIX) & MASK32
    x = (((x >> 16) ^ x) * _MIX) & MASK32
    return (x >> 16) ^ x


def _mix32_int(x: int) -> int:
    x = (((x >> 16) ^ x) * _MIX) & MASK32
    x = (((x >> 16) ^ x) * _MIX) & MASK32
    return (x >> 16) ^ x


def seed_key(seed: int | None) -> int:
    """The 32-bit noise key of a request's seed (a random one when ``seed`` is None)."""
    if seed is None:
        seed = secrets.randbits(63)
    return _mix32_int((seed & MASK32) ^ _mix32_int((seed >> 32) & MASK32))


def uniform_noise(keys: torch.Tensor, counters: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Uniform values in (0, 1), float64, one per ``ids [B, C]`` entry, fixed by (key, counter, id) of its row."""
    step = _mix32(keys ^ _mix32(counters & MASK32))  # [B]
    h = _mix32((step[:, None] + ids * _GOLDEN) & MASK32)
    return (h.double() + 0.5) / 2**32


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    keys: torch.Tensor,
    counters: torch.Tensor,
    max_top_k: int | None = None,
    nucleus: bool | None = None,
) -> torch.Tensor:
    """Next tokens ``[B]`` for ``logits [B, V]`` with per-row parameters (tensors of ``B`` values).

    Top-k keeps the tokens scoring at least the k-th best score, top-p the tokens whose better-scoring
    tokens hold less than ``top_p`` of the (top-k) probability mass (so the token crossing ``top_p`` stays);
    tokens of equal score are kept or dropped together, so a row's draw never depends on how a sort orders
    ties, nor on the other rows. ``max_top_k`` (the largest ``top_k``) and ``nucleus`` (whether a row has
    ``top_p < 1``) spare a host synchronisation when the caller knows them."""
    greedy_pick = logits.argmax(dim=-1)
    vocab = logits.shape[-1]
    scores = logits.float() / temperature.clamp_min(1e-5)[:, None]
    if max_top_k is None:
        max_top_k = int(top_k.max())
    if max_top_k > 0:
        ranked = torch.topk(scores, min(max_top_k, vocab), dim=-1).values
        kth = ranked.gather(1, (top_k.clamp(1, ranked.shape[1]) - 1)[:, None])
        scores = scores.masked_fill((top_k > 0)[:, None] & (scores < kth), float("-inf"))
    if nucleus is None:
        nucleus = bool((top_p < 1.0).any())
    if nucleus:
        ranked = torch.sort(scores, dim=-1, descending=True).values
        probs = torch.softmax(ranked, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # the mass ranked above each token
        keep = before <= top_p[:, None]
        # the lowest score kept: a cut inside a group of equal scores keeps the whole group
        floor = ranked.gather(1, keep.sum(dim=1, keepdim=True) - 1)
        scores = scores.masked_fill((top_p < 1.0)[:, None] & (scores < floor), float("-inf"))
    ids = torch.arange(vocab, device=logits.device).expand(logits.shape[0], vocab)
    gumbel = -torch.log(-torch.log(uniform_noise(keys, counters, ids)))
    sampled = (scores.double() + gumbel).argmax(dim=-1)
    return torch.where(temperature == 0, greedy_pick, sampled)


class SlotSampler:
    """The sampling parameters of each slot of a running batch, on the device, and :func:`sample_tokens`
    over them. ``counters[slot]`` counts the tokens the slot's request has drawn (its noise position).

    Parameters reach the device only when a batch samples: an all-greedy batch (a benchmark, greedy
    serving) picks by argmax and never writes them."""

    def __init__(self, slots: int, device: torch.device) -> None:
        self.device = device
        self.params: list[Sampling | None] = [None] * slots
        self._unwritten: dict[int, Sampling] = {}  # slots whose device parameters are not written yet
        self.temperature = torch.zeros(slots, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(slots, dtype=torch.long, device=device)
        self.top_p = torch.ones(slots, dtype=torch.float32, device=device)
        self.keys = torch.zeros(slots, dtype=torch.long, device=device)
        self.counters = torch.zeros(slots, dtype=torch.long, device=device)

    def grow(self, slots: int) -> None:
        extra = slots - len(self.params)
        if extra <= 0:
            return
        self.params += [None] * extra
        for name, fill in (("temperature", 0), ("top_k", 0), ("top_p", 1), ("keys", 0), ("counters", 0)):
            old = getattr(self, name)
            setattr(self, name, torch.cat([old, old.new_full((extra,), fill)]))

    def assign(self, slots: list[int], params: list[Sampling]) -> None:
        """Set the parameters of newly filled ``slots`` (their noise counters restart at 0)."""
        for slot, p in zip(slots, params, strict=True):
            self.params[slot] = p
            self._unwritten[slot] = p

    def clear(self, slot: int) -> None:
        self.params[slot] = None

    def _write(self) -> None:
        slots = list(self._unwritten)
        rows = [(p.temperature, p.top_k, p.top_p, seed_key(p.seed)) for p in self._unwritten.values()]
        self._unwritten.clear()
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        temp, top_k, top_p, keys = zip(*rows, strict=True)
        self.temperature[index] = torch.tensor(temp, dtype=torch.float32, device=self.device)
        self.top_k[index] = torch.tensor(top_k, dtype=torch.long, device=self.device)
        self.top_p[index] = torch.tensor(top_p, dtype=torch.float32, device=self.device)
        self.keys[index] = torch.tensor(keys, dtype=torch.long, device=self.device)
        self.counters[index] = 0

    def all_greedy(self, rows: int | list[int]) -> bool:
        chosen = self.params[:rows] if isinstance(rows, int) else [self.params[r] for r in rows]
        return all(p is None or p.greedy for p in chosen)

    def pick(self, logits: torch.Tensor, rows: int | list[int]) -> torch.Tensor:
        """Tokens for ``logits [n, V]`` of slots ``rows`` (the first n slots when an int)."""
        if self.all_greedy(rows):
            return logits.argmax(dim=-1)
        if self._unwritten:
            self._write()
        if isinstance(rows, int):
            index: slice | torch.Tensor = slice(0, rows)
            chosen = self.params[:rows]
        else:
            index = torch.tensor(rows, dtype=torch.long, device=self.device)
            chosen = [self.params[r] for r in rows]
        sampled = [p for p in chosen if p is not None and not p.greedy]
        tokens = sample_tokens(
            logits,
            self.temperature[index],
            self.top_k[index],
            self.top_p[index],
            self.keys[index],
            self.counters[index],
            max_top_k=max(p.top_k for p in sampled),
            nucleus=any(p.top_p < 1.0 for p in sampled),
        )
        self.counters[index] += 1
        return tokens
