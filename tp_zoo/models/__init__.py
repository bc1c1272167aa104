"""Model families; each a backbone and a causal LM built from tp_zoo.layers."""

from tp_zoo.models.gpt2 import GPT2CausalLM
from tp_zoo.models.hf_config import family_of
from tp_zoo.models.llama import LlamaCausalLM
from tp_zoo.models.opt import OPTCausalLM

CAUSAL_LMS = {"opt": OPTCausalLM, "gpt2": GPT2CausalLM, "llama": LlamaCausalLM}


def causal_lm_class(config):
    """The CausalLM class of the family a Hugging Face config belongs to."""
    return CAUSAL_LMS[family_of(config)]
