"""The decoder-only transformer every family is an instance of.

A family says which norm, which positions, which MLP and which biases; the
shared layers do the rest. Families add only the translation of their
Hugging Face config (and their checkpoint layout, in `presets/`).
"""

import functools

import jax
import keras
import numpy as np
import keras_hub

from tp_zoo.layers import ColumnParallelDense
from tp_zoo.layers import DecoderBlock
from tp_zoo.layers import PositionEmbedding
from tp_zoo.layers import RotaryEmbedding
from tp_zoo.layers import VocabParallelEmbedding
from tp_zoo.layers import VocabParallelLMHead
from tp_zoo.layers.decoder_block import make_norm
from tp_zoo.losses import VocabParallelCrossEntropy
from tp_zoo.models import generation


class DecoderBackbone(keras_hub.models.Backbone):
    """token ids -> hidden states, sharded over the active mesh.

    Args:
        vocab_size, hidden_dim, num_layers, num_heads, intermediate_dim: sizes.
        num_kv_heads: key/value heads (GQA/MQA); defaults to num_heads.
        head_dim: defaults to hidden_dim // num_heads.
        embedding_dim: width of the token table when it differs from
            hidden_dim (OPT's word_embed_proj_dim), bridged by replicated
            `project_in` / `project_out` projections.
        max_sequence_length: the longest sequence the model takes.
        learned_positions: a learned table of `max_sequence_length` absolute
            positions; otherwise rotary positions (`rope_theta`, `rope_scaling`).
        norm, norm_epsilon, pre_norm, final_norm: the normalization scheme.
        activation, gated_mlp, mlp_bias: the MLP.
        qkv_bias, output_bias: attention biases.
        sliding_window: attention window (Mistral), or None.
        tie_embeddings: whether the LM head reuses the token table.
    """

    def __init__(
        self,
        vocab_size,
        hidden_dim,
        num_layers,
        num_heads,
        intermediate_dim,
        num_kv_heads=None,
        head_dim=None,
        embedding_dim=None,
        max_sequence_length=2048,
        learned_positions=False,
        rope_theta=10000.0,
        rope_scaling=None,
        norm="layer",
        norm_epsilon=1e-5,
        pre_norm=True,
        final_norm=True,
        activation="relu",
        gated_mlp=False,
        mlp_bias=True,
        qkv_bias=True,
        output_bias=True,
        sliding_window=None,
        tie_embeddings=True,
        dtype=None,
        **kwargs,
    ):
        head_dim = head_dim or hidden_dim // num_heads
        embedding_dim = embedding_dim or hidden_dim
        policy = keras.dtype_policies.get(dtype) if dtype is not None else None

        # === Layers ===
        self.token_embedding = VocabParallelEmbedding(
            vocab_size, embedding_dim, name="token_embedding", dtype=policy
        )
        self.project_in = self.project_out = None
        if embedding_dim != hidden_dim:
            self.project_in = ColumnParallelDense(
                hidden_dim, use_bias=False, gather_output=True, name="project_in", dtype=policy
            )
            self.project_out = ColumnParallelDense(
                embedding_dim, use_bias=False, gather_output=True, name="project_out", dtype=policy
            )
        self.position_embedding = None
        rotary = None
        if learned_positions:
            self.position_embedding = PositionEmbedding(
                max_sequence_length, hidden_dim, name="position_embedding", dtype=policy
            )
        else:
            rotary = RotaryEmbedding(head_dim, rope_theta, rope_scaling)
        attention = dict(
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            hidden_dim=hidden_dim,
            rotary=rotary,
            use_qkv_bias=qkv_bias,
            use_output_bias=output_bias,
            sliding_window=sliding_window,
        )
        mlp = dict(
            hidden_dim=hidden_dim,
            intermediate_dim=intermediate_dim,
            activation=activation,
            gated=gated_mlp,
            use_bias=mlp_bias,
        )
        self.transformer_layers = [
            DecoderBlock(
                attention, mlp, norm=norm, norm_epsilon=norm_epsilon, pre_norm=pre_norm,
                name=f"transformer_layer_{i}", dtype=policy,
            )
            for i in range(num_layers)
        ]
        self.final_norm = make_norm(norm, norm_epsilon, "final_norm", policy) if final_norm else None

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

        # === Config ===
        self.vocab_size = vocab_size
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = head_dim
        self.intermediate_dim = intermediate_dim
        self.embedding_dim = embedding_dim
        self.max_sequence_length = max_sequence_length
        self.learned_positions = learned_positions
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.norm = norm
        self.norm_epsilon = norm_epsilon
        self.pre_norm = pre_norm
        self.use_final_norm = final_norm
        self.activation = activation
        self.gated_mlp = gated_mlp
        self.mlp_bias = mlp_bias
        self.qkv_bias = qkv_bias
        self.output_bias = output_bias
        self.sliding_window = sliding_window
        self.tie_embeddings = tie_embeddings

    def enable_lora(self, rank, target_layer_names=None):
        """KerasHub's LoRA (default targets: the query and value projections);
        the rank is checked before anything is frozen."""
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}.")
        super().enable_lora(rank, target_layer_names)

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
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x

    def get_config(self):
        config = super().get_config()
        config.update(
            vocab_size=self.vocab_size,
            hidden_dim=self.hidden_dim,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            intermediate_dim=self.intermediate_dim,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            embedding_dim=self.embedding_dim,
            max_sequence_length=self.max_sequence_length,
            learned_positions=self.learned_positions,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            norm=self.norm,
            norm_epsilon=self.norm_epsilon,
            pre_norm=self.pre_norm,
            final_norm=self.use_final_norm,
            activation=self.activation,
            gated_mlp=self.gated_mlp,
            mlp_bias=self.mlp_bias,
            qkv_bias=self.qkv_bias,
            output_bias=self.output_bias,
            sliding_window=self.sliding_window,
            tie_embeddings=self.tie_embeddings,
        )
        return config


