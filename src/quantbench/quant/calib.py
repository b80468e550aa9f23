"""Calibration data for the calibrated methods (GPTQ, AWQ, SmoothQuant).

A calibration spec is ``SOURCE[:N x L]``: ``N`` windows of ``L`` tokens drawn (seeded) from

* ``corpus`` (or a corpus name the project's corpus loader knows): its *calibration* slice, which is
  disjoint from the slice perplexity is evaluated on;
* a local ``.txt`` / ``.md`` file (the whole file) or ``.jsonl`` file (each line's ``"text"`` field,
  or its first string field).

``N x L`` may be written ``128x2048``, ``128*2048`` or ``128×2048``; the default is 128 x 2048. The
default shrinks by itself for a model with a shorter context and on a CPU (where 128 x 2048 tokens
through a 0.5B model takes the better part of an hour); every change is said in ``CalibData.notes``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantbench.errors import QuantConfigError

DEFAULT_SAMPLES = 128
DEFAULT_SEQ_LEN = 2048
# On a CPU the default shrinks to at most this many tokens per 2 threads (16 x 512 on 2 cores).
CPU_TOKENS_PER_2_THREADS = 8192
CPU_SEQ_LEN = 512
DEFAULT_SEED = 0

_SIZE = re.compile(r"^\s*(\d+)\s*[xX*×]\s*(\d+)\s*$")


@dataclass(frozen=True)
class CalibSpec:
    """Where calibration text comes from and how much of it (None: the default)."""

    source: str = "corpus"
    n_samples: int | None = None
    seq_len: int | None = None
    seed: int = DEFAULT_SEED

    @property
    def explicit_size(self) -> bool:
        return self.n_samples is not None or self.seq_len is not None

    def __str__(self) -> str:
        if not self.explicit_size:
            return self.source
        return f"{self.source}:{self.n_samples or DEFAULT_SAMPLES}x{self.seq_len or DEFAULT_SEQ_LEN}"


def parse_calib(text: str | CalibSpec | None) -> CalibSpec:
    """Parse ``SOURCE[:NxL]``; ``None`` or ``""`` is the default corpus spec."""
    if isinstance(text, CalibSpec):
        return text
    if text is None or not str(text).strip():
        return CalibSpec()
    raw = str(text).strip()
    source, n, length = raw, None, None
    head, sep, tail = raw.rpartition(":")
    if sep and _SIZE.match(tail):
        match = _SIZE.match(tail)
        assert match is not None
        source, n, length = head, int(match.group(1)), int(match.group(2))
        if n < 1 or length < 2:
            raise QuantConfigError(f"--calib {raw}: need at least 1 sample of at least 2 tokens")
    elif sep and re.fullmatch(r"[\w.\- ]*[xX*×][\w.\- ]*", tail) and not Path(raw).exists():
        raise QuantConfigError(f"--calib {raw}: size must be N x L, e.g. corpus:128x2048")
    if not source:
        source = "corpus"
    return CalibSpec(source=source, n_samples=n, seq_len=length)


@dataclass
class CalibData:
    """Token windows ``input_ids [n_samples, seq_len]`` and a record of how they were chosen."""

    input_ids: torch.Tensor
    source: str = "tensor"
    notes: list[str] = field(default_factory=list)

    @property
    def n_samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def describe(self) -> str:
        return f"{self.source}: {self.n_samples} x {self.seq_len} tokens"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "n_samples": self.n_samples,
            "seq_len": self.seq_len,
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------------------------------
# Text sources


def _read_jsonl(path: Path) -> str:
    parts: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise QuantConfigError(f"{path}:{number} is not valid JSON") from None
        if isinstance(row, str):
            parts.append(row)
        elif isinstance(row, dict):
            value = row.get("text")
            if not isinstance(value, str):
                value = next((v for v in row.values() if isinstance(v, str)), None)
            if value:
                parts.append(value)
    if not parts:
        raise QuantConfigError(f"{path} has no text: expected JSON lines with a 'text' field")
    return "\n\n".join(parts)


def read_text_file(path: str | Path) -> str:
    """Text of a local .txt/.md/... file, or of a .jsonl file's ``text`` fields."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise QuantConfigError(f"calibration file {p} does not exist")
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        return _read_jsonl(p)
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QuantConfigError(f"calibration file {p} is not UTF-8 text") from None


def corpus_calibration_text(name: str = "corpus") -> tuple[str, str, list[str]]:
    """(text, corpus name, notes) from the project's corpus loader (:mod:`quantbench.corpus`).

    ``corpus``/``default`` and a bare corpus name (``kjv``) mean that corpus' calibration slice,
    which is disjoint from the slice perplexity is evaluated on. This module reads no corpus itself.
    """
    from quantbench import corpus as corpus_mod

    key = _corpus_key(name)
    resolved = corpus_mod.resolve_corpus(key)
    if resolved is None:
        known = ", ".join(["corpus", *corpus_mod.CORPORA])
        raise QuantConfigError(f"--calib {name}: no such file or corpus; corpora: {known}")
    notes = []
    if resolved[1] != "calib":
        notes.append(
            f"calibrating on '{key}', which is not the calibration slice: perplexity on it is biased"
        )
    return corpus_mod.load_corpus(key), key, notes


