"""Chat templates: a conversation as the checkpoint's own Jinja template
writes it, and as the same token ids transformers' `apply_chat_template`
gives.

The template is the checkpoint's (chat_template.jinja, else
tokenizer_config.json's `chat_template`; see `tp_zoo.models.tokenizer`) or
one passed in. It runs as transformers runs it: Jinja2's immutable sandbox
with `trim_blocks` and `lstrip_blocks`, loop controls, `{% generation %}`
blocks rendered as their body, `raise_exception(message)`,
`strftime_now(format)` and a `tojson` filter that keeps non-ASCII and HTML
characters as they are; it sees `messages`, `add_generation_prompt`,
`tools=None`, `documents=None` and the named special tokens (`bos_token`,
`eos_token`, ...). The text is encoded without added special tokens: the
template writes its own (`<|begin_of_text|>`), and a tokenizer.json reads
them in the text.

```python
template = ChatTemplate(lm.tokenizer)
ids = template.encode([{"role": "user", "content": "Hi!"}], add_generation_prompt=True)
text, spans = assistant_spans(template, conversation)   # where each reply sits, for loss masks
```
"""

import datetime
import functools
import json

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

from tp_zoo.errors import ChatTemplateError

ROLES = ("system", "user", "assistant", "tool")


class _TemplateRaised(jinja2.exceptions.TemplateError):
    """What a template's `raise_exception(message)` raises."""


def _raise_exception(message):
    raise _TemplateRaised(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' filter: Jinja's own escapes HTML characters.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.datetime.now().strftime(format)


class _GenerationBlocks(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, which transformers' templates
    use to mark assistant text: rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


@functools.lru_cache(maxsize=16)
def _compiled(source):
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlocks, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    try:
        return environment.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as error:
        raise ChatTemplateError(f"The chat template does not compile: {error.message} (line {error.lineno}).") from None


def _one_line(text):
    return " ".join(str(text).split())


class ChatTemplate:
    """A tokenizer's chat template: conversations to text and to ids.

    Args:
        tokenizer: a `tp_zoo.models.tokenizer.CheckpointTokenizer`, whose
            special tokens the template sees and which encodes the text.
        source: a Jinja template; None takes the checkpoint's own.

    Raises `tp_zoo.errors.ChatTemplateError` when there is no template or it
    does not compile.
    """

    def __init__(self, tokenizer, source=None):
        if tokenizer is None:
            raise ChatTemplateError("This checkpoint has no tokenizer files, so it cannot encode a conversation.")
        if source is None:
            source = tokenizer.chat_template
        if isinstance(source, dict):  # named templates: the default one, as transformers takes
            if "default" not in source:
                raise ChatTemplateError(
                    f"This checkpoint has chat templates named {sorted(source)} and none named 'default'; "
                    "pass the one to use as chat_template=<template text>."
                )
            source = source["default"]
        if source is None:
            raise ChatTemplateError(
                "This checkpoint has no chat template (no chat_template in tokenizer_config.json, no "
                "chat_template.jinja); pass one as chat_template=<Jinja template text> "
                "(`tp-zoo chat --chat-template FILE`)."
            )
        if not isinstance(source, str):
            raise ChatTemplateError(f"A chat template is Jinja text; got {type(source).__name__}.")
        self.tokenizer = tokenizer
        self.source = source
        self._template = _compiled(source)
        # The strings of the stop tokens: where an assistant turn ends.
        self.end_of_turn = tuple(t for t in map(tokenizer.token, tokenizer.eos_ids) if t)

    def render(self, messages, add_generation_prompt=False, **variables):
        """The conversation as the template writes it (what transformers'
        `apply_chat_template(messages, tokenize=False)` returns); `variables`
        reach the template too (`date_string=...`)."""
        messages = check_conversation(messages)
        context = {**self.tokenizer.special_tokens, **variables}
        try:
            return self._template.render(
                messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **context
            )
        except _TemplateRaised as error:
            raise ChatTemplateError(f"The chat template refused the conversation: {_one_line(error)}") from None
        except Exception as error:  # a template is a program: any error of its own is the template's
            raise ChatTemplateError(
                f"The chat template failed on the conversation: {type(error).__name__}: {_one_line(error)}"
            ) from None

    def encode(self, messages, add_generation_prompt=False, **variables):
        """The conversation's token ids: the same as transformers'
        `apply_chat_template(messages)` on the same checkpoint."""
        self._check_reads_special_tokens()
        text = self.render(messages, add_generation_prompt=add_generation_prompt, **variables)
        return self.encode_rendered(text)[0]

    def encode_rendered(self, text):
        """(ids, starts) of a rendered conversation: its ids and the offset in
        `text` where each token starts."""
        self._check_reads_special_tokens()
        return self.tokenizer.encode_with_offsets(text, add_special_tokens=False)

    def _check_reads_special_tokens(self):
        if not self.tokenizer.reads_special_tokens:
            raise ChatTemplateError(
                "Chat needs the checkpoint's tokenizer.json: with only vocab.json + merges.txt or "
                "tokenizer.model, the special tokens a chat template writes would be encoded as plain text."
            )


def check_conversation(messages, conversation=None):
    """`messages` as a list of (copied) message dicts, or a ValueError naming
    the first bad message (`conversation`: its index in a batch, if any)."""
    where = "" if conversation is None else f" of conversation {conversation}"
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"A conversation is a list of {{'role', 'content'}} dicts; got {type(messages).__name__}.")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"Message {index}{where} is a {type(message).__name__}, not a {{'role', 'content'}} dict.")
        missing = [key for key in ("role", "content") if key not in message]
        if missing:
            raise ValueError(f"Message {index}{where} has no {' or '.join(map(repr, missing))} key.")
        if message["role"] not in ROLES:
            raise ValueError(
                f"Message {index}{where} has the unknown role {message['role']!r}; roles are {', '.join(ROLES)}."
            )
        if not isinstance(message["content"], str):
            raise ValueError(f"Message {index}{where} has content of type {type(message['content']).__name__}, "
                             "not a string.")
        checked.append(dict(message))
    return checked


