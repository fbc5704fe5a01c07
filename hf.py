"""Hugging Face `LlamaForCausalLM` <-> model.py: the key map, the fused qkv, state dicts and configs, both ways.

Torch and model.py only (no transformers): the converters in scripts/ add the file I/O, and anything that hands our
weights to transformers (or takes theirs) uses these same functions. HF stores q and k for rotate-half RoPE, the
convention model.py uses, so every tensor is copied without a permutation. What a checkpoint of another kind or a
config of another model makes impossible is a UserError naming the file.
"""

import re
from dataclasses import asdict
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch

from model import Config, configs
from utils import UserError

# HF module name -> lit module name; "{}" is the layer index. Both ".weight" and ".bias" follow the same map.
# q_proj, k_proj and v_proj all go to the fused qkv (see merge_qkv).
HF_TO_LIT = {
    "model.embed_tokens": "transformer.wte",
    "model.layers.{}.input_layernorm": "transformer.h.{}.norm_1",
    "model.layers.{}.self_attn.q_proj": "transformer.h.{}.attn.qkv",
    "model.layers.{}.self_attn.k_proj": "transformer.h.{}.attn.qkv",
    "model.layers.{}.self_attn.v_proj": "transformer.h.{}.attn.qkv",
    "model.layers.{}.self_attn.o_proj": "transformer.h.{}.attn.proj",
    "model.layers.{}.post_attention_layernorm": "transformer.h.{}.norm_2",
    "model.layers.{}.mlp.gate_proj": "transformer.h.{}.mlp.fc_1",
    "model.layers.{}.mlp.up_proj": "transformer.h.{}.mlp.fc_2",
    "model.layers.{}.mlp.down_proj": "transformer.h.{}.mlp.proj",
    "model.norm": "transformer.ln_f",
    "lm_head": "lm_head",
}
QKV_ORDER = ("q_proj", "k_proj", "v_proj")
# lit module name -> HF module name(s), the inverse of HF_TO_LIT: the fused qkv maps to its parts in QKV_ORDER
LIT_TO_HF: Dict[str, Tuple[str, ...]] = {
    lit: tuple(hf for hf, target in HF_TO_LIT.items() if target == lit) for lit in HF_TO_LIT.values()
}
# Buffers that old transformers versions saved; recomputed by the model, so dropped.
SKIPPED_KEY = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
SUPPORTED_ROPE_TYPES = ("default", "linear")


def to_lit_key(hf_key: str, source: str = "the checkpoint") -> Tuple[str, Optional[str]]:
    """The lit key for an HF key, and which of q_proj/k_proj/v_proj it is (None for the rest). `source` names the
    checkpoint in the error for a key that is not a LlamaForCausalLM's."""
    module, _, param = hf_key.rpartition(".")
    layer = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    template = f"model.layers.{{}}.{layer[2]}" if layer else module
    if template not in HF_TO_LIT or param not in ("weight", "bias"):
        raise UserError(f"{source}: unknown key {hf_key!r}; expected the keys of a LlamaForCausalLM")
    key = f"{HF_TO_LIT[template].format(layer[1] if layer else '')}.{param}"
    qkv_part = template.rpartition(".")[2]
    return key, qkv_part if qkv_part in QKV_ORDER else None


def to_hf_keys(lit_key: str) -> Tuple[str, ...]:
    """The HF key(s) of a key of model.GPT's state dict: q, k and v (in QKV_ORDER) for the fused qkv, else one."""
    module, _, param = lit_key.rpartition(".")
    parts = module.split(".")
    layer = parts[2] if module.startswith("transformer.h.") else None
    template = ".".join(parts[:2] + ["{}"] + parts[3:]) if layer is not None else module
    if template not in LIT_TO_HF or param not in ("weight", "bias"):
        raise KeyError(f"unknown key {lit_key!r}; expected the keys of a model.GPT")
    return tuple(f"{name.format(layer)}.{param}" for name in LIT_TO_HF[template])


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The fused qkv weight or bias of model.py, laid out [all q heads; all k groups; all v groups]: q is
    (n_head * head_size, ...), k and v (n_query_groups * head_size, ...), with the same trailing shape."""
    return torch.cat((q, k, v))


def split_qkv(qkv: torch.Tensor, config: Config) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of merge_qkv: views of q, k and v along dim 0."""
    sizes = [n * config.head_size for n in (config.n_head, config.n_query_groups, config.n_query_groups)]
    return qkv.split(sizes)


