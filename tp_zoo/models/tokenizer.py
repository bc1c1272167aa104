"""The checkpoint's own tokenizer, through maintained libraries.

tokenizer.json is read by Hugging Face `tokenizers` (its normalizer,
pre-tokenizer and post-processor included, so Llama's BOS comes from the
file); vocab.json + merges.txt become a byte-level BPE of the same library;
tokenizer.model is read by `sentencepiece`. Whether a BOS token starts each
prompt follows tokenizer_config.json's `add_bos_token` when present, else
the family's convention (`Family.adds_bos`: OPT starts with `</s>`, Llama
with `<s>`, GPT-2 with nothing).

The stop tokens (`eos_ids`) are every end token the checkpoint names:
config.json's `eos_token_id`, generation_config.json's (a list in instruct
checkpoints: Llama-3.1's <|eot_id|>, Qwen2.5's <|im_end|> beside the
end-of-text token) and tokenizer_config.json's `eos_token`, in that order.
The tokenizer also carries what chat templates need
(`tp_zoo.models.chat_template`): the template itself and the named special
tokens.
"""

import bisect
import itertools
import json
from pathlib import Path


# The special tokens a chat template sees by name (transformers' SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _as_list(value):
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _read_json(path):
    return json.loads(path.read_text()) if path.exists() else {}


def _special_tokens(directory, settings):
    """{name: token string} of the named special tokens: tokenizer_config.json's,
    else special_tokens_map.json's (either as a string or an AddedToken dict)."""
    tokens = {}
    for source in (_read_json(directory / "special_tokens_map.json"), settings):
        for name in SPECIAL_TOKEN_NAMES:
            value = source.get(name)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                tokens[name] = value
    return tokens


def _chat_template(directory, settings):
    """The checkpoint's chat template: chat_template.jinja (which transformers
    prefers), else tokenizer_config.json's `chat_template`, a string or a list
    of named templates (kept as {name: template})."""
    if (directory / "chat_template.jinja").exists():
        return (directory / "chat_template.jinja").read_text()
    template = settings.get("chat_template")
    if isinstance(template, list):
        return {entry["name"]: entry["template"] for entry in template}
    return template


