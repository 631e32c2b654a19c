"""What ``jointdiff ingest`` reads: the files of a folder, or the members of a tar or zip, on any URI.

A source is listed first, headers only, then read one input at a time, each within the
:class:`~pipeline.data.validate.ImagePolicy`'s bounds (:func:`~pipeline.data.validate.read_limited`):
what one input may cost does not depend on how large the file, member or archive is. Every entry is an
input, which ingest reads or rejects with a reason, except folders and hidden names:

* **Hidden names** (a path part starting with ``.``: ``.DS_Store``, ``.git/``, ``__MACOSX/._x.png``) are
  not inputs, as on a desktop; the listing counts them (a hidden folder once) and ingest reports the
  count. ``.`` and ``..`` are not hidden names: a path with a ``..`` part is rejected.
* **Links.** In a local folder, a symbolic link is followed only to a file inside ``SRC``; a link that
  leads outside (to a file or a folder), a link to a folder (walking it could loop or list a file
  twice) and a broken link are rejected, and a linked folder is never walked into. A fifo, socket or
  device is rejected unread (reading a fifo would block the ingest). Files are opened with
  ``O_NOFOLLOW`` and checked to be regular files again when opened, so a file swapped for a link after
  the listing is not followed either.
* **Archive members** whose name is absolute or has a ``..`` part ("path leaves the archive"), and
  link, device and fifo members, are rejected; nothing is ever extracted to disk.

Order: a folder's and a zip's inputs are sorted by id (equal ids, possible in a zip, keep archive
order). A tar's are in archive order: a compressed tar can only be read front to back, so ingest lists
it in one streaming pass over the headers (to plan shards and fingerprints) and reads the members of the
shards still to do in a second pass, in the same order; an unchanged archive has a stable order, so its
shards are the same on every run.
"""

from __future__ import annotations

import os
import re
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

from pipeline.data.storage import open_fs, version_of
from pipeline.data.validate import ImagePolicy, RowError, read_limited

ARCHIVES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")

LEAVES_ARCHIVE = "path leaves the archive (an absolute path or a '..' part); not extracted"
LEAVES_FOLDER = "path leaves the source folder (a '..' part); not read"
LINK_OUTSIDE = "a link that leads outside the source folder; not followed"
LINK_TO_FOLDER = "a link to a folder; not walked (its files are ingested by their own path)"
LINK_BROKEN = "a link to nothing (broken)"
SPECIAL_FILE = "a special file (fifo, socket or device); not read"
ENCRYPTED = "an encrypted member; not read (ingest takes no passwords)"
_TAR_KINDS = {tarfile.SYMTYPE: "symbolic link", tarfile.LNKTYPE: "hard link", tarfile.CHRTYPE: "character device",
              tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "fifo"}


SWAPPED = ("not the file that was listed (it, or a folder above it, was replaced since, perhaps by a link); "
           "not read")


def special_member(kind: str) -> str:
    return f"a {kind} member (a link or special file); not followed"


@dataclass(frozen=True)
class Source:
    """One input: its id (path relative to ``SRC``, or inside the archive), a version that changes when
    it does (size and ETag, mtime or CRC), its size in bytes when the listing tells, why it is refused
    from the listing alone (``refused``, stage ``read``), and where it is (a local path, a key, or its
    position in the archive)."""

    id: str
    version: str
    size: int | None = None
    refused: str | None = None
    where: Any = None


def is_archive(uri: str) -> bool:
    return str(uri).lower().endswith(ARCHIVES)


def _parts(name: str) -> list[str]:
    return re.split(r"[/\\]", name)


def leaves(name: str) -> bool:
    """An absolute name (``/x``, ``\\x``, ``C:x``) or one with a ``..`` part."""
    return name.startswith(("/", "\\")) or bool(re.match(r"^[A-Za-z]:", name)) or ".." in _parts(name)


def hidden_prefix(name: str) -> str | None:
    """The path up to its first hidden part (``a/.git`` for ``a/.git/x``), or None; ``.`` and ``..``
    are not hidden."""
    parts = name.split("/")
    for k, part in enumerate(parts):
        if part.startswith(".") and part not in (".", ".."):
            return "/".join(parts[:k + 1])
    return None


def _clean_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


