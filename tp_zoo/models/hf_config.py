"""Reading Hugging Face `config.json` files of every transformers generation."""

from tp_zoo.errors import UnsupportedConfigError

def refuse(config, what):
    raise UnsupportedConfigError(
        f"{config.get('model_type', 'this')} checkpoint with {what} is not supported by tp_zoo."
    )


def rope_settings(config):
    """(rope_theta, rope_scaling) from either the old keys (`rope_theta`,
    `rope_scaling`) or the newer `rope_parameters` dict."""
    params = config.get("rope_parameters")
    if params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") == "default":
            scaling = None
        return float(params.get("rope_theta", 10000.0)), scaling
    scaling = config.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return float(config.get("rope_theta", 10000.0)), scaling