class CheckpointTokenizer:
    """encode(text) -> ids and decode(ids) -> text, with the checkpoint's BOS/EOS.

    `encode(text, add_special_tokens=False)` adds no BOS and, for a
    tokenizer.json (`reads_special_tokens`), maps special tokens written in
    the text (`<|eot_id|>`) to their ids: how a rendered chat is encoded.
    `encode_with_offsets` also gives where each token starts in the text,
    which is how a loss mask follows character spans (assistant replies).
    """

    def __init__(self, encode, decode, vocab_size, bos_id=None, eos_ids=(), add_bos=False, bos_in_encoding=False,
                 token=None, reads_special_tokens=False, chat_template=None, special_tokens=None):
        self._encode = encode
        self._decode = decode
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.add_bos = add_bos and bos_id is not None and not bos_in_encoding
        self.special_ids = {i for i in (bos_id, *self.eos_ids) if i is not None}
        # id -> its token string (None if out of the vocab).
        self.token = token
        self.reads_special_tokens = reads_special_tokens
        # A Jinja template, {name: template}, or None; and {"bos_token": "<s>", ...}.
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})

    @property
    def end_token_id(self):
        """The first stop token (KerasHub's name)."""
        return self.eos_ids[0] if self.eos_ids else None

    def encode(self, text, add_special_tokens=True):
        return self.encode_with_offsets(text, add_special_tokens)[0]

    def encode_with_offsets(self, text, add_special_tokens=True):
        """(ids, starts): the ids of `encode` and the character offset in
        `text` where each token starts (0 for an added BOS)."""
        ids, starts = self._encode(text, add_special_tokens)
        if self.add_bos and add_special_tokens:
            return [self.bos_id, *ids], [0, *starts]
        return list(ids), list(starts)

    def decode(self, ids):
        return self._decode([int(i) for i in ids if int(i) not in self.special_ids])

    @classmethod
    def _of_hf_tokenizer(cls, tok, bos_id, eos_ids, add_bos, **chat):
        """Wraps a Hugging Face `tokenizers.Tokenizer`; a BOS its post-processor
        already adds is not added again."""
        probe = tok.encode("a").ids

        def encode(text, add_special_tokens):
            encoding = tok.encode(text, add_special_tokens=add_special_tokens)
            return encoding.ids, [start for start, _ in encoding.offsets]

        return cls(
            encode,
            lambda ids: tok.decode(ids, skip_special_tokens=True),
            tok.get_vocab_size(),
            bos_id,
            _with_token_id(eos_ids, tok.token_to_id, chat["special_tokens"].get("eos_token")),
            add_bos,
            bos_in_encoding=bool(probe) and probe[0] == bos_id,
            token=tok.id_to_token,
            **chat,
        )

    @classmethod
    def from_directory(cls, directory, config, adds_bos):
        """The tokenizer of a checkpoint directory, or None if it has none;
        `adds_bos`: the family's convention when tokenizer_config.json is silent."""
        tokenizer = cls._read_directory(Path(directory), config, adds_bos)
        if tokenizer is not None:
            tokenizer._remember_source(Path(directory), config, adds_bos)
        return tokenizer

    @classmethod
    def _read_directory(cls, directory, config, adds_bos):
        settings = _read_json(directory / "tokenizer_config.json")
        bos_id = config.get("bos_token_id")
        eos_ids = _as_list(config.get("eos_token_id"))
        eos_ids += _as_list(_read_json(directory / "generation_config.json").get("eos_token_id"))
        add_bos = settings.get("add_bos_token", adds_bos)
        chat = {"chat_template": _chat_template(directory, settings),
                "special_tokens": _special_tokens(directory, settings)}
        if (directory / "tokenizer.json").exists():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
            return cls._of_hf_tokenizer(tok, bos_id, eos_ids, add_bos, reads_special_tokens=True, **chat)
        if (directory / "vocab.json").exists() and (directory / "merges.txt").exists():
            from tokenizers import Tokenizer
            from tokenizers import decoders
            from tokenizers import models
            from tokenizers import pre_tokenizers

            tok = Tokenizer(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            return cls._of_hf_tokenizer(tok, bos_id, eos_ids, add_bos, **chat)
        if (directory / "tokenizer.model").exists():
            import sentencepiece

            sp = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
            size = sp.get_piece_size()

            def piece_id(piece):  # piece_to_id answers the unknown token's id for a piece not in the vocab
                i = sp.piece_to_id(piece)
                return i if sp.id_to_piece(i) == piece else None

            # sentencepiece adds BOS only when asked, and reads no special tokens in text.
            return cls(lambda text, add_special_tokens: _sentencepiece_encode(sp, text), sp.decode, size, bos_id,
                       _with_token_id(eos_ids, piece_id, chat["special_tokens"].get("eos_token")), add_bos,
                       token=lambda i: sp.id_to_piece(i) if 0 <= i < size else None, **chat)
        return None

    # --- saving: a saved model carries the tokenizer's files as Keras assets -------
    # (tp_zoo.models.preprocessor). The files' bytes are kept, not their paths:
    # the checkpoint directory, or the folder Keras unpacks a .keras file into,
    # may be gone by the next save.
    FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model",
             "special_tokens_map.json", "chat_template.jinja")
    files = None  # {file name: bytes} of the files it was read from
    source = None  # the rest of what from_directory was given

    def _remember_source(self, directory, config, adds_bos):
        self.files = {name: (directory / name).read_bytes() for name in self.FILES if (directory / name).exists()}
        # generation_config.json is not among the files: its stop tokens are kept here.
        self.source = {
            "config": {"bos_token_id": config.get("bos_token_id"), "eos_token_id": list(self.eos_ids)},
            "adds_bos": adds_bos,
        }

    def get_config(self):
        if self.source is None:
            raise ValueError("This tokenizer was not read from a checkpoint's files, so it cannot be saved.")
        return dict(self.source)

    @classmethod
    def from_config(cls, source):
        """The tokenizer `source` (a `get_config()`) describes, its files not
        read yet: Keras builds a restored model, which holds this very object,
        before it restores the model's assets (`read_files`)."""
        config = source["config"]
        tokenizer = cls(_files_not_read, _files_not_read, None, config.get("bos_token_id"),
                        _as_list(config.get("eos_token_id")))
        tokenizer.source = dict(source)
        return tokenizer

    def write_files(self, directory):
        for name, data in self.files.items():
            (Path(directory) / name).write_bytes(data)

    def read_files(self, directory):
        """Reads the files `write_files` wrote into this object, in place (the
        model and its preprocessor share it)."""
        vars(self).update(vars(CheckpointTokenizer.from_directory(directory, **self.source)))


def _sentencepiece_encode(sp, text):
    """(ids, character starts); sentencepiece reports byte offsets."""
    from sentencepiece import sentencepiece_pb2

    pieces = sentencepiece_pb2.SentencePieceText.FromString(sp.encode(text, out_type="serialized_proto")).pieces
    byte_starts = [0, *itertools.accumulate(len(c.encode("utf-8")) for c in text)]
    return [p.id for p in pieces], [bisect.bisect_right(byte_starts, p.begin) - 1 for p in pieces]


def _with_token_id(ids, token_id, token):
    """`ids` (without repeats) and then the id of `token` if it has one."""
    extra = token_id(token) if token is not None else None
    return list(dict.fromkeys([*ids, *([extra] if extra is not None else [])]))


def _files_not_read(*args):
    raise RuntimeError("This tokenizer's files have not been read yet; Keras reads them with the model's assets.")
