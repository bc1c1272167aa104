"""The README's fine-tuning flow, end to end through the command, on a tiny
Llama-style chat checkpoint that transformers wrote in bfloat16:

    tp-zoo finetune DIR --data chats.jsonl --lora-rank 8 ... --out run/
    tp-zoo chat run/model
"""

import io
import json
import sys

import pytest
import torch
import transformers

from tests.models import chat_templates
from tests.models import checkpoints as ckpts
from tp_zoo import cli
from tp_zoo import finetune as finetune_module

TEMPLATE = "tinyllama_zephyr"  # TinyLlama's: a Llama, and the shortest turns
# Gettysburg's sentences, their first words asked, the rest answered.
CHATS = [
    ("Four score and seven years ago", "our fathers brought forth on this continent, a new nation"),
    ("Now we are engaged", "in a great civil war"),
    ("We are met", "on a great battle-field of that war"),
    ("We have come", "to dedicate a portion of that field"),
    ("It is altogether fitting", "and proper that we should do this"),
    ("But, in a larger sense", "we can not dedicate, we can not consecrate"),
    ("The world will little note", "nor long remember what we say here"),
    ("It is for us the living", "rather, to be dedicated here to the unfinished work"),
]
STEPS = 24


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """A one-layer Llama in bfloat16 with TinyLlama's chat template, which
    transformers' tokenizer writes to chat_template.jinja, as it does now."""
    directory = tmp_path_factory.mktemp("chat_bf16")
    config = chat_templates.write_tokenizer(directory, TEMPLATE)
    transformers.AutoTokenizer.from_pretrained(str(directory)).save_pretrained(str(directory))
    assert (directory / "chat_template.jinja").exists()
    model = ckpts.build_model(ckpts.CASES["llama_gqa_llama3_rope"], max_position_embeddings=128,
                              num_hidden_layers=1, **config)
    model.to(torch.bfloat16).save_pretrained(str(directory))
    assert json.loads((directory / "config.json").read_text())["dtype"] == "bfloat16"
    return directory


def test_finetune_with_lora_then_chat_with_the_export(chat_checkpoint, tmp_path, monkeypatch, capsys):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": asked},
                                                     {"role": "assistant", "content": answered}]}) + "\n"
                            for asked, answered in CHATS))
    runs = []  # each step's loss, as finetune returns them to the command
    finetune = finetune_module.finetune
    monkeypatch.setattr(finetune_module, "finetune", lambda *a, **k: runs.append(finetune(*a, **k)) or runs[-1])
    run = tmp_path / "run"
    # One batch of every conversation each step: the loss falls step by step.
    assert cli.main(["finetune", str(chat_checkpoint), "--tp", "2", "--data", str(data), "--lora-rank", "8",
                     "--steps", str(STEPS), "--batch-size", str(len(CHATS)), "--seq-len", "64", "--lr", "1e-3",
                     "--out", str(run)]) == 0
    out = capsys.readouterr().out
    [losses] = runs
    assert len(losses) == STEPS and f"over {STEPS} steps" in out
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.05, losses

    model = run / "model"
    assert (model / "chat_template.jinja").read_text() == (chat_checkpoint / "chat_template.jinja").read_text()
    assert (run / "adapter" / "adapter_config.json").exists()
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{CHATS[1][0]}\n"))
    assert cli.main(["chat", str(model), "--max-new-tokens", "8"]) == 0
    reply = capsys.readouterr().out
    assert reply.endswith("\n") and reply.count("\n") == 1 and reply.strip(), reply
    print(f"\nbf16 LoRA fine-tuning: loss {first:.4f} (first 3 steps) -> {last:.4f} (last 3); the export "
          f"answers {CHATS[1][0]!r} with {reply.strip()!r}")
