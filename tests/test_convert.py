"""HF <-> lit checkpoint conversion, checked against transformers' LlamaForCausalLM on tiny random models."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint import load_model, load_state_dict, save_model_dir
from hf import config_from_hf, to_hf_keys, to_lit_key
from model import GPT, Config, num_parameters
from scripts.convert_hf_checkpoint import convert_hf_checkpoint
from scripts.convert_lit_checkpoint import convert_lit_checkpoint
from tokenizer import Tokenizer
from utils import UserError

ROOT = Path(__file__).resolve().parent.parent

BASE = dict(
    vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=64, rms_norm_eps=1e-5,
)
VARIANTS = {
    "mha": dict(num_key_value_heads=4),
    "gqa_bias": dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True),
    "mqa": dict(num_key_value_heads=1),
    "rope_linear": dict(num_key_value_heads=2, rope_theta=500000.0,
                        rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "head_dim": dict(num_key_value_heads=2, head_dim=24),  # 4 heads x 24 != hidden_size 64
    "tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
}

# the values of TinyLlama-1.1B's config.json, in the transformers 4.x spelling (rope_theta, rope_scaling)
TINYLLAMA_HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5632,
    "max_position_embeddings": 2048, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 22,
    "num_key_value_heads": 4, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.35.0", "use_cache": True,
    "vocab_size": 32000,
}


def randomize_(model: torch.nn.Module) -> None:
    """Random weights everywhere, norms included, so that every tensor's placement matters."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm = name.endswith("norm.weight") or ".norm_" in name or "ln_f" in name
            param.copy_(1.0 + 0.1 * torch.randn_like(param) if is_norm else 0.1 * torch.randn_like(param))


