"""The format record every GGUF tensor type implements (its exact float32 kernels are in ``jit.py``, compiled,
and ``kernels.py``, torch).

Conventions (all formats):
- A weight matrix is a torch tensor ``[rows, cols]`` (``rows`` = output features, ``cols`` = input
  features = GGUF ``ne0``, the row length). Blocks run along a row, so a format is legal for a matrix
  only when ``cols`` is a multiple of its block size.
- An importance matrix (imatrix) is one float32 weight per input column (``[cols]``), what
  ``llama-imatrix`` stores; inside a block it becomes the per-weight ``quant_weights`` of ggml.
- ``encode(x, qw)`` maps ``x: float32[rows, nblocks, block_size]`` and ``qw`` (same shape, or ``None``
  for ggml's reference path without an imatrix) to the GGUF block bytes ``uint8[rows, nblocks, type_size]``.
  Rows are kept because some imatrix paths use row-level statistics (Q4_0's sigma2 is over the whole row).
  ``decode`` maps ``uint8[n, type_size]`` to ``float32[n, block_size]``. Every float32 sum adds its terms
  in ggml's order, so that it rounds exactly as the C reference does; ``encode`` may assume finite weights
  (``quantize`` refuses others).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gguf
import numpy as np
import torch

from ramp.errors import RampError

Encoder = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
Decoder = Callable[[torch.Tensor], torch.Tensor]


class FormatError(RampError, ValueError):
    """A weight, shape or imatrix that a format cannot take (the message names the bad value)."""


@dataclass(frozen=True)
class QuantFormat:
    """One GGUF tensor type: its layout, its quantizer (compiled or torch) and its torch dequantizer."""

    name: str
    ggml_type: gguf.GGMLQuantizationType
    block_size: int  # weights per block
    type_size: int  # bytes per block
    encode: Encoder
    decode: Decoder
    uses_imatrix: bool = True  # False: the quantizer ignores an imatrix (Q8_0, F16, ...)

    @property
    def type_id(self) -> int:
        return int(self.ggml_type)

    @property
    def bpw(self) -> float:
        """Bits per weight, block scales included."""
        return 8.0 * self.type_size / self.block_size

    def is_legal(self, shape: tuple[int, ...] | torch.Size) -> bool:
        """True when the row length (last dimension) is a whole number of blocks."""
        return len(shape) >= 1 and shape[-1] > 0 and shape[-1] % self.block_size == 0

    def check_shape(self, shape: tuple[int, ...] | torch.Size, name: str = "tensor") -> None:
        if not self.is_legal(shape):
            raise FormatError(
                f"{self.name} needs a row length that is a multiple of {self.block_size}; "
                f"{name} has shape {tuple(shape)} (row length {shape[-1] if len(shape) else None})"
            )

    def bytes_for(self, shape: tuple[int, ...] | torch.Size) -> int:
        """Exact bytes of the tensor data in this format (raises if the shape is illegal)."""
        self.check_shape(shape)
        n = 1
        for d in shape:
            n *= int(d)
        return n // self.block_size * self.type_size

    def quantize(
        self,
        weight: torch.Tensor | np.ndarray,
        imatrix: torch.Tensor | np.ndarray | None = None,
        name: str = "tensor",
    ) -> np.ndarray:
        """Quantize ``weight[rows, cols]`` to GGUF block bytes, ``uint8[rows, cols // block * type_size]``."""
        w = torch.as_tensor(weight)
        if w.ndim == 1:
            w = w.unsqueeze(0)
        if w.ndim != 2:
            raise FormatError(f"{name}: expected a 2-D weight [rows, cols], got shape {tuple(w.shape)}")
        self.check_shape(w.shape, name)
        from ramp.formats.kernels import all_finite, broadcast_rows

        w = w.detach().to(torch.float32).contiguous()
        if not all_finite(w):
            bad = (~torch.isfinite(w)).sum().item()
            raise FormatError(f"{name}: weight has {bad} NaN/Inf values; cannot quantize to {self.name}")
        rows, cols = w.shape
        nb = cols // self.block_size
        blocks = w.reshape(rows, nb, self.block_size)
        qw = None
        if imatrix is not None and self.uses_imatrix:
            im = torch.as_tensor(imatrix).detach().to(torch.float32).reshape(-1)
            if im.numel() != cols:
                raise FormatError(f"{name}: imatrix has {im.numel()} entries, expected one per column ({cols})")
            if not torch.isfinite(im).all() or (im < 0).any():
                raise FormatError(f"{name}: imatrix must be finite and non-negative")
            qw = broadcast_rows(im.reshape(nb, self.block_size), rows)
        out = self.encode(blocks, qw)
        assert out.dtype == torch.uint8 and out.shape == (rows, nb, self.type_size), (out.dtype, out.shape)
        return out.reshape(rows, nb * self.type_size).numpy()

    def dequantize(self, data: np.ndarray | bytes | torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """Decode GGUF block bytes of a ``[rows, cols]`` tensor to float32."""
        self.check_shape(shape)
        raw = torch.as_tensor(
            np.frombuffer(bytes(data), dtype=np.uint8)
            if isinstance(data, bytes)
            else np.ascontiguousarray(data).view(np.uint8).reshape(-1)
            if isinstance(data, np.ndarray)
            else data.reshape(-1)
        )
        expected = self.bytes_for(shape)
        if raw.numel() != expected:
            raise FormatError(f"{self.name} data for shape {tuple(shape)} must be {expected} bytes, got {raw.numel()}")
        blocks = raw.reshape(-1, self.type_size)
        return self.decode(blocks).reshape(shape)
