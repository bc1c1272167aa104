"""Chat templates against transformers' apply_chat_template, chat generation
against transformers' generate on the ids it renders, streaming against
generate(), and the chat command.

Six real templates (tests/models/chat_templates.py: Llama 3.1, Llama 3.2,
Qwen2.5, SmolLM2, Mistral v0.3, TinyLlama's Zephyr) are written with their
special tokens into tokenizer_config.json beside a small BPE tokenizer.json;
transformers' AutoTokenizer reads the same files.
"""

import io
import json
import re
import shutil
import sys

import numpy as np
import pytest
import torch
import transformers

import tp_zoo
from tests.models import chat_templates
from tests.models import checkpoints as ckpts
from tp_zoo import cli
from tp_zoo.errors import ChatTemplateError
from tp_zoo.models import generation
from tp_zoo.models.generation import programs
from tp_zoo.models.generation.streaming import IncrementalText
from tp_zoo.models.chat_template import ChatTemplate
from tp_zoo.models.chat_template import assistant_spans
from tp_zoo.models.tokenizer import CheckpointTokenizer

SYSTEM = {"role": "system", "content": "  You are a terse assistant.  "}
CONVERSATIONS = {
    "one user message": [{"role": "user", "content": "Hello there, café ✓?"}],
    "system prompt": [SYSTEM, {"role": "user", "content": "Now we are engaged in a great civil war."}],
    "multi-turn": [
        SYSTEM,
        {"role": "user", "content": "Four score and seven years ago"},
        {"role": "assistant", "content": " our fathers brought forth, on this continent, a new nation "},
        {"role": "user", "content": "Go on — über alles?"},
    ],
    "ends with the assistant": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "A small model."},
    ],
}


@pytest.fixture(scope="module", params=list(chat_templates.TEMPLATES))
def tokenizer_files(request, tmp_path_factory):
    """(template name, directory with its tokenizer files, config.json ids)."""
    directory = tmp_path_factory.mktemp(request.param)
    return request.param, directory, chat_templates.write_tokenizer(directory, request.param)


def _ours(directory, config):
    return ChatTemplate(CheckpointTokenizer.from_directory(directory, config, adds_bos=True))


def test_template_gives_transformers_ids(tokenizer_files):
    """Every conversation, with and without the generation prompt: the same
    text and the same ids as transformers' apply_chat_template."""
    name, directory, config = tokenizer_files
    ours = _ours(directory, config)
    reference = transformers.AutoTokenizer.from_pretrained(str(directory))
    compared = 0
    for conversation in CONVERSATIONS.values():
        for add_generation_prompt in (False, True):
            text = reference.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                 tokenize=False)
            ids = reference.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                return_dict=False)
            assert ours.render(conversation, add_generation_prompt=add_generation_prompt) == text
            assert ours.encode(conversation, add_generation_prompt=add_generation_prompt) == ids
            compared += 1
    print(f"\n{name}: {compared} renderings, text and ids identical to transformers")


def test_template_special_tokens_and_stops(tokenizer_files):
    name, directory, config = tokenizer_files
    ours = _ours(directory, config)
    _, _, named, eos, stop_tokens, _ = chat_templates.TEMPLATES[name]
    assert ours.tokenizer.special_tokens == named
    # config.json's EOS first, then generation_config.json's and the tokenizer's.
    expected = list(dict.fromkeys([eos, *(stop_tokens or []), named["eos_token"]]))
    assert list(ours.end_of_turn) == expected
    assert [ours.tokenizer.token(i) for i in ours.tokenizer.eos_ids] == expected


def test_assistant_spans_cover_each_reply_and_its_end_of_turn(tokenizer_files):
    name, directory, config = tokenizer_files
    ours = _ours(directory, config)
    conversations = [CONVERSATIONS["ends with the assistant"]]
    if name != "mistral_v0.3":  # its system message moves into the last user turn (below)
        conversations.append([SYSTEM] + CONVERSATIONS["ends with the assistant"])
    fast = transformers.AutoTokenizer.from_pretrained(str(directory))._tokenizer
    for conversation in conversations:
        text, spans = assistant_spans(ours, conversation)
        assert text == ours.render(conversation)
        replies = [m["content"].strip() for m in conversation if m["role"] == "assistant"]
        assert [text[start:end] for start, end in spans] == [chat_templates.REPLIES[name].format(r) for r in replies]
        # Each span begins and ends on token boundaries, so a token mask from
        # the encoding's offsets covers it exactly.
        offsets = fast.encode(text, add_special_tokens=False).offsets
        starts, ends = {s for s, _ in offsets}, {e for _, e in offsets}
        assert all(start in starts and end in ends for start, end in spans)
    if name == "mistral_v0.3":
        with pytest.raises(ChatTemplateError, match="before message 2 .* differently once later messages follow"):
            assistant_spans(ours, [SYSTEM] + CONVERSATIONS["ends with the assistant"])


