"""QLoRA: LoRA adapters (peft) trained on top of frozen quantbench-quantized Linear layers.

The base stays in its quantized storage the whole time: each quantized layer's forward dequantizes
its codes on the fly and gradients flow through that dequantized weight to the input and to the LoRA
matrices, never into the codes. peft has no notion of our ``QuantLinear``, so it is registered as a
custom module type mapped to :class:`QuantLoraLinear` (the same shape as peft's own GPTQ LoRA layer).

An output directory holds the adapter (``adapter_model.safetensors`` + ``adapter_config.json``, peft's
format) and ``quantbench_adapter.json`` (base model, method spec, training record), so
``quantbench.load_model(DIR)`` rebuilds base + quantization + adapter for eval, bench, generate and serve.
Checkpoints under ``DIR/checkpoints/step-N`` carry optimizer, scheduler and RNG state for resuming, stored
without pickle (``trainer_state.safetensors`` for the tensors + ``trainer_state.json`` for the rest), so a
crafted file in an output directory cannot run code when training resumes from it.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantbench.errors import QuantbenchError
from quantbench.quant.base import QuantLinear
from quantbench.train.data import IGNORE_INDEX, Example

ADAPTER_MANIFEST = "quantbench_adapter.json"
TARGET_ALIASES = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}


class FinetuneError(QuantbenchError):
    """Bad fine-tuning settings or an adapter directory that cannot be used."""


TRAIN_EXTRA_HINT = "pip install 'quantbench[train]' (or: pip install peft)"


def require_peft() -> None:
    """One-line error when the ``train`` extra (peft) is not installed."""
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise FinetuneError(f"fine-tuning needs peft, which is not installed: {TRAIN_EXTRA_HINT}")


def _lora_layer_cls() -> type[nn.Module]:
    from peft.tuners.lora.layer import LoraLayer

    class QuantLoraLinear(nn.Module, LoraLayer):
        """LoRA on a frozen quantbench ``QuantLinear``: ``base(x) + B(A(dropout(x))) * scale``."""

        def __init__(
            self,
            base_layer: nn.Module,
            adapter_name: str,
            config: Any,
            r: int = 0,
            lora_alpha: int = 1,
            **kwargs: Any,
        ) -> None:
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            if config.use_dora:
                raise FinetuneError("DoRA is not supported on quantized layers")
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features

        def resolve_lora_variant(self, *, config: Any, **kwargs: Any) -> None:
            return None

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            result = self.base_layer(x)
            if self.disable_adapters:
                return result
            out_dtype = result.dtype
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                lora_a, lora_b = self.lora_A[name], self.lora_B[name]
                h = self._cast_input_dtype(x, lora_a.weight.dtype)
                result = result + lora_b(lora_a(self.lora_dropout[name](h))) * self.scaling[name]
            return result.to(out_dtype)

    return QuantLoraLinear


def resolve_targets(targets: Sequence[str] | str) -> list[str]:
    """``q,k,v,o,gate,up,down`` -> module-name suffixes (``q_proj`` ...); other names pass through."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    return [TARGET_ALIASES.get(t.strip(), t.strip()) for t in items if t.strip()]


def lora_config(r: int, alpha: float, dropout: float, targets: Sequence[str] | str) -> Any:
    from peft import LoraConfig

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=resolve_targets(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    config._register_custom_module({QuantLinear: _lora_layer_cls()})
    return config


def attach_lora(
    model: nn.Module,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.05,
    targets: Sequence[str] | str = "q,k,v,o,gate,up,down",
) -> nn.Module:
    """Freeze ``model`` and wrap it as a peft model with fresh LoRA adapters on ``targets``."""
    require_peft()
    from peft import get_peft_model

    for param in model.parameters():
        param.requires_grad_(False)
    try:
        peft_model = get_peft_model(model, lora_config(r, alpha, dropout, targets))
    except ValueError as exc:
        raise FinetuneError(f"cannot attach LoRA: {str(exc).splitlines()[0]}") from None
    # Adapters train in fp32 whatever the compute dtype (QLoRA keeps them in higher precision).
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            param.requires_grad_(True)
    _carry_attrs(model, peft_model)
    return peft_model


def _carry_attrs(src: nn.Module, dst: nn.Module) -> None:
    for attr in ("quantbench_config", "quantbench_skipped", "quantbench_source"):
        if hasattr(src, attr):
            object.__setattr__(dst, attr, getattr(src, attr))


def base_weight_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every quantized layer's stored tensors (codes, scales): they must never change."""

    def plain(name: str) -> str:  # the same layer's name before peft wrapped it
        return name.removeprefix("base_model.model.").replace(".base_layer", "")

    return {
        f"{plain(name)}.{key}": value.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, QuantLinear)
        for key, value in module.state_dict().items()
    }


