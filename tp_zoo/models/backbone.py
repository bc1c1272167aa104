"""The decoder-only transformer every family is an instance of.

A family says which norm, which positions, which MLP and which biases (a
`DecoderConfig`); the shared layers do the rest.
"""

import dataclasses

import keras
import keras_hub
import numpy as np
from keras.src.saving.saving_lib import H5IOStore

from tp_zoo.layers import ColumnParallelDense
from tp_zoo.layers import DecoderBlock
from tp_zoo.layers import PositionEmbedding
from tp_zoo.layers import RotaryEmbedding
from tp_zoo.layers import VocabParallelEmbedding
from tp_zoo.layers.base import TrueShapeWeights
from tp_zoo.layers.base import set_weights
from tp_zoo.layers.base import true_value
from tp_zoo.layers.decoder_block import make_norm
from tp_zoo.layers.quantize import check_mode
from tp_zoo.layers.quantize import scheme_for
from tp_zoo.layers.quantize import use_own_quantize
from tp_zoo.models.family import load_preset


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """What makes one decoder differ from another.

    Sizes: vocab_size, hidden_dim, num_layers, num_heads, intermediate_dim;
    num_kv_heads (GQA/MQA; default num_heads); head_dim (default hidden_dim
    // num_heads); embedding_dim, the token table's width when it differs
    from hidden_dim (OPT's word_embed_proj_dim, bridged by `project_in` /
    `project_out`); max_sequence_length, the longest sequence.
    Positions: learned (a table, its rows starting at position_offset) or
    rotary (rope_theta, rope_scaling).
    Norms: norm ("layer" or "rms"), norm_epsilon, pre_norm (else after each
    residual sum), final_norm.
    MLP: activation ("relu", "gelu", "gelu_tanh", "silu"), gated_mlp
    (SwiGLU), mlp_bias. Attention: qkv_bias, output_bias, sliding_window
    (Mistral). tie_embeddings: the LM head reuses the token table.
    """

    vocab_size: int
    hidden_dim: int
    num_layers: int
    num_heads: int
    intermediate_dim: int
    num_kv_heads: int = None
    head_dim: int = None
    embedding_dim: int = None
    max_sequence_length: int = 2048
    learned_positions: bool = False
    position_offset: int = 0
    rope_theta: float = 10000.0
    rope_scaling: dict = None
    norm: str = "layer"
    norm_epsilon: float = 1e-5
    pre_norm: bool = True
    final_norm: bool = True
    activation: str = "relu"
    gated_mlp: bool = False
    mlp_bias: bool = True
    qkv_bias: bool = True
    output_bias: bool = True
    sliding_window: int = None
    tie_embeddings: bool = True

    def __post_init__(self):
        defaults = dict(
            num_kv_heads=self.num_kv_heads or self.num_heads,
            head_dim=self.head_dim or self.hidden_dim // self.num_heads,
            embedding_dim=self.embedding_dim or self.hidden_dim,
        )
        for name, value in defaults.items():
            object.__setattr__(self, name, value)

    @classmethod
    def names(cls):
        return tuple(f.name for f in dataclasses.fields(cls))


