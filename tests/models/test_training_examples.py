"""Instruction fine-tuning against transformers.

A conversation's ids are those of transformers' apply_chat_template, and
its trained tokens are exactly each assistant reply through its end-of-turn
token (located in the text with transformers' own offsets), for six real
templates. The loss of a batch of conversations and prompt/completion pairs
equals a masked cross-entropy computed by hand from the transformers
model's logits (the mean over trained tokens, as transformers takes it
with -100 labels), through `lm.test_on_batch` at tp 1/2/4 and through
`tp_zoo.finetune` (padded and packed); three AdamW steps give the same
losses at tp 1/2/4.
"""

import json

import keras
import numpy as np
import pytest
import torch
import transformers

import tp_zoo
from tests.helpers import assert_close
from tests.models import chat_templates
from tests.models import checkpoints as ckpts
from tp_zoo.errors import ChatTemplateError
from tp_zoo.errors import DataFileError
from tp_zoo.finetune import finetune
from tp_zoo.finetune import read_examples
from tp_zoo.models.tokenizer import CheckpointTokenizer
from tp_zoo.models.training_examples import encode_example

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
CONVERSATION = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Who are you — really?"},
    {"role": "assistant", "content": "A small model."},
]
EXAMPLES = [
    {"messages": [SYSTEM] + CONVERSATION},
    {"messages": CONVERSATION[:2]},
    {"prompt": "Four score and seven", "completion": " years ago our fathers"},
    {"prompt": [SYSTEM] + CONVERSATION[:3], "completion": CONVERSATION[3:]},
]


def _messages_and_trained(example):
    """(messages, the assistant replies trained) of a conversational example."""
    if "messages" in example:
        messages, first = example["messages"], 0
    else:
        messages, first = example["prompt"] + example["completion"], len(example["prompt"])
    return messages, [m["content"] for m in messages[first:] if m["role"] == "assistant"]


def _reference(reference, name, example):
    """(ids, trained) built with transformers alone: apply_chat_template's ids
    and the tokens whose transformers offsets start inside the text the
    template writes for each trained reply (found in order in the rendered
    text); or, for a prompt and completion, BOS (where the checkpoint names
    one), their joined text's ids and the config's EOS, the completion's
    tokens and the EOS trained."""
    if isinstance(example.get("prompt"), str):
        text = example["prompt"] + example["completion"]
        encoding = reference(text, add_special_tokens=False, return_offsets_mapping=True)
        bos = [] if reference.bos_token is None else [reference.bos_token_id]
        eos = reference.convert_tokens_to_ids(chat_templates.TEMPLATES[name][3])
        ids = bos + encoding["input_ids"] + [eos]
        starts = np.array([-1] * len(bos) + [s for s, _ in encoding["offset_mapping"]] + [len(text)])
        return np.array(ids), starts >= len(example["prompt"])
    messages, replies = _messages_and_trained(example)
    text = reference.apply_chat_template(messages, tokenize=False)
    encoding = reference(text, add_special_tokens=False, return_offsets_mapping=True)
    assert encoding["input_ids"] == reference.apply_chat_template(messages, return_dict=False)
    starts = np.array([s for s, _ in encoding["offset_mapping"]])
    trained = np.zeros(len(starts), bool)
    every_reply = [m["content"] for m in messages if m["role"] == "assistant"]
    at = 0
    for index, reply in enumerate(every_reply):
        written = chat_templates.REPLIES[name].format(reply)
        start = text.index(written, at)
        at = start + len(written)
        if index >= len(every_reply) - len(replies):
            trained |= (starts >= start) & (starts < at)
    return np.array(encoding["input_ids"]), trained


@pytest.fixture(scope="module", params=list(chat_templates.TEMPLATES))
def tokenizers(request, tmp_path_factory):
    """(template name, our tokenizer, transformers' tokenizer) on the same files."""
    directory = tmp_path_factory.mktemp(request.param)
    config = chat_templates.write_tokenizer(directory, request.param)
    ours = CheckpointTokenizer.from_directory(directory, config, adds_bos=True)
    return request.param, ours, transformers.AutoTokenizer.from_pretrained(str(directory))


def test_trained_tokens_are_the_replies_through_their_end_of_turn(tokenizers):
    name, ours, reference = tokenizers
    compared = 0
    for example in EXAMPLES:
        conversational = not isinstance(example.get("prompt"), str)
        if name == "mistral_v0.3" and conversational and SYSTEM in _messages_and_trained(example)[0]:
            continue  # its template moves the system message into the last user turn (see test_chat)
        ids, trained = encode_example(ours, example)
        ref_ids, ref_trained = _reference(reference, name, example)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(trained, ref_trained)
        assert trained.any() and not trained.all()
        compared += 1
    print(f"\n{name}: {compared} examples, ids and trained tokens identical to the transformers reference")