def _under_own_distribution(method):
    """Runs a Keras entry point under the distribution the model was built
    with (so fit() shards batches over "batch"), unless one is active."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.distribution is None or keras.distribution.distribution() is not None:
            return method(self, *args, **kwargs)
        with self.distribution.scope():
            return method(self, *args, **kwargs)

    return wrapper


def _checks_batch(method):
    """Refuses, with a clear error, what jitted code would fail on obscurely:
    label arrays outside the vocab, batches that dp does not divide."""

    @functools.wraps(method)
    def wrapper(self, x=None, y=None, *args, **kwargs):
        dp = self.data_parallel_degree
        rows = kwargs.get("batch_size")
        if rows is None and isinstance(x, dict) and hasattr(x.get("token_ids"), "shape"):
            rows = x["token_ids"].shape[0] if method.__name__.endswith("_on_batch") else None
        if dp > 1 and rows is not None and rows % dp:
            raise ValueError(f"A batch of {rows} is not divisible by dp={dp}.")
        if isinstance(y, (np.ndarray, jax.Array)) and np.issubdtype(y.dtype, np.integer) and y.size:
            ignored = getattr(getattr(self, "loss", None), "ignore_class", None)
            labels = np.asarray(y)
            bad = labels[((labels < 0) | (labels >= self.backbone.vocab_size)) & (labels != ignored)]
            if bad.size:
                raise ValueError(
                    f"Labels outside the vocab [0, {self.backbone.vocab_size}): {sorted(set(bad.tolist()))[:5]}."
                )
        return method(self, x, y, *args, **kwargs)

    return wrapper


class DecoderCausalLM(keras_hub.models.CausalLM):
    """A `DecoderBackbone` with a vocab-parallel LM head.

    Calling it on `{"token_ids", "padding_mask"}` returns logits over the
    vocab, split over the tensor-parallel devices. `compile()` defaults to
    `tp_zoo.losses.VocabParallelCrossEntropy`, so the logits are never
    gathered in training.
    """

    backbone_cls = DecoderBackbone

    def __init__(self, backbone, preprocessor=None, tokenizer=None, **kwargs):
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        # A `CheckpointTokenizer` (or None): lets generate() take strings.
        self.tokenizer = tokenizer
        # The distribution the model was built under (from_preset sets it).
        self.distribution = None
        self.lm_head = VocabParallelLMHead(
            backbone.vocab_size,
            tied_embedding=backbone.token_embedding if backbone.tie_embeddings else None,
            name="lm_head",
            dtype=backbone.dtype_policy,
        )
        # === Functional model ===
        inputs = backbone.input
        outputs = self.lm_head(backbone(inputs))
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

    @property
    def data_parallel_degree(self):
        """The size of the "batch" axis of the model's mesh (1 without one)."""
        if self.distribution is None:
            return 1
        mesh = self.distribution.device_mesh
        return dict(zip(mesh.axis_names, mesh.shape)).get("batch", 1)

    @_under_own_distribution
    def compile(self, optimizer="auto", loss="auto", *, weighted_metrics="auto", sampler="top_k", **kwargs):
        """KerasHub's compile, with `VocabParallelCrossEntropy` as the default loss.

        An optimizer made outside the model's distribution (its step counter
        and learning rate on one device) is remade from its config inside it,
        so that all training state lives on the mesh.
        """
        if loss == "auto":
            loss = VocabParallelCrossEntropy()
        # KerasHub's enable_lora freezes the backbone; the LM head lives here.
        if getattr(self.backbone, "_lora_enabled_layers", None):
            self.lm_head.trainable = False
        if isinstance(optimizer, keras.optimizers.Optimizer) and not optimizer.built:
            optimizer = optimizer.__class__.from_config(optimizer.get_config())
        super().compile(optimizer=optimizer, loss=loss, weighted_metrics=weighted_metrics, sampler=sampler, **kwargs)

    fit = _under_own_distribution(_checks_batch(keras_hub.models.CausalLM.fit))
    evaluate = _under_own_distribution(_checks_batch(keras_hub.models.CausalLM.evaluate))
    predict = _under_own_distribution(keras_hub.models.CausalLM.predict)
    train_on_batch = _under_own_distribution(_checks_batch(keras_hub.models.CausalLM.train_on_batch))
    test_on_batch = _under_own_distribution(_checks_batch(keras_hub.models.CausalLM.test_on_batch))
    predict_on_batch = _under_own_distribution(keras_hub.models.CausalLM.predict_on_batch)

    def generate(self, inputs, max_length=None, max_new_tokens=None, stop_token_ids="auto", strip_prompt=False):
        """Generates from prompts, sharded; see `tp_zoo.models.generation.generate`."""
        return generation.generate(
            self, inputs, max_length=max_length, max_new_tokens=max_new_tokens,
            stop_token_ids=stop_token_ids, strip_prompt=strip_prompt,
        )
