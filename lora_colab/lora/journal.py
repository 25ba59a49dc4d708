"""Resumable runs: a journal beside the output keeps every finished layer (its tensors and its figures), so
a run interrupted by Ctrl-C, `kill -9` or a lost runtime and started again with the same command continues
where it stopped, re-reading and recomputing nothing it had finished.

The journal `OUT.journal` is one append-only file: a header naming what the run depends on (the inputs'
content, every option that changes the output), then one record per finished layer, each with its length
and a CRC. A run whose inputs or options differ starts over, saying why; a damaged record (a write cut
short) ends the journal there. A finished run removes its journal; `restart=True` starts over."""

import errno
import hashlib
import json
import os
import struct
import sys
import time
import zlib
from pathlib import Path

from ..dtypes import from_torch
from ..errors import CheckpointError, LoraColabError, SourceError, WriteFault, write_fault
from ..io.buffers import byte_view
from ..io.temporary import remove_orphans
from .writer import SpillWriter, _pwrite_all

_FILE_MAGIC = b"LCJ1"
_RECORD_MAGIC = b"LCJR"
_RECORD_HEAD = struct.Struct("<4sIQI")  # magic, meta length, data length, CRC32 of meta + data
_SAMPLES, _SAMPLE_BYTES = 16, 64 << 10
_SYNC_SECONDS = 5.0

try:
    import fcntl
except ImportError:  # Windows: no lock, a second run simply shares nothing
    fcntl = None


def journal_path(out):
    """Where the journal of output `out` lives: beside it, `OUT.journal`."""
    out = Path(os.fspath(out))
    return out.with_name(out.name + ".journal")


def source_identity(source):
    """What a byte source's content is, independent of where it lies (a copy on a new runtime matches):
    its size and a hash of its first MiB and of 16 samples spread over the file (local files, read
    outside the run's byte count), or its URL and ETag (remote files; a Hub URL names its commit)."""
    version = source.identity.partition(":")[2]
    if source.local_path is None and version:
        return {"size": source.size, "url": source.name, "version": version}
    if source.local_path is not None:
        with open(source.local_path, "rb", buffering=0) as f:
            return {"size": source.size, "content": _sampled_hash(lambda n, at: os.pread(f.fileno(), n, at),
                                                                   source.size)}
    return {"size": source.size, "url": source.name, "content": _sampled_hash(
        lambda n, at: source.pread(n, at), source.size)}


def _sampled_hash(pread, size):
    head = min(size, 1 << 20)
    digest = hashlib.sha256(pread(head, 0))
    step = max(size - head - _SAMPLE_BYTES, 0) // _SAMPLES
    for i in range(_SAMPLES if size > head else 0):
        at = head + i * step
        digest.update(pread(min(_SAMPLE_BYTES, size - at), at))
    return digest.hexdigest()[:32]


def identity_of(sources):
    return [source_identity(s) for s in sources]


