"""Which layers are the model's edges: the first layers taking the raw input and the task head.

The literature keeps these at 8 bits (or float); `prepare_model` applies that policy and the
objective taps the input of the head. Both rules use the model's own structure, never names:
- input layers: every `nn.Embedding` (they all read raw ids: token, position, token-type) and,
  for models without embeddings (CNNs, ViT), the first supported layer in module order (the stem
  conv / patch projection); for Hugging Face models `get_input_embeddings()` is preferred.
- head: Hugging Face `get_output_embeddings()` when it exists (lm_head), else the last supported
  layer in module order (classifier of ViT, ResNet, ConvNeXt, BERT).
"""

from __future__ import annotations

from torch import nn

from .modules.registry import is_fake_quantized, is_supported_layer, supported_type_names


def supported_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All layers the plugin can quantize (or has quantized), in module (registration) order."""
    return [
        (name, mod)
        for name, mod in model.named_modules()
        if is_supported_layer(mod, name) or is_fake_quantized(mod, name)
    ]


def _name_of(model: nn.Module, target: nn.Module) -> str | None:
    for name, mod in model.named_modules():
        if mod is target:
            return name
    return None


def find_input_layers(model: nn.Module) -> list[str]:
    """Names of the supported layers that read the raw model input.

    Raises:
        ValueError: the model has no supported layer at all.
    """
    layers = supported_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no layer the plugin can quantize "
            f"(supported: {', '.join(supported_type_names())})."
        )
    names = [name for name, mod in layers if isinstance(mod, nn.Embedding)]
    get_inputs = getattr(model, "get_input_embeddings", None)
    if not names and callable(get_inputs):
        try:
            emb = get_inputs()
        except (NotImplementedError, AttributeError):
            emb = None
        if isinstance(emb, nn.Module):
            prefix = _name_of(model, emb)
            if prefix is not None:
                inside = [n for n, _ in layers if n == prefix or n.startswith(prefix + ".")]
                names = inside[:1]
    if not names:
        names = [layers[0][0]]
    return names


def find_head_layer(model: nn.Module) -> str:
    """Name of the task head: the output embedding (LMs) or the last supported layer.

    Raises:
        ValueError: the model has no supported layer at all.
    """
    get_outputs = getattr(model, "get_output_embeddings", None)
    if callable(get_outputs):
        try:
            head = get_outputs()
        except (NotImplementedError, AttributeError):
            head = None
        if isinstance(head, nn.Module):
            name = _name_of(model, head)
            if name:
                return name
    layers = supported_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no layer the plugin can quantize, so no task head was found; "
            "name the tap layer explicitly with MECQuantConfig(mec_tap_modules=[...])."
        )
    return layers[-1][0]
