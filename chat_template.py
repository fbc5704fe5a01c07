"""Chat templates: Hugging Face's Jinja chat templates, rendered exactly as transformers' `apply_chat_template`.

A checkpoint's template is its `chat_template.jinja` (what transformers 5 writes) or the `chat_template` of its
tokenizer_config.json (older repositories, e.g. TinyLlama-Chat); checkpoints without one choose a built-in:

- `llama-2`: Llama-2-chat's `<s>[INST] <<SYS>> ... [/INST] answer </s>`;
- `zephyr`: TinyLlama-1.1B-Chat v1.0's `<|system|>`, `<|user|>`, `<|assistant|>` turns, each ended by `</s>`;
- `chatml`: `<|im_start|>role ... <|im_end|>` (needs a tokenizer with those tokens);
- `guanaco`: the plain text `### Human: ...### Assistant: ...</s>` of OpenAssistant-guanaco, which TinyLlama-Chat v0.1
  was finetuned on: it needs no chat tokens, only EOS.

Rendering uses transformers' sandboxed Jinja settings (trim_blocks, lstrip_blocks, loop controls, its `tojson`,
`raise_exception`, `strftime_now`, `{% generation %}`) and passes the tokenizer's special-token strings (`bos_token`,
`eos_token`, ...) as variables, so the string is the one transformers renders. Jinja2 only: no torch, no transformers.
"""

import hashlib
import json
import re
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from utils import UserError, atomic_write, read_json

TEMPLATE_FILE = "chat_template.jinja"

BUILTIN_TEMPLATES = {
    # meta-llama/Llama-2-7b-chat-hf's template
    "llama-2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}"
        "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0's template (Zephyr's format)
    "zephyr": (
        "{% for message in messages %}\n"
        "{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
        "{% endif %}\n"
        "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
        "{% endfor %}"
    ),
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # TinyLlama-Chat v0.1's prompt "### Human: {prompt}### Assistant:"; an answer ends with EOS, as the finetuning
    # script (qlora's) appended it to every target
    "guanaco": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] }}"
        "{% elif message['role'] == 'user' %}{{ '### Human: ' + message['content'] }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Assistant: ' + message['content'] + eos_token }}"
        "{% else %}{{ raise_exception('Unknown role ' + message['role'] + ': expected system, user or assistant') }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Assistant:' }}{% endif %}"
    ),
}
# appended to a message to find where its content ends in the rendered text (transformers' tag)
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# transformers' markers for the control tokens found in what a user wrote (chat_template_utils._CONTROL_TOKEN_START)
MARK_START, MARK_END = "\U000f0000", "\U000f0001"


