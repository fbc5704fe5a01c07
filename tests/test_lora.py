"""lora.py on tiny GQA models: only the adapters train, q/k/v adapters change exactly Hugging Face's q_proj/k_proj/
v_proj rows of the fused qkv (checked through hf.py's split, an independent reading of the layout), merged weights
give the outputs of the unmerged model, and the merged directory loads and converts like any checkpoint."""

import pytest
import torch

from checkpoint import load_model, save_model_dir
from hf import hf_state_dict
from lora import ADAPTERS_FILE, TARGETS, LoRAConfig, LoRALinear, add_lora, lora_state_dict, merge_lora
from model import GPT, Config
from scripts.convert_lit_checkpoint import convert_lit_checkpoint
from training import parameter_groups
from utils import UserError

CONFIG = Config(name="gqa", block_size=32, vocab_size=96, n_layer=2, n_head=4, n_query_groups=2, n_embd=32,
                intermediate_size=48)
HF_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "proj": "self_attn.o_proj",
            "fc_1": "mlp.gate_proj", "fc_2": "mlp.up_proj", "mlp_proj": "mlp.down_proj"}


def lora_model(targets, dtype=torch.float32, dropout=0.0, seed=0) -> GPT:
    """A random GPT with adapters on `targets`, B random too (at init B is 0 and the adapters change nothing)."""
    torch.manual_seed(seed)
    model = GPT(CONFIG).to(dtype)
    add_lora(model, LoRAConfig(r=4, alpha=8.0, dropout=dropout, targets=tuple(targets)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_b." in name:
                param.normal_(std=0.1)
    return model


def test_only_the_adapters_train():
    model = lora_model(["q", "v", "fc_2"])
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trained and all(".lora_a." in name or ".lora_b." in name for name in trained)
    assert len(trained) == 2 * 3 * CONFIG.n_layer  # A and B of 3 targets in each block
    groups = parameter_groups(model, weight_decay=0.1, decay_all_params=False)  # what the optimizer gets
    in_groups = {id(p) for group in groups for p in group["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}

    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for group in groups for p in group["params"]], lr=1e-2)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 16))
    for _ in range(2):
        model(tokens).logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]) != (name in trained), name


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_changes_only_its_own_weights(target):
    """Merged into the base, a target's adapter changes exactly HF's weight of that name in every layer, and all
    of its rows (q, k and v: the slices of the fused qkv; HF's split of it is hf.py's)."""
    model = lora_model([target])
    state_dict = model.state_dict()
    base = hf_state_dict({name: t for name, t in state_dict.items() if ".lora_" not in name}, CONFIG)
    merged = hf_state_dict(merge_lora(state_dict, LoRAConfig(4, 8.0, 0.0, (target,)), CONFIG), CONFIG)
    assert merged.keys() == base.keys()
    changed = {name for name in base if not torch.equal(merged[name], base[name])}
    assert changed == {f"model.layers.{i}.{HF_NAMES[target]}.weight" for i in range(CONFIG.n_layer)}
    for name in changed:
        assert (merged[name] != base[name]).any(dim=1).all(), name  # every row of it


def test_qkv_slices_follow_the_gqa_layout():
    model = lora_model(["q", "k", "v"])
    qkv = model.transformer.h[0].attn.qkv
    assert isinstance(qkv, LoRALinear)
    q, kv = CONFIG.n_head * CONFIG.head_size, CONFIG.n_query_groups * CONFIG.head_size
    assert qkv.slices == {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
    assert qkv.lora_b["q"].shape == (q, 4) and qkv.lora_b["k"].shape == qkv.lora_b["v"].shape == (kv, 4)


def test_merged_weights_give_the_outputs_of_the_adapters():
    """In float64, where the only difference is the order of additions."""
    config = LoRAConfig(4, 8.0, 0.3, TARGETS)
    model = lora_model(TARGETS, dtype=torch.float64, dropout=0.3).eval()  # eval: no dropout
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 20))
    merged = GPT(CONFIG).to(torch.float64).eval()
    merged.load_state_dict(merge_lora(model.state_dict(), config, CONFIG))
    with torch.no_grad():
        expected, got = model(tokens), merged(tokens)
        plain = GPT(CONFIG).to(torch.float64).eval()
        plain.load_state_dict({n: t for n, t in model.state_dict().items() if ".lora_" not in n})
        assert not torch.allclose(plain(tokens), expected)  # the adapters do change the outputs
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_adapters_start_at_zero_change():
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    tokens = torch.randint(0, CONFIG.vocab_size, (1, 12))
    with torch.no_grad():
        expected = model(tokens)
        add_lora(model, LoRAConfig(8, 16.0, 0.0, TARGETS))
        assert torch.equal(model(tokens), expected)


def test_merged_checkpoint_loads_and_converts(tmp_path):
    from transformers import LlamaForCausalLM

    config = LoRAConfig(4, 8.0, 0.0, ("q", "v"))
    model = lora_model(config.targets).eval()
    state_dict = model.state_dict()
    save_model_dir(merge_lora(state_dict, config, CONFIG), CONFIG, None, tmp_path / "final",
                   tensor_files={ADAPTERS_FILE: lora_state_dict(state_dict)})
    adapters = torch.load(tmp_path / "final" / ADAPTERS_FILE, weights_only=True)
    assert adapters.keys() == {n for n in state_dict if ".lora_" in n} and len(adapters) == 4 * CONFIG.n_layer
    tokens = torch.randint(0, CONFIG.vocab_size, (1, 16))
    with torch.no_grad():
        expected = model(tokens)
        torch.testing.assert_close(load_model(tmp_path / "final")(tokens), expected, rtol=1e-5, atol=1e-5)
        convert_lit_checkpoint(tmp_path / "final", tmp_path / "hf")
        hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
        torch.testing.assert_close(hf(tokens).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("settings, message", [
    (dict(targets=("q", "o")), "--lora_targets q,o"),
    (dict(targets=()), "--lora_targets"),
    (dict(r=0), "--lora_r"),
    (dict(alpha=float("nan")), "--lora_alpha"),
    (dict(dropout=1.0), "--lora_dropout"),
])
def test_bad_settings_are_named(settings, message):
    with pytest.raises(UserError, match=message):
        LoRAConfig(**{**dict(r=4, alpha=8.0, dropout=0.0, targets=("q",)), **settings})
