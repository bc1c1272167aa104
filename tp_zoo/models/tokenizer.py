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
        directory = Path(directory)
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
