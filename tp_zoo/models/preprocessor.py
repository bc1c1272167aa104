"""KerasHub's causal LM preprocessor around the checkpoint's own tokenizer.

`CausalLMPreprocessor` does what `keras_hub.models.CausalLMPreprocessor`
does (strings -> {"token_ids", "padding_mask"} of `sequence_length` tokens,
labels and weights shifted by one), with a `CheckpointTokenizer`: Hugging
Face `tokenizers` or `sentencepiece`, run in Python on numpy, never TF ops.
So the model's entry points (`preprocesses_text`) preprocess strings eagerly,
before keras_hub's input pipeline, which would run a preprocessor inside
`tf.data` where Python tokenizers cannot go.
"""

import functools
from pathlib import Path

import keras
import keras_hub
import numpy as np

from tp_zoo.layers.loss import IGNORED_LABEL
from tp_zoo.models.tokenizer import CheckpointTokenizer
from tp_zoo.models.training_examples import encode_examples
from tp_zoo.models.training_examples import padded_rows


@keras.saving.register_keras_serializable(package="tp_zoo")
class CausalLMPreprocessor(keras_hub.models.CausalLMPreprocessor):
    """Strings -> `(x, y, sample_weight)` for causal LM training.

    Each string is tokenized with the checkpoint's rules (BOS where its
    tokenizer puts one), ended with EOS (`add_end_token`), cut or padded to
    `sequence_length + 1` tokens; `x` is {"token_ids", "padding_mask"} of the
    first `sequence_length`, `y` the ids shifted by one (-100 at padding,
    which the default loss skips, so the loss is the mean over the real
    tokens whatever the padding) and `sample_weight` the mask shifted by
    one (for metrics). Outputs are numpy arrays.

    Instruction examples (dicts: {"messages": [...]}, {"prompt",
    "completion"} or {"text"}; see `tp_zoo.models.training_examples`) are
    encoded whole, one per row, through the chat template for
    conversations; `y` is the next token where the loss trains (the
    assistant's replies, the completion) and -100 elsewhere, which the
    default loss skips, so the loss is the mean over the trained tokens;
    `sample_weight` marks the trained tokens (for metrics). An example
    longer than `sequence_length + 1` tokens is refused rather than cut.

    An id batch ({"token_ids", "padding_mask"}) passes through unchanged, so
    a model with a preprocessor still trains on ids as before.

    ```python
    lm = tp_zoo.from_preset("llama3.2_1b", tp=2)
    lm.preprocessor.sequence_length = 256
    lm.fit(["text one", "text two"], batch_size=2)
    lm.fit([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}])
    x, y, sample_weight = lm.preprocessor(["The quick brown fox."])
    ```

    Args:
        tokenizer: a `tp_zoo.models.tokenizer.CheckpointTokenizer`.
        sequence_length: tokens per row.
        add_start_token: False drops the BOS the tokenizer would start with
            (strings).
        add_end_token: end each string with the tokenizer's EOS (strings).
        chat_template: a Jinja template for conversations in place of the
            checkpoint's.
    """

    def __init__(self, tokenizer, sequence_length=1024, add_start_token=True, add_end_token=True,
                 chat_template=None, **kwargs):
        super().__init__(tokenizer, sequence_length, add_start_token, add_end_token, **kwargs)
        self.chat_template = chat_template
        # keras_hub builds a StartEndPacker layer here; packing is plain numpy.
        self.built = True

    def _pack(self, texts, width, add_end_token):
        """(ids, mask) of (len(texts), width): each text's tokens, cut so that
        its EOS stays, then right padded with id 0 (masked out)."""
        tokenizer = self.tokenizer
        end = [tokenizer.end_token_id] if add_end_token and tokenizer.end_token_id is not None else []
        ids = np.zeros((len(texts), width), "int32")
        mask = np.zeros((len(texts), width), bool)
        for row, text in enumerate(texts):
            tokens = tokenizer.encode(text)
            if not self.add_start_token and tokens[:1] == [tokenizer.bos_id]:
                tokens = tokens[1:]
            tokens = tokens[: width - len(end)] + end
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = True
        return ids, mask

    def __call__(self, *args, **kwargs):
        # Plain numpy, run eagerly: Keras' Layer.__call__ adds nothing here
        # but would wrap our errors (an example too long) in a dump of the
        # call's arguments.
        if len(args) == 1 and type(args[0]) is tuple and len(args[0]) in (2, 3):
            args = args[0]  # an (x, y[, sample_weight]) element, unpacked as keras_hub does
        return self.call(*args, **kwargs)

    def call(self, x, y=None, sample_weight=None, sequence_length=None):
        if _is_id_batch(x):
            return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)
        if y is not None or sample_weight is not None:
            raise ValueError(
                "A causal LM makes its own labels from text (each next token) and weights (the "
                "padding mask); pass strings or examples alone, or ids with labels as a {'token_ids', "
                "'padding_mask'} batch."
            )
        examples = _examples(x)
        if examples is not None:
            named = [(f"Example {i}", example) for i, example in enumerate(examples)]
            encoded = encode_examples(self.tokenizer, named, self.chat_template)
            x, labels = padded_rows(encoded, sequence_length or self.sequence_length, names=[n for n, _ in named])
            return x, labels, labels != IGNORED_LABEL  # the weights count the trained tokens in metrics
        texts, single = _as_texts(x)
        # One token more than the model sees: the labels are the ids shifted by one.
        ids, mask = self._pack(texts, (sequence_length or self.sequence_length) + 1, self.add_end_token)
        x = {"token_ids": ids[:, :-1], "padding_mask": mask[:, :-1]}
        # Padding's labels are skipped by the loss, so that its mean is over the
        # real tokens (a weight of 0 alone would only add zeros to the mean).
        labels = np.where(mask[:, 1:], ids[:, 1:], IGNORED_LABEL).astype("int32")
        outputs = (x, labels, mask[:, 1:])
        return keras.tree.map_structure(lambda a: a[0], outputs) if single else outputs

    def generate_preprocess(self, x, sequence_length=None):
        """Prompts -> {"token_ids", "padding_mask"}, right padded, without EOS."""
        texts, single = _as_texts(x)
        ids, mask = self._pack(texts, sequence_length or self.sequence_length, add_end_token=False)
        return {"token_ids": ids[0], "padding_mask": mask[0]} if single else {"token_ids": ids, "padding_mask": mask}

    def generate_postprocess(self, x):
        """{"token_ids", "padding_mask"} -> strings, without padding or special tokens."""
        ids, mask = np.asarray(x["token_ids"]), np.asarray(x["padding_mask"]).astype(bool)
        if ids.ndim == 1:
            return self.tokenizer.decode(ids[mask])
        return [self.tokenizer.decode(row[row_mask]) for row, row_mask in zip(ids, mask)]

    # --- saving: settings in the config, the tokenizer's files as assets ------------
    def get_config(self):
        # Not keras_hub's Preprocessor.get_config: it serializes the tokenizer as
        # a Keras layer, and ours is plain Python.
        config = keras.layers.Layer.get_config(self)
        config.update(
            tokenizer=self.tokenizer.get_config(),
            sequence_length=self.sequence_length,
            add_start_token=self.add_start_token,
            add_end_token=self.add_end_token,
            chat_template=self.chat_template,
            config_file=self.config_file,
        )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**{**config, "tokenizer": CheckpointTokenizer.from_config(config["tokenizer"])})

    def save_assets(self, dir_path):
        self.tokenizer.write_files(dir_path)

    def load_assets(self, dir_path):
        self.tokenizer.read_files(dir_path)

    # KerasHub presets (`lm.save_to_preset(dir)`) hold assets in assets/<config name>/.
    def save_to_preset(self, preset_dir):
        super().save_to_preset(preset_dir)
        assets = Path(preset_dir) / "assets" / Path(self.config_file).stem
        assets.mkdir(parents=True, exist_ok=True)
        self.save_assets(assets)

    def load_preset_assets(self, preset):
        self.load_assets(Path(preset) / "assets" / Path(self.config_file).stem)


