from tp_zoo.models.opt.opt import OPTBackbone
from tp_zoo.models.opt.opt import OPTCausalLM
