"""What `save_pretrained` writes for a FisherTune adapter, and how it is read back.

Only *active* elements are written, per wrapped layer (checkpoint keys have no
adapter name; `<m>` is the module's key):

- ``<m>.ft_shape``   int64 (ndim,)  the weight's shape (guards against a file made for another model);
- ``<m>.ft_values``  (k,)           the deltas, in ascending flat-index order;
- either ``<m>.ft_index`` int32 (k,) ascending flat indices,
  or     ``<m>.ft_mask``  uint8 (ceil(numel / 8),) a little-endian packed bitmask,
  whichever is smaller ("auto"), or as `FisherTuneConfig.encoding` says.

Index costs 4 bytes per element, the bitmask numel/8 bytes per tensor, so the
mask wins above a density of 1/32 (3.1 %).
"""

from __future__ import annotations

import math

import torch

SUFFIXES = ("ft_shape", "ft_values", "ft_index", "ft_mask")
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


class AdapterFileError(ValueError):
    """A saved FisherTune adapter does not fit the model it is loaded into."""


def choose_encoding(k: int, numel: int, encoding: str) -> str:
    if encoding != "auto":
        return {"bitmask": "mask", "index": "index"}[encoding]
    return "mask" if math.ceil(numel / 8) < 4 * k else "index"


def pack_mask(sorted_flat: torch.Tensor, numel: int) -> torch.Tensor:
    bits = torch.zeros(math.ceil(numel / 8) * 8, dtype=torch.uint8)
    bits[sorted_flat.cpu()] = 1
    return (bits.view(-1, 8) * _BIT_WEIGHTS).sum(1, dtype=torch.uint8)


def unpack_mask(mask: torch.Tensor, numel: int) -> torch.Tensor:
    bits = (mask.to(torch.uint8).view(-1, 1) & _BIT_WEIGHTS).ne(0).view(-1)
    return bits


def encode_layer(indices: torch.Tensor, values: torch.Tensor, shape, encoding: str) -> dict[str, torch.Tensor]:
    """indices/values: the active elements in any order -> the tensors to write (suffix -> tensor)."""
    numel = math.prod(shape)
    flat = indices.detach().long().cpu()
    order = torch.argsort(flat)
    flat = flat[order]
    out = {
        "ft_shape": torch.tensor(list(shape), dtype=torch.int64),
        "ft_values": values.detach().cpu()[order].contiguous(),
    }
    if choose_encoding(flat.numel(), numel, encoding) == "mask":
        out["ft_mask"] = pack_mask(flat, numel)
    else:
        out["ft_index"] = flat.to(torch.int32 if numel <= 2**31 - 1 else torch.int64)
    return out


def decode_layer(name: str, tensors: dict[str, torch.Tensor], weight_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate one layer's saved tensors against `weight_shape`; return (flat indices int64, values)."""
    if "ft_shape" not in tensors or "ft_values" not in tensors:
        missing = [s for s in ("ft_shape", "ft_values") if s not in tensors]
        raise AdapterFileError(f"adapter file: tensor(s) {[f'{name}.{m}' for m in missing]} are missing")
    saved_shape = tuple(int(d) for d in tensors["ft_shape"].tolist())
    if saved_shape != tuple(weight_shape):
        raise AdapterFileError(
            f"adapter file: {name}.ft_shape is {saved_shape}, but the model's weight at {name} has shape "
            f"{tuple(weight_shape)}: the adapter was made for another model"
        )
    numel = math.prod(weight_shape)
    values = tensors["ft_values"]
    if values.dim() != 1 or not values.is_floating_point():
        raise AdapterFileError(f"adapter file: {name}.ft_values must be a 1-D float tensor, got {values.dtype} {tuple(values.shape)}")
    has_index, has_mask = "ft_index" in tensors, "ft_mask" in tensors
    if has_index == has_mask:
        raise AdapterFileError(f"adapter file: {name} needs exactly one of ft_index / ft_mask, found {'both' if has_index else 'neither'}")
    if has_mask:
        mask = tensors["ft_mask"]
        if mask.dtype != torch.uint8 or mask.dim() != 1 or mask.numel() != math.ceil(numel / 8):
            raise AdapterFileError(
                f"adapter file: {name}.ft_mask must be uint8 of length {math.ceil(numel / 8)} for a weight of "
                f"{numel} elements, got {mask.dtype} of length {mask.numel()}"
            )
        bits = unpack_mask(mask, numel)
        if bits[numel:].any():
            raise AdapterFileError(f"adapter file: {name}.ft_mask has bits set past the weight's {numel} elements (out of range)")
        flat = torch.nonzero(bits[:numel]).view(-1)
    else:
        idx = tensors["ft_index"]
        if idx.dim() != 1 or idx.is_floating_point():
            raise AdapterFileError(f"adapter file: {name}.ft_index must be a 1-D integer tensor, got {idx.dtype} {tuple(idx.shape)}")
        flat = idx.long()
        if flat.numel():
            lo, hi = int(flat.min()), int(flat.max())
            if lo < 0 or hi >= numel:
                bad = lo if lo < 0 else hi
                raise AdapterFileError(
                    f"adapter file: {name}.ft_index holds index {bad}, out of range for a weight of shape "
                    f"{tuple(weight_shape)} ({numel} elements)"
                )
            if torch.unique(flat).numel() != flat.numel():
                raise AdapterFileError(f"adapter file: {name}.ft_index holds duplicated indices")
    if flat.numel() != values.numel():
        raise AdapterFileError(
            f"adapter file: {name} has {flat.numel()} selected elements but {values.numel()} values in {name}.ft_values"
        )
    if not torch.isfinite(values).all():
        raise AdapterFileError(f"adapter file: {name}.ft_values holds NaN or inf")
    return flat, values
