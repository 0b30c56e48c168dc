"""EIGER HDF5 (NeXus) series: reading frames of a DECTRIS FileWriter series, and writing such series.

A series is a ``<name>_master.h5`` (geometry, pixel mask, counts) and ``<name>_data_NNNNNN.h5`` files holding the
frames, one bitshuffle-LZ4 (or LZ4) chunk per frame.  Three master layouts are read:

- ``legacy``: the FileWriter's "nearly NeXus" master (no ``/entry/definition``), frames linked as external links
  ``/entry/data/data_NNNNNN``;
- ``nxmx``: an EIGER2 master with ``/entry/definition = NXmx`` (mask and ``saturation_value`` on the detector),
  frames linked the same way;
- ``vds``: the v2024.2 master, one virtual dataset ``/entry/data/data`` over the data files.

A frame's pixels are what Diamond's ``dlsnxs2cbf`` conversion to miniCBF gives, so an HDF5 frame and its CBF give
the same analysis to the last digit: ``int32``; pixels flagged in the pixel mask become -1 (bit 0: gaps between
modules) or -2 (any other bit: dead, noisy, ...); an unflagged pixel holding the fill value ``2^bits - 1`` (the
FileWriter's mark for a pixel it could not count) becomes -2 too.  The geometry is the master's, checked by the same
rules as a CBF header's (``image.geometry_from_header``), and the saturation is the count-rate cutoff.

A data file opened on its own takes geometry and mask from its master, found by name beside it
(``x_data_000002.h5`` -> ``x_master.h5``); its frame indices are its own (0 .. its frame count - 1).  Without that
master its frames cannot be analysed: the geometry lives only in the master (an error says so).
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field, replace

import numpy as np

from .image import Frame, FrameError, detector_sized, geometry_from_header
from .jit import njit

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
SWMR_WRITE_ACCESS = 0x04  # superblock v3 byte 11: the file is open for SWMR writing (0x01: open for writing)
HDF5_SUFFIXES = (".h5", ".nxs", ".hdf5")
BITSHUFFLE_FILTER, LZ4_FILTER = 32008, 32004
DETECTOR = "/entry/instrument/detector"
SPECIFIC = DETECTOR + "/detectorSpecific"
WAVELENGTH = "/entry/instrument/beam/incident_wavelength"
TWO_THETA = DETECTOR + "/goniometer/two_theta"
LINK_NAME = re.compile(r"^data_(\d{6})$")
DATA_NAME = re.compile(r"^(?P<name>.+)_data_(?P<number>\d{6})\.h5$")
MASTER_SUFFIX = "_master.h5"
LAYOUTS = ("legacy", "nxmx", "vds")
GAP, FLAGGED = 1, 2  # pixel codes derived from the mask: -1 and -2 in the frame
INT32_MAX = np.iinfo(np.int32).max
_CHUNK_HEADER = 12  # bitshuffle and HDF5-LZ4 chunks: uint64 uncompressed bytes, uint32 block bytes (big-endian)


def _h5py():
    """h5py with the HDF5 filter plugins (bitshuffle, LZ4) registered: imported when an HDF5 file is met."""
    import h5py
    import hdf5plugin  # noqa: F401  (registers the filters with HDF5)

    return h5py


def open_hdf5(path: str):
    """An HDF5 file opened for reading without taking HDF5's file lock: a reader must not block the detector's
    writer, and locks fail on the network file systems beamlines write to.  A file a writer holds open in SWMR
    mode opens as an SWMR reader (HDF5 refuses to open it otherwise: "already open for write"); one open for
    writing without SWMR (the consistency flags of a v3 superblock set) does not open until its writer closes it,
    as no reader could trust what it would see."""
    h5py = _h5py()
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as exc:
        if "already open for write" not in str(exc):
            raise
        return h5py.File(path, "r", locking=False, swmr=True)


def _head(path: str, size: int) -> bytes | None:
    """The first ``size`` bytes of a regular file (fewer if it is shorter), read without blocking (a FIFO
    gives b""); None when nothing is at ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        return b""
    try:
        return os.pread(fd, size, 0) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    except OSError:
        return b""
    finally:
        os.close(fd)


def is_hdf5(path: str) -> bool:
    """Whether ``path`` begins with the HDF5 signature; for a path that is not there yet, whether its name ends
    like an HDF5 file's.  Never blocks (a FIFO is not HDF5) and reads 8 bytes."""
    head = _head(path, 8)
    return path.endswith(HDF5_SUFFIXES) if head is None else head == HDF5_SIGNATURE


def swmr_writing(path: str) -> bool:
    """Whether a writer holds ``path`` open in SWMR mode: its v3 superblock's consistency flags say "SWMR write
    access" (HDF5 clears them when the writer closes the file).  Such a file may be read while it grows, each
    frame once its chunk is indexed; any other file only once its writer is done with it."""
    head = _head(path, 12) or b""
    return len(head) == 12 and head[:8] == HDF5_SIGNATURE and head[8] >= 3 and bool(head[11] & SWMR_WRITE_ACCESS)


