"""A lean forward for the Llama / Mistral / Qwen2 family over an HF model's own weights.

``EngineModel`` reads the HF modules once: per layer the two RMSNorm weights and the seven linears,
fused where the module type allows it (q/k/v into one ``qkv`` product, gate/up into one ``gate_up``
product; the HF modules are left pointing at views of the fused storage, so no memory is doubled).
It owns a static KV cache ``[layers, B, HKV, S, D]`` and two entry points:

* ``prefill(ids, start)``: the prompt in one pass (SDPA), cache rows ``0..T-1``, last-token logits;
* ``decode(tokens, cache_len, start)``: one token per sequence at cache index ``cache_len`` (a device
  scalar shared by all rows, or one per row), fixed shapes and no host synchronisation, so the whole step
  can be captured in a CUDA graph.

A third entry point serves scoring (evaluation, perplexity), where sequences share prefixes and are
right-padded: ``extend(ids, positions, past=..., index=..., scored=...)`` runs new tokens at explicit
positions after a :class:`KVBlock` of earlier ones (row b continues past sequence ``index[b]``), returns
the final-normed hidden states of the ``scored`` positions only and, when asked, the keys and values of
past + new tokens (for the next step). It keeps no state of its own.

``start[b]`` is the left padding of sequence b (its RoPE positions count from there). A generation loop
that runs requests of different lengths side by side (``engine.slots``) keeps one cache row per request
and one ``cache_len`` per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantbench.engine.kernels.layouts import optional_quant_class
from quantbench.engine.ops import Ops, extend_mask
from quantbench.engine.options import DEFAULT_OPTIONS, EngineOptions
from quantbench.quant.base import QuantLinear

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


def unsupported_reason(model: nn.Module) -> str | None:
    """None when the engine can run ``model``, else why not (the caller falls back to HF generate)."""
    config = getattr(model, "config", None)
    if config is None:
        return "not a Hugging Face model"
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_TYPES:
        return f"architecture '{model_type}' is not in the engine's family ({', '.join(SUPPORTED_TYPES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act} (engine does SiLU-gated MLPs)"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "unexpected module layout"
    head_dim = _head_dim(config)
    if head_dim % 2 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two"
    return None


def sliding_window(config) -> int | None:
    window = getattr(config, "sliding_window", None)
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    return window or None


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LinearOp:
    """One or more linears applied to the same input, outputs concatenated along the last dim."""

    def __init__(
        self, modules: list[nn.Module], use_kernels: bool, options: EngineOptions = DEFAULT_OPTIONS
    ) -> None:
        self.modules = modules
        self.use_kernels = use_kernels
        self.options = options
        self.layouts: list = []
        if use_kernels:
            from quantbench.engine.kernels import layout_for
            from quantbench.engine.kernels.layouts import plain_layout_for

            self.layouts = [layout_for(m) if isinstance(m, QuantLinear) else None for m in modules]
            # plain bf16 / fp16 linears: the tensor-core GEMV where options.plain_* allow it, else cuBLAS
            self.plain = [plain_layout_for(m) if type(m) is nn.Linear else None for m in modules]
        else:
            self.layouts = [None] * len(modules)
            self.plain = [None] * len(modules)
        # The down projection reads silu(gate) * up on the fly when every part has a kernel.
        self.fuses_act = use_kernels and all(lay is not None for lay in self.layouts)
        self.out_features = sum(m.out_features for m in modules)
        self.in_features = modules[0].in_features

    def weight_bytes(self) -> int:
        total = 0
        for m in self.modules:
            for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
                total += t.numel() * t.element_size()
        return total

    def outlier_columns(self, m: int):
        """For a kernel writing this product's input of ``m`` tokens: where it is one LLM.int8 layer whose
        activation quantization would pass over that input for its outlier columns, a buffer to record them
        in as the input is written (``fused.outlier_columns``); else None."""
        layout = self.layouts[0] if len(self.layouts) == 1 else None
        if layout is None or not layout.w32.is_cuda:
            return None
        from quantbench.engine.kernels.fused import outlier_columns

        return outlier_columns(m, layout, layout.w32.device, self.options)

    def __call__(self, x, act_silu_mul: bool = False, partials: bool = False, outliers=None):
        """The product of ``x`` (a tensor, or the previous product's split-K partials); ``partials``: the
        result may be left as split-K partials too (one module, a tensor-core GEMV: ``kernels/partials.py``),
        for a consumer that takes them; ``outliers``: x's LLM.int8 outlier columns (``outlier_columns``),
        recorded as x was written."""
        if not isinstance(x, torch.Tensor):  # Partials: SiLU-gate them, or sum them, before any other path
            from quantbench.engine.kernels.fused import silu_mul

            x = silu_mul(x, options=self.options) if act_silu_mul else x.sum()
            act_silu_mul = False
        if act_silu_mul and not self.fuses_act:
            from quantbench.engine.ops import silu_mul_ref

            if self.use_kernels:
                from quantbench.engine.kernels.fused import silu_mul

                x = silu_mul(x, options=self.options)
            else:
                x = silu_mul_ref(x)
            act_silu_mul = False
        partials = partials and len(self.modules) == 1
        outs = [
            self._one(m, lay, plain, x, act_silu_mul, partials, outliers)
            for m, lay, plain in zip(self.modules, self.layouts, self.plain, strict=True)
        ]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def _one(self, module: nn.Module, layout, plain, x: torch.Tensor, act: bool, partials: bool, outliers=None):
        if layout is not None:
            from quantbench.engine.kernels import linear

            return linear(layout, x, act_silu_mul=act, partials=partials, options=self.options, outliers=outliers)
        if isinstance(module, QuantLinear):
            return module(x)
        if plain is not None:  # act is False here: a plain part means the caller applied SiLU-gate already
            from quantbench.engine.kernels.routing import Kernel, Operands, route_plain

            target = Operands(x, plain, self.options)
            if route_plain(x.shape[0], plain, x.dtype, target, self.options) is Kernel.MMA_GEMV:
                from quantbench.engine.kernels.mma_gemv import mma_gemv

                return mma_gemv(x, plain, partials=partials, options=self.options)
        return F.linear(x, module.weight, module.bias)


# ---------------------------------------------------------------------------------------------
# Fusing q/k/v and gate/up


def _views_into(fused: torch.Tensor, parts: list[torch.Tensor], dim: int = 0) -> list[torch.Tensor]:
    views, offset = [], 0
    for p in parts:
        size = p.shape[dim]
        views.append(fused.narrow(dim, offset, size))
        offset += size
    return views


def fuse_linears(modules: list[nn.Module]) -> list[nn.Module]:
    """One module computing all of ``modules`` (outputs concatenated), or the list unchanged.

    Fuses plain ``nn.Linear`` (bf16/fp16 weights), RTN-layout modules (int4/int8, GPTQ without
    act-order, AWQ), the W8A8 modules (fp8, LLM.int8, SmoothQuant), bitsandbytes 4-bit without double
    quantization when the block size divides ``in_features``, and llama.cpp blocks of one GGML type (a
    mix such as q4_k_m may give q/k and v different types: those stay apart). The original modules then
    hold views of the fused buffers.
    """
    first = modules[0]
    if len(modules) == 1 or any(type(m) is not type(first) for m in modules):
        return modules
    if any(m.in_features != first.in_features for m in modules):
        return modules
    if any((m.bias is None) != (first.bias is None) for m in modules):
        return modules
    if type(first) is nn.Linear:
        return [_fuse_dense(modules)]
    from quantbench.quant.rtn import RTNLinear

    if any(m.tiling != first.tiling for m in modules):
        return modules
    if isinstance(first, RTNLinear):
        if any(getattr(m, "g_idx", None) is not None or m.config != first.config for m in modules):
            return modules
        return [_fuse_quant(modules, ("qweight", "scales", "qzeros"), flat=False)]
    ggml = optional_quant_class("ggml", "GGMLLinear")
    if ggml is not None and isinstance(first, ggml):  # rows of whole blocks: concatenating rows is fusing
        if any(m.ggml_type != first.ggml_type or m.config != first.config for m in modules):
            return modules
        return [_fuse_quant(modules, ("blocks",), flat=False, ggml_type=first.ggml_type)]
    # W8A8 (per-row weight scales, per-token activation quantization): the parts share their input, so
    # the same activation scales / LLM.int8 outlier columns; concatenating rows is the same function.
    for mod_name, cls_name, names in _W8A8_FUSE:
        cls = optional_quant_class(mod_name, cls_name)
        if cls is not None and isinstance(first, cls):
            if any(m.config != first.config for m in modules):
                return modules
            return [_fuse_quant(modules, names, flat=False)]
    try:
        from quantbench.quant.bnb4 import Bnb4Linear
    except ImportError:  # pragma: no cover
        return modules
    if isinstance(first, Bnb4Linear):
        if first.double_quant or first.in_features % first.blocksize:
            return modules
        if any(m.config != first.config for m in modules):
            return modules
        return [_fuse_quant(modules, ("qweight", "absmax"), flat=True)]
    return modules


_W8A8_FUSE = (
    ("fp8", "FP8Linear", ("qweight", "weight_scale")),
    ("llm_int8", "LLMInt8Linear", ("qweight", "row_absmax")),
    ("smoothquant", "SmoothQuantLinear", ("qweight", "wscales")),
)


def _fuse_dense(modules: list[nn.Module]) -> nn.Module:
    first = modules[0]
    out = sum(m.out_features for m in modules)
    with torch.device("meta"):
        fused = nn.Linear(first.in_features, out, bias=first.bias is not None)
    weight = torch.cat([m.weight.data for m in modules])
    fused.weight = nn.Parameter(weight, requires_grad=False)
    for m, view in zip(modules, _views_into(weight, [m.weight for m in modules]), strict=True):
        m.weight = nn.Parameter(view, requires_grad=False)
    if first.bias is not None:
        bias = torch.cat([m.bias.data for m in modules])
        fused.bias = nn.Parameter(bias, requires_grad=False)
        for m, view in zip(modules, _views_into(bias, [m.bias for m in modules]), strict=True):
            m.bias = nn.Parameter(view, requires_grad=False)
    return fused


def _fuse_quant(modules: list[nn.Module], names: tuple[str, ...], flat: bool, **layer_options) -> nn.Module:
    """``layer_options``: constructor arguments beyond the config (a GGML layer's type)."""
    first = modules[0]
    out = sum(m.out_features for m in modules)
    with torch.device("meta"):
        fused = type(first)(first.in_features, out, first.bias is not None, first.config, **layer_options)
    for name in (*names, "bias"):
        parts = [getattr(m, name) for m in modules]
        if parts[0] is None:
            continue
        whole = torch.cat([p.reshape(-1) if flat else p for p in parts])
        if name == "bias":
            fused.bias = nn.Parameter(whole, requires_grad=False)
        else:
            setattr(fused, name, whole)
        views = _views_into(whole, [p.reshape(-1) if flat else p for p in parts])
        for m, p, view in zip(modules, parts, views, strict=True):
            view = view.view(p.shape)
            if name == "bias":
                m.bias = nn.Parameter(view, requires_grad=False)
            else:
                setattr(m, name, view)
    if first.tiling:  # parts stored tile-major (an earlier engine): their concatenation is the fused tiling
        fused.mark_tiled(first.tiling)
    return fused


# ---------------------------------------------------------------------------------------------


@dataclass
class Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: LinearOp
    o: LinearOp
    gate_up: LinearOp
    down: LinearOp


def store_tiled(
    fused: list[nn.Module], originals: list[nn.Module], options: EngineOptions = DEFAULT_OPTIONS
) -> None:
    """Store each quantized module of ``fused`` tile-major for the batch-1 GEMV (``layouts.tiling_for``).

    A fused module's buffers are shared with ``originals`` (views of its storage): they are marked too,
    so the HF modules keep computing the same function (their kernels read the tiles, their reference
    forwards untile a copy). Nothing happens when a shape does not divide into tiles."""
    from quantbench.engine.kernels.layouts import tiling_for

    for module in fused:
        if not isinstance(module, QuantLinear):
            continue
        tiles = tiling_for(module, options)
        if tiles is None:
            continue
        shared = (
            [m for m in originals if m is not module and isinstance(m, QuantLinear)]
            if module not in originals
            else []
        )
        if any(m.out_features % tiles["qweight"][0] for m in shared):
            continue  # a part would straddle tiles
        module.store_tiled(tiles)
        for m in shared:
            m.mark_tiled(tiles)


@dataclass
class KVBlock:
    """Keys and values (RoPE applied) of a batch of sequences, per layer ``[N, HKV, S, D]``; ``valid [N, S]``
    (bool) marks the columns that hold real tokens."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    valid: torch.Tensor

    @property
    def width(self) -> int:
        return int(self.valid.shape[1])


class EngineModel:
    def __init__(
        self,
        model: nn.Module,
        use_kernels: bool | None = None,
        fuse: bool = True,
        tile: bool | None = None,
        options: EngineOptions = DEFAULT_OPTIONS,
    ) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(reason)
        cfg = model.config
        inner = model.model
        self.model = model
        self.config = cfg
        self.device = next(model.parameters()).device
        self.dtype = inner.embed_tokens.weight.dtype
        if use_kernels is None:
            from quantbench.engine.kernels import triton_available

            use_kernels = self.device.type == "cuda" and triton_available()
        self.use_kernels = use_kernels
        self.options = options
        if tile is None:  # tile-major weights for the CUDA GEMV (options.tile)
            tile = use_kernels and self.device.type == "cuda" and options.tile
        self.ops = Ops(use_kernels, options)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = _head_dim(cfg)
        self.hidden = cfg.hidden_size
        self.sm_scale = self.head_dim**-0.5
        self.eps = inner.norm.variance_epsilon
        self.embed = inner.embed_tokens
        self.norm_w = inner.norm.weight
        self.layers: list[Layer] = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            parts = (
                [attn.q_proj, attn.k_proj, attn.v_proj],
                [mlp.gate_proj, mlp.up_proj],
                [attn.o_proj],
                [mlp.down_proj],
            )
            groups = [fuse_linears(p) for p in parts] if fuse else list(parts)  # one module stays as it is
            if tile:
                for group, part in zip(groups, parts, strict=True):
                    store_tiled(group, part, options)
            qkv, gate_up, o, down = (LinearOp(group, use_kernels, options) for group in groups)
            self.layers.append(
                Layer(
                    ln1=layer.input_layernorm.weight,
                    ln2=layer.post_attention_layernorm.weight,
                    qkv=qkv,
                    o=o,
                    gate_up=gate_up,
                    down=down,
                )
            )
        self.lm_head = LinearOp([model.lm_head], use_kernels, options)
        self.rotary = inner.rotary_emb
        self.max_len = 0
        self.cos = self.sin = None
        self.k_cache = self.v_cache = None

    # ---- state ----
    def ensure_rope(self, length: int) -> None:
        if self.cos is not None and self.cos.shape[0] >= length:
            return
        pos = torch.arange(length, device=self.device)[None]
        dummy = torch.zeros(1, device=self.device, dtype=torch.float32)
        cos, sin = self.rotary(dummy, pos)
        cos, sin = cos[0].float(), sin[0].float()
        half = self.head_dim // 2
        if not (torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])):
            raise ValueError("rotary embedding is not rotate-half RoPE")
        self.cos, self.sin = cos[:, :half].contiguous(), sin[:, :half].contiguous()

    def allocate_cache(self, batch: int, max_len: int) -> None:
        """Static KV cache for ``batch`` sequences of up to ``max_len`` tokens (reused when it fits)."""
        shape = (len(self.layers), batch, self.n_kv, max_len, self.head_dim)
        if self.k_cache is not None and self.k_cache.shape == shape:
            return
        self.k_cache = self.v_cache = None
        self.k_cache = torch.empty(shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.empty(shape, device=self.device, dtype=self.dtype)
        self.max_len = max_len
        self.ensure_rope(max_len)

    def resize_cache(self, batch: int, max_len: int) -> None:
        """Make the cache ``batch`` x ``max_len``, keeping the rows and positions both sizes share."""
        old_k, old_v = self.k_cache, self.v_cache
        self.k_cache = self.v_cache = None
        self.allocate_cache(batch, max_len)
        if old_k is not None:
            rows, cols = min(batch, old_k.shape[1]), min(max_len, old_k.shape[3])
            self.k_cache[:, :rows, :, :cols].copy_(old_k[:, :rows, :, :cols])
            self.v_cache[:, :rows, :, :cols].copy_(old_v[:, :rows, :, :cols])

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads (all linears, norms; embedding rows are negligible)."""
        total = self.lm_head.weight_bytes() + self.norm_w.numel() * self.norm_w.element_size()
        for layer in self.layers:
            for op in (layer.qkv, layer.o, layer.gate_up, layer.down):
                total += op.weight_bytes()
            total += (layer.ln1.numel() + layer.ln2.numel()) * layer.ln1.element_size()
        return total

    # ---- forward ----
    def _norm_into(self, h: torch.Tensor, residual, weight: torch.Tensor, x: torch.Tensor, consumer: LinearOp):
        """``h += residual; x = rmsnorm(h) * weight`` for the product ``consumer``, recording x's LLM.int8
        outlier columns where that product quantizes them (``LinearOp.outlier_columns``); returns those."""
        outliers = consumer.outlier_columns(h.shape[0])
        if outliers is None:
            self.ops.add_rmsnorm(h, residual, weight, self.eps, x)
        else:
            self.ops.add_rmsnorm(h, residual, weight, self.eps, x, outliers=outliers)
        return outliers

    def prefill(
        self,
        ids: torch.Tensor,
        start: torch.Tensor,
        padded: bool,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run the prompt ``ids [B, T]``; fills cache rows 0..T-1; returns last-position logits [B, V].

        ``cache``: (keys, values) ``[layers, B, HKV, >= T, D]`` to fill instead of the model's own cache (a
        view of some of its rows, or a scratch cache whose rows are then copied into it)."""
        k_all, v_all = cache if cache is not None else (self.k_cache, self.v_cache)
        b, t = ids.shape
        ops = self.ops
        h = self.embed(ids).reshape(b * t, self.hidden)
        x = torch.empty_like(h)
        q = torch.empty((b, self.n_heads, t, self.head_dim), device=self.device, dtype=self.dtype)
        pending = None
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(x, outliers=self._norm_into(h, pending, layer.ln1, x, layer.qkv))
            kc, vc = k_all[i], v_all[i]
            ops.rope_cache_prefill(
                qkv, q, kc, vc, self.cos, self.sin, start, self.n_heads, self.n_kv, self.head_dim
            )
            attn = ops.prefill_attention(
                q, kc[:, :, :t], vc[:, :, :t], start if padded else None, self.sm_scale
            )
            attn = attn.transpose(1, 2).reshape(b * t, self.n_heads * self.head_dim)
            o = layer.o(attn)
            gate_up = layer.gate_up(x, outliers=self._norm_into(h, o, layer.ln2, x, layer.gate_up))
            pending = layer.down(gate_up, act_silu_mul=True)
        last_h = h.view(b, t, self.hidden)[:, -1]
        last_p = pending.view(b, t, self.hidden)[:, -1]
        x_last = torch.empty((b, self.hidden), device=self.device, dtype=self.dtype)
        ops.add_rmsnorm(last_h, last_p, self.norm_w, self.eps, x_last)
        return self.lm_head(x_last)

    def decode(
        self, tokens: torch.Tensor, cache_len: torch.Tensor, start: torch.Tensor, columns: int | None = None
    ) -> torch.Tensor:
        """One step: ``tokens [B]`` at cache index ``cache_len`` -> logits [B, V].

        ``cache_len``: int32 on the device, ``[1]`` (every row) or ``[B]`` (one per row). The step reads the
        first B rows of the cache and, with ``columns``, only its first ``columns`` positions (which must
        hold every row's ``cache_len``): the attention kernel sizes its work by the cache it is given."""
        ops = self.ops
        rows = tokens.shape[0]
        width = self.max_len if columns is None else columns
        h = self.embed(tokens)
        x = torch.empty_like(h)
        attn = torch.empty((h.shape[0], self.n_heads * self.head_dim), device=self.device, dtype=self.dtype)
        pending = None
        # products stay split-K partials for the kernel that reads them next (kernels/partials.py)
        part = self.use_kernels
        for i, layer in enumerate(self.layers):
            ops.add_rmsnorm(h, pending, layer.ln1, self.eps, x)
            qkv = layer.qkv(x, partials=part)
            ops.decode_attention(
                qkv,
                self.k_cache[i][:rows, :, :width],
                self.v_cache[i][:rows, :, :width],
                self.cos,
                self.sin,
                cache_len,
                start,
                attn,
                self.n_heads,
                self.n_kv,
                self.head_dim,
                self.sm_scale,
            )
            o = layer.o(attn, partials=part)
            ops.add_rmsnorm(h, o, layer.ln2, self.eps, x)
            pending = layer.down(layer.gate_up(x, partials=part), act_silu_mul=True, partials=part)
        ops.add_rmsnorm(h, pending, self.norm_w, self.eps, x)
        return self.lm_head(x)

    @torch.inference_mode()
    def extend(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        *,
        valid: torch.Tensor | None = None,
        past: KVBlock | None = None,
        index: torch.Tensor | None = None,
        scored: torch.Tensor | None = None,
        keep_kv: bool = False,
    ) -> tuple[torch.Tensor | None, KVBlock | None]:
        """Run ``ids [B, T]`` (right-padded; ``valid [B, T]`` marks real tokens, default all) at RoPE
        ``positions [B, T]`` after ``past``: row b attends to the real tokens of past sequence ``index[b]``
        (default b) and causally to its own tokens.

        Returns the final-normed hidden states ``[B, K, hidden]`` at ``scored [B, K]`` (indices into T; None:
        no head input is computed) and, with ``keep_kv``, the :class:`KVBlock` of past + these tokens."""
        b, t = ids.shape
        ops = self.ops
        self.ensure_rope(int(positions.max()) + 1)
        past_valid = None
        if past is not None:
            past_valid = past.valid if index is None else past.valid[index]
        # the reference's additive mask, built once per forward (the Triton kernel reads the past's real
        # columns itself)
        mask = extend_mask(past_valid, t, self.n_heads // self.n_kv, self.dtype) if ops.extend_mask else None
        h = self.embed(ids).reshape(b * t, self.hidden)
        x = torch.empty_like(h)
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        pending = None
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(x, outliers=self._norm_into(h, pending, layer.ln1, x, layer.qkv))
            pk, pv, pvalid = (None, None, None) if past is None else (past.k[i], past.v[i], past.valid)
            # the Triton kernel records the o projection's LLM.int8 outlier columns as it writes its input
            o_rec = None if ops.extend_mask else layer.o.outlier_columns(b * t)
            # with a past, keep_kv keeps each row's past followed by these tokens (generation)
            attn, k, v = ops.extend_attention(
                qkv, positions, self.cos, self.sin, pk, pv, pvalid, index, mask,
                self.n_heads, self.n_kv, self.head_dim, self.sm_scale, with_past=keep_kv,
                **({} if o_rec is None else {"outliers": o_rec}),
            )  # fmt: skip
            if keep_kv and past is None:  # own storage: the fused product (queries too) is not kept alive
                k, v = k.contiguous(), v.contiguous()
            if keep_kv:
                keys.append(k)
                values.append(v)
            o = layer.o(attn, outliers=o_rec)
            gate_up = layer.gate_up(x, outliers=self._norm_into(h, o, layer.ln2, x, layer.gate_up))
            pending = layer.down(gate_up, act_silu_mul=True)
        kv = None
        if keep_kv:
            own = torch.ones((b, t), dtype=torch.bool, device=self.device) if valid is None else valid.bool()
            kv = KVBlock(keys, values, own if past_valid is None else torch.cat([past_valid, own], dim=1))
        if scored is None:
            return None, kv
        rows = (torch.arange(b, device=self.device)[:, None] * t + scored.to(self.device)).reshape(-1)
        last_h, last_p = h[rows], pending[rows]
        out = torch.empty_like(last_h)
        ops.add_rmsnorm(last_h, last_p, self.norm_w, self.eps, out)
        return out.view(b, scored.shape[1], self.hidden), kv
