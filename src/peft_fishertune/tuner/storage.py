"""What `save_pretrained` writes for a FisherTune adapter, and how it is read back.

Only *active* elements are written, per wrapped layer (checkpoint keys have no
adapter name; `<m>` is the module's key):

- ``<m>.ft_shape``   int64 (ndim,)  the weight's shape (guards against a file made for another model);
- ``<m>.ft_values``  (k,)           the deltas, in ascending flat-index order;
- one of ``<m>.ft_index`` int32 (k,) ascending flat indices (4 bytes per element),
         ``<m>.ft_mask``  uint8 (ceil(numel / 8),) a little-endian packed bitmask (numel / 8 bytes),
         ``<m>.ft_gaps``  uint8 gap codes: the distances between consecutive selected indices, one byte
                          each when < 256; a 0 byte means "skip 255 positions" (about 1 byte per element
                          at densities between ~0.5 % and ~10 %),
  whichever is smallest ("auto"), or as `FisherTuneConfig.encoding` says. All three are lossless.

While a selection is only partly grown (some candidates not yet active), the ranked candidate list is kept too, so
a reloaded adapter has exactly the saved state and can keep growing:

- ``<m>.ft_pending``   int32 (p,)  ascending flat indices of the candidates not yet active (their deltas are 0);
- ``<m>.ft_rank``      int32 (k + p,) each candidate's rank, candidates in ascending flat-index order;
- ``<m>.ft_threshold`` int64 (1,)  the active set is ``rank < threshold``.

A fully grown adapter (every candidate active, as at the end of stage 3) writes none of these.

Checksums (so that a changed byte cannot load as a valid but different selection; e.g. one byte of ``ft_gaps``
moves every later element):

- ``<m>.ft_check``      int64 (2,)  CRC-32 of the decoded flat indices (int64, little-endian, ascending) and of
                                    ``ft_values``' bytes as stored;
- ``<m>.ft_rank_check`` int64 (1,)  CRC-32 of the ranked candidate list (pending indices, ranks, threshold, as
                                    int64), written with the ranking tensors.

They are verified after decoding, whatever the encoding, and a mismatch is an `AdapterFileError` naming the
tensor. Files saved before checksums existed load with one warning per process (refusing them would strand
every adapter trained so far; their structural checks still run).
"""

from __future__ import annotations

import math
import warnings
import zlib

import torch

SUFFIXES = ("ft_shape", "ft_values", "ft_index", "ft_mask", "ft_gaps", "ft_pending", "ft_rank", "ft_threshold",
            "ft_check", "ft_rank_check")
RANKING_KEYS = ("ft_pending", "ft_rank", "ft_threshold")
INDEX_KEYS = ("ft_index", "ft_mask", "ft_gaps")
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


INDEX_DTYPE_LIMIT = 2**31 - 1


def index_dtype_for(numel: int) -> torch.dtype:
    """int32 for positions in a tensor of up to 2**31 - 1 elements, else int64 (in memory and on disk)."""
    return torch.int32 if numel <= INDEX_DTYPE_LIMIT else torch.int64


class AdapterFileError(ValueError):
    """A saved FisherTune adapter does not fit the model it is loaded into."""


def crc32(*tensors: torch.Tensor) -> int:
    """CRC-32 over the tensors' bytes in order (CPU, contiguous; any dtype)."""
    crc = 0
    for t in tensors:
        t = t.detach().cpu().contiguous()
        if t.numel():
            crc = zlib.crc32(t.view(-1).view(torch.uint8).numpy(), crc)
    return crc


def _crc_int64(*tensors: torch.Tensor) -> int:
    return crc32(*[t.to(torch.int64) for t in tensors])


_warned_unchecked = False


def _warn_unchecked(name: str) -> None:
    global _warned_unchecked
    if not _warned_unchecked:
        _warned_unchecked = True
        warnings.warn(
            f"adapter file has no checksums ({name}.ft_check is absent: saved before they were added), so its index "
            "encoding and values are loaded unverified; save it again to add them (warned once per process)",
            stacklevel=3,
        )


