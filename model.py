"""A Llama-family GPT in one file: config, model, RoPE, static KV cache and TinyLlama's weight init, with per-row
positions, attention masks and KV-cache rows for batches whose rows differ (packed documents, a context shared by
several continuations, rows at different lengths, a new sequence in one row while the others decode).

Lit-gpt conventions (`Config.from_name`, `transformer.wte / h / ln_f`, `lm_head`), Hugging Face numerics
(rotate-half RoPE, so HF weights load without permutation). Imports torch, and flash_attn only if installed.
"""

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


@dataclass
class Config:
    name: str = ""
    block_size: int = 2048
    vocab_size: int = 32000
    padding_multiple: int = 64
    padded_vocab_size: Optional[int] = None
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_query_groups: Optional[int] = None
    head_size: Optional[int] = None
    rope_base: int = 10000
    rope_condense_ratio: int = 1
    intermediate_size: Optional[int] = None
    norm_eps: float = 1e-5
    bias: bool = False
    tie_embeddings: bool = False  # one tensor is the token embedding and the head (HF's tie_word_embeddings)

    def __post_init__(self):
        if self.padded_vocab_size is None:
            self.padded_vocab_size = find_multiple(self.vocab_size, self.padding_multiple)
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.head_size is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
            self.head_size = self.n_embd // self.n_head
        if self.n_head % self.n_query_groups:
            raise ValueError(f"n_head={self.n_head} must be divisible by n_query_groups={self.n_query_groups}")
        if self.intermediate_size is None:
            raise ValueError(f"Config {self.name!r}: intermediate_size is required for the SwiGLU MLP")
        if self.head_size % 2:
            raise ValueError(f"head_size={self.head_size} must be even: RoPE rotates pairs of channels")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        if name not in configs:
            raise ValueError(f"Unknown config name {name!r}; known names: {', '.join(cls.names())}")
        return cls(**{**configs[name], **overrides})

    @classmethod
    def names(cls) -> list:
        return sorted(configs)

    @classmethod
    def from_file(cls, path: Union[str, Path], **overrides: Any) -> "Config":
        path = Path(path)
        if path.is_dir():
            path = path / "model_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"Model config {str(path)!r} does not exist")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}): expected the model config that save_model_dir "
                             f"writes") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path} holds a JSON {type(values).__name__}: expected an object of config fields")
        # RoPE on every channel (Llama's, and what HF can load): checkpoints written before the field went hold 1.0
        rotary_percentage = values.pop("rotary_percentage", 1.0)
        if rotary_percentage != 1.0:
            raise ValueError(f"{path}: rotary_percentage={rotary_percentage}; this model applies RoPE to every "
                             f"channel of a head (1.0), as Llama does")
        values = {**values, **overrides}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown config keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**values)


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


