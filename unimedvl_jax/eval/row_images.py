"""Encoded images of benchmark rows: read from files (each file once), decoded from base64 cells, checked to be an
image PIL recognises; problems raise BadRow naming the row (docs/evaluation.md "Benchmark formats")."""

from __future__ import annotations

import base64
import binascii
import io
import pathlib

from PIL import Image

from unimedvl_jax.eval.read_report import BadRow


def check_image(data: bytes, where: str) -> bytes:
    """`data` unchanged if PIL recognises it as an image (the header is parsed, the pixels are not decoded)."""
    if not data:
        raise BadRow("unreadable_image", where, "image has no bytes")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Exception as e:  # PIL raises many types for data that is not an image
        raise BadRow("unreadable_image", where, f"not an image PIL can read ({type(e).__name__}: {e})") from e
    if width == 0 or height == 0:
        raise BadRow("unreadable_image", where, f"image is {width}x{height}")
    return data


class ImageFiles:
    """Reads image files once per path (many questions share an image), remembering bad files."""

    def __init__(self):
        self._cache: dict[pathlib.Path, bytes | BadRow] = {}

    def read(self, path: pathlib.Path, where: str) -> bytes:
        """The checked bytes of an image file; BadRow('missing_image' / 'unreadable_image') naming `where`."""
        path = pathlib.Path(path)
        if path not in self._cache:
            if not path.is_file():
                self._cache[path] = BadRow("missing_image", where, f"image file {path} does not exist")
            else:
                try:
                    self._cache[path] = check_image(path.read_bytes(), f"{where} ({path})")
                except BadRow as e:
                    self._cache[path] = e
        cached = self._cache[path]
        if isinstance(cached, BadRow):
            raise BadRow(cached.reason, where, cached.detail)
        return cached


def decode_base64_image(cell: str, where: str) -> bytes:
    """Checked image bytes of a base64 cell (whitespace inside the cell is ignored)."""
    try:
        data = base64.b64decode("".join(cell.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRow("bad_base64", where, f"image cell is not valid base64 ({e})") from e
    return check_image(data, where)
