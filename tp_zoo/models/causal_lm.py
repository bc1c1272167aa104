"""The causal LM every family is an instance of: a `DecoderBackbone` with a
vocab-parallel LM head, KerasHub's training and generation entry points run
under the model's own distribution."""

import contextlib
import functools

import jax
import keras
import keras_hub
import numpy as np

from tp_zoo import optimizers
from tp_zoo import parallel
from tp_zoo.layers import VocabParallelLMHead
from tp_zoo.layers.base import TrueShapeWeights
from tp_zoo.layers.decoder_block import check_remat
from tp_zoo.layers.loss import IGNORED_LABEL
from tp_zoo.layers.loss import active_head_in_loss
from tp_zoo.layers.loss import head_in_loss
from tp_zoo.losses import VocabParallelCrossEntropy
from tp_zoo.models import generation
from tp_zoo.models.backbone import DecoderBackbone
from tp_zoo.models.family import load_preset
from tp_zoo.models.preprocessor import CausalLMPreprocessor
from tp_zoo.models.preprocessor import preprocesses_text


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
            data = list(self.mesh_sizes)[1]
            raise ValueError(f"A batch of {rows} is not divisible by {data}={dp}.")
        if isinstance(y, (np.ndarray, jax.Array)) and np.issubdtype(y.dtype, np.integer) and y.size:
            ignored = getattr(getattr(self, "loss", None), "ignore_class", None)
            labels = np.asarray(y)
            bad = labels[((labels < 0) | (labels >= self.backbone.vocab_size)) & (labels != ignored)]
            if bad.size:
                hint = (f" Labels of {IGNORED_LABEL} mark tokens to skip: compile with "
                        f"loss=VocabParallelCrossEntropy(ignore_class={IGNORED_LABEL}) (the default)."
                        if IGNORED_LABEL in bad else "")
                raise ValueError(
                    f"Labels outside the vocab [0, {self.backbone.vocab_size}): {sorted(set(bad.tolist()))[:5]}.{hint}"
                )
        return method(self, x, y, *args, **kwargs)

    return wrapper


