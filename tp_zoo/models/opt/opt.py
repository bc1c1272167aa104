"""OPT (Zhang et al., 2022): a GPT-3-style decoder.

Learned absolute positions (the checkpoint's table starts at row 2),
LayerNorm before each block, or after it in the post-norm variant
(`do_layer_norm_before=False`, OPT-350m), a ReLU MLP, biases everywhere,
and an LM head tied to the token table. When `word_embed_proj_dim` differs
from `hidden_size`, the tokens live in the narrower width and
`project_in` / `project_out` bridge it.
"""

import keras

from tp_zoo.models.backbone import DecoderBackbone
from tp_zoo.models.backbone import DecoderConfig
from tp_zoo.models.causal_lm import DecoderCausalLM
from tp_zoo.models.family import Family
from tp_zoo.models.hf_config import refuse


@keras.saving.register_keras_serializable(package="tp_zoo")
class OPTBackbone(DecoderBackbone):
    @classmethod
    def decoder_config(cls, config):
        if config.get("activation_function", "relu") not in ("relu", "gelu"):
            refuse(config, f"activation_function={config['activation_function']!r}")
        if not config.get("layer_norm_elementwise_affine", True):
            refuse(config, "layer_norm_elementwise_affine=false")
        hidden = config["hidden_size"]
        pre_norm = config.get("do_layer_norm_before", True)
        bias = config.get("enable_bias", True)
        return DecoderConfig(
            vocab_size=config["vocab_size"],
            hidden_dim=hidden,
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            intermediate_dim=config["ffn_dim"],
            embedding_dim=config.get("word_embed_proj_dim") or hidden,
            max_sequence_length=config["max_position_embeddings"],
            learned_positions=True,
            position_offset=2,  # OPT's position table starts at row 2
            norm="layer",
            norm_epsilon=1e-5,
            pre_norm=pre_norm,
            final_norm=pre_norm and not config.get("_remove_final_layer_norm", False),
            activation=config.get("activation_function", "relu"),
            mlp_bias=bias,
            qkv_bias=bias,
            output_bias=bias,
            tie_embeddings=True,
        )


@keras.saving.register_keras_serializable(package="tp_zoo")
class OPTCausalLM(DecoderCausalLM):
    backbone_cls = OPTBackbone


FAMILY = Family(name="opt", model_types=("opt",), causal_lm=OPTCausalLM, adds_bos=True, layout="opt").register()
