"""The decoder-only transformer every family is an instance of.

A family says which norm, which positions, which MLP and which biases; the
shared layers do the rest. Families add only the translation of their
Hugging Face config (and their checkpoint layout, in `presets/`).
"""

import functools

import jax
import jax.numpy as jnp
import keras
import numpy as np
import keras_hub
from keras import ops

from tp_zoo.layers import ColumnParallelDense
from tp_zoo.layers import DecoderBlock
from tp_zoo.layers import PositionEmbedding
from tp_zoo.layers import RotaryEmbedding
from tp_zoo.layers import VocabParallelEmbedding
from tp_zoo.layers import VocabParallelLMHead
from tp_zoo.layers.decoder_block import make_norm
from tp_zoo.losses import VocabParallelCrossEntropy


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

    def embed(self, token_ids, start_index=0):
        """Token (and learned position) embeddings of ids starting at `start_index`."""
        x = self.token_embedding(token_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        if self.position_embedding is not None:
            x = x + self.position_embedding(x, start_index=start_index)
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

    def call_with_cache(self, token_ids, cache, cache_update_index):
        """Forward pass over `token_ids` placed at `cache_update_index`, updating the cache.

        `cache` has shape (batch, num_layers, 2, max_length, kv heads, head_dim),
        split over devices on the kv-heads dim. Returns (logits, hidden, cache).
        """
        backbone = self.backbone
        x = backbone.embed(token_ids, start_index=cache_update_index)
        caches = []
        for i, block in enumerate(backbone.transformer_layers):
            x, layer_cache = block(x, cache=cache[:, i], cache_update_index=cache_update_index)
            caches.append(layer_cache)
        hidden = backbone.finish(x)
        return self.lm_head(hidden), hidden, jnp.stack(caches, axis=1)

    def _build_cache(self, token_ids):
        batch, length = token_ids.shape
        attention = self.backbone.transformer_layers[0].attention
        layer_cache = attention.empty_cache(batch, length)
        cache = jnp.stack([layer_cache] * self.backbone.num_layers, axis=1)
        _, hidden, cache = self.call_with_cache(token_ids, cache, 0)
        return hidden, cache

    def generate_step(self, inputs, stop_token_ids=None):
        """One compiled program: prefill the cache, then sample to max_length.

        `inputs` are right-padded {"token_ids", "padding_mask"} of shape
        (batch, max_length); the sampler fills the positions the mask leaves
        free, one token per step, each step reading and writing the sharded
        KV cache in place.
        """
        token_ids, padding_mask = inputs["token_ids"], inputs["padding_mask"]
        hidden, cache = self._build_cache(token_ids)
        index = ops.min(ops.sum(ops.cast(padding_mask, "int32"), axis=-1))

        def next(prompt, cache, index):
            # The cache index is the index of the previous token.
            token = ops.slice(prompt, [0, index - 1], [prompt.shape[0], 1])
            logits, hidden, cache = self.call_with_cache(token, cache, index - 1)
            return ops.squeeze(logits, axis=1), ops.squeeze(hidden, axis=1), cache

        token_ids = self.sampler(
            next=next,
            prompt=token_ids,
            cache=cache,
            index=index,
            mask=padding_mask,
            stop_token_ids=stop_token_ids,
            hidden_states=hidden,
            model=self,
        )
        if stop_token_ids is None:
            return {"token_ids": token_ids, "padding_mask": ops.ones_like(token_ids, dtype="bool")}
        # Everything after the first stop token a row generated is padding.
        generated = ops.logical_not(ops.cast(padding_mask, "bool"))
        is_stop = ops.any(ops.stack([token_ids == t for t in stop_token_ids]), axis=0)
        ends = ops.cast(ops.logical_and(is_stop, generated), "int32")
        after_end = ops.cumsum(ends, axis=-1) - ends
        return {"token_ids": token_ids, "padding_mask": ops.logical_not(ops.cast(after_end, "bool"))}

    # --- generate ------------------------------------------------------------
    def generate(self, inputs, max_length=None, stop_token_ids="auto", strip_prompt=False):
        """Generates from prompts, sharded, in one compiled program per
        (batch, max_length).

        Args:
            inputs: a string or a list of strings (needs the checkpoint's
                tokenizer), or a {"token_ids", "padding_mask"} batch of
                right-padded ids.
            max_length: total length (prompt + generated) of every row.
                Defaults to the width of an id batch, or to the longest
                prompt + 64 for strings (at most the model's positions).
            stop_token_ids: "auto" (the checkpoint's EOS), None, or ids.
            strip_prompt: return only the generated part.

        Returns strings for string inputs, else {"token_ids", "padding_mask"}.
        Sampling is set by `compile(sampler=...)` (any keras_hub sampler).
        """
        prompts, as_text, single = self._prompts(inputs)
        limit = self.backbone.max_sequence_length
        longest = max(len(p) for p in prompts)
        if max_length is None:
            max_length = inputs["token_ids"].shape[1] if not as_text else min(longest + 64, limit)
        if max_length > limit:
            raise ValueError(f"max_length={max_length} is beyond the model's {limit} positions.")
        if longest >= max_length:
            raise ValueError(
                f"A prompt of {longest} tokens leaves no room to generate within "
                f"max_length={max_length}."
            )
        token_ids = np.zeros((len(prompts), max_length), "int32")
        padding_mask = np.zeros((len(prompts), max_length), "int32")
        for row, prompt in enumerate(prompts):
            token_ids[row, : len(prompt)] = prompt
            padding_mask[row, : len(prompt)] = 1
        if stop_token_ids == "auto":
            stop_token_ids = self._stop_token_ids()
        stop_token_ids = tuple(stop_token_ids) if stop_token_ids is not None else None
        generate = self.make_generate_function()
        out = generate({"token_ids": token_ids, "padding_mask": padding_mask}, stop_token_ids=stop_token_ids)
        out_ids = np.asarray(out["token_ids"])
        out_mask = np.asarray(out["padding_mask"]).astype(bool)
        start = [len(p) if strip_prompt else 0 for p in prompts]
        rows = [out_ids[r, start[r] :][out_mask[r, start[r] :]] for r in range(len(prompts))]
        if as_text:
            texts = [self.tokenizer.decode(row) for row in rows]
            return texts[0] if single else texts
        ids = np.zeros_like(out_ids)
        mask = np.zeros_like(out_ids, dtype=bool)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = row
            mask[r, : len(row)] = True
        return {"token_ids": ids, "padding_mask": mask}

    def _prompts(self, inputs):
        """(list of id lists, given as text?, a single string?) with checks."""
        if isinstance(inputs, str):
            inputs, single = [inputs], True
        else:
            single = False
        if isinstance(inputs, dict):
            if set(inputs) != {"token_ids", "padding_mask"}:
                raise ValueError(
                    f"An id batch needs exactly the keys 'token_ids' and 'padding_mask', got {sorted(inputs)}."
                )
            ids = np.asarray(inputs["token_ids"])
            mask = np.asarray(inputs["padding_mask"]).astype(bool)
            if ids.ndim != 2 or ids.shape != mask.shape:
                raise ValueError(
                    f"token_ids and padding_mask must both be (batch, length); got {ids.shape} and {mask.shape}."
                )
            prompts = []
            for row, row_mask in zip(ids, mask):
                length = int(row_mask.sum())
                if not row_mask[:length].all():
                    raise ValueError("padding_mask must mark each prompt's tokens first (right padding).")
                prompts.append([int(t) for t in row[:length]])
            self._check_ids(prompts)
            return prompts, False, False
        if not isinstance(inputs, (list, tuple)) or not inputs:
            raise ValueError(
                "generate() takes a string, a non-empty list of strings, or a "
                f"{{'token_ids', 'padding_mask'}} batch; got {type(inputs).__name__}."
            )
        if not all(isinstance(x, str) for x in inputs):
            raise ValueError(
                "generate() got a list mixing strings and other values; pass either strings, "
                "or ids as a {'token_ids', 'padding_mask'} batch."
            )
        if self.tokenizer is None:
            raise ValueError(
                "This checkpoint has no tokenizer files, so generate() needs ids: "
                "pass a {'token_ids', 'padding_mask'} batch."
            )
        prompts = [self.tokenizer.encode(text) for text in inputs]
        self._check_ids(prompts)
        return prompts, True, single

    def _check_ids(self, prompts):
        vocab = self.backbone.vocab_size
        for row, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"Prompt {row} is empty: give at least one token.")
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"Prompt {row} has token ids outside the vocab [0, {vocab}): {bad[:5]}.")

    def _stop_token_ids(self):
        if self.tokenizer is not None and self.tokenizer.eos_ids:
            return self.tokenizer.eos_ids
        eos = getattr(self, "hf_config", {}).get("eos_token_id")
        if eos is None:
            return None
        return tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