def tiny_hf_model(variant: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**BASE, **VARIANTS[variant], attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    randomize_(model)
    return model


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def lit_logits(checkpoint_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_model(checkpoint_dir)(tokens)


def random_tokens(vocab_size: int, seq_len: int = 32) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(1))


def assert_same_state_dicts(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_a_tied_model_stays_tied_both_ways_with_transformers_parameter_count(tmp_path):
    """tie_word_embeddings: one Parameter in our model (the count equals transformers'), the head written once in
    the export (safetensors refuses shared tensors, and transformers writes only the embedding), and the flag kept."""
    from safetensors import safe_open

    hf_model = tiny_hf_model("tied")
    hf_dir, out_dir = tmp_path / "hf", tmp_path / "out"
    hf_model.save_pretrained(hf_dir)
    convert_hf_checkpoint(hf_dir)
    model = load_model(hf_dir)
    assert model.config.tie_embeddings and model.lm_head.weight is model.transformer.wte.weight
    assert num_parameters(model) == hf_model.num_parameters()
    convert_lit_checkpoint(hf_dir, out_dir)
    assert json.loads((out_dir / "config.json").read_text())["tie_word_embeddings"] is True
    with safe_open(out_dir / "model.safetensors", "pt") as exported:
        assert "lm_head.weight" not in exported.keys() and "model.embed_tokens.weight" in exported.keys()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_to_lit_to_hf_logits_and_round_trip(tmp_path, variant):
    from transformers import LlamaForCausalLM

    hf_model = tiny_hf_model(variant)
    hf_dir, out_dir = tmp_path / "hf", tmp_path / "out"
    hf_model.save_pretrained(hf_dir)
    tokens = random_tokens(BASE["vocab_size"])
    expected = hf_logits(hf_model, tokens)

    convert_hf_checkpoint(hf_dir)
    torch.testing.assert_close(lit_logits(hf_dir, tokens), expected, atol=1e-5, rtol=0)

    convert_lit_checkpoint(hf_dir, out_dir)
    exported = LlamaForCausalLM.from_pretrained(out_dir, attn_implementation="eager").eval()
    assert exported.dtype == torch.float32
    torch.testing.assert_close(hf_logits(exported, tokens), expected, atol=1e-5, rtol=0)

    # lit -> HF -> lit gives back the very same tensors and config
    convert_hf_checkpoint(out_dir)
    assert_same_state_dicts(load_state_dict(out_dir / "lit_model.pth"), load_state_dict(hf_dir / "lit_model.pth"))
    assert Config.from_file(out_dir) == Config.from_file(hf_dir)


def write_bin(state_dict: dict, directory: Path, n_shards: int) -> None:
    """The pytorch_model*.bin layout transformers 4.x wrote, with the rotary buffers old versions saved too."""
    state_dict = dict(state_dict)
    for layer in range(BASE["num_hidden_layers"]):
        state_dict[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    if n_shards == 1:
        torch.save(state_dict, directory / "pytorch_model.bin")
        return
    # round robin, so the q, k and v of a layer land in different shards
    names = [f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin" for i in range(n_shards)]
    weight_map = {key: names[i % n_shards] for i, key in enumerate(state_dict)}
    for name in names:
        torch.save({k: v.clone() for k, v in state_dict.items() if weight_map[k] == name}, directory / name)
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state_dict.values())},
             "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("layout", ["safetensors_sharded", "bin", "bin_sharded"])
def test_checkpoint_layouts(tmp_path, layout, capsys):
    hf_model = tiny_hf_model("gqa_bias")
    if layout == "safetensors_sharded":
        hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 3
    else:
        hf_model.config.save_pretrained(tmp_path)
        write_bin(hf_model.state_dict(), tmp_path, n_shards=1 if layout == "bin" else 3)

    convert_hf_checkpoint(tmp_path)
    tokens = random_tokens(BASE["vocab_size"])
    torch.testing.assert_close(lit_logits(tmp_path, tokens), hf_logits(hf_model, tokens), atol=1e-5, rtol=0)
    if layout.startswith("bin"):
        assert "skipped 2 keys ['model.layers.N.self_attn.rotary_emb.inv_freq']" in capsys.readouterr().out


def test_dtype_conversion(tmp_path):
    hf_model = tiny_hf_model("mqa")
    hf_model.save_pretrained(tmp_path)
    convert_hf_checkpoint(tmp_path, dtype="bfloat16")
    lit = load_state_dict(tmp_path / "lit_model.pth")
    assert {t.dtype for t in lit.values()} == {torch.bfloat16}
    hf = {k: v.to(torch.bfloat16) for k, v in hf_model.state_dict().items()}
    assert torch.equal(lit["transformer.h.1.mlp.proj.weight"], hf["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(lit["transformer.h.1.attn.qkv.weight"][-16:], hf["model.layers.1.self_attn.v_proj.weight"])

    # a bf16 checkpoint exports as bf16 and comes back bit-identical
    convert_lit_checkpoint(tmp_path, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    convert_hf_checkpoint(tmp_path / "out")
    assert_same_state_dicts(load_state_dict(tmp_path / "out" / "lit_model.pth"), lit)


@pytest.mark.parametrize("overrides", [{}, {"vocab_size": 250}], ids=["micro", "padded_vocab"])
def test_lit_native_checkpoint_exports(tmp_path, overrides):
    """A model trained here (padded vocab rows included) runs the same in transformers."""
    from transformers import LlamaForCausalLM

    config = Config.from_name("micro", **overrides)
    model = GPT(config)
    randomize_(model)
    save_model_dir(model.state_dict(), config, None, tmp_path / "lit")

    convert_lit_checkpoint(tmp_path / "lit", tmp_path / "hf")
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert exported.config.vocab_size == config.padded_vocab_size == 256
    tokens = random_tokens(config.vocab_size)
    torch.testing.assert_close(hf_logits(exported, tokens), lit_logits(tmp_path / "lit", tokens), atol=1e-5, rtol=0)

    back = convert_hf_checkpoint(tmp_path / "hf")
    assert_same_state_dicts(load_state_dict(tmp_path / "hf" / "lit_model.pth"), model.state_dict())
    # the named config is recognised again; HF knows no padding, so vocab_size comes back as the padded 256
    assert back == Config.from_name("micro")


def test_export_with_sentencepiece_tokenizer(tmp_path, capsys):
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    lit_dir = tmp_path / "lit"
    lit_dir.mkdir()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(300)))
    # Llama-2's options, with bos and eos at unusual ids so that config.json must take them from the tokenizer
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(lit_dir / "tokenizer"), model_type="bpe", vocab_size=300,
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=2, eos_id=1, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2,
    )
    config = Config.from_name("micro", vocab_size=300)
    save_model_dir(GPT(config).state_dict(), config, lit_dir, lit_dir)

    convert_lit_checkpoint(lit_dir, tmp_path / "hf")
    assert "WARNING" not in capsys.readouterr().out
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    generation_config = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"]) == (2, 1)
    assert (generation_config["bos_token_id"], generation_config["eos_token_id"]) == (2, 1)
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == (lit_dir / "tokenizer.model").read_bytes()

    hf_tokenizer = LlamaTokenizer.from_pretrained(tmp_path / "hf")
    ours = Tokenizer(lit_dir)
    for text in ["the quick brown fox", "line 42:  lazy dog\n\nfox 7", "unknown: ü€ 日本\t"]:
        assert hf_tokenizer(text)["input_ids"] == ours.encode(text, bos=True)
        assert hf_tokenizer.decode(ours.encode(text), skip_special_tokens=True) == text
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id) == (2, 1)

    # sentencepiece's default options normalize text (NFKC, newlines to spaces), which LlamaTokenizer cannot follow
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(lit_dir / "tokenizer"), model_type="bpe", vocab_size=300,
        byte_fallback=True, minloglevel=2,
    )
    convert_lit_checkpoint(lit_dir, tmp_path / "hf2")
    assert "WARNING: " + str(lit_dir / "tokenizer.model") + " normalizes text" in capsys.readouterr().out