@keras.saving.register_keras_serializable(package="tp_zoo")
class DecoderBackbone(TrueShapeWeights, keras_hub.models.Backbone):
    """token ids -> hidden states, sharded over the active mesh.

    Takes the fields of `DecoderConfig` as keyword arguments (plus Keras'
    `dtype`, `name`, ...); each is also an attribute (`backbone.num_heads`).

    Example:
    ```python
    with tp_zoo.distribution(tp=2).scope():
        backbone = tp_zoo.models.LlamaBackbone(
            vocab_size=1000, hidden_dim=64, num_layers=2, num_heads=4,
            intermediate_dim=128, norm="rms", activation="silu", gated_mlp=True)
    hidden = backbone({"token_ids": ids, "padding_mask": mask})
    ```
    """

    def __init__(self, dtype=None, quantized=None, **kwargs):
        options = {k: kwargs.pop(k) for k in DecoderConfig.names() if k in kwargs}
        scheme = scheme_for(quantized)
        config = DecoderConfig(**options)
        policy = keras.dtype_policies.get(dtype) if dtype is not None else None
        self._make_layers(config, policy)
        # A quantized model's config (a .keras file): its projections are
        # built with the scheme's kernels, which the saved weights then fill.
        self.quantized = quantized
        for projection in self.quantizable_layers():
            projection.scheme = scheme

        # === Functional model ===
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
        x = self.embed(token_ids)
        for block in self.transformer_layers:
            x = block(x, padding_mask=padding_mask)
        x = self.finish(x)
        super().__init__(
            inputs={"token_ids": token_ids, "padding_mask": padding_mask},
            outputs=x,
            dtype=dtype,
            **kwargs,
        )
        use_own_quantize(self)

        # === Config ===
        self.decoder_config = config
        for name in DecoderConfig.names():
            if name != "final_norm":
                setattr(self, name, getattr(config, name))

    @classmethod
    def decoder_config(cls, config):
        """The `DecoderConfig` of a Hugging Face config.json (a dict); each
        family translates its own, refusing what it cannot build."""
        raise NotImplementedError

    @classmethod
    def from_hf_config(cls, config, dtype=None, **options):
        """The backbone of a Hugging Face config.json (a dict)."""
        return cls(**dataclasses.asdict(cls.decoder_config(config)), dtype=dtype, **options)

    def _make_layers(self, config, policy):
        """The embeddings (and OPT's projections), the blocks and the final norm."""
        self.token_embedding = VocabParallelEmbedding(
            config.vocab_size, config.embedding_dim, name="token_embedding", dtype=policy
        )
        self.project_in = self.project_out = None
        if config.embedding_dim != config.hidden_dim:
            self.project_in = ColumnParallelDense(
                config.hidden_dim, use_bias=False, gather_output=True, name="project_in", dtype=policy
            )
            self.project_out = ColumnParallelDense(
                config.embedding_dim, use_bias=False, gather_output=True, name="project_out", dtype=policy
            )
        self.position_embedding = None
        rotary = None
        if config.learned_positions:
            self.position_embedding = PositionEmbedding(
                config.max_sequence_length, config.hidden_dim, offset=config.position_offset,
                name="position_embedding", dtype=policy,
            )
        else:
            rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        attention = dict(
            num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
            hidden_dim=config.hidden_dim, rotary=rotary, use_qkv_bias=config.qkv_bias,
            use_output_bias=config.output_bias, sliding_window=config.sliding_window,
        )
        mlp = dict(
            hidden_dim=config.hidden_dim, intermediate_dim=config.intermediate_dim, activation=config.activation,
            gated=config.gated_mlp, use_bias=config.mlp_bias,
        )
        self.transformer_layers = [
            DecoderBlock(
                attention, mlp, norm=config.norm, norm_epsilon=config.norm_epsilon, pre_norm=config.pre_norm,
                name=f"transformer_layer_{i}", dtype=policy,
            )
            for i in range(config.num_layers)
        ]
        self.output_norm = None
        if config.final_norm:
            self.output_norm = make_norm(config.norm, config.norm_epsilon, "final_norm", policy)

    @classmethod
    def from_preset(cls, preset, **kwargs):
        """The backbone of `tp_zoo.from_preset(preset, **kwargs)`, refusing a
        checkpoint of another family."""
        return load_preset(preset, cls, **kwargs).backbone

    def enable_lora(self, rank, target_layer_names=None):
        """KerasHub's LoRA (default targets: the query and value projections),
        every other weight frozen; the rank is checked before anything is
        frozen. Targets name layers, or parts of fused ones ("query",
        "key", "value" of `qkv`; "gate", "up" of `gate_up`), which get
        adapters of the shapes a separate layer's would have."""
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}.")
        targets = self.default_lora_layer_names() if target_layer_names is None else list(target_layer_names)
        self.trainable = True
        self._lora_enabled_layers = []
        self._lora_rank = rank
        for layer in self._flatten_layers(include_self=False):
            layer.trainable = False
        with_weights = [layer for layer in self._flatten_layers(include_self=False) if layer.weights]
        for i, layer in enumerate(with_weights):
            if not hasattr(layer, "enable_lora"):
                continue
            parts = getattr(layer, "part_names", None)
            if parts is not None:
                named = [name for name in parts if name in targets]
                if not named:
                    continue
                layer.trainable = True
                layer.enable_lora(rank, parts=named)
            elif layer.name in targets:
                layer.trainable = True
                layer.enable_lora(rank)
            else:
                continue
            self._lora_enabled_layers.append(i)

    def save_lora_weights(self, filepath):
        """KerasHub's `.lora.h5` file, each adapter at its true shape (heads
        padded for tp cut off), so that it loads at any tp."""
        if not getattr(self, "_lora_enabled_layers", []):
            raise ValueError("There are no LoRA-enabled layers in this model: call enable_lora(rank) first.")
        if not str(filepath).endswith(".lora.h5"):
            raise ValueError(f"The filename must end in `.lora.h5`. Received: filepath={filepath}")
        store = H5IOStore(filepath, mode="w")
        store.make("lora")["rank"] = self._lora_rank
        for index, layer in self._lora_layers():
            adapters = store.make(f"lora/{index}")
            for name, variable in layer.lora_variables():
                adapters[name] = true_value(variable)
        store.close()

    def load_lora_weights(self, filepath):
        """Adapters from `save_lora_weights` (true shapes), padded for this tp."""
        store = H5IOStore(filepath, mode="r")
        rank = int(store.get("lora")["rank"][()])
        if not getattr(self, "_lora_enabled_layers", []):
            self.enable_lora(rank)
        elif self._lora_rank != rank:
            raise ValueError(f"{filepath} holds LoRA adapters of rank {rank}; this model's are of rank {self._lora_rank}.")
        for index, layer in self._lora_layers():
            saved = store.get(f"lora/{index}")
            names, variables = zip(*layer.lora_variables())
            set_weights(variables, [saved[name] for name in names])
        store.close()

    def _lora_layers(self):
        """(index, layer) of the LoRA-enabled layers, indexed as KerasHub's
        files do: among the layers that have weights, in topological order."""
        with_weights = [layer for layer in self._flatten_layers(include_self=False) if layer.weights]
        return [(i, with_weights[i]) for i in self._lora_enabled_layers]

    def quantizable_layers(self):
        """The projections `quantize` converts: every attention and MLP
        kernel (not norms, embeddings, OPT's projections or the LM head)."""
        return [
            p for block in self.transformer_layers
            for p in block.attention._projections() + block.mlp._projections()
        ]

    def check_quantize(self, mode, config=None, owner=None):
        """The checks of `quantize`, all before anything changes (`owner`:
        the causal LM holding this backbone, whose optimizer counts too)."""
        check_mode(mode, f"{self.name}.quantize")
        if config is not None:
            raise ValueError(f"A quantization config is not supported; call quantize({mode!r}).")
        if self.quantized is not None:
            raise ValueError(f"{self.name} is already quantized ({self.quantized}); load the float model to quantize again.")
        for model in (self, owner):
            optimizer = getattr(model, "optimizer", None)
            if optimizer is not None and optimizer.built:
                raise ValueError(
                    "Cannot quantize a model whose training has started (its optimizer state is built): "
                    "quantize before fit(), or compile() again with a new optimizer first."
                )
        lora = [p.name for p in self.quantizable_layers() if p.lora_enabled]
        if lora:
            raise ValueError(f"Cannot quantize layers with LoRA enabled ({lora[:3]}...); merge_lora() first "
                             "and quantize a model without adapters, or enable LoRA after quantize.")

    def quantize(self, mode=None, type_check=True, config=None, **kwargs):
        """Weight-only int8 (Keras' `quantize("int8")`): every attention and
        MLP kernel becomes int8 with float32 per-output-channel scales, split
        as the float kernel was; the values and scales are the same at any
        tp. Norms, embeddings and the LM head stay float."""
        if kwargs.pop("filters", None) is not None or kwargs:
            raise ValueError(f"quantize: unsupported arguments {sorted(kwargs) or ['filters']}.")
        self.check_quantize(mode, config)
        for projection in self.quantizable_layers():
            projection.quantize(mode)
        self.quantized = mode
        for layer in self._flatten_layers(include_self=False):
            if hasattr(layer, "_sharded_programs"):
                layer._sharded_programs = {}
        self.train_function = self.test_function = self.predict_function = None

    def merge_lora(self):
        """Folds every LoRA adapter into its base kernel (see enable_lora)."""
        for layer in self._flatten_layers(include_self=False):
            if getattr(layer, "lora_enabled", False):
                layer.merge_lora()

    def embed(self, token_ids, positions=None):
        """Token (and learned position) embeddings of ids at `positions`
        ((batch, seq) ints; default 0..seq-1)."""
        x = self.token_embedding(token_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        if self.position_embedding is not None:
            x = x + self.position_embedding(x, positions)
        return x

    def finish(self, x):
        """Final norm (and OPT's projection back to the embedding width)."""
        if self.output_norm is not None:
            x = self.output_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x

    @property
    def mesh_info(self):
        """The mesh the layers were built on (None: one device)."""
        return self.token_embedding.mesh_info

    def cache_bytes(self, batch_size, max_length):
        """Bytes per device of generation's KV cache: every layer's keys and
        values for `batch_size` rows of `max_length` positions."""
        return sum(block.attention.cache_bytes(batch_size, max_length) for block in self.transformer_layers)

    def prefill_bytes(self, batch_size, width):
        """Estimated bytes per device of a prefill's largest live activations
        for `batch_size` prompts padded to `width`, within one block: its
        input, the q/k/v product, the MLP intermediates, and the float32
        scores of a blockwise attention tile (512 keys)."""
        block = self.transformer_layers[0]
        attention, tp = block.attention, block.attention.tp
        heads = (attention.padded_heads + 2 * attention.padded_kv_heads) * self.head_dim // tp
        per_token = 4 * self.hidden_dim + heads + 3 * block.mlp.padded_intermediate_dim // tp
        tile = 512 * attention.padded_heads // tp * 4
        return batch_size * width * (per_token * np.dtype(attention.compute_dtype).itemsize + tile)

    def get_config(self):
        config = {**super().get_config(), **dataclasses.asdict(self.decoder_config)}
        if self.quantized is not None:
            config["quantized"] = self.quantized
        return config