@keras.saving.register_keras_serializable(package="tp_zoo")
class DecoderCausalLM(TrueShapeWeights, keras_hub.models.CausalLM):
    """A `DecoderBackbone` with a vocab-parallel LM head.

    Calling it on `{"token_ids", "padding_mask"}` returns logits over the
    vocab, split over the tensor-parallel devices. `compile()` defaults to
    `tp_zoo.losses.VocabParallelCrossEntropy`, so the logits are never
    gathered in training.
    """

    backbone_cls = DecoderBackbone

    def __init__(self, backbone, preprocessor=None, tokenizer=None, hf_config=None, **kwargs):
        # === Layers ===
        self.backbone = backbone
        # The Hugging Face config.json it was loaded from (export writes it back).
        self.hf_config = hf_config
        # A `CheckpointTokenizer` (or None): lets generate() take strings. A
        # model Keras restores gets it back through its preprocessor.
        if tokenizer is None and isinstance(preprocessor, CausalLMPreprocessor):
            tokenizer = preprocessor.tokenizer
        # KerasHub's preprocessor, made from the tokenizer: lets fit() and
        # evaluate() take strings.
        if preprocessor is None and tokenizer is not None:
            preprocessor = CausalLMPreprocessor(tokenizer, sequence_length=min(1024, backbone.max_sequence_length))
        self.preprocessor = preprocessor
        self.tokenizer = tokenizer
        # The distribution the model was built under (None: one device).
        self.distribution = keras.distribution.distribution()
        # Set by `tp_zoo.from_preset` for a Hugging Face checkpoint (else
        # None): its directory (export copies its tokenizer files, a PEFT
        # adapter names it as its base) and what this process read of it,
        # {"bytes_read", "checkpoint_bytes"} (each process reads only the
        # blocks its own devices hold).
        self.checkpoint_directory = None
        self.load_stats = None
        self.lm_head = VocabParallelLMHead(
            backbone.vocab_size,
            tied_embedding=backbone.token_embedding if backbone.tie_embeddings else None,
            name="lm_head",
            dtype=backbone.dtype_policy,
            quantized=None if backbone.tie_embeddings else backbone.quantized,
        )
        # === Functional model ===
        inputs = backbone.input
        outputs = self.lm_head(backbone(inputs))
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.__dict__.pop("quantize", None)  # Keras' wrapper: our quantize() checks and says more

    def get_config(self):
        return {**super().get_config(), "hf_config": self.hf_config}

    @classmethod
    def from_preset(cls, preset, **kwargs):
        """As `tp_zoo.from_preset` (same arguments), refusing a checkpoint of
        another family:

        ```python
        lm = tp_zoo.models.OPTCausalLM.from_preset("opt_125m", tp=2)
        ```
        """
        return load_preset(preset, cls, **kwargs)

    @property
    def data_parallel_degree(self):
        """The size of the "batch" axis of the model's mesh (1 without one)."""
        return list(self.mesh_sizes.values())[1]

    @property
    def mesh_sizes(self):
        """{"tp": ..., "dp": ...}, or {"tp": ..., "fsdp": ...} when the
        data-parallel devices split the variables too: the model's mesh
        (1 and 1 without one)."""
        if self.distribution is None:
            return {"tp": 1, "dp": 1}
        mesh = self.distribution.device_mesh
        sizes = dict(zip(mesh.axis_names, mesh.shape))
        data = "fsdp" if getattr(self.distribution, "fully_sharded", False) else "dp"
        return {"tp": sizes.get("model", 1), data: sizes.get("batch", 1)}

    @_under_own_distribution
    def compile(self, optimizer="auto", loss="auto", *, weighted_metrics="auto", sampler="top_k", **kwargs):
        """KerasHub's compile, with `VocabParallelCrossEntropy` as the default
        loss; it skips labels of -100 (`IGNORED_LABEL`), as transformers
        does, which instruction examples put outside the trained replies.

        Keras' Adam and AdamW (and the default, KerasHub's Adam(2e-5)) become
        `tp_zoo.optimizers.AdamW` of the same hyperparameters, whose math is
        float32, so that bfloat16 weights train; an optimizer that cannot
        train the model's weights is refused when training starts. An
        optimizer made outside the model's distribution (its step counter
        and learning rate on one device) is remade from its config inside it,
        so that all training state lives on the mesh.
        """
        optimizer = optimizers.for_training(keras.optimizers.Adam(2e-5) if optimizer == "auto" else optimizer)
        if loss == "auto":
            loss = VocabParallelCrossEntropy(ignore_class=IGNORED_LABEL)
        # KerasHub's enable_lora freezes the backbone; the LM head lives here.
        if getattr(self.backbone, "_lora_enabled_layers", None):
            self.lm_head.trainable = False
        if isinstance(optimizer, keras.optimizers.Optimizer) and not optimizer.built:
            optimizer = optimizer.__class__.from_config(optimizer.get_config())
        super().compile(optimizer=optimizer, loss=loss, weighted_metrics=weighted_metrics, sampler=sampler, **kwargs)

    def compile_from_config(self, config):
        """Recompiles a model loaded from a .keras file (Keras skips models
        whose compile() is overridden; ours takes Keras' arguments)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    @property
    def remat(self):
        """Activation checkpointing in training: "none" (the default), "products"
        (keep the projections' outputs, recompute the rest) or "layers" (keep
        each block's input, run the block again in the backward pass): less
        memory for long sequences, for more compute. Generation is unaffected.

        ```python
        lm.remat = "layers"
        ```
        """
        return self.backbone.transformer_layers[0].remat

    @remat.setter
    def remat(self, policy):
        check_remat(policy)
        for block in self.backbone.transformer_layers:
            block.remat = policy
        self.train_function = self.test_function = None

    def call(self, inputs, training=None, mask=None):
        if active_head_in_loss() is self.lm_head:  # the loss applies the head (see train_step)
            return self.backbone(inputs, training=training)
        return super().call(inputs, training=training, mask=mask)

    # Training and test steps hand the backbone's hidden states to a
    # `VocabParallelCrossEntropy`, which applies the LM head in chunks of
    # positions: the logits of a long sequence (32k positions x 128k
    # vocab) never exist at once, nor their gradient. Compiled metrics see
    # the model's outputs, so with any, the steps make the logits as before.
    def train_step(self, state, data):
        with self._head_in_loss():
            return super().train_step(state, data)

    def test_step(self, state, data):
        with self._head_in_loss():
            return super().test_step(state, data)

    def _head_in_loss(self):
        metrics = getattr(self, "_compile_metrics", None)
        needs_logits = metrics is not None and (metrics._user_metrics or metrics._user_weighted_metrics)
        if isinstance(getattr(self, "loss", None), VocabParallelCrossEntropy) and not needs_logits:
            return head_in_loss(self.lm_head)
        return contextlib.nullcontext()

    # Keras compiles each step for the placements its variables have when it
    # makes the step: all on the model's mesh (see parallel.place_on_mesh).
    def make_train_function(self, force=False):
        optimizers.check_trains(self.optimizer, self.trainable_variables)
        self._place_state_on_mesh()
        return super().make_train_function(force)

    def make_test_function(self, force=False):
        self._place_state_on_mesh()
        return super().make_test_function(force)

    def make_predict_function(self, force=False):
        self._place_state_on_mesh()
        return super().make_predict_function(force)

    def _place_state_on_mesh(self):
        optimizer = getattr(self, "optimizer", None)
        state = self.variables + (optimizer.variables if optimizer is not None else []) + self.metrics_variables
        parallel.place_on_mesh(self.distribution, state)

    # Strings are preprocessed first (eagerly: the tokenizer is Python), then
    # checked and run like ids.
    fit = _under_own_distribution(preprocesses_text(_checks_batch(keras_hub.models.CausalLM.fit)))
    evaluate = _under_own_distribution(preprocesses_text(_checks_batch(keras_hub.models.CausalLM.evaluate)))
    predict = _under_own_distribution(preprocesses_text(keras_hub.models.CausalLM.predict))
    train_on_batch = _under_own_distribution(preprocesses_text(_checks_batch(keras_hub.models.CausalLM.train_on_batch)))
    test_on_batch = _under_own_distribution(preprocesses_text(_checks_batch(keras_hub.models.CausalLM.test_on_batch)))
    predict_on_batch = _under_own_distribution(preprocesses_text(keras_hub.models.CausalLM.predict_on_batch))

    def quantize(self, mode=None, type_check=True, config=None, **kwargs):
        """Weight-only int8 of the backbone's attention and MLP kernels (see
        `DecoderBackbone.quantize`) and of an untied LM head (a tied one
        stays float with the token table). Refused, with the model
        unchanged, for an unsupported mode, a model already quantized, or
        one whose training has started."""
        self.backbone.check_quantize(mode, config, owner=self)
        self.backbone.quantize(mode, config=config, **kwargs)
        if self.lm_head.tied_embedding is None:
            self.lm_head.quantize(mode)
        self.train_function = self.test_function = self.predict_function = None
        self.generate_function = None

    def generate(self, inputs, max_length=None, max_new_tokens=None, stop_token_ids="auto", strip_prompt=False,
                 chat_template=None, stream=False):
        """Generates from prompts or conversations, sharded; see `tp_zoo.models.generation.generate`.

        ```python
        lm.generate("The capital of France is")                 # the prompt and its continuation
        lm.generate([{"role": "user", "content": "Hi!"}])        # the assistant's reply
        for piece in lm.generate("Once upon a time", stream=True):
            print(piece, end="", flush=True)
        ```
        """
        return generation.generate(
            self, inputs, max_length=max_length, max_new_tokens=max_new_tokens,
            stop_token_ids=stop_token_ids, strip_prompt=strip_prompt, chat_template=chat_template, stream=stream,
        )
