"""GGUF, the file format of llama.cpp (and so of Ollama, LM Studio, llama-cpp-python), for model.py's Llama, both
ways: llama.cpp's tensor names and the row order it expects for q and k, the hyperparameter keys its loader reads,
the vocabulary, and the tensor types. scripts/convert_to_gguf.py and scripts/convert_gguf_checkpoint.py are the
command lines; files are written and read with the `gguf` package (gguf-py, from the llama.cpp repository).

The references are llama.cpp's own converter (convert_hf_to_gguf.py: `LlamaModel.permute`,
`_set_vocab_sentencepiece`, `_set_vocab_gpt2`) and its loader (llama-model.cpp, llama-vocab.cpp).

- q and k: model.py (like Hugging Face) rotates the two halves of a head (rotate-half RoPE); llama.cpp's `llama`
  architecture rotates adjacent pairs, so the rows of q and k are interleaved on export and put back on import.
- Rows: model.py pads the embedding and the head to `padded_vocab_size`; a GGUF has one row per token. Export drops
  the padding rows and, where the tokenizer has fewer tokens than `vocab_size`, appends llama.cpp's `[PADn]` tokens
  typed UNUSED; import pads again with zero rows.
- Vocabulary: a sentencepiece `tokenizer.model`, or a `tokenizer.json` that is sentencepiece-style BPE with byte
  fallback, is `tokenizer.ggml.model = llama` (pieces, scores, types); a byte-level BPE `tokenizer.json` (GPT-2 style)
  is `gpt2` with its merges and the `tokenizer.ggml.pre` name of its split rule.
- llama.cpp's sentencepiece tokenizer puts the "▁" prefix before the text after every special token (sentencepiece's
  "legacy" rule); tokenizer.py and transformers 5 put it only at the start of the text unless tokenizer_config.json
  says `"legacy": true`. Import writes `"legacy": true`, so the checkpoint encodes exactly as llama.cpp does.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import gguf
import numpy as np
import torch

from hf import merge_qkv, same_values, split_qkv
from model import Config, configs
from tokenizer import Tokenizer
from utils import UserError

ARCHITECTURE = "llama"
# --type -> the GGML type of the matrices (1-D tensors are always F32)
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
QUANTIZED = ("q8_0", "q4_0")
# a quantized row is cut into blocks of this many values: a row of another length is kept in F16
BLOCK = 32
# llama.cpp's token types (gguf.TokenType), which are sentencepiece's piece types too
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# model.GPT's parameter -> llama.cpp's tensor; "{}" is the layer. The fused qkv is three tensors (QKV_NAMES).
GGUF_NAMES = {
    "transformer.wte.weight": "token_embd.weight",
    "transformer.h.{}.norm_1.weight": "blk.{}.attn_norm.weight",
    "transformer.h.{}.attn.proj.weight": "blk.{}.attn_output.weight",
    "transformer.h.{}.norm_2.weight": "blk.{}.ffn_norm.weight",
    "transformer.h.{}.mlp.fc_1.weight": "blk.{}.ffn_gate.weight",
    "transformer.h.{}.mlp.fc_2.weight": "blk.{}.ffn_up.weight",
    "transformer.h.{}.mlp.proj.weight": "blk.{}.ffn_down.weight",
    "transformer.ln_f.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
QKV_KEY = "transformer.h.{}.attn.qkv.weight"
QKV_NAMES = ("blk.{}.attn_q.weight", "blk.{}.attn_k.weight", "blk.{}.attn_v.weight")
# Llama-3's split rule, which llama.cpp calls "llama-bpe"; a byte-level tokenizer.json with GPT-2's built-in rule
# (ByteLevel with use_regex) is "gpt-2"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = ("gpt-2", "llama-bpe")
# tokenizer.ggml.model "llama" vocabularies from a sentencepiece model: llama.cpp's converter scores padding so
PAD_SCORE = -10000.0


@dataclass
class Vocabulary:
    """A GGUF's tokenizer keys: `model` "llama" (sentencepiece: `scores`) or "gpt2" (byte-level BPE: `merges`, the
    split rule `pre`); token types as llama.cpp's (NORMAL, CONTROL, BYTE, ...)."""
    model: str
    tokens: List[str]
    types: List[int]
    scores: Optional[List[float]] = None
    merges: Optional[List[str]] = None
    pre: str = "default"
    special_ids: Dict[str, int] = field(default_factory=dict)  # "bos", "eos", "unk", "pad", "eot" -> id
    add_bos: bool = True
    add_eos: bool = False
    add_space_prefix: bool = True

    def pad_to(self, n: int) -> None:
        """Append llama.cpp's `[PADi]` tokens, typed UNUSED, up to n tokens (the model's vocab_size)."""
        added = range(len(self.tokens), n)
        self.tokens += [f"[PAD{i}]" for i in added]
        self.types += [UNUSED] * len(added)
        if self.scores is not None:
            self.scores += [PAD_SCORE] * len(added)


