"""The global model a site keeps from one round's evaluation for the next round's training.

Each round the aggregate travels to a site twice: in the round's EVALUATE instruction and in the next
round's TRAIN instruction. The server asks a site to keep the model it evaluates (config
`hold-global-model`: the model's digest); the site keeps it in its Flower `context.state` and the
next TRAIN names that digest (`held-global-model`) instead of carrying the arrays again. A site that
no longer holds it (its SuperNode restarted, say) refuses with `NOT_HELD` in the reason, and the
server sends that site the full instruction.
"""

from __future__ import annotations

import hashlib

from flwr.app import ArrayRecord

HOLD_GLOBAL_MODEL = "hold-global-model"  # EVALUATE config: keep these arrays for the next TRAIN
HELD_GLOBAL_MODEL = "held-global-model"  # TRAIN config: train from the arrays kept under this digest
NOT_HELD = "the site does not hold the global model this instruction names"


def arrays_digest(arrays: ArrayRecord) -> str:
    """SHA-256 of every array's name, dtype, shape and bytes, in the record's order."""
    digest = hashlib.sha256()
    for name, array in arrays.items():
        digest.update(f"{name}\0{array.dtype}\0{array.shape}\0".encode())
        digest.update(array.data)
    return digest.hexdigest()
