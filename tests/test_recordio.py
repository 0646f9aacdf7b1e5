"""InsightFace RecordIO without mxnet: hand-built files, the packer, and training on a
packed folder exactly as on the folder."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facecluster import io as facecluster_io
from facecluster.config import ConfigError, load_config
from facecluster.data import FaceDataModule, datamodule, recordio
from facecluster.data import pack as pack_module
from facecluster.data.folder import hold_out_identities, scan, scan_record_file, split_per_identity
from facecluster.data.images import IGNORED, BadImageError, decode_on_device
from facecluster.data.pack import main as pack_main
from facecluster.data.recordio import (
    FLOAT32_EXACT,
    MAGIC,
    RecordError,
    RecordFile,
    RecordIndex,
    RecordWriter,
    encode_record,
    image_layout,
    pack,
    unpack,
)
from facecluster.pipeline import train
from tests.conftest import DEMO, ROOT, SMOKE, smoke_overrides

MAGIC_BYTES = struct.pack("<I", MAGIC)


def _jpeg(value: int, fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (value, 255 - value, 40)).save(out, fmt)
    return out.getvalue()


def _write(path, records: dict[int, bytes], order=None):
    with RecordWriter(path / "train.rec", path / "train.idx") as w:
        for key in order or records:
            w.write(key, records[key])
    return RecordFile(path / "train.rec")


def test_a_payload_holding_the_magic_is_split_and_joined_back(tmp_path):
    # Aligned occurrences split the record (cflag 1/2/3), an unaligned one does not.
    payload = pack(3.0, b"ab" + b"xx" + MAGIC_BYTES + b"yyyy" + MAGIC_BYTES + b"z" + MAGIC_BYTES)
    assert payload[24 + 4 : 24 + 8] == MAGIC_BYTES
    raw = encode_record(payload)
    cflags = []
    pos = 0
    while pos < len(raw):
        magic, lrecord = struct.unpack_from("<II", raw, pos)
        assert magic == MAGIC
        cflags.append(lrecord >> 29)
        pos += 8 + (lrecord & (2**29 - 1))
        pos += -pos % 4
    assert cflags == [1, 2, 3]
    records = _write(tmp_path, {0: payload})
    assert records.payload(0) == payload
    assert unpack(records.payload(0)).label == 3.0


def test_label_arrays_unordered_index_and_png(tmp_path):
    records = {5: pack([7.0, 1.5], _jpeg(10)), 2: pack(4.0, _jpeg(200, "PNG")), 9: pack([1.0, 2.0])}
    rf = _write(tmp_path, records, order=[9, 5, 2])
    lines = (tmp_path / "train.idx").read_text().split()
    assert lines[0] == "9", "the index is not in key order"
    five = rf.record(5)
    assert five.flag == 2 and five.label.tolist() == [7.0, 1.5]
    png = rf.image(2)
    assert png.shape == (16, 16, 3) and png[0, 0].tolist() == [200, 55, 40]
    layout = image_layout(rf)  # no header record: one pass; 9 has no image
    assert layout.keys.tolist() == [2, 5] and layout.labels.tolist() == [4, 7]


def test_headers_read_at_once_equal_one_by_one(tmp_path):
    # RecordFile.heads/ranges read the label bytes of many records with numpy (the
    # label pass, the identity records, the boundaries past 2^24): the same as head()
    # and record() on every kind of record, split ones and a record at the file's end
    split = pack(6.0, b"\xff\xd8" + b"xx" + MAGIC_BYTES + bytes(40))
    records = {
        1: pack(3.0, _jpeg(1)),
        2: pack([7.0, 1.5], _jpeg(2)),  # a label array
        3: split,
        4: pack([1.0, 3.0]),  # an identity record: no image
        5: pack(np.float32(2**24 + 2), _jpeg(3)),
        7: pack([9.0], _jpeg(4)),  # a one-entry array, the last record
    }
    rf = _write(tmp_path, records)
    keys = np.array([7, 1, 2, 3, 4, 5, 6, 0, 3])  # 6 and 0 have no record
    labels, image, present = rf.heads(keys)
    assert present.tolist() == [k in records for k in keys.tolist()]
    for i, key in enumerate(keys.tolist()):
        if key in records:
            label, _, has_image = rf.head(key)
            assert (labels[i], image[i]) == (label, has_image), key
    assert rf.ranges(np.array([4])).tolist() == [[1, 3]]
    with pytest.raises(RecordError, match="key 1: not an identity record"):
        rf.ranges(np.array([4, 1]))
    with pytest.raises(RecordError, match=r"key 2 at offset \d+: label 1.5 is not"):
        rf.ranges(np.array([2]))


def test_the_index_reads_like_a_dict_and_names_a_bad_line(tmp_path):
    # dense keys (InsightFace), sparse keys (binary search), a key listed twice (the
    # last offset wins, as a dict filled line by line), a blank line, bad lines
    rec = tmp_path / "train.rec"
    rec.write_bytes(bytes(4096))
    idx = tmp_path / "train.idx"
    cases = {
        "0\t8\n1\t16\n2\t24\n": {0: 8, 1: 16, 2: 24},
        "7\t8\n1000000\t16\n3\t24\n": {3: 24, 7: 8, 1000000: 16},
        "1\t8\n1\t40\n0\t16": {0: 16, 1: 40},
        "1\t8\n\n0\t16\n": {0: 16, 1: 8},
    }
    for text, expected in cases.items():
        idx.write_text(text)
        offsets = RecordFile(rec).offsets
        assert dict(offsets) == expected and len(offsets) == len(expected)
        assert list(offsets) == sorted(expected) and max(offsets) == max(expected)
        for absent in (-1, 2**40, 5, 999999, "1", 1.5):
            assert absent not in offsets
    for text, message in {
        "0\t8\n1\t16 9\n": "line 2: expected 'key<TAB>offset'",
        "0\t8\nx\t16\n": "line 2: expected 'key<TAB>offset'",
        "0\t8\n\n1\t99999\n": "line 3: key 1 points at offset 99999, past the end",
        "0\t8\n1\t-4\n": "line 2: key 1 points at offset -4, before the start of the file",
        "0\t8\n\n1\t-4\n": "line 3: key 1 points at offset -4, before the start",  # said "past"
        "0\t8\n1\t-\n": "line 2: expected 'key<TAB>offset'",  # numpy would read 0
        # lines whose extra and missing tokens would pair up in a whole-file parse
        "0\t0\t1\n8\n": "line 1: expected 'key<TAB>offset'",
        "0 8\n\n1 16 2 24\n": "line 3: expected 'key<TAB>offset'",
        "0\t8\n1\t99999\nx\t16\n": "line 2: key 1 points at offset 99999",
        f"{2**64}\t8\n": "line 1: key 18446744073709551616 is out of range",
        f"0\t{2**64}\n": "line 1: key 0 points at offset 18446744073709551616",
        "\n": "lists no record",
    }.items():
        idx.write_text(text)
        with pytest.raises(ValueError, match=message):
            RecordFile(rec)
    # bytes of no text (a damaged file), or digits that are not ASCII
    for data in (b"0\t8\n1\t1\xff6\n", "0\t8\n1\t\uff11\uff16\n".encode()):
        idx.write_bytes(data)
        with pytest.raises(ValueError, match=r"train.idx line 2: expected 'key<TAB>offset'"):
            RecordFile(rec)


def test_batch_views_equal_encoded_and_leave_unsound_records_to_it(tmp_path):
    # a loader reads a batch through views(): the same bytes as encoded() for whole
    # records, None (encoded() then names the fault) for split, corrupt, missing ones
    split = pack(1.0, b"\xff\xd8xx" + MAGIC_BYTES * 3)
    records = {0: pack(0.0, _jpeg(1)), 3: pack([2.0, 5.0], _jpeg(2)), 4: split, 6: pack(3.0)}
    rf = _write(tmp_path, records, order=[6, 3, 0, 4])
    keys = np.array([3, 0, 4, 6, 5, -1, 2**40, 0])
    views = rf.views(keys)
    assert [v is None for v in views] == [False, False, True, False, True, True, True, False]
    for key, view in zip(keys.tolist(), views, strict=True):
        if view is not None:
            assert bytes(view) == rf.encoded(key) and isinstance(view, memoryview)
    assert bytes(views[3]) == b""  # an identity-style record holds no image
    assert rf.encoded(4) == b"\xff\xd8xx" + MAGIC_BYTES * 3
    assert rf.offsets.lookup(keys).tolist() == [rf.offsets.get(k, -1) for k in keys.tolist()]
    data = bytearray((tmp_path / "train.rec").read_bytes())
    data[rf.offsets[3]] ^= 0xFF
    (tmp_path / "train.rec").write_bytes(bytes(data))
    corrupt = RecordFile(tmp_path / "train.rec")
    assert corrupt.views(np.array([3, 0]))[0] is None
    with pytest.raises(RecordError, match=rf"key 3 at offset {rf.offsets[3]}: bad magic"):
        corrupt.encoded(3)
    # a sparse index is searched, not tabled: the same answers
    sparse = _write(tmp_path, {7: pack(0.0, _jpeg(3)), 10**9: pack(1.0, _jpeg(4))})
    keys = np.array([10**9, 7, 8, -3, 2**62])
    assert sparse.offsets.lookup(keys).tolist() == [
        sparse.offsets.get(k, -1) for k in keys.tolist()
    ]
    empty = RecordIndex(np.array([], dtype=np.int64), np.array([], dtype=np.int64))
    assert empty.lookup(keys).tolist() == [-1] * len(keys) and len(empty) == 0
    assert [bytes(v) if v is not None else None for v in sparse.views(keys)] == [
        _jpeg(4),
        _jpeg(3),
        None,
        None,
        None,
    ]


def test_corrupt_record_and_truncated_file_are_named(tmp_path):
    rf = _write(tmp_path, {0: pack(0.0, _jpeg(1)), 1: pack(0.0, _jpeg(2))})
    data = bytearray((tmp_path / "train.rec").read_bytes())
    offset = rf.offsets[1]
    data[offset] ^= 0xFF
    (tmp_path / "train.rec").write_bytes(bytes(data))
    with pytest.raises(RecordError, match=rf"key 1 at offset {offset}: bad magic"):
        RecordFile(tmp_path / "train.rec").image(1)
    (tmp_path / "train.rec").write_bytes(bytes(data[: offset + 4]))
    with pytest.raises(ValueError, match=rf"key 1 points at offset {offset}, past the end"):
        RecordFile(tmp_path / "train.rec")
    # cut inside the last record (no identity records after it, as in im2rec files):
    # refused at open too, not when training reaches it; a split record's later part too
    split = pack(1.0, b"\xff\xd8" + b"xx" + MAGIC_BYTES + bytes(40))
    for last in (pack(0.0, _jpeg(2)), split):
        (tmp_path / "train.rec").unlink()
        _write(tmp_path, {0: pack(0.0, _jpeg(1)), 1: last})
        data = (tmp_path / "train.rec").read_bytes()
        (tmp_path / "train.rec").write_bytes(data[:-12])
        with pytest.raises(ValueError, match=r"ends inside its last record \(key 1 at offset"):
            RecordFile(tmp_path / "train.rec")


def test_an_idx_cut_short_is_refused_at_open_naming_what_it_leaves_out(tmp_path):
    # An .idx cut at a line boundary (an interrupted copy) listed fewer records, and
    # training went on without the rest and their identities, without a word.
    split = pack(1.0, b"\xff\xd8" + b"xx" + MAGIC_BYTES + bytes(40))  # two parts on disk
    _write(tmp_path, {0: pack(0.0, _jpeg(1)), 1: split, 2: pack(2.0, _jpeg(3))})
    RecordFile(tmp_path / "train.rec")  # whole: opens
    idx = tmp_path / "train.idx"
    lines = idx.read_text().splitlines(keepends=True)
    end = int(lines[2].split()[1])  # where the records the cut .idx drops begin
    idx.write_text("".join(lines[:2]))
    rest = (tmp_path / "train.rec").stat().st_size - end
    with pytest.raises(
        ValueError, match=rf"indexes .*train.rec up to byte {end}, .*key 1\), but {rest} more bytes"
    ):
        RecordFile(tmp_path / "train.rec")


@pytest.mark.parametrize("block", [recordio.HEADS_BLOCK, 1, 2])
def test_an_idx_missing_lines_in_the_middle_is_refused_naming_the_first_unlisted_record(
    tmp_path, monkeypatch, caplog, block
):
    # A file without identity records (im2rec's layout) says nothing else of which
    # records it holds: an .idx missing a line in the middle dropped that image, and
    # maybe its identity, from training without a word. A split record before the gap
    # (two parts on disk), an .idx out of file order, and a gap at the end of a block
    # of the pass (block: records per block) must not hide it.
    monkeypatch.setattr(recordio, "HEADS_BLOCK", block)
    split = pack(1.0, b"\xff\xd8" + b"xx" + MAGIC_BYTES + bytes(40))
    records = {3: pack(0.0, _jpeg(1)), 1: split, 2: pack(2.0, _jpeg(3)), 0: pack(2.0, _jpeg(4))}
    _write(tmp_path, records)
    assert image_layout(RecordFile(tmp_path / "train.rec")).keys.tolist() == [3, 1, 0, 2]
    idx = tmp_path / "train.idx"
    lines = idx.read_text().splitlines(keepends=True)
    offsets = {int(k): int(v) for k, v in (line.split() for line in lines)}
    for dropped, before in ((2, "after key 1"), (1, "after key 3"), (3, "before its first")):
        idx.write_text("".join(reversed([ln for ln in lines if not ln.startswith(f"{dropped}\t")])))
        rf = RecordFile(tmp_path / "train.rec")  # the tail is listed: opens
        with pytest.raises(
            ValueError, match=rf"does not list the record at byte {offsets[dropped]} .*{before}"
        ):
            image_layout(rf)
    # a key listed twice (im2rec of a list with a repeated index): its earlier record
    # is listed, though no key reads it (the last offset wins, as in mxnet): here the
    # file's first record, then its last
    o = offsets
    for text in (
        f"1\t{o[3]}\n1\t{o[1]}\n2\t{o[2]}\n0\t{o[0]}\n",
        f"3\t{o[3]}\n1\t{o[1]}\n2\t{o[0]}\n2\t{o[2]}\n",
    ):
        idx.write_text(text)
        caplog.clear()
        with caplog.at_level("WARNING"):
            layout = image_layout(RecordFile(tmp_path / "train.rec"))
        assert "lists 1 key(s) more than once" in caplog.text
        assert len(layout.keys) == 3
    # two keys at one record (a damaged line): read twice, the other never (a review)
    for text in (
        f"3\t{o[3]}\n1\t{o[1]}\n2\t{o[1]}\n0\t{o[0]}\n",  # in key order: not file order
        f"0\t{o[3]}\n1\t{o[1]}\n2\t{o[2]}\n3\t{o[2]}\n",  # in file order
    ):
        idx.write_text(text)
        with pytest.raises(ValueError, match=r"train.idx: keys \d and \d point at the same rec"):
            RecordFile(tmp_path / "train.rec")
    # a line missing right after such a record: named by its byte (no key reads it)
    idx.write_text(f"2\t{o[3]}\n2\t{o[2]}\n0\t{o[0]}\n")
    with pytest.raises(ValueError, match=rf"at byte {o[1]} .*after the record at byte {o[3]} "):
        image_layout(RecordFile(tmp_path / "train.rec"))
    # a corrupt record is on_bad_image's: not taken for a gap
    idx.write_text("".join(lines))
    original = (tmp_path / "train.rec").read_bytes()
    data = bytearray(original)
    data[offsets[2] + 4] ^= 0xFF  # its length word
    (tmp_path / "train.rec").write_bytes(bytes(data))
    assert len(image_layout(RecordFile(tmp_path / "train.rec")).keys) == 4
    # nor judged by its length when its magic is broken: the next record start after it
    # is looked for (past the split record's later parts), so a line missing after it
    # is found still
    data = bytearray(original)
    data[offsets[1]] ^= 0xFF
    (tmp_path / "train.rec").write_bytes(bytes(data))
    assert image_layout(RecordFile(tmp_path / "train.rec")).unreadable.tolist() == [1]
    idx.write_text("".join(ln for ln in lines if not ln.startswith("2\t")))
    with pytest.raises(ValueError, match=rf"at byte {offsets[2]} .*after key 1 "):
        image_layout(RecordFile(tmp_path / "train.rec"))


def test_a_key_listed_again_leaves_unread_only_the_records_its_earlier_lines_name():
    # a key three times: one key listed twice, two records unread; the same line twice
    # reads its one record: nothing unread (and no warning at open)
    index = RecordIndex(np.array([5, 5, 5, 1]), np.array([8, 16, 24, 32]))
    assert index.listed_twice == 1 and index.shadowed.tolist() == [8, 16]
    assert index[5] == 24 and index.is_shadowed(16) and not index.is_shadowed(24)
    same = RecordIndex(np.array([5, 5]), np.array([8, 8]))
    assert same.listed_twice == 1 and same.shadowed.tolist() == [] and same[5] == 8


def test_an_identity_range_over_keys_the_idx_lacks_is_refused_at_start(tmp_path):
    records = {k: pack(float(k >= 3), _jpeg(k)) for k in range(1, 6)}
    records |= {6: pack([1.0, 3.0]), 7: pack([3.0, 6.0]), 0: pack([6.0, 8.0])}
    _write(tmp_path, records)
    assert image_layout(RecordFile(tmp_path / "train.rec")).keys.tolist() == [1, 2, 3, 4, 5]
    idx = tmp_path / "train.idx"
    idx.write_text("".join(line for line in idx.open() if not line.startswith("4\t")))
    with pytest.raises(RecordError, match=r"identity 1's image keys \[3, 6\) include key 4"):
        image_layout(RecordFile(tmp_path / "train.rec"))


def test_key_ranges_past_float32_precision_are_exact(tmp_path):
    # InsightFace stores [start, end) ranges as float32: past 2^24 odd keys round.
    base = FLOAT32_EXACT - 4
    sizes = [5, 3, 6, 1, 4]  # boundaries at 2^24 + 1, + 4, + 5, + 9
    records, _ = _insightface(base, sizes)
    assert int(np.float32(FLOAT32_EXACT + 1)) != FLOAT32_EXACT + 1  # the rounding is real
    layout = image_layout(_write(tmp_path, records))
    expected = [label for label, n in enumerate(sizes) for _ in range(n)]
    assert layout.labels.tolist() == expected
    assert layout.keys.tolist() == list(range(base, base + sum(sizes)))


def _insightface(base: int, sizes: list[int], gap_after: int | None = None):
    """InsightFace's layout: identity ``label``'s ``sizes[label]`` images from key
    ``base`` on (a key no record has after identity ``gap_after``), then one identity
    record each, the header at key 0. Returns the records and the ``[start, end)``s."""
    records, key, ranges = {}, base, []
    for label, n in enumerate(sizes):
        ranges.append((key, key + n))
        for _ in range(n):
            records[key] = pack(float(label), _jpeg(label * 30))
            key += 1
        key += label == gap_after
    first = key
    for label, (a, b) in enumerate(ranges):
        records[first + label] = pack([a, b])
    records[0] = pack([first, first + len(sizes)])
    return records, ranges


def test_keys_far_past_float32_precision_are_refused_at_once(tmp_path, monkeypatch):
    # a fuzzing review: keys near 2^50 (a 12 KB file) kept the scan busy for good (a
    # Python loop over one float32 spacing, 2^27 keys), near 2^40 asked numpy for 1 TiB
    records, _ = _insightface(2**50, [2, 1])
    with pytest.raises(RecordError, match=r"key 0 \(the header record\).*lie at or past key 2\^32"):
        image_layout(_write(tmp_path, records))
    # a sound header, an identity record's range far past it: named before the search
    # around each boundary (which took 25 s here to come to the same refusal)
    records, ranges = _insightface(100, [2, 1])
    records[ranges[-1][1] + 1] = pack([2.0**50, 2.0**50 + 1])  # identity 1's record
    with monkeypatch.context() as m:
        m.setattr(recordio, "_true_boundaries", lambda *a, **k: pytest.fail("searched"))
        with pytest.raises(RecordError, match=r"identity 1's image keys \[\d+, \d+\) lie past"):
            image_layout(_write(tmp_path, records))


def test_a_damaged_label_at_a_boundary_past_float32_precision_is_said(tmp_path, caplog):
    # past 2^24 a range's end is where its records' labels change: one damaged label
    # (identity 1's image labelled 0) moved an intact image of identity 1 to identity 0
    # without a word (below 2^24 the exact ranges decide)
    base = FLOAT32_EXACT + 3
    records, ranges = _insightface(base, [6, 6])
    records[base + 7] = pack(0.0, _jpeg(30))  # identity 1's second image, labelled 0
    with caplog.at_level("WARNING"):
        layout = image_layout(_write(tmp_path, records))
    assert len(layout.keys) == 12
    assert f"carry another label between two of its records (the first: key {base + 6} " in (
        caplog.text
    )


@pytest.mark.parametrize("case", ["empty identity", "key of no identity", "image of no identity"])
def test_ranges_past_float32_precision_read_as_the_same_layout_below_it(tmp_path, case):
    # Past 2^24 an empty range [s, s) was looked for among the images (none carries its
    # label: the run stopped), and a start that rounds like the previous end took that
    # end though a key of neither lay between (2^24 + 7 and + 8 both store + 8).
    layouts = []
    bases = (1000, FLOAT32_EXACT - 4) if case == "empty identity" else (1002, FLOAT32_EXACT + 2)
    for base in bases:
        if case == "empty identity":  # [+4, +4) then [+4, +5), both stored [+4, +4];
            # [+11, +11) then [+11, +15), stored [+12, +12] and [+12, +16]
            records, ranges = _insightface(base, [5, 3, 0, 1, 6, 0, 4])
        else:  # identity 0 [+2, +7), a key of neither, identity 1 [+8, +11)
            records, ranges = _insightface(base, [5, 3], gap_after=0)
            if case == "image of no identity":
                records[ranges[0][1]] = pack(7.0, _jpeg(200))
        folder = tmp_path / str(base)
        folder.mkdir()
        layout = image_layout(_write(folder, records))
        layouts.append((layout.keys - base, layout.labels))
    stored = np.array(ranges, dtype=np.float32).astype(np.int64)  # the rounding is real:
    if case == "empty identity":
        assert stored[3, 0] == stored[3, 1] == ranges[3][0]  # one image: [+4, +5)
    else:
        assert stored[0, 1] == stored[1, 0] == ranges[1][0]  # + 7 stored + 8
    assert np.array_equal(layouts[0][0], layouts[1][0]), case
    assert np.array_equal(layouts[0][1], layouts[1][1]), case
    expected = [label for label, (a, b) in enumerate(ranges) for _ in range(b - a)]
    assert layouts[1][1].tolist() == expected


@pytest.mark.parametrize("base", [100, FLOAT32_EXACT + 3])
@pytest.mark.parametrize("lost", [1, 2, 4, 5, 6])  # the line of key base + lost (0..11)
def test_an_idx_line_lost_inside_an_identity_is_named_past_float32_precision(tmp_path, base, lost):
    # past 2^24 a range's end was the first change out of the identity near the stored
    # end: a key lost two before the end ended the range there, and the key after it
    # was left out of training without a word (below 2^24: the missing key is named);
    # an identity's last key or the next one's first, lost, looks like a range's end
    records, _ = _insightface(base, [6, 6])
    _write(tmp_path, records)
    idx = tmp_path / "train.idx"
    idx.write_text("".join(line for line in idx.open() if int(line.split()[0]) != base + lost))
    named = rf"identity 0's image keys \[{base}, {base + 6}\) include key {base + lost}, "
    if lost >= 5 and base > FLOAT32_EXACT:  # past 2^24: the record's bytes say
        named = rf"train\.idx does not list the record at byte \d+ .*after key {base + lost - 1}"
    elif lost == 6:  # below it: the next identity's range
        named = rf"identity 1's image keys \[{base + 6}, {base + 12}\) include key {base + 6}"
    with pytest.raises(RecordError, match=named):
        image_layout(RecordFile(tmp_path / "train.rec"))


def test_records_written_out_of_key_order_past_float32_precision_are_all_listed(tmp_path):
    # the record after an identity's last key is another key's: looked up among every
    # listed offset (sorted once for more than a few), not taken for an unlisted one
    records, ranges = _insightface(FLOAT32_EXACT + 3, [2, 1, 3] * 7)
    layout = image_layout(_write(tmp_path, records, order=sorted(records, reverse=True)))
    assert layout.labels.tolist() == [i for i, (a, b) in enumerate(ranges) for _ in range(b - a)]
    assert layout.keys.tolist() == list(range(ranges[0][0], ranges[-1][1]))


@pytest.mark.parametrize("offset", [2, 4])  # the first identity record stored one too high, low
def test_a_key_of_no_record_before_the_identity_records_past_float32_precision(tmp_path, offset):
    # the header's first identity key (2^24 + 11 or + 13, both stored + 12) was looked
    # for as an image record followed by an identity record: with no record just
    # before it the rounded key stayed, and identity 0's record was read one key off
    # (a run refused, or identity 0's images dropped and the others relabelled)
    layouts = []
    for base in (1000 + offset, FLOAT32_EXACT + offset):
        records, ranges = _insightface(base, [5, 3], gap_after=1)
        first = ranges[-1][1] + 1
        assert int(np.float32(first)) != first or base < FLOAT32_EXACT  # the rounding is real
        folder = tmp_path / str(base)
        folder.mkdir()
        layout = image_layout(_write(folder, records))
        layouts.append((layout.keys - base, layout.labels))
    assert np.array_equal(layouts[0][0], layouts[1][0])
    assert layouts[1][1].tolist() == [0] * 5 + [1] * 3
    assert layouts[0][1].tolist() == [0] * 5 + [1] * 3


@pytest.mark.parametrize("base", [1002, 2 * FLOAT32_EXACT + 2])
def test_a_lost_idx_line_of_the_first_identity_record_is_refused_past_float32_precision(
    tmp_path, base
):
    # past 2^25 the next identity record lies within the header's rounding: taken for
    # the first, it dropped an identity and the last one's images without a word
    records, ranges = _insightface(base, [2, 3, 2, 3])
    _write(tmp_path, records)
    first = ranges[-1][1]
    idx = tmp_path / "train.idx"
    idx.write_text("".join(line for line in idx.open() if int(line.split()[0]) != first))
    with pytest.raises(RecordError, match=rf"no identity record with key {first}"):
        image_layout(RecordFile(tmp_path / "train.rec"))


def test_identity_ranges_over_the_header_identity_records_or_each_other_are_refused(tmp_path):
    # they were laid out: the header and identity records trained on as images, a
    # record under two labels
    images = {k: pack(float(k >= 3), _jpeg(k)) for k in range(1, 6)}
    for ranges, message in {
        ((0, 3), (3, 6)): r"key 6 at offset \d+: identity 0's image keys \[0, 3\) cover key 0",
        ((1, 3), (3, 7)): r"key 7 at offset \d+: identity 1's image keys \[3, 7\) cover the id",
        ((1, 4), (3, 6)): r"key 7 at offset \d+: identity 1's image keys \[3, 6\) overlap iden",
        ((3, 6), (1, 4)): r"key 6 at offset \d+: identity 0's .* overlap identity 1's \[1, 4\)",
    }.items():
        folder = tmp_path / str(ranges)
        folder.mkdir()
        records = images | {6: pack(ranges[0]), 7: pack(ranges[1]), 0: pack([6.0, 8.0])}
        with pytest.raises(RecordError, match=message):
            image_layout(_write(folder, records))
    # an empty range, wherever it lies, holds no key: not refused
    records = images | {6: pack([1.0, 6.0]), 7: pack([0.0, 0.0]), 0: pack([6.0, 8.0])}
    assert image_layout(_write(tmp_path, records)).labels.tolist() == [0] * 5


def test_a_folder_named_like_a_rec_file_is_read_as_the_folder(tmp_path):
    # glint360k.rec/ holding train.rec/.idx was taken for a missing file
    records = {k: pack(float(k >= 3), _jpeg(k)) for k in range(1, 6)}
    records |= {6: pack([1.0, 3.0]), 7: pack([3.0, 6.0]), 0: pack([6.0, 8.0])}
    (tmp_path / "glint.rec").mkdir()
    _write(tmp_path / "glint.rec", records)
    for root in (tmp_path / "glint.rec", f"{tmp_path / 'glint.rec'}/"):
        assert len(scan(root).samples) == 5
    with pytest.raises(FileNotFoundError, match=r"missing.rec does not exist"):
        scan(tmp_path / "missing.rec")
    # a .rec copied without its .idx: said "does not exist", not where it belongs
    (tmp_path / "alone").mkdir()
    shutil.copy(tmp_path / "glint.rec" / "train.rec", tmp_path / "alone" / "train.rec")
    with pytest.raises(FileNotFoundError, match=r"train.idx does not exist \(a .rec is read "
                       r"through its .idx, beside it: copy train.idx with it"):  # fmt: skip
        RecordFile(tmp_path / "alone" / "train.rec")


def test_a_folder_of_train_rec_and_identity_folders_warns_which_it_reads(
    tmp_path, caplog, monkeypatch
):
    # identity folders beside a train.rec: it trained on the .rec without a word
    records = {k: pack(float(k >= 3), _jpeg(k)) for k in range(1, 6)}
    records |= {6: pack([1.0, 3.0]), 7: pack([3.0, 6.0]), 0: pack([6.0, 8.0])}
    _write(tmp_path, records)
    (tmp_path / ".cache").mkdir()  # hidden: not counted
    (tmp_path / "lost+found").mkdir()  # a file system's, on a data set's own mount
    with caplog.at_level("WARNING"):
        assert len(scan(tmp_path).samples) == 5
    assert "folders too" not in caplog.text
    (tmp_path / "Ann").mkdir()
    with caplog.at_level("WARNING"):
        assert len(scan(tmp_path).samples) == 5
    assert (
        f"root '{tmp_path}' holds train.rec and folders too (Ann): training reads "
        f"{tmp_path / 'train.rec'}. To train on the image folders, point data.root at a "
        "folder without train.rec"
    ) in caplog.text
    for name in ("Bob", "Cid", "Dan"):
        (tmp_path / name).mkdir()
    caplog.clear()
    with caplog.at_level("WARNING"):
        scan(tmp_path)
    assert re.search(r"folders too \((\w+, ){3}\.\.\.\)", caplog.text)
    # a folder that can be entered but not listed (shared storage, mode 711): its
    # train.rec is read as before, not stopped by the look for folders
    real_scandir = os.scandir

    def refused(path):
        if Path(path) == tmp_path:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", refused)
    assert len(scan(tmp_path).samples) == 5
    monkeypatch.undo()
    # without its .idx: that error alone (the warning came first, as if it would train)
    (tmp_path / "train.idx").unlink()
    caplog.clear()
    with caplog.at_level("WARNING"), pytest.raises((FileNotFoundError, ValueError), match="idx"):
        scan(tmp_path)
    assert "folders too" not in caplog.text


def test_a_payload_the_writer_refuses_leaves_no_idx_line(tmp_path, monkeypatch):
    # the .idx line was written first: the refused key then named the next record
    real = recordio.encode_record

    def encode(payload):  # stands for a payload of 2^29 bytes or more
        if payload.endswith(b"HUGE"):
            raise ValueError("a record payload holds ... under 2^29")
        return real(payload)

    monkeypatch.setattr(recordio, "encode_record", encode)
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        w.write(0, pack(0.0, _jpeg(10)))
        with pytest.raises(ValueError, match="2"):
            w.write(1, pack(1.0, b"HUGE"))
        w.write(2, pack(2.0, _jpeg(200)))
    rf = RecordFile(tmp_path / "train.rec")
    assert list(rf.offsets) == [0, 2] and rf.record(2).label == 2.0


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    out = tmp_path_factory.mktemp("packed")
    assert pack_main([str(DEMO), str(out / "rec")]) == 0
    assert pack_main([str(DEMO), str(out / "shuffled"), "--shuffle"]) == 0
    return out


def test_packed_folder_scans_and_splits_like_the_folder(packed):
    folder = scan(DEMO, min_images_per_class=10, max_classes=30)

    def split_bytes(f):
        # What each split holds, as image bytes: the same images, not just the same indices.
        read = (
            (lambda key: f.records.record(key).data)
            if f.records
            else (lambda path: open(path, "rb").read())
        )
        return {
            name: [read(f.samples.source(i)) for i in ids]
            for name, ids in split_per_identity(f, 0.1, 0.2, 7).items()
        }

    expected = split_bytes(folder)
    for rec in (packed / "rec" / "train.rec", packed / "rec"):
        records = scan(rec, min_images_per_class=10, max_classes=30)
        assert records.class_names == folder.class_names
        assert [label for _, label in records.samples] == [label for _, label in folder.samples]
        assert split_bytes(records) == expected
    # A shuffled pack (no identity records) has the same identities and images per
    # identity, in another order within each identity, so another split.
    shuffled = scan(packed / "shuffled", min_images_per_class=10, max_classes=30)
    assert shuffled.class_names == folder.class_names
    assert [label for _, label in shuffled.samples] == [label for _, label in folder.samples]
    header = RecordFile(packed / "rec" / "train.rec").record(0)
    assert header.flag == 2 and not header.data, "InsightFace layout: record 0 is the header"
    # its .idx in key order, the header's line first: read as it is, not sorted (a
    # review: the header's line came last, and a 44.6M-line .idx was sorted at start)
    keys = [int(line.split()[0]) for line in (packed / "rec" / "train.idx").open()]
    assert keys == list(range(len(keys)))
    assert (packed / "rec" / "property").read_text().strip() == "158,112,112"


def test_datamodule_serves_the_same_pixels_from_rec_and_folder(packed):
    kw = {"min_images_per_class": 10, "max_classes": 8, "batch_size": 4, "image_size": 32}
    kw["unseen_fraction"] = 0.25  # the unseen identities' loader: record keys, as the others
    a, b = FaceDataModule(str(DEMO), **kw), FaceDataModule(str(packed / "rec"), **kw)
    for loaders in (
        (a.test_dataloader(), b.test_dataloader()),
        (a.unseen_dataloader("test"), b.unseen_dataloader("test")),
    ):
        for x, y in zip(*loaders, strict=True):
            assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])


def test_a_broken_face_of_an_unseen_identity_in_a_rec_is_skipped_or_named(tmp_path):
    # the unseen identities' faces were locator strings: a sound record whose JPEG did
    # not decode raised int('<file>#<key>') (ValueError) under skip and fail alike,
    # where the folder's loader left the face out
    root = tmp_path / "faces"
    for name in sorted(p.name for p in DEMO.iterdir() if p.is_dir())[:4]:
        shutil.copytree(DEMO / name, root / name)
    kw = {"min_images_per_class": 1, "unseen_fraction": 0.5, "max_bad_fraction": 1.0}
    held = FaceDataModule(str(root), **kw).unseen_identities("test")[0]
    broken = sorted((root / held).iterdir())[0]
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    rec = pack_module.pack_folder(root, tmp_path / "rec")
    for data in (root, rec):
        dm = FaceDataModule(str(data), **kw)
        labels = torch.cat([y for _, y in dm.unseen_dataloader("test")])
        assert (labels == IGNORED).sum() == 1 and (labels < 0).all(), data
        with pytest.raises(BadImageError, match=r"cannot decode .*on_bad_image=fail") as e:
            list(FaceDataModule(str(data), **kw, on_bad_image="fail").unseen_dataloader("test"))
        where = broken.name if data == root else r"train\.rec#\d+ \(offset \d+\)"
        assert re.search(where, str(e.value)), e.value


def test_a_run_checks_that_its_data_splits_its_identities_as_it_did(tmp_path, packed, monkeypatch):
    # the same identities, their images in another order (a --shuffle pack of the
    # run's folder), split otherwise: a resume or evaluation would test on training
    # images; the run's folder packed as it is splits alike
    from facecluster.run import CLASS_NAMES, SPLIT, RunFolder

    kw = {"min_images_per_class": 10, "max_classes": 3}
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    run.keep_data(FaceDataModule(str(DEMO), **kw))
    run.check_data(FaceDataModule(str(packed / "rec"), **kw))
    shuffled = FaceDataModule(str(packed / "shuffled"), **kw)
    assert shuffled.class_names == run.class_names()
    with pytest.raises(ConfigError, match="not split as the run's were"):
        run.check_data(shuffled)
    (run.path / SPLIT).unlink()  # a run made before splits were recorded: not checked
    run.check_data(shuffled)
    # an image that could not be read when the split was recorded (a transient read
    # error) is not compared, and one broken or repaired since is one of many
    folder = FaceDataModule(str(DEMO), **kw)
    first_val = folder.split_samples("val").locators[0]
    (run.path / CLASS_NAMES).unlink()  # recorded again, as a new run does
    with monkeypatch.context() as m:
        original = Path.read_bytes

        def flaky(path):
            if str(path) == first_val:
                raise OSError(5, "Input/output error")
            return original(path)

        m.setattr(Path, "read_bytes", flaky)
        run.keep_data(FaceDataModule(str(DEMO), **kw))
    assert json.loads((run.path / SPLIT).read_text())["val"][0] == ""
    run.check_data(FaceDataModule(str(packed / "rec"), **kw))
    # images removed since: named as such (it said "another order"), with the counts
    copy = tmp_path / "fewer"
    for name in run.class_names():
        shutil.copytree(DEMO / name, copy / name)
    for image in sorted((copy / run.class_names()[0]).iterdir())[:3]:
        image.unlink()
    fewer = FaceDataModule(str(copy), **kw)
    assert fewer.class_names == run.class_names()
    with pytest.raises(ConfigError, match=r"other images: its splits hold .* images, the run's"):
        run.check_data(fewer)
    # a run recorded before the image counts were (2026-12-06): told by its splits' sizes
    kept = json.loads((run.path / SPLIT).read_text())
    del kept["images"], kept["per_identity"]
    (run.path / SPLIT).write_text(json.dumps(kept))
    said = r"other images: its split gives (val|test) \d+ images, the run's \d+.* added to or"
    with pytest.raises(ConfigError, match=said):
        run.check_data(fewer)
    run.check_data(FaceDataModule(str(DEMO), **kw))  # the run's data passes


def test_a_run_refuses_data_whose_identities_hold_other_images_than_it_trained_on(tmp_path):
    # an image added to or removed from any identity splits it otherwise; only the first
    # 64 identities' val and test images are read, and one image differing there passed
    from facecluster.run import RunFolder

    kw = {"min_images_per_class": 1}
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    run.keep_data(FaceDataModule(str(DEMO), **kw))
    names = run.class_names()
    assert len(names) > 64
    for changed in (names[-1], names[0]):  # past the 64 read, and among them
        root = tmp_path / f"faces-{changed}"
        root.mkdir()
        for name in names:
            if name == changed:
                shutil.copytree(DEMO / name, root / name)
            else:
                (root / name).symlink_to(DEMO / name)
        first = sorted((root / changed).iterdir())[0]
        shutil.copy(first, root / changed / f"0-{first.name}")  # one more image
        with pytest.raises(ConfigError, match=r"other images: its splits hold [\d,]+ images, the"):
            run.check_data(FaceDataModule(str(root), **kw))
        # one moved to another identity: as many in all
        other = names[1] if changed == names[0] else names[0]
        (root / other).unlink()
        shutil.copytree(DEMO / other, root / other)
        next((root / other).iterdir()).unlink()
        with pytest.raises(ConfigError, match=r"as the run's, but not as many of each identity"):
            run.check_data(FaceDataModule(str(root), **kw))
    run.check_data(FaceDataModule(str(DEMO), **kw))  # the same data passes


def test_a_corrupt_record_is_skipped_or_stops_naming_key_and_offset(tmp_path, packed):
    import shutil

    shutil.copytree(packed / "rec", tmp_path / "rec")
    rec = tmp_path / "rec" / "train.rec"
    offset = RecordFile(rec).offsets[5]
    data = bytearray(rec.read_bytes())
    data[offset] ^= 0xFF  # the magic of key 5, the fifth image of the first identity
    rec.write_bytes(bytes(data))
    kw = {"min_images_per_class": 10, "max_classes": 1, "batch_size": 4, "max_bad_fraction": 0.5}
    dm = FaceDataModule(str(tmp_path / "rec"), **kw)
    split = next(n for n in ("train", "val", "test") if 4 in dm._split_indices(n))
    dataset = dm._dataset(split, dm._split_indices(split), train=False)
    assert all(torch.isfinite(dataset[i][0]).all() for i in range(len(dataset)))
    assert dm.bad_images() == [f"{rec}#5"]
    failing = FaceDataModule(str(tmp_path / "rec"), on_bad_image="fail", **kw)
    with pytest.raises(Exception, match=rf"train.rec#5 .*key 5 at offset {offset}: bad magic"):
        failing._dataset(split, [4], train=False)[0]


def test_an_undecodable_image_in_a_sound_record_is_named_by_key_and_offset(
    tmp_path, packed, caplog
):
    # the record's framing is whole, its JPEG is not: the message named the key alone
    import shutil

    shutil.copytree(packed / "rec", tmp_path / "rec")
    rec = tmp_path / "rec" / "train.rec"
    offset = RecordFile(rec).offsets[5]
    image = RecordFile(rec).encoded(5)
    data = bytearray(rec.read_bytes())
    start = data.find(image, offset)
    data[start : start + len(image)] = bytes(len(image))  # zeros: no image format at all
    rec.write_bytes(bytes(data))
    kw = {"min_images_per_class": 10, "max_classes": 1, "batch_size": 4, "max_bad_fraction": 0.5}
    dm = FaceDataModule(str(tmp_path / "rec"), **kw)
    split = next(n for n in ("train", "val", "test") if 4 in dm._split_indices(n))
    dataset = dm._dataset(split, dm._split_indices(split), train=False)
    with caplog.at_level(logging.WARNING):
        assert all(torch.isfinite(dataset[i][0]).all() for i in range(len(dataset)))
    assert f"cannot decode {rec}#5 (offset {offset})" in caplog.text
    failing = FaceDataModule(str(tmp_path / "rec"), on_bad_image="fail", **kw)
    with pytest.raises(BadImageError, match=rf"cannot decode \S*train.rec#5 \(offset {offset}\)"):
        failing._dataset(split, [4], train=False)[0]


def test_a_record_whose_label_cannot_be_read_is_left_out_or_stops_by_on_bad_image(tmp_path, caplog):
    # In a file without identity records a record's label is its only word on its
    # identity: one corrupt record stopped the scan, whatever on_bad_image said. It is
    # now left out (skip, with a warning naming it) or stops at setup (fail), as a
    # zero-byte file of a folder is; the kept label pass remembers it.
    records = {k: pack(float(k // 4), _jpeg(k * 20)) for k in range(12)}
    rf = _write(tmp_path, records)
    offset = rf.offsets[5]
    data = bytearray((tmp_path / "train.rec").read_bytes())
    data[offset] ^= 0xFF  # key 5's magic
    (tmp_path / "train.rec").write_bytes(bytes(data))
    cache = tmp_path / "cache"
    kw = {"min_images_per_class": 1, "val_fraction": 0.0, "test_fraction": 0.0, "cache": cache}
    for scan_number in range(2):  # the label pass, then its kept result
        caplog.clear()
        with caplog.at_level("WARNING"):
            dm = FaceDataModule(str(tmp_path / "train.rec"), max_bad_fraction=0.1, **kw)
            dm.setup()
        assert sorted(dm._folder.samples.keys.tolist()) == [k for k in range(12) if k != 5]
        assert f"key 5 at offset {offset}: bad magic" in caplog.text, scan_number
        failing = FaceDataModule(str(tmp_path / "train.rec"), on_bad_image="fail", **kw)
        with pytest.raises(ValueError, match=rf"1 record.* key 5 at offset {offset}: bad magic"):
            failing.setup()
    # the share is of the whole file's records (their identities are unknown), whatever
    # identities are kept
    for max_classes in (None, 1):
        many = FaceDataModule(
            str(tmp_path / "train.rec"), max_bad_fraction=0.05, max_classes=max_classes, **kw
        )
        with pytest.raises(ValueError, match=r"1 of 12 records .* cannot be read, more than"):
            many.setup()
    # key 0, im2rec's first image (InsightFace's header key): left out as well
    data[rf.offsets[0]] ^= 0xFF
    (tmp_path / "train.rec").write_bytes(bytes(data))
    assert image_layout(RecordFile(tmp_path / "train.rec")).unreadable.tolist() == [0, 5]
    # every record unreadable: the scan names one
    for key in range(12):
        data[rf.offsets[key]] = 0
    (tmp_path / "train.rec").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"no image record whose label can be read: .*key 0 at"):
        FaceDataModule(str(tmp_path / "train.rec"), **kw).setup()


def test_an_empty_image_in_a_file_without_identity_records_is_a_broken_image(tmp_path, caplog):
    # A record of one label and no image bytes (mxnet's im2rec --pass-through of a
    # zero-byte file) was taken for another writer's header record and left out
    # without a word, its identity with it when it was the identity's only record. It
    # is an image, broken, as one in an identity's range is: on_bad_image=fail stops
    # naming its key and offset, skip warns and counts it. Label arrays of no image
    # (header and identity records) are still none.
    records = {k: pack(float(k // 4), _jpeg(k * 20)) for k in range(8)}
    records[5] = pack(1.0)  # identity 1's second image, empty
    records[8] = pack(2.0)  # identity 2's only image, empty
    records[9] = pack([2.0, 3.0])  # an identity-style record: no image
    rf = _write(tmp_path, records)
    assert image_layout(rf).keys.tolist() == list(range(9))
    kw = {"min_images_per_class": 1, "val_fraction": 0.0, "test_fraction": 0.0}
    kw["cache"] = tmp_path / "cache"
    dm = FaceDataModule(str(tmp_path / "train.rec"), max_bad_fraction=0.5, **kw)
    assert dm.class_names == ["0", "1", "2"]
    ids = dm._split_indices("train")
    dataset = dm._dataset("train", ids, train=False)
    with caplog.at_level(logging.WARNING):
        assert all(torch.isfinite(dataset[i][0]).all() for i in range(len(dataset)))
    named = {k: f"{tmp_path / 'train.rec'}#{k} (offset {rf.offsets[k]})" for k in (5, 8)}
    assert all(f"cannot decode {named[k]}" in caplog.text for k in named), caplog.text
    assert sorted(dm.bad_images()) == [f"{tmp_path / 'train.rec'}#{k}" for k in (5, 8)]
    at = int(np.flatnonzero(dm._folder.samples.keys[ids] == 5)[0])
    counted = FaceDataModule(str(tmp_path / "train.rec"), **kw)  # max_bad_fraction=0.01
    with pytest.raises(BadImageError, match=r"1 of 9 images of the train split are undec"):
        counted._dataset("train", ids, train=False)[at]
    failing = FaceDataModule(str(tmp_path / "train.rec"), on_bad_image="fail", **kw)
    with pytest.raises(BadImageError, match=rf"train.rec#5 \(offset {rf.offsets[5]}\)"):
        failing._dataset("train", ids, train=False)[at]
    # a label pass kept by the code before (which left them out) is made again
    (kept,) = (tmp_path / "cache").glob("*.labels.npz")
    with np.load(kept) as old:
        before = {name: old[name] for name in ("keys", "labels", "unreadable")}
        stamp = json.loads(str(old["stamp"]))
    left = (before["keys"] != 5) & (before["keys"] != 8)
    stamp["version"] = 2
    before.update(keys=before["keys"][left], labels=before["labels"][left])
    np.savez(kept, **before, stamp=np.array(json.dumps(stamp, sort_keys=True)))
    again = FaceDataModule(str(tmp_path / "train.rec"), **kw)
    again.setup()
    assert sorted(again._folder.samples.keys.tolist()) == list(range(9))
    # one written by something else with the files' stamp (a fuzzing review): a key
    # the .idx lacks stopped a read with a KeyError, a negative label named another
    # identity; both are made again
    stamp["version"] = json.loads(str(np.load(kept)["stamp"]))["version"]
    for damage in ({"keys": 99}, {"labels": -1}):
        name, value = next(iter(damage.items()))
        changed = dict(before, keys=np.arange(9), labels=np.array([0, 0, 0, 1, 1, 1, 1, 2, 2]))
        changed[name] = changed[name].copy()
        changed[name][3] = value
        np.savez(kept, **changed, stamp=np.array(json.dumps(stamp, sort_keys=True)))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            again = FaceDataModule(str(tmp_path / "train.rec"), **kw)
            again.setup()
        assert 'unreadable (ValueError("keys past train.idx\'s, or negative labels"))' in (
            caplog.text
        )
        assert sorted(again._folder.samples.keys.tolist()) == list(range(9))


def test_image_records_no_identity_range_covers_are_warned_about(tmp_path, caplog):
    # InsightFace's layout whose identity records leave keys 3-4 (images of identity 1)
    # in no range: left out without a word, where arcface_torch's MXFaceDataset trains
    # on every key below the header's first identity record. Each scan warns (the
    # layout is not kept), once.
    labels = [0, 0, 1, 1, 1, 1]
    records = {k: pack(float(label), _jpeg(k * 20)) for k, label in enumerate(labels, 1)}
    records.update({0: pack([7.0, 9.0]), 7: pack([1.0, 3.0]), 8: pack([5.0, 7.0])})
    rf = _write(tmp_path, records)
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert image_layout(RecordFile(tmp_path / "train.rec")).keys.tolist() == [1, 2, 5, 6]
        warned = [r.getMessage() for r in caplog.records if "no identity" in r.getMessage()]
        assert len(warned) == 1, caplog.text
        assert "2 image record(s)" in warned[0] and f"key 3 at offset {rf.offsets[3]}" in warned[0]
    # ranges that cover every image: no word; nor for keys that no record has
    records, _ = _insightface(1, [2, 4], gap_after=0)
    _write(tmp_path, records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        image_layout(RecordFile(tmp_path / "train.rec"))
    assert "no identity" not in caplog.text


def test_a_corrupt_record_at_a_boundary_past_float32_precision_stops_the_start_named(
    tmp_path,
):
    # Below 2^24 a corrupt record lies in the range its identity record gives, and
    # on_bad_image decides when training reads it. Past 2^24 the range boundary is
    # where the labels of the records around it change: with one of them unreadable,
    # which identity it belongs to is unknown (a guess put intact images under another
    # identity): the start stops, naming it.
    sizes = [5, 3, 6, 2, 4]
    for base in (1000, FLOAT32_EXACT - 4):
        records, _ = _insightface(base, sizes)
        folder = tmp_path / str(base)
        folder.mkdir()
        rf = _write(folder, records)
        key = base + 5  # the first image of identity 1: 2^24 + 1 past it
        data = bytearray((folder / "train.rec").read_bytes())
        data[rf.offsets[key]] ^= 0xFF
        (folder / "train.rec").write_bytes(bytes(data))
        if base < FLOAT32_EXACT - 4:
            layout = image_layout(RecordFile(folder / "train.rec"))
            assert layout.labels.tolist() == [i for i, n in enumerate(sizes) for _ in range(n)]
            continue
        with pytest.raises(RecordError, match=rf"key {key} at offset {rf.offsets[key]}: bad magic"):
            image_layout(RecordFile(folder / "train.rec"))


@pytest.mark.slow
def test_training_on_the_packed_folder_gives_the_folders_stage1_weights(
    tmp_path, packed, monkeypatch
):
    # and data.decode=device (the JPEG bytes cross to the device, decoded there in one
    # batched call; on the CPU by libjpeg-turbo, as the loaders decode) changes nothing,
    # nor does data.num_workers (the mirrors were drawn by whichever process collated a
    # batch: each worker count trained other weights, a review)
    extra = ("method=single", "logger=none", "eval.after_training=false")
    shipped = []

    def spy(batch, size, device):
        shipped.extend(isinstance(item, bytes) for item in batch.items)
        return decode_on_device(batch, size, device)

    monkeypatch.setattr(datamodule, "decode_on_device", spy)
    runs = []
    rec = packed / "rec" / "train.rec"
    for name, root, decode, workers in (
        ("folder", DEMO, "cpu", 1),
        ("rec", rec, "cpu", 0),
        ("rec-device", rec, "device", 2),
        ("folder-device", DEMO, "device", 1),
    ):
        given = (f"data.root={root}", f"data.decode={decode}", f"data.num_workers={workers}")
        overrides = (*given, *extra)
        runs.append(train(load_config(SMOKE, smoke_overrides(tmp_path / name, *overrides))))
    assert shipped and all(shipped)  # every training image went to the device as bytes
    weights = [r.backbone.state_dict() for r in runs]
    for other in weights[1:]:
        assert other.keys() == weights[0].keys()
        for key in weights[0]:
            assert torch.equal(other[key], weights[0][key]), key


# ------------------------------------------------------------------ verification pairs


def test_verification_bin_round_trip_numpy_images_and_refused_code(tmp_path):
    import os
    import pickle

    from facecluster.data.verification import read_bin, write_bin

    pairs = tmp_path / "pairs.txt"
    names = sorted(p.name for p in DEMO.iterdir())[:2]
    a, b = (sorted((DEMO / n).iterdir()) for n in names)
    index = [int(p.stem.rsplit("_", 1)[1]) for p in (a[0], a[1], b[0])]
    pairs.write_text(
        f"1\t2\n{names[0]}\t{index[0]}\t{index[1]}\n{names[0]}\t{index[0]}\t{names[1]}\t{index[2]}\n"
    )
    pairs_bin = read_bin(write_bin(DEMO, pairs, tmp_path / "demo.bin"))
    assert pairs_bin.issame == [True, False] and len(pairs_bin.images) == 4
    assert pairs_bin.images[0] == a[0].read_bytes()
    assert pairs_bin.pair(1)[1].size == Image.open(b[0]).size

    # Files made by other tools hold numpy uint8 arrays of the encoded bytes.
    arrays = [np.frombuffer(x, dtype=np.uint8) for x in pairs_bin.images]
    with open(tmp_path / "np.bin", "wb") as f:
        pickle.dump((arrays, pairs_bin.issame), f)
    assert read_bin(tmp_path / "np.bin").images == pairs_bin.images

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump(([Payload()], []), f)
    with pytest.raises(ValueError, match="system is not allowed"):
        read_bin(tmp_path / "evil.bin")
    (tmp_path / "int.bin").write_bytes(pickle.dumps(7))
    with pytest.raises(ValueError, match="int.bin is not a verification .bin file"):
        read_bin(tmp_path / "int.bin")


def test_verification_bin_refuses_forged_numpy_state_before_numpy_sees_it(tmp_path):
    # numpy's dtype.__setstate__ accepts a field of Python objects from the file: an
    # array of forged object pointers, read (and crashed on: a segfault) inside load()
    # by a bool() in the pickle, or later by the reader. bytes(n) asked for n bytes.
    import pickle

    from facecluster.data.verification import read_bin

    class ForgedDtype:
        def __reduce__(self):
            fields = {"a": (np.dtype("O"), 0)}
            return (np.dtype, ("V8", False, True), (3, "|", None, ("a",), fields, 8, 1, 0))

    class ObjectArray:
        def __reduce__(self):
            return (np.frombuffer, (b"\x41" * 8, ForgedDtype()))

    class PlainDtypeWithFields:  # a u1 given fields by its state
        def __reduce__(self):
            fields = {"a": (np.dtype("O"), 0)}
            return (np.dtype, ("u1", False, True), (3, "|", None, ("a",), fields, 8, 1, 0))

    class Frombuffer:
        def __init__(self, dtype):
            self.dtype = dtype

        def __reduce__(self):
            try:
                from numpy._core.numeric import _frombuffer
            except ImportError:  # numpy 1.x
                from numpy.core.numeric import _frombuffer

            return (_frombuffer, (b"\x41" * 8, self.dtype, (1,), "C"))

    class Truth:
        def __reduce__(self):
            return (bool, (Frombuffer(ForgedDtype()),))

    class Codec:  # pickles of bytes use latin-1; another codec has no business here
        def __reduce__(self):
            import codecs

            return (codecs.encode, ("abc", "rot13"))

    cases = {
        "codec.bin": ([Codec(), b"x"], [True]),
        "forged.bin": ([Frombuffer(ForgedDtype()), b"x"], [True]),
        "truth.bin": ([b"x", b"y"], [Truth()]),
        "fields.bin": ([Frombuffer(PlainDtypeWithFields()), b"x"], [True]),
        "frombuffer.bin": ([ObjectArray(), b"x"], [True]),
    }
    for name, obj in cases.items():
        (tmp_path / name).write_bytes(pickle.dumps(obj, protocol=4))
        with pytest.raises(ValueError, match=f"{name} is not a verification .bin file"):
            read_bin(tmp_path / name)
    bomb = b"\x80\x04\x8c\x08builtins\x8c\x05bytes\x93J\x00\x00\x00\x40\x85R]\x86."
    (tmp_path / "bomb.bin").write_bytes(bomb)
    with pytest.raises(ValueError, match=r"bytes\(1073741824\) is not allowed"):
        read_bin(tmp_path / "bomb.bin")
    # what files made by other tools hold still reads: arrays of every protocol, numpy
    # booleans and integer flag arrays, either byte order
    images = [b"\xff\xd8ab", b"\xff\xd8cde"]
    for protocol in (0, 2, 5):
        for flags in ([True], [np.bool_(True)], np.array([True]), np.array([1], dtype=">i4")):
            arrays = [np.frombuffer(x, np.uint8) for x in images]
            (tmp_path / "ok.bin").write_bytes(pickle.dumps((arrays, flags), protocol=protocol))
            pairs = read_bin(tmp_path / "ok.bin")
            assert (pairs.images, pairs.issame) == (images, [True]), (protocol, flags)
        # the images as one numpy byte-string array (np.array of the list)
        (tmp_path / "ok.bin").write_bytes(pickle.dumps((np.array(images), [True]), protocol))
        assert read_bin(tmp_path / "ok.bin").images == images


PACK = "facecluster pack ../shared/datasets/lfw-112/images"
TRAIN_ON_REC = "python train.py -c configs/smoke.yaml data.root="


@pytest.mark.slow
def test_pack_refuses_an_out_it_cannot_use_before_the_scan(tmp_path, capsys):
    # OUT an existing file: a traceback before; OUT the image folder itself: train.rec
    # and the rest were written among the identities (or in a folder of SRC, which every
    # scan of SRC then warned of). All refused before any scan.
    (tmp_path / "afile").write_text("mine")
    assert pack_main([str(DEMO), str(tmp_path / "afile")]) == 2
    assert "afile is a file" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "mine"
    src = tmp_path / "faces"
    shutil.copytree(DEMO / "Abdullah_Gul", src / "Abdullah_Gul")
    assert pack_main([str(src), str(src / ".." / "faces")]) == 2
    assert "is SRC" in capsys.readouterr().err and not (src / "train.rec").exists()
    # OUT inside SRC: the packed files became an identity folder of SRC
    assert pack_main([str(src), str(src / "packed")]) == 2
    assert "is inside SRC" in capsys.readouterr().err and not (src / "packed").exists()
    assert pack_main([str(src), str(src / ".rec")]) == 0  # hidden: no scan sees it
    assert scan(str(src)).class_names == ["Abdullah_Gul"]
    # a SRC that is no image folder is named as SRC, not as training's data.root
    assert pack_main([str(tmp_path / "afile"), str(tmp_path / "out")]) == 2
    assert "SRC=" in (err := capsys.readouterr().err) and "is a file, not a folder" in err
    assert pack_main([str(src / "Abdullah_Gul"), str(tmp_path / "out")]) == 2
    assert "found in SRC=" in capsys.readouterr().err
    # a packed data set as SRC said only "No identity sub-folders ... found"
    for packed in (src / ".rec", src / ".rec" / "train.rec"):
        assert pack_main([str(packed), str(tmp_path / "out")]) == 2
        assert (
            f"SRC {packed} is a RecordIO data set already ({src / '.rec' / 'train.rec'}): "
            "train on it as it is"
        ) in capsys.readouterr().err


def test_pack_refuses_a_src_holding_a_rec_and_an_out_holding_a_folder_of_its_names(
    tmp_path, capsys
):
    # a property test: SRC with a train.rec beside its identity folders was packed from
    # the folders (a "non-image file" warning), where training on SRC reads the .rec;
    # an OUT whose train.rec is a folder took --overwrite's other files, then failed
    src = tmp_path / "faces"
    shutil.copytree(DEMO / "Abdullah_Gul", src / "Abdullah_Gul")
    assert pack_main([str(src), str(tmp_path / "one")]) == 0
    for name in ("train.rec", "train.idx"):
        shutil.copy(tmp_path / "one" / name, src / name)
    assert pack_main([str(src), str(tmp_path / "two")]) == 2
    said = f"SRC {src} holds a RecordIO data set ({src / 'train.rec'}) beside its identity"
    assert said in capsys.readouterr().err and not (tmp_path / "two").exists()
    out = tmp_path / "three"
    (out / "train.rec").mkdir(parents=True)
    for args in ([], ["--overwrite"]):
        assert pack_main([str(DEMO), str(out), *args]) == 2
        assert f"OUT {out} holds a folder named train.rec" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == ["train.rec"]
    # the selection values a folder's scan refuses, a .rec's too (max_classes=-1 was
    # every identity but the last)
    for kwargs in ({"max_classes": -1}, {"max_classes": 0}, {"min_images_per_class": 0}):
        with pytest.raises(ValueError, match="must be >= 1"):
            scan_record_file(tmp_path / "one" / "train.rec", **kwargs)


def test_a_folder_of_zero_byte_images_only_is_said_to_look_incomplete(tmp_path):
    # an interrupted copy: "No identity sub-folders containing images ... expected
    # root/<identity>/<image> layout", where the layout is right and the files empty
    for name in ("Ann", "Bob"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "1.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="images that are not empty.*looks incomplete"):
        scan(str(tmp_path))


def test_a_broken_first_image_is_packed_as_any_other(tmp_path):
    # its size was read for `property`: a broken first file refused the whole folder,
    # where a broken file anywhere else is packed and training skips it
    src = tmp_path / "faces"
    shutil.copytree(DEMO / "Abdullah_Gul", src / "Abdullah_Gul")
    (src / "Abdullah_Gul" / "000.jpg").write_text("<html>not a face</html>")
    before = signal.getsignal(signal.SIGTERM)
    assert pack_main([str(src), str(tmp_path / "out")]) == 0
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back
    with Image.open(next((DEMO / "Abdullah_Gul").glob("*.jpg"))) as image:
        width, height = image.size
    assert (tmp_path / "out" / "property").read_text() == f"1,{height},{width}\n"


def test_documented_pack_then_train_commands(tmp_path):
    # docs/DATA.md's two commands as written (the output folder is this test's).
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = DEMO.parents[2]
    if not (root / ".." / "shared" / "datasets" / "lfw-112" / "images").is_dir():
        pytest.skip("the shared LFW copy is not beside this checkout")
    docs = (root / "docs" / "DATA.md").read_text()
    assert f"{PACK} /data/lfw-rec" in docs and f"{TRAIN_ON_REC}/data/lfw-rec/train.rec" in docs
    env = {k: v for k, v in os.environ.items() if k != "FACECLUSTER_RUN_DIR"}
    script = Path(sys.executable).parent / "facecluster"
    out = tmp_path / "lfw-rec"
    pack = [str(script), *PACK.split()[1:], str(out)]
    subprocess.run(pack, cwd=root, env=env, check=True, capture_output=True, timeout=300)
    assert (out / "property").read_text().startswith("5749,112,112")
    # `python -m facecluster.data.pack SRC OUT` (DATA.md) is the same command
    small, again = tmp_path / "small", tmp_path / "again"
    for name in sorted(p.name for p in DEMO.iterdir())[:2]:
        shutil.copytree(DEMO / name, small / name)
    module = [sys.executable, "-m", "facecluster.data.pack", str(small), str(again)]
    subprocess.run(module, cwd=root, env=env, check=True, capture_output=True, timeout=120)
    assert (again / "property").read_text().startswith("2,")
    command = [sys.executable, *TRAIN_ON_REC.split()[1:]]
    command[-1] += str(out / "train.rec")
    command += [f"output_dir={tmp_path / 'runs'}", "logger=csv"]
    proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Evaluation on the held-out test split" in proc.stdout
    assert "clustered, all sub-nets (ISM)" in proc.stdout


# a damaged cache's file handle is closed (np.load left it open on a file that is not
# a zip: a ResourceWarning at its collection; a review)
@pytest.mark.filterwarnings("error::ResourceWarning")
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_the_label_pass_over_a_file_without_identity_records_is_kept(tmp_path, monkeypatch, caplog):
    # an im2rec-style file (no header record): the first scan reads every record's
    # label and keeps the result in the cache folder; the next scan of the unchanged
    # file reads one record (is key 0 a header?), not all; a rewritten file is read again
    records = {k: pack(float(k % 3), _jpeg(k)) for k in range(12)}
    _write(tmp_path, records, order=sorted(records, reverse=True))
    cache = tmp_path / "runs" / ".cache"
    first = scan(tmp_path / "train.rec", cache=cache)
    (kept,) = cache.iterdir()  # the kept labels alone, no temporary file beside
    assert kept.name.startswith("train-") and kept.name.endswith(".labels.npz")

    reads, head, scanned = [], RecordFile.head, recordio._scan_all

    def counted(self, key):
        reads.append(key)
        return head(self, key)

    with monkeypatch.context() as m:
        m.setattr(RecordFile, "head", counted)
        again = scan(tmp_path / "train.rec", cache=cache)
    assert reads == [0]
    assert again.class_names == first.class_names and again.samples == first.samples
    # a changed file (another size and time): its own labels, not the kept ones, which
    # it replaces (one kept file per .rec)
    records[12] = pack(5.0, _jpeg(12))
    _write(tmp_path, records)
    changed = scan(tmp_path / "train.rec", cache=cache)
    assert len(changed.class_names) == 4 and len(changed.samples) == 13
    assert list(cache.iterdir()) == [kept]  # replaced, under the same name
    # a kept file that cannot be read (not a zip, cut short, empty) is made again
    whole = kept.read_bytes()
    for damaged in (b"not a numpy file", whole[: len(whole) // 2], b""):
        kept.write_bytes(damaged)
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert scan(tmp_path / "train.rec", cache=cache).samples == changed.samples
        assert "unreadable" in caplog.text and str(kept) in caplog.text
        with np.load(kept) as made_again:
            assert len(made_again["keys"]) == 13
    assert [p.name for p in cache.iterdir()] == [kept.name]  # no temporary file left
    # a pass kept by another version of it (one that found no unlisted records) is
    # made again, not trusted
    with monkeypatch.context() as m:
        m.setattr(recordio, "LABEL_PASS_VERSION", recordio.LABEL_PASS_VERSION - 1)
        scan(tmp_path / "train.rec", cache=cache)
    reads.clear()
    with monkeypatch.context() as m:
        m.setattr(RecordFile, "head", counted)
        m.setattr(recordio, "_scan_all", lambda records: reads.append("pass") or scanned(records))
        scan(tmp_path / "train.rec", cache=cache)
    assert reads.count("pass") == 1


def test_an_identities_txt_that_does_not_fit_the_labels_is_named(packed, tmp_path):
    # it raised a bare IndexError (too few names) or merged identities (a name twice)
    rec = shutil.copytree(packed / "rec", tmp_path / "rec")
    names = (rec / "identities.txt").read_text().splitlines()
    (rec / "identities.txt").write_text("\n".join(names[:-1]) + "\n")
    short = rf"identities.txt: {len(names) - 1} names for identity labels up to {len(names) - 1}"
    with pytest.raises(ValueError, match=short):
        scan(str(rec / "train.rec"))
    (rec / "identities.txt").write_text("\n".join([names[1], *names[1:]]) + "\n")
    with pytest.raises(ValueError, match=rf"names listed twice: {names[1]}"):
        scan(str(rec / "train.rec"))


def test_a_pack_cut_short_leaves_no_data_set_and_keeps_the_last_one(packed, tmp_path, monkeypatch):
    # Ctrl-C or a time limit part-way: what was written must not read as a smaller data
    # set (a .rec without its header reads as plain im2rec, names "00", "01", ...);
    # a complete pack already in OUT stays as it was.
    out = shutil.copytree(packed / "rec", tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 100:
            raise KeyboardInterrupt
        return recordio.pack(*args, **kwargs)

    monkeypatch.setattr(pack_module, "pack", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pack_module.pack_folder(DEMO, out, overwrite=True)  # OUT holds a data set
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "nothing replaced or left"
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        calls.clear()
        pack_module.pack_folder(DEMO, fresh)
    assert [p.name for p in fresh.iterdir()] == [facecluster_io.LOCK]  # no data set, the lock
    # a full disk that only train.rec's fsync reports (delayed allocation, NFS, quotas):
    # the index, names and property were already renamed in, beside the old train.rec
    monkeypatch.setattr(pack_module, "pack", recordio.pack)
    real_fsync = os.fsync

    def disk_full_at_the_rec(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".rec"):
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full_at_the_rec)
    with pytest.raises(OSError, match="No space left"):
        pack_module.pack_folder(DEMO, out, shuffle=True, overwrite=True)  # another train.idx
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "nothing replaced or left"


def test_a_pack_stopped_by_sigterm_leaves_out_as_it_was(packed, tmp_path):
    # a time limit's SIGTERM (timeout, SLURM) skipped the clean-up that Ctrl-C gets: the
    # partial train.rec stayed in OUT as a hidden file, one more at every attempt
    out = shutil.copytree(packed / "rec", tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    slow = (
        "import sys, time\n"
        "from facecluster.data import pack\n"
        "real = pack.pack\n"
        "pack.pack = lambda *a, **k: time.sleep(0.01) or real(*a, **k)\n"
        "sys.exit(pack.main(sys.argv[1:]))\n"
    )
    argv = [str(DEMO), str(out), "--overwrite"]  # OUT holds a data set
    process = subprocess.Popen([sys.executable, "-c", slow, *argv], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".train.rec") for p in out.iterdir()):
        assert process.poll() is None and time.monotonic() < deadline, "the pack never started"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 128 + signal.SIGTERM
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "nothing replaced or left"


def test_a_signal_between_the_final_renames_waits_until_out_is_whole(packed, tmp_path):
    # Ctrl-C or a time limit's SIGTERM between two of the renames that put the new files
    # in place left the new property and identities.txt beside the old train.idx and
    # train.rec (or a new index beside the old .rec, whose offsets run past its end).
    # The signal waits now until all four are in place, with another thread about (which
    # the kernel hands a process's signal to when the main thread blocks it).
    expected = {p.name: p.read_bytes() for p in (packed / "shuffled").iterdir()}
    real = os.replace
    for signum, raised in ((signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, SystemExit)):
        out = shutil.copytree(packed / "rec", tmp_path / f"out-{signum}")  # OUT holds a set
        renamed = []

        def signalled(src, dst, *args, signum=signum, renamed=renamed, **kwargs):
            real(src, dst, *args, **kwargs)
            renamed.append(Path(dst).name)
            if len(renamed) == 2:
                os.kill(os.getpid(), signum)
                time.sleep(0.05)  # long enough for the handler to run, were it not held

        waiting = threading.Event()
        beside = threading.Thread(target=waiting.wait)
        beside.start()
        os.replace = signalled
        try:
            with pytest.raises(raised):
                pack_main([str(DEMO), str(out), "--shuffle", "--overwrite"])
        finally:
            os.replace = real
            waiting.set()
            beside.join()
        assert renamed == ["property", "identities.txt", "train.idx", "train.rec"]
        assert {p.name: p.read_bytes() for p in out.iterdir()} == expected, "the whole new set"


def test_a_ctrl_c_while_the_held_signals_are_restored_loses_no_sigterm(monkeypatch):
    # the restore put SIGINT's handler back first: a Ctrl-C right then raised out of it
    # and left SIGTERM to the block's noting handler, for good (a later SIGTERM, a time
    # limit's, did nothing), and the SIGTERM noted in the block was never delivered
    real = signal.signal
    came = []
    before = real(signal.SIGTERM, lambda number, frame: came.append(number))

    def ctrl_c_once_sigint_is_back(number, handler):
        previous = real(number, handler)
        if number == signal.SIGINT and handler is signal.default_int_handler:
            monkeypatch.setattr(facecluster_io.signal, "signal", real)
            signal.raise_signal(signal.SIGINT)
        return previous

    try:
        with pytest.raises(KeyboardInterrupt):
            with facecluster_io.signals_held():
                os.kill(os.getpid(), signal.SIGTERM)
                monkeypatch.setattr(facecluster_io.signal, "signal", ctrl_c_once_sigint_is_back)
        assert came == [signal.SIGTERM]  # delivered after all
        os.kill(os.getpid(), signal.SIGTERM)  # and the handler is the caller's again
        time.sleep(0.05)
        assert came == [signal.SIGTERM, signal.SIGTERM]
    finally:
        real(signal.SIGTERM, before)


def test_zero_byte_images_are_refused_by_the_pack_unless_skip_empty(tmp_path, capsys, caplog):
    # they were dropped without a word, an identity made only of them with them: the
    # packed .rec then trained under data.on_bad_image=fail, which refuses the folder
    src = _two_identities(tmp_path)
    first, second = sorted(p.name for p in src.iterdir())
    (src / second / "zz_empty.jpg").write_bytes(b"")
    (src / "Zed").mkdir()
    for k in range(7):
        (src / "Zed" / f"{k}.jpg").write_bytes(b"")
    out = tmp_path / "rec"
    assert pack_main([str(src), str(out)]) == 2
    err = capsys.readouterr().err
    named = f"8 zero-byte image file(s): {src / second / 'zz_empty.jpg'}, {src / 'Zed' / '0.jpg'}"
    assert named in err
    assert "(8 in all)" in err and "1 identity made only of them (Zed)" in err
    assert "--skip-empty" in err
    assert not out.exists() or not any(out.iterdir()), "refused before anything is written"
    with pytest.raises(ValueError, match=r"8 zero-byte image file\(s\)"):
        pack_module.pack_folder(src, out)
    with caplog.at_level("WARNING", logger="facecluster.data.pack"):
        assert pack_main([str(src), str(out), "--skip-empty"]) == 0
    warned = [r.getMessage() for r in caplog.records if r.name == "facecluster.data.pack"]
    assert len(warned) == 1 and "left out 8 zero-byte image file(s)" in warned[0]
    assert "1 identity made only of them (Zed)" in warned[0]
    assert scan(str(out / "train.rec")).class_names == [first, second]
    assert len(scan(str(out / "train.rec")).samples) == len(scan(str(src)).samples)


def test_the_pack_names_the_images_that_look_damaged(tmp_path, caplog):
    # they were packed without a word, and training on the pack can name only their
    # records (train.rec#key): the pack names the source files
    src = _two_identities(tmp_path)
    with caplog.at_level("WARNING", logger="facecluster.data.pack"):
        assert pack_main([str(src), str(tmp_path / "clean")]) == 0
    assert not caplog.records, "a whole folder of good faces: no warning"
    first, second = sorted(src.iterdir())
    cut, longer = sorted(first.glob("*.jpg"))[:2]
    longer.write_bytes(longer.read_bytes() + b"\0\0ftypmp42" * 100)  # a motion photo: whole
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    (second / "page.jpg").write_bytes(b"<!DOCTYPE html><p>429 Too Many Requests</p>")
    image = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(image, "PNG")
    (second / "short.png").write_bytes(image.getvalue()[:-20])
    with caplog.at_level("WARNING", logger="facecluster.data.pack"):
        assert pack_main([str(src), str(tmp_path / "rec")]) == 0
    [warned] = [r.getMessage() for r in caplog.records]
    assert warned.startswith(f"{src}: 3 image(s) look damaged, packed as they are")
    for named in (
        f"{cut} (a JPEG cut short: no end-of-image marker)",
        f"{second / 'page.jpg'} (not an image: it starts with b'<!DOCTYP')",
        f"{second / 'short.png'} (a PNG cut short: no IEND chunk)",
    ):
        assert named in warned, named
    assert len(scan(str(tmp_path / "rec" / "train.rec")).samples) == len(scan(str(src)).samples)


def test_identity_names_with_unusual_characters_survive_the_pack(tmp_path):
    # identities.txt is UTF-8 and split on newlines only: a name holding \x1c (written
    # by another tool: pack and a new run refuse it) or an accent keeps its label
    # (str.splitlines split it and shifted every later name)
    root = tmp_path / "faces"
    sources = sorted(p for p in DEMO.iterdir() if p.is_dir())[:3]
    names = ["Ana Maria", "José_Núñez", sources[2].name]
    for name, source in zip(names, sources, strict=True):
        shutil.copytree(source, root / name)
    assert pack_main([str(root), str(tmp_path / "rec")]) == 0
    assert scan(str(tmp_path / "rec" / "train.rec")).class_names == sorted(names)
    listed = tmp_path / "rec" / "identities.txt"
    listed.write_text(listed.read_text(encoding="utf-8").replace(" ", "\x1c"), encoding="utf-8")
    names[0] = "Ana\x1cMaria"
    assert scan(str(tmp_path / "rec" / "train.rec")).class_names == sorted(names)
    # edited on Windows: CRLF (read_text reads)
    listed.write_bytes(listed.read_bytes().replace(b"\n", b"\r\n"))
    assert scan(str(tmp_path / "rec" / "train.rec")).class_names == sorted(names)


def test_a_name_with_a_line_break_is_refused_before_packing_and_other_bytes_kept(tmp_path):
    # identities.txt holds a name a line: "Bob\nSmith" shifted every later identity's
    # name onto the previous one's images; a name that is not UTF-8 failed the pack
    # after every record was written
    sources = sorted(p for p in DEMO.iterdir() if p.is_dir())[:3]
    root = tmp_path / "faces"
    for name, source in zip(["Alice", "Bob\nSmith", "Carol"], sources, strict=True):
        shutil.copytree(source, root / name)
    out = tmp_path / "rec"
    with pytest.raises(
        ValueError,
        match=r"1 identity folder name\(s\) cannot be packed \('Bob\\nSmith' holds a line break",
    ):
        pack_module.pack_folder(root, out)
    # a tab too, which training refuses (a name that only packed would fail at train.py)
    (root / "Bob\nSmith").rename(root / "Bob\tSmith")
    with pytest.raises(ValueError, match=r"\('Bob\\tSmith' holds a line break or another control"):
        pack_module.pack_folder(root, out)
    assert not out.exists() or not any(out.iterdir())
    assert pack_main([str(root), str(out)]) == 2
    # two folders that every table shows as one name (NFC, surrounding spaces)
    (root / "Bob\tSmith").rename(root / "Alice ")
    with pytest.raises(
        ValueError,
        match=r"1 pair\(s\) of identity folders name one person twice "
        r"\('Alice' and 'Alice ': names are one after Unicode normalisation",
    ):
        pack_module.pack_folder(root, out)
    assert not out.exists() or not any(out.iterdir())
    raw = tmp_path / "raw"
    for name, source in zip([b"Jos\xe9", b"Ann", b"Zed"], sources, strict=True):
        shutil.copytree(source, os.fsdecode(bytes(raw) + b"/" + name))
    assert pack_main([str(raw), str(out)]) == 0
    names = scan(str(out / "train.rec")).class_names
    assert names == scan(str(raw)).class_names == ["Ann", os.fsdecode(b"Jos\xe9"), "Zed"]
    # and they split, held out or not, alike in both (Random(str) refused the name)
    splits = [
        split_per_identity(hold_out_identities(scan(root), 0.34, seed=3)[0], 0.2, 0.2, seed=3)
        for root in (str(raw), str(out / "train.rec"))
    ]
    assert all(np.array_equal(splits[0][k], splits[1][k]) for k in splits[0])


def test_labels_that_are_not_identities_are_named_by_key_and_offset(tmp_path):
    # a NaN, negative or fractional label (no identity: the record is left out of the
    # layout, and on_bad_image decides, as for a corrupt record), and a header whose
    # identity range is empty
    for label in (float("nan"), -1.0, 0.5, float("inf"), 1e30):
        folder = tmp_path / str(label)
        folder.mkdir()
        rf = _write(folder, {0: pack(0.0, _jpeg(1)), 1: pack(np.float32(label), _jpeg(2))})
        layout = image_layout(rf)
        assert layout.keys.tolist() == [0] and layout.unreadable.tolist() == [1]
        with pytest.raises(RecordError, match=rf"key 1 at offset {rf.offsets[1]}: label .* is not"):
            rf.head(1)
    rf = _write(tmp_path, {0: pack([1.0, 1.0]), 1: pack(np.int64(0), _jpeg(1))})
    with pytest.raises(RecordError, match=r"key 0 \(the header record\): its identity records"):
        image_layout(rf)
    # a junk end key was allocated for (np.arange over 2^31 keys asked 16 GiB, and a
    # walkthrough's file reached 17.5 GB before a 32 GiB request failed); the .idx's
    # last key bounds it
    records, _ = _insightface(1, [2, 3])
    records[0] = pack([6.0, float(2**31)])
    (tmp_path / "junk").mkdir()
    rf = _write(tmp_path / "junk", records)
    with pytest.raises(
        RecordError,
        match=r"key 0 \(the header record\): its identity records \[6, 2147483648\) run past "
        r"the last key, 7, that \S*train.idx lists: a damaged header, or a truncated .idx",
    ):
        image_layout(rf)
    # an identity record's junk range [1e12, 1e12 + 3) stores one float32 value: it was
    # read as an empty identity, and its images left out with a warning only
    records, _ = _insightface(1, [3, 3])
    records[8] = pack([1e12, 1e12 + 3])
    (tmp_path / "far").mkdir()
    rf = _write(tmp_path / "far", records)
    with pytest.raises(
        RecordError,
        match=rf"key 8 at offset {rf.offsets[8]}: identity 1's image keys \[999999995904, "
        r"999999995904\) lie past the identity records \(keys 7-\); image keys lie in \[1, 7\)",
    ):
        image_layout(rf)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_records_jpeg_header_is_checked_once_a_run(tmp_path, monkeypatch, workers):
    # the in-place decode reads a record's JPEG header the first time only: a record
    # that passed is flagged in the shared tracker (by the workers too) and later epochs
    # decode it straight away, to the same pixels; a CMYK record never passes and keeps
    # Pillow's pixels
    from torch.utils.data import DataLoader

    from facecluster.data import images as images_module
    from facecluster.data.batches import BatchBuffers
    from facecluster.data.datamodule import collated
    from facecluster.data.pack import pack_folder

    person = tmp_path / "faces" / "someone"
    person.mkdir(parents=True)
    jpegs = sorted((DEMO / sorted(p.name for p in DEMO.iterdir())[0]).glob("*.jpg"))
    for k, jpeg in enumerate(jpegs[:6]):
        shutil.copyfile(jpeg, person / f"{k}.jpg")
    Image.open(jpegs[6]).convert("CMYK").save(person / "cmyk.jpg")
    rec = pack_folder(tmp_path / "faces", tmp_path / "rec")
    dm = FaceDataModule(str(rec), val_fraction=0.0, test_fraction=0.0, min_images_per_class=1)
    dataset = dm._dataset("train", dm._split_indices("train"), train=False)
    dataset.buffers = BatchBuffers(3, (4, 112, 112, 3), shared=workers > 0)
    walked = []
    frame = images_module._frame
    monkeypatch.setattr(images_module, "_frame", lambda data: walked.append(1) or frame(data))

    def epoch() -> list:
        loader = DataLoader(dataset, batch_size=4, collate_fn=collated, num_workers=workers)
        return [(images.clone(), labels) for images, labels in loader]

    first, walks = epoch(), len(walked)
    assert walks == (0 if workers else 7)  # every record's header, once (in the workers)
    assert dm._tracker.has_passed(dataset.sample_ids).sum() == 6  # CMYK never passes
    second = epoch()
    assert len(walked) - walks == (0 if workers else 1)  # the CMYK record's only
    for (a, y), (b, z) in zip(first, second, strict=True):
        assert torch.equal(a, b) and torch.equal(y, z)
    cmyk = next(i for i in range(len(dataset)) if frame(dataset._read(i))[3] == 4)
    expected = np.array(Image.open(person / "cmyk.jpg").convert("RGB"))
    assert np.array_equal(torch.cat([a for a, _ in second])[cmyk].numpy(), expected)
    assert dm._tracker.count() == 0 and dm.bad_images() == []


def test_passed_and_broken_flags_are_apart():
    from facecluster.data.images import BadImageTracker

    tracker = BadImageTracker(["a", "b", "c"])
    tracker.mark_passed(np.array([0, 1]))
    tracker.mark(1, OSError("broken since"))
    tracker.mark_passed(np.array([1]))  # (a worker's batch read before the mark)
    assert tracker.bad(np.array([0, 1, 2])).tolist() == [False, True, False]
    assert tracker.has_passed(np.array([0, 1, 2])).tolist() == [True, True, False]
    assert tracker.count() == 1 and tracker.bad_paths() == ["b"] and tracker.is_bad(1)


def _two_identities(tmp_path, names=slice(0, 2)):
    src = tmp_path / f"faces-{names.start}-{names.stop}"
    for source in sorted(p for p in DEMO.iterdir() if p.is_dir())[names]:
        shutil.copytree(source, src / source.name)
    return src


def test_pack_refuses_an_out_holding_a_data_set_unless_overwrite(tmp_path, capsys, monkeypatch):
    # one mistyped OUT replaced a downloaded data set without a word
    out = tmp_path / "ms1mv3"
    assert pack_main([str(_two_identities(tmp_path)), str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = _two_identities(tmp_path, slice(2, 5))
    with monkeypatch.context() as m:  # decided before SRC is read
        m.setattr(pack_module, "scan_image_folder", lambda *a: pytest.fail("SRC was read"))
        assert pack_main([str(other), str(out)]) == 2
        err = capsys.readouterr().err
        assert (
            "--overwrite" in err and f"OUT {out} already holds a data set (identities.txt, " in err
        )
        (out / "train.rec").rename(tmp_path / "kept.rec")  # an index alone is refused too
        with pytest.raises(FileExistsError, match=r"property, train.idx\), .*--overwrite"):
            pack_module.pack_folder(other, out)
        (tmp_path / "kept.rec").rename(out / "train.rec")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "nothing replaced"
    # a data set under another name (ms1m.rec/.idx), or the files beside one, is
    # refused too: pack would replace its property and identities.txt
    for held in (("ms1m.rec", "ms1m.idx"), ("property",)):
        elsewhere = tmp_path / f"held-{len(held)}"
        elsewhere.mkdir()
        for name in held:
            (elsewhere / name).write_bytes(b"kept")
        with pytest.raises(FileExistsError, match=rf"data set \({', '.join(sorted(held))}\)"):
            pack_module.pack_folder(other, elsewhere)
        assert sorted(p.name for p in elsewhere.iterdir()) == sorted(held)
    # another name's pair even with --overwrite (which replaces train.* only)
    with pytest.raises(FileExistsError, match=r"another data set \(ms1m.idx, ms1m.rec\)"):
        pack_module.pack_folder(other, tmp_path / "held-2", overwrite=True)
    # a killed pack's hidden temporary files are no data set
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / ".train.rec.123-abcd.tmp.rec").write_bytes(b"half")
    pack_module.pack_folder(other, killed)
    assert pack_main([str(other), str(out), "--overwrite"]) == 0
    assert (out / "property").read_text().startswith("3,")
    assert len(scan(out).class_names) == 3


def test_an_identities_txt_must_name_exactly_the_identities_of_the_file(packed, tmp_path):
    # a list left from another data set, longer than the labels, named them silently
    for layout, whence in (("rec", "header gives"), ("shuffled", "largest image label")):
        rec = shutil.copytree(packed / layout, tmp_path / layout)
        names = (rec / "identities.txt").read_text().splitlines()
        (rec / "identities.txt").write_text("\n".join([*names, "Zed_Stale"]) + "\n")
        with pytest.raises(ValueError) as error:
            scan(rec)
        message = str(error.value)
        assert f"identities.txt: {len(names) + 1} names for identity labels up to " in message
        assert f"({len(names)} identities in {rec / 'train.rec'}: " in message and whence in message
        assert "remove identities.txt" in message and "pack the folder again" in message
    # InsightFace's layout: the header's identity records count, an empty last one too
    records, _ = _insightface(1, [2, 3, 0])
    _write(tmp_path, records)
    (tmp_path / "identities.txt").write_text("Ann\nBob\nCid\n")
    assert scan(tmp_path).class_names == ["Ann", "Bob"]
    # blank lines at its end (an editor's, CRLF too) name nobody
    (tmp_path / "identities.txt").write_bytes(b"Ann\r\nBob\r\nCid\r\n\r\n\n")
    assert scan(tmp_path).class_names == ["Ann", "Bob"]
    (tmp_path / "identities.txt").write_text("Ann\nBob\n")
    with pytest.raises(ValueError, match=r"2 names for identity labels up to 2 \(3 identities"):
        scan(tmp_path)
    # a blank line among them named an identity ''
    for text in ("Ann\n\nCid\n", "Ann\r\n\r\nCid\r\n"):
        (tmp_path / "identities.txt").write_text(text)
        with pytest.raises(ValueError, match=r"identities.txt: line 2 is blank \(1 such lines\)"):
            scan(tmp_path)
    # without identity records, records whose label cannot be read may hold the
    # largest labels: more names than the labels read are accepted, fewer are not
    folder = tmp_path / "im2rec"
    folder.mkdir()
    rf = _write(folder, {k: pack(float(k % 3), _jpeg(k)) for k in range(12)})
    data = bytearray((folder / "train.rec").read_bytes())
    for key in (2, 5, 8, 11):  # every image of label 2
        data[rf.offsets[key]] ^= 0xFF
    (folder / "train.rec").write_bytes(bytes(data))
    (folder / "identities.txt").write_text("Ann\nBob\nCid\n")
    assert scan(folder).class_names == ["Ann", "Bob"]
    (folder / "identities.txt").write_text("Ann\n")
    with pytest.raises(ValueError, match=r"1 names for identity labels up to 1 \(2 identities"):
        scan(folder)
    # one corrupt label (2e9) in an im2rec file blamed identities.txt alone: the record
    # that holds it is named too
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    labels = [0, 0, 1, 1, 2, 2e9, 2]
    rf = _write(corrupt, {k: pack(label, _jpeg(k)) for k, label in enumerate(labels)})
    (corrupt / "identities.txt").write_text("Ann\nBob\nCid\n")
    with pytest.raises(
        ValueError,
        match=r"3 names for identity labels up to 2000000000 \(2000000001 identities in "
        rf"\S*train.rec: its largest image label \+ 1, key 5's at offset {rf.offsets[5]}; 4 "
        r"labels have images: a corrupt label\?\)",
    ):
        scan(corrupt)


def test_a_property_that_disagrees_with_the_file_is_warned_about(packed, tmp_path, caplog):
    rec = shutil.copytree(packed / "rec", tmp_path / "rec")
    with caplog.at_level("WARNING"):
        scan(rec)  # 158,112,112: agrees
    assert "property" not in caplog.text
    for text, said in (
        ("200,112,112\n", "says 200 identities (num_classes,height,width = 200,112,112), but"),
        ("158\n", "holds '158', not num_classes,height,width"),
    ):
        (rec / "property").write_text(text)
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert len(scan(rec).class_names) == 158  # a warning, not a refusal
        assert f"{rec / 'property'} " in caplog.text and said in caplog.text
        if text.startswith("200"):
            assert f"{rec / 'train.rec'} holds 158 (the identity records" in caplog.text
    # image size: data.image_size may differ (images are resized), not compared
    (rec / "property").write_text("158,64,64\n")
    caplog.clear()
    with caplog.at_level("WARNING"):
        scan(rec)
    assert "property" not in caplog.text


def test_a_root_naming_the_idx_property_or_a_folder_of_one_rec_is_understood(packed, tmp_path):
    # data.root=.../train.idx said "does not exist or is not a directory"; a folder of
    # ms1m.rec + ms1m.idx was read as an image folder ("No identity sub-folders")
    rec = packed / "rec"
    expected = scan(rec / "train.rec")
    assert scan(rec / "train.idx").samples == expected.samples
    for name in ("property", "identities.txt"):
        with pytest.raises(NotADirectoryError) as error:
            scan(rec / name)
        assert f"is a file, not an image folder, a .rec or its .idx; it lies beside {rec}" in str(
            error.value
        )
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(rec / "train.rec", one / "ms1m.rec")
    shutil.copy(rec / "train.idx", one / "ms1m.idx")
    shutil.copy(rec / "identities.txt", one / "identities.txt")
    assert scan(one).samples == scan(one / "ms1m.rec").samples
    assert scan(one).class_names == expected.class_names
    # with its .idx missing, or beside another .rec, the folder is told what to do
    (one / "ms1m.idx").rename(tmp_path / "ms1m.idx")
    with pytest.raises(ValueError, match=r"holds ms1m.rec without ms1m.idx beside it"):
        scan(one)
    (tmp_path / "ms1m.idx").rename(one / "ms1m.idx")
    shutil.copy(rec / "train.rec", one / "glint.rec")
    with pytest.raises(ValueError, match=r"2 RecordIO files and no train.rec \(glint.rec, ms1m"):
        scan(one)
    # identity folders beside one: an image folder, as before
    faces = _two_identities(tmp_path)
    shutil.copy(rec / "train.rec", faces / "x.rec")
    shutil.copy(rec / "train.idx", faces / "x.idx")
    assert scan(faces).records is None and len(scan(faces).class_names) == 2
    # a pack's OUT while it writes: its temporary files, hidden, are not the data set to
    # point data.root at (it was told to train on `.train.rec.<pid>-<hex>.tmp.rec`)
    writing = tmp_path / "writing"
    writing.mkdir()
    shutil.copy(rec / "train.rec", writing / ".train.rec.4242-deadbeef.tmp.rec")
    with pytest.raises(ValueError, match=r"temporary files of a `facecluster pack` \(\.train"):
        scan(writing)


def _header_first(folder, fmt):
    """InsightFace's layout as mxnet writes it: the header first (offset 0), then the
    images, then the identity records."""
    folder.mkdir()
    records, _ = _insightface(1, [3, 4, 5])
    records |= {k: pack(float(k > 3) + float(k > 7), _jpeg(k, fmt)) for k in range(1, 13)}
    return _write(folder, records, order=sorted(records))


def test_a_label_of_signalling_nan_bytes_is_refused_without_a_numpy_warning(tmp_path):
    # bytes that are no label (a foreign .idx points into images) may read as a
    # signalling NaN: widening it warned "invalid value encountered in cast" before
    # the clean error
    import warnings

    payload = bytearray(pack(1.0, _jpeg(1)))
    payload[4:8] = b"\x01\x00\x80\x7f"  # the label: float32 sNaN
    _write(tmp_path, {0: pack(0.0, _jpeg(2)), 1: bytes(payload)})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        layout = image_layout(RecordFile(tmp_path / "train.rec"))
    assert layout.keys.tolist() == [0] and layout.unreadable.tolist() == [1]


def test_an_idx_of_another_rec_is_a_data_error_with_a_hint(tmp_path):
    # its RecordError (an OSError) left the scan: a traceback and exit 1, where every
    # other data error is one line, `error: data: ...`, and exit 2
    _header_first(tmp_path / "jpeg", "JPEG")
    _header_first(tmp_path / "png", "PNG")  # smaller records: other offsets
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(tmp_path / "jpeg" / "train.rec", mixed)
    shutil.copy(tmp_path / "png" / "train.idx", mixed)
    with pytest.raises(ValueError, match=r"bad magic .* is it the .idx of another .rec\?") as e:
        scan(mixed)
    assert isinstance(e.value, RecordError)
    env = {k: v for k, v in os.environ.items() if k != "FACECLUSTER_RUN_DIR"}
    command = [sys.executable, "train.py", "-c", str(SMOKE), f"data.root={mixed}"]
    command += [f"output_dir={tmp_path / 'runs'}", "logger=csv"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith(f"error: data: {mixed / 'train.rec'} key ")
    assert "is it the .idx of another .rec?" in proc.stderr
    # one corrupt record the scan reads: named, with no such hint
    rf = RecordFile(tmp_path / "jpeg" / "train.rec")
    data = bytearray((tmp_path / "jpeg" / "train.rec").read_bytes())
    data[rf.offsets[14]] ^= 0xFF  # identity 1's record
    (tmp_path / "jpeg" / "train.rec").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"key 14 at offset {rf.offsets[14]}: bad magic") as e:
        scan(tmp_path / "jpeg")
    assert "another .rec" not in str(e.value)


def test_too_many_undecodable_records_name_offsets_and_say_to_pack_again(packed, monkeypatch):
    from facecluster.data.images import BadImageError, BadImageTracker

    rec = packed / "rec" / "train.rec"
    offsets = RecordFile(rec).offsets
    tracker = BadImageTracker([f"{rec}#{key}" for key in (3, 4, 5)])
    tracker.mark(1, OSError("broken"))
    with pytest.raises(BadImageError) as error:
        tracker.check(np.arange(3), 0.1, "train split")
    message = str(error.value)
    assert f"(e.g. {rec}#4 (offset {offsets[4]}))" in message
    # the index a dataset has read already gives the offset: the .idx is not read again
    # (WebFace42M's 44.6M lines: seconds and gigabytes, in a worker or on every rank)
    records = RecordFile(rec)
    with monkeypatch.context() as m:
        m.setattr(recordio.RecordFile, "_read_index", lambda self: pytest.fail("read again"))
        with pytest.raises(BadImageError) as again:
            tracker.check(np.arange(3), 0.1, "train split", records)
    assert str(again.value) == message
    assert "pack its images again (facecluster pack SRC OUT --overwrite)" in message
    assert "Repair or remove" not in message
    files = BadImageTracker(["/faces/a/1.jpg", "/faces/a/2.jpg"])  # files: as before
    files.mark(0, OSError("broken"))
    with pytest.raises(BadImageError, match=r"\(e.g. /faces/a/1.jpg\). Repair or remove them"):
        files.check(np.arange(2), 0.1, "train split")


def test_a_negative_shuffle_seed_is_named_and_leaves_no_out(tmp_path, capsys):
    # numpy's "expected non-negative integer" named no option, after OUT was made
    with pytest.raises(SystemExit) as stopped:
        pack_main([str(DEMO), str(tmp_path / "out"), "--shuffle", "--seed", "-5"])
    assert stopped.value.code == 2
    assert "argument --seed: must be >= 0, got -5" in capsys.readouterr().err
    with pytest.raises(ValueError):
        pack_module.pack_folder(DEMO, tmp_path / "api", shuffle=True, seed=-5)
    assert not (tmp_path / "out").exists() and not (tmp_path / "api").exists()


def test_a_rec_replaced_under_a_run_is_named_not_read_as_damaged_records(tmp_path):
    # `facecluster pack --overwrite` into the folder a run trained on: the next epoch's
    # workers opened the new file with the old offsets, every record read as corrupt,
    # and the run stopped on a "damaged" data set (a concurrency review)
    src, out = _two_identities(tmp_path, slice(0, 3)), tmp_path / "packed"
    assert pack_main([str(src), str(out)]) == 0
    dm = FaceDataModule(
        str(out), min_images_per_class=1, batch_size=4, image_size=32, num_workers=1
    )
    loader = dm.train_dataloader()
    assert sum(len(batch[1]) for batch in loader) > 0  # an epoch, its worker forked
    assert pack_main([str(src), str(out), "--overwrite", "--shuffle"]) == 0
    with pytest.raises(BadImageError, match="train.rec was replaced or changed since it was read"):
        next(iter(loader))  # the next epoch's worker


def test_packs_into_one_out_at_once_and_a_killed_packs_files(tmp_path, monkeypatch, caplog):
    # two packs into one OUT both finished, the later replacing the first's data set
    # without --overwrite; a pack killed part-way left its temporary .rec (as large as
    # the data set, hidden) for good (a concurrency review)
    import fcntl

    src, out = _two_identities(tmp_path), tmp_path / "out"
    out.mkdir()
    with open(out / facecluster_io.LOCK, "a") as other:  # another pack is writing OUT
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(FileExistsError, match="being written by another facecluster pack"):
            pack_module.pack_folder(src, out)
    # another pack finished into OUT while this one scanned SRC: refused, its files kept
    scan_src = pack_module.scan_image_folder

    def finished_meanwhile(*args, **kwargs):
        folder = scan_src(*args, **kwargs)
        for name in ("train.rec", "train.idx"):
            (out / name).write_bytes(b"the other pack's")
        return folder

    with monkeypatch.context() as patch:
        patch.setattr(pack_module, "scan_image_folder", finished_meanwhile)
        with pytest.raises(FileExistsError, match="already holds a data set"):
            pack_module.pack_folder(src, out)
    assert (out / "train.rec").read_bytes() == b"the other pack's"
    # a killed pack's temporary files: removed by the next pack into OUT, said; those of
    # a pack still running (a file system without flock: unlocked) are kept
    import subprocess

    ended = subprocess.Popen(["true"])
    ended.wait()
    killed = out / f".train.rec.{ended.pid}-deadbeef.tmp.rec"  # a process that has ended
    killed.write_bytes(b"\0" * 1000)
    reused = out / f".property.{os.getpid()}-0badf00d.tmp"  # its pid is this pack's now
    reused.write_bytes(b"1,2,3\n")
    running = subprocess.Popen(["sleep", "60"])
    try:
        writing = out / f".train.idx.{running.pid}-cafef00d.tmp.idx"
        writing.write_bytes(b"0\t0\n")
        with caplog.at_level(logging.WARNING):
            pack_module.pack_folder(src, out, overwrite=True)
    finally:
        running.kill()
    assert not killed.exists() and not reused.exists()
    assert "a pack stopped before its end left" in caplog.text
    assert writing.exists() and "a process still running here is writing them" in caplog.text
    assert scan(out / "train.rec").class_names == scan(src).class_names  # packed whole
