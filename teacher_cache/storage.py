"""Where caches live: a local directory or any fsspec URL (s3://, gs://, hf://, file://).

`Location` is the only place cache files are read or written. Local directories get
POSIX durability (write a temporary file, fsync, rename, fsync the directory). Object
stores get their own atomicity: one PUT makes an object appear whole or not at all, so
a shard is spooled to a local temporary file and uploaded when complete, and JSON
files are written with a single PUT. Credentials and endpoints come from the usual
environment of each filesystem (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL, ~/.aws/...; fsspec's FSSPEC_<PROTOCOL>_<OPTION> variables also apply).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import glob
import json
import logging
import os
import posixpath
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from teacher_cache.errors import one_line, parse_json


class StorageError(OSError):
    """A location that cannot be read or written; the message is one line for the user."""


def _why(e: BaseException) -> str:
    """The OS's reason alone when there is one (the message already names the location), else one_line;
    a timeout says so, with its cause's words (fsspec's FSTimeoutError has none of its own)."""
    if isinstance(e, TimeoutError) and not str(e):
        cause = e.__cause__ or e.__context__
        return "timed out" + (f" ({type(cause).__name__}: {one_line(cause)})" if cause and str(cause) else "")
    return getattr(e, "strerror", None) or one_line(e)


SPOOL_PREFIX = "teacher-cache-spool-"  # + "<pid>-": remote uploads spooled in $TMPDIR
_swept = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_spools(directory: str | None = None) -> list[Path]:
    """Delete spool files left in $TMPDIR by processes that died before uploading them (a
    killed worker cannot clean up; the upload it was spooling is redone on resume). Runs
    once per process unless a directory is given. Returns what was removed."""
    global _swept
    if directory is None:
        if _swept:
            return []
        _swept = True
    removed = []
    for path in Path(directory or tempfile.gettempdir()).glob(SPOOL_PREFIX + "*"):
        pid = path.name[len(SPOOL_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass  # another sweeper got it, or not ours to delete
    return removed


S3_CLIENT_CONFIG = {"connect_timeout": 10, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}}
HTTP_TIMEOUTS = {"sock_connect": 10, "sock_read": 60}  # seconds; aiohttp's default waits 5 min on a silent server


def is_http(url: str) -> bool:
    """A web server's URL (read-only: fsspec's http client)."""
    return url.startswith(("http://", "https://"))


def client_options(url: str) -> dict[str, Any]:
    """fsspec options for a URL's client: timeouts, unless the user's FSSPEC_* variables set them."""
    if url.startswith(("s3://", "s3a://")) and "FSSPEC_S3_CONFIG_KWARGS" not in os.environ:
        # botocore's defaults retry an unreachable endpoint for minutes and wait on a silent one forever
        return {"config_kwargs": S3_CLIENT_CONFIG}
    if is_http(url) and "FSSPEC_HTTP_CLIENT_KWARGS" not in os.environ:
        import aiohttp  # fsspec's http client

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, **HTTP_TIMEOUTS)}}
    return {}


def _not_missing(e: FileNotFoundError, where: str) -> StorageError | None:
    """fsspec's http turns every failure to get a file's info into FileNotFoundError; the cause
    says which: a refused or silent connection has no status, and a status other than 404 or 410
    (403 for a login, 503 when overloaded; 0 for a redirect loop) is not a missing file either."""
    cause = e.__cause__
    if cause is None:
        return None
    status = getattr(cause, "status", None)
    if status is None:
        why = f"{type(cause).__name__}: {one_line(cause)}".rstrip(": ")
        return StorageError(f"{where}: the server does not answer ({why})")
    if status in (404, 410):
        return None
    reason = getattr(cause, "message", "") or type(cause).__name__  # aiohttp's: the status's reason phrase
    return StorageError(f"{where}: the server answered {status} ({reason})" if status else f"{where}: {reason}")


@contextlib.contextmanager
def _store_errors(where: Location, name: str) -> Iterator[None]:
    """Let OSError and ValueError through (callers act on FileNotFoundError and friends) and turn
    any other failure of the store's client (botocore's EndpointConnectionError, NoCredentialsError,
    ...) into one StorageError line naming the location."""
    try:
        yield
    except Exception as e:
        if isinstance(e, TimeoutError):  # fsspec's FSTimeoutError (an OSError) names neither file nor cause
            raise StorageError(f"{where.describe(name)}: {_why(e)}") from None
        # aiohttp's connection errors (gcsfs) are OSErrors that name no file: they name the location too
        connection = isinstance(e, OSError) and type(e).__module__.split(".")[0] == "aiohttp"
        if isinstance(e, (OSError, ValueError)) and not connection:
            raise
        raise StorageError(f"{where.describe(name)}: {type(e).__name__}: {one_line(e)}") from None


def _storage_errors(method):
    """`_store_errors` around a Location method whose first argument is the file's name."""

    @functools.wraps(method)
    def wrapper(self: Location, name: str = "", *args: Any, **kwargs: Any):
        with _store_errors(self, name):
            return method(self, name, *args, **kwargs)

    return wrapper