class SourceReader:
    """A listed source (``sources``, ``hidden``) and :meth:`read` for one of its inputs."""

    sources: list[Source]
    hidden: int

    def read(self, source: Source, policy: ImagePolicy) -> bytes:
        """The input's bytes within ``policy``'s bounds, or a :class:`RowError` saying why not."""
        if source.refused:
            raise RowError("read", source.refused)
        try:
            with self._open(source) as f:
                return read_limited(f, source.id, policy, source.size)
        except RowError:
            raise
        except Exception as exc:
            raise RowError("read", f"cannot read it: {exc}") from None

    def _open(self, source: Source) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _LocalFolder(SourceReader):
    """A folder on this machine's disk: walked without following links out of it."""

    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        self.sources, hidden = [], set()
        pending = [""]
        while pending:
            rel = pending.pop()
            try:
                with os.scandir(os.path.join(self.root, rel)) as it:
                    entries = list(it)
            except OSError as exc:
                if not rel:
                    raise
                self.sources.append(Source(rel, "folder", refused=f"a folder that cannot be listed ({exc.strerror})"))
                continue
            for e in entries:
                id_ = f"{rel}/{e.name}" if rel else e.name
                if hidden_prefix(e.name):
                    hidden.add(id_)
                    continue
                try:
                    if e.is_symlink():
                        self.sources.append(self._link(id_, e.path))
                    elif e.is_dir(follow_symlinks=False):
                        pending.append(id_)
                    elif e.is_file(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        self.sources.append(Source(id_, f"{st.st_size}/{st.st_mtime}", st.st_size,
                                                   where=(e.path, st.st_dev, st.st_ino)))
                    else:
                        self.sources.append(Source(id_, "special", refused=SPECIAL_FILE))
                except OSError as exc:  # removed while it was listed, or not ours to look at
                    self.sources.append(Source(id_, "unlisted", refused=f"cannot read it ({exc.strerror})"))
        self.sources.sort(key=lambda s: s.id)
        self.hidden = len(hidden)

    def _link(self, id_: str, path: str) -> Source:
        target = os.path.realpath(path)
        if os.path.commonpath([self.root, target]) != self.root:
            return Source(id_, "link", refused=LINK_OUTSIDE)
        try:
            st = os.stat(target)
        except OSError:
            return Source(id_, "link", refused=LINK_BROKEN)
        if stat.S_ISDIR(st.st_mode):
            return Source(id_, "link", refused=LINK_TO_FOLDER)
        if not stat.S_ISREG(st.st_mode):
            return Source(id_, "link", refused=SPECIAL_FILE)
        return Source(id_, f"{st.st_size}/{st.st_mtime}", st.st_size, where=(target, st.st_dev, st.st_ino))

    @contextmanager
    def _open(self, source: Source) -> Iterator[IO[bytes]]:
        # O_NOFOLLOW and O_NONBLOCK: a file replaced by a link or a fifo since the listing is not followed
        # and cannot block; once open it must be the very file listed (device and inode): O_NOFOLLOW guards
        # the last part of the path only, and a folder above it swapped for a link would lead elsewhere
        path, dev, ino = source.where
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise RowError("read", SPECIAL_FILE)
            if (st.st_dev, st.st_ino) != (dev, ino):
                raise RowError("read", SWAPPED)
            yield f


class _RemoteFolder(SourceReader):
    """A prefix on an object store (no links there; a key may still hold ``..``)."""

    def __init__(self, fs: Any, root: str):
        self.fs = fs
        root = root.rstrip("/")
        self.sources, hidden = [], set()
        for path, info in fs.find(root, detail=True).items():
            if info.get("type") == "directory":
                continue
            id_ = path[len(root) + 1:]
            version = version_of(info)
            if leaves(id_):
                self.sources.append(Source(id_, version, refused=LEAVES_FOLDER))
            elif hidden_prefix(id_):
                hidden.add(hidden_prefix(id_))
            else:
                size = info.get("size")
                self.sources.append(Source(id_, version, None if size is None else int(size), where=path))
        self.sources.sort(key=lambda s: s.id)
        self.hidden = len(hidden)

    def _open(self, source: Source) -> Any:
        return self.fs.open(source.where, "rb")


class _Zip(SourceReader):
    """A zip file, read from a seekable file object (the central directory, then one member at a time)."""

    def __init__(self, fs: Any, path: str):
        self.file = fs.open(path, "rb")
        try:
            self.zf = zipfile.ZipFile(self.file)
        except Exception as exc:
            self.file.close()
            raise ValueError(f"{path}: not a readable zip file ({type(exc).__name__})") from None
        self.sources, hidden = [], set()
        for info in self.zf.infolist():
            if info.is_dir():
                continue
            id_ = _clean_name(info.filename)
            version = f"{info.file_size}/{info.CRC}"
            mode = info.external_attr >> 16 if info.create_system == 3 else 0
            if leaves(id_):
                self.sources.append(Source(id_, version, refused=LEAVES_ARCHIVE))
            elif hidden_prefix(id_):
                hidden.add(hidden_prefix(id_))
            elif stat.S_IFMT(mode) and not stat.S_ISREG(mode):
                self.sources.append(Source(id_, f"{version}/{mode:o}", refused=special_member(_mode_kind(mode))))
            elif info.flag_bits & 0x1:
                self.sources.append(Source(id_, version, refused=ENCRYPTED))
            else:
                self.sources.append(Source(id_, version, info.file_size, where=info))
        self.sources.sort(key=lambda s: s.id)  # stable: equal ids keep archive order
        self.hidden = len(hidden)

    def _open(self, source: Source) -> Any:
        return self.zf.open(source.where)  # by its ZipInfo: a repeated name opens this copy, not the last

    def close(self) -> None:
        self.zf.close()
        self.file.close()


def _mode_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "special"


def _decompressed(f: IO[bytes]) -> IO[bytes]:
    """``f``, decompressed if it is gzip, bzip2 or xz data. Through the standard library's file objects,
    which bound each decompression step: tarfile's own ``r|gz`` inflates each 10 KiB it reads in one go,
    up to 10 MiB at a time for a member of zeros."""
    import bz2
    import gzip
    import lzma

    head = f.read(6)
    f.seek(0)
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f, mode="rb")
    if head[:3] == b"BZh":
        return bz2.BZ2File(f, "rb")
    if head == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(f, "rb")
    return f