def gap_codes(sorted_flat: torch.Tensor) -> torch.Tensor:
    """Ascending unique indices -> uint8 codes (gap g >= 1 becomes (g - 1) // 255 zeros, then g - 255 * zeros)."""
    if sorted_flat.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    gaps = torch.diff(sorted_flat, prepend=torch.tensor([-1], dtype=sorted_flat.dtype))
    escapes = (gaps - 1) // 255
    last = gaps - 255 * escapes
    counts = escapes + 1
    codes = torch.zeros(int(counts.sum()), dtype=torch.uint8)
    codes[torch.cumsum(counts, 0) - 1] = last.to(torch.uint8)
    return codes


def gap_decode(codes: torch.Tensor) -> torch.Tensor:
    steps = torch.where(codes == 0, 255, codes.long())
    return (torch.cumsum(steps, 0) - 1)[codes != 0]


def encoded_sizes(sorted_flat: torch.Tensor, numel: int) -> dict[str, int]:
    k = sorted_flat.numel()
    gaps = torch.diff(sorted_flat, prepend=torch.tensor([-1], dtype=sorted_flat.dtype)) if k else sorted_flat
    return {"index": 4 * k, "mask": math.ceil(numel / 8), "gaps": int(((gaps - 1) // 255 + 1).sum()) if k else 0}


def choose_encoding(sorted_flat: torch.Tensor, numel: int, encoding: str) -> str:
    if encoding != "auto":
        return {"bitmask": "mask", "index": "index", "gaps": "gaps"}[encoding]
    sizes = encoded_sizes(sorted_flat, numel)
    return min(sizes, key=sizes.get)


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
    kind = choose_encoding(flat, numel, encoding)
    if kind == "mask":
        out["ft_mask"] = pack_mask(flat, numel)
    elif kind == "gaps":
        out["ft_gaps"] = gap_codes(flat)
    else:
        out["ft_index"] = flat.to(index_dtype_for(numel))
    out["ft_check"] = torch.tensor([_crc_int64(flat), crc32(out["ft_values"])], dtype=torch.int64)
    return out


def _verify(name: str, tensors: dict[str, torch.Tensor], flat: torch.Tensor, values: torch.Tensor, kind: str) -> None:
    check = tensors.get("ft_check")
    if check is None:
        _warn_unchecked(name)
        return
    if check.dtype != torch.int64 or check.shape != (2,):
        raise AdapterFileError(f"adapter file: {name}.ft_check must be int64 of shape (2,), got {check.dtype} "
                               f"{tuple(check.shape)}")
    want_idx, want_val = (int(v) for v in check.tolist())
    if _crc_int64(flat) != want_idx:
        raise AdapterFileError(
            f"adapter file: {name}.{kind} decodes to {flat.numel()} indices that do not match {name}.ft_check (CRC-32 "
            f"{_crc_int64(flat):#010x}, saved {want_idx:#010x}): the index encoding was changed or damaged; the "
            "elements would land in other positions"
        )
    if crc32(values) != want_val:
        raise AdapterFileError(
            f"adapter file: {name}.ft_values does not match {name}.ft_check (CRC-32 {crc32(values):#010x}, saved "
            f"{want_val:#010x}): the values were changed or damaged"
        )


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
    present = [k for k in INDEX_KEYS if k in tensors]
    if len(present) != 1:
        raise AdapterFileError(f"adapter file: {name} needs exactly one of ft_index / ft_mask / ft_gaps, found {present or 'none'}")
    if present[0] == "ft_gaps":
        codes = tensors["ft_gaps"]
        if codes.dtype != torch.uint8 or codes.dim() != 1 or (codes.numel() and codes[-1] == 0):
            raise AdapterFileError(f"adapter file: {name}.ft_gaps must be 1-D uint8 gap codes not ending in an escape (0)")
        flat = gap_decode(codes)
        if flat.numel() and int(flat[-1]) >= numel:
            raise AdapterFileError(
                f"adapter file: {name}.ft_gaps reaches index {int(flat[-1])}, out of range for a weight of shape "
                f"{tuple(weight_shape)} ({numel} elements)"
            )
    elif present[0] == "ft_mask":
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
    _verify(name, tensors, flat, values, present[0])
    return flat, values


def encode_ranking(indices: torch.Tensor, ranks: torch.Tensor, threshold: int) -> dict[str, torch.Tensor]:
    """The ranked candidate list of a partly grown selection (indices ascending, ranks aligned)."""
    indices, ranks = indices.detach().cpu(), ranks.detach().cpu()
    out = {
        "ft_pending": indices[ranks >= threshold].contiguous(),
        "ft_rank": ranks.contiguous(),
        "ft_threshold": torch.tensor([int(threshold)], dtype=torch.int64),
    }
    out["ft_rank_check"] = torch.tensor([_crc_int64(out["ft_pending"], out["ft_rank"], out["ft_threshold"])],
                                        dtype=torch.int64)
    return out


def decode_ranking(name: str, tensors: dict[str, torch.Tensor], active: torch.Tensor, weight_shape):
    """None for a fully grown adapter; else (candidate indices ascending, ranks, threshold, active mask)."""
    present = [k for k in RANKING_KEYS if k in tensors]
    if not present:
        return None
    missing = [k for k in RANKING_KEYS if k not in tensors]
    if missing:
        raise AdapterFileError(
            f"adapter file: {name} has {present} but not {missing}: a ranked candidate list needs all three"
        )
    numel = math.prod(weight_shape)
    pending, ranks, thr = tensors["ft_pending"], tensors["ft_rank"], tensors["ft_threshold"]
    for key, t in (("ft_pending", pending), ("ft_rank", ranks)):
        if t.dim() != 1 or t.is_floating_point() or t.dtype == torch.bool:
            raise AdapterFileError(f"adapter file: {name}.{key} must be a 1-D integer tensor, got {t.dtype} {tuple(t.shape)}")
    if thr.numel() != 1 or thr.is_floating_point():
        raise AdapterFileError(f"adapter file: {name}.ft_threshold must be one integer, got {thr.dtype} {tuple(thr.shape)}")
    rcheck = tensors.get("ft_rank_check")
    if rcheck is None and "ft_check" in tensors:
        raise AdapterFileError(f"adapter file: {name} has ft_check but no ft_rank_check for its ranked candidate list "
                               "(a file with checksums has both)")
    if rcheck is not None:
        got = _crc_int64(pending.reshape(-1), ranks.reshape(-1), thr.reshape(-1))
        if rcheck.numel() != 1 or int(rcheck.reshape(-1)[0]) != got:
            raise AdapterFileError(
                f"adapter file: {name}.ft_pending / ft_rank / ft_threshold do not match {name}.ft_rank_check: the "
                "ranked candidate list was changed or damaged"
            )
    pending = pending.long()
    if pending.numel() and (int(pending.min()) < 0 or int(pending.max()) >= numel):
        raise AdapterFileError(f"adapter file: {name}.ft_pending holds indices out of range for a weight of {numel} elements")
    indices, counts = torch.unique(torch.cat([active, pending]), return_counts=True)
    if indices.numel() != active.numel() + pending.numel():
        raise AdapterFileError(f"adapter file: {name}.ft_pending repeats indices (or ones already active)")
    if ranks.numel() != indices.numel():
        raise AdapterFileError(
            f"adapter file: {name}.ft_rank has {ranks.numel()} entries for {indices.numel()} candidates "
            f"({active.numel()} active + {pending.numel()} pending)"
        )
    threshold = int(thr.reshape(-1)[0])
    ranks = ranks.long()
    is_active = torch.isin(indices, active)
    if ranks.numel() and (int(ranks.min()) < 0 or not torch.equal(ranks < threshold, is_active)):
        raise AdapterFileError(
            f"adapter file: {name}.ft_rank / ft_threshold do not agree with the active elements "
            "(the active set must be exactly the candidates with rank < threshold)"
        )
    return indices, ranks, threshold, is_active
