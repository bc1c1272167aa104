from tp_zoo.models.llama.llama import LlamaBackbone
from tp_zoo.models.llama.llama import LlamaCausalLM