def _kind_of(mode: int) -> str:
    """A stat mode's file type, for messages."""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))
    kinds += ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((what for test, what in kinds if test(mode)), "a special file")


def not_a_regular_file(path: Path) -> str | None:
    """What `path` is if it exists and is not a regular file (after links): "a FIFO", ...; else None."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else _kind_of(mode)


class Location:
    """A directory: a local path or an fsspec URL, with the few operations a cache needs."""

    def __init__(self, url: str | Path, **storage_options: Any) -> None:
        if not isinstance(url, (str, os.PathLike)) or not str(url):  # "" was the root folder, None "None"
            raise ValueError(f"a location must be a non-empty path or URL, got {url!r}")
        self.url = str(url).rstrip("/") or "/"
        self._options = storage_options
        self._fs, root = self._connect()
        self.root = root.rstrip("/") or "/"
        self.is_local = isinstance(self._fs, LocalFileSystem)
        self._pid = os.getpid()

    def _connect(self) -> tuple[fsspec.AbstractFileSystem, str]:
        options = {**client_options(self.url), **self._options}
        if self.url.startswith(("gs://", "gcs://")):  # gcsfs logs each failure whole (tracebacks, credential
            logging.getLogger("gcsfs").setLevel(logging.CRITICAL)  # notes) before raising it: the error says it
        try:
            return fsspec.core.url_to_fs(self.url, **options)
        except (ImportError, ValueError) as e:
            raise StorageError(f"{self.url}: cannot open this location ({_why(e)})") from None

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The filesystem, made again in a forked process (async clients such as s3fs are not fork-safe)."""
        if self._pid != os.getpid():
            self._fs, self._pid = self._connect()[0], os.getpid()
        return self._fs

    @property
    def is_http(self) -> bool:
        return is_http(self.url)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    # -- names ------------------------------------------------------------------------
    def path(self, name: str) -> str:
        """Filesystem path of `name` (relative, '/'-separated) inside this location."""
        return posixpath.join(self.root, name)

    def describe(self, name: str) -> str:
        """`name` as the user would write it, for messages."""
        return f"{self.url}/{name}"

    def bucket(self) -> str | None:
        """URL of the bucket (container) an object-store location lives in; None for local paths
        and web servers."""
        if self.is_local or not is_url(self.url) or self.is_http:
            return None
        scheme, rest = self.url.split("://", 1)
        return f"{scheme}://{rest.split('/', 1)[0]}"

    def local_path(self, name: str = "") -> Path:
        assert self.is_local, "only local locations have a filesystem path"
        return Path(self.path(name)) if name else Path(self.root)

    # -- reading ------------------------------------------------------------------------
    @_storage_errors
    def exists(self, name: str) -> bool:
        self.fs.invalidate_cache()  # another process may have written it since we last listed
        if not self.is_http:
            return self.fs.exists(self.path(name))
        try:  # fsspec's http exists() says False for a server it cannot reach
            self._http_info(name)
            return True
        except FileNotFoundError:
            return False

    @_storage_errors
    def size(self, name: str) -> int:
        self.fs.invalidate_cache(self.path(name))  # s3fs/gcsfs answer from listings, maybe of an older version
        if self.is_http:
            size = self._http_info(name).get("size")
            if not isinstance(size, int):  # was "TypeError: int() argument must be ..., not 'NoneType'"
                raise StorageError(f"{self.describe(name)}: the server does not say its size (no Content-Length)")
            return size
        return int(self.fs.size(self.path(name)))

    def _http_info(self, name: str) -> dict:
        """fs.info of a web server's file; a server that does not answer, or answers with an error
        other than 404 / 410, is a StorageError, not missing. (A folder's URL answers 403 where
        listing is off: there only a server that does not answer is an error.)"""
        try:
            return self.fs.info(self.path(name))
        except FileNotFoundError as e:
            error = _not_missing(e, self.describe(name))
            if error is not None and (name or getattr(e.__cause__, "status", None) is None):
                raise error from None
            raise

    def glob(self, pattern: str) -> list[str]:
        """Names (relative to this location) matching a pattern such as 'parts/*.json', sorted.
        Only the last part may hold wildcards; the folders are listed, not globbed, so a location
        named like a pattern ('team[law]', 'a*') is not read as one."""
        return sorted(self.sizes(pattern))

    @_storage_errors
    def sizes(self, pattern: str) -> dict[str, int | None]:
        """{name: bytes} of the files `glob(pattern)` names, from one listing of their folder; None
        where the listing gives no size (fsspec's http lists none; a static host lists nothing)."""
        folder, _, name_pattern = pattern.rpartition("/")
        self.fs.invalidate_cache()
        path = self.path(folder) if folder else self.root
        try:
            if not self.fs.isdir(path):
                return {}
            listing = self.fs.ls(path, detail=True)
        except Exception as e:
            if self.is_http and getattr(e, "status", None) is not None:  # a web server that lists no folders
                return {}  # (nginx's and Apache's default: 403): each file's size is asked instead
            raise
        prefix = folder + "/" if folder else ""
        found: dict[str, int | None] = {}
        for info in listing:
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            if fnmatch.fnmatchcase(name, name_pattern):
                size = info.get("size")
                found[prefix + name] = int(size) if isinstance(size, int) else None
        return found

    @_storage_errors
    def read_bytes(self, name: str, start: int | None = None, end: int | None = None) -> bytes:
        return self.fs.cat_file(self.path(name), start=start, end=end)

    def _read_http(self, name: str, start: int, end: int, limit: int) -> bytes:
        """Bytes [start, end) of a web server's file, and never more than `limit` + one block of them
        read: a server may ignore the range (python -m http.server sends the whole file), and fsspec's
        cat_file keeps all a server sends (a manifest URL streaming gigabytes filled the memory)."""
        from fsspec.asyn import sync

        fs, url = self.fs, self.path(name)
        if start >= end:
            return b""

        async def get() -> bytes:
            kw = dict(fs.kwargs)
            headers = {**kw.pop("headers", {}), "Range": f"bytes={start}-{end - 1}"}
            session = await fs.set_session()
            async with session.get(fs.encode_url(url), headers=headers, **kw) as r:
                if r.status == 404:
                    raise FileNotFoundError(url)
                r.raise_for_status()
                data = bytearray()
                async for block in r.content.iter_chunked(1 << 20):
                    data += block
                    if len(data) > limit:
                        r.close()  # the rest is not read: the connection goes
                        break
                return bytes(data)

        return sync(fs.loop, get)

    def read_json(self, name: str, max_bytes: int) -> Any:
        """Parse a JSON file after checking it is not implausibly large; ValueError if malformed."""
        data = self._read_capped(name, max_bytes)
        try:
            return parse_json(data)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, nested too deeply
            raise ValueError(f"{self.describe(name)}: not valid JSON ({e})") from None

    @_storage_errors
    def _read_capped(self, name: str, max_bytes: int) -> bytes:
        """A small file whole, in one read of one version of it: never more than max_bytes + 1
        bytes asked for (a read allocates what it asks for), and no size taken from a separate,
        earlier request (another writer may replace the file in between)."""
        if self.is_http:
            data = self._read_http(name, 0, max_bytes + 1, max_bytes)
            if len(data) > max_bytes:
                raise ValueError(f"{self.describe(name)}: implausibly large (over {max_bytes} bytes)")
            return data
        if not self.is_local:
            # one ranged GET; the client allocates what arrives, not the range asked for
            data = self.read_bytes(name, 0, max_bytes + 1)
            if len(data) > max_bytes:
                raise ValueError(f"{self.describe(name)}: implausibly large (over {max_bytes} bytes)")
            return data
        # O_NONBLOCK: a FIFO opens at once (a plain open waits for a writer), then is refused
        fd = os.open(self.local_path(name), os.O_RDONLY | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)  # of the file opened, whatever replaces it later
            if not stat.S_ISREG(st.st_mode):  # checked before open(fd): a folder's is "3: is a directory"
                raise ValueError(f"{self.describe(name)}: {_kind_of(st.st_mode)}, not a regular file")
        except BaseException:
            os.close(fd)
            raise
        with open(fd, "rb") as f:
            size = st.st_size
            if size > max_bytes:
                raise ValueError(f"{self.describe(name)}: implausibly large ({size} bytes)")
            data = f.read(size + 1)
        if len(data) > size:  # a device file, or one still being appended to
            raise ValueError(f"{self.describe(name)}: holds more than its stated size of {size} bytes")
        return data

    def read_ranges(self, name: str, ranges: list[tuple[int, int]], prefetch: int = 2):
        """Yield the bytes of each (start, end) range in order, fetching up to `prefetch` ahead.
        A failed fetch is a StorageError, so readers can tell it from bytes that do not decode."""
        path = self.path(name)

        def fetch(start: int, end: int) -> bytes:
            if self.is_http:  # never more read than the whole file, whatever the server sends
                return self._read_http(name, start, end, ranges[-1][1])
            return self.fs.cat_file(path, start=start, end=end)

        whole: bytes | None = None  # the file, from a server that answered a range with all of it
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = [pool.submit(fetch, start=s, end=e) for s, e in ranges[:prefetch]]
            for i, (start, end) in enumerate(ranges):
                if whole is not None:
                    yield whole[start:end]
                    continue
                try:
                    data = pending.pop(0).result()
                except Exception as e:  # OSError, or the store client's own (botocore) errors
                    raise StorageError(f"{self.describe(name)}: read failed ({_why(e)})") from None
                if len(data) > end - start and len(data) >= ranges[-1][1]:
                    # a web server without Range support (python -m http.server) sends the whole file:
                    # keep it and serve every later range from it, instead of fetching it again per range
                    whole = data
                    for f in pending:
                        f.cancel()
                    yield whole[start:end]
                    continue
                if i + prefetch < len(ranges):
                    s, e = ranges[i + prefetch]
                    pending.append(pool.submit(fetch, start=s, end=e))
                yield data

    # -- writing ------------------------------------------------------------------------
    def makedirs(self, name: str = "") -> None:
        """Local directories only: object stores have none (and s3fs would create a missing bucket)."""
        if self.is_local:
            Path(self.path(name) if name else self.root).mkdir(parents=True, exist_ok=True)

    def check_writable(self, folder: str = "parts") -> None:
        """Create the directory (and `folder` in it) and write + delete a probe there, so a bad
        --out fails before any work."""
        try:
            self.makedirs()
            if folder:
                self.makedirs(folder)
            # the pid and a random part: workers may start together
            probe = posixpath.join(folder, f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            self.fs.pipe_file(self.path(probe), b"")
            self.fs.rm_file(self.path(probe))
        except Exception as e:  # any backend's error: permissions, credentials, bucket missing
            raise StorageError(f"cannot write to {self.url}: {_why(e)}") from None

    @_storage_errors
    def write_json(self, name: str, obj: Any) -> None:
        """Write JSON atomically: tmp + fsync + rename locally, one PUT on an object store."""
        data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
        if not self.is_local:
            self.fs.pipe_file(self.path(name), data)
            return
        path = self.local_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)

    @_storage_errors
    def remove(self, name: str) -> None:
        """Delete one file if it is there."""
        if self.exists(name):
            self.fs.rm_file(self.path(name))

    def spool_path(self, name: str, tmp_suffix: str) -> Path:
        """Where a file is written before `publish`: beside its final name locally, else in $TMPDIR."""
        if self.is_local:
            return self.local_path(name + tmp_suffix)
        sweep_spools()
        fd, tmp = tempfile.mkstemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-", suffix="-" + name + tmp_suffix)
        os.close(fd)
        return Path(tmp)

    def publish(self, spool: Path, name: str) -> None:
        """Make a complete spooled file visible under `name`, atomically; the spool is consumed."""
        if self.is_local:
            with open(spool, "rb") as f:
                os.fsync(f.fileno())
            final = self.local_path(name)
            os.replace(spool, final)
            fsync_dir(final.parent)
            return
        try:
            with _store_errors(self, name):
                self.fs.put_file(str(spool), self.path(name))
        finally:
            spool.unlink(missing_ok=True)

    def copy_from(self, src: Location, src_name: str, name: str) -> None:
        """Copy one file between locations: a hard link or a server-side copy when possible, else a
        spooled copy published whole (so a killed copy never leaves a partial file under `name`)."""
        if self.is_local and src.is_local:
            try:
                os.link(src.local_path(src_name), self.local_path(name))
                fsync_dir(self.local_path(name).parent)  # the new name survives a power loss
                return
            except OSError:  # another filesystem (EXDEV), or links not supported
                pass
        elif not self.is_local and type(self.fs) is type(src.fs) and self.fs.storage_options == src.fs.storage_options:
            with _store_errors(self, name):
                self.fs.copy(src.path(src_name), self.path(name))
            return
        spool = self.spool_path(name, ".tmp")
        try:
            with _store_errors(src, src_name):
                src.fs.get_file(src.path(src_name), str(spool))
            self.publish(spool, name)
        finally:
            spool.unlink(missing_ok=True)  # a failed copy (full disk) leaves nothing behind