def test_every_output_file_is_written_atomically(tmp_path, monkeypatch):
    """Each file goes through utils.atomic_write (a temporary name, then a rename): an interrupted conversion never
    leaves a truncated config.json or tokenizer file that transformers would then fail on, or half read."""
    import scripts.convert_lit_checkpoint as convert
    import sentencepiece as spm
    import utils

    lit_dir = tmp_path / "lit"
    lit_dir.mkdir()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(100)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(lit_dir / "tokenizer"), vocab_size=200,
                                   model_type="bpe", minloglevel=2)
    (lit_dir / "tokenizer.vocab").unlink()
    (lit_dir / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    config = Config.from_name("micro", vocab_size=200)
    save_model_dir(GPT(config).state_dict(), config, lit_dir, lit_dir)

    real_atomic_write, written = utils.atomic_write, []

    def recording_atomic_write(path):
        written.append(Path(path).name)
        return real_atomic_write(path)

    monkeypatch.setattr(convert, "atomic_write", recording_atomic_write)
    monkeypatch.setattr(utils, "atomic_write", recording_atomic_write)  # for utils.write_json
    convert_lit_checkpoint(lit_dir, tmp_path / "hf")
    outputs = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.model",
               "special_tokens_map.json", "tokenizer_config.json"}  # the last one written, the others copied
    assert sorted(written) == sorted(outputs)
    assert {path.name for path in (tmp_path / "hf").iterdir()} == outputs  # and no temporary left over
    special_tokens_map = "special_tokens_map.json"
    assert (tmp_path / "hf" / special_tokens_map).read_text() == (lit_dir / special_tokens_map).read_text()


def test_cli(tmp_path):
    """Both scripts from the command line as their docstrings show (plus --dtype), on a tiny local model."""
    tiny_hf_model("gqa_bias").save_pretrained(tmp_path / "hf")
    for command in (
        ["scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(tmp_path / "hf"), "--dtype", "float16"],
        ["scripts/convert_lit_checkpoint.py", "--checkpoint_dir", str(tmp_path / "hf"),
         "--output_dir", str(tmp_path / "out")],
    ):
        result = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float16"
    assert Config.from_file(tmp_path / "hf").bias


def test_key_maps_are_inverses_over_every_key_of_a_model_with_biases():
    lit_keys = set(GPT(Config.from_name("micro", bias=True)).state_dict())  # 2 layers, as tiny_hf_model's
    hf_keys = set(tiny_hf_model("gqa_bias").state_dict())
    assert {hf_key for key in lit_keys for hf_key in to_hf_keys(key)} == hf_keys
    assert {to_lit_key(hf_key)[0] for hf_key in hf_keys} == lit_keys
    for key in lit_keys:  # lit -> HF -> lit
        assert {to_lit_key(hf_key)[0] for hf_key in to_hf_keys(key)} == {key}
    for hf_key in hf_keys:  # HF -> lit -> HF
        assert hf_key in to_hf_keys(to_lit_key(hf_key)[0])
    # the fused qkv splits in the order merge_qkv concatenates
    assert [to_lit_key(key)[1] for key in to_hf_keys("transformer.h.0.attn.qkv.bias")] == ["q_proj", "k_proj", "v_proj"]


def test_mismatched_checkpoint_names_key_and_shapes(tmp_path):
    tiny_hf_model("mha").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hidden_size"] = 32  # the weights are 64 wide
    (tmp_path / "config.json").write_text(json.dumps(config))
    expected = r"'(transformer\.wte|lm_head)\.weight' has shape \(96, 64\), the model expects \(96, 32\)"
    with pytest.raises(ValueError, match=expected):
        convert_hf_checkpoint(tmp_path)
    assert not (tmp_path / "lit_model.pth").exists()


def test_unknown_key_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_hf_model("mha").save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.1.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"model\.layers\.1\.self_attn\.q_norm\.weight"):
        convert_hf_checkpoint(tmp_path)


def test_missing_qkv_part_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_hf_model("mha").save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.0.self_attn.k_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"transformer\.h\.0\.attn\.qkv\.weight.*k_proj"):
        convert_hf_checkpoint(tmp_path)


