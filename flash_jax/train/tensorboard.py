"""TensorBoard event files without TensorFlow: a minimal writer and a reader.

An event file is a sequence of TFRecords, each framed as

    uint64 length (little-endian) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

where `data` is a serialized `tensorflow.Event` protobuf. The protobufs are encoded by hand here
(only the fields below), so neither TensorFlow nor `protobuf` is needed:

    Event   {double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5}
    Summary {repeated Value value = 1}
    Value   {string tag = 1; float simple_value = 2; Image image = 4}
    Image   {int32 height = 1; int32 width = 2; int32 colorspace = 3; bytes encoded_image_string = 4}

The first record of every file is an Event with `file_version = "brain.Event:2"`. TensorBoard shows
`simple_value` scalars under "Scalars" and PNG images under "Images". The writer is per process: in
multi-host runs only process 0 should write.
"""

from __future__ import annotations

import io
import socket
import struct
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

FILE_VERSION = "brain.Event:2"

# --- CRC32C (Castagnoli, reflected polynomial 0x82F63B78) -------------------------------------


def _make_tables() -> list[list[int]]:
    """Slicing-by-8 lookup tables: `tables[0]` is the classic byte table."""
    first = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        first.append(c)
    tables = [first]
    for _ in range(7):
        prev = tables[-1]
        tables.append([(prev[n] >> 8) ^ first[prev[n] & 0xFF] for n in range(256)])
    return tables


_T0, _T1, _T2, _T3, _T4, _T5, _T6, _T7 = _make_tables()


def crc32c(data: bytes) -> int:
    """CRC32C of `data` (pure Python, slicing-by-8: a few MB/s, fine for summaries)."""
    crc = 0xFFFFFFFF
    view = memoryview(data)
    n8 = len(view) // 8 * 8
    # Consume 8 bytes per iteration: two little-endian uint32 words per step.
    for lo, hi in struct.iter_unpack("<II", view[:n8]):
        lo ^= crc
        crc = (
            _T7[lo & 0xFF]
            ^ _T6[(lo >> 8) & 0xFF]
            ^ _T5[(lo >> 16) & 0xFF]
            ^ _T4[lo >> 24]
            ^ _T3[hi & 0xFF]
            ^ _T2[(hi >> 8) & 0xFF]
            ^ _T1[(hi >> 16) & 0xFF]
            ^ _T0[hi >> 24]
        )
    for b in view[n8:]:
        crc = (crc >> 8) ^ _T0[(crc ^ b) & 0xFF]
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The TFRecord checksum: CRC32C rotated right by 15 bits plus 0xA282EAD8, mod 2**32."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One TFRecord: length, masked CRC of the length, data, masked CRC of the data."""
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", masked_crc32c(length))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


# --- Protobuf wire format (the subset used by Event) ------------------------------------------

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # negative int64/int32 are encoded as 10-byte two's complement
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _int_field(field: int, value: int) -> bytes:
    return _key(field, _VARINT) + _varint(value)


def _bytes_field(field: int, value: bytes) -> bytes:
    return _key(field, _BYTES) + _varint(len(value)) + value


def _double_field(field: int, value: float) -> bytes:
    return _key(field, _FIXED64) + struct.pack("<d", value)


def _float_field(field: int, value: float) -> bytes:
    with np.errstate(over="ignore"):  # beyond float32 range -> ±inf, like a float32 cast
        return _key(field, _FIXED32) + struct.pack("<f", np.float32(value))


def _encode_event(
    wall_time: float,
    step: int,
    *,
    file_version: str | None = None,
    values: tuple[bytes, ...] | list[bytes] = (),
) -> bytes:
    event = _double_field(1, wall_time) + _int_field(2, step)
    if file_version is not None:
        event += _bytes_field(3, file_version.encode())
    if values:
        event += _bytes_field(5, b"".join(_bytes_field(1, v) for v in values))
    return event


def _parse(buf: bytes) -> list[tuple[int, int, Any]]:
    """Top-level fields of one message as (field, wire_type, value); raises ValueError if malformed."""
    fields, pos, n = [], 0, len(buf)

    def read_varint() -> int:
        nonlocal pos
        result = shift = 0
        while True:
            if pos >= n or shift > 63:
                raise ValueError("malformed varint")
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result

    while pos < n:
        key = read_varint()
        field, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value = read_varint()
        elif wire_type in (_FIXED64, _FIXED32):
            size = 8 if wire_type == _FIXED64 else 4
            if pos + size > n:
                raise ValueError("truncated fixed-width field")
            value, pos = buf[pos : pos + size], pos + size
        elif wire_type == _BYTES:
            size = read_varint()
            if pos + size > n:
                raise ValueError("truncated length-delimited field")
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        fields.append((field, wire_type, value))
    return fields


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _decode_event(data: bytes) -> dict[str, Any]:
    event: dict[str, Any] = {"wall_time": 0.0, "step": 0}
    for field, wire_type, value in _parse(data):
        if field == 1 and wire_type == _FIXED64:
            event["wall_time"] = struct.unpack("<d", value)[0]
        elif field == 2 and wire_type == _VARINT:
            event["step"] = _signed64(value)
        elif field == 3 and wire_type == _BYTES:
            event["file_version"] = value.decode()
        elif field == 5 and wire_type == _BYTES:
            scalars, images = event.setdefault("scalars", {}), event.setdefault("images", {})
            for vfield, vwire, vbytes in _parse(value):
                if vfield == 1 and vwire == _BYTES:
                    _decode_value(vbytes, scalars, images)
    return event