configs = {
    # TinyLlama-1.1B: 1,100,048,384 parameters
    "tiny_LLaMA_1b": dict(
        block_size=2048, vocab_size=32000, n_layer=22, n_head=32, n_embd=2048, n_query_groups=4,
        intermediate_size=5632,
    ),
    # TinyLlama's code continuation: 8k context through 4x position interpolation
    "code_tiny_LLaMA_1b": dict(
        block_size=8192, vocab_size=32000, n_layer=22, n_head=32, n_embd=2048, n_query_groups=4,
        intermediate_size=5632, rope_condense_ratio=4,
    ),
    "tiny_LLaMA_120M": dict(
        block_size=2048, vocab_size=32000, n_layer=12, n_head=12, n_embd=768, n_query_groups=1,
        intermediate_size=2048,
    ),
    # AMD-Llama-135m: 134,105,856 parameters
    "AMD-Llama-135m": dict(
        block_size=2048, vocab_size=32000, n_layer=12, n_head=12, n_embd=768, intermediate_size=2048,
    ),
    "Llama-2-7b-hf": dict(
        block_size=4096, vocab_size=32000, n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008,
    ),
    "CodeLlama-7b-hf": dict(
        block_size=16384, vocab_size=32016, padded_vocab_size=32016, n_layer=32, n_head=32, n_embd=4096,
        intermediate_size=11008, rope_base=1000000,
    ),
    "open_llama_3b": dict(
        block_size=2048, vocab_size=32000, n_layer=26, n_head=32, n_embd=3200, intermediate_size=8640,
        norm_eps=1e-6,
    ),
    # Small configs for the CPU demo and the tests
    "demo": dict(
        block_size=256, vocab_size=4096, n_layer=4, n_head=4, n_embd=256, n_query_groups=2,
        intermediate_size=704,
    ),
    # The target that bench/speculative.py pairs with "demo" as its draft: ~6x demo's FLOPs per token, same tokenizer
    "demo-512": dict(
        block_size=256, vocab_size=4096, n_layer=8, n_head=8, n_embd=512, n_query_groups=4,
        intermediate_size=1408,
    ),
    "micro": dict(
        block_size=64, vocab_size=256, n_layer=2, n_head=4, n_embd=64, n_query_groups=2, intermediate_size=176,
    ),
}
for _name, _values in configs.items():
    _values["name"] = _name


