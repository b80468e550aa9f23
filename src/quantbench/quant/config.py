"""Method spec strings such as ``nf4:block=64,dq=1,compute=bf16`` and their validation.

A spec is ``METHOD[:OPTION[,OPTION...]]`` where each option is ``key=value`` or a bare flag.
Every method declares its options as a table of :class:`Option`; parsing checks the key,
converts the value and checks it against the allowed values, so a typo fails at once with
a :class:`QuantConfigError` that names the bad key and what is allowed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from quantbench.errors import QuantConfigError

COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _to_bool(text: str) -> bool:
    low = text.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}")


@dataclass(frozen=True)
class Option:
    """One option of a method: its type, default and the values it accepts."""

    kind: type  # int, float, bool or str
    default: Any
    choices: Sequence[Any] | None = None
    check: Callable[[Any], bool] | None = None
    check_text: str = ""  # human description of `check`, used in errors
    help: str = ""

    def convert(self, method: str, key: str, text: str) -> Any:
        try:
            if self.kind is bool:
                value: Any = _to_bool(text)
            elif self.kind is int:
                value = int(text)
            elif self.kind is float:
                value = float(text)
            else:
                value = text
        except ValueError:
            raise QuantConfigError(
                f"{method}: option '{key}' must be {self.allowed_text()}, got '{text}'"
            ) from None
        if self.choices is not None and value not in self.choices:
            raise QuantConfigError(f"{method}: option '{key}' must be {self.allowed_text()}, got '{text}'")
        if self.check is not None and not self.check(value):
            raise QuantConfigError(f"{method}: option '{key}' must be {self.allowed_text()}, got '{text}'")
        return value

    def allowed_text(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        if self.check_text:
            return self.check_text
        return {bool: "0 or 1", int: "an integer", float: "a number"}.get(self.kind, "a string")


def compute_option(default: str = "bf16") -> Option:
    return Option(str, default, choices=tuple(COMPUTE_DTYPES), help="dtype the matmul runs in")


def group_option(default: int = 128) -> Option:
    """Input columns per scale (RTN, GPTQ, AWQ): -1 = one group per output channel."""
    return Option(
        int,
        default,
        check=lambda g: g == -1 or g > 0,
        check_text="-1 (per channel) or a positive group size such as 32, 64, 128",
        help="input columns sharing one scale; -1 = per output channel",
    )


# Options every quantizing method accepts: which Linear modules to leave in full precision.
COMMON_OPTIONS: dict[str, Option] = {
    "skip": Option(
        str,
        "lm_head",
        help="'+'-separated module-name substrings left unquantized ('none' quantizes everything)",
    ),
}


@dataclass(frozen=True)
class QuantConfig:
    """A parsed, validated method spec."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.options[key]

    @property
    def compute_dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.options.get("compute", "bf16")]

    @property
    def skip_patterns(self) -> list[str]:
        raw = self.options.get("skip", "lm_head")
        if raw in ("", "none"):
            return []
        return [p for p in raw.split("+") if p]

    @property
    def spec(self) -> str:
        """Canonical spec string: every option spelled out, in sorted order."""
        if not self.options:
            return self.method
        body = ",".join(f"{k}={_fmt(v)}" for k, v in sorted(self.options.items()))
        return f"{self.method}:{body}"

    def __str__(self) -> str:
        return self.spec

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        return parse_spec(data["method"], overrides=data.get("options", {}))

    @classmethod
    def parse(cls, spec: str) -> QuantConfig:
        return parse_spec(spec)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def parse_spec(spec: str | QuantConfig, overrides: dict[str, Any] | None = None) -> QuantConfig:
    """Parse ``METHOD[:k=v,flag,...]`` into a validated :class:`QuantConfig`.

    ``overrides`` (already-typed values, e.g. from a saved manifest) are validated the same way.
    """
    from quantbench.quant import METHODS  # late import: the registry imports the method modules

    if isinstance(spec, QuantConfig):
        return spec
    text = spec.strip()
    if not text:
        raise QuantConfigError(f"empty method spec; allowed methods: {', '.join(METHODS)}")
    name, _, rest = text.partition(":")
    name = name.strip().lower()
    if name not in METHODS:
        raise QuantConfigError(f"unknown method '{name}'; allowed methods: {', '.join(METHODS)}")
    method = METHODS[name]
    schema = method.options
    values = {k: opt.default for k, opt in schema.items()}
    tokens = [t.strip() for t in rest.split(",") if t.strip()] if rest else []
    items: list[tuple[str, str]] = []
    for token in tokens:
        if "=" in token:
            key, _, val = token.partition("=")
            items.append((key.strip().lower(), val.strip()))
        elif token.lower() in method.flags:
            key, val = method.flags[token.lower()]
            items.append((key, _fmt(val)))
        else:
            items.append((token.lower(), "1"))
    for key, val in [*items, *((k, _fmt(v)) for k, v in (overrides or {}).items())]:
        key = method.aliases.get(key, key)
        if key not in schema:
            allowed = sorted(schema) + sorted(method.flags)
            raise QuantConfigError(
                f"{name}: unknown option '{key}'; allowed options: {', '.join(allowed) or '(none)'}"
            )
        values[key] = schema[key].convert(name, key, val)
    if method.validate is not None:
        method.validate(name, values)
    return QuantConfig(name, values)


def split_specs(text: str) -> list[str]:
    """The method specs in one ``--methods`` value.

    ``;`` separates specs (``bf16;gptq:bits=4,group=128;nf4``), so a spec keeps its commas. Without ``;``,
    commas separate specs when every part starts a method (``bf16,int8,int4:group=64``), or the value is
    one spec with options (``nf4:block=64,dq=1``). Options next to a second method
    (``bf16,nf4:block=64,dq=1``) are ambiguous: a one-line error asks for ``;`` or a repeated ``--method``.
    """
    from quantbench.quant import METHODS

    if ";" in text:
        return [part.strip() for part in text.split(";") if part.strip()]
    parts = [part.strip() for part in text.split(",") if part.strip()]
    starts = [part for part in parts if part.partition(":")[0].strip().lower() in METHODS]
    if len(starts) == len(parts) or not any(":" in part for part in parts):
        return parts  # bare names (an unknown one fails in parse_spec), or specs that each start a method
    if len(starts) > 1 or (starts and parts[0] not in starts):
        raise QuantConfigError(
            f"--methods '{text}' is ambiguous (commas separate both methods and options): separate specs "
            "with ';' (--methods \"bf16;gptq:bits=4,group=128\") or repeat --method SPEC"
        )
    return [text.strip()]
