"""Decide by content whether bytes are an acceptable image, without decoding a bomb."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image

from api.errors import ApiError

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
_DATA_URL = re.compile(r"^data:[\w/+.-]+;base64,", re.IGNORECASE)


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    content_type: str
    width: int
    height: int


def check_image(data: bytes, max_pixels: int, max_side: int, field: str = "file") -> CheckedImage:
    """Return the image's type and size, or raise a 422 (not an image, truncated, unsupported) or 413 (too big).

    The pixel count is read from the header before any decoding, so a small file that declares
    50,000 x 50,000 pixels is refused without allocating its pixels.
    """
    if not data:
        raise ApiError(422, "invalid_image", f"{field}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image_format = image.format
            width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ApiError(413, "image_too_large", f"{field}: image has too many pixels") from exc
    except Exception as exc:
        raise ApiError(422, "invalid_image", f"{field}: not a readable image") from exc
    if image_format not in FORMATS:
        raise ApiError(422, "unsupported_image", f"{field}: format {image_format} is not one of PNG, JPEG, WebP")
    if width * height > max_pixels or max(width, height) > max_side:
        raise ApiError(413, "image_too_large", f"{field}: {width}x{height} exceeds the limit of {max_pixels} pixels")
    try:
        image.load()  # a truncated file fails here
    except Exception as exc:
        raise ApiError(422, "invalid_image", f"{field}: image data is truncated or corrupt") from exc
    return CheckedImage(data=data, content_type=FORMATS[image_format], width=width, height=height)


def decode_base64(value: str, field: str) -> bytes:
    """Bytes of a base64 string or data URL; malformed input is a 422 naming the field."""
    payload = _DATA_URL.sub("", value.strip(), count=1)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(
            422,
            "invalid_request",
            f"{field}: neither a file id nor valid base64",
            [{"field": field, "message": "bad base64"}],
        ) from exc
