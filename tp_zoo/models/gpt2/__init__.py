from tp_zoo.models.gpt2.gpt2 import GPT2Backbone
from tp_zoo.models.gpt2.gpt2 import GPT2CausalLM