@dataclass
class TrainSettings:
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_steps: int = 5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_every: int = 50
    seed: int = 0
    gradient_checkpointing: bool = True


@dataclass
class TrainRecord:
    steps_done: int = 0
    losses: list[float] = field(default_factory=list)
    peak_memory_bytes: list[int] = field(default_factory=list)
    memory_kind: str = ""
    resumed_from: int | None = None
    seconds: float = 0.0


def check_settings(
    *,
    steps: int,
    batch_size: int,
    grad_accum: int,
    lr: float,
    warmup: int,
    max_length: int,
    save_every: int,
    lora_r: int,
    lora_dropout: float,
) -> None:
    """Reject impossible training settings before anything is loaded."""
    rules = [
        (steps >= 1, f"--steps must be >= 1, got {steps}"),
        (batch_size >= 1, f"--batch-size must be >= 1, got {batch_size}"),
        (grad_accum >= 1, f"--grad-accum must be >= 1, got {grad_accum}"),
        (math.isfinite(lr) and lr > 0, f"--lr must be a positive number, got {lr}"),
        (warmup >= 0, f"--warmup must be >= 0, got {warmup}"),
        (max_length >= 2, f"--max-length must be >= 2, got {max_length}"),
        (save_every >= 0, f"--save-every must be >= 0, got {save_every}"),
        (lora_r >= 1, f"--lora-r must be >= 1, got {lora_r}"),
        (0.0 <= lora_dropout < 1.0, f"--lora-dropout must be in [0, 1), got {lora_dropout}"),
    ]
    for ok, message in rules:
        if not ok:
            raise FinetuneError(message)


def check_out_dir(out: Path, base: str) -> None:
    """``--out`` holds the adapter and resumable checkpoints: a new or earlier finetune directory, never a
    file, the base model itself, or a quantbench checkpoint."""
    from quantbench.checkpoint import is_checkpoint_dir
    from quantbench.outputs import check_output_dir

    def is_own(path: Path) -> bool:
        return (path / ADAPTER_MANIFEST).is_file() or (path / "checkpoints").is_dir()

    if is_checkpoint_dir(out):
        raise FinetuneError(f"--out {out} is a quantbench checkpoint; give a directory for the adapter")
    check_output_dir(out, overwrite=True, inputs=[base], is_own=is_own, kind="finetune output directory")