def assistant_spans(template, messages, **variables):
    """The conversation's text and where each assistant reply sits in it,
    for masking a fine-tuning loss to the replies.

    Args:
        template: a `ChatTemplate`.
        messages: the conversation, a list of {"role", "content"} dicts.
        variables: further template variables, as for `ChatTemplate.render`.

    Returns:
        `(text, spans)`: `text` is `template.render(messages)` (no
        generation prompt); `spans[k] = (start, end)` are the character
        offsets in `text` of the k-th assistant message, from where the
        generation prompt ends through the end-of-turn token: what the model
        must write after the prompt, as the template writes it (trimmed or
        with a leading space where the template does so), e.g.
        "Hello!<|eot_id|>" or " Hello!</s>", and not what the template adds
        after the end-of-turn token (ChatML's "\\n").

    Found by rendering prefixes of the conversation: the text of the
    messages before reply i, with the generation prompt, must begin the
    text through reply i, which must begin the whole text; what follows the
    first in the second is the reply. This holds for templates that render
    earlier messages the same whatever follows (Llama 3, ChatML, Zephyr,
    Mistral without a system message); Mistral's template puts a system
    message into the last user turn, so a conversation with one raises a
    `ChatTemplateError` naming the reply. The end-of-turn token is the
    last stop token string (`template.end_of_turn`) in the reply.

    To mask by tokens, encode `text` with offsets (a tokenizer.json's
    `encode(text, add_special_tokens=False).offsets`) and keep the tokens
    inside the spans.
    """
    messages = check_conversation(messages)
    text = template.render(messages, **variables)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = template.render(messages[:index], add_generation_prompt=True, **variables)
        through = template.render(messages[: index + 1], **variables)
        if not (through.startswith(before) and text.startswith(through)):
            raise ChatTemplateError(
                f"The chat template writes the messages before message {index} (an assistant reply) "
                "differently once later messages follow, so the reply's place cannot be found by rendering "
                "prefixes of the conversation."
            )
        reply = through[len(before):]
        ends = [reply.rfind(token) + len(token) for token in template.end_of_turn if token in reply]
        spans.append((len(before), len(before) + (max(ends) if ends else len(reply))))
    return text, spans