class ChatTemplate:
    """A Jinja chat template (`source`), compiled; `name` is a built-in's name or where the source came from, and
    `sha256` identifies the source (recorded with SFT data and checked against a checkpoint's)."""

    def __init__(self, source: str, name: str = "custom") -> None:
        import jinja2

        self.source = source
        self.name = name
        self.sha256 = hashlib.sha256(source.encode("utf-8")).hexdigest()
        try:
            self._template = environment().from_string(source)
        except jinja2.TemplateError as error:
            raise UserError(f"chat template {name!r} does not compile: {error}") from error
        self._tracker = next(extension for extension in self._template.environment.extensions.values()
                             if "generation" in extension.tags)

    def __repr__(self) -> str:
        return f"ChatTemplate(name={self.name!r}, sha256={self.sha256[:12]})"

    @classmethod
    def builtin(cls, name: str) -> "ChatTemplate":
        if name not in BUILTIN_TEMPLATES:
            raise UserError(f"Unknown chat template {name!r}: expected one of {list(BUILTIN_TEMPLATES)} or a .jinja "
                            f"file")
        return cls(BUILTIN_TEMPLATES[name], name)

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "ChatTemplate":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"Chat template file {str(path)!r} does not exist: expected a .jinja file or one of "
                            f"{list(BUILTIN_TEMPLATES)}")
        return cls.named(path.read_text(encoding="utf-8"), str(path))

    @classmethod
    def named(cls, source: str, name: str) -> "ChatTemplate":
        """A template named after the built-in with the same source, if any (a saved built-in keeps its name)."""
        return cls(source, next((builtin for builtin, text in BUILTIN_TEMPLATES.items() if text == source), name))

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: Union[str, Path]) -> Optional["ChatTemplate"]:
        """The template of a checkpoint directory: `chat_template.jinja`, else tokenizer_config.json's
        `chat_template` (a string, or a list of named templates, of which "default"); None if it has neither."""
        checkpoint_dir = Path(checkpoint_dir)
        if (checkpoint_dir / TEMPLATE_FILE).is_file():
            return cls.from_file(checkpoint_dir / TEMPLATE_FILE)
        config_path = checkpoint_dir / "tokenizer_config.json"
        template = (read_json(config_path, "the tokenizer's settings").get("chat_template") if config_path.is_file()
                    else None)
        if isinstance(template, list):
            named = {entry["name"]: entry["template"] for entry in template}
            if "default" not in named:
                raise UserError(f"{config_path}: chat_template lists templates {sorted(named)} but no 'default': "
                                f"pass --chat_template with a .jinja file")
            template = named["default"]
        return None if template is None else cls.named(template, str(config_path))

    @staticmethod
    def special_tokens(tokenizer) -> Dict[str, str]:
        """The template variables a tokenizer provides: `bos_token`, `eos_token`, ... (transformers'
        `special_tokens_map`)."""
        return dict(tokenizer.special_token_strings)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
               special_tokens: Optional[Mapping[str, str]] = None, continue_final_message: bool = False,
               **kwargs) -> str:
        """What transformers' `apply_chat_template(messages, tokenize=False, ...)` returns. `special_tokens` are
        the tokenizer's (`ChatTemplate.special_tokens(tokenizer)`); `kwargs` are further template variables.

        continue_final_message: the text ends inside the last message, open for its continuation (an answer begun
        by the prompt, lm-eval's `gen_prefix`), without what the template writes after it; found, as transformers
        does, by rendering the message with a tag appended."""
        if not continue_final_message:
            return "".join(self._generate(messages, add_generation_prompt, special_tokens, kwargs))
        if add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt exclude each other: the first "
                             "continues the last message, the second opens a new one")
        if not messages or not isinstance(messages[-1].get("content"), str):
            raise ValueError("continue_final_message needs a last message with text content")
        final = messages[-1]["content"]
        tagged = [*messages[:-1], {**messages[-1], "content": final + CONTINUE_TAG}]
        text = "".join(self._generate(tagged, False, special_tokens, kwargs))
        if final.strip() not in text or CONTINUE_TAG.strip() not in text:
            raise UserError(f"chat template {self.name!r} does not write the last message's content as given, so "
                            f"it cannot be continued: {final.strip()!r}")
        end = text.rindex(CONTINUE_TAG.strip())
        # a template that strips the content also stripped the tag's space: then strip what precedes it too
        return text[:end] if text[end: end + len(CONTINUE_TAG)] == CONTINUE_TAG else text[:end].rstrip()

    def _generate(self, messages, add_generation_prompt: bool, special_tokens, kwargs) -> Iterator[str]:
        import jinja2

        if special_tokens is None and {"bos_token", "eos_token"} & self.variables:
            raise ValueError(f"chat template {self.name!r} uses bos_token/eos_token: pass "
                             f"special_tokens=ChatTemplate.special_tokens(tokenizer)")
        # as transformers: keys whose value is None are dropped, and special tokens give way to explicit variables
        messages = [{key: value for key, value in message.items() if value is not None} for message in messages]
        variables = {**(special_tokens or {}), **kwargs}
        try:
            yield from self._template.generate(messages=messages, tools=None, documents=None,
                                               add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as error:  # raise_exception, undefined variables, the sandbox
            raise UserError(f"chat template {self.name!r} refused the conversation: {error}") from error

    @property
    def variables(self) -> frozenset:
        import jinja2.meta

        return frozenset(jinja2.meta.find_undeclared_variables(self._template.environment.parse(self.source)))

    def render_with_spans(self, messages: Sequence[Mapping[str, Any]],
                          special_tokens: Optional[Mapping[str, str]] = None,
                          **kwargs) -> Tuple[str, List[Tuple[int, int]]]:
        """The rendered conversation and the (start, end) character spans of its assistant turns, the training
        targets of SFT: each span is the answer with the end-of-turn text the template writes after it (`</s>`,
        `<|im_end|>`), up to the whitespace that separates it from the next turn.

        From the template's `{% generation %}` blocks when it has them (as transformers' assistant mask); otherwise
        the difference between the conversation rendered up to each assistant turn with the generation prompt and
        with the turn: a template for which those are not prefixes of the whole conversation is refused."""
        if GENERATION_TAG.search(self.source):
            blocks: List[str] = []
            spans: List[Tuple[int, int]] = []
            with self._tracker.track(blocks, spans):
                for block in self._generate(messages, False, special_tokens, kwargs):
                    blocks.append(block)
            return "".join(blocks), spans
        text = self.render(messages, special_tokens=special_tokens, **kwargs)
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True, special_tokens=special_tokens, **kwargs)
            turn = self.render(messages[: i + 1], special_tokens=special_tokens, **kwargs)
            if not (turn.startswith(prompt) and text.startswith(turn)):
                shorter, longer = (prompt, turn) if not turn.startswith(prompt) else (turn, text)
                raise UserError(
                    f"chat template {self.name!r} is not prefix-stable, so the assistant turns cannot be found: the "
                    f"conversation up to message {i} renders as {shorter[-60:]!r}, which is not the start of the "
                    f"longer rendering {longer[len(shorter) - 60: len(shorter) + 20]!r}; add {{% generation %}} "
                    f"markers around the assistant turns, or use another --chat_template")
            end = len(prompt) + len(turn[len(prompt):].rstrip())
            spans.append((len(prompt), end))
        return text, spans

    def end_of_turn_tokens(self, tokenizer) -> List[str]:
        """The special tokens (of `tokenizer`) that the template writes right after an assistant's answer: where
        generation of a turn must stop (`</s>`, `<|im_end|>`, `<|eot_id|>`), in the order written; EOS if none."""
        special_tokens = self.special_tokens(tokenizer)
        probe = "\U000f0002"  # a private-use character no template writes
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": probe}]
        text, spans = self.render_with_spans(messages, special_tokens=special_tokens)
        start, end = spans[-1]
        after_answer = text[text.index(probe, start) + len(probe): end]
        pattern = "|".join(map(re.escape, sorted(tokenizer.special_tokens, key=len, reverse=True)))
        found = re.findall(pattern, after_answer) if pattern else []
        tokens = list(dict.fromkeys(found))
        return tokens or ([] if tokenizer.eos_token is None else [tokenizer.eos_token])

    def stop_ids(self, tokenizer) -> List[int]:
        """The ids that end an assistant turn: the end-of-turn tokens and EOS (the `stop_ids` of generate)."""
        tokens = self.end_of_turn_tokens(tokenizer)
        ids = tokenizer.special_token_ids(tokens)
        return ids + ([tokenizer.eos_id] if tokenizer.eos_id is not None and tokenizer.eos_id not in ids else [])

    def encode(self, tokenizer, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               **kwargs) -> List[int]:
        """The token ids of a conversation for generation: the rendered template with its special tokens as ids,
        where a special token written inside a message's content stays text, so what a user types cannot forge a
        turn; BOS first where `prefix_bos` says.

        Transformers' `apply_chat_template(..., tokenize=True, sanitize_control_tokens=True)` does the same, and
        this is its method: the special tokens found in the contents are wrapped in private-use markers before
        rendering, so that after rendering they can be told apart from the ones the template writes, and those
        are encoded as text. Rendering once keeps whatever the template does to a content (strip, trim, ...), which
        rendering placeholders and substituting the contents afterwards would not. The marked tokens split the text
        into pieces encoded one by one (the tokenization differs from one pass only at those boundaries)."""
        marked = [{key: mark_tokens(value, tokenizer.special_tokens) if key == "content" else value
                   for key, value in message.items()} for message in messages]
        text = self.render(marked, add_generation_prompt, self.special_tokens(tokenizer), **kwargs)
        return prefix_bos(tokenizer, text) + encode_marked(tokenizer, text)

    def save(self, directory: Union[str, Path]) -> Path:
        """Write the template as `directory/chat_template.jinja` (atomically), where transformers 5 reads it."""
        path = Path(directory) / TEMPLATE_FILE
        with atomic_write(path) as tmp:
            tmp.write_text(self.source, encoding="utf-8")
        return path


