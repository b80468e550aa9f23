"""Evaluation: multiple-choice few-shot tasks (MMLU, C-Eval), perplexity, and the SQLite results store."""

from quantbench.corpus import calibration_samples, calibration_text, evaluation_text, load_corpus
from quantbench.eval.perplexity import PerplexityResult, perplexity

__all__ = [
    "PerplexityResult",
    "calibration_samples",
    "calibration_text",
    "evaluation_text",
    "load_corpus",
    "perplexity",
]
