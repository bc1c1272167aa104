"""Llama (Touvron et al., 2023) and the checkpoints that share its shape:
Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, TinyLlama, SmolLM.

RMSNorm before each block and at the end, rotary positions (with Llama 3.1's
or linear scaling), grouped-query attention, a SwiGLU MLP, no biases except
Qwen2's on q/k/v, and an LM head tied or not. Mistral adds a sliding
attention window.
"""

import keras

from tp_zoo.models.backbone import DecoderBackbone
from tp_zoo.models.backbone import DecoderConfig
from tp_zoo.models.causal_lm import DecoderCausalLM
from tp_zoo.models.family import Family
from tp_zoo.models.hf_config import refuse
from tp_zoo.models.hf_config import rope_settings


@keras.saving.register_keras_serializable(package="tp_zoo")
class LlamaBackbone(DecoderBackbone):
    @classmethod
    def decoder_config(cls, config):
        if config.get("hidden_act", "silu") != "silu":
            refuse(config, f"hidden_act={config['hidden_act']!r}")
        model_type = config.get("model_type")
        if model_type == "qwen2" and config.get("use_sliding_window", False):
            refuse(config, "use_sliding_window=true")
        qkv_bias = model_type == "qwen2" or config.get("attention_bias", False)
        sliding_window = config.get("sliding_window") if model_type == "mistral" else None
        rope_theta, rope_scaling = rope_settings(config)
        return DecoderConfig(
            vocab_size=config["vocab_size"],
            hidden_dim=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            head_dim=config.get("head_dim"),
            intermediate_dim=config["intermediate_size"],
            max_sequence_length=config.get("max_position_embeddings", 2048),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            norm="rms",
            norm_epsilon=config.get("rms_norm_eps", 1e-6),
            activation="silu",
            gated_mlp=True,
            mlp_bias=config.get("mlp_bias", False),
            qkv_bias=qkv_bias,
            output_bias=model_type != "qwen2" and config.get("attention_bias", False),
            sliding_window=sliding_window,
            tie_embeddings=config.get("tie_word_embeddings", False),
        )


@keras.saving.register_keras_serializable(package="tp_zoo")
class LlamaCausalLM(DecoderCausalLM):
    backbone_cls = LlamaBackbone


FAMILY = Family(name="llama", model_types=("llama", "mistral", "qwen2"), causal_lm=LlamaCausalLM, adds_bos=True, layout="llama").register()