def resolve_chat_template(checkpoint_dir: Optional[Union[str, Path]], name_or_path: Optional[str]) -> ChatTemplate:
    """`--chat_template`: a built-in name or a .jinja file; none: the checkpoint's own template."""
    if name_or_path is not None:
        if name_or_path in BUILTIN_TEMPLATES:
            return ChatTemplate.builtin(name_or_path)
        if not name_or_path.endswith(".jinja") and not Path(name_or_path).is_file():
            raise UserError(f"--chat_template {name_or_path!r} is neither a built-in template "
                            f"{list(BUILTIN_TEMPLATES)} nor a .jinja file")
        return ChatTemplate.from_file(name_or_path)
    template = None if checkpoint_dir is None else ChatTemplate.from_checkpoint(checkpoint_dir)
    if template is None:
        raise UserError(f"{checkpoint_dir} has no chat template (no {TEMPLATE_FILE}, no chat_template in "
                        f"tokenizer_config.json): pass --chat_template, one of {list(BUILTIN_TEMPLATES)} or a "
                        f".jinja file")
    return template


def prefix_bos(tokenizer, rendered: str) -> List[int]:
    """[BOS] when the tokenizer adds BOS to a text (`add_bos_token`) and the template did not write it, as
    transformers' pipelines do when they tokenize a rendered prompt; else []. The same rule for SFT data and
    chat, so the model sees at inference what it was trained on."""
    if not tokenizer.add_bos_token or tokenizer.bos_id is None or rendered.startswith(tokenizer.bos_token):
        return []
    return [tokenizer.bos_id]


