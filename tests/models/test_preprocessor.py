"""The causal LM preprocessor: its outputs by hand, fit/evaluate on strings
(sharded, against the same ids by hand and against one device), bad input,
and its save/load round trip."""

import json

import keras
import keras_hub
import numpy as np
import pytest
import sentencepiece
import torch
import transformers

import tp_zoo
from tests.helpers import assert_close
from tp_zoo import demo
from tp_zoo.models import CausalLMPreprocessor
from tp_zoo.models.llama import LlamaBackbone
from tp_zoo.models.llama import LlamaCausalLM
from tp_zoo.models.tokenizer import CheckpointTokenizer

SEQ = 16
# Short ones are padded, the long ones cut (keeping their EOS).
TEXTS = [
    "Four score and seven years ago",
    "our fathers brought forth on this continent, a new nation, conceived in Liberty, and dedicated",
    "Now we are engaged",
    "in a great civil war, testing whether that nation, or any nation so conceived and so dedicated",
    "can long endure.",
    "We are met on a great battle-field of that war.",
    "We have come",
    "to dedicate a portion of that field, as a final resting place for those who here gave their lives",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The demo's small Llama-style checkpoint, whose tokenizer.json starts
    every text with BOS (id 0); EOS is id 1."""
    return demo.write_checkpoint(tmp_path_factory.mktemp("pre") / "model", demo.demo_text(), vocab_size=300)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    return CheckpointTokenizer.from_directory(checkpoint, config, adds_bos=True)


def by_hand(tokenizer, texts, length):
    """keras_hub's packing, written out: BOS + tokens + EOS, cut to length + 1
    keeping the EOS, zero padded; x/y and mask/weights one token apart, and
    labels of -100 (skipped by the loss) at padding."""
    ids = np.zeros((len(texts), length + 1), "int32")
    mask = np.zeros((len(texts), length + 1), bool)
    for row, text in enumerate(texts):
        tokens = tokenizer.encode(text)
        assert tokens[0] == 0 and 0 not in tokens[1:] and 1 not in tokens  # BOS from the file, once
        tokens = tokens[:length] + [1]
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = True
    x = {"token_ids": ids[:, :-1], "padding_mask": mask[:, :-1]}
    return x, np.where(mask[:, 1:], ids[:, 1:], -100), mask[:, 1:]


def assert_same(got, expected):
    for g, e in zip(keras.tree.flatten(got), keras.tree.flatten(expected)):
        np.testing.assert_array_equal(g, e)


def test_outputs_by_hand(tokenizer):
    preprocessor = CausalLMPreprocessor(tokenizer, sequence_length=SEQ)
    x, y, sample_weight = preprocessor(TEXTS)
    assert_same((x, y, sample_weight), by_hand(tokenizer, TEXTS, SEQ))
    lengths = [len(tokenizer.encode(t)) + 1 for t in TEXTS]
    assert min(lengths) < SEQ and max(lengths) > SEQ + 1  # both padding and truncation happen
    short = int(np.argmin(lengths))
    body = tokenizer.encode(TEXTS[short])[1:]
    np.testing.assert_array_equal(x["token_ids"][short, : lengths[short]], [0, *body, 1])
    np.testing.assert_array_equal(y[short, : lengths[short] - 1], [*body, 1])
    assert not sample_weight[short, lengths[short] - 1 :].any() and (y[short, lengths[short] - 1 :] == -100).all()
    long = int(np.argmax(lengths))
    assert sample_weight[long].all() and y[long, -1] == 1 and x["token_ids"][long, 0] == 0

    preprocessor.sequence_length = 8
    assert_same(preprocessor(TEXTS), by_hand(tokenizer, TEXTS, 8))
    assert_same(preprocessor(TEXTS[0]), keras.tree.map_structure(lambda a: a[0], by_hand(tokenizer, TEXTS[:1], 8)))
    ids = {"token_ids": np.ones((2, 3), "int32"), "padding_mask": np.ones((2, 3), bool)}
    labels = np.zeros((2, 3), "int32")
    assert preprocessor(ids) is ids and preprocessor(ids, y=labels)[1] is labels  # id batches pass through

    bare = CausalLMPreprocessor(tokenizer, sequence_length=SEQ, add_start_token=False, add_end_token=False)
    x, _, _ = bare(["Now we are engaged"])
    tokens = tokenizer.encode("Now we are engaged")[1:]  # neither BOS nor EOS
    assert x["padding_mask"].sum() == len(tokens)
    np.testing.assert_array_equal(x["token_ids"][0, : len(tokens)], tokens)

    prompts = preprocessor.generate_preprocess(TEXTS[:2], sequence_length=64)
    assert prompts["token_ids"].shape == (2, 64) and 1 not in prompts["token_ids"]
    assert preprocessor.generate_postprocess(prompts)[0] == TEXTS[0]


def _compiled(checkpoint, tp):
    lm = tp_zoo.from_preset(checkpoint, tp=tp, progress=False)
    lm.compile(optimizer=keras.optimizers.AdamW(learning_rate=3e-3), weighted_metrics=[])
    lm.preprocessor.sequence_length = SEQ
    return lm


def test_fit_and_evaluate_on_strings(checkpoint, tokenizer):
    lm = _compiled(checkpoint, tp=2)
    assert isinstance(lm.preprocessor, CausalLMPreprocessor)
    assert isinstance(lm.preprocessor, keras_hub.models.CausalLMPreprocessor)
    assert lm.preprocessor.tokenizer is lm.tokenizer
    strings = lm.fit(TEXTS, batch_size=4, epochs=2, validation_data=TEXTS[:4], verbose=0).history

    x, y, weights = by_hand(tokenizer, TEXTS, SEQ)
    by_ids = _compiled(checkpoint, tp=2)
    ids = by_ids.fit(x, y, sample_weight=weights.astype("float32"), batch_size=4, epochs=2, verbose=0,
                     validation_data=keras.tree.map_structure(lambda a: a[:4], (x, y, weights))).history
    one_device = _compiled(checkpoint, tp=1).fit(TEXTS, batch_size=4, epochs=2, verbose=0).history
    for key in ("loss", "val_loss"):
        assert_close(ids[key], strings[key], f"{key}: strings vs ids at tp=2")
    assert_close(one_device["loss"], strings["loss"], "loss: tp=1 vs tp=2")
    assert strings["loss"][1] < strings["loss"][0]

    on_strings = lm.evaluate(TEXTS, batch_size=4, verbose=0)
    assert_close(lm.evaluate(x, y, sample_weight=weights, batch_size=4, verbose=0), on_strings, "evaluate")
    print(f"\nfit on strings at tp=2: loss {strings['loss']} (ids: {ids['loss']}, tp=1: {one_device['loss']})")


def test_loss_is_the_mean_over_the_real_tokens_whatever_the_padding(checkpoint, tokenizer):
    """The same texts padded to 16 or to 128 tokens give the same loss, in
    evaluate and in fit (its loss is the one before its step): the mean
    cross-entropy over the real tokens, as torch computes it from
    transformers' logits of the same checkpoint (padding's labels ignored)."""
    texts = TEXTS[2::2][:3]
    assert max(len(tokenizer.encode(t)) + 1 for t in texts) <= SEQ + 1  # none cut at 16
    x, y, _ = by_hand(tokenizer, texts, 128)
    model = transformers.LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(x["token_ids"], dtype=torch.long),
                       attention_mask=torch.tensor(x["padding_mask"], dtype=torch.long)).logits
        expected = float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.tensor(y).flatten().long(),
                                                           ignore_index=-100))
    lm = _compiled(checkpoint, tp=2)
    for length in (SEQ, 128):
        lm.preprocessor.sequence_length = length
        assert_close(expected, lm.evaluate(texts, batch_size=len(texts), verbose=0), f"evaluate at {length}")
    assert_close(expected, lm.fit(texts, batch_size=len(texts), verbose=0).history["loss"][0], "fit at 128")
    print(f"\nloss {expected:.4f} at sequence_length {SEQ} and 128, as transformers' masked mean")


def test_generate_takes_strings_as_before(checkpoint):
    lm = tp_zoo.from_preset(checkpoint, tp=2, progress=False)
    lm.compile(sampler="greedy")
    texts = lm.generate(TEXTS[:2], max_new_tokens=4)
    prompts = lm.preprocessor.generate_preprocess(TEXTS[:2], sequence_length=64)
    assert texts == lm.preprocessor.generate_postprocess(lm.generate(prompts, max_new_tokens=4))
    assert texts[0].startswith(TEXTS[0])


def test_attached_to_a_model_built_with_a_tokenizer(checkpoint, tokenizer):
    config = json.loads((checkpoint / "config.json").read_text())
    lm = LlamaCausalLM(backbone=LlamaBackbone.from_hf_config(config, dtype="float32"), tokenizer=tokenizer)
    assert isinstance(lm.preprocessor, CausalLMPreprocessor) and lm.preprocessor.tokenizer is tokenizer
    assert lm.preprocessor.sequence_length == 128  # 1024, capped at the model's positions


def test_bad_input(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    no_tokenizer = LlamaCausalLM(backbone=LlamaBackbone.from_hf_config(config, dtype="float32"))
    assert no_tokenizer.preprocessor is None
    for entry in (no_tokenizer.fit, no_tokenizer.evaluate):
        with pytest.raises(ValueError, match=r"no tokenizer .* pass ids as a \{'token_ids', 'padding_mask'\}"):
            entry(TEXTS, batch_size=4)
    with pytest.raises(ValueError, match="fit\\(\\) got an empty list"):
        no_tokenizer.fit([], batch_size=4)

    lm = tp_zoo.from_preset(checkpoint, tp=2, dp=2, progress=False)
    with pytest.raises(ValueError, match="fit\\(\\) got an empty list"):
        lm.fit([], batch_size=4)
    with pytest.raises(ValueError, match="wrap the string in a list"):
        lm.fit(TEXTS[0])
    with pytest.raises(ValueError, match="mixing strings and other values"):
        lm.evaluate([TEXTS[0], 3])
    with pytest.raises(ValueError, match="makes its own labels"):
        lm.fit(TEXTS, np.zeros((8, SEQ), "int32"))
    with pytest.raises(ValueError, match="A batch of 3 is not divisible by dp=2"):
        lm.fit(TEXTS, batch_size=3)
    lm.preprocessor.sequence_length = 4096
    with pytest.raises(ValueError, match="sequence_length=4096 is beyond the model's 128 positions"):
        lm.fit(TEXTS, batch_size=4)


def _sentencepiece_checkpoint(directory):
    directory.mkdir()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(demo.demo_text().splitlines()), model_prefix=str(directory / "tokenizer"),
        vocab_size=200, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
    )
    return directory


@pytest.mark.parametrize("files", ["tokenizer.json", "tokenizer.model"])
def test_save_and_load(checkpoint, tmp_path, files):
    if files == "tokenizer.json":
        tokenizer = CheckpointTokenizer.from_directory(checkpoint, {"bos_token_id": 0, "eos_token_id": 1}, True)
    else:
        directory = _sentencepiece_checkpoint(tmp_path / "sp")
        tokenizer = CheckpointTokenizer.from_directory(directory, {"bos_token_id": 1, "eos_token_id": 2}, True)
    preprocessor = CausalLMPreprocessor(tokenizer, sequence_length=SEQ, add_end_token=False, name="pre")
    config = keras.saving.serialize_keras_object(preprocessor)
    json.dumps(config)  # all of it plain JSON: the tokenizer's files go with the assets
    assets = tmp_path / "assets"
    assets.mkdir()
    preprocessor.save_assets(assets)

    restored = keras.saving.deserialize_keras_object(json.loads(json.dumps(config)))
    assert type(restored) is CausalLMPreprocessor and restored.get_config() == preprocessor.get_config()
    with pytest.raises(RuntimeError, match="files have not been read yet"):
        restored(TEXTS)
    restored.load_assets(assets)
    assert_same(restored(TEXTS), preprocessor(TEXTS))
    assert restored.tokenizer.decode(restored.tokenizer.encode(TEXTS[0])) == TEXTS[0]
    again = tmp_path / "again"  # a restored tokenizer saves again, its source files long gone
    again.mkdir()
    restored.save_assets(again)
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in assets.iterdir())


def test_model_files_carry_the_tokenizer(checkpoint, tmp_path):
    lm = tp_zoo.from_preset(checkpoint, tp=2, progress=False)
    lm.preprocessor.sequence_length = SEQ
    lm.save(tmp_path / "lm.keras")
    lm.save_to_preset(tmp_path / "preset")
    with tp_zoo.distribution(tp=2).scope():
        from_keras_file = keras.saving.load_model(tmp_path / "lm.keras")
    for restored in (from_keras_file, tp_zoo.from_preset(tmp_path / "preset", tp=1)):
        assert restored.tokenizer is restored.preprocessor.tokenizer
        assert restored.preprocessor.sequence_length == SEQ
        assert_same(restored.preprocessor(TEXTS), lm.preprocessor(TEXTS))