def read_as_hdf5(path: str) -> bool:
    """Whether a frame path is read as HDF5: its name ends like an HDF5 file's, or it begins with the HDF5
    signature (whatever its name); everything else is read as a miniCBF."""
    return path.endswith(HDF5_SUFFIXES) or is_hdf5(path)


@dataclass(frozen=True)
class DataFile:
    """One data file of a series: it holds frame indices ``first_index .. first_index + count - 1``."""

    path: str
    first_index: int
    count: int


@dataclass(frozen=True)
class Series:
    """What a master (or a data file) says of its frames; ``read(index)`` gives one of them as a Frame."""

    path: str  # what was opened
    master: str | None
    name: str  # "x" for x_master.h5
    count: int
    image_nr_low: int
    data_files: tuple[DataFile, ...]
    layout: str  # legacy, nxmx, vds, or "data" for a data file opened on its own
    fields: dict = field(repr=False, compare=False)  # the geometry, as image.geometry_from_header takes it
    mask_path: str | None = field(default=None, repr=False, compare=False)  # the pixel mask dataset in the master
    dataset: str = field(default="/entry/data/data", repr=False, compare=False)  # in each data file
    missing: str | None = field(default=None, repr=False, compare=False)  # why no frame can be analysed

    def data_file_of(self, index: int) -> DataFile:
        """The data file holding frame ``index``; FrameError when the index is outside the series."""
        if not 0 <= index < self.count:
            held = "frames 0 to %d" % (self.count - 1) if self.count else "no frames"
            raise FrameError("frame index %d is out of range: %s holds %s" % (index, os.path.basename(self.path), held))
        for data in self.data_files:
            if data.first_index <= index < data.first_index + data.count:
                return data
        raise FrameError("no data file holds frame index %d" % index)

    def read(self, index: int, overrides: dict | None = None) -> Frame:
        """Frame ``index`` (0-based) of the series, its pixels as dlsnxs2cbf gives them."""
        if self.missing:
            raise FrameError(self.missing)
        geometry = geometry_from_header(self.fields, overrides)
        shape = (geometry.size_slow, geometry.size_fast)
        raw = self.raw_pixels(index, shape)
        codes = _mask_codes(self.master, self.mask_path, shape)
        pixels = np.empty(shape, dtype=np.int32)
        fill = np.iinfo(raw.dtype).max
        no_mask = np.zeros(0, dtype=np.uint8)
        _convert(raw.reshape(-1), no_mask if codes is None else codes.reshape(-1), fill, pixels.reshape(-1))
        return Frame(path=self.path, pixels=pixels, geometry=geometry, template=os.path.basename(self.path),
                     image_number=self.image_nr_low + index, index=index)

    def raw_pixels(self, index: int, shape: tuple[int, int] | None = None) -> np.ndarray:
        """Frame ``index`` as stored (uint8/16/32, (slow, fast)); FrameError for a missing file or chunk, or for
        frames not of ``shape`` (the master's), checked before anything is decoded."""
        data = self.data_file_of(index)
        if not os.path.exists(data.path):
            raise FrameError("data file %s of frame index %d is missing" % (os.path.basename(data.path), index))
        try:
            with open_hdf5(data.path) as h5:
                dataset = h5.get(self.dataset)
                if not isinstance(dataset, _h5py().Dataset) or dataset.ndim != 3:
                    raise FrameError("%s has no 3-dimensional %s" % (os.path.basename(data.path), self.dataset))
                if shape is not None and tuple(dataset.shape[1:]) != shape:
                    raise FrameError("%s holds frames of %dx%d pixels, but the master says %dx%d" % (
                        os.path.basename(data.path), dataset.shape[2], dataset.shape[1], shape[1], shape[0]))
                return read_chunk(dataset, index - data.first_index, os.path.basename(data.path))
        except FrameError:
            raise
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            raise FrameError("cannot read %s: %s" % (os.path.basename(data.path), _one_line(exc))) from None


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def read_chunk(dataset, position: int, label: str) -> np.ndarray:
    """Frame ``position`` of a (frames, slow, fast) dataset.  A frame stored as one bitshuffle-LZ4 or LZ4 chunk
    is decoded straight from its chunk (dectris-compression: a third faster than HDF5's filter pipeline); any
    other layout goes through h5py.  A chunk that is not there (a frame not yet written) is an error, never the
    fill value h5py would give."""
    frames, slow, fast = dataset.shape
    if not 0 <= position < frames:
        raise FrameError("%s holds %d frames, not frame %d" % (label, frames, position + 1))
    if not detector_sized(slow, fast):
        raise FrameError("%s holds frames of %dx%d pixels, not a detector's" % (label, fast, slow))
    dtype = dataset.dtype
    if dtype.kind != "u" or dtype.itemsize not in (1, 2, 4):
        raise FrameError("%s holds %s pixels, not uint8/16/32" % (label, dtype))
    chunks = dataset.chunks
    if chunks is None:
        return dataset[position]
    codec = direct_codec(dataset) if chunks == (1, slow, fast) else None
    if codec is not None:
        try:
            mask, chunk = dataset.id.read_direct_chunk((position, 0, 0))
        except (OSError, RuntimeError, ValueError, KeyError):
            raise FrameError("%s: frame %d is not written yet (no chunk)" % (label, position + 1)) from None
        if mask == 0:
            return _decode(chunk, codec, dtype, (slow, fast), label, position)
    _require_chunks(dataset, position, label)
    return dataset[position]


