"""LoRA (Hu et al., 2021) for model.GPT, litgpt's approach in one small module: torch only.

A targeted nn.Linear becomes a `LoRALinear`, the same Linear (its weight and bias, frozen, keep their names in the
state dict) plus low-rank updates of some of its output features: y = x W^T + b + (alpha / r) x A^T B^T, with A
(r, in) random and B (out, r) zero at the start, so training starts from the base model exactly. The fused
`attn.qkv` carries up to three independent updates, one per slice of its output, laid out as model.py does:
[q: n_head x head_size | k: n_query_groups x head_size | v: n_query_groups x head_size]. So `q` and `v` (Hugging
Face PEFT's default) adapt exactly the rows of HF's q_proj and v_proj, even with grouped-query attention.

Targets (HF's names in brackets): q, k, v [q_proj, k_proj, v_proj], proj [o_proj], fc_1 [gate_proj], fc_2
[up_proj], mlp_proj [down_proj].

    config = LoRAConfig(r=8, alpha=16, dropout=0.05, targets=("q", "v"))
    add_lora(model, config)  # only the adapters train now
    merged = merge_lora(model.state_dict(), config, model.config)  # a plain GPT state dict, for save_model_dir
    adapters = lora_state_dict(model.state_dict())  # the adapters alone
"""

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GPT, Config
from utils import UserError

TARGETS = ("q", "k", "v", "proj", "fc_1", "fc_2", "mlp_proj")
# which Linear of a Block each target adapts: the module's name within the Block
TARGET_MODULES = {"q": "attn.qkv", "k": "attn.qkv", "v": "attn.qkv", "proj": "attn.proj", "fc_1": "mlp.fc_1",
                  "fc_2": "mlp.fc_2", "mlp_proj": "mlp.proj"}
ADAPTER_PREFIXES = ("lora_a.", "lora_b.")
CONFIG_FILE = "lora_config.json"
ADAPTERS_FILE = "lora_adapters.pth"


@dataclass(frozen=True)
class LoRAConfig:
    r: int
    alpha: float
    dropout: float
    targets: Tuple[str, ...]

    def __post_init__(self) -> None:
        unknown = [target for target in self.targets if target not in TARGETS]
        if unknown or not self.targets:
            raise UserError(f"--lora_targets {','.join(self.targets) or '(none)'}: expected some of "
                             f"{', '.join(TARGETS)}")
        if self.r < 1:
            raise UserError(f"--lora_r must be at least 1, got {self.r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise UserError(f"--lora_alpha must be a finite positive number, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--lora_dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_json(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}


class LoRALinear(nn.Linear):
    """An nn.Linear plus, for each named slice [start, end) of its output features, a low-rank update
    scale * dropout(x) A^T B^T of those features only (B: (end - start, r)). x: (..., in) -> (..., out)."""

    def __init__(self, linear: nn.Linear, slices: Mapping[str, Tuple[int, int]], config: LoRAConfig) -> None:
        nn.Module.__init__(self)  # the weight and bias are the given Linear's own Parameters, not new ones
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.slices = dict(slices)
        self.scale = config.scale
        self.dropout = nn.Dropout(config.dropout)
        factory = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        self.lora_a = nn.ParameterDict({name: nn.Parameter(torch.empty(config.r, self.in_features, **factory))
                                        for name in self.slices})
        self.lora_b = nn.ParameterDict({name: nn.Parameter(torch.zeros(end - start, config.r, **factory))
                                        for name, (start, end) in self.slices.items()})
        for a in self.lora_a.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear, PEFT and litgpt initialise A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        x = self.dropout(x)
        for name, (start, end) in self.slices.items():
            update = F.linear(F.linear(x, self.lora_a[name]), self.lora_b[name]) * self.scale
            y = y + F.pad(update, (start, self.out_features - end))  # zero outside its slice
        return y


def target_slices(model_config: Config, targets: Sequence[str]) -> Dict[str, Dict[str, Tuple[int, int]]]:
    """{module name within a Block: {target: (start, end) output features}} for `targets`."""
    q = model_config.n_head * model_config.head_size
    kv = model_config.n_query_groups * model_config.head_size
    qkv = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
    out_features = {"attn.proj": model_config.n_embd, "mlp.fc_1": model_config.intermediate_size,
                    "mlp.fc_2": model_config.intermediate_size, "mlp.proj": model_config.n_embd}
    slices: Dict[str, Dict[str, Tuple[int, int]]] = {}
    for target in targets:
        module = TARGET_MODULES[target]
        slices.setdefault(module, {})[target] = qkv[target] if module == "attn.qkv" else (0, out_features[module])
    return slices


def add_lora(model: GPT, config: LoRAConfig) -> None:
    """Replace the targeted Linears of every Block by LoRALinears (in place, on the weights' device and dtype) and
    freeze everything but the adapters."""
    for param in model.parameters():
        param.requires_grad = False
    for block in model.transformer.h:
        for module_name, slices in target_slices(model.config, config.targets).items():
            parent_name, _, child_name = module_name.rpartition(".")
            parent = block.get_submodule(parent_name)
            setattr(parent, child_name, LoRALinear(getattr(parent, child_name), slices, config))


def is_adapter(name: str) -> bool:
    return any(f".{prefix}" in name for prefix in ADAPTER_PREFIXES)


def lora_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The adapters of a LoRA model's state dict."""
    return {name: tensor for name, tensor in state_dict.items() if is_adapter(name)}


def merge_lora(state_dict: Mapping[str, torch.Tensor], config: LoRAConfig,
               model_config: Config) -> Dict[str, torch.Tensor]:
    """The plain GPT state dict of a LoRA model's: each adapted weight W[start:end] += scale * B A (computed in fp32
    or wider, stored in W's dtype), the adapters left out."""
    slices = target_slices(model_config, config.targets)
    merged = {name: tensor for name, tensor in state_dict.items() if not is_adapter(name)}
    for name, a in state_dict.items():
        if ".lora_a." not in name:
            continue
        module, target = name.split(".lora_a.")
        start, end = slices[module.split(".", 3)[3]][target]  # transformer.h.<i>.<module name within the Block>
        weight = merged[f"{module}.weight"].clone()
        dtype = torch.promote_types(weight.dtype, torch.float32)  # bf16 would round the small update away
        delta = (state_dict[f"{module}.lora_b.{target}"].to(dtype) @ a.to(dtype)) * config.scale
        weight[start:end] = (weight[start:end].to(dtype) + delta).to(weight.dtype)
        merged[f"{module}.weight"] = weight
    return merged
