"""Supervised fine-tuning data: JSONL of ``{"prompt", "completion"}`` or chat ``{"messages": [...]}``.

Each record becomes token ids plus labels that are -100 everywhere except on the completion (for chat
records: the last assistant message), so the loss is computed only where the model should answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantbench.errors import QuantbenchError

IGNORE_INDEX = -100


class DataError(QuantbenchError, ValueError):
    """A fine-tuning data file is missing or has a bad record."""


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens


def _prompt_completion(record: dict[str, Any], tokenizer: Any, where: str) -> tuple[str, str]:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or messages[-1].get("role") != "assistant":
            raise DataError(f"{where}: 'messages' must be a list ending with an assistant message")
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError(f"{where}: chat records need a tokenizer with a chat template")
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise DataError(f"{where}: the chat template does not extend the prompt with the answer")
        return prompt, full[len(prompt) :]
    if "prompt" in record and "completion" in record:
        return str(record["prompt"]), str(record["completion"])
    raise DataError(f"{where}: expected keys 'prompt' and 'completion', or 'messages'")


def encode_example(prompt: str, completion: str, tokenizer: Any, max_length: int) -> Example:
    """Tokenize prompt + completion (+ EOS); labels only on the completion; cut from the left if long."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    completion_ids = tokenizer(completion, add_special_tokens=False).input_ids
    if tokenizer.eos_token_id is not None:
        completion_ids = [*completion_ids, tokenizer.eos_token_id]
    ids = prompt_ids + completion_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    if len(ids) > max_length:  # keep the answer: drop the oldest prompt tokens
        ids, labels = ids[-max_length:], labels[-max_length:]
    return Example(ids, labels)


def load_examples(path: str | Path, tokenizer: Any, max_length: int = 1024) -> list[Example]:
    """Read a JSONL file into tokenized :class:`Example` records; bad lines fail with their number."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"data file {path} is not UTF-8 text") from None
    except IsADirectoryError:
        raise DataError(f"data file {path} is a directory") from None
    examples: list[Example] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: each line must be a JSON object")
        prompt, completion = _prompt_completion(record, tokenizer, where)
        examples.append(encode_example(prompt, completion, tokenizer, max_length))
    if not examples:
        raise DataError(f"data file {path} has no records")
    return examples
