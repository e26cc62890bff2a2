"""Where datasets live: local paths, or object stores (s3://, gs://, ...) via pyarrow.

A local directory gets the full crash-only treatment: fsync'd renames and an flock lock. An
object store is reached through `pyarrow.fs` with the credentials pyarrow finds itself
(environment, config files, instance metadata; `AWS_ENDPOINT_URL` for S3-compatible
servers). There a commit is a copy to the final key (atomic per object); there is no lock,
so two runs must not write one output at once.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import posixpath

from mmtools.errors import TemporaryError, UsageError

log = logging.getLogger("mmtools")


def is_remote(path: str) -> bool:
    """Whether `path` is a URI of a pyarrow filesystem other than the local one."""
    return "://" in path and not path.startswith("file://")


def filesystem(uri: str):
    """The pyarrow filesystem of `uri` and the path inside it; a clear error if unusable."""
    from pyarrow import ArrowException
    from pyarrow.fs import FileSystem

    if uri.startswith("gs://") and "?" not in uri:
        # GCS retries a failing request for 15 minutes by default, deaf to signals: a store
        # that cannot be reached would hang a run instead of exiting 75.
        uri += f"?retry_limit_seconds={_store_seconds():g}"
    try:
        return FileSystem.from_uri(uri)
    except (ArrowException, OSError, ValueError) as e:
        scheme = uri.split("://", 1)[0]
        raise UsageError(
            f"cannot open {uri} ({' '.join(str(e).split())}); {scheme}:// needs pyarrow "
            "built with that filesystem and credentials it can find"
        ) from None


_FILESYSTEMS: dict[str, object] = {}


def _store_seconds() -> float:
    """How long a request to an object store is retried: the deadline a media URL gets
    (MMTOOLS_FETCH_TIMEOUT, default 30 s)."""
    from mmtools.media import DEFAULT_FETCH_TIMEOUT, ENV_FETCH_TIMEOUT

    try:
        return max(1.0, float(os.environ.get(ENV_FETCH_TIMEOUT) or DEFAULT_FETCH_TIMEOUT))
    except ValueError:
        return DEFAULT_FETCH_TIMEOUT


def locate(path: str) -> tuple[object | None, str]:
    """pyarrow's (filesystem, path inside it) for reading `path`; (None, path) when local."""
    if not is_remote(path):
        return None, path
    scheme, rest = path.split("://", 1)
    key = f"{scheme}://{rest.split('/', 1)[0]}"
    if key not in _FILESYSTEMS:  # one client per bucket, not one per file
        _FILESYSTEMS[key] = filesystem(key)[0]
    return _FILESYSTEMS[key], rest


@contextlib.contextmanager
def reaching(uri: str):
    """Turn a failure to reach an object store into a one-line error with an exit code."""
    try:
        yield
    except OSError as e:
        if not is_remote(uri) or isinstance(e, FileNotFoundError):
            raise
        detail = " ".join(str(e).split())
        if "NETWORK" in detail or "connect" in detail.lower():
            raise TemporaryError(f"cannot reach {uri}: {detail}") from None
        raise UsageError(f"cannot use {uri}: {detail}") from None


def stat(path: str) -> tuple[int, int]:
    """A file's size and modification time (ns; 0 where the store keeps none)."""
    fs, inner = locate(path)
    if fs is None:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    info = fs.get_file_info(inner)
    return info.size, info.mtime_ns or 0


def read_file(location: str) -> bytes:
    """The bytes of a local file or an object-store key (URLs: `mmtools.io.http`).

    Raises `OSError` (`FileNotFoundError` when it does not exist) with a one-line message.
    """
    location = location.removeprefix("file://")
    try:
        fs, inner = locate(location)
    except UsageError as e:
        raise OSError(str(e)) from None
    if fs is None:
        with open(location, "rb") as f:
            return f.read()
    with fs.open_input_stream(inner) as f:
        return f.read()


def join(root: str, *names: str) -> str:
    """`root`/`names`, for a local path or a URI."""
    return posixpath.join(root, *names) if is_remote(root) else os.path.join(root, *names)


