"""GPT-2 (Radford et al., 2019).

Learned absolute positions, LayerNorm before each block and at the end, a
GELU (tanh approximation) MLP four times as wide, biases everywhere, and an
LM head tied to the token table. The checkpoint fuses q, k, v into one
Conv1D (`c_attn`, stored input-major); the layout map splits it per head.
"""

import keras

from tp_zoo.models.backbone import DecoderBackbone
from tp_zoo.models.backbone import DecoderConfig
from tp_zoo.models.causal_lm import DecoderCausalLM
from tp_zoo.models.family import Family
from tp_zoo.models.hf_config import refuse

# Hugging Face activation names -> tp_zoo's.
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}



@keras.saving.register_keras_serializable(package="tp_zoo")
class GPT2Backbone(DecoderBackbone):
    @classmethod
    def decoder_config(cls, config):
        if config.get("scale_attn_by_inverse_layer_idx", False):
            refuse(config, "scale_attn_by_inverse_layer_idx=true")
        if not config.get("scale_attn_weights", True):
            refuse(config, "scale_attn_weights=false")
        # reorder_and_upcast_attn only computes the scores in float32, which
        # ParallelAttention always does: nothing to refuse.
        activation = config.get("activation_function", "gelu_new")
        if activation not in _ACTIVATIONS:
            refuse(config, f"activation_function={activation!r}")
        hidden = config["n_embd"]
        return DecoderConfig(
            vocab_size=config["vocab_size"],
            hidden_dim=hidden,
            num_layers=config["n_layer"],
            num_heads=config["n_head"],
            intermediate_dim=config.get("n_inner") or 4 * hidden,
            max_sequence_length=config["n_positions"],
            learned_positions=True,
            norm="layer",
            norm_epsilon=config.get("layer_norm_epsilon", 1e-5),
            activation=_ACTIVATIONS[activation],
            tie_embeddings=True,
        )


@keras.saving.register_keras_serializable(package="tp_zoo")
class GPT2CausalLM(DecoderCausalLM):
    backbone_cls = GPT2Backbone


FAMILY = Family(name="gpt2", model_types=("gpt2",), causal_lm=GPT2CausalLM, adds_bos=False, layout="gpt2").register()