def direct_codec(dataset) -> str | None:
    """'bslz4' or 'lz4' when the dataset's only filter is one dectris-compression decodes, else None."""
    plist = dataset.id.get_create_plist()
    if plist.get_nfilters() != 1:
        return None
    code, _, values, _ = plist.get_filter(0)
    if code == BITSHUFFLE_FILTER and len(values) >= 5 and values[4] == 2:
        return "bslz4"
    if code == LZ4_FILTER:
        return "lz4"
    return None


def _decode(chunk: bytes, codec: str, dtype: np.dtype, shape: tuple[int, int], label: str, position: int):
    from dectris.compression import decompress

    size = shape[0] * shape[1] * dtype.itemsize
    if len(chunk) < _CHUNK_HEADER or int.from_bytes(chunk[:8], "big") != size:
        raise FrameError("%s: frame %d's chunk is corrupt (its header does not declare %d bytes)"
                         % (label, position + 1, size))
    try:
        plain = decompress(chunk, codec, elem_size=dtype.itemsize)
    except Exception as exc:  # the decoder's errors are plain RuntimeErrors/ValueErrors
        raise FrameError("%s: frame %d's chunk is corrupt (%s)" % (label, position + 1, _one_line(exc))) from None
    if len(plain) != size:
        raise FrameError("%s: frame %d's chunk decodes to %d bytes, not %d" % (label, position + 1, len(plain), size))
    return np.frombuffer(plain, dtype=dtype.newbyteorder("<")).reshape(shape)


def _require_chunks(dataset, position: int, label: str) -> None:
    """FrameError unless every chunk of frame ``position`` is stored."""
    chunks = dataset.chunks
    for y in range(0, dataset.shape[1], chunks[1]):
        for x in range(0, dataset.shape[2], chunks[2]):
            info = dataset.id.get_chunk_info_by_coord((position - position % chunks[0], y, x))
            if info.byte_offset is None:
                raise FrameError("%s: frame %d is not written yet (no chunk)" % (label, position + 1))


@njit(cache=True)
def _convert(raw, codes, fill, out):
    """dlsnxs2cbf's pixels: a gap (mask code GAP) -1, a flagged pixel or the fill value -2, counts past int32
    clipped; ``codes`` is empty for a series without a pixel mask."""
    masked = codes.size != 0
    for i in range(raw.size):
        code = codes[i] if masked else 0
        value = raw[i]
        if code == GAP:
            out[i] = -1
        elif code == FLAGGED or value == fill:
            out[i] = -2
        elif value > INT32_MAX:
            out[i] = INT32_MAX
        else:
            out[i] = value


@njit(cache=True)
def _codes_of(mask, codes):
    for i in range(mask.size):
        bits = mask[i]
        codes[i] = GAP if bits & 1 else (FLAGGED if bits else 0)


def _unchanged(path: str) -> tuple:
    """What a cache of a file's contents is keyed by: the file (its real path and inode) as it is now (its time
    stamp and size); OSError when it cannot be looked at."""
    info = os.stat(path)
    return os.path.realpath(path), info.st_ino, info.st_mtime_ns, info.st_size


_MASKS: dict = {}  # the last master's pixel codes: one per process, since a worker reads one series at a time


def _mask_codes(master: str | None, mask_path: str | None, shape: tuple[int, int]) -> np.ndarray | None:
    """Per pixel GAP, FLAGGED or 0 from the master's pixel mask (uint8), cached while the master is unchanged."""
    if master is None or mask_path is None:
        return None
    try:
        key = (_unchanged(master), mask_path)
    except OSError as exc:
        raise FrameError("cannot read the master %s: %s" % (os.path.basename(master), exc.strerror)) from None
    codes = _MASKS.get(key)
    if codes is None:
        try:
            with open_hdf5(master) as h5:
                mask = h5[mask_path][()]
        except (OSError, KeyError, ValueError) as exc:
            raise FrameError("cannot read the pixel mask %s: %s" % (mask_path, _one_line(exc))) from None
        if mask.shape != shape:
            raise FrameError("pixel mask of %s does not match the %dx%d frames" % (mask.shape, shape[1], shape[0]))
        codes = np.empty(shape, dtype=np.uint8)
        _codes_of(mask.reshape(-1), codes.reshape(-1))
        _MASKS.clear()
        _MASKS[key] = codes
    return codes


# --- opening a series -------------------------------------------------------------------------------------------