def write_atomic(path: Path, data: bytes) -> None:
    """Replace a local file whole: a temp name per writer, fsync, rename. A failed write (a full
    disk) leaves nothing behind, and the file as it was."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself survives a power loss
    except OSError as e:  # named by the file asked for, not the temp name the user never chose
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        with contextlib.suppress(OSError):  # a read-only folder refuses even this: the error above says why
            tmp.unlink(missing_ok=True)


def sweep_atomic_temps(path: Path, *, older_than: float = 0.0) -> list[Path]:
    """Remove the temp files `write_atomic` leaves for `path` (.NAME.<pid>-<hex>.tmp) when its
    writer is killed mid-write, those older than `older_than` seconds: the caller holds the lock
    that makes it the file's only writer (0), or only age can tell (another machine's worker may
    be writing one now). Returns what was removed."""
    now, removed = time.time(), []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*-*.tmp"):
        with contextlib.suppress(OSError):  # gone already, or not ours to delete
            if now - tmp.lstat().st_mtime >= older_than:
                tmp.unlink()
                removed.append(tmp)
    return removed


def current_umask() -> int:
    """This process's umask (read, not changed: /proc/self/status has it on Linux)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and put back
    os.umask(mask)
    return mask


def as_umask_allows(folder: Path) -> None:
    """Give a folder, and the files directly in it, the modes new ones get under the umask: some
    writers make them private (mkdtemp's 0700, safetensors' 0600), so a checkpoint or a built
    model could not be read by the team it is shared with."""
    mask = current_umask()
    folder.chmod(0o777 & ~mask)
    for f in folder.iterdir():
        if f.is_file() and not f.is_symlink():
            f.chmod(0o666 & ~mask)


