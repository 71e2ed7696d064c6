"""Kafka primitive types: a bounds-checked reader and a small writer.

Both classic (int16/int32 length prefixed) and flexible (unsigned varint,
"compact") encodings, plus tagged fields. Every length is checked against
the bytes that remain so a hostile frame cannot make us allocate or loop
more than its own size.
"""

from __future__ import annotations

import struct

_I8 = struct.Struct(">b")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")


class KafkaDecodeError(ValueError):
    """The bytes are not a well-formed message of the expected layout."""


class Reader:
    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: bytes | bytearray | memoryview, pos: int = 0, end: int | None = None) -> None:
        self.buf = memoryview(buf)
        self.pos = pos
        self.end = len(self.buf) if end is None else end

    def remaining(self) -> int:
        return self.end - self.pos

    def _take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > self.end:
            raise KafkaDecodeError(f"truncated: need {n} bytes at offset {self.pos}")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def skip(self, n: int) -> None:
        self._take(n)

    def int8(self) -> int:
        return int(_I8.unpack(self._take(1))[0])

    def boolean(self) -> bool:
        v = self.int8()
        if v not in (0, 1):
            raise KafkaDecodeError(f"bad boolean {v}")
        return v == 1

    def int16(self) -> int:
        return int(_I16.unpack(self._take(2))[0])

    def int32(self) -> int:
        return int(_I32.unpack(self._take(4))[0])

    def int64(self) -> int:
        return int(_I64.unpack(self._take(8))[0])

    def uuid(self) -> bytes:
        return bytes(self._take(16))

    def uvarint(self) -> int:
        value = 0
        shift = 0
        while True:
            b = self._take(1)[0]
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7
            if shift > 28:  # Kafka's unsigned varints are at most 5 bytes (int32)
                raise KafkaDecodeError("varint too long")

    def _length(self, flexible: bool, nullable: bool, what: str) -> int | None:
        if flexible:
            n = self.uvarint() - 1
        else:
            n = self.int16() if what == "string" else self.int32()
        if n < 0:
            if n == -1 and nullable:
                return None
            raise KafkaDecodeError(f"bad {what} length {n}")
        return n

    def string(self, flexible: bool = False, nullable: bool = False) -> str | None:
        n = self._length(flexible, nullable, "string")
        if n is None:
            return None
        raw = self._take(n)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise KafkaDecodeError("string is not UTF-8") from exc

    def req_string(self, flexible: bool = False) -> str:
        s = self.string(flexible, nullable=False)
        assert s is not None
        return s

    def bytes_(self, flexible: bool = False, nullable: bool = False) -> bytes | None:
        n = self._length(flexible, nullable, "bytes")
        if n is None:
            return None
        return bytes(self._take(n))

    def skip_bytes(self, flexible: bool = False, nullable: bool = False) -> None:
        n = self._length(flexible, nullable, "bytes")
        if n is not None:
            self._take(n)

    def array_len(self, flexible: bool = False, nullable: bool = False,
                  min_item: int = 1) -> int | None:
        """Element count; each element needs at least ``min_item`` bytes."""
        n = self._length(flexible, nullable, "array")
        if n is None:
            return None
        if n * max(min_item, 1) > self.remaining():
            raise KafkaDecodeError(f"array of {n} does not fit in {self.remaining()} bytes")
        return n

    def tagged_fields(self, flexible: bool) -> None:
        if not flexible:
            return
        count = self.uvarint()
        if count * 2 > self.remaining():
            raise KafkaDecodeError("too many tagged fields")
        last = -1
        for _ in range(count):
            tag = self.uvarint()
            if tag <= last:
                raise KafkaDecodeError("tagged fields out of order")
            last = tag
            self._take(self.uvarint())

    def expect_end(self) -> None:
        if self.pos != self.end:
            raise KafkaDecodeError(f"{self.end - self.pos} trailing bytes")


def uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


class Writer:
    """Appends Kafka primitives; ``flexible`` selects compact encodings."""

    __slots__ = ("out", "flexible")

    def __init__(self, flexible: bool = False) -> None:
        self.out = bytearray()
        self.flexible = flexible

    def int8(self, v: int) -> Writer:
        self.out += _I8.pack(v)
        return self

    def boolean(self, v: bool) -> Writer:
        return self.int8(1 if v else 0)

    def int16(self, v: int) -> Writer:
        self.out += _I16.pack(v)
        return self

    def int32(self, v: int) -> Writer:
        self.out += _I32.pack(v)
        return self

    def int64(self, v: int) -> Writer:
        self.out += _I64.pack(v)
        return self

    def uuid(self, v: bytes = bytes(16)) -> Writer:
        self.out += v
        return self

    def raw(self, b: bytes) -> Writer:
        self.out += b
        return self

    def string(self, s: str | None) -> Writer:
        if s is None:
            if self.flexible:
                self.out += uvarint(0)
            else:
                self.int16(-1)
            return self
        b = s.encode("utf-8")
        if self.flexible:
            self.out += uvarint(len(b) + 1)
        else:
            self.int16(len(b))
        self.out += b
        return self

    def bytes_(self, b: bytes | None) -> Writer:
        if b is None:
            if self.flexible:
                self.out += uvarint(0)
            else:
                self.int32(-1)
            return self
        if self.flexible:
            self.out += uvarint(len(b) + 1)
        else:
            self.int32(len(b))
        self.out += b
        return self

    def array(self, n: int | None) -> Writer:
        """Write an array length; the caller then writes the elements."""
        if n is None:
            if self.flexible:
                self.out += uvarint(0)
            else:
                self.int32(-1)
        elif self.flexible:
            self.out += uvarint(n + 1)
        else:
            self.int32(n)
        return self

    def tags(self) -> Writer:
        """An empty tagged-field section (flexible versions only)."""
        if self.flexible:
            self.out += b"\x00"
        return self

    def getvalue(self) -> bytes:
        return bytes(self.out)