def collate(batch: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions get attention 0 and label -100."""
    width = max(len(ex.input_ids) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def batch_indices(n_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The examples of optimizer micro-step ``step``: epochs of a seeded shuffle, so a resumed run
    sees exactly the batches the uninterrupted run would have seen."""
    per_epoch = max(1, math.ceil(n_examples / batch_size))
    epoch, pos = divmod(step, per_epoch)
    order = list(range(n_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[pos * batch_size : (pos + 1) * batch_size]


def completion_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over completion tokens, in fp32."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX
    )


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, examples: Sequence[Example], batch_size: int = 8, pad_id: int = 0
) -> float:
    """Token-weighted mean completion loss over ``examples``."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += float(completion_loss(model, batch)) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_STATE = "trainer_state.pt"  # older checkpoints; read with torch.load(weights_only=True)


def _checkpoint_dirs(out_dir: Path) -> list[Path]:
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = [
        p
        for p in root.iterdir()
        if p.is_dir()
        and p.name.startswith("step-")
        and p.name[5:].isdigit()
        and ((p / STATE_JSON).is_file() or (p / LEGACY_STATE).is_file())
    ]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def _encode_state(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able copy of a state dict tree; its tensors go to ``tensors`` under generated names."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode_state(v, tensors) for k, v in value.items()}
        return {
            "__items__": [[_encode_state(k, tensors), _encode_state(v, tensors)] for k, v in value.items()]
        }
    if isinstance(value, tuple):
        return {"__tuple__": [_encode_state(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode_state(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise FinetuneError(f"cannot store a {type(value).__name__} in a training checkpoint")


def _decode_state(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            name = value["__tensor__"]
            if not isinstance(name, str) or name not in tensors:
                raise FinetuneError(f"{where}: refers to a tensor {name!r} that {STATE_TENSORS} lacks")
            return tensors[name]
        if set(value) == {"__tuple__"} and isinstance(value["__tuple__"], list):
            return tuple(_decode_state(v, tensors, where) for v in value["__tuple__"])
        if set(value) == {"__items__"} and isinstance(value["__items__"], list):
            out = {}
            for pair in value["__items__"]:
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise FinetuneError(f"{where}: malformed item list")
                key = _decode_state(pair[0], tensors, where)
                if not isinstance(key, (str, int, float, bool)) and key is not None:
                    raise FinetuneError(f"{where}: a dictionary key must be a plain value")
                out[key] = _decode_state(pair[1], tensors, where)
            return out
        if any(isinstance(k, str) and k.startswith("__") for k in value):
            raise FinetuneError(f"{where}: unknown entry {next(iter(value))!r}")
        return {k: _decode_state(v, tensors, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_state(v, tensors, where) for v in value]
    return value


def save_trainer_state(state: dict[str, Any], ckpt: Path) -> None:
    """``state`` (optimizer / scheduler state dicts, RNG, record) as safetensors + JSON: no pickle."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode_state(state, tensors)
    save_file(tensors, str(ckpt / STATE_TENSORS))
    (ckpt / STATE_JSON).write_text(
        json.dumps({"format": "quantbench-trainer-state", "version": 1, "state": tree})
    )


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """What :func:`save_trainer_state` wrote (or an older checkpoint's ``trainer_state.pt``, read with
    ``weights_only=True``); nothing in the directory can run code. Errors are one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not (ckpt / STATE_JSON).is_file():
        try:
            state = torch.load(ckpt / LEGACY_STATE, weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - unpickling refused or a corrupt file: cannot resume
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise FinetuneError(f"cannot resume from {ckpt / LEGACY_STATE}: {first[:200]}") from None
    else:
        where = str(ckpt / STATE_JSON)
        try:
            doc = json.loads((ckpt / STATE_JSON).read_text(encoding="utf-8"))
            tensors = load_file(str(ckpt / STATE_TENSORS))
        except (OSError, ValueError, SafetensorError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise FinetuneError(f"cannot resume from {ckpt}: {first[:200]}") from None
        if not isinstance(doc, dict) or doc.get("format") != "quantbench-trainer-state":
            raise FinetuneError(f"{where} is not a quantbench trainer state")
        state = _decode_state(doc.get("state"), tensors, where)
    required = {"step": int, "optimizer": dict, "scheduler": dict, "record": dict, "torch_rng": torch.Tensor}
    if not isinstance(state, dict) or any(not isinstance(state.get(k), t) for k, t in required.items()):
        raise FinetuneError(f"cannot resume from {ckpt}: the trainer state is incomplete")
    return state


def _save_checkpoint(
    model: nn.Module, optimizer: Any, scheduler: Any, step: int, record: TrainRecord, out_dir: Path
) -> Path:
    root = out_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    save_trainer_state(
        {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "record": asdict(record),
            "torch_rng": torch.get_rng_state(),
        },
        tmp,
    )
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # a checkpoint exists only once it is complete
    return final


def _load_adapter_weights(model: nn.Module, ckpt: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))


def train_lora(
    model: nn.Module,
    examples: Sequence[Example],
    settings: TrainSettings,
    out_dir: str | Path,
    pad_id: int = 0,
    resume: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    progress: bool = True,
) -> TrainRecord:
    """Train the LoRA parameters of a peft ``model`` (see :func:`attach_lora`) on ``examples``.

    Cosine schedule with linear warm-up, AdamW on the adapter parameters only, gradient
    checkpointing, a checkpoint every ``save_every`` steps; with ``resume`` the latest complete
    checkpoint in ``out_dir`` is picked up. ``on_step(step, loss)`` is called after every step.
    """
    from transformers import get_cosine_schedule_with_warmup

    from quantbench.eval.memory import peak_bytes, reset_peak

    if not examples:
        raise FinetuneError("no training examples")
    out = Path(out_dir)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise FinetuneError("the model has no trainable (LoRA) parameters")
    torch.manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, settings.warmup_steps, settings.steps)
    record = TrainRecord()
    start_step = 0
    if resume and (ckpts := _checkpoint_dirs(out)):
        ckpt = ckpts[-1]
        state = load_trainer_state(ckpt)
        try:
            _load_adapter_weights(model, ckpt)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
            record = TrainRecord(**state["record"])
        except (KeyError, TypeError, ValueError, RuntimeError, OSError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise FinetuneError(f"cannot resume from {ckpt}: {first[:200]}") from None
        start_step = record.resumed_from = int(state["step"])
    if settings.gradient_checkpointing:
        _set_checkpointing(model, True)
    model.train()
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [
        TextColumn("finetune"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
    ]
    started = time.perf_counter()
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task("train", total=settings.steps, completed=start_step, status="")
        for step in range(start_step, settings.steps):
            reset_peak(device)
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for micro in range(settings.grad_accum):
                idx = batch_indices(
                    len(examples), settings.batch_size, step * settings.grad_accum + micro, settings.seed
                )
                batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
                loss = completion_loss(model, batch) / settings.grad_accum
                loss.backward()
                loss_sum += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            peak, kind = peak_bytes(device)
            record.steps_done = step + 1
            record.losses.append(loss_sum)
            record.peak_memory_bytes.append(peak)
            record.memory_kind = kind
            bar.update(task, advance=1, status=f"loss {loss_sum:.4f}  peak {peak / 2**30:.2f} GiB")
            if on_step is not None:
                on_step(step + 1, loss_sum)
            if settings.save_every and (step + 1) % settings.save_every == 0 and step + 1 < settings.steps:
                record.seconds += time.perf_counter() - started
                started = time.perf_counter()
                _save_checkpoint(model, optimizer, scheduler, step + 1, record, out)
    record.seconds += time.perf_counter() - started
    _set_checkpointing(model, False)
    model.eval()
    return record


def _set_checkpointing(model: nn.Module, on: bool) -> None:
    """Activation (gradient) checkpointing through whichever name this transformers version uses."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()


# ---------------------------------------------------------------------------------------------
# The adapter directory: save, load on its quantized base, merge into a 16-bit copy
# ---------------------------------------------------------------------------------------------


def base_digest(model: nn.Module) -> str:
    """sha256 over every quantized layer's stored tensors (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    tensors = base_weight_tensors(model)
    for name in sorted(tensors):
        t = tensors[name].contiguous().cpu()
        flat = t.reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _base_reference(base: str) -> str:
    """A packaged name stays a name; a path is stored absolute so the adapter loads from anywhere."""
    path = Path(base).expanduser()
    return str(path.resolve()) if path.exists() else base


def save_adapter(
    model: nn.Module, out_dir: str | Path, base: str, method: str, extra: dict[str, Any] | None = None
) -> Path:
    """Write the LoRA adapter of a peft ``model`` (peft's format) plus ``quantbench_adapter.json``:
    base model, quantization spec and the digest of the frozen base codes it was trained on."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    manifest = {
        "format": "quantbench-adapter",
        "version": 1,
        "base": _base_reference(base),
        "method": method,
        "base_digest": base_digest(model),
        **(extra or {}),
    }
    (out / ADAPTER_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def read_adapter_manifest(adapter_dir: str | Path) -> dict[str, Any]:
    path = Path(adapter_dir) / ADAPTER_MANIFEST
    try:
        manifest = json.loads(path.read_text())
        for key in ("base", "method"):
            if not isinstance(manifest.get(key), str):
                raise FinetuneError(f"{path}: field {key!r} is missing or not a string")
    except FileNotFoundError:
        raise FinetuneError(f"{path} does not exist: not a quantbench finetune output") from None
    except json.JSONDecodeError as exc:
        raise FinetuneError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (Path(adapter_dir) / name).exists():
            raise FinetuneError(f"{Path(adapter_dir) / name} is missing")
    return manifest


def _adapter_settings(adapter_dir: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        return {
            "r": int(cfg["r"]),
            "alpha": float(cfg["lora_alpha"]),
            "targets": sorted(cfg["target_modules"]),
        }
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise FinetuneError(f"{adapter_dir / 'adapter_config.json'} cannot be used: {exc}") from None


def load_adapter_model(adapter_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """Base model + its quantization + the trained adapter, in eval mode (a peft model).

    The base is re-quantized with the recorded spec and must reproduce the codes the adapter was
    trained on (checked against the stored digest)."""
    from quantbench.models import load_model
    from quantbench.quant.apply import quantize

    path = Path(adapter_dir)
    manifest = read_adapter_manifest(path)
    model, tokenizer = load_model(manifest["base"], dtype="fp32", device=device)
    if getattr(model, "quantbench_config", None) is None:
        quantize(model, manifest["method"])
    digest = manifest.get("base_digest")
    if digest and base_digest(model) != digest:
        raise FinetuneError(
            f"{path}: the base {manifest['base']!r} quantized with {manifest['method']!r} does not give the "
            "codes this adapter was trained on"
        )
    settings = _adapter_settings(path)
    peft_model = attach_lora(model, settings["r"], settings["alpha"], 0.0, settings["targets"])
    _load_adapter_weights(peft_model, path)
    for param in peft_model.parameters():
        param.requires_grad_(False)
    peft_model.eval()
    source = dict(getattr(model, "quantbench_source", {}))
    source["adapter"] = str(path.resolve())
    object.__setattr__(peft_model, "quantbench_source", source)
    return peft_model, tokenizer


def merge_and_quantize(
    adapter_dir: str | Path, spec: str, out_dir: str | Path, device: str | torch.device = "cpu"
) -> Path:
    """Merge the adapter into an unquantized copy of its base (fp32 merge), quantize that with
    ``spec`` and save a quantbench checkpoint to ``out_dir`` (loads with ``quantbench.load_model``)."""
    require_peft()
    from peft import LoraConfig, get_peft_model

    from quantbench.checkpoint import save_quantized
    from quantbench.models import load_model
    from quantbench.quant.apply import quantize

    path = Path(adapter_dir)
    manifest = read_adapter_manifest(path)
    model, tokenizer = load_model(manifest["base"], dtype="fp32", device=device)
    if getattr(model, "quantbench_config", None) is not None:
        raise FinetuneError(
            f"the base {manifest['base']!r} is itself a quantized checkpoint: merging needs the 16-bit model"
        )
    settings = _adapter_settings(path)
    lora = LoraConfig(
        r=settings["r"],
        lora_alpha=settings["alpha"],
        lora_dropout=0.0,
        target_modules=settings["targets"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    _load_adapter_weights(peft_model, path)
    merged = peft_model.merge_and_unload()
    source = dict(getattr(model, "quantbench_source", {}))
    source["merged_adapter"] = str(path.resolve())
    merged.quantbench_source = source
    quantize(merged, spec)
    return save_quantized(merged, tokenizer, out_dir, overwrite=True)  # the merged/ dir of a rerun