# --- generation -------------------------------------------------------------------
NEW = 24  # new tokens: more than one streamed call (16 steps)


def _transformers_generate(model, ids, new, **options):
    """transformers' greedy continuation of one prompt (its new ids)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                             max_new_tokens=new, do_sample=False, pad_token_id=0, **options)
    return out[0, len(ids):].numpy()


def _chat_checkpoint(directory, name):
    """A tiny Llama with template `name`'s tokenizer, its LM head made to end
    the reply to CONVERSATIONS["system prompt"] with the template's
    end-of-turn token after a few tokens. Returns the transformers model."""
    config = chat_templates.write_tokenizer(directory, name)
    generation_config = directory / "generation_config.json"
    written = generation_config.read_bytes() if generation_config.exists() else None
    # One layer: these tests compile several programs, each faster so.
    model = ckpts.build_model(ckpts.CASES["llama_gqa_llama3_rope"], max_position_embeddings=256, num_hidden_layers=1,
                              **config)
    reference = transformers.AutoTokenizer.from_pretrained(str(directory))
    ids = reference.apply_chat_template(CONVERSATIONS["system prompt"], add_generation_prompt=True,
                                        return_dict=False)
    eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None
    free = _transformers_generate(model, ids, 6).tolist()
    model.generation_config.eos_token_id = eos
    # The first token that the model had not written before: the end of turn wins there.
    step = next(i for i in range(2, 6) if free[i] not in free[:i])
    end_of_turn = reference.convert_tokens_to_ids(chat_templates.TEMPLATES[name][2]["eos_token"])
    with torch.no_grad():
        model.lm_head.weight[end_of_turn] = 1.001 * model.lm_head.weight[free[step]]
    ckpts.save(model, directory)
    # save_pretrained wrote a generation_config.json of its own.
    if written is None:
        generation_config.unlink()
    else:
        generation_config.write_bytes(written)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (directory, transformers model, its stop ids), each written on
    first use: "llama3.1" (a byte-level tokenizer; generation_config.json
    lists <|eot_id|>) and "tinyllama_zephyr" (sentencepiece-style, </s>)."""
    written = {}

    def get(name):
        if name not in written:
            directory = tmp_path_factory.mktemp(name)
            model = _chat_checkpoint(directory, name)
            reference = transformers.AutoTokenizer.from_pretrained(str(directory))
            _, _, named, eos, stop_tokens, _ = chat_templates.TEMPLATES[name]
            stops = reference.convert_tokens_to_ids(list(dict.fromkeys([eos, *(stop_tokens or []),
                                                                        named["eos_token"]])))
            written[name] = directory, model, stops
        return written[name]

    return get


@pytest.fixture(scope="module")
def models(checkpoints):
    """(name, tp) -> its greedy tp_zoo model, loaded on first use, so that the
    tests share its compiled programs."""
    loaded = {}

    def get(name, tp):
        if (name, tp) not in loaded:
            lm = tp_zoo.from_preset(checkpoints(name)[0], tp=tp, dtype="float32", progress=False)
            lm.compile(sampler="greedy")
            loaded[name, tp] = lm
        return loaded[name, tp]

    return get


REPLYING = [CONVERSATIONS["system prompt"], CONVERSATIONS["multi-turn"]]


def test_chat_reply_is_transformers_greedy_reply(checkpoints, models):
    """The reply's ids are transformers' greedy generate() on the ids its
    apply_chat_template renders, stopped by the same end-of-turn token, for
    each conversation of a batch."""
    directory, model, stops = checkpoints("llama3.1")
    reference = transformers.AutoTokenizer.from_pretrained(str(directory))
    expected = []
    for conversation in REPLYING:
        ids = reference.apply_chat_template(conversation, add_generation_prompt=True, return_dict=False)
        expected.append(_transformers_generate(model, ids, NEW, eos_token_id=stops))
    assert expected[0][-1] in stops and len(expected[0]) < NEW  # the reply ended with its end-of-turn token
    lm = models("llama3.1", 2)
    streamed = [np.concatenate(row) for row in zip(*generation.stream_ids(lm, REPLYING, max_new_tokens=NEW))]
    replies = lm.generate(REPLYING, max_new_tokens=NEW)
    for row, (ids, reply) in enumerate(zip(expected, replies)):
        np.testing.assert_array_equal(streamed[row], ids)
        assert reply == lm.tokenizer.decode(ids[:-1] if ids[-1] in stops else ids)
    print(f"\nreplies of {[len(e) for e in expected]} tokens (end of turn included) identical to transformers")


