"""Convert a Hugging Face Llama checkpoint (`LlamaForCausalLM`) into this repository's format.

Reads `config.json` and the weights (`*.safetensors` or `pytorch_model*.bin`, sharded through `*.index.json` or not)
from `checkpoint_dir` and writes `lit_model.pth` and `model_config.json` beside them, as lit-gpt does:

    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/TinyLlama-1.1B

Shards are read one at a time, so memory stays about one model's size. The key map and the config translation are
hf.py's; this script reads the files and writes the checkpoint directory through checkpoint.save_model_dir.

The tokenizer files and the chat template (`chat_template.jinja`, or tokenizer_config.json's `chat_template`) stay
where they are, so generate/chat.py and every checkpoint made from this one (which copy them) use the model's own
template; the conversion says which template it found.
"""

import re
import sys
from pathlib import Path
from typing import Iterator, List, Literal, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat_template import ChatTemplate
from checkpoint import save_model_dir
from hf import config_from_hf, lit_state_dict
from model import Config
from utils import UserError, cli, read_json

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def weight_files(checkpoint_dir: Path) -> List[Path]:
    """The checkpoint's weight files; safetensors preferred when both formats are there."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = checkpoint_dir / index_name
        if index.is_file():
            names = sorted(set(read_json(index, "the index of the weight files")["weight_map"].values()))
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
        model_name: the named config to use; none: the named config whose values match, if any
        dtype: convert the weights to this dtype; none: keep theirs
    """
    checkpoint_dir = Path(checkpoint_dir)
    config_path = checkpoint_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(config_path)!r} does not exist; expected a Hugging Face checkpoint directory")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {list(DTYPES)}")
    hf_config = read_json(config_path, "a Hugging Face model config")
    config = config_from_hf(hf_config, model_name, source=str(config_path))

    hf_tensors = ((key, tensor) for path in weight_files(checkpoint_dir) for key, tensor in load_tensors(path))
    if dtype is not None:
        hf_tensors = ((key, tensor.to(DTYPES[dtype])) for key, tensor in hf_tensors)
    state_dict, skipped = lit_state_dict(hf_tensors, tie_word_embeddings=config.tie_embeddings,
                                         source=str(checkpoint_dir))
    if config.tie_embeddings:
        print("tie_word_embeddings=true: one tensor is the token embedding and the head (tie_embeddings)")
    save_model_dir(state_dict, config, checkpoint_dir, checkpoint_dir)
    skipped_kinds = sorted({re.sub(r"\.\d+\.", ".N.", key) for key in skipped})
    print(
        f"Config {config.name or '(custom: no named config matches)'}; wrote {len(state_dict)} tensors to "
        f"{checkpoint_dir / 'lit_model.pth'}; skipped {len(skipped)} keys" + (f" {skipped_kinds}" if skipped else "")
    )
    report_chat_template(checkpoint_dir)
    return config


def report_chat_template(checkpoint_dir: Path) -> None:
    """Say which chat template the checkpoint carries; one that does not compile is reported, not fatal (chat.py
    can take --chat_template instead)."""
    try:
        template = ChatTemplate.from_checkpoint(checkpoint_dir)
    except UserError as error:
        print(f"WARNING: {error}")
        return
    if template is None:
        print("No chat template: generate/chat.py will need --chat_template")
    else:
        print(f"Chat template kept: {template.name} (sha256 {template.sha256[:12]})")


if __name__ == "__main__":
    cli(convert_hf_checkpoint)
