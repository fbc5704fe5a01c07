"""Convert a Hugging Face Llama checkpoint (`LlamaForCausalLM`) into this repository's format.

Reads `config.json` and the weights (`*.safetensors` or `pytorch_model*.bin`, sharded through `*.index.json` or not)
from `checkpoint_dir` and writes `lit_model.pth` and `model_config.json` beside them, as lit-gpt does:

    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/TinyLlama-1.1B

Shards are read one at a time, so memory stays about one model's size. HF stores q and k for rotate-half RoPE, the
convention model.py uses, so the weights are copied without any permutation.
"""

import json
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Iterator, List, Literal, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoint import check_state_dict, save_model_dir
from model import GPT, Config, configs
from utils import cli

# HF module name -> lit module name; "{}" is the layer index. Both ".weight" and ".bias" follow the same map.
# q_proj, k_proj and v_proj all go to the fused qkv, laid out [all q heads; all k groups; all v groups].
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
# Buffers that old transformers versions saved; recomputed by the model, so dropped.
SKIPPED_KEY = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
SUPPORTED_ROPE_TYPES = ("default", "linear")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def lit_name(hf_key: str, source: str) -> Tuple[str, Optional[str]]:
    """The lit key for an HF key, and which of q_proj/k_proj/v_proj it is (None for the rest)."""
    module, _, param = hf_key.rpartition(".")
    layer = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    template = f"model.layers.{{}}.{layer[2]}" if layer else module
    if template not in HF_TO_LIT or param not in ("weight", "bias"):
        raise KeyError(f"{source}: unknown key {hf_key!r}; expected the keys of a LlamaForCausalLM")
    target = HF_TO_LIT[template].format(layer[1] if layer else "") + "." + param
    qkv_part = template.rpartition(".")[2]
    return target, qkv_part if qkv_part in QKV_ORDER else None


def config_from_hf(hf_config: dict, model_name: Optional[str] = None, source: str = "config.json") -> Config:
    """Our Config for an HF Llama config.json; named after the entry of model.configs with the same values."""
    architectures = hf_config.get("architectures") or ["LlamaForCausalLM"]
    if architectures != ["LlamaForCausalLM"] or hf_config.get("model_type", "llama") != "llama":
        raise ValueError(
            f"{source}: architectures={architectures}, model_type={hf_config.get('model_type')!r}; "
            "only LlamaForCausalLM (model_type 'llama') is supported"
        )
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act={hf_config['hidden_act']!r}; the model implements 'silu' only")
    attention_bias, mlp_bias = bool(hf_config.get("attention_bias", False)), bool(hf_config.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        raise ValueError(
            f"{source}: attention_bias={attention_bias} and mlp_bias={mlp_bias} differ; the model has one `bias` "
            "switch for both"
        )
    # transformers 5 writes `rope_parameters` (with rope_theta inside); 4.x wrote `rope_theta` and `rope_scaling`
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{source}: RoPE scaling type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    rope_factor = float(rope.get("factor", 1.0)) if rope_type == "linear" else 1.0
    if not rope_factor.is_integer() or rope_factor < 1:
        raise ValueError(f"{source}: linear RoPE scaling factor {rope_factor} must be a whole number >= 1")
    rope_theta = float(rope.get("rope_theta", hf_config.get("rope_theta", 10000.0)))

    def required(key: str):
        if key not in hf_config:
            raise KeyError(f"{source}: {key!r} is missing")
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
        rope_base=int(rope_theta) if rope_theta.is_integer() else rope_theta,
        rope_condense_ratio=int(rope_factor),
        intermediate_size=required("intermediate_size"),
        norm_eps=required("rms_norm_eps"),
        bias=attention_bias,
    )
    if model_name is None:
        model_name = next((name for name in configs if same_values(config, Config.from_name(name))), "")
    elif model_name in configs and not same_values(config, Config.from_name(model_name)):
        named = asdict(Config.from_name(model_name))
        diff = {k: (v, named[k]) for k, v in asdict(config).items() if k != "name" and v != named[k]}
        raise ValueError(f"{source} does not match the named config {model_name!r}: (checkpoint, named) = {diff}")
    config.name = model_name
    return config