def mark_tokens(text: str, tokens: Mapping[str, int]) -> str:
    """`text` with each of `tokens` in it wrapped in the markers (and any markers already there removed, so they
    cannot be forged either): transformers' `mark_control_tokens`."""
    text = text.replace(MARK_START, "").replace(MARK_END, "")
    if not tokens:
        return text
    pattern = "|".join(map(re.escape, sorted(tokens, key=len, reverse=True)))
    return re.sub(pattern, lambda match: MARK_START + match[0] + MARK_END, text)


def encode_marked(tokenizer, text: str) -> List[int]:
    """Encode a rendering of marked contents: marked tokens as text, the rest with its special tokens parsed
    (transformers' `encode_marked_chat`). A marker that the template separated from its token is dropped but
    still splits the text, so the text on its two sides cannot join into a special token."""
    tokens = "|".join(map(re.escape, sorted(tokenizer.special_tokens, key=len, reverse=True))) or "(?!)"
    pieces = re.split(f"{MARK_START}({tokens}){MARK_END}|[{MARK_START}{MARK_END}]", text)
    newline_ids = tokenizer.encode("\n", parse_special=True)
    ids = tokenizer.encode(pieces[0], parse_special=True)
    for i, piece in enumerate(pieces[1:], start=1):
        if not piece:
            continue
        as_text = i % 2 == 1  # the pieces alternate: text, marked token, text, ...
        # after a newline, so that sentencepiece adds no dummy prefix to a piece in the middle of the text; then
        # the newline's ids are removed again (transformers' trick)
        piece_ids = tokenizer.encode("\n" + piece, parse_special=not as_text)
        if piece_ids[: len(newline_ids)] == newline_ids:
            piece_ids = piece_ids[len(newline_ids):]
        else:
            piece_ids = tokenizer.encode(piece, parse_special=not as_text)
        if as_text and tokenizer.token_id(piece) in piece_ids:
            raise UserError(f"{piece!r} cannot be kept as text: {tokenizer.path} makes it from plain text")
        ids += piece_ids
    return ids


def generation_extension():
    """The `{% generation %} ... {% endgeneration %}` tag of transformers' templates (its AssistantTracker): renders
    its body unchanged and, while `track` is active, records the body's character span in the output."""
    import jinja2
    import jinja2.ext

    class GenerationExtension(jinja2.ext.Extension):
        tags = {"generation"}

        def __init__(self, environment) -> None:
            super().__init__(environment)
            self._tracking: ContextVar = ContextVar("generation_tracking", default=None)

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_generation"), [], [], body).set_lineno(lineno)

        @jinja2.pass_eval_context
        def _generation(self, context, caller) -> str:
            text = caller()
            tracking = self._tracking.get()
            if tracking is not None:
                blocks, spans = tracking
                start = sum(map(len, blocks))  # everything before this block was yielded already
                spans.append((start, start + len(text)))
            return text

        @contextmanager
        def track(self, blocks: List[str], spans: List[Tuple[int, int]]) -> Iterator[None]:
            token = self._tracking.set((blocks, spans))
            try:
                yield
            finally:
                self._tracking.reset(token)

    return GenerationExtension


def environment():
    """transformers' chat-template environment (`_cached_compile_jinja_template`): the immutable sandbox (templates
    come from the Hub: untrusted code), trim_blocks, lstrip_blocks, loop controls, the generation tag, its
    `tojson` (no HTML escaping), `raise_exception`, `strftime_now`, and its safe `dict` and `namespace`."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:  # `dict(...)` without the dict type itself, whose attributes could break out
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):  # no underscore attributes: no way to CPython's internals
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}.")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[generation_extension(), jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env