def _strings(x):
    """`x` as a list of str if it is a batch of strings (a list, tuple or
    numpy array of them), else None."""
    if isinstance(x, np.ndarray) and x.dtype.kind in "UO":
        x = x.tolist()
    if isinstance(x, (list, tuple)) and x and all(isinstance(t, str) for t in x):
        return list(x)
    return None


def _is_id_batch(x):
    return isinstance(x, dict) and "token_ids" in x


def _examples(x):
    """`x` as a list of instruction examples (checked as they are encoded)
    if it is a batch of dicts (a list or numpy array of them), else None."""
    if _is_id_batch(x):
        return None
    if isinstance(x, np.ndarray) and x.dtype.kind == "O":
        x = x.tolist()
    if isinstance(x, dict):
        raise ValueError("Pass a batch: a list of examples ({'messages': [...]}, {'prompt', 'completion'} or "
                         "{'text'}), or ids as a {'token_ids', 'padding_mask'} batch.")
    if not (isinstance(x, (list, tuple)) and x and all(isinstance(e, (str, dict)) for e in x)
            and any(isinstance(e, dict) and not _is_id_batch(e) for e in x)):
        return None  # (an (x, y, sample_weight) tuple of ids is not a batch of examples)
    return list(x)


def _as_texts(x):
    """(list of str, given as one string?)."""
    if isinstance(x, str):
        return [x], True
    texts = _strings(x)
    if texts is None:
        raise ValueError(
            "CausalLMPreprocessor takes strings (a list or numpy array) or a {'token_ids', "
            f"'padding_mask'}} batch; got {type(x).__name__}. Its tokenizer runs in Python, not "
            "inside tf.data pipelines: pass the strings themselves."
        )
    return texts, False


