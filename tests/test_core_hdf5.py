"""EIGER HDF5 series: the real DECTRIS data files decode to neggia's checksums; series written the FileWriter way
from the real thermolysin EIGER2 16M frame (and changed copies of it) give the text of their miniCBF, which is the
real DISTL's; bad series give one clear error per frame."""
from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from numba import njit

from shared_data import PEER_DISTL, REFERENCE, need, peer_missing, real_distl_body, real_files
from spotfinder_core import analyse, nexus, parse_words
from spotfinder_core.image import read_frame
from spotfinder_core.report import format_body

THERMOLYSIN = "eiger2_16m_cbf_dls_thermolysin/dlsnxs2cbf_therm_0001.cbf.gz"
EIGER_9M = "eiger_9m_master/dectris_eiger_master.h5"
ARTIFICIAL = "dectris_h5_testfiles/dataset_artificial_small_001/test_master.h5"
# neggia's Test_EigerData.cpp: the Jenkins lookup3 checksum chained over the decoded frames of each data file
NEGGIA_CHECKSUMS = {
    "datasets_eiger1/eiger1_testmode10_2datafiles_4images_bslz4_data_000001.h5": 3687867133,
    "datasets_eiger1/eiger1_testmode10_2datafiles_4images_bslz4_data_000002.h5": 2342047550,
    "datasets_eiger1/eiger1_testmode10_2datafiles_4images_lz4_data_000001.h5": 3141050780,
    "datasets_eiger1/eiger1_testmode10_2datafiles_4images_lz4_data_000002.h5": 1526186353,
    "datasets_eiger2/eiger2_simread7_2datafiles_4images_lz4_data_000001.h5": 1542871599,
    "datasets_eiger2/eiger2_simread7_2datafiles_4images_lz4_data_000002.h5": 849427427,
    "datasets_eiger2/eiger2_simread7_2datafiles_4images_bslz4_data_000001.h5": 341628856,
    "datasets_eiger2/eiger2_simread7_2datafiles_4images_bslz4_data_000002.h5": 133841592,
    "datasets_eiger2/eiger2_simread7_2datafiles_4images_bslz4_uint8_data_000001.h5": 3448392636,
    "datasets_eiger2/eiger2_simread7_2datafiles_4images_bslz4_uint8_data_000002.h5": 4277511416,
    "datasets_eiger2/eiger2_simread7_2datafiles_4images_bslz4_uint32_data_000001.h5": 2022778456,
    "datasets_eiger2/eiger2_simread7_2datafiles_4images_bslz4_uint32_data_000002.h5": 4211060786,
}
SETS = {"default": [], "res4.9_bins": ["distl.res.outer=4.9", "distl.bins.verbose=True"],
        "bins": ["distl.bins.verbose=True"]}


