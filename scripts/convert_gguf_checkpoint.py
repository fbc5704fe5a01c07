"""Convert a GGUF file of the `llama` architecture (llama.cpp's; Llama, TinyLlama, AMD-Llama-135m and their
finetunes as published) into a checkpoint directory of this repository:

    python scripts/convert_gguf_checkpoint.py --gguf_file out/demo.gguf --out_dir out/demo_from_gguf

Every tensor type gguf-py can dequantize is read (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the k-quants
such as Q4_K_M's Q4_K and Q6_K) and converted to `--dtype`. The vocabulary rows are padded again to a multiple of 64;
the tokenizer is rebuilt as a sentencepiece `tokenizer.model` (a `llama` vocabulary) or a `tokenizer.json` (a `gpt2`
one) that encodes as llama.cpp does, with a tokenizer_config.json of its special tokens; the chat template is kept as
chat_template.jinja. A file without an `output` tensor (a tied head) stays tied: `tie_embeddings`, one tensor for
the embedding and the head. The format is gguf_format.py's; the reverse is scripts/convert_to_gguf.py.
"""

import sys
import tempfile
from pathlib import Path
from typing import Literal

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat_template import TEMPLATE_FILE
from checkpoint import save_model_dir
from gguf_format import config_from_gguf, open_gguf, state_dict_from_gguf, tokenizer_files, value, vocabulary_from_gguf
from model import Config
from utils import UserError, cli

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def convert_gguf_checkpoint(gguf_file: Path, out_dir: Path,
                            dtype: Literal["float32", "bfloat16", "float16"] = "float32") -> Config:
    """Write a checkpoint directory from a llama GGUF file; returns its Config.

    Args:
        gguf_file: the GGUF file
        out_dir: the checkpoint directory to write (lit_model.pth, model_config.json, tokenizer files, chat template)
        dtype: the dtype of the weights, dequantized from the file's types
    """
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {list(DTYPES)}")
    reader = open_gguf(gguf_file)
    vocabulary = vocabulary_from_gguf(reader, gguf_file)
    config = config_from_gguf(reader, gguf_file)
    state_dict = state_dict_from_gguf(reader, config, DTYPES[dtype], gguf_file)
    template = value(reader, "tokenizer.chat_template")
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        for name, content in tokenizer_files(vocabulary, config.block_size).items():
            (Path(tokenizer_dir) / name).write_bytes(content)
        save_model_dir(state_dict, config, Path(tokenizer_dir), out_dir,
                       text_files={TEMPLATE_FILE: template} if template else None)
    types = sorted({tensor.tensor_type.name for tensor in reader.tensors})
    print(f"Wrote {out_dir}: config {config.name or '(custom: no named config matches)'}, {dtype} weights from "
          f"{', '.join(types)}, {config.vocab_size} tokens ({vocabulary.model} vocabulary, "
          f"{'tokenizer.model' if vocabulary.model == 'llama' else 'tokenizer.json'}), chat template "
          f"{'kept' if template else 'none'}")
    if config.tie_embeddings:
        print("The file has no output tensor: the head is the token embedding (tie_embeddings, one tensor)")
    return config


if __name__ == "__main__":
    cli(convert_gguf_checkpoint)