# With the sentencepiece-style checkpoint, the first reply ends after a few
# tokens, the second runs to its budget: a ragged batch over two streamed calls.
STREAMED = [CONVERSATIONS["system prompt"], CONVERSATIONS["ends with the assistant"]]


@pytest.mark.parametrize("tp", [1, 2])
def test_streaming_equals_generate(models, tp, monkeypatch):
    """Streamed ids of a batch of conversations are generate()'s, with up to
    16 decode steps per compiled call. (Streamed text: below, and the chat
    command's replies.)"""
    lm = models("tinyllama_zephyr", tp)
    calls = []
    program = programs.program
    monkeypatch.setattr(programs, "program", lambda lm, name="whole": calls.append(name) or program(lm, name))
    chunks = list(generation.stream_ids(lm, STREAMED, max_new_tokens=NEW))
    streamed = [np.concatenate(row) for row in zip(*chunks)]
    assert len(streamed[0]) < NEW and streamed[0][-1] in lm.tokenizer.eos_ids and len(streamed[1]) == NEW
    # The prefill and first tokens, then 16 steps a call (23 steps: 2 calls),
    # and one call dispatched ahead that finds every row done.
    assert calls == ["stream start"] + ["stream steps"] * 3 and len(chunks) == 3

    template = ChatTemplate(lm.tokenizer)
    prompts = [template.encode(c, add_generation_prompt=True) for c in STREAMED]
    width = max(map(len, prompts))
    batch = {"token_ids": np.zeros((2, width), "int32"), "padding_mask": np.zeros((2, width), bool)}
    for row, prompt in enumerate(prompts):
        batch["token_ids"][row, : len(prompt)], batch["padding_mask"][row, : len(prompt)] = prompt, True
    whole = lm.generate(batch, max_new_tokens=NEW, strip_prompt=True)
    for row, ids in enumerate(streamed):
        np.testing.assert_array_equal(whole["token_ids"][row][whole["padding_mask"][row]], ids)
    print(f"\ntp={tp}: streamed ids ({list(map(len, streamed))} tokens) identical to generate()'s")


def test_streaming_a_string_prompt(models):
    """A string prompt's streamed text continues its decoded text exactly as
    generate() writes it (with a sentencepiece-style tokenizer, whose first
    new token may carry a leading space), with a seeded sampler drawing the
    same tokens."""
    import keras_hub

    lm = models("tinyllama_zephyr", 2)
    prompt = "Four score and seven years ago"
    lm.compile(sampler=keras_hub.samplers.TopKSampler(k=8, seed=7))
    pieces = list(lm.generate(prompt, max_new_tokens=NEW, stop_token_ids=None, stream=True))
    lm.compile(sampler=keras_hub.samplers.TopKSampler(k=8, seed=7))
    whole = lm.generate(prompt, max_new_tokens=NEW, stop_token_ids=None)
    lm.compile(sampler="greedy")
    assert lm.tokenizer.decode(lm.tokenizer.encode(prompt)) + "".join(pieces) == whole and len(pieces) > 1


def test_streamed_text_holds_back_split_characters(tmp_path):
    """Multi-byte characters split over byte-level tokens show whole: fed one
    token at a time, no piece holds a half character and the pieces join to
    the decoded text."""
    chat_templates.write_tokenizer(tmp_path, "qwen2.5")
    tokenizer = CheckpointTokenizer.from_directory(tmp_path, {}, adds_bos=False)
    text = "Ünïcödé ✓ — naïve café ✓✓"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # characters split over tokens
    stream = IncrementalText(tokenizer.decode)
    pieces = [stream.add([i]) for i in ids] + [stream.add((), final=True)]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def _loaded_by_the_command(monkeypatch):
    """The models tp-zoo loads, as it loads them (to reuse their compiled programs)."""
    loaded = []
    from_preset = tp_zoo.from_preset
    monkeypatch.setattr(tp_zoo, "from_preset", lambda *a, **k: loaded.append(from_preset(*a, **k)) or loaded[-1])
    return loaded


