"""Checkpoint tokenizers against transformers' own tokenizers on the same files."""

import json

import numpy as np
import pytest
import sentencepiece
import transformers
from tokenizers import Tokenizer
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import processors
from tokenizers import trainers

from tp_zoo.demo import demo_text
from tp_zoo.models.tokenizer import CheckpointTokenizer

TEXTS = ["Four score and seven years ago", "  Shall I compare thee\nto a summer's day?", "résumé – naïve ✓"]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE trained on the demo text, saved both as tokenizer.json
    (with a Llama-style BOS post-processor) and as vocab.json + merges.txt."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([demo_text()], trainer)
    directory = tmp_path_factory.mktemp("bpe")
    tok.model.save(str(directory))  # vocab.json, merges.txt
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(directory / "tokenizer.json"))
    return directory


def test_tokenizer_json_matches_transformers(bpe):
    ours = CheckpointTokenizer.from_directory(bpe, {"bos_token_id": 0, "eos_token_id": 1}, adds_bos=True)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(bpe / "tokenizer.json"))
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"]
        assert ids[0] == 0 and ids.count(0) == 1  # BOS from the file's post-processor, once
        assert ours.decode(ids) == text


@pytest.mark.parametrize("family,bos", [("gpt2", False), ("opt", True)])
def test_vocab_and_merges_match_transformers(bpe, tmp_path, family, bos):
    directory = tmp_path / family
    directory.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (directory / name).write_bytes((bpe / name).read_bytes())
    ours = CheckpointTokenizer.from_directory(directory, {"bos_token_id": 1, "eos_token_id": 1}, adds_bos=bos)
    ref = transformers.GPT2TokenizerFast.from_pretrained(str(directory))
    for text in TEXTS:
        expected = ref(text)["input_ids"]
        # OPT starts every prompt with </s> (its BOS); GPT-2 with nothing.
        assert ours.encode(text) == ([1] + expected if bos else expected)
        assert ours.decode(ours.encode(text)) == text


def test_tokenizer_config_decides_bos(bpe, tmp_path):
    directory = tmp_path / "no_bos"
    directory.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (directory / name).write_bytes((bpe / name).read_bytes())
    (directory / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    ours = CheckpointTokenizer.from_directory(directory, {"bos_token_id": 1}, adds_bos=True)
    assert ours.encode("Four") == transformers.GPT2TokenizerFast.from_pretrained(str(directory))("Four")["input_ids"]


def test_sentencepiece_model(tmp_path):
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(demo_text().splitlines()), model_prefix=str(tmp_path / "tokenizer"),
        vocab_size=200, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
    )
    ours = CheckpointTokenizer.from_directory(tmp_path, {"bos_token_id": 1, "eos_token_id": 2}, adds_bos=True)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert ours.encode(TEXTS[0]) == [1] + sp.encode(TEXTS[0])
    assert ours.decode(ours.encode(TEXTS[0])) == TEXTS[0]
    assert ours.end_token_id == 2


def test_no_tokenizer_files(tmp_path):
    assert CheckpointTokenizer.from_directory(tmp_path, {}, adds_bos=True) is None
