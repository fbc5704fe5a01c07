"""The SFT demo's instruction data, made from the Python standard library (no download), then prepared for
finetuning with the guanaco template and the demo's tokenizer:

    python prepare_data/prepare_sft_demo.py --destination_path data/sft_demo --tokenizer_dir data/demo

Each public function, class and module with a docstring gives short conversations, found with `ast`:
    "Write the body of MODULE.NAME: <its signature and docstring>" -> its body
    "What does MODULE.NAME do?" -> the first paragraph of its docstring (and likewise for classes and modules)
Examples whose request and answer together are longer than MAX_CHARACTERS are left out, so that almost all fit the
demo model's 256 tokens; of the rest, `max_examples` are chosen by a hash of their name (spread over the library,
the same on every machine with the same Python). They are written as JSON lines (chat format) beside the prepared
data, `{destination_path}.jsonl`, which prepare_data/prepare_sft.py then prepares into destination_path.
"""

import ast
import hashlib
import json
import sys
import textwrap
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sft_data
from prepare_data import prepare_sft
from text_readers import STDLIB, hashed_split, stdlib_files
from tokenizer import has_tokenizer
from utils import UserError, atomic_write, cli, write_json

MAX_CHARACTERS = 640  # of request and answer together: at most about 230 tokens of the demo tokenizer
MAX_EXAMPLES = 3000
MAX_SEQ_LENGTH = 257  # the demo model's block size + 1: the model sees all tokens but the last
VALIDATION_FRACTION = 0.05
TEMPLATE = "guanaco"  # plain text: the demo tokenizer has no chat tokens
Example = Tuple[str, str, str]  # (name, request, answer)


def build_sft_demo_data(
    destination_path: Path = Path("data/sft_demo"),
    tokenizer_dir: Path = Path("data/demo"),
    max_examples: int = MAX_EXAMPLES,
    max_files: Optional[int] = None,
    max_seq_length: int = MAX_SEQ_LENGTH,
    val_fraction: float = VALIDATION_FRACTION,
    quiet: bool = False,
) -> Path:
    """Write the demo's examples to {destination_path}.jsonl and prepare them into destination_path, with the requests
    of its val split in held_out_requests.json; return it.

    Args:
        destination_path: the prepared SFT data directory (replaced); the examples go beside it, as JSON lines
        tokenizer_dir: the demo tokenizer's directory (prepare_data/prepare_demo.py's data/demo, or a demo checkpoint)
        max_examples: the most examples kept
        max_files: read only the first max_files standard library files (for tests); none: all
        max_seq_length: the most tokens of an example (longer ones are dropped)
        val_fraction: the share of examples in the val split
        quiet: print no summary
    """
    destination_path = Path(destination_path)
    # what prepare_sft.py checks, here before the standard library is read
    prepare_sft.check_flags("chat", max_seq_length, val_fraction)
    for name, value in (("max_examples", max_examples), ("max_files", max_files)):
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    prepare_sft.check_destination(destination_path)
    if not has_tokenizer(tokenizer_dir):
        raise FileNotFoundError(f"--tokenizer_dir {tokenizer_dir}: no tokenizer.model or tokenizer.json there")
    examples = sorted(
        (example for path in stdlib_files(max_files) for example in file_examples(path) if fits(example)),
        key=lambda example: hashlib.blake2b(f"{example[0]}\n{example[1]}".encode(), digest_size=8).digest(),
    )[:max_examples]
    examples_path = destination_path.with_name(f"{destination_path.name}.jsonl")
    with atomic_write(examples_path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for name, request, answer in examples:
                messages = [{"role": "user", "content": request}, {"role": "assistant", "content": answer}]
                f.write(json.dumps({"source": name, "messages": messages}, ensure_ascii=False) + "\n")
    prepare_sft.main(str(examples_path), tokenizer_dir, destination_path, chat_template=TEMPLATE, format="chat",
                     max_seq_length=max_seq_length, val_fraction=val_fraction, quiet=quiet)
    write_json(destination_path / sft_data.HELD_OUT_FILE, held_out_requests(destination_path))  # written last
    return destination_path


def held_out_requests(destination_path: Path = Path("data/sft_demo")) -> List[str]:
    """The requests of the demo's val split (with those dropped as too long), in file order: questions to ask the
    finetuned model that it was not trained on."""
    destination_path = Path(destination_path)
    val_fraction = sft_data.read_metadata(destination_path)["val_fraction"]
    records = destination_path.with_name(f"{destination_path.name}.jsonl").read_text(encoding="utf-8").splitlines()
    conversations = [json.loads(record)["messages"] for record in records]
    return [messages[0]["content"] for messages in conversations
            if hashed_split(prepare_sft.split_key(messages), val_fraction) == "validation"]


def file_examples(path: Path) -> Iterator[Example]:
    """The examples of one standard library file (none if it does not parse or is a private module)."""
    source = path.read_text(encoding="utf-8", errors="replace")
    module = ".".join(path.relative_to(STDLIB).with_suffix("").parts).removesuffix(".__init__")
    if any(part.startswith("_") for part in module.split(".")):
        return
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines()
    docstring = ast.get_docstring(tree)
    if docstring:
        yield module, f"What is the Python module {module} for?", first_paragraph(docstring)
    for qualname, node in public_definitions(tree.body):
        docstring = ast.get_docstring(node)
        if not docstring:
            continue
        name = f"{module}.{qualname}"
        if isinstance(node, ast.ClassDef):
            yield name, f"What is the class {name} for?", first_paragraph(docstring)
            continue
        yield name, f"What does {name} do?", first_paragraph(docstring)
        if len(node.body) > 1:  # code after the docstring
            head = textwrap.dedent("\n".join(lines[node.lineno - 1: node.body[0].end_lineno]))
            body = textwrap.dedent("\n".join(lines[node.body[1].lineno - 1: node.end_lineno]))
            yield name, f"Write the body of {name}:\n\n{head}", body


def public_definitions(body: List[ast.stmt], prefix: str = "") -> Iterator[Tuple[str, ast.AST]]:
    """(qualified name, node) of the public functions and classes of a module's `body` and of their classes'
    methods (not of functions nested in functions)."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            yield prefix + node.name, node
            if isinstance(node, ast.ClassDef):
                yield from public_definitions(node.body, f"{prefix}{node.name}.")


def first_paragraph(docstring: str) -> str:
    return " ".join(docstring.strip().split("\n\n")[0].split())


def fits(example: Example) -> bool:
    _, request, answer = example
    return bool(answer.strip()) and len(request) + len(answer) <= MAX_CHARACTERS


if __name__ == "__main__":
    cli(build_sft_demo_data)