def open_series(path: str) -> Series:
    """The series of a master or a data file; FrameError with a one-line cause for anything unreadable."""
    if not os.path.exists(path):
        raise FrameError("no such file")
    if os.path.isdir(path):
        raise FrameError("is a directory, not a frame")
    if not is_hdf5(path):
        raise FrameError("not an HDF5 file (no HDF5 signature)")
    try:
        with open_hdf5(path) as h5:
            data = h5.get("/entry/data")
            if data is None:
                raise FrameError("no /entry/data: not an EIGER master or data file")
            if _is_data_file(h5, data):
                return _data_file_series(path, h5)
            return _master_series(path, h5, data)
    except FrameError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise FrameError("cannot read HDF5: %s" % _one_line(exc)) from None


def _is_data_file(h5, data) -> bool:
    """A data file holds /entry/data/data itself (a real dataset, not a VDS) and no geometry.  In a master, that
    dataset is a VDS, which HDF5 is first made to open in another process (see _vds_opens)."""
    link = data.get("data", getlink=True)
    if link is None or type(link).__name__ != "HardLink":
        return False
    if DETECTOR in h5:
        _vds_opens(h5.filename)
        return False
    return not data["data"].is_virtual


_VDS_CHECKED: dict = {}  # (path, inode, mtime, size) of a master -> None (opened unharmed) or the error
VDS_CHECK_S = 60.0


def _vds_opens(path: str) -> None:
    """FrameError unless HDF5 opens the master's /entry/data/data without crashing.  HDF5 dies of a segmentation
    fault on some corrupt virtual-dataset layouts (found by fuzzing v2024.2 masters), which would take down the
    reader (a worker, ``spotfinder find``) with it; so a master is opened once in a child process first, then
    remembered (per process, while the file is unchanged)."""
    import subprocess
    import sys

    key = _unchanged(path)
    if key not in _VDS_CHECKED:
        probe = "import sys, h5py; h5py.File(sys.argv[1], 'r', locking=False)['/entry/data/data'].virtual_sources()"
        try:
            done = subprocess.run([sys.executable, "-c", probe, path], capture_output=True, timeout=VDS_CHECK_S)
            crashed = done.returncode < 0
            error = "HDF5 crashed opening /entry/data/data (signal %d)" % -done.returncode if crashed else None
        except subprocess.TimeoutExpired:
            error = "HDF5 took over %.0f s to open /entry/data/data" % VDS_CHECK_S
        if len(_VDS_CHECKED) > 10000:  # a service running for months: forget the oldest masters
            _VDS_CHECKED.clear()
        _VDS_CHECKED[key] = error
    if _VDS_CHECKED[key]:
        raise FrameError("corrupt master: %s" % _VDS_CHECKED[key])


def master_of(path: str) -> str | None:
    """The master of the HDF5 series a file belongs to, by name beside it (itself for a master); None for a file
    named as no series' (a CBF)."""
    name = os.path.basename(path)
    if name.endswith(MASTER_SUFFIX):
        return path
    data = DATA_NAME.match(name)
    return os.path.join(os.path.dirname(path), data.group("name") + MASTER_SUFFIX) if data else None


def _series_name(path: str) -> str:
    base = os.path.basename(path)
    if base.endswith(MASTER_SUFFIX):
        return base[: -len(MASTER_SUFFIX)]
    match = DATA_NAME.match(base)
    return match.group("name") if match else os.path.splitext(base)[0]


def _scalar(h5, path: str):
    """A scalar (or the first element of an array) of the file, as a Python value; None when absent."""
    obj = h5.get(path)
    if obj is None or not hasattr(obj, "shape"):
        return None
    value = obj[()]
    if isinstance(value, np.ndarray):
        if value.size == 0:
            return None
        value = value.flat[0]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value.item() if hasattr(value, "item") else value


def _units(h5, path: str, default: str) -> str:
    units = h5[path].attrs.get("units", default)
    if isinstance(units, bytes):
        units = units.decode("ascii", "replace")
    return str(units)


def _master_series(path: str, h5, data) -> Series:
    definition = _scalar(h5, "/entry/definition")
    vds = data.get("data")
    if vds is not None and getattr(vds, "is_virtual", False):
        layout = "vds"
    elif definition is not None:
        if definition != "NXmx":
            raise FrameError("unknown layout: /entry/definition is %r, not NXmx" % definition)
        layout = "nxmx"
    else:
        layout = "legacy"
    folder = os.path.dirname(os.path.abspath(path))
    if layout == "vds":
        data_files, dataset = _vds_files(vds, folder, path), "/entry/data/data"
        shape = vds.shape[1:]
    else:
        links = sorted(name for name in data.keys() if LINK_NAME.match(name))
        if not links:
            raise FrameError("unknown layout: no /entry/data/data_NNNNNN links and no /entry/data/data")
        data_files, dataset, shape = _linked_files(h5, data, links, folder)
    nimages, ntrigger = _scalar(h5, SPECIFIC + "/nimages"), _scalar(h5, SPECIFIC + "/ntrigger")
    if nimages is None:
        raise FrameError("missing master field %s/nimages" % SPECIFIC)
    count = int(nimages) * int(ntrigger if ntrigger is not None else 1)
    if layout == "vds":
        data_files = tuple(DataFile(*source) for source in data_files)
        numbering = _numbering(data_files[0].path, dataset)
        low = numbering[1] - data_files[0].first_index if numbering and numbering[1] is not None else 1
    else:
        data_files, low = _linked_layout(data_files, count, dataset)
    fields, missing = {}, None
    try:  # a master without its geometry still names its frames: each of them is then one error
        fields = _geometry_fields(h5, shape or _shape_of(data_files, dataset))
    except FrameError as exc:
        missing = str(exc)
    mask_path = next((p for p in (DETECTOR + "/pixel_mask", SPECIFIC + "/pixel_mask") if p in h5), None)
    return Series(path=path, master=path, name=_series_name(path), count=count, image_nr_low=low,
                  data_files=data_files, layout=layout, fields=fields, mask_path=mask_path, dataset=dataset,
                  missing=missing)


