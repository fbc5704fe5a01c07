"""Chat with a checkpoint in the terminal: multi-turn, streamed, in the checkpoint's chat template.

    python generate/chat.py --checkpoint_dir checkpoints/TinyLlama-1.1B-Chat-v1.0
    python generate/chat.py --checkpoint_dir out/demo-sft/final --chat_template guanaco --prompt "What does len do?"
    printf 'Hi\nWhat did I just say?\n' | python generate/chat.py --checkpoint_dir out/tinyllama-chat/final

Interactive when stdin is a terminal (`/reset` forgets the conversation, `/exit` or Ctrl-D quits); with `--prompt`,
one turn; otherwise each line of stdin is a user turn (the conversation kept), and each answer is printed to
stdout followed by a newline. An answer ends at EOS or at the template's end-of-turn token (`</s>`,
`<|im_end|>`), which is not printed; when the conversation no longer fits the model's block size, its oldest turns
are dropped.

What a user types is text: a "</s>" or "<|im_start|>" in a message stays characters and cannot end or forge a
turn (see ChatTemplate.encode).
"""

import sys
import time
from pathlib import Path
from typing import Dict, List, Literal, Optional, TextIO

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat_template import ChatTemplate, resolve_chat_template
from generation import check_generation_args, generate, load_for_generation
from quantize import QuantizeMode
from model import GPT
from tokenizer import StreamDecoder, Tokenizer
from utils import UserError, cli

COMMANDS = "/reset forgets the conversation, /exit quits"


def main(
    checkpoint_dir: Path,
    chat_template: Optional[str] = None,
    system: Optional[str] = None,
    prompt: Optional[str] = None,
    max_new_tokens: int = 500,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    top_p: float = 1.0,
    seed: int = 1234,
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None,
    quantize: Optional[QuantizeMode] = None,
    group_size: int = 64,
) -> None:
    """Chat with a model: interactive in a terminal; one turn with --prompt; else a user turn per line of stdin.

    Args:
        checkpoint_dir: directory with lit_model.pth, model_config.json and the tokenizer
        chat_template: a built-in template (llama-2, zephyr, chatml, guanaco) or a .jinja file; none: the
            checkpoint's own (chat_template.jinja or tokenizer_config.json's chat_template)
        system: a system message that starts the conversation
        prompt: answer this one message and exit
        max_new_tokens: the longest answer, in tokens
        temperature: sampling temperature; 0 is greedy decoding
        top_k: sample among the k most likely tokens only; none disables it
        top_p: nucleus sampling: the smallest set of tokens whose probability reaches top_p
        seed: random seed for sampling
        precision: 32-true, bf16-true or 16-true; default bf16-true on CUDA, 32-true on CPU
        quantize: int8 or int4 weight-only quantization of the linear layers at load (quantize.py); none: as stored
        group_size: int4's group of input channels: 32, 64 or 128
    """
    check_generation_args(max_new_tokens, temperature, top_k, top_p)
    checkpoint_dir = Path(checkpoint_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # loaded first: a checkpoint directory that does not exist is named as such, not as one without a template
    model, tokenizer = load_for_generation(checkpoint_dir, device, precision, quantize, group_size)
    template = resolve_chat_template(checkpoint_dir, chat_template)
    torch.manual_seed(seed)
    chat = Chat(model, tokenizer, template, system, dict(max_new_tokens=max_new_tokens, temperature=temperature,
                                                         top_k=top_k, top_p=top_p))
    ends = template.end_of_turn_tokens(tokenizer)
    if tokenizer.eos_token is not None and tokenizer.eos_token not in ends:
        ends.append(tokenizer.eos_token)
    print(f"Chat template {template.name}; an answer ends at {' or '.join(ends)}", file=sys.stderr)
    if prompt is not None:
        chat.answer(prompt, sys.stdout)
    elif sys.stdin.isatty():
        interact(chat)
    else:
        for line in sys.stdin:
            if not run_line(chat, line.rstrip("\n")):
                break


class Chat:
    """A conversation with a model: the messages so far, and the answer to the next user message, streamed.
    `sampling` holds the keyword arguments of generation.generate: max_new_tokens, temperature, top_k, top_p."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, template: ChatTemplate, system: Optional[str],
                 sampling: dict) -> None:
        self.model, self.tokenizer, self.template, self.sampling = model, tokenizer, template, sampling
        self.system: List[Dict[str, str]] = [] if system is None else [{"role": "system", "content": system}]
        self.turns: List[Dict[str, str]] = []  # user and assistant messages, alternating
        self.stop_ids = template.stop_ids(tokenizer)
        self.device = model.transformer.wte.weight.device

    def reset(self) -> None:
        self.turns = []

    def answer(self, message: str, out: TextIO) -> str:
        """Generate the answer to `message`, writing it to `out` as it comes (and a newline after it), and add both
        to the conversation."""
        ids = self.prompt_ids({"role": "user", "content": message})
        decoder = StreamDecoder(self.tokenizer)

        def on_token(token: int) -> None:
            if token not in self.stop_ids:
                out.write(decoder.push(token))
                out.flush()

        output = generate(self.model, torch.tensor(ids, device=self.device), stop_ids=self.stop_ids,
                          on_token=on_token, **self.sampling)
        new_ids = output[len(ids):].tolist()
        if new_ids and new_ids[-1] in self.stop_ids:
            new_ids = new_ids[:-1]
        out.write(decoder.flush() + "\n")
        out.flush()
        text = self.tokenizer.decode(new_ids)
        self.turns += [{"role": "user", "content": message}, {"role": "assistant", "content": text}]
        return text

    def prompt_ids(self, message: Dict[str, str]) -> List[int]:
        """The ids of the conversation with `message` and the generation prompt, after dropping the oldest turns
        until an answer of max_new_tokens fits the block size (or only this message is left)."""
        block_size = self.model.config.block_size
        while True:
            ids = self.template.encode(self.tokenizer, self.system + self.turns + [message])
            if len(ids) + self.sampling["max_new_tokens"] <= block_size or not self.turns:
                break
            self.turns = self.turns[2:]  # the oldest user message and its answer
        if len(ids) >= block_size:
            raise UserError(f"The message makes a {len(ids)}-token prompt (with the system message and the template), "
                            f"which leaves no room for an answer in block_size={block_size}: write a shorter one")
        return ids


def interact(chat: Chat) -> None:
    print(f"Chatting; {COMMANDS}.", file=sys.stderr)
    while True:
        try:
            line = input(">> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        try:
            if not run_line(chat, line):
                return
        except KeyboardInterrupt:  # Ctrl-C stops an answer, not the chat
            print("\n[interrupted: that turn is forgotten]", file=sys.stderr)


def run_line(chat: Chat, line: str) -> bool:
    """Answer one line (or run its command); False once the user asked to exit. A message too long to answer is
    reported and skipped, so the conversation goes on."""
    command = line.strip()
    if command == "/exit":
        return False
    if command == "/reset":
        chat.reset()
        print("[conversation reset]", file=sys.stderr)
    elif command:
        t0 = time.perf_counter()
        try:
            chat.answer(line, sys.stdout)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
        else:
            print(f"[{time.perf_counter() - t0:.2f} s]", file=sys.stderr)
    return True


if __name__ == "__main__":
    cli(main)
