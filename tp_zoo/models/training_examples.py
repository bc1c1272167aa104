"""Training examples as token ids, and which tokens the loss trains on.

An example is one of the formats of TRL's SFTTrainer (torchtune and
Axolotl take the same):

- a string, or {"text": str}: a document; every token is trained and the
  tokenizer's EOS ends it;
- {"messages": [{"role", "content"}, ...]}: a conversation as the
  checkpoint's chat template writes it; only the assistant's replies are
  trained, each through its end-of-turn token (`assistant_spans`);
- {"prompt": str, "completion": str}: the two texts joined, then EOS; the
  completion and the EOS are trained;
- {"prompt": [messages], "completion": [messages]}: the conversation
  prompt + completion through the chat template; the completion's
  assistant replies are trained.

The whole text is encoded at once, as it is at inference, and a token is
trained when it starts inside a trained span of the text; the label of a
token not trained is `IGNORED_LABEL`, which the loss skips.

```python
ids, trained = encode_example(lm.tokenizer, {"prompt": "2 + 2 =", "completion": " 4"})
x, labels = padded_rows([(ids, trained)], sequence_length=128)
```
"""

import numpy as np

from tp_zoo.layers.loss import IGNORED_LABEL
from tp_zoo.models.chat_template import ChatTemplate
from tp_zoo.models.chat_template import assistant_spans
from tp_zoo.models.chat_template import check_conversation

FORMATS = "{'text': str}, {'messages': [...]} or {'prompt': ..., 'completion': ...}"


def check_example(example, where="The example"):
    """The example's format ("text", "messages", "prompt_completion" or
    "conversational_prompt_completion"), or a ValueError saying, after
    `where`, what is wrong with it."""
    if isinstance(example, str):
        return "text"
    if not isinstance(example, dict):
        raise ValueError(f"{where} is a {type(example).__name__}; an example is a string or {FORMATS}.")
    keys = set(example) & {"text", "messages", "prompt", "completion"}
    if keys == {"text"}:
        if not isinstance(example["text"], str):
            raise ValueError(f"{where} has a 'text' that is not a string.")
        return "text"
    if keys == {"messages"}:
        _check_messages(example["messages"], where, "messages")
        return "messages"
    if keys == {"prompt", "completion"}:
        prompt, completion = example["prompt"], example["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return "prompt_completion"
        if isinstance(prompt, list) and isinstance(completion, list):
            _check_messages(prompt + completion, where, "prompt + completion")
            if not any(m["role"] == "assistant" for m in completion):
                raise ValueError(f"{where} has no assistant message in its completion: nothing to train on.")
            return "conversational_prompt_completion"
        raise ValueError(f"{where} needs a 'prompt' and a 'completion' that are both strings or both lists of "
                         "messages.")
    if "role" in example:
        raise ValueError(f"{where} is a message; a conversation to train on is {{'messages': [messages]}}.")
    raise ValueError(f"{where} has the keys {sorted(example)}; an example is a string or {FORMATS}.")


def _check_messages(messages, where, name):
    try:
        messages = check_conversation(messages)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    if not messages:
        raise ValueError(f"{where} has no {name}.")
    if name == "messages" and not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where} has no assistant message: nothing to train on.")


def encode_example(tokenizer, example, chat_template=None, where="The example"):
    """(ids, trained): the example's token ids (int32) and, for each, whether
    the loss trains on predicting it.

    Args:
        tokenizer: a `tp_zoo.models.tokenizer.CheckpointTokenizer`.
        example: see the module's docstring.
        chat_template: a `ChatTemplate` for conversations (default: the
            tokenizer's own).
        where: how errors name the example ("data.jsonl:7").
    """
    kind = check_example(example, where)
    try:
        return _encode(tokenizer, example, kind, chat_template)
    except ValueError as error:  # ChatTemplateError included
        raise type(error)(f"{where}: {error}") from None