def _decode_value(data: bytes, scalars: dict[str, float], images: dict[str, dict]) -> None:
    tag, simple, image = None, None, None
    for field, wire_type, value in _parse(data):
        if field == 1 and wire_type == _BYTES:
            tag = value.decode()
        elif field == 2 and wire_type == _FIXED32:
            simple = struct.unpack("<f", value)[0]
        elif field == 4 and wire_type == _BYTES:
            image = {"height": 0, "width": 0, "colorspace": 0, "encoded": b""}
            names = {1: "height", 2: "width", 3: "colorspace", 4: "encoded"}
            for ifield, _, ivalue in _parse(value):
                if ifield in names:
                    image[names[ifield]] = ivalue
    if tag is None:
        return
    if simple is not None:
        scalars[tag] = simple
    if image is not None:
        images[tag] = image


# --- Writer and reader ------------------------------------------------------------------------


class SummaryWriter:
    """Appends scalar and image summaries to a new TensorBoard event file in `logdir`.

    The file is `logdir/events.out.tfevents.<unix time>.<hostname>` (a `.1`, `.2`, ... suffix is
    added if that name exists). Records are buffered; call `flush()` to make them visible.

        with SummaryWriter(workdir / "tensorboard") as tb:
            tb.scalars(step, {"loss": 0.3, "lr": 1e-4})
            tb.image(step, "samples", grid)  # uint8 (H, W, 3)
    """

    def __init__(self, logdir: str | Path) -> None:
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        base = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        path, suffix = logdir / base, 0
        while True:
            try:
                self._file = path.open("xb")
                break
            except FileExistsError:
                suffix += 1
                path = logdir / f"{base}.{suffix}"
        self.path = path
        self._write(_encode_event(time.time(), 0, file_version=FILE_VERSION))
        self.flush()

    def _write(self, event: bytes) -> None:
        if self._file.closed:
            raise ValueError(f"SummaryWriter for {self.path} is closed")
        self._file.write(frame_record(event))

    def scalars(
        self, step: int, values: dict[str, float], *, wall_time: float | None = None
    ) -> None:
        """Writes one Event at `step` holding a float32 `simple_value` per tag."""
        encoded = []
        for tag, value in values.items():
            if not isinstance(tag, str):
                raise TypeError(f"summary tags must be str, got {tag!r}")
            encoded.append(_bytes_field(1, tag.encode()) + _float_field(2, float(value)))
        if encoded:
            self._write(_encode_event(_now(wall_time), int(step), values=encoded))

    def image(self, step: int, tag: str, image: Any, *, wall_time: float | None = None) -> None:
        """Writes `image` as a PNG summary. uint8, `(H, W)`, `(H, W, 1)`, `(H, W, 3)` or `(H, W, 4)`.

        A PIL image works too (it converts to such an array).
        """
        from PIL import Image  # only image summaries need PIL

        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise TypeError(f"image {tag!r} must be uint8, got {array.dtype}")
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ValueError(f"image {tag!r} must be (H, W[, 1|3|4]), got shape {array.shape}")
        height, width = array.shape[:2]
        colorspace = 1 if array.ndim == 2 else array.shape[-1]  # 1 gray, 3 RGB, 4 RGBA
        png = io.BytesIO()
        Image.fromarray(array).save(png, format="PNG")
        encoded = (
            _int_field(1, height)
            + _int_field(2, width)
            + _int_field(3, colorspace)
            + _bytes_field(4, png.getvalue())
        )
        value = _bytes_field(1, tag.encode()) + _bytes_field(4, encoded)
        self._write(_encode_event(_now(wall_time), int(step), values=[value]))

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            self._file.close()

    def __enter__(self) -> SummaryWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _now(wall_time: float | None) -> float:
    return time.time() if wall_time is None else float(wall_time)


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Decodes an event file, checking both CRCs of every record.

    Returns one dict per record: `wall_time` (float), `step` (int), and where present
    `file_version` (str), `scalars` ({tag: float}) and `images` ({tag: {"height", "width",
    "colorspace", "encoded" (PNG bytes)}}). Fields outside that subset are skipped. Raises
    ValueError naming the file and record index on a bad CRC, truncation or malformed protobuf.
    """
    buf = Path(path).read_bytes()
    events, pos, index = [], 0, 0
    while pos < len(buf):

        def fail(why: str, index: int = index, pos: int = pos) -> ValueError:
            return ValueError(f"{path}: record {index} (byte offset {pos}) {why}")

        if pos + 12 > len(buf):
            raise fail("is truncated in its header")
        header = buf[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", buf[pos + 8 : pos + 12])
        if masked_crc32c(header) != length_crc:
            raise fail("has a corrupt length (CRC mismatch)")
        start, end = pos + 12, pos + 12 + length
        if end + 4 > len(buf):
            raise fail(f"is truncated: needs {length} data bytes + 4 CRC bytes")
        data = buf[start:end]
        (data_crc,) = struct.unpack("<I", buf[end : end + 4])
        if masked_crc32c(data) != data_crc:
            raise fail("has corrupt data (CRC mismatch)")
        try:
            events.append(_decode_event(data))
        except (ValueError, UnicodeDecodeError) as e:
            raise fail(f"is not a valid Event protobuf: {e}") from e
        pos, index = end + 4, index + 1
    return events