# Export ---------------------------------------------------------------------------------------------------------

def permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q or k rows (n_heads * head_size, ...) from rotate-half order (each head's first half, then its second) to
    llama.cpp's pairs (row i of the first half, then row i of the second): llama.cpp's `LlamaModel.permute`."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).transpose(1, 2) \
        .reshape(weight.shape)


def unpermute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute`."""
    return weight.reshape(n_heads, weight.shape[0] // n_heads // 2, 2, *weight.shape[1:]).transpose(1, 2) \
        .reshape(weight.shape)


def check_exportable(config: Config, source: str) -> None:
    if config.bias:
        raise UserError(f"{source}: bias=True; the GGUF export writes Llama's bias-free layers only")


def gguf_tensors(state_dict: Mapping[str, torch.Tensor], config: Config, n_vocab: int,
                 tie_embeddings: bool) -> Iterator[Tuple[str, torch.Tensor]]:
    """(llama.cpp's name, tensor) for each tensor of the file, in llama.cpp's converter's order: the embedding and the
    head cut to `n_vocab` rows, q and k permuted. With `tie_embeddings` no `output` tensor is written: llama.cpp then
    uses token_embd as the head. Works on meta tensors too (for the shapes)."""
    yield GGUF_NAMES["transformer.wte.weight"], state_dict["transformer.wte.weight"][:n_vocab]
    for i in range(config.n_layer):
        q, k, v = split_qkv(state_dict[QKV_KEY.format(i)], config)
        parts = (permute(q, config.n_head), permute(k, config.n_query_groups), v)
        yield GGUF_NAMES["transformer.h.{}.norm_1.weight"].format(i), state_dict[f"transformer.h.{i}.norm_1.weight"]
        yield from ((name.format(i), part) for name, part in zip(QKV_NAMES, parts))
        for key in ("attn.proj", "norm_2", "mlp.fc_1", "mlp.fc_2", "mlp.proj"):
            template = f"transformer.h.{{}}.{key}.weight"
            yield GGUF_NAMES[template].format(i), state_dict[template.format(i)]
    yield GGUF_NAMES["transformer.ln_f.weight"], state_dict["transformer.ln_f.weight"]
    if not tie_embeddings:
        yield GGUF_NAMES["lm_head.weight"], state_dict["lm_head.weight"][:n_vocab]


def tensor_type(name: str, shape: Tuple[int, ...], type: str, tie_embeddings: bool) -> Tuple[str, Optional[str]]:
    """The type ("f32", "f16", ... as in TYPES) of a tensor under --type `type`, and why it differs, if it does."""
    if len(shape) == 1:
        return "f32", None
    if type not in QUANTIZED:
        return type, None
    if shape[-1] % BLOCK:
        return "f16", f"rows of {shape[-1]} values are not a multiple of the {BLOCK}-value blocks of {type}"
    if type == "q4_0" and (name == "output.weight" or (tie_embeddings and name == "token_embd.weight")):
        return "q8_0", "the output layer stays at 8 bits under q4_0 (llama.cpp's quantizer keeps it at Q6_K)"
    return type, None


def ggml_type(type: str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[type.upper()]


def encode_tensor(tensor: torch.Tensor, type: str) -> np.ndarray:
    """The bytes (or float array) of `tensor` in GGML type `type`; Q8_0 and Q4_0 by gguf.quants, which follows
    ggml's reference quantizer."""
    data = tensor.detach().to(torch.float32).contiguous().numpy()
    return gguf.quants.quantize(data, ggml_type(type))


def write_gguf(path: Path, state_dict: Mapping[str, torch.Tensor], config: Config, vocabulary: Vocabulary,
               chat_template: Optional[str], type: str, tie_embeddings: bool = False,
               name: str = "") -> Dict[str, List[str]]:
    """Write the GGUF file `path` (not atomically: the caller writes a temporary file) and return {note: [tensor
    names]} for the tensors whose type differs from `type`. One tensor is converted and written at a time, so memory
    stays about one tensor above the (memory-mapped) state dict.

    tie_embeddings: the head is the embedding (no `output` tensor; llama.cpp reads token_embd for both)."""
    if type not in TYPES:
        raise UserError(f"--type {type!r}: expected one of {', '.join(TYPES)}")
    n_vocab = len(vocabulary.tokens)
    writer = gguf.GGUFWriter(path, ARCHITECTURE)
    write_hyperparameters(writer, config, n_vocab, type, name)
    write_vocabulary(writer, vocabulary, chat_template)

    with torch.device("meta"):
        shapes = [(key, tuple(t.shape)) for key, t in gguf_tensors(
            {k: torch.empty(v.shape) for k, v in state_dict.items()}, config, n_vocab, tie_embeddings)]
    notes: Dict[str, List[str]] = {}
    types = {}
    for key, shape in shapes:
        types[key], note = tensor_type(key, shape, type, tie_embeddings)
        if note:
            notes.setdefault(note, []).append(key)
        nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(shape, ggml_type(types[key]))))
        writer.add_tensor_info(key, shape, np.dtype(np.float32), nbytes, raw_dtype=ggml_type(types[key]))
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for key, tensor in gguf_tensors(state_dict, config, n_vocab, tie_embeddings):
            writer.write_tensor_data(encode_tensor(tensor, types[key]))
    finally:
        writer.close()
    return notes


def write_hyperparameters(writer: gguf.GGUFWriter, config: Config, n_vocab: int, type: str, name: str) -> None:
    """The `llama.*` keys llama.cpp's loader reads, and the file's type."""
    writer.add_name(name or config.name or "model")
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_query_groups)
    if config.head_size * config.n_head != config.n_embd:  # llama.cpp's default is n_embd / n_head
        writer.add_key_length(config.head_size)
        writer.add_value_length(config.head_size)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(float(config.rope_base))
    writer.add_rope_dimension_count(config.head_size)
    if config.rope_condense_ratio > 1:  # model.py divides positions by the ratio: llama.cpp's linear scaling
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(config.rope_condense_ratio))
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                  "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    writer.add_file_type(file_types[type])
    if type in QUANTIZED:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_vocabulary(writer: gguf.GGUFWriter, vocabulary: Vocabulary, chat_template: Optional[str]) -> None:
    writer.add_tokenizer_model(vocabulary.model)
    writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    if vocabulary.scores is not None:
        writer.add_token_scores(vocabulary.scores)
    writer.add_token_types(vocabulary.types)
    if vocabulary.merges is not None:
        writer.add_token_merges(vocabulary.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id, "eot": writer.add_eot_token_id}
    for name, token_id in vocabulary.special_ids.items():
        adders[name](token_id)
    writer.add_add_bos_token(vocabulary.add_bos)
    writer.add_add_eos_token(vocabulary.add_eos)
    if vocabulary.model == "llama":
        writer.add_add_space_prefix(vocabulary.add_space_prefix)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def checkpoint_vocabulary(tokenizer: Tokenizer, n_vocab: int, stop_ids: List[int]) -> Vocabulary:
    """The GGUF vocabulary of a checkpoint's tokenizer, padded to `n_vocab` tokens (the model's vocab_size);
    `stop_ids` are its chat template's end-of-turn ids (the first that is not EOS becomes llama.cpp's EOT)."""
    if tokenizer.backend == "sentencepiece":
        vocabulary = sentencepiece_vocabulary(tokenizer.path)
    else:
        vocabulary = tokenizer_json_vocabulary(tokenizer.path, tokenizer.special_token_strings.get("unk_token"))
    vocabulary.pad_to(n_vocab)
    strings = tokenizer.special_token_strings
    for name in ("bos", "eos", "unk", "pad"):
        token = strings.get(f"{name}_token")
        token_id = None if token is None else tokenizer.token_id(token)
        if token_id is not None:
            vocabulary.special_ids[name] = token_id
    eot = [i for i in stop_ids if i != tokenizer.eos_id]
    if eot:
        vocabulary.special_ids["eot"] = eot[0]
    vocabulary.add_bos = tokenizer.add_bos_token
    return vocabulary


def sentencepiece_vocabulary(path: Path) -> Vocabulary:
    """A sentencepiece BPE model as llama.cpp's converter writes it (`_set_vocab_sentencepiece`): its pieces, scores
    and piece types, which are llama.cpp's token types."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        kind = proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type)
        raise UserError(f"{path} is a sentencepiece {kind} model: llama.cpp's `llama` vocabulary encodes as "
                        f"sentencepiece BPE, so its ids would differ; export a BPE tokenizer")
    normalizer = proto.normalizer_spec
    if normalizer.name not in ("identity", "") or normalizer.remove_extra_whitespaces:
        print(f"WARNING: {path} normalizes text ({normalizer.name}, remove_extra_whitespaces="
              f"{normalizer.remove_extra_whitespaces}); llama.cpp does not, so its ids differ on text that changes")
    return Vocabulary(model="llama", tokens=[p.piece for p in proto.pieces], scores=[p.score for p in proto.pieces],
                      types=[int(p.type) for p in proto.pieces], add_space_prefix=normalizer.add_dummy_prefix)


def tokenizer_json_vocabulary(path: Path, unk_token: Optional[str] = None) -> Vocabulary:
    """A tokenizer.json: sentencepiece-style BPE with byte fallback as `llama` (a piece's score orders the merges:
    minus the rank of the first merge that makes it), byte-level BPE as `gpt2` with its merges and split rule.
    `unk_token`: tokenizer_config.json's, where the file's model names none (transformers 5 writes none)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"{path}: a {model.get('type')} tokenizer.json; GGUF export reads BPE ones (sentencepiece-"
                        f"style with byte fallback, or byte-level)")
    ids = dict(model["vocab"])
    added = {token["content"]: token for token in data.get("added_tokens", [])}
    ids.update({content: token["id"] for content, token in added.items()})
    tokens = [None] * (max(ids.values()) + 1)
    for token, token_id in ids.items():
        tokens[token_id] = token
    holes = [i for i, token in enumerate(tokens) if token is None]
    if holes:
        raise UserError(f"{path}: no token has the ids {holes[:5]}: a GGUF vocabulary is a list without gaps")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    def added_type(token: str) -> Optional[int]:
        if token in added:
            return CONTROL if added[token].get("special") else USER_DEFINED
        return None

    if model.get("byte_fallback"):
        rank = {}
        for i, merge in enumerate(merges):
            rank.setdefault(merge.replace(" ", ""), i)
        types = [UNKNOWN if t in (model.get("unk_token"), unk_token) else added_type(t) or
                 (BYTE if re.fullmatch(r"<0x[0-9A-F]{2}>", t) else NORMAL) for t in tokens]
        # a token no merge makes is never made by merging: the lowest score
        scores = [-float(rank.get(t, len(merges))) for t in tokens]
        return Vocabulary(model="llama", tokens=tokens, scores=scores, types=types,
                          add_space_prefix=sentencepiece_prefix(data, path))
    return Vocabulary(model="gpt2", tokens=tokens, types=[added_type(t) or NORMAL for t in tokens], merges=merges,
                      pre=byte_level_pre(data.get("pre_tokenizer"), path))


def sentencepiece_prefix(data: dict, path: Path) -> bool:
    """Whether a sentencepiece-style tokenizer.json puts "▁" before the text (its normalizer's Prepend, or its
    Metaspace's prepend_scheme); one that does not write spaces as "▁" is refused."""
    steps = json.dumps([data.get("normalizer"), data.get("pre_tokenizer")], ensure_ascii=False)
    if "\u2581" not in steps:
        raise UserError(f"{path}: a byte-fallback BPE whose normalizer and pre-tokenizer do not write spaces as "
                        f"'\u2581': not a sentencepiece-style tokenizer that llama.cpp's `llama` vocabulary can run")
    return '"Prepend"' in steps or ('"Metaspace"' in steps and '"prepend_scheme": "never"' not in steps
                                    and '"add_prefix_space": false' not in steps)


def byte_level_pre(pre_tokenizer: Optional[dict], path: Path) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for a byte-level tokenizer.json's split rule."""
    def is_byte_level(step: dict, use_regex: bool) -> bool:
        return (step.get("type") == "ByteLevel" and step.get("use_regex", True) == use_regex
                and not step.get("add_prefix_space", False))

    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer or {}])
    if len(steps) == 1 and is_byte_level(steps[0], use_regex=True):
        return "gpt-2"
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT
            and is_byte_level(steps[1], use_regex=False)):
        return "llama-bpe"
    raise UserError(f"{path}: its pre-tokenizer {json.dumps(pre_tokenizer)[:200]} matches none of the split rules "
                    f"this export knows ({', '.join(PRE_TOKENIZERS)}): llama.cpp would split the text otherwise")


# Import ---------------------------------------------------------------------------------------------------------

def open_gguf(path: Path) -> gguf.GGUFReader:
    """A gguf.GGUFReader of `path` (memory-mapped; nothing in a GGUF is executed), with a file that is not a complete
    GGUF of the `llama` architecture refused in one line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--gguf_file {str(path)!r} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, OverflowError, KeyError) as error:  # numpy's, on a file cut short
        raise UserError(f"{path} cannot be read ({error}): expected a complete GGUF file (was it truncated?)") from None
    architecture = value(reader, "general.architecture")
    if architecture != ARCHITECTURE:
        raise UserError(f"{path} holds a {architecture!r} model: this converter reads the 'llama' architecture only "
                        f"(Llama, TinyLlama, AMD-Llama, Mistral-style llama files)")
    return reader


def value(reader: gguf.GGUFReader, key: str, default=None):
    """The value of a GGUF key (a str, a number, a bool or a list), or `default` where the file lacks it."""
    found = reader.fields.get(key)
    if found is None:
        return default
    contents = found.contents()
    return contents.item() if hasattr(contents, "item") else contents


def config_from_gguf(reader: gguf.GGUFReader, path: Path) -> Config:
    """Our Config for a llama GGUF, named after the entry of model.configs with the same values, if any."""
    def required(key: str):
        found = value(reader, f"{ARCHITECTURE}.{key}")
        if found is None:
            raise UserError(f"{path}: the key {ARCHITECTURE}.{key} is missing")
        if isinstance(found, list):
            raise UserError(f"{path}: {ARCHITECTURE}.{key} differs between layers ({found[:4]}...); model.py's "
                            f"layers are all alike")
        return found

    n_embd, n_head = required("embedding_length"), required("attention.head_count")
    n_vocab = len(value(reader, "tokenizer.ggml.tokens", []))
    head_size = value(reader, f"{ARCHITECTURE}.attention.key_length", n_embd // n_head)
    if value(reader, f"{ARCHITECTURE}.attention.value_length", head_size) != head_size:
        raise UserError(f"{path}: keys and values of different lengths; model.py's heads have one head_size")
    rotated = value(reader, f"{ARCHITECTURE}.rope.dimension_count", head_size)
    if rotated != head_size:
        raise UserError(f"{path}: RoPE on {rotated} of {head_size} channels; model.py rotates every channel")
    base = float(value(reader, f"{ARCHITECTURE}.rope.freq_base", 10000.0))
    scaling = value(reader, f"{ARCHITECTURE}.rope.scaling.type", "none")
    factor = float(value(reader, f"{ARCHITECTURE}.rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0
    if scaling not in ("none", "linear") or not factor.is_integer() or factor < 1:
        raise UserError(f"{path}: RoPE scaling {scaling!r} by {factor}; model.py does linear scaling by a whole "
                        f"factor (rope_condense_ratio) only")
    config = Config(
        block_size=required("context_length"), vocab_size=n_vocab, n_layer=required("block_count"), n_head=n_head,
        n_embd=n_embd, n_query_groups=required("attention.head_count_kv"), head_size=head_size,
        rope_base=int(base) if base.is_integer() else base, rope_condense_ratio=int(factor),
        intermediate_size=required("feed_forward_length"),
        # no output tensor: llama.cpp's head is token_embd
        tie_embeddings=all(tensor.name != GGUF_NAMES["lm_head.weight"] for tensor in reader.tensors),
        # the file holds a float32: its shortest decimal is the value it was written from (1e-05, not 9.99e-06)
        norm_eps=float(str(np.float32(required("attention.layer_norm_rms_epsilon")))),
    )
    config.name = next((name for name in configs if same_values(config, Config.from_name(name))), "")
    return config


def state_dict_from_gguf(reader: gguf.GGUFReader, config: Config, dtype: torch.dtype,
                         path: Path) -> Dict[str, torch.Tensor]:
    """model.GPT's state dict of a llama GGUF, every tensor dequantized (gguf.quants: F32, F16, BF16, Q4_0 to Q8_0
    and the k-quants) to `dtype`, the vocabulary rows padded with zeros to padded_vocab_size; with
    `config.tie_embeddings`, one tensor under both the embedding's and the head's key."""
    names = {}
    for key, name in GGUF_NAMES.items():
        names.update({name.format(i): key.format(i) for i in (range(config.n_layer) if "{}" in key else [None])})
    parts: Dict[int, Dict[int, torch.Tensor]] = {}
    state_dict: Dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        layer = re.match(r"blk\.(\d+)\.", tensor.name)
        qkv = re.sub(r"^blk\.\d+\.", "blk.{}.", tensor.name)
        if tensor.name not in names and qkv not in QKV_NAMES:
            raise UserError(f"{path}: tensor {tensor.name!r} is not one of a Llama model.py can hold (llama.cpp's "
                            f"token_embd, blk.N.attn_q/k/v/output, ffn_gate/up/down, attn_norm, ffn_norm, "
                            f"output_norm, output)")
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise UserError(f"{path}: tensor {tensor.name!r} is of type {tensor.tensor_type.name}, which gguf "
                            f"{gguf_version()} cannot dequantize") from None
        # a copy: the reader's arrays are views of the read-only memory map
        weight = torch.from_numpy(np.array(array, dtype=np.float32).reshape(tuple(reversed(tensor.shape.tolist()))))
        if qkv in QKV_NAMES:
            part = QKV_NAMES.index(qkv)
            heads = (config.n_head, config.n_query_groups, None)[part]
            parts.setdefault(int(layer[1]), {})[part] = weight if heads is None else unpermute(weight, heads)
        else:
            state_dict[names[tensor.name]] = weight.to(dtype)
    for i, qkv_parts in parts.items():
        if len(qkv_parts) != 3:
            missing = [QKV_NAMES[p].format(i) for p in range(3) if p not in qkv_parts]
            raise UserError(f"{path}: layer {i} lacks {missing}")
        state_dict[QKV_KEY.format(i)] = merge_qkv(*(qkv_parts[p] for p in range(3))).to(dtype)
    for key in ("transformer.wte.weight", "lm_head.weight"):
        if key in state_dict:
            rows = state_dict[key]
            if rows.shape[0] != config.vocab_size:
                raise UserError(f"{path}: {GGUF_NAMES[key]} has {rows.shape[0]} rows for {config.vocab_size} tokens")
            state_dict[key] = torch.cat((rows, rows.new_zeros(config.padded_vocab_size - rows.shape[0], rows.shape[1])))
    if config.tie_embeddings and "transformer.wte.weight" in state_dict:
        state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"]
    return state_dict


def gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


def vocabulary_from_gguf(reader: gguf.GGUFReader, path: Path) -> Vocabulary:
    model = value(reader, "tokenizer.ggml.model")
    if model not in ("llama", "gpt2"):
        raise UserError(f"{path}: tokenizer.ggml.model {model!r}; this converter rebuilds 'llama' (sentencepiece) "
                        f"and 'gpt2' (byte-level BPE) vocabularies")
    tokens = value(reader, "tokenizer.ggml.tokens")
    types = value(reader, "tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    special_ids = {name: value(reader, f"tokenizer.ggml.{key}_token_id") for name, key in (
        ("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"), ("eot", "eot"))}
    vocabulary = Vocabulary(
        model=model, tokens=tokens, types=[int(t) for t in types], pre=value(reader, "tokenizer.ggml.pre", "default"),
        special_ids={name: i for name, i in special_ids.items() if i is not None},
        add_bos=value(reader, "tokenizer.ggml.add_bos_token", model == "llama"),  # llama.cpp's defaults
        add_eos=value(reader, "tokenizer.ggml.add_eos_token", False),
        add_space_prefix=value(reader, "tokenizer.ggml.add_space_prefix", True))
    if model == "llama":
        vocabulary.scores = [float(s) for s in value(reader, "tokenizer.ggml.scores", [0.0] * len(tokens))]
        if UNKNOWN not in vocabulary.types:
            raise UserError(f"{path}: a sentencepiece vocabulary without an UNKNOWN token, which sentencepiece needs")
    else:
        vocabulary.merges = value(reader, "tokenizer.ggml.merges")
        if vocabulary.pre not in PRE_TOKENIZERS or vocabulary.merges is None:
            raise UserError(f"{path}: a byte-level vocabulary with tokenizer.ggml.pre {vocabulary.pre!r}; this "
                            f"converter rebuilds the split rules {', '.join(PRE_TOKENIZERS)} (with merges)")
    return vocabulary


def tokenizer_files(vocabulary: Vocabulary, block_size: int) -> Dict[str, bytes]:
    """{file name: content} of the tokenizer that encodes as llama.cpp does with `vocabulary`: a sentencepiece
    `tokenizer.model` (BPE by the pieces' scores, llama.cpp's `llama` algorithm) or a `tokenizer.json`, and a
    tokenizer_config.json with the special tokens and the add-BOS flag."""
    tokens = vocabulary.tokens
    config = {"add_bos_token": vocabulary.add_bos, "add_eos_token": vocabulary.add_eos,
              "clean_up_tokenization_spaces": False, "model_max_length": block_size}
    for name in ("bos", "eos", "unk", "pad"):
        if name in vocabulary.special_ids:
            config[f"{name}_token"] = tokens[vocabulary.special_ids[name]]
    if vocabulary.model == "llama":
        # llama.cpp puts the "▁" prefix before the text after each special token too: sentencepiece's legacy rule
        config.update(tokenizer_class="LlamaTokenizer", legacy=True)
        files = {"tokenizer.model": sentencepiece_model(vocabulary)}
    else:
        config.update(tokenizer_class="PreTrainedTokenizerFast")
        files = {"tokenizer.json": json.dumps(byte_level_tokenizer_json(vocabulary), ensure_ascii=False).encode()}
    files["tokenizer_config.json"] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
    return files


def sentencepiece_model(vocabulary: Vocabulary) -> bytes:
    """A sentencepiece BPE model of the vocabulary's pieces, scores and types, without normalization (llama.cpp
    normalizes nothing), with byte fallback where it has byte tokens."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    for token, score, kind in zip(vocabulary.tokens, vocabulary.scores, vocabulary.types):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token, score, kind
    spec = proto.trainer_spec
    spec.model_type = spec.BPE
    spec.vocab_size = len(vocabulary.tokens)
    spec.byte_fallback = BYTE in vocabulary.types
    for name in ("bos", "eos", "unk", "pad"):
        token_id = vocabulary.special_ids.get(name, -1)
        setattr(spec, f"{name}_id", token_id)
        if token_id >= 0:
            setattr(spec, f"{name}_piece", vocabulary.tokens[token_id])
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = vocabulary.add_space_prefix
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return proto.SerializeToString()


def byte_level_tokenizer_json(vocabulary: Vocabulary) -> dict:
    """A tokenizer.json for a `gpt2` vocabulary: byte-level BPE with its merges and split rule, CONTROL tokens as
    special added tokens and USER_DEFINED ones as plain added tokens (matched whole in text, as llama.cpp does)."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if vocabulary.pre == "llama-bpe":
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
            {**byte_level, "use_regex": False}]}
    else:
        pre_tokenizer = byte_level
    added = [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": kind == CONTROL}
             for i, (token, kind) in enumerate(zip(vocabulary.tokens, vocabulary.types)) if kind in (CONTROL,
                                                                                                      USER_DEFINED)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": pre_tokenizer, "post_processor": None, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  # llama.cpp looks a whole Llama-3 word up before merging (its ignore_merges)
                  "ignore_merges": vocabulary.pre == "llama-bpe",
                  "vocab": {token: i for i, token in enumerate(vocabulary.tokens)},
                  "merges": list(vocabulary.merges)},
    }
