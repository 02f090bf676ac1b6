"""Text <-> token ids for a model folder: tokenizer.json, tokenizer_config.json, chat templates.

`Tokenizer.from_dir` reads the Hugging Face files every model folder carries: the `tokenizers`
library runs tokenizer.json; tokenizer_config.json names the special tokens and holds the chat
template, rendered with a sandboxed jinja2 environment. `StreamDecoder` turns a stream of ids
into text pieces that are always whole UTF-8 characters (byte-level BPE may split one
character across tokens).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers

REPLACEMENT_CHAR = "\ufffd"  # what a byte-level decoder yields for an incomplete UTF-8 sequence


class TokenizerError(ValueError):
    """A tokenizer folder is missing files or holds something we cannot use."""


class ChatTemplateError(ValueError):
    """The chat template failed to render (or called raise_exception)."""


def _token_content(value: Any) -> str | None:
    """Special tokens in tokenizer_config.json are a string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"cannot read special token {value!r}")


def _pick_template(value: Any) -> str | None:
    """chat_template is a string, or a list of {name, template} of which we use 'default'."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
        raise TokenizerError(f"chat_template list has no 'default' entry (has: {', '.join(map(str, named))})")
    raise TokenizerError(f"chat_template must be a string or a list, got {type(value).__name__}")


class Tokenizer:
    """A tokenizer.json model plus the special tokens and chat template of tokenizer_config.json."""

    def __init__(self, tk: tokenizers.Tokenizer, config: dict[str, Any] | None = None,
                 chat_template: str | None = None):
        self.tk = tk
        self.config = dict(config or {})
        self._register_added_tokens(self.config.get("added_tokens_decoder") or {})
        self.bos_token = _token_content(self.config.get("bos_token"))
        self.eos_token = _token_content(self.config.get("eos_token"))
        self.pad_token = _token_content(self.config.get("pad_token"))
        self.add_bos_token = bool(self.config.get("add_bos_token", False))
        self.chat_template = chat_template if chat_template is not None else _pick_template(
            self.config.get("chat_template"))
        self.bos_token_id = self._id_of(self.bos_token, "bos_token")
        self.eos_token_id = self._id_of(self.eos_token, "eos_token")
        self._template = None  # compiled lazily

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load tokenizer.json (required), tokenizer_config.json and chat_template.jinja (optional)."""
        d = Path(path)
        tj = d / "tokenizer.json"
        if not tj.is_file():
            raise TokenizerError(f"no tokenizer.json in {d}")
        try:
            tk = tokenizers.Tokenizer.from_file(str(tj))
        except Exception as e:  # noqa: BLE001  (the library raises a bare Exception on bad JSON)
            raise TokenizerError(f"cannot read {tj}: {e}") from None
        config: dict[str, Any] = {}
        tc = d / "tokenizer_config.json"
        if tc.is_file():
            try:
                config = json.loads(tc.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{tc} is not valid JSON: {e}") from None
        # Newer Hugging Face saves keep the template in its own file; it wins over the config entry.
        jinja = d / "chat_template.jinja"
        template = jinja.read_text(encoding="utf-8") if jinja.is_file() else None
        return cls(tk, config, template)

    def _register_added_tokens(self, decoder: dict[str, Any]) -> None:
        """Make sure the tokens of added_tokens_decoder exist with the ids the config gives them."""
        for id_str, spec in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            content, want = _token_content(spec), int(id_str)
            have = self.tk.token_to_id(content)
            if have is None:
                tok = tokenizers.AddedToken(content, special=bool(spec.get("special", False)), normalized=False)
                if spec.get("special", False):
                    self.tk.add_special_tokens([tok])
                else:
                    self.tk.add_tokens([tok])
                have = self.tk.token_to_id(content)
            if have != want:
                raise TokenizerError(f"added token {content!r} has id {have} but tokenizer_config.json says {want}")

    def _id_of(self, token: str | None, what: str) -> int | None:
        if token is None:
            return None
        i = self.tk.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{what} {token!r} is not in the vocabulary")
        return i

    @property
    def vocab_size(self) -> int:
        """Size of the id space, added tokens included."""
        return self.tk.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tk.id_to_token(i)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text to ids. add_special_tokens runs tokenizer.json's post-processor and adds BOS when
        tokenizer_config.json asks for it (add_bos_token). Chat-rendered text already holds its
        special tokens: encode it with add_special_tokens=False."""
        ids = self.tk.encode(text, add_special_tokens=add_special_tokens).ids
        wants_bos = add_special_tokens and self.add_bos_token and self.bos_token_id is not None
        if wants_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # --- chat ---
    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """Render messages ([{role, content}, ...]) with the model's jinja chat template."""
        if not self.chat_template:
            raise ChatTemplateError("this tokenizer has no chat_template")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        ctx = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
               "pad_token": self.pad_token or "", **extra}
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **ctx)
        except ChatTemplateError:
            raise
        except Exception as e:  # noqa: BLE001  (jinja errors: undefined names, sandbox violations...)
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)


def _raise_exception(message: str):
    raise ChatTemplateError(f"chat template: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson HTML-escapes <, > and &, which would corrupt prompts: use plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_template(source: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Templates are code shipped with model weights: render them in the sandbox, never the plain env.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except Exception as e:  # noqa: BLE001  (any jinja syntax or sandbox error is the template's fault)
        raise ChatTemplateError(f"chat template does not compile: {e}") from None


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns the new text, only ever whole characters.

    It re-decodes a short window (the ids since the last emitted piece plus the piece before,
    so decoders that treat the start of a string specially see their left context) and holds
    text back while it ends in an incomplete UTF-8 sequence.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # ids before this were emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if len(text) > len(prefix_text) and not text.endswith(REPLACEMENT_CHAR):
            piece = text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
            return piece
        return ""

    def push_many(self, ids: Iterable[int]) -> str:
        return "".join(self.push(i) for i in ids)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return text[len(prefix_text) :]


# --- building a tokenizer (tests and the demo model) ---

CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}"
    "{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_byte_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike,
                   chat_template: str | None = CHATML_TEMPLATE) -> Tokenizer:
    """Train a byte-level BPE tokenizer and write tokenizer.json + tokenizer_config.json (atomically).

    Special tokens: <|endoftext|> (id 0, bos and eos), <|im_start|>, <|im_end|>.
    """
    from tokenizers import decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer=trainer)
    config = {
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "added_tokens_decoder": {str(tk.token_to_id(s)): {"content": s, "special": True} for s in specials},
        "model_max_length": 1 << 20,
    }
    if chat_template:
        config["chat_template"] = chat_template
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "tokenizer.json", tk.to_str())
    _atomic_write(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))
    return Tokenizer.from_dir(out)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