@njit(cache=True)
def lookup3(key, initval):
    """Bob Jenkins' lookup3 ``hashlittle`` (byte-wise, as HDF5 and neggia use it), our own transcription."""

    def rot(x, k):
        return ((x << k) | (x >> (32 - k))) & 0xFFFFFFFF

    length = key.size
    a = b = c = (0xDEADBEEF + length + initval) & 0xFFFFFFFF
    i = 0
    while length > 12:
        a = (a + (key[i] | (key[i + 1] << 8) | (key[i + 2] << 16) | (key[i + 3] << 24))) & 0xFFFFFFFF
        b = (b + (key[i + 4] | (key[i + 5] << 8) | (key[i + 6] << 16) | (key[i + 7] << 24))) & 0xFFFFFFFF
        c = (c + (key[i + 8] | (key[i + 9] << 8) | (key[i + 10] << 16) | (key[i + 11] << 24))) & 0xFFFFFFFF
        a = (a - c) & 0xFFFFFFFF; a ^= rot(c, 4); c = (c + b) & 0xFFFFFFFF  # noqa: E702
        b = (b - a) & 0xFFFFFFFF; b ^= rot(a, 6); a = (a + c) & 0xFFFFFFFF  # noqa: E702
        c = (c - b) & 0xFFFFFFFF; c ^= rot(b, 8); b = (b + a) & 0xFFFFFFFF  # noqa: E702
        a = (a - c) & 0xFFFFFFFF; a ^= rot(c, 16); c = (c + b) & 0xFFFFFFFF  # noqa: E702
        b = (b - a) & 0xFFFFFFFF; b ^= rot(a, 19); a = (a + c) & 0xFFFFFFFF  # noqa: E702
        c = (c - b) & 0xFFFFFFFF; c ^= rot(b, 4); b = (b + a) & 0xFFFFFFFF  # noqa: E702
        length -= 12
        i += 12
    if length == 0:
        return c
    words = np.zeros(3, np.int64)
    for j in range(length):
        words[j // 4] |= np.int64(key[i + j]) << (8 * (j % 4))
    a, b, c = (a + words[0]) & 0xFFFFFFFF, (b + words[1]) & 0xFFFFFFFF, (c + words[2]) & 0xFFFFFFFF
    c ^= b; c = (c - rot(b, 14)) & 0xFFFFFFFF  # noqa: E702
    a ^= c; a = (a - rot(c, 11)) & 0xFFFFFFFF  # noqa: E702
    b ^= a; b = (b - rot(a, 25)) & 0xFFFFFFFF  # noqa: E702
    c ^= b; c = (c - rot(b, 16)) & 0xFFFFFFFF  # noqa: E702
    a ^= c; a = (a - rot(c, 4)) & 0xFFFFFFFF  # noqa: E702
    b ^= a; b = (b - rot(a, 14)) & 0xFFFFFFFF  # noqa: E702
    c ^= b; c = (c - rot(b, 24)) & 0xFFFFFFFF  # noqa: E702
    return c


@pytest.mark.parametrize("name", sorted(NEGGIA_CHECKSUMS))
def test_real_dectris_data_files_decode_to_neggias_checksums(name):
    (path,) = real_files(("dectris_h5_testfiles/" + name,), "DECTRIS h5-testfiles")
    series = nexus.open_series(path)
    assert (series.layout, series.count, series.master) == ("data", 2, None)
    assert series.image_nr_low == (1 if name.endswith("1.h5") else 3)
    checksum = 0
    for index in range(series.count):
        raw = series.raw_pixels(index)
        checksum = lookup3(np.frombuffer(raw.tobytes(), np.uint8).astype(np.int64), checksum)
    assert checksum == NEGGIA_CHECKSUMS[name]
    # without its master a data file has no geometry: one clear error, and the frame is still named
    result = analyse(path, index=1)
    assert (result.status, result.frame_index) == ("error", 1)
    assert "no geometry" in result.error and "_master.h5 is not beside it" in result.error


def test_the_real_eiger_9m_master_reads_its_geometry_and_names_the_missing_data_file():
    (path,) = real_files((EIGER_9M,), "the EIGER 9M master")
    series = nexus.open_series(path)
    assert (series.layout, series.count, series.name) == ("legacy", 1, "dectris_eiger")
    assert [os.path.basename(d.path) for d in series.data_files] == ["dectris_eiger_data_000001.h5"]
    fields = series.fields
    assert fields["CCD_IMAGE_SATURATION"] == 12440
    assert (fields["X-Binary-Size-Fastest-Dimension"], fields["X-Binary-Size-Second-Dimension"]) == (3110, 3269)
    assert fields["DISTANCE"] == pytest.approx(0.134255) and fields["WAVELENGTH"] == pytest.approx(0.9801122)
    assert (fields["BEAM_FAST_PX"], fields["BEAM_SLOW_PX"]) == pytest.approx((1607.415, 1586.4314))
    result = analyse(path)  # one frame: no index needed
    assert result.status == "error" and result.frame_index is None
    assert result.error == "data file dectris_eiger_data_000001.h5 of frame index 0 is missing"


def test_the_artificial_master_without_geometry_is_one_error_per_frame():
    (path,) = real_files((ARTIFICIAL,), "the artificial DECTRIS master")
    series = nexus.open_series(path)
    assert (series.count, series.data_files[0].count) == (5, 5)
    assert (series.raw_pixels(4) == np.arange(143).reshape(13, 11)).all()
    result = analyse(path, index=4)
    assert result.status == "error" and result.error.startswith("missing master field ")


# --- series written from the real thermolysin EIGER2 16M frame ---------------------------------------------------

def header_contents(cbf_bytes: bytes) -> str:
    match = re.search(rb"_array_data\.header_contents\s*;\s*\n(.*?)\n;", cbf_bytes, re.S)
    return match.group(1).decode("latin-1")


def write_cbf_like(source: bytes, pixels: np.ndarray, path) -> str:
    """``pixels`` as a miniCBF with the header of ``source`` (the dlsnxs2cbf frame)."""
    from fabio.cbfimage import CbfImage

    header = {"_array_data.header_convention": "PILATUS_1.2", "_array_data.header_contents": header_contents(source)}
    CbfImage(data=pixels.astype(np.int32), header=header).write(str(path))
    return str(path)


def transforms(pixels: np.ndarray) -> list[np.ndarray]:
    """The frame, and copies whose counts differ while the detector's gaps and masked pixels stay: scaled,
    turned by 180 degrees, rolled with a few unflagged hot pixels (stored as the fill value, read as -2)."""
    valid = pixels >= 0
    turned = np.where(valid, np.maximum(pixels[::-1, ::-1], 0), pixels)
    rolled = np.where(valid, np.maximum(np.roll(pixels, (37, -101), axis=(0, 1)), 0), pixels)
    hot = np.flatnonzero(valid)[::3_000_000][:6]
    rolled.flat[hot] = -2
    return [pixels, np.where(valid, pixels * 3, pixels), turned, rolled]


@pytest.fixture(scope="module")
def thermolysin(tmp_path_factory):
    """The frame, its transforms as miniCBFs (thermolysin_000N.cbf), and HDF5 series of them in three layouts."""
    (source,) = real_files((THERMOLYSIN,), "the EIGER2 16M thermolysin frame")
    out = tmp_path_factory.mktemp("thermolysin")
    raw = gzip.decompress(open(source, "rb").read())
    frames = transforms(read_frame(source).pixels)
    cbfs = [write_cbf_like(raw, frame, out / ("thermolysin_%04d.cbf" % (k + 1))) for k, frame in enumerate(frames)]
    geometry = nexus.cbf_geometry(source)
    masters = {"legacy": nexus.write_series(str(out), "legacy", frames, layout="legacy", nimages_per_file=2,
                                            geometry=geometry),
               "nxmx": nexus.write_series(str(out), "nxmx", frames[:2], layout="nxmx", nimages_per_file=1,
                                          geometry=geometry, nr_type=np.int32),
               "vds": nexus.write_series(str(out), "vds", frames[2:], layout="vds", nimages_per_file=1,
                                         geometry=geometry, image_nr_low=3)}
    return {"source": source, "frames": frames, "cbfs": cbfs, "masters": masters, "dir": out}


CASES = [("legacy", 0, 0), ("legacy", 1, 1), ("legacy", 2, 2), ("legacy", 3, 3), ("nxmx", 0, 0), ("nxmx", 1, 1),
         ("vds", 0, 2), ("vds", 1, 3)]


@pytest.mark.parametrize("layout,index,frame", CASES)
def test_an_hdf5_frame_gives_the_text_of_its_cbf(thermolysin, layout, index, frame):
    master, cbf = thermolysin["masters"][layout], thermolysin["cbfs"][frame]
    series = nexus.open_series(master)
    assert series.layout == layout
    read = series.read(index)
    assert (read.pixels == thermolysin["frames"][frame]).all()
    assert read.geometry == read_frame(cbf).geometry
    params = parse_words(["distl.bins.verbose=True"])
    ours = analyse(master, params, index=index)
    theirs = analyse(cbf, params)
    assert (ours.status, ours.frame_index, ours.image_number, ours.file) == (
        "ok", index, series.image_nr_low + index, os.path.basename(master))
    # the same name shown, the same text: the frame's pixels and geometry are its CBF's to the last bit
    shown = analyse(master, params, shown_as=cbf, index=index)
    assert format_body(shown) == format_body(theirs)
    fields = {k: v for k, v in ours.as_dict().items() if k not in ("file", "image_number", "frame_index", "proc_ms")}
    assert fields == {k: v for k, v in theirs.as_dict().items() if k in fields}


@pytest.mark.parametrize("set_name", sorted(SETS))
def test_the_first_frame_gives_the_real_distls_text(thermolysin, set_name):
    """The reference is DISTL's own text on the dlsnxs2cbf frame (its folder written as <DIR>)."""
    need(REFERENCE / ("dlsnxs2cbf_therm_0001.cbf.%s.txt" % set_name), what="DISTL's thermolysin references")
    expected = (REFERENCE / ("dlsnxs2cbf_therm_0001.cbf.%s.txt" % set_name)).read_text()
    shown = str(thermolysin["dir"] / "dlsnxs2cbf_therm_0001.cbf")
    result = analyse(thermolysin["masters"]["legacy"], parse_words(SETS[set_name]), shown_as=shown, index=0)
    assert format_body(result).replace(str(thermolysin["dir"]) + "/", "<DIR>/") == expected


@pytest.mark.parametrize("index", [1, 2, 3])
def test_a_changed_frame_gives_the_real_distls_text_on_its_cbf(thermolysin, index):
    """Each changed copy (scaled, turned, rolled with hot pixels), run through the real DISTL as a CBF: the HDF5
    frame's text is DISTL's."""
    cbf = thermolysin["cbfs"][index]
    expected = real_distl_body(cbf, "distl.bins.verbose=True")
    result = analyse(thermolysin["masters"]["legacy"], parse_words(["distl.bins.verbose=True"]), shown_as=cbf,
                     index=index)
    assert format_body(result) == expected


# --- pixel rules, dtypes, layouts ---------------------------------------------------------------------------------

GEOMETRY = {"pixel_size": 75e-6, "distance": 0.2, "wavelength": 1.0, "beam_x": 520.5, "beam_y": 260.25,
            "count_cutoff": 30000}


def small_frames(count: int, seed: int = 3) -> list[np.ndarray]:
    """EIGER2 500K-sized frames (512 x 1028) of noise, a gap column and a dead pixel, in CBF convention."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        frame = rng.poisson(4.0, size=(512, 1028)).astype(np.int32)
        frame[:, 513] = -1
        frame[100, 200] = -2
        frames.append(frame)
    return frames


@pytest.mark.parametrize("dtype,compression,nr_type", [(np.uint8, "bslz4", np.uint64), (np.uint16, "lz4", np.int32),
                                                      (np.uint32, "bslz4", np.int32), (np.uint16, "none", np.uint64)])
def test_pixel_rules_for_each_dtype_and_compression(tmp_path, dtype, compression, nr_type):
    frames = small_frames(3)
    frames[1][5, 6] = 10**6  # beyond the type: stored as the fill value, read as -2
    frames[2][7, 8] = -2  # flagged in this frame only: the fill value, not the mask, marks it
    master = nexus.write_series(str(tmp_path), "s", frames, layout="nxmx", nimages_per_file=2, geometry=GEOMETRY,
                                dtype=dtype, compression=compression, nr_type=nr_type, image_nr_low=11)
    series = nexus.open_series(master)
    assert (series.count, series.image_nr_low, [d.count for d in series.data_files]) == (3, 11, [2, 1])
    for index, frame in enumerate(frames):
        expected = np.where(frame >= np.iinfo(dtype).max, -2, frame)
        got = series.read(index)
        assert (got.pixels == expected).all() and got.pixels.dtype == np.int32
        assert (got.index, got.image_number) == (index, 11 + index)
    assert series.read(0).geometry.saturation == 30000 and series.read(0).geometry.vendortype == "Eiger2-500K"


def test_mask_bits_and_the_fill_value(tmp_path):
    """Bit 0 of the pixel mask is a gap (-1) whatever the pixel holds; any other bit, or the fill value, is -2."""
    frame = np.full((512, 1028), 5, dtype=np.int32)
    mask = np.zeros(frame.shape, dtype=np.uint32)
    mask[0, 0], mask[0, 1], mask[0, 2], mask[0, 3] = 1, 2, 16, 1 | 8
    stored = frame.astype(np.uint16)
    stored[0, 3] = stored[0, 4] = 65535
    master = nexus.write_series(str(tmp_path), "m", [stored], layout="legacy", geometry=GEOMETRY, pixel_mask=mask)
    pixels = nexus.read_frame(master).pixels
    assert pixels[0, :6].tolist() == [-1, -2, -2, -1, -2, 5]


def test_a_data_file_beside_its_master_reads_its_own_frames(tmp_path):
    frames = small_frames(5)
    nexus.write_series(str(tmp_path), "d", frames, layout="legacy", nimages_per_file=2, geometry=GEOMETRY)
    second = nexus.open_series(str(tmp_path / "d_data_000002.h5"))
    assert (second.layout, second.count, second.image_nr_low, second.master) == (
        "data", 2, 3, str(tmp_path / "d_master.h5"))
    assert (second.read(1).pixels == frames[3]).all()
    assert nexus.complete_frames(str(tmp_path / "d_data_000003.h5")) == 1


def test_frame_index_rules(tmp_path, simulated):
    frames = small_frames(3)
    master = nexus.write_series(str(tmp_path), "i", frames, layout="legacy", geometry=GEOMETRY)
    result = analyse(master)
    assert result.status == "error" and "an HDF5 file of 3 frames needs a frame index" in result.error
    result = analyse(master, index=3)
    assert result.error == "frame index 3 is out of range: i_master.h5 holds frames 0 to 2"
    assert result.frame_index == 3
    result = analyse(str(simulated["paths"]["blank"]), index=0)
    assert result.status == "error" and "a CBF holds one frame" in result.error
    assert analyse(master, index=2).as_dict()["frame_index"] == 2


# --- bad input: one clear error per frame --------------------------------------------------------------------------

@pytest.fixture
def series_dir(tmp_path):
    nexus.write_series(str(tmp_path), "b", small_frames(4), layout="legacy", nimages_per_file=2, geometry=GEOMETRY)
    return tmp_path


def error_of(path, index=None) -> str:
    result = analyse(str(path), index=index)
    assert result.status == "error" and "\n" not in result.error
    return result.error


def test_truncated_and_corrupt_files(series_dir):
    data = series_dir / "b_data_000001.h5"
    blob = data.read_bytes()
    data.write_bytes(blob[: len(blob) // 2])
    assert error_of(series_dir / "b_master.h5", 0).startswith("cannot read b_data_000001.h5: ")
    assert analyse(str(series_dir / "b_master.h5"), index=2).status == "ok"  # the other data file is fine
    master = series_dir / "b_master.h5"
    master.write_bytes(master.read_bytes()[:3000])
    assert error_of(master, 0).startswith("cannot read HDF5: ")
    junk = series_dir / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    assert error_of(junk, 0) == "not an HDF5 file (no HDF5 signature)"


def test_a_corrupt_chunk(series_dir):
    """A chunk whose header or block sizes are wrong.  (bitshuffle-LZ4 has no checksum: garbage inside an LZ4
    stream that still decodes to the right size cannot be told from pixels, by us or by HDF5's filter.)"""
    path = series_dir / "b_data_000002.h5"
    with h5py.File(path, "r") as h5:
        first = h5["/entry/data/data"].id.get_chunk_info_by_coord((0, 0, 0)).byte_offset
        second = h5["/entry/data/data"].id.get_chunk_info_by_coord((1, 0, 0)).byte_offset
    blob = bytearray(path.read_bytes())
    blob[first:first + 8] = (12345).to_bytes(8, "big")
    blob[second + 12:second + 16] = b"\xff\xff\xff\x7f"
    path.write_bytes(bytes(blob))
    assert error_of(series_dir / "b_master.h5", 2) == (
        "b_data_000002.h5: frame 1's chunk is corrupt (its header does not declare 1052672 bytes)")
    assert error_of(series_dir / "b_master.h5", 3).startswith("b_data_000002.h5: frame 2's chunk is corrupt (")


def test_a_missing_data_file_and_vds_source(series_dir, tmp_path_factory):
    os.remove(series_dir / "b_data_000002.h5")
    assert error_of(series_dir / "b_master.h5", 3) == "data file b_data_000002.h5 of frame index 3 is missing"
    vds_dir = tmp_path_factory.mktemp("vds")
    nexus.write_series(str(vds_dir), "v", small_frames(4), layout="vds", nimages_per_file=2, geometry=GEOMETRY)
    os.remove(vds_dir / "v_data_000002.h5")
    assert analyse(str(vds_dir / "v_master.h5"), index=1).status == "ok"
    assert error_of(vds_dir / "v_master.h5", 2) == "data file v_data_000002.h5 of frame index 2 is missing"


def test_a_frame_not_written_yet(tmp_path):
    """A data file whose dataset has room for frames not yet written: those frames are an error, never zeros."""
    import hdf5plugin

    nexus.write_series(str(tmp_path), "p", small_frames(2), layout="legacy", nimages_per_file=2, geometry=GEOMETRY)
    path = tmp_path / "p_data_000001.h5"
    with h5py.File(path, "w") as h5:
        part = h5.create_dataset("/entry/data/data", shape=(2, 512, 1028), dtype=np.uint16, chunks=(1, 512, 1028),
                                 **hdf5plugin.Bitshuffle(nelems=0, cname="lz4"))
        part[0] = nexus.stored_pixels(small_frames(1)[0])
        part.attrs["image_nr_low"], part.attrs["image_nr_high"] = np.uint64(1), np.uint64(2)
    assert nexus.complete_frames(str(path)) == 1
    assert analyse(str(tmp_path / "p_master.h5"), index=0).status == "ok"
    assert error_of(tmp_path / "p_master.h5", 1) == "p_data_000001.h5: frame 2 is not written yet (no chunk)"
    half = tmp_path / "half_data_000001.h5"
    half.write_bytes(path.read_bytes()[:100])
    assert nexus.complete_frames(str(half)) == 0


@pytest.mark.parametrize("change,message", [
    (lambda h5: h5.__delitem__("/entry/instrument/detector/detector_distance"),
     "missing master field /entry/instrument/detector/detector_distance"),
    (lambda h5: h5.__delitem__("/entry/instrument/beam/incident_wavelength"),
     "missing master field /entry/instrument/beam/incident_wavelength"),
    (lambda h5: h5.__delitem__("/entry/instrument/detector/detectorSpecific/countrate_correction_count_cutoff"),
     "missing master field /entry/instrument/detector/detectorSpecific/countrate_correction_count_cutoff "
     "(or /entry/instrument/detector/saturation_value)"),
    (lambda h5: h5["/entry/instrument/detector/detector_distance"].attrs.__setitem__("units", "furlong"),
     "unknown Detector_distance units 'furlong'"),
])
def test_a_missing_or_bad_geometry_field(series_dir, change, message):
    with h5py.File(series_dir / "b_master.h5", "a") as h5:
        change(h5)
    assert error_of(series_dir / "b_master.h5", 1) == message


def test_an_unknown_layout(series_dir):
    with h5py.File(series_dir / "b_master.h5", "a") as h5:
        h5["/entry/definition"] = np.bytes_("NXtomo")
    assert error_of(series_dir / "b_master.h5", 0) == "unknown layout: /entry/definition is 'NXtomo', not NXmx"
    with h5py.File(series_dir / "b_master.h5", "a") as h5:
        del h5["/entry/definition"]
        del h5["/entry/data/data_000001"]
        del h5["/entry/data/data_000002"]
    assert error_of(series_dir / "b_master.h5", 0).startswith("unknown layout: no /entry/data/data_NNNNNN links")


def test_the_nxmx_saturation_value_stands_in_for_the_cutoff(tmp_path):
    master = nexus.write_series(str(tmp_path), "n", small_frames(1), layout="nxmx", geometry=GEOMETRY)
    with h5py.File(master, "a") as h5:
        del h5["/entry/instrument/detector/detectorSpecific/countrate_correction_count_cutoff"]
        del h5["/entry/instrument/detector/saturation_value"]
        h5["/entry/instrument/detector/saturation_value"] = np.uint32(21517)
    assert nexus.read_frame(master).geometry.saturation == 21517


def test_is_hdf5(tmp_path, simulated):
    assert not nexus.is_hdf5(str(simulated["paths"]["blank"]))
    assert nexus.is_hdf5(str(tmp_path / "later_master.h5"))
    assert not nexus.is_hdf5(str(tmp_path))
    fifo = tmp_path / "fifo.h5"
    os.mkfifo(fifo)
    assert not nexus.is_hdf5(str(fifo))
    assert error_of(fifo, 0)  # one line, no hang


SWMR_WRITER = r"""
import sys
import h5py, hdf5plugin, numpy as np
from spotfinder_core import nexus
frames = [nexus.stored_pixels(np.full((512, 1028), k + 1, dtype=np.int32)) for k in range(3)]
with h5py.File(sys.argv[1], "w", libver="latest") as h5:
    data = h5.create_dataset("/entry/data/data", shape=(0, 512, 1028), maxshape=(None, 512, 1028),
                             dtype=np.uint16, chunks=(1, 512, 1028), **hdf5plugin.Bitshuffle(nelems=0, cname="lz4"))
    data.attrs["image_nr_low"], data.attrs["image_nr_high"] = np.uint64(1), np.uint64(3)
    h5.swmr_mode = True
    for frame in frames:
        sys.stdin.readline()
        data.resize(data.shape[0] + 1, axis=0)
        data[-1] = frame
        data.flush()
        print("written", flush=True)
    sys.stdin.readline()
"""


def test_a_data_file_written_in_swmr_mode_is_read_frame_by_frame(tmp_path):
    """The writer keeps the file open (SWMR): each frame is there once its chunk is, and is read meanwhile."""
    nexus.write_master(str(tmp_path / "w_master.h5"), shape=(512, 1028), nimages=3, nimages_per_file=3,
                       **GEOMETRY)
    data = tmp_path / "w_data_000001.h5"
    writer = subprocess.Popen([sys.executable, "-c", SWMR_WRITER, str(data)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        for k in range(3):
            writer.stdin.write("\n")
            writer.stdin.flush()
            assert writer.stdout.readline() == "written\n"
            assert nexus.complete_frames(str(data)) == k + 1
            frame = nexus.open_series(str(tmp_path / "w_master.h5")).read(k)
            assert (frame.pixels == k + 1).all() and frame.image_number == k + 1
        writer.stdin.write("\n")
        writer.stdin.flush()
        assert writer.wait(timeout=60) == 0
    finally:
        writer.kill()


@pytest.mark.parametrize("present", [(1, 2, 3), (2, 3), (3,), ()])
def test_which_data_file_holds_which_frames(tmp_path, present):
    """nimages_per_file and the first image number come from whichever data file is there to say."""
    nexus.write_series(str(tmp_path), "f", small_frames(5), layout="legacy", nimages_per_file=2, geometry=GEOMETRY,
                       image_nr_low=11)
    for k in {1, 2, 3} - set(present):
        os.remove(tmp_path / ("f_data_%06d.h5" % k))
    series = nexus.open_series(str(tmp_path / "f_master.h5"))
    assert [(d.first_index, d.count) for d in series.data_files] == [(0, 2), (2, 2), (4, 1)]
    assert series.image_nr_low == (11 if present else 1)
    assert series.data_file_of(3).path.endswith("f_data_000002.h5")


def test_a_master_that_crashes_hdf5_is_one_error(tmp_path):
    """HDF5 itself dies of a segmentation fault opening some corrupt virtual datasets (this one byte was found
    by fuzzing): the reader opens a v2024.2 master in a child process first, so the caller lives and the frame
    is one error."""
    master = tmp_path / "z_master.h5"
    nexus.write_series(str(tmp_path), "z", small_frames(3), layout="vds", nimages_per_file=2, geometry=GEOMETRY)
    blob = bytearray(master.read_bytes())
    blob[blob.find(b"z_data_000001.h5") + 167] = 41
    master.write_bytes(bytes(blob))
    code = "from spotfinder_core import analyse; import sys; print(analyse(sys.argv[1], index=1).error)"
    done = subprocess.run([sys.executable, "-c", code, str(master)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-300:]
    assert done.stdout == "corrupt master: HDF5 crashed opening /entry/data/data (signal 11)\n"


def test_fuzzed_series_give_a_result_or_one_line(tmp_path):
    """Seeded corruptions (bytes changed, files cut short, runs of noise) of each layout's master and data files:
    every frame is a result or one line, never an exception or a crash (HDF5's crashes are kept in a child)."""
    import random

    rng = random.Random(12)
    for layout in nexus.LAYOUTS:
        base = tmp_path / layout
        base.mkdir()
        nexus.write_series(str(base), "z", small_frames(3), layout=layout, nimages_per_file=2, geometry=GEOMETRY)
        names = sorted(os.listdir(base))
        for trial in range(40):
            work = tmp_path / ("%s_%d" % (layout, trial))
            shutil.copytree(base, work)
            victim = work / rng.choice(names)
            blob = bytearray(victim.read_bytes())
            kind = rng.random()
            if kind < 0.4:
                for _ in range(rng.randint(1, 20)):
                    blob[rng.randrange(len(blob))] = rng.randrange(256)
            elif kind < 0.7:
                blob = blob[:rng.randrange(len(blob))]
            else:
                at = rng.randrange(len(blob))
                blob[at:at + 64] = rng.randbytes(64)
            victim.write_bytes(bytes(blob))
            for index in range(3):
                result = analyse(str(work / "z_master.h5"), index=index)
                assert result.status == "ok" or ("\n" not in result.error and "internal" not in result.error)
            shutil.rmtree(work)


def test_data_of_another_size_than_the_master_says(tmp_path):
    """Checked before anything is decoded, so a damaged size cannot make the reader allocate gigabytes."""
    nexus.write_series(str(tmp_path), "s", small_frames(1), layout="legacy", geometry=GEOMETRY)
    nexus.write_master(str(tmp_path / "s_master.h5"), shape=(1065, 1030), nimages=1, **GEOMETRY)
    assert error_of(tmp_path / "s_master.h5") == (
        "s_data_000001.h5 holds frames of 1028x512 pixels, but the master says 1030x1065")


STREAM_FRAME = "eiger2_16m_stream_tickit/frame_sample"


def test_a_real_eiger2_16m_stream_frame_stored_as_the_filewriter_stores_it(thermolysin, tmp_path):
    """The bitshuffle-LZ4 blob a real EIGER2 16M streamed (a dark frame), stored byte for byte as the chunk of a
    data file, with the detector's gaps in the master's mask: it decodes to the facts its SOURCE.md gives, and
    its text is that of its miniCBF, which is the real DISTL's where DISTL is set up."""
    (blob_path,) = real_files((STREAM_FRAME,), "the EIGER2 16M stream frame")
    shape = (4362, 4148)
    data = nexus.write_data_file(str(tmp_path / "dark_data_000001.h5"), [np.zeros(shape, dtype=np.uint16)])
    with h5py.File(data, "r+") as h5:
        h5["entry/data/data"].id.write_direct_chunk((0, 0, 0), open(blob_path, "rb").read())
    gaps = (thermolysin["frames"][0] == -1).astype(np.uint32)  # the same detector model: the same module gaps
    master = nexus.write_master(str(tmp_path / "dark_master.h5"), shape=shape, nimages=1, pixel_mask=gaps,
                                **nexus.cbf_geometry(thermolysin["source"]))
    series = nexus.open_series(master)
    raw = series.raw_pixels(0)
    counted = raw[raw != 65535]
    assert (raw == 65535).sum() == 1_253_074 and counted.sum() == 9_876 and np.count_nonzero(counted) == 247
    assert (raw[2916, 704], raw[3921, 3346], raw[3911, 1867]) == (6416, 2956, 260)
    frame = series.read(0)
    assert (frame.pixels == -1).sum() == gaps.sum() and (frame.pixels == -2).sum() == 1_253_074 - gaps.sum()

    cbf = write_cbf_like(gzip.decompress(open(thermolysin["source"], "rb").read()), frame.pixels,
                         tmp_path / "dark_0001.cbf")
    params = parse_words(["distl.bins.verbose=True"])
    ours = analyse(master, params, shown_as=cbf, index=0)
    assert ours.status == "ok" and format_body(ours) == format_body(analyse(cbf, params))
    if peer_missing(PEER_DISTL) is None:
        assert format_body(ours) == real_distl_body(cbf, "distl.bins.verbose=True")


def test_a_dark_frame_whose_corner_is_constant_is_classified_inside_the_inscribed_circle_only(thermolysin, tmp_path):
    """libdistl takes a frame whose pixels 50..99 (both axes) are all equal for an image plate and classifies
    only the windows inside the inscribed circle, whatever the detector: a dark frame is such a frame.  1-count
    blobs over the whole detector are then found inside the circle only, and everywhere once one corner pixel
    counts; both texts are the real DISTL's where DISTL is set up."""
    gaps = thermolysin["frames"][0] < 0
    dark = np.where(gaps, thermolysin["frames"][0], 0)
    for x in range(30, 4340, 97):
        for y in range(30, 4126, 89):
            blob = dark[x - 1:x + 2, y - 1:y + 2]
            if (blob >= 0).all() and not (x < 110 and y < 110):
                blob[...] = 1
                blob[1, 1] = 2
    lit = dark.copy()
    lit[60, 60] = 1
    source = gzip.decompress(open(thermolysin["source"], "rb").read())
    params = parse_words(["distl.bins.verbose=True"])
    texts, spot_totals = {}, {}
    for name, pixels in (("dark", dark), ("lit", lit)):
        cbf = write_cbf_like(source, pixels, tmp_path / ("%s_0001.cbf" % name))
        result = analyse(cbf, params)
        assert result.status == "ok"
        texts[name], spot_totals[name] = (cbf, format_body(result)), result.spot_total
    assert 0 < spot_totals["dark"] < spot_totals["lit"]
    if peer_missing(PEER_DISTL) is None:
        for cbf, text in texts.values():
            assert text == real_distl_body(cbf, "distl.bins.verbose=True")
