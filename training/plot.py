"""A loss-curve PNG with no plotting library: a white canvas, light axes, the curve in blue.
Written with zlib; deterministic for the same losses."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np


def _png(rgb_HxWx3: np.ndarray) -> bytes:
    h, w, _ = rgb_HxWx3.shape
    raw = b"".join(b"\x00" + rgb_HxWx3[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def loss_curve_png(losses: list[float], path: str | Path, width: int = 480, height: int = 240, pad: int = 20) -> None:
    img = np.full((height, width, 3), 255, np.uint8)
    img[height - pad, pad : width - pad] = (160, 160, 160)  # x axis
    img[pad : height - pad, pad] = (160, 160, 160)  # y axis
    if losses:
        y = np.asarray(losses, np.float64)
        lo, hi = float(y.min()), float(y.max())
        xs = np.linspace(pad, width - pad - 1, num=max(len(y), 2))[: len(y)]
        ys = (height - pad) - (y - lo) / ((hi - lo) or 1.0) * (height - 2 * pad - 1)
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:]), strict=False):
            n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
            for t in np.linspace(0, 1, n):
                img[int(round(y0 + t * (y1 - y0))), int(round(x0 + t * (x1 - x0)))] = (31, 119, 180)
        if len(y) == 1:
            img[int(ys[0]), int(xs[0])] = (31, 119, 180)
    Path(path).write_bytes(_png(img))
