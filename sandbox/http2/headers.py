"""Decoding a peer's header blocks (HPACK, RFC 7541): the dynamic table and the four field
representations. The static table and Huffman's code come from the `hpack` package; its own
Decoder spent ~75 us on a gRPC request's eight fields (a logging call per step, a str round
trip per field), this one ~10 us. Every block a peer sends is decoded, in order, even for a
stream about to be refused: the table must follow the peer's encoder."""

from __future__ import annotations

from collections import deque

from hpack.exceptions import HPACKDecodingError
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

from sandbox.http2.frames import ErrorCode, Http2Error

Header = tuple[bytes, bytes]
STATIC_TABLE: tuple[Header, ...] = HeaderTable.STATIC_TABLE
ENTRY_OVERHEAD = 32  # RFC 7541, 4.1
DEFAULT_TABLE_SIZE = 4096


class HeaderDecoder:
    def __init__(self, max_header_list_bytes: int,
                 max_table_bytes: int = DEFAULT_TABLE_SIZE) -> None:
        self.max_header_list_bytes = max_header_list_bytes
        self.max_table_bytes = max_table_bytes  # what our SETTINGS allow the peer
        self.table_bytes_limit = max_table_bytes  # what the peer's last size update set
        self.table: deque[Header] = deque()  # newest first: index 62 is table[0]
        self.table_bytes = 0

    def decode(self, block: bytes) -> list[Header]:
        """The header list of a whole block; Http2Error COMPRESSION_ERROR if it is not valid
        HPACK, ENHANCE_YOUR_CALM if it is larger than max_header_list_bytes."""
        try:
            return self._decode(block)
        except (IndexError, HPACKDecodingError) as err:
            raise Http2Error(ErrorCode.COMPRESSION_ERROR, f"a malformed header block: {err}"
                             ) from None

    def _decode(self, block: bytes) -> list[Header]:
        headers: list[Header] = []
        pos = 0
        end = len(block)
        list_bytes = 0
        while pos < end:
            first = block[pos]
            if first & 0x80:  # indexed field
                index, pos = _integer(block, pos, 0x7F)
                header = self._entry(index)
            elif first & 0x40:  # literal, added to the table
                header, pos = self._literal(block, pos, 0x3F)
                self._add(header)
            elif first & 0x20:  # table size update
                if headers:
                    raise HPACKDecodingError("a table size update after a field")
                size, pos = _integer(block, pos, 0x1F)
                if size > self.max_table_bytes:
                    raise HPACKDecodingError(f"a table size of {size} beyond our setting")
                self.table_bytes_limit = size
                self._evict()
                continue
            else:  # literal, not added (0000) or never added (0001)
                header, pos = self._literal(block, pos, 0x0F)
            list_bytes += len(header[0]) + len(header[1]) + ENTRY_OVERHEAD
            if list_bytes > self.max_header_list_bytes:
                raise Http2Error(ErrorCode.ENHANCE_YOUR_CALM,
                                 f"a header list beyond {self.max_header_list_bytes} bytes")
            headers.append(header)
        return headers

    def _entry(self, index: int) -> Header:
        if 0 < index <= len(STATIC_TABLE):
            return STATIC_TABLE[index - 1]
        dynamic = index - len(STATIC_TABLE) - 1
        if index == 0 or dynamic >= len(self.table):
            raise HPACKDecodingError(f"no table entry {index}")
        return self.table[dynamic]

    def _literal(self, block: bytes, pos: int, prefix_mask: int) -> tuple[Header, int]:
        index, pos = _integer(block, pos, prefix_mask)
        if index:
            name = self._entry(index)[0]
        else:
            name, pos = _string(block, pos)
        value, pos = _string(block, pos)
        return (name, value), pos

    def _add(self, header: Header) -> None:
        self.table.appendleft(header)
        self.table_bytes += len(header[0]) + len(header[1]) + ENTRY_OVERHEAD
        self._evict()

    def _evict(self) -> None:
        table = self.table
        while self.table_bytes > self.table_bytes_limit and table:
            name, value = table.pop()
            self.table_bytes -= len(name) + len(value) + ENTRY_OVERHEAD


def _integer(block: bytes, pos: int, prefix_mask: int) -> tuple[int, int]:
    """An integer of RFC 7541, 5.1 at `pos`, and the position after it."""
    value = block[pos] & prefix_mask
    pos += 1
    if value < prefix_mask:
        return value, pos
    shift = 0
    while True:
        byte = block[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 28:
            raise HPACKDecodingError("an integer beyond 2^28")


def _string(block: bytes, pos: int) -> tuple[bytes, int]:
    huffman = block[pos] & 0x80
    length, pos = _integer(block, pos, 0x7F)
    end = pos + length
    if end > len(block):
        raise HPACKDecodingError("a string beyond the block")
    raw = block[pos:end]
    return (decode_huffman(raw) if huffman else raw), end
