"""Finding the field that makes a protobuf message unparseable (a string that is not UTF-8),
by walking its wire format against the message descriptor; protobuf's own error names none.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor

MAX_DEPTH = 32


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def invalid_utf8_field(descriptor: Any, data: bytes, prefix: str = "", depth: int = 0) -> str | None:
    """The path (``chat.messages[1].content``) of the first string field of ``data`` that is
    not valid UTF-8, or None if there is none (or the bytes are malformed otherwise)."""
    if depth > MAX_DEPTH:
        return None
    seen: dict[int, int] = {}
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
                continue
            if wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
                continue
            if wire_type != 2:
                return None  # groups are not used by pdserve's messages
            size, pos = _varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
            field = descriptor.fields_by_number.get(number)
            if field is None:
                continue
            name = prefix + field.name
            if field.is_repeated:
                idx = seen.get(number, 0)
                seen[number] = idx + 1
                name += f"[{idx}]"
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError:
                    return name
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                found = invalid_utf8_field(field.message_type, value, name + ".", depth + 1)
                if found is not None:
                    return found
    except (IndexError, ValueError):
        return None
    return None