def test_messages_of_a_base_checkpoint_without_a_template_are_refused(tmp_path):
    config = chat_templates.write_tokenizer(tmp_path, "llama3.1")
    settings = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del settings["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    tokenizer = CheckpointTokenizer.from_directory(tmp_path, config, adds_bos=True)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        encode_example(tokenizer, EXAMPLES[0])
    ids, trained = encode_example(tokenizer, EXAMPLES[2])  # a prompt and completion needs none
    assert trained.sum() == len(ids) - trained.argmax()


# --- the loss ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """(directory, transformers model, its tokenizer): a one-layer Llama with
    the Llama 3.1 template."""
    directory = tmp_path_factory.mktemp("chat_llama")
    config = chat_templates.write_tokenizer(directory, "llama3.1")
    model = ckpts.build_model(ckpts.CASES["llama_gqa_llama3_rope"], max_position_embeddings=256,
                              num_hidden_layers=1, **config)
    ckpts.save(model, directory)
    return directory, model, transformers.AutoTokenizer.from_pretrained(str(directory))


def _masked_mean_loss(model, rows):
    """The mean, over every trained token of `rows` ((ids, trained) pairs),
    of the cross-entropy of predicting it, from the transformers model."""
    total, count = 0.0, 0
    for ids, trained in rows:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(ids[None, :-1])).logits[0].double()
        losses = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").numpy()
        total += losses[trained[1:]].sum()
        count += trained[1:].sum()
    return total / count


def _reference_rows(reference, examples):
    return [_reference(reference, "llama3.1", example) for example in examples]


@pytest.fixture(scope="module")
def reference_loss(chat_checkpoint):
    _, model, reference = chat_checkpoint
    return _masked_mean_loss(model, _reference_rows(reference, EXAMPLES))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_loss_of_examples_is_the_masked_mean_by_hand(chat_checkpoint, reference_loss, tp):
    lm = tp_zoo.from_preset(chat_checkpoint[0], tp=tp, dtype="float32", progress=False)
    lm.compile()
    lm.preprocessor.sequence_length = 192
    loss, accuracy = lm.test_on_batch(EXAMPLES)
    assert_close(reference_loss, loss, f"masked loss at tp={tp}")
    assert 0 <= accuracy <= 1


def test_three_adamw_steps_match_across_tp(chat_checkpoint):
    curves = {}
    for tp in (1, 2, 4):
        lm = tp_zoo.from_preset(chat_checkpoint[0], tp=tp, dtype="float32", progress=False)
        lm.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-3), weighted_metrics=[])
        lm.preprocessor.sequence_length = 192
        curves[tp] = [float(lm.train_on_batch(EXAMPLES)) for _ in range(3)]
    for tp in (2, 4):
        for step, (ref, got) in enumerate(zip(curves[1], curves[tp])):
            assert_close(ref, got, f"loss at step {step}, tp={tp}")
    assert curves[1][2] < curves[1][0]


def _write_jsonl(path, examples):
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return path


@pytest.mark.parametrize("packing", [False, True])
def test_finetune_first_loss_is_the_masked_mean_by_hand(chat_checkpoint, tmp_path, packing):
    directory, model, reference = chat_checkpoint
    data = _write_jsonl(tmp_path / "chats.jsonl", EXAMPLES)
    rows = _reference_rows(reference, EXAMPLES)
    if packing:
        seq_len = 16
        ids, trained = np.concatenate([i for i, _ in rows]), np.concatenate([t for _, t in rows])
        rows = [(ids[s : s + seq_len + 1], trained[s : s + seq_len + 1]) for s in range(0, len(ids) - seq_len, seq_len)]
    else:
        seq_len = 192
    lm = tp_zoo.from_preset(directory, tp=2, dtype="float32", progress=False)
    # One step over every row: its loss is the mean over all trained tokens.
    losses = finetune(lm, data, steps=1, batch_size=len(rows), seq_len=seq_len, lr=1e-3, packing=packing,
                      progress=False)
    assert_close(_masked_mean_loss(model, rows), losses[0], f"first finetune loss, packing={packing}")


@pytest.mark.parametrize(
    "lines,match",
    [
        ([{"messages": CONVERSATION}, {"question": "?"}], r"chats.jsonl:2 has the keys \['question'\]"),
        ([{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}],
         r"chats.jsonl:1: Message 1 has the unknown role 'bot'"),
        ([{"messages": CONVERSATION[:1]}], r"chats.jsonl:1 has no assistant message"),
        ([{"prompt": "a", "completion": [CONVERSATION[1]]}], r"chats.jsonl:1 needs a 'prompt' and a 'completion'"),
        ([[CONVERSATION]], r"chats.jsonl:1: a list, not a JSON object"),
    ],
)
def test_bad_lines_are_named_before_any_loading(tmp_path, lines, match):
    with pytest.raises(DataFileError, match=match):
        read_examples(_write_jsonl(tmp_path / "chats.jsonl", lines))


def test_an_example_longer_than_a_row_is_refused_before_training(chat_checkpoint, tmp_path):
    data = _write_jsonl(tmp_path / "chats.jsonl", EXAMPLES)
    lm = tp_zoo.from_preset(chat_checkpoint[0], tp=2, dtype="float32", progress=False)
    with pytest.raises(ValueError, match=r"chats.jsonl:1 is \d+ tokens, more than sequence_length \+ 1 = 17"):
        finetune(lm, data, steps=1, batch_size=2, seq_len=16, packing=False, out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_fit_on_examples_refuses_what_it_cannot_train(chat_checkpoint):
    lm = tp_zoo.from_preset(chat_checkpoint[0], tp=2, dtype="float32", progress=False)
    lm.compile()
    with pytest.raises(ValueError, match=r"Example 0 is a message; a conversation to train on is \{'messages'"):
        lm.fit(CONVERSATION)
    lm.compile(loss=tp_zoo.losses.VocabParallelCrossEntropy())
    with pytest.raises(ValueError, match=r"Labels of -100 mark tokens to skip"):
        lm.train_on_batch(EXAMPLES[:2])