def test_named_config_matching():
    from transformers import LlamaConfig

    assert config_from_hf(TINYLLAMA_HF_CONFIG) == Config.from_name("tiny_LLaMA_1b")
    # the same values as transformers 5 spells them (rope_parameters)
    assert config_from_hf(LlamaConfig(**TINYLLAMA_HF_CONFIG).to_dict()).name == "tiny_LLaMA_1b"
    code = {**TINYLLAMA_HF_CONFIG, "max_position_embeddings": 8192, "rope_scaling": {"type": "linear", "factor": 4.0}}
    assert config_from_hf(code) == Config.from_name("code_tiny_LLaMA_1b")

    custom = config_from_hf({**TINYLLAMA_HF_CONFIG, "num_hidden_layers": 3})
    assert custom.name == "" and custom.n_layer == 3
    assert config_from_hf({**TINYLLAMA_HF_CONFIG, "num_hidden_layers": 3}, model_name="mine").name == "mine"
    with pytest.raises(ValueError, match=r"tiny_LLaMA_1b.*'n_layer': \(3, 22\)"):
        config_from_hf({**TINYLLAMA_HF_CONFIG, "num_hidden_layers": 3}, model_name="tiny_LLaMA_1b")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic' is not supported"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "'llama3' is not supported"),
        ({"rope_scaling": {"type": "linear", "factor": 2.5}}, "factor 2.5 must be a whole number"),
        ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "only LlamaForCausalLM"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"attention_bias": True}, "attention_bias=True and mlp_bias=False differ"),
    ],
)
def test_unsupported_configs_are_rejected(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        config_from_hf({**TINYLLAMA_HF_CONFIG, **change}, source="x/config.json")


def test_missing_config_key_is_named():
    incomplete = {k: v for k, v in TINYLLAMA_HF_CONFIG.items() if k != "intermediate_size"}
    with pytest.raises(UserError, match="x/config.json: 'intermediate_size' is missing"):
        config_from_hf(incomplete, source="x/config.json")


def test_missing_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINYLLAMA_HF_CONFIG))
    with pytest.raises(FileNotFoundError, match="No weights"):
        convert_hf_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="model_config.json"):
        convert_lit_checkpoint(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("kind", ["sentencepiece_zephyr_in_config", "chatml_jinja", "sentencepiece_override"])
def test_export_carries_the_chat_template(tmp_path, kind):
    """After export, transformers renders and tokenizes a chat as we do, and generate stops at a turn's end."""
    from transformers import AutoTokenizer, GenerationConfig

    from chat_template import BUILTIN_TEMPLATES, ChatTemplate
    from tests.test_chat_template import CONVERSATION, FORGED
    from tests.test_tokenizer import train_chatml_tokenizer, train_sentencepiece

    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer_dir.mkdir()
    if kind == "chatml_jinja":
        train_chatml_tokenizer(tokenizer_dir)
        # EOS is not the end-of-turn token here (as in Qwen's base models): generation_config lists both
        config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
        (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|endoftext|>"}))
        ChatTemplate.builtin("chatml").save(tokenizer_dir)
        expected_name, chat_template = "chatml", None
    else:
        train_sentencepiece(tokenizer_dir)
        # a template in tokenizer_config.json, as TinyLlama-Chat v1.0 ships it
        config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "legacy": False,
                  "tokenizer_class": "LlamaTokenizer", "chat_template": BUILTIN_TEMPLATES["zephyr"]}
        (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(config))
        expected_name, chat_template = ("guanaco", "guanaco") if kind.endswith("override") else ("zephyr", None)
    tokenizer = Tokenizer(tokenizer_dir)
    config = Config.from_name("micro", vocab_size=tokenizer.vocab_size)
    save_model_dir(GPT(config).state_dict(), config, tokenizer_dir, tmp_path / "lit")

    convert_lit_checkpoint(tmp_path / "lit", tmp_path / "hf", chat_template=chat_template)
    template = ChatTemplate.from_checkpoint(tmp_path / "hf")
    assert template.name == expected_name
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for messages in (CONVERSATION, FORGED):
        text = template.render(messages, True, ChatTemplate.special_tokens(tokenizer))
        assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
        expected = hf.apply_chat_template(messages, add_generation_prompt=True, sanitize_control_tokens=True)
        bos = [] if kind == "chatml_jinja" else [tokenizer.bos_id]  # chatml's tokenizer has no BOS
        assert template.encode(tokenizer, messages) == bos + expected["input_ids"]
    eos_ids = GenerationConfig.from_pretrained(tmp_path / "hf").eos_token_id
    if kind == "chatml_jinja":
        im_end = tokenizer.special_token_ids(["<|im_end|>"])[0]
        assert eos_ids == [tokenizer.eos_id, im_end] and tokenizer.eos_id == 0
        assert template.stop_ids(tokenizer) == [im_end, 0]
    else:  # the turns end with EOS itself
        assert eos_ids == tokenizer.eos_id == 2 and template.stop_ids(tokenizer) == [2]

    # and back: the converted directory keeps the template
    convert_hf_checkpoint(tmp_path / "hf")
    assert ChatTemplate.from_checkpoint(tmp_path / "hf").sha256 == template.sha256