class Store:
    """File operations on a local dataset directory (fsync'd, renamed into place)."""

    remote = False

    def __init__(self, root: str):
        self.root = root

    def path(self, name: str) -> str:
        """Where `name` (relative to the root) is, as the writer functions take it."""
        return os.path.join(self.root, name)

    def makedirs(self, name: str = "") -> None:
        """Create a directory (and its parents), each new one durably."""
        from mmtools.io.manifest import fsync_path

        path, created = os.path.abspath(self.path(name)), []
        while not os.path.isdir(path):
            created.append(path)
            path = os.path.dirname(path)
        os.makedirs(self.path(name), exist_ok=True)
        # A new directory's entry lives in its parent: without this sync a power cut could
        # lose the directory, and what was committed in it, after the commit was made.
        for new in reversed(created):
            fsync_path(os.path.dirname(new))

    def exists(self, name: str) -> bool:
        """Whether `name` exists."""
        return os.path.exists(self.path(name))

    def list(self, pattern: str) -> list[str]:
        """Names matching a glob `pattern`, relative to the root, sorted."""
        import glob

        return sorted(os.path.relpath(p, self.root) for p in glob.glob(self.path(pattern)))

    def files(self) -> list[str]:
        """Every file under the root, relative to it, sorted."""
        out = []
        for dirpath, _, names in os.walk(self.root):
            out += [os.path.relpath(os.path.join(dirpath, n), self.root) for n in names]
        return sorted(out)

    def names(self) -> list[str]:
        """The names directly in the root."""
        return sorted(os.listdir(self.root)) if os.path.isdir(self.root) else []

    def size(self, name: str) -> int:
        """Size of a file in bytes."""
        return os.path.getsize(self.path(name))

    def unlink(self, name: str) -> None:
        """Remove a file if it exists."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(name))

    def rmtree(self, name: str) -> None:
        """Remove a directory and what it holds, if it exists."""
        import shutil

        shutil.rmtree(self.path(name), ignore_errors=True)

    def commit(self, tmp: str, final: str) -> None:
        """Make a fully written temporary file the final one, durably."""
        from mmtools.io.manifest import fsync_path

        fsync_path(self.path(tmp))
        os.replace(self.path(tmp), self.path(final))
        fsync_path(os.path.dirname(self.path(final)) or ".")

    def read_json(self, name: str) -> dict | None:
        """A JSON file's content, or None when it does not exist."""
        from mmtools.io.manifest import read_json

        return read_json(self.path(name))

    def write_json(self, name: str, obj: dict) -> None:
        """Write JSON under a temporary name and commit it."""
        from mmtools.io.manifest import write_json_atomic

        write_json_atomic(self.path(name), obj)

    def filesystem(self):
        """The `filesystem=` argument of pyarrow's writers (None: a local path)."""
        return None

    def lock(self, wait: bool):
        """The lock that keeps a second writer out."""
        from mmtools.io.layout import LOCK_FILE
        from mmtools.io.lock import DirLock

        return DirLock(self.path(LOCK_FILE), wait=wait)


class RemoteStore(Store):
    """The same operations on an object store through a pyarrow filesystem."""

    remote = True

    def __init__(self, root: str):
        super().__init__(root.rstrip("/"))
        self.fs, self.base = locate(self.root)

    def path(self, name: str) -> str:
        return posixpath.join(self.base, name) if name else self.base

    def makedirs(self, name: str = "") -> None:
        self.fs.create_dir(self.path(name), recursive=True)

    def exists(self, name: str) -> bool:
        from pyarrow.fs import FileType

        return self.fs.get_file_info(self.path(name)).type != FileType.NotFound

    def files(self) -> list[str]:
        from pyarrow.fs import FileSelector, FileType

        selector = FileSelector(self.base, recursive=True, allow_not_found=True)
        infos = self.fs.get_file_info(selector)
        return sorted(
            posixpath.relpath(i.path, self.base) for i in infos if i.type == FileType.File
        )

    def list(self, pattern: str) -> list[str]:
        # As glob does: '*' stays within one level and skips dot files unless asked for.
        depth = pattern.count("/")
        hidden = posixpath.basename(pattern).startswith(".")
        return sorted(
            n
            for n in self.files()
            if n.count("/") == depth
            and fnmatch.fnmatchcase(n, pattern)
            and (hidden or not posixpath.basename(n).startswith("."))
        )

    def names(self) -> list[str]:
        return sorted({n.split("/", 1)[0] for n in self.files()})

    def size(self, name: str) -> int:
        return self.fs.get_file_info(self.path(name)).size

    def unlink(self, name: str) -> None:
        if self.exists(name):
            self.fs.delete_file(self.path(name))

    def rmtree(self, name: str) -> None:
        if self.exists(name):
            self.fs.delete_dir(self.path(name))

    def commit(self, tmp: str, final: str) -> None:
        self.fs.move(self.path(tmp), self.path(final))

    def read_json(self, name: str) -> dict | None:
        try:
            with self.fs.open_input_stream(self.path(name)) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def write_json(self, name: str, obj: dict) -> None:
        from mmtools.io.layout import TMP_PREFIX

        head, base = posixpath.split(name)
        tmp = posixpath.join(head, TMP_PREFIX + base)
        with self.fs.open_output_stream(self.path(tmp)) as f:
            f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
        self.commit(tmp, name)

    def filesystem(self):
        return self.fs

    def lock(self, wait: bool):
        log.info("%s is on an object store: no lock; run one writer at a time", self.root)
        return _NoLock()


class _NoLock:
    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass


def store(root: str) -> Store:
    """The store for a dataset directory: local, or remote for a URI."""
    if root.startswith("file://"):
        root = root[len("file://") :]
    return RemoteStore(root) if is_remote(root) else Store(root)
