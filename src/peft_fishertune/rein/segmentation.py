"""The paper's model: a frozen backbone, Rein on every block, a Mask2Former decoder whose queries come from Rein's
tokens; Rein and the decoder train together from the first iteration (the reference recipe has no stages).

    seg = build_segmentation_model("dinov2", "facebook/dinov2-large", num_labels=19,
                                   decoder_config=rein_decoder_config())
    model = get_rein_segmentation_model(seg)        # a PeftModel; model.save_pretrained(dir) writes Rein + decoder
"""

from __future__ import annotations

from typing import Optional, Union

from torch import nn

from .config import ReinConfig
from .layer import ReinLayer


def rein_decoder_config(token_length: int = 100, replace_query_feat: bool = True, **overrides) -> dict:
    """Mask2Former fields for Rein's query linking: num_queries = token_length, and `replace_query_feat` (the
    reference's setting: the linked queries also give the initial query features, through a Linear(256, 256) in the
    decoder). Pass as `build_segmentation_model(..., decoder_config=rein_decoder_config())`."""
    return {"num_queries": token_length, "replace_query_feat": replace_query_feat, **overrides}


def get_rein_segmentation_model(seg, config: Union[ReinConfig, dict, None] = None, adapter_name: str = "default"):
    """Wrap a `SegmentationModel` with Rein: backbone frozen, Rein (tokens, shared MLPs, scale, query linking) and
    the decoder (`modules_to_save`) trainable. With query linking, the decoder's own query tables that the linked
    queries replace are frozen (they get no gradient). Returns the `PeftModel`."""
    from peft import get_peft_model

    from ..models.segmentor import SegmentationModel

    if not isinstance(seg, SegmentationModel):
        raise TypeError(f"get_rein_segmentation_model expects a SegmentationModel, got {type(seg).__name__}")
    if config is None or isinstance(config, dict):
        kw = dict(config or {})
        kw.setdefault("modules_to_save", seg.decoder_module_names())
        if seg.decoder_type != "mask2former":
            kw.setdefault("link_token_to_query", False)
        else:  # the linked queries take the decoder's width (256 in the paper's setting)
            kw.setdefault("query_dims", seg.decode_head.config.hidden_dim)
        config = ReinConfig(**kw)
    if not isinstance(config, ReinConfig):
        raise TypeError(f"config must be a ReinConfig or a dict of its fields, got {type(config).__name__}")
    model = get_peft_model(seg, config, adapter_name=adapter_name)
    if config.link_token_to_query:
        head = seg.decode_head
        trained = head.modules_to_save[adapter_name] if hasattr(head, "modules_to_save") else head
        for table in _replaced_query_tables(trained):
            table.requires_grad_(False)
    return model


def _replaced_query_tables(decoder) -> list[nn.Module]:
    tm = decoder.transformer_module
    return [tm.queries_embedder] + ([tm.queries_features] if getattr(decoder, "replace_query_feat", False) else [])


def rein_trainable_parameters(model: nn.Module, adapter_name: Optional[str] = None) -> list[nn.Parameter]:
    """Rein's parameters in `model` (tokens of every block + the shared ones, each once), in `model.parameters()`
    order; one adapter, or every adapter when `adapter_name` is None. What a trainer unfreezes for Rein."""
    ids = set()
    for m in model.modules():
        if isinstance(m, ReinLayer):
            for container in (m.rein_tokens_a, m.rein_tokens_b, m.rein_shared):
                for name, item in container.items():
                    if adapter_name is None or name == adapter_name:
                        ps = item.parameters() if isinstance(item, nn.Module) else [item]
                        ids.update(id(p) for p in ps)
    return [p for p in model.parameters() if id(p) in ids]