def why_different(old, new, path=""):
    """A short phrase naming the first field where two run identities differ (None: equal)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(new) + [k for k in old if k not in new]:
            if key not in old or key not in new or old[key] != new[key]:
                if key in old and key in new and isinstance(new[key], (dict, list)):
                    return why_different(old[key], new[key], f"{path}{key}.")
                return _phrase(f"{path}{key}", old.get(key), new.get(key))
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            if a != b:
                return why_different(a, b, f"{path}{i}.")
        return None
    return None if old == new else _phrase(path.rstrip("."), old, new)


def _phrase(field, old, new):
    where = field.split(".")
    inputs = {"base": "base model", "tuned": "fine-tuned model", "loras": "LoRA"}
    if where[0] in inputs:
        what = "size" if where[-1] == "size" else "version" if where[-1] == "version" else "content"
        return f"the {inputs[where[0]]} changed (its {what} differs from the interrupted run's)"
    if where[0] == "options":
        name = where[1] if len(where) > 1 else "options"
        return f"option {name} changed ({_short(old)} -> {_short(new)})"
    return f"{field} changed"


def _short(value):
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


class Journal(SpillWriter):
    """A SpillWriter whose spill file is the run's journal: tensors `add`ed for a layer are kept in memory
    until `commit(key, info)` appends them as one record; `scratch` holds tensors that are journaled but
    not written to the output (a recipe's singular vectors). `finish` writes the output and removes the
    journal; `abort` (any interruption) keeps it for the next run.

    After opening, `done` maps each finished layer's key to the `info` it was committed with (in order),
    `taken` lists the keys an interrupted run had finished, and `notes` holds what the next run should say (resuming, or starting over and why)."""

    def __init__(self, path, identity, protect=(), restart=False):
        self.identity = identity
        self._restart = restart
        self._pending = []
        self._scratch = {}
        self.done = {}
        self.notes = []
        self._last_sync = time.monotonic()
        self.shared = False  # another run holds this output's journal: this one keeps a private spill
        self.taken = []  # keys of the records taken from an interrupted run
        super().__init__(path, protect)

    def _spill_name(self):
        return journal_path(self.path)

    def _open_spill(self):
        path = self.spill_path
        spill = open(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+b", buffering=0)  # never truncated here
        if not _lock(spill):
            spill.close()
            self.shared = True
            self.spill_path = super()._spill_name()
            self.notes.append(f"another run is writing {self.path.name} (its journal {path.name} is locked): "
                              f"this run keeps no journal and cannot be resumed")
            return super()._open_spill()
        remove_orphans(self.path)  # what a killed run of this output left
        self._load(spill)
        self.taken = list(self.done)
        return spill

    # --- reading an existing journal ---

    def _load(self, spill):
        size = os.fstat(spill.fileno()).st_size
        header, start = _read_header(spill, size)
        if header is None or self._restart:
            why = ("--restart" if self._restart else "it is unreadable") if size else None
            if why:
                self.notes.append(f"starting over: the journal {self.spill_path.name} was set aside ({why})")
            self._start(spill)
            return
        why = why_different(header, self.identity)
        if why:
            self.notes.append(f"starting over: {why} since the journal {self.spill_path.name} was written")
            self._start(spill)
            return
        end, damaged = self._read_records(spill, start, size)
        if damaged:
            self.notes.append(f"the journal {self.spill_path.name} is damaged after {len(self.done)} layers "
                              f"({damaged}); the rest is computed again")
        spill.truncate(end)
        self._size = end

    def _read_records(self, spill, at, size):
        """Read records from `at`; returns (end of the last good one, what was wrong after it or "")."""
        while at < size:
            if size - at < _RECORD_HEAD.size:
                return at, "a record cut short"
            magic, meta_len, data_len, crc = _RECORD_HEAD.unpack(os.pread(spill.fileno(), _RECORD_HEAD.size, at))
            body_at = at + _RECORD_HEAD.size
            if magic != _RECORD_MAGIC:
                return at, "a record with no marker"
            if body_at + meta_len + data_len > size:
                return at, "a record cut short"
            meta_raw = os.pread(spill.fileno(), meta_len, body_at)
            running = zlib.crc32(meta_raw)
            for offset in range(0, data_len, 16 << 20):
                n = min(16 << 20, data_len - offset)
                running = zlib.crc32(os.pread(spill.fileno(), n, body_at + meta_len + offset), running)
            if running != crc:
                return at, "a record whose checksum does not match"
            try:
                meta = json.loads(meta_raw)
            except ValueError:
                return at, "a record that does not parse"
            self._restore(meta, body_at + meta_len)
            at = body_at + meta_len + data_len
        return at, ""

    def _restore(self, meta, data_at):
        for kind, table in (("tensors", self._entries), ("scratch", self._scratch)):
            for name, dtype, shape, offset, nbytes in meta.get(kind, []):
                table[name] = (dtype, tuple(shape), data_at + offset, nbytes)
        if meta.get("key") is not None:
            self.done[meta["key"]] = meta.get("info")

    def _start(self, spill):
        self.done.clear()
        self._entries.clear()
        self._scratch.clear()
        raw = json.dumps(self.identity, sort_keys=True).encode()
        header = _FILE_MAGIC + struct.pack("<I", len(raw)) + raw + struct.pack("<I", zlib.crc32(raw))
        spill.truncate(0)
        os.pwrite(spill.fileno(), header, 0)
        self._size = len(header)

    # --- writing ---

    def add(self, name, tensor):
        """Queue an output tensor of the layer being computed (journaled at `commit`)."""
        if self.shared:
            return super().add(name, tensor)
        self._queue("tensors", name, tensor, self._entries)

    def add_scratch(self, name, tensor):
        """Queue a tensor the run needs later but does not write to the output."""
        if self.shared:
            return super().add(f"scratch/{name}", tensor)
        self._queue("scratch", name, tensor, self._scratch)

    def read_scratch(self, name):
        if self.shared:
            return self.read(f"scratch/{name}")
        pending = self._pending_data(name)
        return pending if pending is not None else self._read_entry(self._scratch[name])

    def _queue(self, kind, name, tensor, table):
        if name in table or any(name == n for _, n, _ in self._pending):
            self.abort()
            raise CheckpointError(self.path, "written twice", name)
        self._pending.append((kind, name, tensor.detach().to("cpu").contiguous()))

    def _pending_data(self, name):
        return next((t for _, n, t in self._pending if n == name), None)

    def commit(self, key=None, info=None):
        """Append the queued tensors as one record; `key` (a finished layer) and its `info` come back as
        `done` when a later run resumes. key=None: tensors written after the layers (kept till `finish`)."""
        if self.shared:
            return
        meta = {"key": key, "info": info, "tensors": [], "scratch": []}
        blobs, offset = [], 0
        for kind, name, tensor in self._pending:
            data = byte_view(tensor)
            meta[kind].append([name, from_torch(tensor.dtype), list(tensor.shape), offset, len(data)])
            blobs.append(data)
            offset += len(data)
        meta_raw = json.dumps(meta).encode()
        crc = zlib.crc32(meta_raw)
        for data in blobs:
            crc = zlib.crc32(data, crc)
        head = _RECORD_HEAD.pack(_RECORD_MAGIC, len(meta_raw), offset, crc)
        at = self._size
        try:
            _pwrite_all(self._spill, head + meta_raw, at)
            position = at + len(head) + len(meta_raw)
            for data in blobs:
                _pwrite_all(self._spill, data, position)
                position += len(data)
            self._sync()
        except OSError as exc:
            raise write_fault(self.spill_path, exc, what="journal write") from None
        self._pending = []
        self._size = position
        self._restore(meta, at + len(head) + len(meta_raw))

    def _sync(self, force=False):
        """fsync at most every few seconds (a Drive folder uploads what is synced); kill -9 loses nothing
        either way, the page cache outlives the process."""
        if force or time.monotonic() - self._last_sync >= _SYNC_SECONDS:
            os.fsync(self._spill.fileno())
            self._last_sync = time.monotonic()

    def finish(self, metadata=None, kohya_hashes=False):
        """Write the output from the journal; the journal is removed once the output is in place."""
        if self._pending:
            self.commit()
        path = super().finish(metadata, kohya_hashes)
        self.discard()
        return path

    def abort(self):
        """Close the journal and keep it (the next run resumes from it); a private spill is removed."""
        if self.shared:
            return super().abort()
        if not self._spill.closed:
            try:
                self._sync(force=True)
            except OSError:
                pass
            self._spill.close()

    def discard(self):
        """Close and remove the journal."""
        SpillWriter.abort(self)


def show(lines, progress):
    """Print a run's resume lines at once where it shows progress: on stdout for a notebook's bar
    (`progress` a factory), on stderr beside tqdm's own bar, not at all when quiet."""
    if progress and lines:
        stream = sys.stdout if callable(progress) else sys.stderr
        for line in lines:
            print(line, file=stream, flush=True)


def resumable_fault(exc, journal, finished):
    """A WriteFault `exc` of a run whose `journal` keeps `finished` (e.g. "14 finished layers of 30"): the same
    line, saying that the same command resumes from there."""
    return WriteFault(exc.path, f"{exc.reason}; {journal.spill_path.name} keeps {finished}: run the same command "
                                f"again once there is room (or the mount is back) and it resumes from there",
                      exc.tensor)


def worth_keeping(exc):
    """Whether a run stopped by `exc` keeps its journal: yes for interruptions (Ctrl-C, a lost connection,
    a write the disk or the mount refused, running out of memory), no for bad input or options, which a
    rerun would meet again."""
    return not isinstance(exc, LoraColabError) or isinstance(exc, (SourceError, WriteFault))


def _lock(spill):
    """An exclusive lock on the journal for this run; False when another run holds it. Filesystems
    without locks (some FUSE mounts) count as unlocked."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(spill.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    return True


def _read_header(spill, size):
    """(identity, where the records start), or (None, 0) when the file is no journal."""
    if size < 12:
        return None, 0
    first = os.pread(spill.fileno(), 8, 0)
    if first[:4] != _FILE_MAGIC:
        return None, 0
    n = struct.unpack("<I", first[4:])[0]
    if 8 + n + 4 > size:
        return None, 0
    raw = os.pread(spill.fileno(), n, 8)
    if struct.unpack("<I", os.pread(spill.fileno(), 4, 8 + n))[0] != zlib.crc32(raw):
        return None, 0
    try:
        return json.loads(raw), 8 + n + 4
    except ValueError:
        return None, 0
