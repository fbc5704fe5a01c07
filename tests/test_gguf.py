"""GGUF both ways (gguf_format.py, scripts/convert_to_gguf.py, scripts/convert_gguf_checkpoint.py), against three
independent readers of the format: llama.cpp itself (node-llama-cpp's prebuilt binary runs our files: its ids and
greedy tokens), transformers' GGUF loading (its own tensor map, q/k permutation, dequantization and tokenizer builder:
logits and ids), and gguf-py's GGUFReader (keys, tensor names, shapes and types). Tiny random GQA models with each
kind of tokenizer (a sentencepiece model, a byte-fallback tokenizer.json, a byte-level one), and the session's tiny
trained checkpoint where top-1 agreement needs a model with real margins."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from chat_template import ChatTemplate
from checkpoint import load_model, load_state_dict, save_model_dir
from gguf_format import (TYPES, checkpoint_vocabulary, gguf_tensors, permute, unpermute, write_hyperparameters,
                         write_vocabulary)
from hf import hf_state_dict
from model import GPT, Config
from quantize import Quantization, to_json
from scripts.convert_gguf_checkpoint import convert_gguf_checkpoint
from scripts.convert_to_gguf import convert_to_gguf
from tests.documented import ROOT, documented, run_script
from tests.test_convert import randomize_
from tests.test_script_errors import run_in_process
from tests.test_tokenizer import (CHATML_CHAT, LEADING_SPACE, STRINGS, ZEPHYR_CHAT, llama_tokenizer,
                                  train_chatml_tokenizer, train_sentencepiece)
from tokenizer import Tokenizer

TEXTS = [text for text in STRINGS if text]
# the keys llama.cpp's loader reads for the llama architecture (llama-model.cpp's load_hparams, llama-vocab.cpp)
REQUIRED_KEYS = ("general.architecture", "general.file_type", "llama.context_length", "llama.embedding_length",
                 "llama.block_count", "llama.feed_forward_length", "llama.attention.head_count",
                 "llama.attention.head_count_kv", "llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base",
                 "llama.rope.dimension_count", "llama.vocab_size", "tokenizer.ggml.model", "tokenizer.ggml.pre",
                 "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.add_bos_token")
LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
NODE_LLAMA_CPP = "NODE_LLAMA_CPP_DIR"  # the folder where `npm i -E node-llama-cpp@3.21.1` was run (.ci/run does)


def tiny_checkpoint(directory: Path, tokenizer_dir: Path, vocab_size: int, template: str = None,
                    tie_embeddings: bool = False) -> Path:
    """A random 2-layer GQA model (4 query heads, 2 groups) with norms random too; intermediate_size 176 is not a
    multiple of 32, so q8_0 and q4_0 keep ffn_down in f16."""
    config = Config(block_size=64, vocab_size=vocab_size, n_layer=2, n_head=4, n_embd=64, n_query_groups=2,
                    intermediate_size=176, tie_embeddings=tie_embeddings)
    model = GPT(config)
    randomize_(model)
    save_model_dir(model, config, tokenizer_dir, directory)
    if template is not None:
        ChatTemplate.builtin(template).save(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """kind -> a tiny checkpoint: "sentencepiece" (600 pieces; vocab_size 610, so ten [PADn] tokens and 30 padding
    rows), "tokenizer.json" (the same tokenizer as transformers saves it: byte-fallback BPE), "byte-level" (GPT-2
    style BPE with ChatML's tokens and template)."""
    root = tmp_path_factory.mktemp("gguf_checkpoints")
    for name in ("spm_tokenizer", "chatml_tokenizer"):
        (root / name).mkdir()
    spm = train_sentencepiece(root / "spm_tokenizer")
    llama_tokenizer(spm, add_bos_token=True).save_pretrained(root / "json_tokenizer")
    (root / "json_tokenizer" / "tokenizer.model").unlink(missing_ok=True)
    chatml = train_chatml_tokenizer(root / "chatml_tokenizer")
    return {
        "sentencepiece": tiny_checkpoint(root / "spm", spm, 610, template="zephyr"),
        "tokenizer.json": tiny_checkpoint(root / "json", root / "json_tokenizer", 600),
        "byte-level": tiny_checkpoint(root / "chatml", chatml, Tokenizer(chatml).vocab_size, template="chatml"),
    }


@pytest.fixture(scope="module")
def f32_files(checkpoints, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gguf_f32")
    return {kind: convert_to_gguf(directory, root / f"{directory.name}.gguf", type="f32")
            for kind, directory in checkpoints.items()}


def transformers_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def transformers_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def our_logits(model: GPT, ids: list) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, :, : model.config.vocab_size]


def check_file(path: Path, config: Config, type: str, tied: bool = False) -> gguf.GGUFReader:
    """GGUFReader's view of an export: llama.cpp's keys with our values, exactly the tensors of the llama
    architecture (no `output` when tied) in their shapes and types, and one embedding row per token."""
    reader = gguf.GGUFReader(path)
    values = {key: field.contents() for key, field in reader.fields.items()}
    assert set(REQUIRED_KEYS) <= set(values)
    assert values["general.architecture"] == "llama"
    assert [values[f"llama.{key}"] for key in ("context_length", "embedding_length", "block_count",
                                               "feed_forward_length", "attention.head_count",
                                               "attention.head_count_kv", "rope.dimension_count")] == [
        config.block_size, config.n_embd, config.n_layer, config.intermediate_size, config.n_head,
        config.n_query_groups, config.head_size]
    assert values["llama.rope.freq_base"] == config.rope_base
    assert values["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.norm_eps)
    tokens = values["tokenizer.ggml.tokens"]
    assert len(tokens) == len(values["tokenizer.ggml.token_type"]) == values["llama.vocab_size"] == config.vocab_size
    tensors = {t.name: t for t in reader.tensors}
    expected = ["token_embd.weight"] + [f"blk.{i}.{name}.weight" for i in range(config.n_layer)
                                        for name in LAYER_TENSORS] + ["output_norm.weight"]
    assert sorted(tensors) == sorted(expected + ([] if tied else ["output.weight"]))
    q_rows, kv_rows = config.n_head * config.head_size, config.n_query_groups * config.head_size
    shapes = {"attn_q": (config.n_embd, q_rows), "attn_k": (config.n_embd, kv_rows),
              "attn_v": (config.n_embd, kv_rows),
              "attn_output": (q_rows, config.n_embd), "ffn_gate": (config.n_embd, config.intermediate_size),
              "ffn_up": (config.n_embd, config.intermediate_size),
              "ffn_down": (config.intermediate_size, config.n_embd),
              "attn_norm": (config.n_embd,), "ffn_norm": (config.n_embd,)}
    for name, tensor in tensors.items():
        kind = name.split(".")[-2]
        shape = shapes.get(kind, (config.n_embd, len(tokens)) if kind in ("token_embd", "output") else (config.n_embd,))
        assert tuple(tensor.shape.tolist()) == shape, name  # ggml's order: the row length first
        head = name == "output.weight" or (tied and name == "token_embd.weight")
        want = ("F32" if len(shape) == 1 else "F16" if type in ("q8_0", "q4_0") and shape[0] % 32 else
                "Q8_0" if type == "q4_0" and head else type.upper())
        assert tensor.tensor_type.name == want, name
    return reader


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json", "byte-level"])
def test_an_f32_export_gives_transformers_our_logits_and_our_ids(kind, checkpoints, f32_files):
    """transformers reads the file with its own tensor map, q/k un-permutation and tokenizer builder: the logits of a
    GQA model agree to fp32 rounding (measured: 0.0), the ids of every text (chat tokens included) are ours."""
    directory, path = checkpoints[kind], f32_files[kind]
    ours, tokenizer = load_model(directory), Tokenizer(directory)
    check_file(path, ours.config, "f32")
    hf_model, hf_tokenizer = transformers_model(path), transformers_tokenizer(path)
    ids = tokenizer.encode(STRINGS[6] + STRINGS[2], bos=tokenizer.bos_id is not None)[:64]
    with torch.no_grad():
        hf_logits = hf_model(torch.tensor([ids])).logits[0]
    assert hf_logits.shape == (len(ids), ours.config.vocab_size)
    torch.testing.assert_close(hf_logits, our_logits(ours, ids), rtol=0, atol=1e-5)
    chat = CHATML_CHAT if kind == "byte-level" else ZEPHYR_CHAT
    for text in TEXTS + [chat]:
        assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text, parse_special=True)
    assert (hf_tokenizer("x")["input_ids"][0] == tokenizer.bos_id) == tokenizer.add_bos_token
    template = ChatTemplate.from_checkpoint(directory)
    assert hf_tokenizer.chat_template == (template.source if template else None)


def rounded(model: GPT, dtype: torch.dtype) -> GPT:
    """`model` with its matrices rounded to `dtype` (the norms stay fp32, as the export writes them)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.copy_(param.to(dtype).float())
    return model


def test_f16_and_bf16_exports_are_our_weights_rounded_and_the_head_of_q4_0_stays_8_bit(checkpoints, tmp_path):
    directory = checkpoints["sentencepiece"]
    ids = Tokenizer(directory).encode(STRINGS[5], bos=True)
    for type, dtype in (("f16", torch.float16), ("bf16", torch.bfloat16)):
        path = convert_to_gguf(directory, tmp_path / f"{type}.gguf", type=type)
        check_file(path, load_model(directory).config, type)
        with torch.no_grad():
            hf_logits = transformers_model(path)(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(hf_logits, our_logits(rounded(load_model(directory), dtype), ids), rtol=0,
                                   atol=1e-5)
    check_file(convert_to_gguf(directory, tmp_path / "q4_0.gguf", type="q4_0"), load_model(directory).config, "q4_0")


def test_quantized_exports_agree_with_our_fp32_model_on_the_next_token(trained, tmp_path, capsys):
    """The documented q8_0 and q4_0 commands on the trained checkpoint; transformers dequantizes the files (as
    llama.cpp's kernels use them): top-1 agreement with our fp32 model over 512 positions of unseen code (measured:
    99.8% and 93.8%)."""
    from text_readers import stdlib_files

    paths = {"q8_0": tmp_path / "q8_0.gguf", "q4_0": tmp_path / "q4_0.gguf"}
    run_script(documented("python scripts/convert_to_gguf.py --checkpoint_dir out/sft_demo/final "
                          "--out_file out/sft_demo-q8_0.gguf --type q8_0",
                          replace={"--checkpoint_dir": trained.checkpoint_dir, "--out_file": paths["q8_0"]}))
    run_script(documented("python scripts/convert_to_gguf.py --checkpoint_dir out/tinyllama_1b/final "
                          "--out_file out/tinyllama_1b.gguf --type q4_0",
                          replace={"--checkpoint_dir": trained.checkpoint_dir, "--out_file": paths["q4_0"]}))
    assert "1 tensors (output.weight): the output layer stays at 8 bits" in capsys.readouterr().out
    ours, tokenizer = load_model(trained.checkpoint_dir), Tokenizer(trained.checkpoint_dir)
    ids = tokenizer.encode(stdlib_files(400)[-1].read_text(), bos=True)[:512]
    batch = torch.tensor(ids).reshape(2, 256)
    with torch.no_grad():
        expected = ours(batch)[..., : ours.config.vocab_size].argmax(-1)
    agreement = {}
    for type, path in paths.items():
        check_file(path, ours.config, type)
        with torch.no_grad():
            agreement[type] = (transformers_model(path)(batch).logits.argmax(-1) == expected).float().mean().item()
    assert agreement["q8_0"] >= 0.99 and agreement["q4_0"] >= 0.9, agreement


def test_round_trip_keeps_weights_config_tokenizer_and_chat_template(trained, tmp_path):
    """ours -> f32 GGUF -> ours, by the documented commands: the same weights (the vocabulary rows), the same
    config, the chat template; the tokenizer encodes as the original with sentencepiece's legacy rule, llama.cpp's
    (the "▁" before text after a special token), and as the original itself on text without special tokens."""
    original = tmp_path / "original"
    shutil.copytree(trained.checkpoint_dir, original)
    ChatTemplate.builtin("zephyr").save(original)
    run_script(documented("python scripts/convert_to_gguf.py --checkpoint_dir out/demo/final --out_file out/demo.gguf "
                          "--type f32", replace={"--checkpoint_dir": original, "--out_file": tmp_path / "demo.gguf"}))
    run_script(documented("python scripts/convert_gguf_checkpoint.py --gguf_file out/demo.gguf "
                          "--out_dir out/demo_from_gguf",
                          replace={"--gguf_file": tmp_path / "demo.gguf", "--out_dir": tmp_path / "back"}))
    back = tmp_path / "back"
    assert json.loads((back / "model_config.json").read_text()) == json.loads(
        (original / "model_config.json").read_text())  # the demo config, found by its values
    before, after = load_state_dict(original / "lit_model.pth"), load_state_dict(back / "lit_model.pth")
    assert before.keys() == after.keys()
    rows = load_model(original).config.vocab_size
    for key in before:
        assert torch.equal(before[key][:rows], after[key][:rows]), key
    assert ChatTemplate.from_checkpoint(back).source == ChatTemplate.builtin("zephyr").source
    legacy = tmp_path / "legacy"
    shutil.copytree(original, legacy)
    (legacy / "tokenizer_config.json").write_text(json.dumps({"legacy": True}))
    ours, theirs, reference = Tokenizer(original), Tokenizer(back), Tokenizer(legacy)
    assert (theirs.bos_id, theirs.eos_id, theirs.add_bos_token) == (ours.bos_id, ours.eos_id, ours.add_bos_token)
    for text in TEXTS + LEADING_SPACE + [ZEPHYR_CHAT]:
        assert theirs.encode(text, parse_special=True) == reference.encode(text, parse_special=True), text
        assert theirs.encode(text) == ours.encode(text), text
    assert theirs.encode(ZEPHYR_CHAT, parse_special=True) != ours.encode(ZEPHYR_CHAT, parse_special=True)


def test_our_import_of_a_q8_0_file_is_what_transformers_loads_from_it(checkpoints, tmp_path):
    """Both dequantize Q8_0; ours also un-permutes q and k and fuses qkv: the same weights (the k-quants a published
    file holds go through the same gguf.quants.dequantize)."""
    path = convert_to_gguf(checkpoints["sentencepiece"], tmp_path / "q8_0.gguf", type="q8_0")
    run_script(documented("python scripts/convert_gguf_checkpoint.py --gguf_file "
                          "checkpoints/tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf --out_dir checkpoints/TinyLlama-1.1B-Chat",
                          replace={"--gguf_file": path, "--out_dir": tmp_path / "back"}))
    assert_same_weights_as_transformers(path, tmp_path / "back")


def assert_same_weights_as_transformers(path: Path, directory: Path) -> None:
    """Our import of `path` in `directory` holds the weights transformers loads from it (the vocabulary rows)."""
    ours = load_model(directory)
    reference = transformers_model(path).state_dict()
    converted = hf_state_dict(ours.state_dict(), ours.config)
    assert set(converted) == set(reference)
    for key, tensor in converted.items():
        assert torch.equal(tensor[: reference[key].shape[0]], reference[key]), key


def random_blocks(shape: tuple, kind: "gguf.GGMLQuantizationType", rng: np.random.Generator) -> np.ndarray:
    """Valid k-quant blocks of random bits, their f16 scales set to 1e-3 (gguf-py writes no k-quants)."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    blocks = rng.integers(0, 256, (int(np.prod(shape)) // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(1e-3).tobytes(), np.uint8)
    for offset in ((0, 2) if kind == gguf.GGMLQuantizationType.Q4_K else (size - 2,)):  # Q4_K: d, dmin; Q6_K: d
        blocks[:, offset: offset + 2] = scale
    return blocks.reshape(*shape[:-1], shape[-1] // block * size)


def test_a_file_of_q4_k_m_types_imports_as_transformers_loads_it(trained, tmp_path):
    """Q4_K_M's types, as llama.cpp's quantizer chooses them for the demo config: Q4_K matrices, Q6_K embedding and
    head, Q8_0 where rows (704) are not a multiple of Q4_K's 256-value blocks, f32 norms."""
    config, kinds = load_model(trained.checkpoint_dir).config, gguf.GGMLQuantizationType
    vocabulary = checkpoint_vocabulary(Tokenizer(trained.checkpoint_dir), config.vocab_size, [])
    path, rng = tmp_path / "q4_k_m.gguf", np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, "llama")
    write_hyperparameters(writer, config, config.vocab_size, "q4_0", "q4_k_m")
    write_vocabulary(writer, vocabulary, None)
    with torch.device("meta"):
        for name, tensor in gguf_tensors(GPT(config).state_dict(), config, config.vocab_size, tie_embeddings=False):
            shape = tuple(tensor.shape)
            if len(shape) == 1:
                writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
            elif name in ("token_embd.weight", "output.weight") or shape[-1] % 256 == 0:
                kind = kinds.Q6_K if name in ("token_embd.weight", "output.weight") else kinds.Q4_K
                writer.add_tensor(name, random_blocks(shape, kind, rng), raw_dtype=kind)
            else:
                data = gguf.quants.quantize(0.02 * rng.standard_normal(shape).astype(np.float32), kinds.Q8_0)
                writer.add_tensor(name, data, raw_dtype=kinds.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    convert_gguf_checkpoint(path, tmp_path / "back")
    assert_same_weights_as_transformers(path, tmp_path / "back")


def test_a_tied_head_is_written_once_and_stays_tied_on_import(checkpoints, tmp_path, capsys):
    spm = checkpoints["sentencepiece"]
    directory = tiny_checkpoint(tmp_path / "tied", spm, 610, tie_embeddings=True)
    path = convert_to_gguf(directory, tmp_path / "tied.gguf", type="q4_0")
    assert "The head is the token embedding: written once, as token_embd" in capsys.readouterr().out
    check_file(path, load_model(directory).config, "q4_0", tied=True)  # token_embd is the head: 8 bits
    f32 = convert_to_gguf(directory, tmp_path / "tied_f32.gguf", type="f32")
    hf_model = transformers_model(f32)
    assert hf_model.config.tie_word_embeddings
    ids = Tokenizer(directory).encode(STRINGS[3], bos=True)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(torch.tensor([ids])).logits[0], our_logits(load_model(directory), ids),
                                   rtol=0, atol=1e-5)
    config = convert_gguf_checkpoint(f32, tmp_path / "back")
    assert "no output tensor: the head is the token embedding (tie_embeddings" in capsys.readouterr().out
    back = load_model(tmp_path / "back")
    assert config.tie_embeddings and back.lm_head.weight is back.transformer.wte.weight
    assert torch.equal(back.lm_head.weight[:610], load_model(directory).lm_head.weight[:610])
    # an untied checkpoint whose head is a copy of its embedding is written once too
    copy = {key: tensor.clone() for key, tensor in load_state_dict(spm / "lit_model.pth").items()}
    copy["lm_head.weight"] = copy["transformer.wte.weight"].clone()
    save_model_dir(copy, load_model(spm).config, spm, tmp_path / "copy")
    check_file(convert_to_gguf(tmp_path / "copy", tmp_path / "copy.gguf", type="f32"), load_model(spm).config, "f32",
               tied=True)


def test_the_q_and_k_permutation_is_llama_cpps_and_undone_on_import():
    """llama.cpp's converter (LlamaModel.permute): per head, row i of the first half, then row i of the second."""
    rows = torch.arange(2 * 8).reshape(16, 1)  # 2 heads of 8 rows
    assert permute(rows, 2).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    assert torch.equal(unpermute(permute(rows, 2), 2), rows)


def test_llama_cpp_runs_our_files_with_our_ids_and_greedy_tokens(trained, checkpoints, f32_files, tmp_path):
    """llama.cpp's own tokenizer and forward pass, through node-llama-cpp 3.21.1's prebuilt CPU binary. Its ids equal
    those of our import of the file (llama.cpp's legacy "▁" after special tokens included) for every text, and the
    original's on text without special tokens or leading spaces; each of its greedy tokens is our argmax in
    float64 (within 1e-4 of it at a near-tie)."""
    node, directory = shutil.which("node"), os.environ.get(NODE_LLAMA_CPP, "")
    if node is None:
        pytest.skip("node is not installed: llama.cpp runs through node-llama-cpp (the transformers checks stand in)")
    if not (Path(directory) / "node_modules" / "node-llama-cpp").is_dir():
        pytest.skip(f"{NODE_LLAMA_CPP} does not name a folder where `npm i -E node-llama-cpp@3.21.1` was run "
                    f"({directory!r}); .ci/run installs it")
    files = {"trained": convert_to_gguf(trained.checkpoint_dir, tmp_path / "trained.gguf", type="f32"),
             "tokenizer.json": f32_files["tokenizer.json"], "byte-level": f32_files["byte-level"]}
    originals = {"trained": trained.checkpoint_dir, **checkpoints}
    texts = TEXTS + LEADING_SPACE + [ZEPHYR_CHAT, CHATML_CHAT]
    jobs, imports = [], {}
    for name, path in files.items():
        imports[name] = tmp_path / f"{name}_back"
        convert_gguf_checkpoint(path, imports[name])
        tokenizer = Tokenizer(originals[name])
        prompt = tokenizer.encode("def parse(self, text):\n    ", bos=tokenizer.bos_id is not None)
        jobs.append({"model": str(path), "texts": texts, "prompt": prompt, "max_tokens": 24})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    result = subprocess.run([node, str(ROOT / "tests" / "gguf_llama_cpp.mjs"), str(tmp_path / "jobs.json")],
                            capture_output=True, text=True, timeout=120, env={**os.environ})
    if result.returncode < 0:
        pytest.skip(f"llama.cpp's prebuilt binary crashed on this CPU (signal {-result.returncode}; native llama.cpp "
                    f"builds crash in AMX code on some Xeon VMs): the transformers checks stand in")
    assert result.returncode == 0, result.stderr[-3000:]
    for (name, path), job, output in zip(files.items(), jobs, json.loads(result.stdout)):
        original, back = Tokenizer(originals[name]), Tokenizer(imports[name])
        for text, ids in zip(texts, output["ids"]):
            assert ids == back.encode(text, parse_special=True), (name, text)
            if text in TEXTS:
                assert ids == original.encode(text, parse_special=True), (name, text)
        model = load_model(originals[name], dtype=torch.float64)
        sequence = job["prompt"] + output["greedy"]
        logits = our_logits(model, sequence)[len(job["prompt"]) - 1: -1]
        chosen = logits.gather(1, torch.tensor(output["greedy"])[:, None])[:, 0]
        assert (chosen >= logits.max(-1).values - 1e-4).all(), (name, output["greedy"], logits.argmax(-1).tolist())


# Bad input --------------------------------------------------------------------------------------------------------

def small_gguf(path: Path, architecture: str = "llama", tensor_type=gguf.GGMLQuantizationType.F32) -> Path:
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "a"])
    writer.add_token_types([2, 1])
    for key, value in (("context_length", 8), ("embedding_length", 4), ("block_count", 0),
                       ("feed_forward_length", 8), ("attention.head_count", 2), ("attention.head_count_kv", 2)):
        writer.add_uint32(f"{architecture}.{key}", value)
    writer.add_float32(f"{architecture}.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_tensor("token_embd.weight", np.zeros((2, 4), np.int32 if tensor_type.name == "I32" else np.float32),
                      raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bad_gguf_files_are_one_line_errors(checkpoints, f32_files, tmp_path, monkeypatch, capsys):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(f32_files["sentencepiece"].read_bytes()[:-1000])
    cases = {
        checkpoints["sentencepiece"] / "lit_model.pth": "is not a GGUF file",
        small_gguf(tmp_path / "gpt2.gguf", "gpt2"): "holds a 'gpt2' model: this converter reads the 'llama'",
        small_gguf(tmp_path / "i32.gguf", tensor_type=gguf.GGMLQuantizationType.I32): "is of type I32, which gguf",
        truncated: "expected a complete GGUF file (was it truncated?)",
    }
    for path, message in cases.items():
        line = run_in_process("scripts/convert_gguf_checkpoint.py", ["--gguf_file", str(path), "--out_dir",
                                                                      str(tmp_path / "out")], monkeypatch, capsys)
        assert str(path) in line and message in line, line
        assert not (tmp_path / "out").exists()


def test_bad_exports_are_one_line_errors_and_a_failed_one_leaves_nothing_at_out_file(checkpoints, tmp_path,
                                                                                    monkeypatch, capsys):
    import gguf_format

    line = run_in_process("scripts/convert_to_gguf.py", ["--checkpoint_dir", str(checkpoints["sentencepiece"]),
                                                         "--out_file", str(tmp_path / "m.gguf"), "--type", "q4_k"],
                          monkeypatch, capsys)
    assert f"--type 'q4_k': expected one of {', '.join(TYPES)}" in line
    quantized = tmp_path / "quantized"
    shutil.copytree(checkpoints["sentencepiece"], quantized)
    state_dict = {key: tensor.clone() for key, tensor in load_state_dict(quantized / "lit_model.pth").items()}
    state_dict["transformer.h.0.mlp.fc_1.weight"] = state_dict["transformer.h.0.mlp.fc_1.weight"].to(torch.int8)
    torch.save(state_dict, quantized / "lit_model.pth")  # over the memory-mapped file: hence the clones
    line = run_in_process("scripts/convert_to_gguf.py", ["--checkpoint_dir", str(quantized), "--out_file",
                                                         str(tmp_path / "m.gguf")], monkeypatch, capsys)
    assert f"{quantized / 'lit_model.pth'} holds torch.int8 tensors: the GGUF export reads float weights" in line
    (quantized / "quantization.json").write_text(json.dumps(to_json(Quantization("int8"))))
    line = run_in_process("scripts/convert_to_gguf.py", ["--checkpoint_dir", str(quantized), "--out_file",
                                                         str(tmp_path / "m.gguf")], monkeypatch, capsys)
    assert f"--checkpoint_dir {quantized} is quantized (int8): the GGUF export" in line
    shutil.rmtree(quantized)
    existing = tmp_path / "existing.gguf"
    existing.write_bytes(b"an older file")

    def fail(tensor, type):
        raise OSError("No space left on device")

    monkeypatch.setattr(gguf_format, "encode_tensor", fail)
    for out_file in (tmp_path / "new.gguf", existing):
        with pytest.raises(OSError, match="No space left"):
            convert_to_gguf(checkpoints["sentencepiece"], out_file, type="q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.gguf"]
    assert existing.read_bytes() == b"an older file"
