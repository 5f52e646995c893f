"""timm image models (``--model timm:NAME``), built without pretrained weights.

Attention blocks that would call a fused ``scaled_dot_product_attention`` kernel (timm's ``fused_attn``), which has
no double backward, are switched to timm's explicit attention (``attn_implementation="eager"``, the default) or
left fused (``"sdpa"``, which hessspec evaluates under the exact MATH kernel).
"""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from hessspec.models._errors import ModelError, UnknownModelError
from hessspec.models._extras import import_extra

PREFIX = "timm:"
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
DEFAULT_ATTENTION = "eager"
# create_model arguments that load weights from somewhere.
_WEIGHT_SOURCES = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")


def build(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)``, with eager attention unless asked otherwise.

    Args:
        name: a timm model name (``timm.list_models()``), e.g. ``"resnet10t"``.
        kwargs: model arguments (``num_classes``, ``in_chans``, ``img_size``, ...) and ``attn_implementation``.

    Returns:
        The freshly initialised model.

    Raises:
        ModelError: timm is not installed, arguments that would load weights, a bad attention implementation, or
            arguments the model does not accept.
        UnknownModelError: a name timm does not know.
    """
    timm = import_extra("timm", f"--model timm:{name}", ModelError)
    arguments = dict(kwargs)
    attention = arguments.pop("attn_implementation", DEFAULT_ATTENTION)
    if attention not in ATTENTION_IMPLEMENTATIONS:
        msg = f"attn_implementation must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}, got {attention!r}"
        raise ModelError(msg)
    loading = [key for key in _WEIGHT_SOURCES if arguments.get(key) not in (None, False)]
    if loading:
        msg = f"timm:{name} is always built without pretrained weights (no downloads); drop {', '.join(loading)}="
        raise ModelError(msg)
    known = timm.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join('timm:' + c for c in close)}?)" if close else ""
        msg = f"unknown timm model 'timm:{name}'{hint}; timm {timm.__version__} lists its models in timm.list_models()"
        raise UnknownModelError(msg)
    try:
        model = timm.create_model(name, pretrained=False, **arguments)
    except (TypeError, ValueError, AssertionError, RuntimeError) as error:
        msg = f"cannot build timm:{name} with {kwargs}: {type(error).__name__}: {' '.join(str(error).split())}"
        raise ModelError(msg) from error
    if attention == "eager":
        for module in model.modules():
            if isinstance(getattr(module, "fused_attn", None), bool):
                module.fused_attn = False
    return model
