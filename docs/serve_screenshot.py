"""Write the screenshot of the chat page that docs/serving.md shows: serve a checkpoint on a free port of 127.0.0.1
(openai_api.py's app, as generate/serve.py serves it), open the page in Debian's headless Chromium, send a message,
wait for the streamed answer to finish, and save the window as a PNG.

    python docs/serve_screenshot.py --checkpoint_dir out/sft_demo/final --output docs/serve.png

Needs `chromium` and `chromium-driver` (apt-get install chromium chromium-driver); the checkpoint needs a chat template.
"""

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat_template import ChatTemplate  # noqa: E402
from generation import load_for_generation  # noqa: E402
from headless_chromium import chromium, installed, wait_for  # noqa: E402
from openai_api import background_server, build_app  # noqa: E402
from serving import Engine  # noqa: E402
from utils import UserError, cli  # noqa: E402


def main(
    checkpoint_dir: Path,
    output: Path = Path("docs/serve.png"),
    message: str = "How do I read a file line by line?",
    max_new_tokens: int = 48,
    width: int = 900,
    height: int = 560,
) -> str:
    """Screenshot the page after one greedy answer; print and return the answer's text.

    Args:
        checkpoint_dir: a checkpoint directory with a chat template (finetune/demo.py writes out/sft_demo/final)
        output: the PNG to write
        message: what the user types
        max_new_tokens: the page's "max tokens" for the answer
        width: the page's width in pixels (the PNG's)
        height: the page's height in pixels (the PNG's)
    """
    if max_new_tokens < 1 or min(width, height) < 200:
        raise UserError(f"--max_new_tokens {max_new_tokens} must be at least 1 and --width {width} and --height "
                        f"{height} at least 200")
    if not installed():
        raise UserError("Chromium is not installed: apt-get install chromium chromium-driver")
    checkpoint_dir = Path(checkpoint_dir)
    model, tokenizer = load_for_generation(checkpoint_dir, torch.device("cpu"))
    template = ChatTemplate.from_checkpoint(checkpoint_dir)
    if template is None:
        raise UserError(f"{checkpoint_dir} has no chat template: the page's chat needs one (finetune/sft.py saves it)")
    engine = Engine(model, tokenizer, max_batch_size=1)
    app = build_app(engine, template, checkpoint_dir.name)
    with background_server(app) as url, tempfile.TemporaryDirectory() as profile, \
            chromium(Path(profile)) as browser:
        browser.open(url + "/")
        browser.set_viewport(width, height)
        wait_for(lambda: browser.script("return document.getElementById('model').textContent") == checkpoint_dir.name,
                 what="the page to load the model's name")
        browser.type("#temperature", "0")  # greedy: the same picture on every run
        browser.type("#max_tokens", str(max_new_tokens))
        browser.type("#message", message)
        browser.click("#send")
        wait_for(lambda: browser.script("return document.getElementById('status').textContent") == "done",
                 timeout=120, what="the answer to finish")
        answer = browser.script("return document.querySelector('.assistant:last-child').textContent")
        png = browser.screenshot()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(png)
    print(answer)
    print(f"Wrote {output} ({len(png) / 1024:.0f} KiB)", file=sys.stderr)
    return answer


if __name__ == "__main__":
    cli(main)