class GPT(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=RMSNorm(config.n_embd, eps=config.norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.tie_weights()
        cos, sin = build_rope_cache(config)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.register_buffer("mask_cache", None, persistent=False)
        self.reset_parameters()

    def tie_weights(self) -> None:
        """tie_embeddings: the head's weight is the embedding's Parameter (again after to_empty or assign=True)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def reset_parameters(self) -> None:
        """TinyLlama's init; also the way to materialise a model built on the meta device (after `to_empty`)."""
        self.tie_weights()
        cos, sin = build_rope_cache(self.config, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        std = math.sqrt(2.0 / (5 * self.config.n_embd))
        out_std = 1.0 / (math.sqrt(self.config.n_embd) * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_residual_out = name.endswith("attn.proj") or name.endswith("mlp.proj")
                nn.init.normal_(module.weight, mean=0.0, std=out_std if is_residual_out else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def set_kv_cache(self, batch_size: int, max_seq_length: Optional[int] = None,
                     device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        """Preallocate a static KV cache of fixed shape, so decoding can be compiled or graph-captured.

        The cache keeps no lengths: each forward says where its tokens go (`input_pos`), and a query never attends
        a slot past its own position. Rewinding a row (rejected draft tokens) is therefore just feeding it at the
        earlier position again: what the slots past it hold is overwritten before anything can attend it.
        """
        max_seq_length = max_seq_length or self.config.block_size
        if max_seq_length > self.config.block_size:
            raise ValueError(f"max_seq_length={max_seq_length} exceeds block_size={self.config.block_size}")
        device = device or self.transformer.wte.weight.device
        dtype = dtype or self.transformer.wte.weight.dtype
        shape = (batch_size, self.config.n_query_groups, max_seq_length, self.config.head_size)
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(shape, device=device, dtype=dtype)
        causal = torch.ones(max_seq_length, max_seq_length, dtype=torch.bool, device=device).tril()
        self.register_buffer("mask_cache", causal, persistent=False)

    def clear_kv_cache(self) -> None:
        """Drop the cache; call it before training, where `input_pos` must not write into a cache left set."""
        for block in self.transformer.h:
            block.attn.kv_cache = None
        self.mask_cache = None

    def forward(self, idx: torch.Tensor, input_pos: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """idx: (B, T) token ids. Returns (B, T, vocab) logits.

        input_pos: (T,) positions shared by all rows or (B, T) per row (int64). They give the RoPE angles and
            causality: a query attends only keys at positions <= its own. With a KV cache (set_kv_cache), each row
            writes its T keys and values at its own positions and attends the cache (S = max_seq_length slots, a
            key's position being its slot; on the CPU only the first max(input_pos) + 1, the others being masked
            for every query: eagerly, and in generation.compiled_step's compiled steps), so rows may sit at
            different lengths. Without a cache, input_pos needs an attention_mask and positions the T tokens only
            (packed documents restart at 0).
        attention_mask: bool (B, T, S) or (B, 1, S), True where a query may attend a key; S = T without a cache,
            the cache length with one. It is AND-ed with causality, and a query always attends itself, so padding
            queries get finite (meaningless) outputs. The batch layouts that need one build it:
            training.packed_documents (packed SFT examples), lm_eval_model.shared_context (a context shared by
            several continuations).
        rows: (B,) the KV cache rows that idx's rows write and attend (default the first B), so that some rows
            start a new sequence at position 0 (continuous batching) while the others keep theirs.
        Neither input_pos nor attention_mask: causal attention among the T tokens (flash-attn or SDPA's is_causal).
        """
        return self.lm_head(self.hidden_states(idx, input_pos, attention_mask, rows))

    def hidden_states(self, idx: torch.Tensor, input_pos: Optional[torch.Tensor] = None,
                      attention_mask: Optional[torch.Tensor] = None,
                      rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """forward without the head: the final normalised hidden states (B, T, n_embd), for callers that need the
        logits of a few positions only (over a 32k vocabulary the head costs as much as ~3.5 layers of the 135m)."""
        B, T = idx.shape
        cached = input_pos is not None and self.mask_cache is not None
        cache_rows = self.transformer.h[0].attn.kv_cache.k.size(0) if cached else B
        if B > cache_rows:
            raise ValueError(f"idx has {B} rows, more than the KV cache's {cache_rows}: call model.set_kv_cache({B})")
        if rows is not None and (not cached or rows.shape != (B,)):
            raise ValueError(f"rows must be (B,) = ({B},) KV cache rows, with input_pos and a cache, got "
                             f"{tuple(rows.shape)}" + ("" if cached else " without a cache"))
        if input_pos is not None and not cached and attention_mask is None:
            # most likely a decoding step after clear_kv_cache, which would silently attend its own tokens only
            raise RuntimeError("input_pos needs a KV cache (call model.set_kv_cache(batch_size) first), "
                               "or an attention_mask for a forward without one")
        if T > self.config.block_size and not cached:
            raise ValueError(f"Sequence length {T} exceeds block_size={self.config.block_size}")
        if input_pos is None and attention_mask is None:
            cos, sin, mask = self.cos[:T], self.sin[:T], None
        else:
            if input_pos is None:
                input_pos = torch.arange(T, device=idx.device)
            cos, sin = self.cos[input_pos], self.sin[input_pos]
            mask = self.sdpa_mask(B, input_pos, attention_mask, cached)
            if cached and idx.device.type == "cpu" and (not torch.compiler.is_compiling()
                                                         or torch._dynamo.config.capture_scalar_outputs):
                # attend the cache's slots up to the last position fed, not all of them: the others are masked for
                # every query, and reading them cost a quarter of AMD-Llama-135m's step at 2,048 slots (RESULTS).
                # On the CPU only, where reading a position does not make the host wait for a device; compiled, where
                # the compile captures that read as a size (generation.compiled_step), so one graph serves every
                # window; other compiles keep the whole cache's shape
                window = int(input_pos.max()) + 1
                torch._check(window >= 1)  # what a compile needs told of a size read from a tensor
                torch._check(window <= mask.size(-1))
                mask = mask.narrow(-1, 0, window)
        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            x = block(x, cos, sin, mask, input_pos if cached else None, rows)
        return self.transformer.ln_f(x)

    def sdpa_mask(self, B: int, input_pos: torch.Tensor, attention_mask: Optional[torch.Tensor],
                  cached: bool) -> torch.Tensor:
        """SDPA's bool mask, (B or 1, 1, T, S): causality by position, AND attention_mask (or the query itself)."""
        T = input_pos.size(-1)
        if cached:
            mask = self.mask_cache[input_pos]  # (T, S) or (B, T, S): key slot <= query position
        else:
            mask = input_pos[..., None, :] <= input_pos[..., :, None]
        S = mask.size(-1)
        if attention_mask is not None:
            if (attention_mask.dtype != torch.bool or attention_mask.dim() != 3 or attention_mask.size(0) not in (1, B)
                    or attention_mask.size(1) not in (1, T) or attention_mask.size(2) != S):
                raise ValueError(f"attention_mask must be a bool tensor of shape ({B}, {T}, {S}) or ({B}, 1, {S}) "
                                 f"(S = {'the KV cache length' if cached else 'T'}), got {attention_mask.dtype} "
                                 f"{tuple(attention_mask.shape)}")
            if cached:
                is_self = torch.arange(S, device=mask.device) == input_pos[..., None]
            else:  # by index: packed documents repeat positions
                is_self = torch.eye(T, dtype=torch.bool, device=mask.device)
            mask = mask & (attention_mask | is_self)
        return mask.reshape(-1, 1, T, S)


class Block(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = LLaMAMLP(config)

    def forward(self, x, cos, sin, mask=None, input_pos=None, rows=None):
        x = x + self.attn(self.norm_1(x), cos, sin, mask, input_pos, rows)
        return x + self.mlp(self.norm_2(x))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        # q, k and v projections fused in one matrix, laid out [all q heads; all k groups; all v groups]
        self.qkv_sizes = [n * config.head_size for n in (config.n_head, config.n_query_groups, config.n_query_groups)]
        self.qkv = nn.Linear(config.n_embd, sum(self.qkv_sizes), bias=config.bias)
        self.proj = nn.Linear(config.n_head * config.head_size, config.n_embd, bias=config.bias)
        self.kv_cache: Optional[KVCache] = None
        self.config = config

    def forward(self, x, cos, sin, mask=None, input_pos=None, rows=None):
        B, T, _ = x.shape
        cfg = self.config
        q, k, v = self.qkv(x).split(self.qkv_sizes, dim=-1)
        q = apply_rope(q.view(B, T, cfg.n_head, cfg.head_size), cos, sin)
        k = apply_rope(k.view(B, T, cfg.n_query_groups, cfg.head_size), cos, sin)
        v = v.view(B, T, cfg.n_query_groups, cfg.head_size)

        if mask is None and flash_attn_func is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            # flash-attn takes (B, T, heads, hs) and handles grouped K/V natively
            y = flash_attn_func(q, k, v, causal=True, softmax_scale=1.0 / math.sqrt(cfg.head_size))
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if input_pos is not None:  # the slots the mask covers (GPT.hidden_states: all, or those written so far)
                k, v = self.kv_cache.update(input_pos, k, v, rows, slots=mask.size(-1))
            gqa = cfg.n_query_groups != cfg.n_head
            scale = 1.0 / math.sqrt(cfg.head_size)
            if T == 1 and mask is not None and x.device.type == "cpu" and q.dtype == torch.bfloat16:
                y = one_query_attention(q, k, v, mask, scale)
            else:
                # KV-cache steps are masked and grouped: on CUDA only cuDNN (or math) takes both, on the CPU the
                # flash CPU kernel runs. Left to SDPA: the static cache gives every decode step one shape, so
                # cuDNN's per-shape plan is built once (bench/generate_throughput.py reports the backend).
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                                   enable_gqa=gqa)
            y = y.transpose(1, 2)
        return self.proj(y.reshape(B, T, cfg.n_head * cfg.head_size))


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """SDPA's result for one query per row (a decode step), q (B, heads, 1, hs), k and v (B, groups, S, hs), mask (B or
    1, 1, 1, S) bool, with the softmax in fp32: for bf16 on the CPU, where SDPA's flash kernel takes 3.5 ms for one
    query over 2048 slots of TinyLlama's 32 heads (1.1 ms for two queries, 0.24 ms as two matmuls; bench/RESULTS.md).
    Eagerly two small matmuls, the keys first where they are the window of a longer cache: aten's CPU bmm copies such a
    window where it reads it transposed (an eager AMD-Llama-135m int8 step 1.26x / 1.41x faster at 1,000 / 2,000 of
    2,048 slots), while over a whole cache the keys first are slower (0.89x). Compiled, products and sums in fp32, which
    inductor fuses into loops reading the cache where it lies, where the matmuls of grouped heads compile to bmm calls
    on copies of the cache's window (a compiled step of the 4-layer demo model 0.58 -> 0.32 ms, TinyLlama-1.1B's 1.09x,
    at 70 positions)."""
    B, H, _, hs = q.shape
    G = k.size(1)
    grouped = q.reshape(B, G, H // G, hs)  # query head h reads group h // (H/G)
    compiling = torch.compiler.is_compiling()
    if compiling:
        scores = (grouped[..., None, :].float() * k[:, :, None].float()).sum(-1)
    elif k.is_contiguous():
        scores = (grouped @ k.transpose(-1, -2)).float()
    else:
        scores = (k @ grouped.transpose(-1, -2)).transpose(-1, -2).float()
    weights = (scores * scale).masked_fill(~mask.reshape(mask.size(0), 1, 1, -1), float("-inf")).softmax(-1)
    if compiling:
        return (weights[..., None] * v[:, :, None].float()).sum(-2).to(v.dtype).reshape(B, H, 1, hs)
    return (weights.to(v.dtype) @ v).reshape(B, H, 1, hs)


class LLaMAMLP(nn.Module):
    """SwiGLU: proj(silu(fc_1(x)) * fc_2(x)); fc_1, fc_2, proj are HF's gate_proj, up_proj, down_proj."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc_1 = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.fc_2 = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))


class RMSNorm(nn.Module):
    """Normalises in fp32, or in the input dtype where it is wider (a float64 model stays float64), as Llama does."""

    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        return F.rms_norm(x.to(dtype), (x.size(-1),), self.weight.to(dtype), self.eps).to(x.dtype)


class KVCache(nn.Module):
    def __init__(self, shape: tuple, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: Optional[torch.Tensor],
               slots: int):
        """Write k, v (B, groups, T, hs) in place at input_pos, (T,) for every row or (B, T) per row, into the
        cache rows `rows` (B,), None for the first B; return those rows of the cache's first `slots` slots."""
        B = k.size(0)
        for cache, new in ((self.k, k), (self.v, v)):
            if input_pos.dim() == 1 and rows is None:
                cache[:B].index_copy_(2, input_pos, new.to(cache.dtype))
            else:
                # indices on dims 0 and 2 around a slice: the indexed cache is (B, T, groups, hs)
                row_index = (torch.arange(B, device=cache.device) if rows is None else rows)[:, None]
                cache[row_index, :, input_pos] = new.transpose(1, 2).to(cache.dtype)
        if rows is None:  # narrow: a compiled step's window is a size only known when it runs
            return self.k[:B].narrow(2, 0, slots), self.v[:B].narrow(2, 0, slots)
        return self.k[rows, :, :slots], self.v[rows, :, :slots]


def build_rope_cache(config: Config, device: Optional[torch.device] = None):
    """cos and sin of shape (block_size, head_size) in fp32; positions divided by rope_condense_ratio."""
    n_elem = config.head_size
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, n_elem, 2, device=device, dtype=torch.float32) / n_elem))
    positions = torch.arange(config.block_size, device=device, dtype=torch.float32) / config.rope_condense_ratio
    angles = torch.outer(positions, inv_freq).repeat(1, 2)  # rotate-half: each frequency on both halves
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF / NeoX) on x: (B, T, heads, hs); cos, sin: (T, hs) for every row or (B, T, hs) per row."""
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
