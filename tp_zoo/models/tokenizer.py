"""The checkpoint's own tokenizer, through maintained libraries.

tokenizer.json is read by Hugging Face `tokenizers` (its normalizer,
pre-tokenizer and post-processor included, so Llama's BOS comes from the
file); vocab.json + merges.txt become a byte-level BPE of the same library;
tokenizer.model is read by `sentencepiece`. Whether a BOS token starts each
prompt follows tokenizer_config.json's `add_bos_token` when present, else
the family's convention (`Family.adds_bos`: OPT starts with `</s>`, Llama
with `<s>`, GPT-2 with nothing).
"""

import json
from pathlib import Path


def _as_list(value):
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


class CheckpointTokenizer:
    """encode(text) -> ids and decode(ids) -> text, with the checkpoint's BOS/EOS."""

    def __init__(self, encode, decode, vocab_size, bos_id=None, eos_ids=(), add_bos=False, bos_in_encoding=False):
        self._encode = encode
        self._decode = decode
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.add_bos = add_bos and bos_id is not None and not bos_in_encoding
        self.special_ids = {i for i in (bos_id, *self.eos_ids) if i is not None}

    @property
    def end_token_id(self):
        """The first stop token (KerasHub's name)."""
        return self.eos_ids[0] if self.eos_ids else None

    def encode(self, text):
        ids = list(self._encode(text))
        return [self.bos_id] + ids if self.add_bos else ids

    def decode(self, ids):
        return self._decode([int(i) for i in ids if int(i) not in self.special_ids])

    @classmethod
    def _of_hf_tokenizer(cls, tok, bos_id, eos_ids, add_bos):
        """Wraps a Hugging Face `tokenizers.Tokenizer`; a BOS its post-processor
        already adds is not added again."""
        probe = tok.encode("a").ids
        return cls(
            lambda text: tok.encode(text).ids,
            lambda ids: tok.decode(ids, skip_special_tokens=True),
            tok.get_vocab_size(),
            bos_id,
            eos_ids,
            add_bos,
            bos_in_encoding=bool(probe) and probe[0] == bos_id,
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
        settings = {}
        if (directory / "tokenizer_config.json").exists():
            settings = json.loads((directory / "tokenizer_config.json").read_text())
        bos_id = config.get("bos_token_id")
        eos_ids = _as_list(config.get("eos_token_id"))
        add_bos = settings.get("add_bos_token", adds_bos)
        if (directory / "tokenizer.json").exists():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
            return cls._of_hf_tokenizer(tok, bos_id, eos_ids, add_bos)
        if (directory / "vocab.json").exists() and (directory / "merges.txt").exists():
            from tokenizers import Tokenizer
            from tokenizers import decoders
            from tokenizers import models
            from tokenizers import pre_tokenizers

            tok = Tokenizer(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            return cls._of_hf_tokenizer(tok, bos_id, eos_ids, add_bos)
        if (directory / "tokenizer.model").exists():
            import sentencepiece

            sp = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
            return cls(sp.encode, sp.decode, sp.get_piece_size(), bos_id, eos_ids, add_bos)
        return None

    # --- saving: a saved model carries the tokenizer's files as Keras assets -------
    # (tp_zoo.models.preprocessor). The files' bytes are kept, not their paths:
    # the checkpoint directory, or the folder Keras unpacks a .keras file into,
    # may be gone by the next save.
    FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model")
    files = None  # {file name: bytes} of the files it was read from
    source = None  # the rest of what from_directory was given

    def _remember_source(self, directory, config, adds_bos):
        self.files = {name: (directory / name).read_bytes() for name in self.FILES if (directory / name).exists()}
        self.source = {
            "config": {key: config.get(key) for key in ("bos_token_id", "eos_token_id")},
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


def _files_not_read(*args):
    raise RuntimeError("This tokenizer's files have not been read yet; Keras reads them with the model's assets.")