def _corpus_key(name: str) -> str:
    """``corpus`` / ``default`` -> ``kjv-calib``; a bare corpus name -> its calibration slice."""
    from quantbench import corpus as corpus_mod

    key = name.strip().lower()
    if key in ("corpus", "default"):
        return "kjv-calib"
    if key in {c for c, _ in corpus_mod.CORPORA.values()}:
        return f"{key}-calib"
    return key


def describe_planned(calib: str | CalibSpec | None, device: str | torch.device) -> str:
    """What a calibrated method will calibrate on, said before any model is loaded (e.g. ``kjv-calib
    16x512 tokens``): the source as it will be read and the size :func:`choose_size` picks on ``device``
    with the current torch threads (a model with a shorter context than the length cuts it further)."""
    spec = parse_calib(calib)
    n, length, _ = choose_size(spec, None, torch.device(device))
    path = Path(spec.source).expanduser()
    source = path.name if path.is_file() else _corpus_key(spec.source)
    return f"{source} {n}x{length} tokens"


def _source_text(source: str) -> tuple[str, str, list[str]]:
    path = Path(source).expanduser()
    if path.is_file():
        return read_text_file(path), path.name, []
    if any(ch in source for ch in "/\\") or path.suffix.lower() in (".txt", ".jsonl", ".md", ".json"):
        raise QuantConfigError(f"calibration file {path} does not exist")
    return corpus_calibration_text(source)


# --------------------------------------------------------------------------------------------------
# Sizes and windows


def model_context(model: Any) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text_config = getattr(config, "text_config", None) or config
    ctx = getattr(text_config, "max_position_embeddings", None)
    return int(ctx) if ctx else None


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def choose_size(spec: CalibSpec, context: int | None, device: torch.device) -> tuple[int, int, list[str]]:
    """(n_samples, seq_len, notes): the spec's size, or the default scaled to the model and machine."""
    notes: list[str] = []
    n = spec.n_samples or DEFAULT_SAMPLES
    length = spec.seq_len or DEFAULT_SEQ_LEN
    if context is not None and length > context:
        notes.append(f"seq_len {length} > model context {context}: using {context}")
        length = context
    if not spec.explicit_size and device.type == "cpu":
        threads = max(1, torch.get_num_threads())
        budget = CPU_TOKENS_PER_2_THREADS * max(1, threads // 2)
        if n * length > budget:
            new_len = min(length, CPU_SEQ_LEN)
            new_n = max(1, min(n, budget // new_len))
            notes.append(
                f"CPU with {threads} threads: calibration scaled down from {n}x{length} to {new_n}x{new_len} "
                f"tokens (give --calib SOURCE:NxL to choose)"
            )
            n, length = new_n, new_len
    return n, length, notes


def sample_windows(ids: torch.Tensor, n: int, length: int, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """``n`` windows of ``length`` tokens from a 1-D token stream: non-overlapping when the stream is
    long enough (evenly spread, seeded offset), else seeded random starts."""
    total = int(ids.numel())
    if total < length:
        raise ValueError(f"need at least {length} tokens, have {total}")
    gen = torch.Generator().manual_seed(seed)
    if n * length <= total:
        slack = total - n * length
        stride = length + slack // n
        offset = int(torch.randint(0, slack // n + 1, (1,), generator=gen)) if slack else 0
        starts = [offset + i * stride for i in range(n)]
    else:
        starts = torch.randint(0, total - length + 1, (n,), generator=gen).tolist()
    return torch.stack([ids[s : s + length] for s in starts])


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """1-D LongTensor of the text's tokens (no special tokens), tokenized in pieces so a long text
    does not trip the tokenizer's length warning."""
    pieces: list[torch.Tensor] = []
    chunk = 200_000
    for start in range(0, len(text), chunk):
        piece = text[start : start + chunk]
        out = tokenizer(piece, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        pieces.append(torch.as_tensor(out, dtype=torch.long))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def prepare_calibration(
    calib: str | CalibSpec | CalibData | torch.Tensor | None,
    model: torch.nn.Module,
    tokenizer: Any = None,
) -> CalibData:
    """Turn whatever the caller passed as ``calib`` into :class:`CalibData`."""
    if isinstance(calib, CalibData):
        return calib
    if isinstance(calib, torch.Tensor):
        ids = calib if calib.dim() == 2 else calib.unsqueeze(0)
        return CalibData(ids.long().cpu(), source="tensor")
    spec = parse_calib(calib)
    if tokenizer is None:
        raise QuantConfigError(
            "calibrated methods need calibration data: pass calib=CalibData/token ids, or a tokenizer"
        )
    n, length, notes = choose_size(spec, model_context(model), model_device(model))
    text, source, source_notes = _source_text(spec.source)
    notes.extend(source_notes)
    ids = tokenize_text(tokenizer, text)
    if ids.numel() < length:
        notes.append(f"text has only {ids.numel()} tokens: seq_len {length} -> {ids.numel()}")
        length = int(ids.numel())
        if length < 2:
            raise QuantConfigError(f"calibration source {spec.source} has no usable text")
    if n * length > ids.numel():
        notes.append(
            f"text has {ids.numel()} tokens, fewer than {n}x{length}: windows overlap (seeded random starts)"
        )
    windows = sample_windows(ids, n, length, spec.seed)
    return CalibData(windows, source=source, notes=notes)
