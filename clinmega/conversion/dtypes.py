"""dtype choice and casting: keep what was asked, never lose precision silently."""

from __future__ import annotations

import torch

from clinmega.conversion.errors import ConversionError
from clinmega.config.schema import HF_DTYPE_NAMES
from clinmega.models.builder import DTYPES

NAMES = {v: k for k, v in DTYPES.items()}
HF_NAMES = {DTYPES[k]: hf for k, hf in HF_DTYPE_NAMES.items()}  # torch dtype -> config.json torch_dtype


def parse(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ConversionError(f"--dtype: {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def name_of(dtype: torch.dtype, where: str) -> str:
    if dtype not in NAMES:
        raise ConversionError(f"{where}: dtype {dtype} is not supported (only {sorted(DTYPES)})")
    return NAMES[dtype]


def cast(tensor: torch.Tensor, dtype: torch.dtype, name: str, allow_downcast: bool
         ) -> torch.Tensor:
    """``tensor`` in ``dtype``; a narrowing cast that changes any value is refused unless
    ``allow_downcast`` (a narrowing cast of exactly representable values, e.g. RMSNorm weights
    kept in fp32 by megatron's local spec, is not a loss)."""
    if tensor.dtype == dtype:
        return tensor
    out = tensor.to(dtype)
    if allow_downcast or torch.promote_types(tensor.dtype, dtype) == dtype:
        return out
    back = out.to(tensor.dtype)
    same = (back == tensor) | (back.isnan() & tensor.isnan())
    if not bool(same.all()):
        change = (back.float() - tensor.float()).abs().nan_to_num().max().item()
        raise ConversionError(
            f"tensor {name!r}: casting {tensor.dtype} to {dtype} would change values (max abs "
            f"change {change:.3g}); choose --dtype {NAMES.get(tensor.dtype, tensor.dtype)} or "
            "pass --allow-downcast")
    return out
