"""The dependency-free TensorBoard event writer: CRC32C, TFRecord framing, Event encoding."""

import io
import re
import socket
import struct
import time

import numpy as np
import pytest
from PIL import Image

from flash_jax.train import tensorboard as tb


def _bitwise_crc32c(data: bytes) -> int:
    """Reference CRC32C, one bit at a time, independent of the table implementation."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def _mask(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % 2**32


def test_crc32c_vectors():
    assert tb.crc32c(b"123456789") == 0xE3069283
    assert tb.crc32c(b"") == 0
    # RFC 3720 (iSCSI) appendix B.4 vectors.
    assert tb.crc32c(bytes(32)) == 0x8A9136AA
    assert tb.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert tb.crc32c(bytes(range(32))) == 0x46DD794E
    rng = np.random.default_rng(0)
    for n in [*range(20), 63, 64, 65, 1000]:  # every tail length of the 8-byte loop
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert tb.crc32c(data) == _bitwise_crc32c(data), n


def test_framing_matches_documented_layout():
    data = b"hello event"
    record = tb.frame_record(data)
    length = struct.pack("<Q", len(data))
    expected = (
        length
        + struct.pack("<I", _mask(_bitwise_crc32c(length)))
        + data
        + struct.pack("<I", _mask(_bitwise_crc32c(data)))
    )
    assert record == expected
    assert len(record) == 8 + 4 + len(data) + 4


def test_scalar_event_bytes_match_hand_encoding(tmp_path):
    with tb.SummaryWriter(tmp_path) as w:
        w.scalars(5, {"a": 0.5}, wall_time=1.0)
    raw = w.path.read_bytes()
    wall_time = raw[13:21]  # the file_version event's own clock: the only field not chosen here
    assert abs(struct.unpack("<d", wall_time)[0] - time.time()) < 60
    # wall_time=1 (fixed64), step=2 (varint 0), file_version=3 (length-delimited string)
    first = tb.frame_record(b"\x09" + wall_time + b"\x10\x00" + b"\x1a\x0d" + b"brain.Event:2")
    assert raw[: len(first)] == first
    value = b"\x0a\x01a" + b"\x15" + struct.pack("<f", 0.5)  # tag=1, simple_value=2 (fixed32)
    summary = b"\x0a" + bytes([len(value)]) + value  # Summary.value=1
    event = b"\x09" + struct.pack("<d", 1.0) + b"\x10\x05" + b"\x2a" + bytes([len(summary)])
    assert raw[len(first) :] == tb.frame_record(event + summary)


def test_scalars_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    logged = []
    with tb.SummaryWriter(tmp_path / "tb") as w:
        for step in [0, 1, 300, 2**40, -3]:
            values = {
                "loss": float(rng.normal()),
                "train/lr": float(rng.uniform()) * 1e-4,
                "nan": float("nan"),
                "big": 1e39,  # beyond float32: stored as inf
                "np": np.float32(2.5),
            }
            w.scalars(step, values, wall_time=1000.0 + step)
            logged.append((step, values))
        w.scalars(7, {})  # nothing to write
    (path,) = (tmp_path / "tb").iterdir()
    events = tb.read_events(path)
    assert len(events) == 1 + len(logged)
    for event, (step, values) in zip(events[1:], logged, strict=True):
        assert event["step"] == step
        assert event["wall_time"] == 1000.0 + step
        assert list(event["scalars"]) == list(values)
        got = np.array(list(event["scalars"].values()), np.float32)
        with np.errstate(over="ignore"):
            want = np.array(list(values.values()), np.float64).astype(np.float32)
        np.testing.assert_array_equal(got, want)  # exact float32, NaN and inf included


def test_first_record_is_file_version(tmp_path):
    w = tb.SummaryWriter(tmp_path)
    w.close()
    assert re.fullmatch(
        rf"events\.out\.tfevents\.\d+\.{re.escape(socket.gethostname())}", w.path.name
    )
    (event,) = tb.read_events(w.path)  # written and flushed at construction
    assert event["file_version"] == "brain.Event:2"
    assert event["step"] == 0 and "scalars" not in event
    with pytest.raises(ValueError, match="closed"):
        w.scalars(1, {"x": 1.0})


def test_writers_in_one_directory_do_not_collide(tmp_path):
    with tb.SummaryWriter(tmp_path) as a, tb.SummaryWriter(tmp_path) as b:
        a.scalars(1, {"x": 1.0})
        b.scalars(1, {"x": 2.0})
    assert a.path != b.path
    assert tb.read_events(a.path)[1]["scalars"] == {"x": 1.0}
    assert tb.read_events(b.path)[1]["scalars"] == {"x": 2.0}


def _three_records(tmp_path):
    with tb.SummaryWriter(tmp_path) as w:
        w.scalars(1, {"a": 1.0})
        w.scalars(2, {"a": 2.0})
    raw = w.path.read_bytes()
    offsets, pos = [], 0
    while pos < len(raw):
        offsets.append(pos)
        pos += 16 + struct.unpack("<Q", raw[pos : pos + 8])[0]
    assert len(offsets) == 3
    return w.path, bytearray(raw), offsets


@pytest.mark.parametrize("where", ["data", "length", "data_crc"])
def test_corruption_names_the_record(tmp_path, where):
    path, raw, offsets = _three_records(tmp_path)
    start = offsets[2]
    byte = {"data": start + 14, "length": start + 1, "data_crc": len(raw) - 1}[where]
    raw[byte] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: record 2 "):
        tb.read_events(path)


def test_truncation_names_the_record(tmp_path):
    path, raw, offsets = _three_records(tmp_path)
    path.write_bytes(bytes(raw[:-3]))
    with pytest.raises(ValueError, match=r"record 2 .*truncated"):
        tb.read_events(path)
    path.write_bytes(bytes(raw[: offsets[1] + 5]))
    with pytest.raises(ValueError, match=r"record 1 .*truncated"):
        tb.read_events(path)


def test_image_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (4, 6, 1), dtype=np.uint8)
    with tb.SummaryWriter(tmp_path) as w:
        w.image(10, "samples", rgb)
        w.image(11, "gray", gray)
        with pytest.raises(TypeError, match="uint8"):
            w.image(12, "bad", rgb.astype(np.float32))
        with pytest.raises(ValueError, match="shape"):
            w.image(12, "bad", rgb[..., :2])
    _, rgb_event, gray_event = tb.read_events(w.path)
    image = rgb_event["images"]["samples"]
    assert rgb_event["step"] == 10
    assert (image["height"], image["width"], image["colorspace"]) == (5, 7, 3)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image["encoded"]))), rgb)
    image = gray_event["images"]["gray"]
    assert (image["height"], image["width"], image["colorspace"]) == (4, 6, 1)
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(image["encoded"]))), gray[..., 0]
    )


def _protobuf_event_class():
    """Event/Summary/Value/Image declared with TensorFlow's field numbers, for real protobuf."""
    pytest.importorskip("google.protobuf")
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="tb_event_test.proto", package="tbtest")

    def message(name, fields):
        msg = proto.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            field = msg.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = f".tbtest.{type_name}"

    one, many = f.LABEL_OPTIONAL, f.LABEL_REPEATED
    message(
        "Image",
        [
            ("height", 1, f.TYPE_INT32, one, None),
            ("width", 2, f.TYPE_INT32, one, None),
            ("colorspace", 3, f.TYPE_INT32, one, None),
            ("encoded_image_string", 4, f.TYPE_BYTES, one, None),
        ],
    )
    message(
        "Value",
        [
            ("tag", 1, f.TYPE_STRING, one, None),
            ("simple_value", 2, f.TYPE_FLOAT, one, None),
            ("image", 4, f.TYPE_MESSAGE, one, "Image"),
        ],
    )
    message("Summary", [("value", 1, f.TYPE_MESSAGE, many, "Value")])
    message(
        "Event",
        [
            ("wall_time", 1, f.TYPE_DOUBLE, one, None),
            ("step", 2, f.TYPE_INT64, one, None),
            ("file_version", 3, f.TYPE_STRING, one, None),
            ("summary", 5, f.TYPE_MESSAGE, one, "Summary"),
        ],
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tbtest.Event"))


def test_events_parse_with_protobuf(tmp_path):
    """An independent decoder (the protobuf library) reads what the hand encoder wrote."""
    event_class = _protobuf_event_class()
    with tb.SummaryWriter(tmp_path) as w:
        w.scalars(-2, {"loss": 0.25, "acc": 0.75}, wall_time=12.5)
        w.image(3, "img", np.full((2, 3, 3), 9, np.uint8))
    raw, events, pos = w.path.read_bytes(), [], 0
    while pos < len(raw):
        (length,) = struct.unpack("<Q", raw[pos : pos + 8])
        events.append(event_class.FromString(raw[pos + 12 : pos + 12 + length]))
        pos += 16 + length
    version, scalars, image = events
    assert version.file_version == "brain.Event:2"
    assert (scalars.step, scalars.wall_time) == (-2, 12.5)
    assert [(v.tag, v.simple_value) for v in scalars.summary.value] == [
        ("loss", 0.25),
        ("acc", 0.75),
    ]
    (value,) = image.summary.value
    assert (image.step, value.tag) == (3, "img")
    assert (value.image.height, value.image.width, value.image.colorspace) == (2, 3, 3)
    decoded = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)))
    np.testing.assert_array_equal(decoded, np.full((2, 3, 3), 9, np.uint8))