def test_chat_command_with_piped_input(checkpoints, monkeypatch, capsys):
    directory, _, _ = checkpoints("llama3.1")
    loaded = _loaded_by_the_command(monkeypatch)
    # A message too long for the model's positions is refused, and the conversation goes on without it.
    too_long = "four score " * 300
    lines = f"Hello there!\n{too_long}\nAnd then?\n/reset\nHello there!\n/exit\nnot read\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    capsys.readouterr()  # the checkpoint's writing
    assert cli.main(["chat", str(directory), "--tp", "2", "--max-new-tokens", "8", "--system", "Be brief."]) == 0
    [lm] = loaded
    system, first = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}
    reply = lm.generate([system, first], max_new_tokens=8)
    follow_up = lm.generate([system, first, {"role": "assistant", "content": reply},
                             {"role": "user", "content": "And then?"}], max_new_tokens=8)
    # stdout holds the streamed replies alone, and they are generate()'s.
    out, err = capsys.readouterr()
    assert out == f"{reply}\n{follow_up}\n{reply}\n"
    length = len(ChatTemplate(lm.tokenizer).encode([system, {"role": "user", "content": too_long}],
                                                   add_generation_prompt=True))
    assert err.splitlines()[1:] == [
        f"tp-zoo: error: The message is {length} tokens as the chat template renders it with the system message: "
        "with a reply of 8 tokens, beyond the model's 256 positions; send a shorter one.",
        "(conversation cleared)",
    ]


# User lines of which one fits the chat checkpoint's 256 positions with the
# system message and a reply of 8 tokens, two do not (checked below).
LONG_LINES = ["four score and seven years ago " * 4, "our fathers brought forth upon this continent " * 3,
              "a new nation, conceived in liberty and dedicated " * 3]


def test_chat_command_drops_the_oldest_turns_beyond_the_positions(checkpoints, models, monkeypatch, capsys):
    """Once the conversation and a reply outgrow the model's positions, each
    line is answered with the oldest turns dropped (the system message
    kept), which is said once; a line beyond the positions alone is refused
    and the conversation goes on. --temperature 0 is greedy, a seed or not."""
    directory, _, _ = checkpoints("llama3.1")
    lm = models("llama3.1", 2)  # greedy
    template = ChatTemplate(lm.tokenizer)
    system = {"role": "system", "content": "Be brief."}
    user = [{"role": "user", "content": line} for line in LONG_LINES]
    reply = [lm.generate([system, u], max_new_tokens=8) for u in user]
    for before, after in [(0, 1), (1, 2)]:
        assert len(template.encode([system, user[before]], add_generation_prompt=True)) + 8 <= 256  # one fits,
        answered = [system, user[before], {"role": "assistant", "content": reply[before]}, user[after]]
        assert len(template.encode(answered, add_generation_prompt=True)) + 8 > 256  # two do not
    lines = "".join(f"{line}\n" for line in [*LONG_LINES[:2], "four score " * 300, LONG_LINES[2]])
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    capsys.readouterr()  # the checkpoint's writing
    assert cli.main(["chat", str(directory), "--tp", "2", "--max-new-tokens", "8", "--system", "Be brief.",
                     "--temperature", "0", "--seed", "5"]) == 0
    out, err = capsys.readouterr()
    assert out == "".join(f"{r}\n" for r in reply) and all(reply)
    notice, refusal = err.splitlines()[1:]
    assert notice == ("(the conversation has outgrown the model's 256 positions: its oldest turns are dropped from "
                      "now on; /reset starts afresh)")
    assert refusal.startswith("tp-zoo: error: The message is ") and "beyond the model's 256 positions" in refusal


def test_generate_command_streams(checkpoints, models, monkeypatch, capsys):
    """stdout holds the prompt's text and its continuation alone, the status
    lines go to stderr, and the count of new tokens is that of the ids made
    (not of the text encoded again: 9 with this byte-level tokenizer);
    --temperature 0 is greedy whatever --top-k, --top-p and --seed."""
    directory, _, _ = checkpoints("llama3.1")
    lm = models("llama3.1", 1)  # greedy
    pieces = lm.generate("Four score", max_new_tokens=5, stream=True)
    text = lm.tokenizer.decode(lm.tokenizer.encode("Four score")) + "".join(pieces)
    assert len(pieces.new_ids) == 5 and not set(pieces.new_ids.tolist()) & set(lm.tokenizer.eos_ids)  # no stop
    assert len(lm.tokenizer.encode(text)) - len(lm.tokenizer.encode("Four score")) == 9  # the old count
    capsys.readouterr()  # the checkpoint's writing
    greedy_ways = [[], ["--temperature", "0", "--top-k", "4", "--seed", "3"], ["--temperature", "0", "--top-p", "0.5"]]
    for sampling in greedy_ways:
        assert cli.main(["generate", str(directory), "--prompt", "Four score", "--max-new-tokens", "5",
                         *sampling]) == 0
        out, err = capsys.readouterr()
        assert out == text + "\n"
        assert re.fullmatch(r"loaded in [\d.]+ s on 1 device\(s\)\n5 new tokens in [\d.]+ s = [\d.]+ tokens/s "
                            r"\(this first call includes compiling the decode loop\)\n", err), err


