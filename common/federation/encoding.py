"""How the model's arrays travel (run config `update-encoding`): fp32 as they are, fp16, or int8.

The encoding applies in both directions: to the global model in the server's train and evaluate
instructions and to the model in a site's train reply. The receiver decodes to fp32 before
anything reads the arrays: a site before it loads the model, the server before it validates and
aggregates (Flower's `aggregate_arrayrecords` accumulates in each array's own dtype: an fp16
mean is rounded to fp16's grid, and int8 codes mean nothing on their own).

int8 is symmetric per-tensor quantisation: codes round(x / s) in [-127, 127], s = max|x| / 127,
so every element is off by at most s / 2. The fp32 scales of a record's int8 tensors travel as
one vector under `INT8_SCALES`, in the order of those tensors, in the same ArrayRecord: a reply
keeps the single ArrayRecord Flower's strategies expect, and one vector costs one array header
where a scale per tensor would cost hundreds. Two choices make int8 usable for training:

* A site's reply carries its update (trained weights minus the global model it received), not
  its weights: one round moves a weight by far less than the tensor's range, so the update's
  step s is that much finer (one site's round of the default model: the server sees the
  update to 0.35 % of its norm, against 13 % when int8 carries the weights). The server adds
  the update to its own fp32 global model; instructions carry the global model's weights.
* BatchNorm running statistics travel as fp16 values. Within one tensor variances span orders
  of magnitude, so one scale would round the small ones to zero (BatchNorm divides by them, and
  the server refuses a non-positive variance); each site recomputes them, so an update would
  be no smaller than the values. They are about 1 % of the model. fp16 rounds no non-zero
  value to zero (`to_fp16`), so a variance stays positive.

Integer tensors travel unchanged in every encoding (the models exchange none; under int8 an
int8 integer tensor is refused, as it could not be told from codes).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

UpdateEncoding = Literal["fp32", "fp16", "int8"]

# Key of the int8 scales; '#' occurs in no state-dict name of these models.
INT8_SCALES = "#int8-scales"
INT8_LEVELS = 127

Arrays = Mapping[str, np.ndarray | torch.Tensor] | ArrayRecord


def encode_arrays(
    arrays: Arrays,
    encoding: UpdateEncoding,
    *,
    statistics: Collection[str] = (),
    reference: Arrays | None = None,
) -> ArrayRecord:
    """`arrays` as they travel under `encoding`.

    `statistics` names the BatchNorm running statistics (fp16 values under int8). Under int8 with
    a `reference` (the model the arrays were trained from, which the receiver holds), the int8
    tensors carry `arrays - reference`.
    """
    if encoding == "fp32":
        return arrays if isinstance(arrays, ArrayRecord) else ArrayRecord({n: Array(_numpy(v)) for n, v in arrays.items()})
    encoded: dict[str, Array] = {}
    scales: list[np.float32] = []
    for name in arrays:
        values = _numpy(arrays[name])
        if not np.issubdtype(values.dtype, np.floating):
            if encoding == "int8" and values.dtype == np.int8:
                raise ValueError(f"{name}: an int8 integer tensor could not be told from int8 codes")
            encoded[name] = Array(values)
        elif encoding == "fp16" or name in statistics:
            encoded[name] = Array(to_fp16(values))
        else:
            if reference is not None:
                values = values - _numpy(reference[name])
            codes, scale = quantise_int8(values)
            encoded[name] = Array(codes)
            scales.append(scale)
    if encoding == "int8":
        encoded[INT8_SCALES] = Array(np.asarray(scales, dtype=np.float32))
    return ArrayRecord(encoded)


def decode_arrays(
    record: ArrayRecord,
    encoding: UpdateEncoding,
    *,
    statistics: Collection[str] = (),
    reference: Arrays | None = None,
) -> ArrayRecord:
    """The fp32 arrays that `record`, encoded under `encoding`, carries; `statistics` and
    `reference` as the sender encoded them. ValueError when `record` is not so encoded."""
    if encoding == "fp32":
        return record
    scales = iter(_scales(record)) if encoding == "int8" else None
    decoded: dict[str, Array] = {}
    for name in record:
        if name == INT8_SCALES:
            continue
        values = read_array(record[name], name)
        expects_int8 = scales is not None and name not in statistics
        if expects_int8 and values.dtype == np.int8:
            scale = next(scales, None)
            if scale is None:
                raise ValueError(f"{name}: {INT8_SCALES} holds fewer scales than the record has int8 arrays")
            values = dequantise_int8(values, scale)
            if reference is not None:
                base = _numpy(reference[name]) if name in reference else None
                if base is None or base.shape != values.shape:
                    raise ValueError(f"{name}: an update of shape {values.shape} fits no array of the model")
                values = (base + values).astype(np.float32, copy=False)
        elif values.dtype == np.float16 and not expects_int8:
            values = values.astype(np.float32)
        elif np.issubdtype(values.dtype, np.floating):
            raise ValueError(f"{name}: a {values.dtype} array, not encoded as {encoding}")
        decoded[name] = Array(np.ascontiguousarray(values))
    if scales is not None and next(scales, None) is not None:
        raise ValueError(f"{INT8_SCALES} holds more scales than the record has int8 arrays")
    return ArrayRecord(decoded)


def to_fp16(values: np.ndarray) -> np.ndarray:
    """`values` rounded to fp16, except that none that is non-zero becomes zero: BatchNorm
    variances below fp16's smallest step (6e-8) occur, and must stay positive (BatchNorm adds
    eps = 1e-5 to them, so their exact size does not matter)."""
    half = values.astype(np.float16)
    underflow = (half == 0) & (values != 0)
    half[underflow] = np.copysign(np.finfo(np.float16).smallest_subnormal, values[underflow])
    return half


def quantise_int8(values: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """Symmetric int8 codes of `values` and their fp32 scale (0 for an all-zero tensor; not finite,
    so that the decoded tensor is not finite either, for a tensor that is not)."""
    scale = np.float32(np.max(np.abs(values), initial=0.0) / INT8_LEVELS)
    if scale == 0 or not np.isfinite(scale):
        return np.zeros(values.shape, dtype=np.int8), scale
    # Divided in float64 so that rounding to the nearest code is exact (error <= scale / 2).
    codes = np.rint(values.astype(np.float64) / np.float64(scale))
    return np.clip(codes, -INT8_LEVELS, INT8_LEVELS).astype(np.int8), scale


def dequantise_int8(codes: np.ndarray, scale: np.float32) -> np.ndarray:
    return codes.astype(np.float32) * np.float32(scale)


def read_array(array: Array, name: str) -> np.ndarray:
    """`array` deserialised; ValueError when its bytes are not an array (a received array is the
    sender's bytes, and numpy and Flower raise EOFError, TypeError, ValueError, ... for bad ones)."""
    try:
        return array.numpy()
    except Exception as error:  # noqa: BLE001 - any failure to parse means the same: not an array
        raise ValueError(f"{name}: not a readable array ({type(error).__name__}: {error})") from None


def _scales(record: ArrayRecord) -> list[np.float32]:
    if INT8_SCALES not in record:
        raise ValueError(f"an int8 record must carry its scales under {INT8_SCALES}")
    scales = read_array(record[INT8_SCALES], INT8_SCALES)
    if scales.ndim != 1 or not np.issubdtype(scales.dtype, np.floating):
        raise ValueError(f"{INT8_SCALES} must be a vector of floats, got {scales.dtype} of shape {scales.shape}")
    return [np.float32(scale) for scale in scales]


def _numpy(value: np.ndarray | torch.Tensor | Array) -> np.ndarray:
    # torch tensors and Flower Arrays convert themselves; anything else is taken as array-like.
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)