def same_values(a: Config, b: Config) -> bool:
    return {**asdict(a), "name": ""} == {**asdict(b), "name": ""}


def weight_files(checkpoint_dir: Path) -> List[Path]:
    """The checkpoint's weight files; safetensors preferred when both formats are there."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = checkpoint_dir / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [name for name in names if not (checkpoint_dir / name).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists shards that do not exist: {missing}")
            return [checkpoint_dir / name for name in names]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (checkpoint_dir / name).is_file():
            return [checkpoint_dir / name]
    raise FileNotFoundError(
        f"No weights in {str(checkpoint_dir)!r}: expected model.safetensors, pytorch_model.bin or a sharded "
        "*.index.json"
    )


def load_tensors(path: Path) -> Iterator[Tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    else:
        yield from torch.load(path, map_location="cpu", weights_only=True).items()


def convert_hf_checkpoint(
    checkpoint_dir: Path,
    model_name: Optional[str] = None,
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
) -> Config:
    """Write `lit_model.pth` and `model_config.json` into `checkpoint_dir`, beside the HF files; returns the Config.

    Args:
        checkpoint_dir: Hugging Face checkpoint directory (config.json and the weights); the output goes there too
        model_name: the named config to use (default: the named config whose values match, if any)
        dtype: convert the weights to this dtype (default: keep theirs)
    """
    checkpoint_dir = Path(checkpoint_dir)
    config_path = checkpoint_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(config_path)!r} does not exist; expected a Hugging Face checkpoint directory")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {list(DTYPES)}")
    hf_config = json.loads(config_path.read_text())
    config = config_from_hf(hf_config, model_name, source=str(config_path))
    tied = bool(hf_config.get("tie_word_embeddings", False))

    state_dict: Dict[str, torch.Tensor] = {}
    pending_qkv: Dict[str, Dict[str, torch.Tensor]] = {}  # lit qkv key -> the q/k/v parts read so far
    skipped = []
    for path in weight_files(checkpoint_dir):
        for hf_key, tensor in load_tensors(path):
            if SKIPPED_KEY.fullmatch(hf_key) or (tied and hf_key == "lm_head.weight"):
                skipped.append(hf_key)
                continue
            key, qkv_part = lit_name(hf_key, source=str(path))
            if dtype is not None:
                tensor = tensor.to(DTYPES[dtype])
            if qkv_part is None:
                state_dict[key] = tensor
                continue
            parts = pending_qkv.setdefault(key, {})
            parts[qkv_part] = tensor
            if len(parts) == len(QKV_ORDER):
                state_dict[key] = torch.cat([parts[name] for name in QKV_ORDER])
                del pending_qkv[key]
    if pending_qkv:
        key, parts = next(iter(pending_qkv.items()))
        raise KeyError(f"{checkpoint_dir}: {key!r} is missing {sorted(set(QKV_ORDER) - set(parts))}")
    if tied:
        # the model's head is untied: give it its own copy of the embedding
        state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"].clone()
        print("tie_word_embeddings=true: lm_head.weight is a copy of the token embedding")

    with torch.device("meta"):
        model = GPT(config)
    check_state_dict(model, state_dict, source=str(checkpoint_dir))
    save_model_dir(state_dict, config, checkpoint_dir, checkpoint_dir)
    skipped_kinds = sorted({re.sub(r"\.\d+\.", ".N.", key) for key in skipped})
    print(
        f"Config {config.name or '(custom: no named config matches)'}; wrote {len(state_dict)} tensors to "
        f"{checkpoint_dir / 'lit_model.pth'}; skipped {len(skipped)} keys" + (f" {skipped_kinds}" if skipped else "")
    )
    return config


if __name__ == "__main__":
    cli(convert_hf_checkpoint)