class _Tar(SourceReader):
    """A tar, plain or compressed, only ever read front to back as a stream (``r|``): listed in one
    pass over the headers, then read in a second pass that must ask for members in archive order."""

    def __init__(self, fs: Any, path: str):
        self.fs, self.path = fs, path
        self.sources, hidden = [], set()
        self._tf: tarfile.TarFile | None = None
        self._file: Any = None
        self._member: tarfile.TarInfo | None = None
        self._pos = -1
        for pos, m in self._stream():
            if m.isdir():
                continue
            id_ = _clean_name(m.name)
            version = f"{m.size}/{m.mtime}"
            if leaves(id_):
                self.sources.append(Source(id_, version, refused=LEAVES_ARCHIVE))
            elif hidden_prefix(id_):
                hidden.add(hidden_prefix(id_))
            elif not m.isreg():
                kind = _TAR_KINDS.get(m.type, "special")
                self.sources.append(Source(id_, f"{version}/{kind}", refused=special_member(kind)))
            else:
                self.sources.append(Source(id_, version, m.size, where=(pos, m.name, m.size)))
        self.hidden = len(hidden)
        self.close()

    def _stream(self) -> Iterator[tuple[int, tarfile.TarInfo]]:
        """``(position, member)`` in archive order, from a new stream over the archive."""
        self.close()
        self._file = self.fs.open(self.path, "rb")
        try:
            self._tf = tarfile.open(fileobj=_decompressed(self._file), mode="r|")
        except Exception as exc:
            raise ValueError(f"{self.path}: not a readable tar archive ({type(exc).__name__})") from None
        pos = 0
        while True:
            try:
                m = self._tf.next()
            except Exception as exc:
                raise ValueError(f"{self.path}: the tar archive cannot be read past its member {pos} "
                                 f"({type(exc).__name__})") from None
            if m is None:
                return
            # only the current member is needed: a tar of a million members would otherwise keep every header
            del self._tf.members[:]
            yield pos, m
            pos += 1

    def _open(self, source: Source) -> IO[bytes]:
        pos, name, size = source.where
        if self._tf is None or pos <= self._pos:  # a new pass (ingest asks in archive order: once per run)
            self._members = self._stream()
            self._pos = -1
        try:
            while self._pos < pos:
                self._pos, self._member = next(self._members)
        except StopIteration:
            raise RowError("read", "the archive changed while it was read (it ends early); run the ingest "
                                   "again") from None
        except ValueError as exc:
            raise RowError("read", str(exc)) from None
        m = self._member
        if m is None or m.name != name or m.size != size or not m.isreg():
            raise RowError("read", "the archive changed while it was read; run the ingest again")
        return self._tf.extractfile(m)

    def close(self) -> None:
        if self._tf is not None:
            self._tf.close()
        if self._file is not None:
            self._file.close()
        self._tf = self._file = None


@contextmanager
def open_source(src: str) -> Iterator[SourceReader]:
    """The listed inputs of ``src`` (a folder, tar or zip on any URI) and a reader for them."""
    from fsspec.implementations.local import LocalFileSystem

    fs, root = open_fs(src)
    if not fs.exists(root):
        raise FileNotFoundError(f"{src}: no such folder or archive")
    if is_archive(src):
        reader: SourceReader = _Zip(fs, root) if str(src).lower().endswith(".zip") else _Tar(fs, root)
    elif isinstance(fs, LocalFileSystem):
        if not os.path.isdir(root):
            raise ValueError(f"{src}: not a folder, nor a {', '.join(ARCHIVES)} archive")
        reader = _LocalFolder(root)
    else:
        reader = _RemoteFolder(fs, root)
    try:
        yield reader
    finally:
        reader.close()