def encode_examples(tokenizer, named_examples, chat_template=None):
    """[(ids, trained)] of each (where, example) pair, as `encode_example`;
    `chat_template`: a Jinja template in place of the checkpoint's."""
    template = None if chat_template is None else ChatTemplate(tokenizer, chat_template)
    return [encode_example(tokenizer, example, template, where) for where, example in named_examples]


def _encode(tokenizer, example, kind, chat_template):
    eos = [] if tokenizer.end_token_id is None else [tokenizer.end_token_id]
    if kind == "text":
        ids = tokenizer.encode(example if isinstance(example, str) else example["text"]) + eos
        return np.asarray(ids, "int32"), np.ones(len(ids), bool)
    if kind == "prompt_completion":
        ids, starts = tokenizer.encode_with_offsets(example["prompt"] + example["completion"])
        trained = [start >= len(example["prompt"]) for start in starts] + [True] * len(eos)
        return np.asarray(ids + eos, "int32"), np.asarray(trained, bool)
    template = chat_template or ChatTemplate(tokenizer)
    if kind == "messages":
        messages, earlier_replies = example["messages"], 0
    else:
        messages = example["prompt"] + example["completion"]
        earlier_replies = sum(m["role"] == "assistant" for m in example["prompt"])
    text, spans = assistant_spans(template, messages)
    ids, starts = template.encode_rendered(text)
    starts = np.asarray(starts)
    trained = np.zeros(len(ids), bool)
    for start, end in spans[earlier_replies:]:
        trained |= (starts >= start) & (starts < end)
    return np.asarray(ids, "int32"), trained


def _labels(ids, trained):
    return np.where(trained, ids, IGNORED_LABEL).astype("int32")


def padded_rows(encoded, sequence_length, names=None):
    """One row per example: ({"token_ids", "padding_mask"}, labels), each
    (len(encoded), sequence_length), right padded; labels are the next
    token where it is trained, else `IGNORED_LABEL`.

    An example longer than sequence_length + 1 tokens is refused (cutting it
    would train on a reply without its end), named by `names[i]` if given.
    """
    width = sequence_length + 1
    ids = np.zeros((len(encoded), width), "int32")
    trained = np.zeros((len(encoded), width), bool)
    for row, (example_ids, example_trained) in enumerate(encoded):
        if len(example_ids) > width:
            name = names[row] if names is not None else f"Example {row}"
            raise ValueError(f"{name} is {len(example_ids)} tokens, more than sequence_length + 1 = {width}: "
                             "raise the sequence length or shorten the example.")
        ids[row, : len(example_ids)] = example_ids
        trained[row, : len(example_ids)] = example_trained
    mask = np.arange(sequence_length)[None, :] < np.asarray([len(i) for i, _ in encoded])[:, None]
    x = {"token_ids": ids[:, :-1], "padding_mask": mask}
    return x, _labels(ids[:, 1:], trained[:, 1:])


def packed_rows(encoded, sequence_length, stride=None):
    """The examples joined in order and cut into rows of sequence_length
    tokens starting every `stride` (default sequence_length) tokens, each
    with the token after it: ({"token_ids", "padding_mask"}, labels) as in
    `padded_rows`, no padding; the tail shorter than a row is dropped."""
    ids = np.concatenate([i for i, _ in encoded])
    trained = np.concatenate([t for _, t in encoded])
    if len(ids) < sequence_length + 1:
        raise ValueError(f"The examples hold {len(ids)} tokens: not enough for one sequence of "
                         f"{sequence_length} + 1 tokens.")
    starts = np.arange(0, len(ids) - sequence_length, stride or sequence_length)
    window = starts[:, None] + np.arange(sequence_length + 1)[None, :]
    x = {"token_ids": ids[window[:, :-1]], "padding_mask": np.ones((len(starts), sequence_length), bool)}
    return x, _labels(ids[window[:, 1:]], trained[window[:, 1:]])