def test_a_saved_tokenizer_keeps_its_chat_template_and_stops(checkpoints, tmp_path):
    """What a .keras file or preset carries of the tokenizer (its files and
    config) gives back the template, the special tokens and every stop
    token, generation_config.json's too (that file is not carried)."""
    directory, _, stops = checkpoints("llama3.1")
    tokenizer = CheckpointTokenizer.from_directory(directory, json.loads((directory / "config.json").read_text()),
                                                   adds_bos=True)
    tokenizer.write_files(tmp_path)
    restored = CheckpointTokenizer.from_config(tokenizer.get_config())
    restored.read_files(tmp_path)
    assert list(restored.eos_ids) == list(tokenizer.eos_ids) == list(stops)
    assert restored.chat_template == tokenizer.chat_template == chat_templates.LLAMA_3_1
    assert restored.special_tokens == tokenizer.special_tokens


# --- bad input ----------------------------------------------------------------------
USER = {"role": "user", "content": "Hi"}


@pytest.mark.parametrize(
    "inputs,kwargs,match",
    [
        ([USER, {"role": "wizard", "content": "x"}], {},
         "Message 1 has the unknown role 'wizard'; roles are system, user, assistant, tool"),
        ([USER, {"content": "x"}], {}, "Message 1 has no 'role' key"),
        ([USER, {"role": "user"}], {}, "Message 1 has no 'content' key"),
        ([[USER], [USER, "Hi"]], {}, "Message 1 of conversation 1 is a str"),
        ([[USER], []], {}, "Conversation 1 is empty"),
        ([USER, {"role": "user", "content": None}], {}, "Message 1 has content of type NoneType"),
        ([{"role": "user", "content": "four score " * 300}], {},
         r"Conversation 0 is \d+ tokens long as the chat template renders it, which leaves no room for a reply "
         r"within the model's 256 positions"),
        ([{"role": "user", "content": "four score " * 100}], {"max_new_tokens": 200},
         r"A conversation of \d+ tokens \+ max_new_tokens=200 is beyond the model's 256 positions"),
        ([[USER], [USER]], {"stream": True}, "stream=True takes one prompt"),
        ("Hi", {"chat_template": "{{ messages }}"}, "chat_template= applies to conversations"),
        ([USER], {"chat_template": "{% for m in messages %}{{ m.content }"},
         r"The chat template does not compile: .* \(line 1\)"),
        ([USER], {"chat_template": "{{ raise_exception('Only alternating roles, please') }}"},
         "The chat template refused the conversation: Only alternating roles, please"),
        ([USER], {"chat_template": "{{ messages[0].content + 1 }}"},
         "The chat template failed on the conversation: TypeError"),
    ],
)
def test_bad_chat_input_is_a_clear_error(models, inputs, kwargs, match):
    lm = models("llama3.1", 1)
    with pytest.raises(ValueError, match=match) as error:
        lm.generate(inputs, **kwargs)
    assert "\n" not in str(error.value)


def test_a_checkpoint_without_a_chat_template_says_how_to_pass_one(checkpoints, tmp_path):
    directory, _, _ = checkpoints("llama3.1")
    shutil.copytree(directory, tmp_path / "plain")
    settings = json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())
    del settings["chat_template"]
    (tmp_path / "plain" / "tokenizer_config.json").write_text(json.dumps(settings))
    lm = tp_zoo.from_preset(tmp_path / "plain", dtype="float32", progress=False)
    lm.compile(sampler="greedy")
    with pytest.raises(ChatTemplateError, match="has no chat template .* pass one as chat_template="):
        lm.generate([USER])
    assert isinstance(lm.generate([USER], chat_template=chat_templates.SMOLLM2, max_new_tokens=4), str)
    # The chat command says so before reading any input.
    assert cli.main(["chat", str(tmp_path / "plain")]) == 2


def test_a_tokenizer_that_cannot_read_special_tokens_is_refused(tmp_path):
    import sentencepiece

    from tp_zoo.demo import demo_text

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(demo_text().splitlines()), model_prefix=str(tmp_path / "tokenizer"),
        vocab_size=200, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": chat_templates.ZEPHYR}))
    template = ChatTemplate(CheckpointTokenizer.from_directory(tmp_path, {"eos_token_id": 2}, adds_bos=True))
    with pytest.raises(ChatTemplateError, match="Chat needs the checkpoint's tokenizer.json"):
        template.encode([USER])
