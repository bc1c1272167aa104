"""Tiny random Hugging Face checkpoints and their transformers reference logits.

Every checkpoint is built with transformers' own config and model classes,
re-initialised with weights far larger than the default init (so that a
wrongly loaded, transposed or skipped tensor shows up in the logits), written
with `save_pretrained(dir)` (safetensors), and run once by transformers in
float32 on the shared batch below: that is the independent reference.

torch / transformers are imported lazily so that test collection stays fast.
"""

import json
import os
from typing import NamedTuple

import numpy as np

BATCH, SEQ = 3, 10
# Right padding: sequence 1 has 6 real tokens, sequence 2 has 8.
REAL_LENGTHS = (10, 6, 8)


class Case(NamedTuple):
    config_class: str  # transformers' config class
    model_class: str  # and model class
    config: dict  # the config's arguments
    tp_values: tuple  # the tp values test_from_preset loads it at


CASES = {
    "opt_pre_ln": Case(
        "OPTConfig", "OPTForCausalLM",
        dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
             num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
             do_layer_norm_before=True),
        (1, 2, 4),
    ),
    "opt_post_ln_proj": Case(  # OPT-350m style: post-LN, project_in/project_out
        "OPTConfig", "OPTForCausalLM",
        dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
             num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=16,
             do_layer_norm_before=False),
        (1, 2, 3, 4),  # tp=3 pads everything: heads 4 -> 6, MLP, vocab, project_in/out
    ),
    "gpt2": Case(
        "GPT2Config", "GPT2LMHeadModel",
        dict(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64,
             bos_token_id=0, eos_token_id=0),
        (1, 2, 4),
    ),
    "llama_mha_tied": Case(
        "LlamaConfig", "LlamaForCausalLM",
        dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
             max_position_embeddings=64),
        (1, 2, 4),
    ),
    "llama_gqa_llama3_rope": Case(  # kv heads (2) < tp at 4 and 8; head_dim 8 != 32 / 8
        "LlamaConfig", "LlamaForCausalLM",
        dict(vocab_size=100, hidden_size=32, head_dim=8, intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
             tie_word_embeddings=False, max_position_embeddings=64,
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
             rope_theta=500000.0),
        (1, 2, 4, 8),
    ),
    "llama_mqa_linear_rope": Case(
        "LlamaConfig", "LlamaForCausalLM",
        dict(vocab_size=112, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
             max_position_embeddings=64, rope_scaling={"rope_type": "linear", "factor": 2.0}),
        (1, 2, 4),
    ),
    "mistral_sliding_window": Case(  # window 4 < sequence 10: the window matters
        "MistralConfig", "MistralForCausalLM",
        dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
             tie_word_embeddings=False, max_position_embeddings=64),
        (1, 2),
    ),
    "qwen2_bias_untied": Case(
        "Qwen2Config", "Qwen2ForCausalLM",
        dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
             max_position_embeddings=64),
        (1, 2, 4),
    ),
    # Head counts (and MLP widths) that some tp values do not divide: the
    # layers pad them with inert heads (units). tp=3, 5 and 2 divide them.
    "llama_9_heads_gqa3": Case(  # SmolLM2-135M's 9/3 heads: 12 at tp 2 and 4, 16 at tp 8
        "LlamaConfig", "LlamaForCausalLM",
        dict(vocab_size=100, hidden_size=36, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
             max_position_embeddings=64),
        (3, 2, 4),
    ),
    "gpt2_25_heads_ffn_100": Case(  # GPT-2 XL's 25 heads: 26, 28, 32 at tp 2, 4, 8; MLP 100 -> 104 at tp 8
        "GPT2Config", "GPT2LMHeadModel",
        dict(vocab_size=101, n_embd=50, n_layer=2, n_head=25, n_inner=100, n_positions=64,
             bos_token_id=0, eos_token_id=0),
        (5, 2, 4, 8),
    ),
    "qwen2_14_heads_gqa2": Case(  # Qwen2.5-0.5B's 14/2 heads: 16 at tp 4 and 8; gated MLP 100 -> 104 at tp 8
        "Qwen2Config", "Qwen2ForCausalLM",
        dict(vocab_size=100, hidden_size=56, intermediate_size=100, num_hidden_layers=2,
             num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=False,
             max_position_embeddings=64),
        (2, 4, 8),
    ),
}

# The cases the tests of every family run (serialization, generation,
# fine-tuning, bfloat16 fidelity): one per model type a family reads, and per
# variant its code branches on; each with the sizes the bfloat16 test widens
# it to (hidden 256, 4 layers, vocab 512: bf16 error well above noise).
# tests/models/test_family_registry.py checks every registered model type has one.
FAMILY_CASES = {
    "opt_pre_ln": dict(hidden_size=256, ffn_dim=1024, num_hidden_layers=4, word_embed_proj_dim=256,
                       vocab_size=512),
    "opt_post_ln_proj": dict(hidden_size=256, ffn_dim=1024, num_hidden_layers=4, word_embed_proj_dim=128,
                             vocab_size=512),
    "gpt2": dict(n_embd=256, n_layer=4, vocab_size=512),
    "llama_gqa_llama3_rope": dict(hidden_size=256, head_dim=32, intermediate_size=512, num_hidden_layers=4,
                                  vocab_size=512),
    "mistral_sliding_window": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, vocab_size=512),
    "qwen2_bias_untied": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, vocab_size=512),
}


def model_type(name):
    """The config.json model_type of case `name` (its transformers config class's)."""
    import transformers

    return getattr(transformers, CASES[name].config_class).model_type


def batch(vocab_size):
    """(ids, mask) int32 of shape (3, 10); padded positions hold id 0."""
    rs = np.random.RandomState(0)
    ids = rs.randint(0, vocab_size, (BATCH, SEQ)).astype("int32")
    mask = np.zeros((BATCH, SEQ), "int32")
    for row, n in enumerate(REAL_LENGTHS):
        mask[row, :n] = 1
    ids = ids * mask
    return ids, mask


def build_model(spec, **overrides):
    """A transformers model of `spec` with large random float32 weights, in eval mode."""
    import torch
    import transformers

    config_cls, model_cls, kwargs, *_ = spec
    config = getattr(transformers, config_cls)(**{**kwargs, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)._from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    randomize(model)
    model.eval()
    return model


def randomize(model, seed=0):
    """Norm scales ~ 1 + 0.1 N(0,1); every other tensor (biases included, which
    default to zero) ~ 0.1 N(0,1). Tied tensors are set once."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
            is_norm_scale = p.ndim == 1 and name.endswith("weight") and (
                "norm" in name or "ln_" in name
            )
            p.copy_(1.0 + noise if is_norm_scale else noise)


def reference_logits(model, ids, mask):
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
        )
    return out.logits.float().numpy()


def save(model, directory):
    model.save_pretrained(str(directory))
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)


def rope_type_of(config_json):
    """The rope type a saved config.json declares, old or new key style."""
    params = config_json.get("rope_parameters") or config_json.get("rope_scaling") or {}
    return params.get("rope_type", params.get("type", "default"))
