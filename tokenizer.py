"""Tokenizer for a checkpoint directory: sentencepiece `tokenizer.model` (Llama-2 style) or HF `tokenizer.json`.
Imports neither torch nor the model, so the data preparers' worker processes start fast: ids go in and out as lists.
"""

import json
from pathlib import Path
from typing import Iterable, List, Optional, Union

# What a checkpoint directory holds of its tokenizer: copied next to exported weights by pretraining and conversion
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class Tokenizer:
    def __init__(self, checkpoint_dir: Union[str, Path]) -> None:
        checkpoint_dir = Path(checkpoint_dir)
        if checkpoint_dir.is_file():  # a path to the tokenizer file itself
            checkpoint_dir, files = checkpoint_dir.parent, [checkpoint_dir]
        else:
            files = [checkpoint_dir / "tokenizer.model", checkpoint_dir / "tokenizer.json"]
        path = next((f for f in files if f.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"No tokenizer.model or tokenizer.json in {str(checkpoint_dir)!r}")
        self.path = path
        if path.suffix == ".model":
            import sentencepiece as spm

            self.backend = "sentencepiece"
            self.processor = spm.SentencePieceProcessor(model_file=str(path))
            # sentencepiece says -1 for a disabled special token
            self.bos_id = self.processor.bos_id() if self.processor.bos_id() >= 0 else None
            self.eos_id = self.processor.eos_id() if self.processor.eos_id() >= 0 else None
            self.vocab_size = self.processor.vocab_size()
        else:
            from tokenizers import Tokenizer as HFTokenizer

            self.backend = "huggingface"
            self.processor = HFTokenizer.from_file(str(path))
            self.processor.encode_special_tokens = True  # "</s>" in a text is text, as with sentencepiece
            self.vocab_size = self.processor.get_vocab_size(with_added_tokens=True)
            self.bos_id, self.eos_id = self._special_ids_from_config(checkpoint_dir)

    def _special_ids_from_config(self, checkpoint_dir: Path):
        config_path = checkpoint_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}

        def token_id(key: str, default: str) -> Optional[int]:
            token = config.get(key, default)
            if isinstance(token, dict):  # {"content": "<s>", ...}
                token = token["content"]
            return None if token is None else self.processor.token_to_id(token)

        return token_id("bos_token", "<s>"), token_id("eos_token", "</s>")

    def check_fits(self, vocab_size: int, source: str) -> None:
        """Every token id must be one of the model's `vocab_size` tokens; `source` names where vocab_size came from."""
        if self.vocab_size > vocab_size:
            raise ValueError(f"{self.path} has {self.vocab_size} tokens, more than the vocab_size={vocab_size} "
                             f"of {source}")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        """The ids of `text`, with the BOS id before and the EOS id after when asked for (an error if undefined)."""
        if self.backend == "sentencepiece":
            ids = self.processor.encode(text)
        else:
            ids = self.processor.encode(text, add_special_tokens=False).ids
        if bos:
            if self.bos_id is None:
                raise ValueError(f"{self.path} defines no BOS token")
            ids = [self.bos_id] + ids
        if eos:
            if self.eos_id is None:
                raise ValueError(f"{self.path} defines no EOS token")
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`: a list, or an array or tensor (anything with `.tolist()`, so torch is not imported)."""
        return self.processor.decode(ids.tolist() if hasattr(ids, "tolist") else list(ids))
