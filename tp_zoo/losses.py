"""Public losses."""

from tp_zoo.layers.loss import VocabParallelCrossEntropy
from tp_zoo.layers.loss import vocab_parallel_cross_entropy
