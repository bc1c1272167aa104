"""What generate() takes, parsed into prompt ids: strings, conversations, or
a batch of ids.

The kind of input decides what comes out (texts, replies or ids), the
default budget of new tokens, and what streamed text shows; each kind is a
class that does its own part, so nothing downstream asks which kind it has.
"""

import numpy as np

from tp_zoo.models.chat_template import ChatTemplate
from tp_zoo.models.chat_template import check_conversation

# A string prompt's default budget.
DEFAULT_NEW_TOKENS = 64
# A reply's default budget, within what the model's positions leave.
DEFAULT_REPLY_TOKENS = 512


def parse_prompts(lm, inputs, chat_template=None):
    """`inputs` as `Texts`, `Conversations` or an `IdBatch`, checked."""
    conversations = _conversations(inputs)
    if chat_template is not None and conversations is None:
        raise ValueError("chat_template= applies to conversations: lists of {'role', 'content'} dicts.")
    if isinstance(inputs, str):
        return Texts.encode(lm, [inputs], single=True)
    if isinstance(inputs, dict):
        return IdBatch.from_batch(lm, inputs)
    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise ValueError(
            "generate() takes a string, a non-empty list of strings, a conversation (a list of {'role', "
            f"'content'}} dicts), a list of conversations, or a {{'token_ids', 'padding_mask'}} batch; got "
            f"{type(inputs).__name__}."
        )
    if conversations is not None:
        return Conversations.render(lm, conversations, chat_template, single=isinstance(inputs[0], dict))
    return Texts.encode(lm, inputs, single=False)


class Prompts:
    """Each row's prompt ids (`ids`: lists of ids within the vocab) and
    `single`: whether one string or conversation came in, not a list."""

    noun = "prompt"  # a row, in error messages

    def __init__(self, lm, ids, single=False):
        vocab = lm.backbone.vocab_size
        for row, prompt in enumerate(ids):
            if not prompt:
                raise ValueError(f"Prompt {row} is empty: give at least one token.")
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"Prompt {row} has token ids outside the vocab [0, {vocab}): {bad[:5]}.")
        self.ids = ids
        self.single = single
        self.lengths = np.array([len(p) for p in ids], "int32")

    def default_lengths(self, limit):
        """(max_length, max_new_tokens) where the caller gives neither;
        `limit`: the model's positions."""
        return None, DEFAULT_NEW_TOKENS

    def result(self, lm, request, new_rows, strip_prompt):
        """What generate() returns, from each row's new ids (`new_rows`)."""
        raise NotImplementedError

    def text_context(self):
        """The ids whose text a streamed continuation follows."""
        return ()

    def shown_ids(self, new, stop_token_ids):
        """Of a row's new ids, those its text shows."""
        return new

    def _with_prompts(self, new_rows, strip_prompt):
        if strip_prompt:
            return new_rows
        return [np.concatenate([prompt, new]).astype("int32") for prompt, new in zip(self.ids, new_rows)]

    def _one_or_all(self, results):
        return results[0] if self.single else results


class Texts(Prompts):
    """Strings, encoded with the checkpoint's tokenizer; out come strings."""

    @classmethod
    def encode(cls, lm, texts, single):
        if not all(isinstance(x, str) for x in texts):
            raise ValueError(
                "generate() got a list mixing strings and other values; pass either strings, "
                "or ids as a {'token_ids', 'padding_mask'} batch."
            )
        if lm.tokenizer is None:
            raise ValueError(
                "This checkpoint has no tokenizer files, so generate() needs ids: "
                "pass a {'token_ids', 'padding_mask'} batch."
            )
        return cls(lm, [lm.tokenizer.encode(text) for text in texts], single)

    def result(self, lm, request, new_rows, strip_prompt):
        return self._one_or_all([lm.tokenizer.decode(row) for row in self._with_prompts(new_rows, strip_prompt)])

    def text_context(self):
        # The continuation is decoded after the prompt's ids, so that a space
        # the tokenizer folds into the first new token shows.
        return self.ids[0]


class Conversations(Prompts):
    """Conversations rendered with the chat template and its generation
    prompt; out come the replies, without the stop token that ends them."""

    noun = "conversation"

    @classmethod
    def render(cls, lm, conversations, chat_template, single):
        template = ChatTemplate(lm.tokenizer, chat_template)
        return cls(lm, [template.encode(c, add_generation_prompt=True) for c in conversations], single)

    def default_lengths(self, limit):
        longest = int(self.lengths.argmax())
        if self.lengths[longest] >= limit:
            raise ValueError(
                f"Conversation {longest} is {self.lengths[longest]} tokens long as the chat template renders it, "
                f"which leaves no room for a reply within the model's {limit} positions; shorten it."
            )
        return None, min(DEFAULT_REPLY_TOKENS, limit - int(self.lengths[longest]))

    def result(self, lm, request, new_rows, strip_prompt):
        return self._one_or_all([lm.tokenizer.decode(self.shown_ids(new, request.stop_token_ids))
                                 for new in new_rows])

    def shown_ids(self, new, stop_token_ids):
        """A reply's ids: new ids without the stop token that ends the turn."""
        return new[:-1] if new.size and new[-1] in (stop_token_ids or ()) else new


class IdBatch(Prompts):
    """A {"token_ids", "padding_mask"} batch of right-padded prompts; out
    comes such a batch, as wide as the longest row's prompt and budget."""

    def __init__(self, lm, ids, width):
        super().__init__(lm, ids)
        self.width = width  # the batch's, the default max_length

    @classmethod
    def from_batch(cls, lm, batch):
        if set(batch) != {"token_ids", "padding_mask"}:
            raise ValueError(
                f"An id batch needs exactly the keys 'token_ids' and 'padding_mask', got {sorted(batch)}."
            )
        ids = np.asarray(batch["token_ids"])
        mask = np.asarray(batch["padding_mask"]).astype(bool)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(
                f"token_ids and padding_mask must both be (batch, length); got {ids.shape} and {mask.shape}."
            )
        prompts = []
        for row, row_mask in zip(ids, mask):
            length = int(row_mask.sum())
            if not row_mask[:length].all():
                raise ValueError("padding_mask must mark each prompt's tokens first (right padding).")
            prompts.append([int(t) for t in row[:length]])
        return cls(lm, prompts, width=ids.shape[1])

    def default_lengths(self, limit):
        return self.width, None

    def result(self, lm, request, new_rows, strip_prompt):
        rows = self._with_prompts(new_rows, strip_prompt)
        ids = np.zeros((len(rows), request.width), "int32")
        mask = np.zeros((len(rows), request.width), bool)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = row
            mask[r, : len(row)] = True
        return {"token_ids": ids, "padding_mask": mask}


def _conversations(inputs):
    """The checked conversations `inputs` holds (one conversation, a list of
    message dicts, or a list of them), or None if it holds none."""
    if not isinstance(inputs, (list, tuple)) or not inputs:
        return None
    if isinstance(inputs[0], dict):
        return [_one_conversation(inputs)]
    if isinstance(inputs[0], (list, tuple)):
        return [_one_conversation(c, index) for index, c in enumerate(inputs)]
    return None


def _one_conversation(messages, index=None):
    if isinstance(messages, (list, tuple)) and not messages:
        raise ValueError(f"Conversation {index or 0} is empty: give at least one message.")
    return check_conversation(messages, index)
