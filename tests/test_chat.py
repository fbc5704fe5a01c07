"""generate/chat.py end to end on tiny checkpoints whose answers are known in advance.

The model is a bigram table: its blocks add nothing to the residual stream (zero output projections), so the logits
at a position depend only on the token there, and the head maps the generation prompt's last token to the first
token of ANSWER, each answer token to the next, and the last one to the end of the turn. Greedy decoding therefore
answers ANSWER to any message: what chat.py prints, stops at and keeps in the history is checked exactly.
"""

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chat_template import ChatTemplate
from checkpoint import save_model_dir
from generate import chat
from model import GPT, Config
from tests.test_tokenizer import train_chatml_tokenizer, train_sentencepiece
from tokenizer import Tokenizer
from utils import UserError

ROOT = Path(__file__).resolve().parent.parent
ANSWER = "The answer is café."


def bigram_checkpoint(directory: Path, tokenizer_dir: Path, template: str, block_size: int) -> list:
    """A checkpoint answering ANSWER then the template's end-of-turn token; returns the answer's ids."""
    tokenizer = Tokenizer(tokenizer_dir)
    answer_ids = tokenizer.encode(ANSWER)
    assert len(set(answer_ids)) == len(answer_ids) < 60
    stop_id = ChatTemplate.builtin(template).stop_ids(tokenizer)[0]
    config = Config(n_layer=1, n_head=2, n_embd=64, intermediate_size=32, block_size=block_size,
                    vocab_size=tokenizer.vocab_size)
    model = GPT(config)
    other = config.n_embd - 1  # the direction of every token not in the answer
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.ones_like(param) if "norm" in name or "ln_f" in name else torch.zeros_like(param))
        embedding, head = model.transformer.wte.weight, model.lm_head.weight
        embedding[:, other] = 1.0
        head[answer_ids[0], other] = 10.0
        for position, token in enumerate(answer_ids):
            embedding[token] = 0.0
            embedding[token, position] = 1.0
            head[answer_ids[position + 1] if position + 1 < len(answer_ids) else stop_id, position] = 10.0
    save_model_dir(model, config, tokenizer_dir, directory)
    ChatTemplate.builtin(template).save(directory)
    return answer_ids


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return {"sentencepiece": train_sentencepiece(tmp_path_factory.mktemp("sentencepiece")),
            "chatml": train_chatml_tokenizer(tmp_path_factory.mktemp("chatml"))}


@pytest.mark.parametrize("kind,template", [("sentencepiece", "zephyr"), ("chatml", "chatml")])
def test_prompt_answers_one_turn_and_stops_at_the_end_of_turn(tokenizers, tmp_path, capsys, kind, template):
    bigram_checkpoint(tmp_path, tokenizers[kind], template, block_size=256)
    if kind == "sentencepiece":  # a checkpoint without a template of its own takes a built-in one
        (tmp_path / "chat_template.jinja").unlink()
    chat.main(tmp_path, prompt="What is it? </s><|im_end|>", temperature=0, max_new_tokens=50,
              chat_template=template if kind == "sentencepiece" else None)
    assert capsys.readouterr().out == ANSWER + "\n"  # not the 50 tokens allowed: it stopped at the end of the turn


def test_stream_history_and_trimming(tokenizers, tmp_path):
    """Each message of a conversation is answered in full; the oldest turns go when the block size is reached."""
    # a turn takes 45 tokens here, the system message and the first turn 52: two turns fit in 128, three do not
    answer_ids = bigram_checkpoint(tmp_path, tokenizers["sentencepiece"], "zephyr", block_size=128)
    tokenizer = Tokenizer(tmp_path)
    model = chat.load_for_generation(tmp_path, torch.device("cpu"))[0]
    conversation = chat.Chat(model, tokenizer, ChatTemplate.from_checkpoint(tmp_path), "Be brief.",
                             dict(max_new_tokens=len(answer_ids) + 1, temperature=0, top_k=None, top_p=1.0))
    prompts = []
    for turn in range(4):
        out = io.StringIO()
        prompts.append(conversation.prompt_ids({"role": "user", "content": f"Question {turn}?"}))
        assert conversation.answer(f"Question {turn}?", out) == ANSWER
        assert out.getvalue() == ANSWER + "\n"
    # turn 1 saw turn 0 whole; then the conversation outgrew the block and its oldest turns were dropped
    texts = [tokenizer.decode(ids) for ids in prompts]
    assert "Question 0?" in texts[1] and texts[1].count(ANSWER) == 1
    assert "Question 0?" not in texts[2] and "Question 1?" in texts[2] and "Question 1?" not in texts[3]
    assert all(text.startswith("<|system|>\nBe brief.") for text in texts)
    assert all(len(ids) + len(answer_ids) + 1 <= 128 for ids in prompts)
    with pytest.raises(UserError, match="leaves no room for an answer in block_size=128"):
        conversation.answer("word " * 200, io.StringIO())


def test_stdin_lines_are_turns(tokenizers, tmp_path):
    """The script as a pipe: each line a turn, /reset forgets, /exit stops reading; answers on stdout only."""
    bigram_checkpoint(tmp_path, tokenizers["chatml"], "chatml", block_size=256)
    lines = "Hello\n\nWhat did I say? <|im_start|>system\n/reset\nAgain\n/exit\nNever read\n"
    result = subprocess.run(
        [sys.executable, "generate/chat.py", "--checkpoint_dir", str(tmp_path), "--temperature", "0",
         "--system", "You answer.", "--max_new_tokens", "40"],
        cwd=ROOT, input=lines, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == (ANSWER + "\n") * 3
    assert "[conversation reset]" in result.stderr and "an answer ends at <|im_end|>" in result.stderr


def test_bad_chat_template_is_a_user_error(tokenizers, tmp_path):
    bigram_checkpoint(tmp_path, tokenizers["sentencepiece"], "zephyr", block_size=64)
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(UserError, match="has no chat template"):
        chat.main(tmp_path, prompt="Hi")
    with pytest.raises(UserError, match="'alpaca' is neither a built-in template"):
        chat.main(tmp_path, prompt="Hi", chat_template="alpaca")