# --- the model's entry points -----------------------------------------------------------
def _is_text(x, entry):
    """Whether `x` is a batch of strings or of instruction examples (dicts);
    refuses the ambiguous: a lone string, an empty list, strings mixed with
    other values."""
    if isinstance(x, str):
        raise ValueError(f"{entry}() takes a batch: wrap the string in a list.")
    if isinstance(x, (list, tuple)) and not x:
        raise ValueError(
            f"{entry}() got an empty list: pass at least one string, or ids as a "
            "{'token_ids', 'padding_mask'} batch."
        )
    if _strings(x) is not None or _examples(x) is not None:
        return True
    if isinstance(x, (list, tuple)) and any(isinstance(t, str) for t in x):
        raise ValueError(f"{entry}() got a list mixing strings and other values; pass strings only.")
    return False


def _preprocess(lm, texts, entry):
    if lm.preprocessor is None:
        raise ValueError(
            f"This model has no tokenizer (its checkpoint has no tokenizer files), so {entry}() "
            "cannot take strings: pass ids as a {'token_ids', 'padding_mask'} batch (with labels to "
            "train), or build the model with `tokenizer=` or `preprocessor=`."
        )
    limit = lm.backbone.max_sequence_length
    if (getattr(lm.preprocessor, "sequence_length", None) or 0) > limit:
        raise ValueError(
            f"preprocessor.sequence_length={lm.preprocessor.sequence_length} is beyond the model's "
            f"{limit} positions."
        )
    return keras.utils.unpack_x_y_sample_weight(lm.preprocessor(texts))


def preprocesses_text(method):
    """Wraps a Keras entry point of a causal LM (fit, evaluate, predict and the
    *_on_batch ones) so that string inputs (and fit's validation_data) become
    ids, labels and weights first, eagerly, through `lm.preprocessor`; ids go
    through untouched."""
    entry = method.__name__
    takes_labels = not entry.startswith("predict")

    @functools.wraps(method)
    def wrapper(lm, x=None, *args, **kwargs):
        if _is_text(x, entry) and not takes_labels:
            x, _, _ = _preprocess(lm, x, entry)
        elif _is_text(x, entry):
            # The labels take y's place (the first positional argument after x).
            given = args[0] if args else kwargs.pop("y", None)
            if given is not None or kwargs.get("sample_weight") is not None:
                raise ValueError(
                    f"{entry}() on strings makes its own labels (each next token) and weights "
                    "(the padding mask): pass no y or sample_weight."
                )
            x, y, kwargs["sample_weight"] = _preprocess(lm, x, entry)
            args = (y, *args[1:])
        if _is_text(kwargs.get("validation_data"), entry):
            kwargs["validation_data"] = _preprocess(lm, kwargs["validation_data"], entry)
        return method(lm, x, *args, **kwargs)

    return wrapper
