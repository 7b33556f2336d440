"""Hand-assembled protobuf wire bytes, for the answers kubelet asks for every second.

kubelet's PLEG lists every pod and container each second. Building hundreds of messages in
Python on every call costs milliseconds of the event loop; each record's entry is instead
serialized once (when the record changes) and a list answer is the concatenation of entries.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Iterator, Sequence
from typing import Protocol, TypeVar

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

_WIRE_TYPE_LENGTH_DELIMITED = 2
# A Stream* list RPC's messages carry entries up to about this many bytes each: small enough
# that a node with thousands of objects never builds one huge message, large enough that
# a stream of a normal node is a message or two.
STREAM_PAGE_BYTES = 1 << 20


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
    return message_field(field_number, message.SerializeToString())


def message_field(field_number: int, payload: bytes) -> bytes:
    """A message field (or one element of a repeated one) holding the serialized `payload`."""
    tag = varint(field_number << 3 | _WIRE_TYPE_LENGTH_DELIMITED)
    return tag + varint(len(payload)) + payload


def string_map_entry(field_number: int, key: str, value: str) -> bytes:
    """One entry of a `map<string, string> = field_number` field (a message of key = 1,
    value = 2), ready to concatenate."""
    return message_field(field_number, message_field(1, key.encode()) + message_field(
        2, value.encode()))


def verbose_info_entry(field_number: int, facts: dict[str, object], config: Message) -> bytes:
    """The `info` entry of a verbose status answer (PodSandboxStatus, ContainerStatus): the
    record's facts and its CRI config as one JSON document under the key "info", as
    containerd answers and crictl inspect prints."""
    document = json.dumps({**facts, "config": MessageToDict(config)})
    return string_map_entry(field_number, "info", document)


def int_field(field_number: int, value: int) -> bytes:
    """An int64/int32/enum field of a non-negative `value` (a varint)."""
    return varint(field_number << 3) + varint(value)


class ListedRecord(Protocol):
    """A pod or container record, which keeps its serialized list entry (a save empties it)."""

    list_entry: bytes


R = TypeVar("R", bound=ListedRecord)


def list_entries(
    records: Iterable[R], field_number: int, summary: Callable[[R], Message]
) -> list[bytes]:
    """Each record's element of a list answer's `repeated` field `field_number`: the one it
    keeps, else `summary(record)` serialized and kept."""
    return [r.list_entry or _keep_list_entry(r, field_number, summary) for r in records]


def _keep_list_entry(record: R, field_number: int, summary: Callable[[R], Message]) -> bytes:
    record.list_entry = repeated_entry(field_number, summary(record))
    return record.list_entry


def pages(entries: Sequence[bytes], max_bytes: int = STREAM_PAGE_BYTES) -> Iterator[bytes]:
    """Consecutive entries concatenated into messages of at most `max_bytes` (an entry larger
    than that is a message alone). At least one, so a stream with nothing to list still
    answers once, as the Stream*Stats RPCs do."""
    page: list[bytes] = []
    size = 0
    for entry in entries:
        if page and size + len(entry) > max_bytes:
            yield b"".join(page)
            page, size = [], 0
        page.append(entry)
        size += len(entry)
    if page or not entries:
        yield b"".join(page)


async def stream_pages(entries: Sequence[bytes]) -> AsyncIterator[bytes]:
    """A Stream* list RPC's messages: `entries` in pages."""
    for page in pages(entries):
        yield page


class AnswerCache:
    """Whole list answers, each kept with the state it was built from.

    The concatenation above still reads every record on every call, and in a busy gRPC server
    those are cold cache lines: ~0.08 ms of a ~1.2 ms relist pair at 100 pods. So the
    unfiltered answers kubelet's relist asks for every second are kept whole, keyed by what
    they were built from; the caller names that state (see pods.list_pod_sandbox).
    """

    def __init__(self) -> None:
        self._answers: dict[str, tuple[Hashable, bytes]] = {}

    def get(self, name: str, state: Hashable, build: Callable[[], bytes]) -> bytes:
        """The answer `name` built for `state`: the cached one, or `build()` when the state
        differs from the one it was built for."""
        cached = self._answers.get(name)
        if cached is not None and cached[0] == state:
            return cached[1]
        answer = build()
        self._answers[name] = (state, answer)
        return answer