def lit_state_dict(hf_tensors: Iterable[Tuple[str, torch.Tensor]], tie_word_embeddings: bool = False,
                   source: str = "the checkpoint") -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Our state dict for the (key, tensor) pairs of a LlamaForCausalLM's, and the HF keys left out (old rotary
    buffers; lm_head.weight when `tie_word_embeddings`, whose head is then the embedding's tensor).

    The pairs are consumed one at a time and a q, k or v part is held only until its siblings arrive, so a sharded
    checkpoint can be streamed shard by shard. Raises UserError naming an unknown key or a qkv part that is missing.
    """
    state_dict: Dict[str, torch.Tensor] = {}
    pending_qkv: Dict[str, Dict[str, torch.Tensor]] = {}  # lit qkv key -> the q/k/v parts read so far
    skipped = []
    for hf_key, tensor in hf_tensors:
        if SKIPPED_KEY.fullmatch(hf_key) or (tie_word_embeddings and hf_key == "lm_head.weight"):
            skipped.append(hf_key)
            continue
        key, qkv_part = to_lit_key(hf_key, source)
        if qkv_part is None:
            state_dict[key] = tensor
            continue
        parts = pending_qkv.setdefault(key, {})
        parts[qkv_part] = tensor
        if len(parts) == len(QKV_ORDER):
            state_dict[key] = merge_qkv(*(parts[name] for name in QKV_ORDER))
            del pending_qkv[key]
    if pending_qkv:
        key, parts = next(iter(pending_qkv.items()))
        raise UserError(f"{source}: {key!r} is missing {sorted(set(QKV_ORDER) - set(parts))}")
    if tie_word_embeddings:  # one tensor under both keys, as GPT(config) with tie_embeddings gives
        state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"]
    return state_dict, skipped


def hf_state_dict(state_dict: Dict[str, torch.Tensor], config: Config) -> Dict[str, torch.Tensor]:
    """A LlamaForCausalLM's state dict for model.GPT's. The tensors are contiguous and no two share memory, as
    safetensors requires: the q, k and v views of a qkv matrix are cloned, and a tied head is left out (written once,
    as the embedding, as transformers writes it)."""
    converted = {}
    for key, tensor in state_dict.items():
        if config.tie_embeddings and key == "lm_head.weight":
            continue
        names = to_hf_keys(key)
        if len(names) == 1:
            converted[names[0]] = tensor.contiguous()
        else:
            converted.update(zip(names, (piece.clone() for piece in split_qkv(tensor, config))))
    return converted


def config_from_hf(hf_config: dict, model_name: Optional[str] = None, source: str = "config.json") -> Config:
    """Our Config for an HF Llama config.json (transformers 4.x or 5 spelling); named after the entry of
    model.configs with the same values unless `model_name` is given (a name of model.configs must then match)."""
    architectures = hf_config.get("architectures") or ["LlamaForCausalLM"]
    if architectures != ["LlamaForCausalLM"] or hf_config.get("model_type", "llama") != "llama":
        raise UserError(
            f"{source}: architectures={architectures}, model_type={hf_config.get('model_type')!r}; "
            "only LlamaForCausalLM (model_type 'llama') is supported"
        )
    if hf_config.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act={hf_config['hidden_act']!r}; the model implements 'silu' only")
    attention_bias, mlp_bias = bool(hf_config.get("attention_bias", False)), bool(hf_config.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        raise UserError(
            f"{source}: attention_bias={attention_bias} and mlp_bias={mlp_bias} differ; the model has one `bias` "
            "switch for both"
        )
    rope_base, rope_condense_ratio = rope_from_hf(hf_config, source)

    def required(key: str):
        if key not in hf_config:
            raise UserError(f"{source}: {key!r} is missing")
        return hf_config[key]

    n_embd, n_head = required("hidden_size"), required("num_attention_heads")
    config = Config(
        block_size=required("max_position_embeddings"),
        vocab_size=required("vocab_size"),
        padded_vocab_size=required("vocab_size"),  # the checkpoint's rows, padded or not
        n_layer=required("num_hidden_layers"),
        n_head=n_head,
        n_embd=n_embd,
        n_query_groups=hf_config.get("num_key_value_heads") or n_head,
        head_size=hf_config.get("head_dim") or n_embd // n_head,
        rope_base=rope_base,
        rope_condense_ratio=rope_condense_ratio,
        intermediate_size=required("intermediate_size"),
        norm_eps=required("rms_norm_eps"),
        bias=attention_bias,
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
    )
    if model_name is None:
        model_name = next((name for name in configs if same_values(config, Config.from_name(name))), "")
    elif model_name in configs and not same_values(config, Config.from_name(model_name)):
        named = asdict(Config.from_name(model_name))
        diff = {k: (v, named[k]) for k, v in asdict(config).items() if k != "name" and v != named[k]}
        raise UserError(f"{source} does not match the named config {model_name!r}: (checkpoint, named) = {diff}")
    config.name = model_name
    return config


def rope_from_hf(hf_config: dict, source: str) -> Tuple[Union[int, float], int]:
    """(rope_base, rope_condense_ratio) for an HF config: no scaling, or linear scaling by a whole factor (which is
    what model.py's position condensing computes)."""
    # transformers 5 writes `rope_parameters` (with rope_theta inside); 4.x wrote `rope_theta` and `rope_scaling`
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UserError(
            f"{source}: RoPE scaling type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
        )
    factor = float(rope.get("factor", 1.0)) if rope_type == "linear" else 1.0
    if not factor.is_integer() or factor < 1:
        raise UserError(f"{source}: linear RoPE scaling factor {factor} must be a whole number >= 1")
    theta = float(rope.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
    return int(theta) if theta.is_integer() else theta, int(factor)


def same_values(a: Config, b: Config) -> bool:
    """Whether two Configs describe the same model, whatever their names."""
    return {**asdict(a), "name": ""} == {**asdict(b), "name": ""}


def hf_config(config: Config, dtype: str, bos_id: Optional[int], eos_id: Optional[int]) -> dict:
    """The config.json of a LlamaForCausalLM for `config`, its weights in `dtype` ("float32", "bfloat16", ...)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_query_groups,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": float(config.rope_base),
        # the 4.x spelling, which transformers 5 still reads (into `rope_parameters`)
        "rope_scaling": (
            {"type": "linear", "rope_type": "linear", "factor": float(config.rope_condense_ratio)}
            if config.rope_condense_ratio > 1 else None
        ),
        "vocab_size": config.padded_vocab_size,
        "attention_bias": config.bias,
        "mlp_bias": config.bias,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": dtype,
        "use_cache": True,
    }


def generation_config(existing: dict, bos_id: Optional[int], eos_id: Optional[int], stop_ids: List[int]) -> dict:
    """generation_config.json: `existing` (the checkpoint's own, e.g. a converted model's sampling defaults) with our
    BOS, and as `eos_token_id` EOS alone or, for a chat model, the list of EOS and the end-of-turn ids (`stop_ids`),
    so that transformers' generate stops at the end of a turn as chat.py does."""
    eos_ids = list(dict.fromkeys(([] if eos_id is None else [eos_id]) + list(stop_ids)))
    return {**existing, "bos_token_id": bos_id, "eos_token_id": eos_ids if len(eos_ids) > 1 else eos_id}
