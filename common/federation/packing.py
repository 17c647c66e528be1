"""The model's arrays travel packed into one array per record, so a message is a few transport objects.

Flower 1.42 stores every Array of a message as objects of its own, and a SuperNode or the server
fetches each with a request of its own: the default model's 302 arrays made about 560 requests per
message, and most of a deployed round's time (docs/deploy.md). Packed, an ArrayRecord is one array of
bytes: a JSON layout (each array's name, dtype, shape, serialisation and byte length) followed by
the arrays' serialised bytes, unchanged, so unpacking gives back the very same Arrays (and digests).

Packing is a transport matter, done at its two ends only: `PackedArraysGrid` wraps the server's
grid, packing what it sends and unpacking the replies; the ClientApp's outermost mod unpacks an
instruction and packs its reply. Between them every strategy, mod and handler sees plain records.
An instruction asks for a packed reply with `PACK_REPLY`, so a site answers a server that does not
pack (the in-process grid, which transports nothing) in plain records.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

PACKED_ARRAYS = "#packed-arrays"  # the one key of a packed ArrayRecord; '#' is in no state-dict name
PACKED_STYPE = "pneumofed.packed-arrays"  # the packed Array's serialisation: its data is the packing itself
PACK_REPLY = "#pack-reply"  # content key of an (empty) ConfigRecord: pack the arrays of the reply
_LENGTH_BYTES = 8

log = logging.getLogger("pneumofed.federation")


def pack_arrays(record: ArrayRecord) -> ArrayRecord:
    """`record` as one array: its layout, then each array's bytes in the record's order."""
    layout = json.dumps([[name, array.dtype, list(array.shape), array.stype, len(array.data)]
                         for name, array in record.items()], separators=(",", ":")).encode()
    blob = b"".join([len(layout).to_bytes(_LENGTH_BYTES, "little"), layout, *(array.data for array in record.values())])
    return ArrayRecord({PACKED_ARRAYS: Array(dtype="uint8", shape=(len(blob),), stype=PACKED_STYPE, data=blob)})


def unpack_arrays(record: ArrayRecord) -> ArrayRecord:
    """The ArrayRecord that `pack_arrays` made `record` from; ValueError when `record` is no such packing."""
    if list(record.keys()) != [PACKED_ARRAYS] or record[PACKED_ARRAYS].stype != PACKED_STYPE:
        raise ValueError(f"a packed record holds exactly one array, {PACKED_ARRAYS}, of serialisation {PACKED_STYPE}")
    data = memoryview(record[PACKED_ARRAYS].data)
    length = int.from_bytes(data[:_LENGTH_BYTES], "little")
    if len(data) < _LENGTH_BYTES or length > len(data) - _LENGTH_BYTES:
        raise ValueError(f"{PACKED_ARRAYS} is shorter than its layout says")
    entries = _layout_entries(bytes(data[_LENGTH_BYTES:_LENGTH_BYTES + length]))
    offset = _LENGTH_BYTES + length
    if offset + sum(size for *_, size in entries) != len(data):
        raise ValueError(f"{PACKED_ARRAYS} holds {len(data) - offset} bytes of arrays, not what its layout lists")
    arrays = {}
    for name, dtype, shape, stype, size in entries:
        arrays[name] = Array(dtype=dtype, shape=shape, stype=stype, data=bytes(data[offset:offset + size]))
        offset += size
    if len(arrays) != len(entries):
        raise ValueError(f"{PACKED_ARRAYS} lists an array name twice")
    return ArrayRecord(arrays)


def _layout_entries(text: bytes) -> list[tuple[str, str, tuple[int, ...], str, int]]:
    """(name, dtype, shape, stype, byte length) of each packed array; ValueError for anything else."""
    try:
        layout = json.loads(text)
    except (ValueError, RecursionError) as error:  # a hostile layout may nest deeper than the parser goes
        raise ValueError(f"{PACKED_ARRAYS} has no readable layout: {error}") from None
    if not isinstance(layout, list) or not all(_is_entry(entry) for entry in layout):
        raise ValueError(f"{PACKED_ARRAYS} has no readable layout: expected [name, dtype, shape, stype, size] entries")
    return [(name, dtype, tuple(shape), stype, size) for name, dtype, shape, stype, size in layout]


def _is_entry(entry: object) -> bool:
    def natural(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    return (isinstance(entry, list) and len(entry) == 5
            and isinstance(entry[0], str) and isinstance(entry[1], str) and isinstance(entry[3], str)
            and isinstance(entry[2], list) and all(natural(n) for n in entry[2]) and natural(entry[4]))


def pack_content(content: RecordDict, packings: dict[int, ArrayRecord] | None = None) -> RecordDict:
    """`content` with each ArrayRecord of more than one array packed. `packings` (record id -> its
    packing) lets messages that share a record object share its packing too."""
    packings = {} if packings is None else packings

    def packed(record: ArrayRecord) -> ArrayRecord:
        if id(record) not in packings:
            packings[id(record)] = pack_arrays(record)
        return packings[id(record)]

    return RecordDict({
        key: packed(record) if isinstance(record, ArrayRecord) and len(record) > 1 else record
        for key, record in content.items()
    })


def unpack_content(content: RecordDict) -> RecordDict:
    """`content` with its packed ArrayRecords unpacked and without `PACK_REPLY`; ValueError as `unpack_arrays`."""
    return RecordDict({
        key: unpack_arrays(record) if isinstance(record, ArrayRecord) and PACKED_ARRAYS in record else record
        for key, record in content.items() if key != PACK_REPLY
    })


def asks_for_packed_reply(message: Message) -> bool:
    return message.has_content() and PACK_REPLY in message.content


class PackedArraysGrid:
    """The server's `grid`, sending every message packed (and asking for a packed reply) and
    handing back its replies unpacked. A reply that does not unpack is handed back as it came, and
    is rejected by the checks every reply passes (its array does not read as one of the model's)."""

    def __init__(self, grid) -> None:  # a Flower Grid, or anything with its send_and_receive
        self._grid = grid

    def __getattr__(self, name: str):
        # Everything else (node ids, run, ...) is the grid's own. Messages pushed past
        # send_and_receive travel plain, and their replies come back plain.
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)  # alive until sent, so no record's id is reused for another
        packings: dict[int, ArrayRecord] = {}  # a strategy sends every site the same model record: pack it once
        sent = [_packed_instruction(message, packings) for message in messages]
        return [_unpacked_reply(reply) for reply in self._grid.send_and_receive(sent, timeout=timeout)]


def _packed_instruction(message: Message, packings: dict[int, ArrayRecord]) -> Message:
    """A new message (the caller may send `message` again) with `message`'s packed content."""
    content = pack_content(message.content, packings)
    content[PACK_REPLY] = ConfigRecord()
    metadata = message.metadata
    return Message(content, metadata.dst_node_id, metadata.message_type, ttl=metadata.ttl, group_id=metadata.group_id)


def _unpacked_reply(reply: Message) -> Message:
    if reply.has_error():
        return reply
    try:
        content = unpack_content(reply.content)
    except ValueError as error:
        log.warning("node %s sent a reply that does not unpack: %s", reply.metadata.src_node_id, error)
        return reply
    unpacked = copy.copy(reply)  # metadata as it arrived
    unpacked.content = content
    return unpacked
