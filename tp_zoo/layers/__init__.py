"""Shared tensor-parallel layers; every model family is built from these."""

from tp_zoo.layers.attention import ParallelAttention
from tp_zoo.layers.base import ShardedLayer
from tp_zoo.layers.base import weights_from
from tp_zoo.layers.decoder_block import DecoderBlock
from tp_zoo.layers.embedding import VocabParallelEmbedding
from tp_zoo.layers.embedding import VocabParallelLMHead
from tp_zoo.layers.fused_linear import MergedColumnParallelDense
from tp_zoo.layers.fused_linear import QKVParallelDense
from tp_zoo.layers.linear import ColumnParallelDense
from tp_zoo.layers.linear import HeadMergeDense
from tp_zoo.layers.linear import RowParallelDense
from tp_zoo.layers.mlp import ParallelMLP
from tp_zoo.layers.replicated import LayerNorm
from tp_zoo.layers.replicated import PositionEmbedding
from tp_zoo.layers.replicated import RMSNorm
from tp_zoo.layers.rotary import RotaryEmbedding