def remove_if_unused(made: Path, *own_files: Path) -> None:
    """Remove a local folder a command made if no file in it but `own_files` (its lock, its part
    file): a run that fails before writing anything leaves nothing behind."""
    if made.is_dir() and all(p in own_files for p in made.rglob("*") if not p.is_dir()):
        shutil.rmtree(made, ignore_errors=True)


class LockedError(OSError):
    """Another live process holds the lock; `pid` is what it wrote there ('?' if nothing)."""

    def __init__(self, lock_file: Path, pid: str) -> None:
        super().__init__(f"{lock_file} is held by pid {pid}")
        self.pid = pid


_HELD: set[int] = set()  # descriptors of the locks this process holds (`exclusive`)


def _let_go_in_child() -> None:
    """In a forked child (a DataLoader worker, say): point each held lock's descriptor at
    /dev/null. A flock belongs to the open file, which a fork shares: a child outliving a killed
    parent would otherwise keep the lock held. The descriptor numbers stay valid for the child's
    copies of the file objects, which close /dev/null instead."""
    if not _HELD:  # most forks: nothing to let go of
        return
    null = os.open(os.devnull, os.O_RDONLY)
    for fd in _HELD:
        os.dup2(null, fd)
    os.close(null)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_let_go_in_child)


@contextlib.contextmanager
def exclusive(lock_file: Path, *, note: str = "", wait: bool = False) -> Iterator[None]:
    """Hold an exclusive flock on `lock_file` (made if missing; "<pid> <note>" written in it); the
    OS drops it when the process dies, kill -9 included, even if forked children live on (they
    let go of it at the fork). LockedError if another holds it (after a few tries over ~0.1 s: a
    reader's `holder` probe takes it for an instant), or (wait=True: for locks held a moment)
    wait for it."""
    import fcntl

    with open(lock_file, "a+") as f:
        for attempt in range(6):
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
                break
            except BlockingIOError:
                if attempt == 5:
                    f.seek(0)
                    raise LockedError(lock_file, _pid_of(f.read(256))) from None
                time.sleep(0.02)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()} {note}".rstrip() + "\n")
        f.flush()
        _HELD.add(f.fileno())
        try:
            yield
        finally:
            _HELD.discard(f.fileno())


def _pid_of(text: str) -> str:
    return (text.split() or ["?"])[0]


def holder(lock_file: Path) -> tuple[str, str] | None:
    """(pid, note) written in `lock_file` if a live process holds it (`exclusive`), else None; a
    reader's probe: it creates nothing and takes the lock for no longer than the test. Never
    probe a lock this process holds: on NFS (locks per process) the probe would release it."""
    import fcntl

    try:
        fd = os.open(lock_file, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:  # missing, or unreadable: nothing to say
        return None
    with open(fd) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = f.read(256)
            return _pid_of(text), " ".join(text.split()[1:])
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_url(where: str) -> bool:
    """Whether a path as typed is a URL (s3://, gs://, hf://, file://, ...) rather than a local path."""
    return "://" in where


def as_location(where: str | Path | Location) -> Location:
    return where if isinstance(where, Location) else Location(where)