def _shape_of(data_files: tuple[DataFile, ...], dataset: str) -> tuple[int, int]:
    """(slow, fast) of the frames, from the first data file there when the master does not say."""
    for data in data_files:
        if os.path.exists(data.path):
            try:
                with open_hdf5(data.path) as h5:
                    return tuple(int(n) for n in h5[dataset].shape[1:])
            except (OSError, KeyError, ValueError, RuntimeError):
                continue
    raise FrameError("missing master field %s/x_pixels_in_detector (and no data file to take the frame size from)"
                     % SPECIFIC)


def _linked_files(h5, data, links: list[str], folder: str):
    """[(path, count or None)], the dataset path inside them, and (slow, fast) from the master."""
    found, dataset = [], "/entry/data/data"
    for name in links:
        link = data.get(name, getlink=True)
        if type(link).__name__ == "ExternalLink":
            target = os.path.join(folder, link.filename)
            dataset = "/" + link.path.lstrip("/")
        else:
            raise FrameError("unknown layout: /entry/data/%s is not an external link to a data file" % name)
        found.append(target)
    x = _scalar(h5, SPECIFIC + "/x_pixels_in_detector")
    y = _scalar(h5, SPECIFIC + "/y_pixels_in_detector")
    return found, dataset, None if x is None or y is None else (int(y), int(x))


def _vds_files(vds, folder: str, master: str) -> list[tuple[str, int, int]]:
    """[(path, first index, count)] of a virtual dataset's sources, in frame order."""
    files = []
    for source in vds.virtual_sources():
        start, end = source.vspace.get_select_bounds()
        name = source.file_name
        target = os.path.abspath(master) if name == "." else os.path.join(folder, name)
        files.append((target, int(start[0]), int(end[0]) - int(start[0]) + 1))
    if not files:
        raise FrameError("unknown layout: /entry/data/data is a virtual dataset without sources")
    return sorted(files, key=lambda item: item[1])


