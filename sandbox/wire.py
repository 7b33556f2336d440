"""Hand-assembled protobuf wire bytes, for the answers kubelet asks for every second.

kubelet's PLEG lists every pod and container each second. Building hundreds of messages in
Python on every call costs milliseconds of the event loop; each record's entry is instead
serialized once (when the record changes) and a list answer is the concatenation of entries.
"""

from __future__ import annotations

from google.protobuf.message import Message

_WIRE_TYPE_LENGTH_DELIMITED = 2


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def repeated_entry(field_number: int, message: Message) -> bytes:
    """One element of a `repeated <message> = field_number` field, ready to concatenate."""
    payload = message.SerializeToString()
    tag = varint(field_number << 3 | _WIRE_TYPE_LENGTH_DELIMITED)
    return tag + varint(len(payload)) + payload
