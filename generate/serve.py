"""An OpenAI-compatible HTTP server for a checkpoint: the command line of openai_api.py's app, with serving.py's
continuous batching.

    python generate/serve.py --checkpoint_dir checkpoints/TinyLlama-1.1B-Chat-v1.0

Serves `POST /v1/chat/completions` (messages in the checkpoint's chat template), `POST /v1/completions`,
`GET /v1/models`, `GET /health` and a chat page at `GET /` (generate/serve.html) on 127.0.0.1:8000 unless told
otherwise; every client of the OpenAI API works with it. Up to --max_batch_size requests are decoded together, and up
to --max_queue more wait for a free row (one more gets 429). FastAPI and uvicorn: request handling and server-sent
events on asyncio, with the model in one engine thread that the handlers talk to through queues.
"""

import sys
from pathlib import Path
from typing import Literal, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat_template import ChatTemplate, resolve_chat_template
from generation import load_for_generation
from openai_api import build_app, serve
from quantize import QuantizeMode
from serving import Engine
from utils import UserError, cli


def main(
    checkpoint_dir: Path,
    chat_template: Optional[str] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 8,
    max_seq_length: Optional[int] = None,
    max_queue: int = 64,
    api_key: Optional[str] = None,
    model_name: Optional[str] = None,
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None,
    quantize: Optional[QuantizeMode] = None,
    group_size: int = 64,
) -> None:
    """Serve a checkpoint over the OpenAI API until Ctrl-C or SIGTERM.

    Args:
        checkpoint_dir: directory with lit_model.pth, model_config.json and the tokenizer
        chat_template: a built-in template (llama-2, zephyr, chatml, guanaco) or a .jinja file; none: the
            checkpoint's own (without one, /v1/chat/completions answers 400 and /v1/completions works)
        host: the address to listen on; 0.0.0.0 exposes the server to the network
        port: the TCP port
        max_batch_size: requests decoded together (the KV cache's rows); 1 serves them one after another
        max_seq_length: the KV cache's length, the longest prompt plus answer a request may have; default the model's
            block size. Shorter: less memory, and faster decoding (every step attends the whole cache)
        max_queue: requests that may wait for a row; one more gets 429
        api_key: require `Authorization: Bearer API_KEY` on /v1 (401 without it)
        model_name: the name clients give as `model`; default the checkpoint directory's name
        precision: 32-true, bf16-true or 16-true; default bf16-true on CUDA, 32-true on CPU
        quantize: int8 or int4 weight-only quantization of the linear layers at load (quantize.py); none: as stored
        group_size: int4's group of input channels: 32, 64 or 128
    """
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port: give 0-65535")
    if max_batch_size < 1:
        raise UserError(f"--max_batch_size must be at least 1, got {max_batch_size}")
    if max_seq_length is not None and max_seq_length < 2:
        raise UserError(f"--max_seq_length must be at least 2 (a prompt token and an answer), got {max_seq_length}")
    if max_queue < 0:
        raise UserError(f"--max_queue must be >= 0, got {max_queue}")
    checkpoint_dir = Path(checkpoint_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_for_generation(checkpoint_dir, device, precision, quantize, group_size)
    template = resolve_chat_template(checkpoint_dir, chat_template) if chat_template is not None \
        else ChatTemplate.from_checkpoint(checkpoint_dir)
    if max_seq_length is not None and max_seq_length > model.config.block_size:
        raise UserError(f"--max_seq_length {max_seq_length} exceeds the model's block_size {model.config.block_size}")
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_seq_length=max_seq_length,
                    max_queue=max_queue)
    app = build_app(engine, template, model_name or checkpoint_dir.name, api_key)
    print(f"Serving {checkpoint_dir} as {model_name or checkpoint_dir.name!r} on http://{host}:{port}", file=sys.stderr)
    serve(app, host, port)  # until Ctrl-C or SIGTERM, which cancel the requests running and waiting
    print("Stopped", file=sys.stderr)


if __name__ == "__main__":
    cli(main)