def _linked_layout(files: list[str], count: int, dataset: str) -> tuple[tuple[DataFile, ...], int]:
    """The DataFiles of linked data files, and the image number of frame index 0.  The FileWriter puts
    nimages_per_file consecutive frames in each (the last the rest), numbered from image_nr_low; both come from
    the first data file that can be read now (its image_nr_low/high, or its shape), so one file is opened, not
    all.  If that is the last file, the others share what it leaves; with none readable yet, the frames are
    shared evenly and numbered from 1."""
    per_file, low = None, 1
    for k, path in enumerate(files):
        numbering = _numbering(path, dataset)
        if numbering is None:
            continue
        held, first_number = numbering
        per_file = -(-(count - held) // k) if k and k == len(files) - 1 else held
        if first_number is not None:
            low = first_number - k * per_file
        break
    if not per_file or per_file < 0:
        per_file = -(-count // max(1, len(files)))
    out = []
    for k, path in enumerate(files):
        first = min(k * per_file, count)
        held = count - first if k == len(files) - 1 else min(per_file, count - first)
        out.append(DataFile(path, first, held))
    return tuple(out), low


def _numbering(path: str, dataset: str) -> tuple[int, int | None] | None:
    """(frames, image_nr_low) of a data file, from its image_nr_low/high (or its shape); None when it cannot be
    read now."""
    if not os.path.exists(path):
        return None
    try:
        with open_hdf5(path) as h5:
            frames = h5[dataset]
            low, high = _number_attribute(frames, "image_nr_low"), _number_attribute(frames, "image_nr_high")
            if low is not None and high is not None:
                return high - low + 1, low
            if swmr_writing(path):  # it grows frame by frame: only a bounded maximum says how many it will hold
                return None if frames.maxshape[0] is None else (int(frames.maxshape[0]), low)
            return int(frames.shape[0]), low
    except (OSError, KeyError, ValueError, RuntimeError):
        return None


def _number_attribute(dataset, name: str) -> int | None:
    """A data file's ``image_nr_low``/``image_nr_high`` (int32 in EIGER1 files, uint64 in EIGER2 ones, a scalar or
    a one-element array) as an int; None when absent."""
    value = dataset.attrs.get(name)
    return None if value is None else int(np.asarray(value).reshape(-1)[0])


def _geometry_fields(h5, shape: tuple[int, int]) -> dict:
    """The master's geometry as image.geometry_from_header takes a CBF header's, so both are checked alike."""
    required = {"x_pixel_size": DETECTOR + "/x_pixel_size", "detector_distance": DETECTOR + "/detector_distance",
                "incident_wavelength": WAVELENGTH, "beam_center_x": DETECTOR + "/beam_center_x",
                "beam_center_y": DETECTOR + "/beam_center_y"}
    values = {}
    for key, where in required.items():
        value = _scalar(h5, where)
        if value is None:
            raise FrameError("missing master field %s" % where)
        values[key] = float(value)
    wavelength_units = _units(h5, WAVELENGTH, "angstrom").lower()
    if wavelength_units not in ("angstrom", "angstroms", "a", "å"):
        raise FrameError("unknown wavelength units %r in %s" % (wavelength_units, WAVELENGTH))
    cutoff = _scalar(h5, SPECIFIC + "/countrate_correction_count_cutoff")
    if cutoff is None:
        cutoff = _scalar(h5, DETECTOR + "/saturation_value")
    if cutoff is None:
        raise FrameError("missing master field %s/countrate_correction_count_cutoff (or %s/saturation_value)"
                         % (SPECIFIC, DETECTOR))
    two_theta = _scalar(h5, TWO_THETA)
    return {"X-Binary-Size-Second-Dimension": shape[0], "X-Binary-Size-Fastest-Dimension": shape[1],
            "PIXEL_SIZE": values["x_pixel_size"], "PIXEL_SIZE_UNITS": _units(h5, required["x_pixel_size"], "m"),
            "DISTANCE": values["detector_distance"],
            "DISTANCE_UNITS": _units(h5, required["detector_distance"], "m"),
            "WAVELENGTH": values["incident_wavelength"], "BEAM_FAST_PX": values["beam_center_x"],
            "BEAM_SLOW_PX": values["beam_center_y"], "TWOTHETA": float(two_theta or 0.0),
            "CCD_IMAGE_SATURATION": int(cutoff)}


def _data_file_series(path: str, h5) -> Series:
    """A data file opened on its own: its own frames, the geometry of its master beside it if there is one."""
    dataset = h5["/entry/data/data"]
    count = int(dataset.shape[0]) if dataset.ndim == 3 else 0
    low = _number_attribute(dataset, "image_nr_low")
    low = 1 if low is None else low
    name = _series_name(path)
    master = master_of(os.path.abspath(path)) or os.path.abspath(name + MASTER_SUFFIX)
    own = (DataFile(os.path.abspath(path), 0, count),)
    if not os.path.exists(master):
        return Series(path=path, master=None, name=name, count=count, image_nr_low=low, data_files=own,
                      layout="data", fields={}, missing="no geometry: a data file's geometry is in its master, "
                      "and %s is not beside it" % os.path.basename(master))
    try:
        parent = open_series(master)
    except FrameError as exc:
        parent = Series(path=master, master=master, name=name, count=0, image_nr_low=1, data_files=(),
                        layout="data", fields={}, missing="its master %s: %s" % (os.path.basename(master), exc))
    return Series(path=path, master=master, name=name, count=count, image_nr_low=low, data_files=own,
                  layout="data", fields=parent.fields, mask_path=parent.mask_path, missing=parent.missing)


def read_frame(path: str, index: int | None = None, overrides: dict | None = None) -> Frame:
    """Frame ``index`` of an HDF5 master or data file.  Without an index, a file holding one frame gives it;
    one holding more is an error that asks for the index (DISTL's ``distl.range``)."""
    series = open_series(path)
    if index is None:
        if series.count != 1:
            raise FrameError("an HDF5 file of %d frames needs a frame index (distl.range=N, frame=N)" % series.count)
        index = 0
    return series.read(index, overrides)


def complete_frames(data_path: str) -> int:
    """How many leading frames of a data file can be read now: it opens as HDF5 and every chunk of those frames
    is stored.  0 for a file still being written that does not open yet, or that is not HDF5."""
    if not is_hdf5(data_path) or not os.path.exists(data_path):
        return 0
    try:
        with open_hdf5(data_path) as h5:
            dataset = h5.get("/entry/data/data")
            if dataset is None or dataset.ndim != 3 or dataset.chunks is None:
                return 0 if dataset is None or dataset.ndim != 3 else int(dataset.shape[0])
            frames, slow, fast = dataset.shape
            per_frame = -(-slow // dataset.chunks[1]) * -(-fast // dataset.chunks[2])
            stored = np.zeros(frames, dtype=np.int64)

            def count(info):  # one pass over the chunk index: 2 ms for 2000 chunks, get_chunk_info(k) 340 ms
                first = info.chunk_offset[0]
                stored[first:first + dataset.chunks[0]] += 1
            dataset.id.chunk_iter(count)
            done = stored >= per_frame
            return int(frames if done.all() else np.argmin(done))
    except (OSError, KeyError, ValueError, RuntimeError):
        return 0


# --- writing series (tests, benchmarks, ``spotfinder replay``) ---------------------------------------------------

def cbf_geometry(path: str) -> dict:
    """A miniCBF frame's header as the master fields of ``write_master`` (same numbers, same units), so an HDF5
    series written from CBF frames gives the same geometry to the last bit."""
    from .image import HEADER_BYTES, parse_header, read_bytes

    fields = parse_header(read_bytes(path)[:HEADER_BYTES])
    missing = [tag for tag in ("PIXEL_SIZE", "DISTANCE", "WAVELENGTH", "BEAM_FAST_PX") if tag not in fields]
    if missing:
        raise FrameError("CBF header lacks %s" % missing[0])
    return {"pixel_size": fields["PIXEL_SIZE"], "pixel_size_units": fields.get("PIXEL_SIZE_UNITS", "m"),
            "distance": fields["DISTANCE"], "distance_units": fields.get("DISTANCE_UNITS", "m"),
            "wavelength": fields["WAVELENGTH"], "beam_x": fields["BEAM_FAST_PX"], "beam_y": fields["BEAM_SLOW_PX"],
            "count_cutoff": fields["CCD_IMAGE_SATURATION"], "two_theta": fields.get("TWOTHETA", 0.0)}


def mask_of(pixels: np.ndarray) -> np.ndarray:
    """The FileWriter pixel mask (uint32) of a frame in CBF convention: bit 0 where it is -1 (gap), bit 1 (dead)
    where it is -2."""
    return np.where(pixels == -1, 1, np.where(pixels == -2, 2, 0)).astype(np.uint32)


def stored_pixels(pixels: np.ndarray, dtype=np.uint16) -> np.ndarray:
    """A frame in CBF convention as the FileWriter stores it: flagged pixels (< 0) and counts beyond the type
    hold the fill value 2^bits - 1."""
    fill = np.iinfo(dtype).max
    return np.where((pixels < 0) | (pixels >= fill), fill, pixels).astype(dtype)


def _compression(compression: str) -> dict:
    import hdf5plugin

    if compression == "bslz4":
        return dict(hdf5plugin.Bitshuffle(nelems=0, cname="lz4"))
    if compression == "lz4":
        return dict(hdf5plugin.LZ4())
    if compression == "none":
        return {}
    raise ValueError("compression must be bslz4, lz4 or none, not %r" % compression)


def write_data_file(path: str, frames, *, image_nr_low: int = 1, dtype=np.uint16, compression: str = "bslz4",
                    nr_type=np.uint64) -> str:
    """A FileWriter data file: /entry/data/data (frames, slow, fast), one compressed chunk per frame, with
    image_nr_low/high attributes (uint64 as EIGER2 writes them, or int32 as EIGER1).  ``frames`` are in CBF
    convention (int32 with -1/-2) or already stored values of ``dtype``."""
    h5py = _h5py()
    frames = [np.asarray(frame) for frame in frames]
    stored = np.stack([f if f.dtype == np.dtype(dtype) else stored_pixels(f, dtype) for f in frames])
    with h5py.File(path, "w") as h5:
        entry = h5.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        data = entry.create_group("data")
        data.attrs["NX_class"] = "NXdata"
        dataset = data.create_dataset("data", data=stored, chunks=(1,) + stored.shape[1:], **_compression(compression))
        dataset.attrs["image_nr_low"] = nr_type(image_nr_low)
        dataset.attrs["image_nr_high"] = nr_type(image_nr_low + len(frames) - 1)
    return path


def write_master(path: str, *, layout: str = "legacy", shape: tuple[int, int], pixel_size: float = 75e-6,
                 pixel_size_units: str = "m", distance: float, distance_units: str = "m", wavelength: float,
                 beam_x: float, beam_y: float, count_cutoff: int, two_theta: float = 0.0, nimages: int,
                 ntrigger: int = 1, data_names: list[str] | None = None, nimages_per_file: int | None = None,
                 pixel_mask: np.ndarray | None = None, bit_depth: int = 16, description: str = "Dectris EIGER2 16M",
                 vds_dtype=np.uint16) -> str:
    """A FileWriter-shaped master (``layout`` legacy, nxmx or vds) for data files named ``data_names`` (default
    ``<name>_data_NNNNNN.h5``, ``nimages_per_file`` frames each).  The vds layout maps the data files' frames
    into one virtual /entry/data/data and needs to know their count per file."""
    if layout not in LAYOUTS:
        raise ValueError("layout must be one of %s, not %r" % (LAYOUTS, layout))
    h5py = _h5py()
    count = nimages * ntrigger
    per_file = nimages_per_file or count
    name = _series_name(path)
    if data_names is None:
        data_names = ["%s_data_%06d.h5" % (name, k + 1) for k in range(-(-count // per_file))]
    slow, fast = shape
    with h5py.File(path, "w") as h5:
        entry = h5.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        if layout != "legacy":
            entry["definition"] = np.bytes_("NXmx")
        data = entry.create_group("data")
        data.attrs["NX_class"] = "NXdata"
        instrument = entry.create_group("instrument")
        instrument.attrs["NX_class"] = "NXinstrument"
        beam = instrument.create_group("beam")
        beam["incident_wavelength"] = float(wavelength)
        beam["incident_wavelength"].attrs["units"] = np.bytes_("angstrom")
        detector = instrument.create_group("detector")
        detector.attrs["NX_class"] = "NXdetector"
        for key, value, units in (("beam_center_x", beam_x, "pixel"), ("beam_center_y", beam_y, "pixel"),
                                  ("detector_distance", distance, distance_units),
                                  ("x_pixel_size", pixel_size, pixel_size_units),
                                  ("y_pixel_size", pixel_size, pixel_size_units)):
            detector[key] = float(value)
            detector[key].attrs["units"] = np.bytes_(units)
        detector["description"] = np.bytes_(description)
        detector["bit_depth_image"] = np.int32(bit_depth)
        goniometer = detector.create_group("goniometer")
        goniometer["two_theta"] = np.array([two_theta], dtype=np.float64)
        goniometer["two_theta"].attrs["units"] = np.bytes_("degree")
        specific = detector.create_group("detectorSpecific")
        specific.attrs["NX_class"] = "NXcollection"
        specific["nimages"] = np.uint32(nimages)
        specific["ntrigger"] = np.uint32(ntrigger)
        specific["x_pixels_in_detector"] = np.uint32(fast)
        specific["y_pixels_in_detector"] = np.uint32(slow)
        specific["countrate_correction_count_cutoff"] = np.uint32(count_cutoff)
        specific["compression"] = np.bytes_("bslz4")
        mask = np.zeros(shape, dtype=np.uint32) if pixel_mask is None else np.asarray(pixel_mask, dtype=np.uint32)
        mask_group = specific if layout == "legacy" else detector
        mask_group.create_dataset("pixel_mask", data=mask, chunks=True, compression="gzip", compression_opts=2)
        if layout != "legacy":
            detector["saturation_value"] = np.uint32(count_cutoff)
            specific["pixel_mask"] = h5py.SoftLink(DETECTOR + "/pixel_mask")
        if layout == "vds":
            vds = h5py.VirtualLayout(shape=(count, slow, fast), dtype=vds_dtype)
            for k, data_name in enumerate(data_names):
                first = k * per_file
                n = min(per_file, count - first)
                source = h5py.VirtualSource(data_name, "/entry/data/data", shape=(n, slow, fast))
                vds[first:first + n] = source
            data.create_virtual_dataset("data", vds, fillvalue=0)
        else:
            for k, data_name in enumerate(data_names):
                data["data_%06d" % (k + 1)] = h5py.ExternalLink(data_name, "/entry/data/data")
    return path


def write_series(folder: str, name: str, frames, *, layout: str = "legacy", nimages_per_file: int = 100,
                 geometry: dict, pixel_mask: np.ndarray | None = None, image_nr_low: int = 1, dtype=np.uint16,
                 compression: str = "bslz4", nr_type=np.uint64) -> str:
    """Write ``frames`` (CBF convention) as the FileWriter would: ``<name>_master.h5`` and data files of
    ``nimages_per_file`` frames.  The pixel mask is the first frame's -1/-2 pixels unless given; ``geometry``
    holds ``write_master``'s fields (``cbf_geometry`` gives them for a CBF).  Returns the master's path."""
    frames = list(frames)
    if pixel_mask is None:
        pixel_mask = mask_of(np.asarray(frames[0]))
    names = []
    for k, first in enumerate(range(0, len(frames), nimages_per_file)):
        data_name = "%s_data_%06d.h5" % (name, k + 1)
        write_data_file(os.path.join(folder, data_name), frames[first:first + nimages_per_file],
                        image_nr_low=image_nr_low + first, dtype=dtype, compression=compression, nr_type=nr_type)
        names.append(data_name)
    master = os.path.join(folder, name + MASTER_SUFFIX)
    write_master(master, layout=layout, shape=np.asarray(frames[0]).shape, nimages=len(frames),
                 data_names=names, nimages_per_file=nimages_per_file, pixel_mask=pixel_mask,
                 bit_depth=np.dtype(dtype).itemsize * 8, vds_dtype=dtype, **geometry)
    return master


def distl_numbered(result, ranged: bool = True):
    """``result`` as DISTL's text numbers it.  With ``distl.range`` (``ranged``) DISTL prints "image #<index>"
    for a frame of an HDF5 file, where our results carry its image number (image_nr_low + index); without it
    (a one-frame file) DISTL numbers the file as any other, by its name's pattern: ``x_master.h5`` is
    "image #3" (its ``root_other.ext`` quirk).  The "File" label needs no change: those patterns give
    ``x_master.h5`` no frame number, so DISTL prints the name as it is."""
    if result.frame_index is None:
        return result
    from .image import name_template

    return replace(result, image_number=result.frame_index if ranged else name_template(result.path)[1])
