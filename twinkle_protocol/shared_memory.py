"""Same-host fast path: tensor bytes in /dev/shm segments instead of in gRPC messages.

The client owns every segment: it creates them (mode 0600) in a pool it reuses, so their pages
stay faulted in, names one in a request, and unlinks them all when it closes. The worker only
maps them: inputs through a private copy-on-write mapping (no copy made), outputs written into
a segment the client offered. Used by twinkle_client.transport (client side) and by the worker's
servicer (the `read_tensors` / `write_tensors` half); the rules are in docs/protocol.md,
"Shared memory".
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import re
import secrets
import stat
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from twinkle_protocol import tensors
from twinkle_protocol._proto import tensor_pb2
from twinkle_protocol.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted

SHM_DIR = "/dev/shm"
_NAME = re.compile(r"twinkle-[A-Za-z0-9_.-]{1,100}")
_CLIENT_NAME = re.compile(r"twinkle-(\d+)-[0-9a-f]{16}")  # what Segment names its files: the owner's pid first
ALIGN = 64  # every tensor starts on a cache line (and a multiple of every itemsize)
PROBE_BYTES = 64


def available() -> bool:
    """Whether this process can make segments at all (Linux with a writable /dev/shm)."""
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def layout(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Offsets for tensors of these byte sizes, each aligned to ALIGN, and the bytes they span."""
    offsets, end = [], 0
    for size in sizes:
        offsets.append(end)
        end += -(-size // ALIGN) * ALIGN
    return offsets, end


# Big copies are split over a few threads (numpy releases the GIL while copying): one thread moves
# 5-8 GB/s here, two about 1.7x that, and the client has nothing else to do while it waits.
COPY_THREADS = max(1, min(4, os.cpu_count() or 1))
PARALLEL_COPY_BYTES = 4 << 20
_copiers: ThreadPoolExecutor | None = None
_copiers_lock = threading.Lock()


def copy(target: np.ndarray, source: np.ndarray) -> None:
    """np.copyto of two arrays of one shape (either may be strided), in COPY_THREADS pieces along the
    first axis when it is big."""
    global _copiers
    if source.nbytes < PARALLEL_COPY_BYTES or COPY_THREADS == 1 or source.ndim == 0 or len(source) < COPY_THREADS:
        np.copyto(target, source)
        return
    with _copiers_lock:
        if _copiers is None:
            _copiers = ThreadPoolExecutor(COPY_THREADS - 1, thread_name_prefix="twinkle-copy")
    bounds = [len(source) * piece // COPY_THREADS for piece in range(COPY_THREADS + 1)]
    pieces = [
        _copiers.submit(np.copyto, target[a:b], source[a:b]) for a, b in zip(bounds[1:-1], bounds[2:], strict=True)
    ]
    np.copyto(target[: bounds[1]], source[: bounds[1]])
    for piece in pieces:
        piece.result()


def segment_bytes(sizes: Sequence[int]) -> int:
    """How big a segment must be for tensors of these byte sizes, laid out by `layout`."""
    return layout(sizes)[1]


class Segment:
    """One client-owned segment, mapped read-write in this process."""

    def __init__(self, size: int) -> None:
        self.name = f"twinkle-{os.getpid()}-{secrets.token_hex(8)}"
        self.size = size
        path = os.path.join(SHM_DIR, self.name)
        draft = path + ".new"  # a name sweep_stale ignores until the lock is held
        fd = os.open(draft, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            # Held while this process lives (the kernel drops it when the process dies, whatever its pid
            # namespace): how sweep_stale tells a live client's segment from a dead one's.
            fcntl.flock(fd, fcntl.LOCK_SH)
            # Reserve the pages now: on a full tmpfs (Docker's default /dev/shm is 64 MiB) this raises
            # OSError(ENOSPC), where a sparse file would kill the first process to write with SIGBUS.
            os.posix_fallocate(fd, 0, size)
            self.buffer = mmap.mmap(fd, size)
            os.rename(draft, path)
        except BaseException:
            os.unlink(draft)
            os.close(fd)
            raise
        self._fd = fd

    def write(self, arrays: Sequence[np.ndarray], start: int = 0) -> list[int]:
        """Copies the arrays in (strided views too: one copy each), laid out from `start`; returns their offsets."""
        offsets, _ = layout([array.nbytes for array in arrays])
        for array, offset in zip(arrays, offsets, strict=True):
            target = np.frombuffer(self.buffer, dtype=array.dtype, count=array.size, offset=start + offset)
            copy(target.reshape(array.shape), array)
        return [start + offset for offset in offsets]

    def read(self, shared: tensor_pb2.SharedTensors, tensor_map: tensor_pb2.TensorMap) -> dict[str, np.ndarray]:
        """Copies the tensors a worker wrote here out into arrays of their own (the segment goes back to the pool)."""
        views = _views(self.buffer, self.size, shared, tensor_map)
        return {key: np.array(view) for key, view in views.items()}

    def destroy(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, self.name))
        with contextlib.suppress(BufferError):  # an array still views it: the mapping goes when the array does
            self.buffer.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Pool:
    """Reusable segments: a fresh segment costs a page fault per 4 KiB (~1 GB/s here), a reused one memcpy speed.

    A segment goes back to the pool only after every rank answered the call that named it; one
    whose call failed is retired (kept, never reused) because a retried call may still read it.
    close() deletes them all, those still in use (e.g. by a future nobody waited for) included.
    """

    def __init__(self, max_idle_bytes: int = 1 << 30, max_retired: int = 4) -> None:
        sweep_stale()
        self.max_idle_bytes = max_idle_bytes
        self.max_retired = max_retired
        self._idle: list[Segment] = []
        self._retired: list[Segment] = []
        self._in_use: set[Segment] = set()
        self._lock = threading.Lock()
        self._closed = False

    def acquire(self, nbytes: int) -> Segment:
        """An idle segment that fits (the smallest), or a new one: rounded up to a power of two (>= 1 MiB)
        up to 64 MiB, to a multiple of 64 MiB above. OSError when /dev/shm has no room."""
        with self._lock:
            if self._closed:
                raise FailedPrecondition("the client is closed")
            fitting = [segment for segment in self._idle if segment.size >= nbytes]
            if fitting:
                segment = min(fitting, key=lambda candidate: candidate.size)
                self._idle.remove(segment)
                self._in_use.add(segment)
                return segment
        if nbytes <= 64 << 20:
            segment = Segment(max(1 << 20, 1 << max(0, nbytes - 1).bit_length()))
        else:
            segment = Segment(-(-nbytes // (64 << 20)) * (64 << 20))
        with self._lock:
            if not self._closed:
                self._in_use.add(segment)
                return segment
        segment.destroy()
        raise FailedPrecondition("the client is closed")

    def release(self, segment: Segment) -> None:
        with self._lock:
            self._in_use.discard(segment)
            if not self._closed:
                self._idle.append(segment)
                while sum(idle.size for idle in self._idle) > self.max_idle_bytes:
                    self._idle.pop(0).destroy()
                return
        segment.destroy()

    def retire(self, segment: Segment) -> None:
        with self._lock:
            self._in_use.discard(segment)
            if not self._closed:
                self._retired.append(segment)
                while len(self._retired) > self.max_retired:
                    self._retired.pop(0).destroy()
                return
        segment.destroy()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            segments = self._idle + self._retired + list(self._in_use)
            self._idle, self._retired, self._in_use = [], [], set()
        for segment in segments:
            segment.destroy()


def sweep_stale() -> list[str]:
    """Deletes the segments this user's clients left behind when they died (kill -9, OOM): a client
    unlinks its own at close, but a dead one cannot. A live client holds a lock on each of its
    segments (not a pid check: containers sharing /dev/shm do not share pids). Returns what it deleted."""
    if not os.path.isdir(SHM_DIR):
        return []
    removed = []
    for name in os.listdir(SHM_DIR):
        if not _CLIENT_NAME.fullmatch(name):
            continue
        path = os.path.join(SHM_DIR, name)
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                if os.fstat(fd).st_uid != os.geteuid():
                    continue
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError (an OSError): its owner lives
                os.unlink(path)
                removed.append(name)
            finally:
                os.close(fd)
    return removed


def make_probe() -> tuple[Segment, bytes]:
    """A small segment holding random bytes: a worker that can echo them shares this host's /dev/shm."""
    segment = Segment(PROBE_BYTES)
    secret = secrets.token_bytes(PROBE_BYTES)
    segment.buffer[:PROBE_BYTES] = secret
    return segment, secret


# --- the worker's half ------------------------------------------------------------------------


def open_segment(name: str, field: str, writable: bool = False) -> tuple[mmap.mmap, int]:
    """Maps a client's segment: private copy-on-write for reading, shared for writing outputs into it.

    Only a regular file in /dev/shm named by the protocol's rule and owned by this worker's user.
    """
    if not _NAME.fullmatch(name):
        raise InvalidArgument(f"{field}: {name!r} is not a segment name (twinkle- then 1-100 of [A-Za-z0-9_.-])")
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(os.path.join(SHM_DIR, name), flags)
    except FileNotFoundError:
        raise NotFound(
            f"{field}: shared-memory segment {name!r} does not exist on this worker's host; "
            "a client on another host must send the tensors in the messages"
        ) from None
    except OSError as error:
        raise PermissionDenied(f"{field}: cannot open shared-memory segment {name!r}: {error.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise PermissionDenied(f"{field}: segment {name!r} must be a regular file owned by the worker's user")
        if info.st_size == 0:
            raise InvalidArgument(f"{field}: segment {name!r} is empty")
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_COPY
        return mmap.mmap(fd, info.st_size, access=access), info.st_size
    finally:
        os.close(fd)


def _views(
    buffer: Any, size: int, shared: tensor_pb2.SharedTensors, tensor_map: tensor_pb2.TensorMap
) -> dict[str, np.ndarray]:
    keys = sorted(tensor_map.tensors)
    if len(shared.offsets) != len(keys):
        raise InvalidArgument(f"shared offsets: {len(shared.offsets)} given for {len(keys)} tensors")
    views: dict[str, np.ndarray] = {}
    for key, offset in zip(keys, shared.offsets, strict=True):
        message = tensor_map.tensors[key]
        nbytes = tensors.byte_size(message)
        if offset < 0 or offset + nbytes > size or offset % tensors.itemsize(message):
            raise InvalidArgument(
                f"shared offsets: {key!r} at byte {offset} ({nbytes} bytes) lies outside the {size}-byte segment "
                "or is misaligned"
            )
        shaped = tensor_pb2.Tensor(dtype=message.dtype, shape=message.shape)
        views[key] = tensors.from_buffer(shaped, memoryview(buffer)[offset : offset + nbytes], key)
    return views


def read_tensors(
    shared: tensor_pb2.SharedTensors, tensor_map: tensor_pb2.TensorMap, max_bytes: int, copy: bool = False
) -> dict[str, np.ndarray]:
    """The tensors of a request whose bytes lie in a client's segment.

    Without `copy` the arrays view a private mapping (copy-on-write: the worker's writes never reach
    the client); the client must not change the segment until the call is answered, which is how
    its pool works. With `copy` they are snapshots (before moving to an accelerator, so checks and
    use see the same bytes).
    """
    total = sum(tensors.byte_size(message) for message in tensor_map.tensors.values())
    if total > max_bytes:
        raise ResourceExhausted(f"shared_inputs: the tensors hold {total} bytes; at most {max_bytes} allowed")
    buffer, size = open_segment(shared.segment, "shared_inputs.segment")
    views = _views(buffer, size, shared, tensor_map)
    return {key: np.array(view) for key, view in views.items()} if copy else views


def write_arrays(name: str, arrays: Sequence[np.ndarray]) -> list[int] | None:
    """Writes contiguous arrays into the client's segment `name`, laid out by `layout`; returns their
    offsets, or None (nothing written) when they do not fit."""
    offsets, total = layout([array.nbytes for array in arrays])
    buffer, size = open_segment(name, "output_segment", writable=True)
    try:
        if total > size:
            return None
        for array, offset in zip(arrays, offsets, strict=True):
            copy(np.frombuffer(buffer, dtype=array.dtype, count=array.size, offset=offset).reshape(array.shape), array)
    finally:
        with contextlib.suppress(BufferError):
            buffer.close()
    return offsets


def write_tensors(
    name: str, values: Mapping[str, np.ndarray], tensor_map: tensor_pb2.TensorMap
) -> tensor_pb2.SharedTensors | None:
    """Writes output arrays into the client's segment `name` and fills their dtype/shape into tensor_map.

    Returns where they lie, or None (nothing written) when they do not fit: the caller then sends them in the messages.
    """
    arrays = [tensors.encode_header(values[key], tensor_map.tensors[key]) for key in sorted(values)]
    offsets = write_arrays(name, arrays)
    if offsets is None:
        for key in values:
            del tensor_map.tensors[key]
        return None
    return tensor_pb2.SharedTensors(segment=name, offsets=offsets)


def probe(name: str) -> bytes:
    """The first PROBE_BYTES of a client's probe segment."""
    buffer, size = open_segment(name, "shared_memory_probe")
    try:
        return bytes(buffer[: min(size, PROBE_BYTES)])
    finally:
        buffer.close()
