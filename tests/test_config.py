"""Method spec parsing: canonical forms, defaults, and one clear error per bad input."""

from __future__ import annotations

import pytest

from quantbench import QuantConfigError, parse_spec


def test_defaults_and_canonical_spec() -> None:
    cfg = parse_spec("int4")
    assert cfg.method == "int4"
    assert cfg["group"] == 128 and cfg["sym"] is True and cfg["bits"] == 4
    assert cfg.spec == "int4:bits=4,compute=bf16,group=128,skip=lm_head,sym=1"
    assert parse_spec(cfg.spec) == cfg


def test_flags_and_aliases() -> None:
    assert parse_spec("int4:group=64,asym")["sym"] is False
    assert parse_spec("int4:gs=32")["group"] == 32
    assert parse_spec("int8:group=-1,compute=fp16").compute_dtype.__repr__() == "torch.float16"
    assert parse_spec("int8:skip=lm_head+down_proj").skip_patterns == ["lm_head", "down_proj"]
    assert parse_spec("int8:skip=none").skip_patterns == []


def test_baseline_has_no_options() -> None:
    assert parse_spec("bf16").spec == "bf16"
    with pytest.raises(QuantConfigError, match="bf16: unknown option 'group'"):
        parse_spec("bf16:group=1")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nf9", "unknown method 'nf9'; allowed methods: .*int4"),
        ("", "empty method spec"),
        ("int4:grp=64", "int4: unknown option 'grp'; allowed options: .*group"),
        ("int4:group=abc", "option 'group' must be -1 .* got 'abc'"),
        ("int4:group=7", "option 'group' must be -1 or >= 8"),
        ("int4:compute=fp64", "option 'compute' must be one of fp16, bf16, fp32"),
        ("int8:sym=maybe", "option 'sym' must be 0 or 1"),
        ("int8:bits=4", "option 'bits' must be one of 8"),
    ],
)
def test_bad_specs_name_the_key(spec: str, message: str) -> None:
    with pytest.raises(QuantConfigError, match=message):
        parse_spec(spec)


def test_roundtrip_through_dict() -> None:
    cfg = parse_spec("int4:group=64,asym,compute=fp16")
    from quantbench.quant.config import QuantConfig

    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
