"""Caption files beside each image: `<stem>.txt` holds comma-separated booru tags,
`<stem>_nl.txt` a natural-language caption. Written as UTF-8 (what kohya and every trainer
read), atomically. Read with a fallback for files written in another encoding, so that no caption
is lost: the scan reports those as warnings and the next save rewrites them as UTF-8."""

from __future__ import annotations

import codecs
import re
from pathlib import Path

from studio.errors import DatasetError

_KANA = re.compile(r"[\u3040-\u30ff]")  # hiragana and katakana: present in any Japanese sentence


def decode_caption(data: bytes) -> tuple[str, str]:
    """(text, encoding used). UTF-8 first (a UTF-8 BOM is dropped); UTF-16 when it has a BOM;
    Shift-JIS (cp932) when that decodes to text with kana; else cp1252, else latin-1 (never fails).
    Charset detectors guess badly on a line of tags, hence these fixed, explainable rules."""
    if data.startswith(codecs.BOM_UTF8):
        try:
            return data[len(codecs.BOM_UTF8) :].decode("utf-8"), "utf-8-sig"
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16"), "utf-16"
        except UnicodeDecodeError:
            pass
    for encoding in ("cp932", "cp1252"):
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        if encoding != "cp932" or _KANA.search(text):
            return text, encoding
    return data.decode("latin-1"), "latin-1"


def encoding_note(encoding: str) -> str | None:
    """A warning for a caption not stored as plain UTF-8, or None."""
    if encoding == "utf-8":
        return None
    if encoding == "utf-8-sig":
        return (
            "caption starts with a UTF-8 byte-order mark (kohya reads it into the first tag); "
            "it is dropped on the next save"
        )
    return f"caption is not UTF-8: read as {encoding}; check its accents, it is saved as UTF-8 on the next edit"


# A caption larger than this is not a caption (booru tags run to 2 KB, long NL captions to 8 KB):
# the scan reports it and skips its image, and nothing ever tokenizes it.
MAX_CAPTION_BYTES = 64 * 1024


def caption_too_large(size: int) -> str:
    return (f"caption is {size / 1024:.0f} KB, over the {MAX_CAPTION_BYTES // 1024} KB limit for a caption: "
            "its image is skipped; shorten or delete the file")


def read_caption(path: Path) -> str | None:
    """The caption's text, or None when the file does not exist. Never reads more than the limit."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_CAPTION_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(data) > MAX_CAPTION_BYTES:
        raise DatasetError(f"{path}: {caption_too_large(path.stat().st_size)}")
    return decode_caption(data)[0]


def split_tags(text: str) -> list[str]:
    """'1girl,  solo,\\nsmile' -> ['1girl', 'solo', 'smile']. Commas and line breaks separate."""
    return [tag.strip() for tag in re.split(r"[,\n\r]", text) if tag.strip()]


def join_tags(tags: list[str]) -> str:
    return ", ".join(tags)


def clean_tags(tags: list[str]) -> list[str]:
    """Strip each tag and drop empty ones; refuse a tag that would split into several on reading."""
    cleaned = []
    for tag in tags:
        tag = tag.strip()
        if not tag:
            continue
        if re.search(r"[,\n\r]", tag):
            raise DatasetError(f"tag {tag!r} contains a comma or line break: it would be read back as "
                               "several tags; split it first")
        cleaned.append(tag)
    return cleaned


def encode_tags(tags: list[str]) -> bytes | None:
    """The bytes of a tags file, or None when there are no tags (the file is then removed: kohya
    refuses empty caption files)."""
    tags = clean_tags(tags)
    return join_tags(tags).encode("utf-8") if tags else None


def encode_nl(text: str) -> bytes | None:
    text = text.strip()
    return text.encode("utf-8") if text else None
