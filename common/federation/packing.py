"""The model's arrays travel packed into one array per record, so a message is a few transport objects.

Flower 1.42 stores every Array of a message as objects of its own, and a SuperNode or the server
fetches each with a request of its own: the default model's 302 arrays made about 560 requests per
message, and most of a deployed round's time (docs/deploy.md). Packed, an ArrayRecord is one uint8
array: a JSON layout (each array's name, dtype, shape, serialisation and byte length) followed by
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

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

PACKED_ARRAYS = "#packed-arrays"  # the one key of a packed ArrayRecord; '#' is in no state-dict name
PACK_REPLY = "#pack-reply"  # content key of an (empty) ConfigRecord: pack the arrays of the reply
_LENGTH_BYTES = 8

log = logging.getLogger("pneumofed.federation")


def pack_arrays(record: ArrayRecord) -> ArrayRecord:
    """`record` as one array: its layout, then each array's bytes in the record's order."""
    layout = json.dumps([[name, array.dtype, list(array.shape), array.stype, len(array.data)]
                         for name, array in record.items()], separators=(",", ":")).encode()
    blob = b"".join([len(layout).to_bytes(_LENGTH_BYTES, "little"), layout, *(array.data for array in record.values())])
    return ArrayRecord({PACKED_ARRAYS: Array(np.frombuffer(blob, dtype=np.uint8))})


def unpack_arrays(record: ArrayRecord) -> ArrayRecord:
    """The ArrayRecord that `pack_arrays` made `record` from; ValueError when `record` is no such packing."""
    if list(record.keys()) != [PACKED_ARRAYS]:
        raise ValueError(f"a packed record holds exactly one array, {PACKED_ARRAYS}")
    blob = record[PACKED_ARRAYS].numpy()
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise ValueError(f"{PACKED_ARRAYS} must be a uint8 vector, got {blob.dtype} of shape {blob.shape}")
    data = memoryview(blob.tobytes())
    length = int.from_bytes(data[:_LENGTH_BYTES], "little")
    if len(data) < _LENGTH_BYTES or length > len(data) - _LENGTH_BYTES:
        raise ValueError(f"{PACKED_ARRAYS} is shorter than its layout says")
    try:
        layout = json.loads(bytes(data[_LENGTH_BYTES:_LENGTH_BYTES + length]))
        entries = [(str(name), str(dtype), tuple(int(n) for n in shape), str(stype), int(size))
                   for name, dtype, shape, stype, size in layout]
    except (ValueError, TypeError) as error:
        raise ValueError(f"{PACKED_ARRAYS} has no readable layout: {error}") from None
    offset = _LENGTH_BYTES + length
    if offset + sum(size for *_, size in entries) != len(data) or any(size < 0 for *_, size in entries):
        raise ValueError(f"{PACKED_ARRAYS} holds {len(data) - offset} bytes of arrays, not what its layout lists")
    arrays = {}
    for name, dtype, shape, stype, size in entries:
        arrays[name] = Array(dtype=dtype, shape=shape, stype=stype, data=bytes(data[offset:offset + size]))
        offset += size
    if len(arrays) != len(entries):
        raise ValueError(f"{PACKED_ARRAYS} lists an array name twice")
    return ArrayRecord(arrays)


def pack_content(content: RecordDict) -> RecordDict:
    """`content` with each ArrayRecord of more than one array packed."""
    return RecordDict({key: pack_arrays(record) if isinstance(record, ArrayRecord) and len(record) > 1 else record
                       for key, record in content.items()})


def unpack_content(content: RecordDict) -> RecordDict:
    """`content` with its packed ArrayRecords unpacked and without `PACK_REPLY`; ValueError as `unpack_arrays`."""
    return RecordDict({key: unpack_arrays(record) if isinstance(record, ArrayRecord) and PACKED_ARRAYS in record else record
                       for key, record in content.items() if key != PACK_REPLY})


def asks_for_packed_reply(message: Message) -> bool:
    return message.has_content() and PACK_REPLY in message.content


class PackedArraysGrid:
    """The server's `grid`, sending every message packed (and asking for a packed reply) and
    handing back its replies unpacked. A reply that does not unpack is handed back as it came,
    and fails the checks every reply passes (its arrays fit no model)."""

    def __init__(self, grid) -> None:  # a Flower Grid, or anything with its send_and_receive
        self._grid = grid

    def __getattr__(self, name: str):
        # Everything else (node ids, run, ...) is the grid's own. Messages pushed past
        # send_and_receive travel plain, and their replies come back plain.
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        sent = [_packed_instruction(message) for message in messages]
        return [_unpacked_reply(reply) for reply in self._grid.send_and_receive(sent, timeout=timeout)]


def _packed_instruction(message: Message) -> Message:
    """A new message (the caller may send `message` again) with `message`'s packed content."""
    content = pack_content(message.content)
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
