"""Image bytes for tests: valid images, and the bad inputs the API must refuse."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
from PIL import Image


def png_bytes(width: int = 64, height: int = 64, color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:] = (240, 240, 240)
    array[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = color
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def encoded(data: bytes, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buffer, format=fmt)
    return buffer.getvalue()


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG whose header declares width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = b"\x00" + b"\x00" * (width * 3)
    compressor = zlib.compressobj(9)
    data = compressor.compress(row * 4) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
