"""One path layer for every path a user gives: a local path or a `gs://bucket/...` URL.

Workdirs, outputs and data dirs go through these functions, never through `pathlib`/`os` on the
user's string. Under them: `etils.epath` (what Orbax and tfds use) on its fsspec/gcsfs backend
for URLs and on `os` for local paths; `google-cloud-storage` for the two things gcsfs cannot do
(writes conditional on an object's generation, and a bounded reachability probe).

`STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT` is the one setting that points all of it at a
GCS emulator; `configure()` (run on import) maps it to what each library reads:

  gcsfs, google-cloud-storage      STORAGE_EMULATOR_HOST itself
  TensorStore (Orbax's arrays)     TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING
  ArrayRecord (google-cloud-cpp)   CLOUD_STORAGE_EMULATOR_ENDPOINT
  gcsfs's bucket-layout probe      GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (it asks the real
                                   control-plane API over gRPC, which an emulator does not serve)

TensorFlow's own GCS client (tf.io.gfile, tf.data) has no endpoint setting: nothing here hands
it a URL.

GCS has objects, not directories: `mkdir` of a URL is a no-op, an "empty directory" does not
exist, `rename`/`replace` of a URL is copy-then-delete (not atomic), while writing one object
is atomic (readers see the old object or the new one, never part of it).
"""

from collections.abc import Callable, Iterator
import contextlib
import fcntl
import os
import posixpath
import secrets
import shutil
import tempfile
import uuid

from etils import epath

from medvl_jax.errors import StorageError

SCHEMES = ("gs://",)
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
# A bound on each request of `check_reachable`; the libraries' own retries on an unreachable
# endpoint take 40 s (gcsfs) to several minutes (TensorStore, google-cloud-storage).
PROBE_TIMEOUT_S = 10.0
_CHUNK = 8 * 2**20


def configure(environ=os.environ) -> None:
  """Maps STORAGE_EMULATOR_HOST to each library's own setting (see the module docstring).

  Also sets EPATH_USE_TF=false, so `epath.Path('gs://...')` (in Orbax, tfds and here) goes
  through gcsfs rather than tf.io.gfile: one client stack, the one the emulator tests exercise.
  Libraries read these once (etils at its first URL, gcsfs at import, TensorStore when a
  store opens), so this runs on import, before any of them touches a URL.
  """
  environ["EPATH_USE_TF"] = "false"
  host = environ.get(EMULATOR_ENV)
  if host:
    host = host if "://" in host else f"http://{host}"
    environ["TENSORSTORE_GCS_HTTP_URL"] = host
    # TensorStore otherwise looks for Google credentials and logs an error line when none.
    environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "emulator"
    environ["CLOUD_STORAGE_EMULATOR_ENDPOINT"] = host
    environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"


configure()


def is_url(path: epath.PathLike) -> bool:
  """Whether `path` is a URL (`scheme://...`) rather than a local path."""
  return "://" in os.fspath(path)


def path(p: epath.PathLike) -> epath.Path:
  """`p` as an epath.Path (what Orbax and tfds take); StorageError for an unknown scheme."""
  s = os.fspath(p)
  if is_url(s) and not s.startswith(SCHEMES):
    raise StorageError(f"{s}: unsupported URL scheme (supported: {', '.join(SCHEMES)})")
  return epath.Path(s)


def join(base: epath.PathLike, *parts: str) -> str:
  """`base`/part/...: '/' for URLs whatever the OS."""
  base = os.fspath(base)
  if is_url(base):
    return posixpath.join(base.rstrip("/"), *parts)
  return os.path.join(base, *parts)


def absolute(p: epath.PathLike) -> str:
  """A local path made absolute; a URL as given (without a trailing '/')."""
  p = os.fspath(p)
  return p.rstrip("/") if is_url(p) else os.path.abspath(p)


def parent(p: epath.PathLike) -> str:
  """The directory holding `p` (absolute for a local path)."""
  p = absolute(p)
  return posixpath.dirname(p) if is_url(p) else os.path.dirname(p)


def name(p: epath.PathLike) -> str:
  """The last part of `p` ('run' of 'gs://bucket/run/' and of 'runs/run')."""
  return os.path.basename(os.fspath(p).rstrip("/"))


def exists(p: epath.PathLike) -> bool:
  return path(p).exists()


def isdir(p: epath.PathLike) -> bool:
  """For a URL: whether any object lies under `p/`."""
  return path(p).is_dir()


def isfile(p: epath.PathLike) -> bool:
  return path(p).is_file()


def mtime(p: epath.PathLike) -> float:
  """When the file `p` was last written (seconds since the epoch; whole seconds for a URL)."""
  return path(p).stat().mtime if is_url(p) else os.path.getmtime(os.fspath(p))


def mkdir(p: epath.PathLike) -> None:
  """Creates `p` and its parents locally; a no-op for a URL (GCS has no directories)."""
  if not is_url(p):
    os.makedirs(os.fspath(p), exist_ok=True)


def listdir(p: epath.PathLike) -> list[str]:
  """Sorted names directly under `p`; FileNotFoundError when nothing is there."""
  p = path(p)
  if not p.is_dir():
    raise FileNotFoundError(f"{p}: no such directory")
  return sorted(c.name for c in p.iterdir())


def read_bytes(p: epath.PathLike) -> bytes:
  return path(p).read_bytes()


def read_text(p: epath.PathLike) -> str:
  return path(p).read_text(encoding="utf-8")


def write_bytes(p: epath.PathLike, data: bytes) -> None:
  """Writes `p` atomically: a reader sees the old content or `data`, never part of it.

  Local: a temporary file beside `p`, fsynced, then renamed over it; missing parent
  directories are created, as a URL needs none. URL: one object upload, which GCS publishes
  only when complete.
  """
  if is_url(p):
    with path(p).open("wb") as f:
      f.write(data)
    return
  p = os.fspath(p)
  mkdir(os.path.dirname(os.path.abspath(p)))
  tmp = f"{p}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, p)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(p: epath.PathLike, text: str) -> None:
  write_bytes(p, text.encode("utf-8"))


def rename(src: epath.PathLike, dst: epath.PathLike) -> None:
  """Moves `src` to `dst`; FileExistsError if `dst` exists. Copy-then-delete for URLs."""
  path(src).rename(path(dst))


def replace(src: epath.PathLike, dst: epath.PathLike) -> None:
  """Moves `src` to `dst`, overwriting it. Atomic locally; copy-then-delete for URLs."""
  path(src).replace(path(dst))


def remove(p: epath.PathLike, missing_ok: bool = False) -> None:
  """Removes the file `p`."""
  try:
    path(p).unlink()
  except FileNotFoundError:
    if not missing_ok:
      raise


def rmtree(p: epath.PathLike, missing_ok: bool = False) -> None:
  """Removes `p` and everything under it."""
  path(p).rmtree(missing_ok=missing_ok)


def copy(src: epath.PathLike, dst: epath.PathLike) -> int:
  """Copies the file `src` to `dst` (local or URL, either way round), atomically; the bytes."""
  n = 0
  with path(src).open("rb") as fin:
    if is_url(dst):
      with path(dst).open("wb") as fout:
        while chunk := fin.read(_CHUNK):
          fout.write(chunk)
          n += len(chunk)
      return n
    dst = os.fspath(dst)
    tmp = f"{dst}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
      with open(tmp, "wb") as fout:
        while chunk := fin.read(_CHUNK):
          fout.write(chunk)
          n += len(chunk)
      os.replace(tmp, dst)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  return n


def files(p: epath.PathLike) -> list[str]:
  """Relative paths ('/'-separated) of every file under the directory `p`, sorted; [] when
  there is none. One listing request for a URL (`glob('**')` of epath is refused on gs://)."""
  p = os.fspath(p)
  if is_url(p):
    base = absolute(p).removeprefix("gs://") + "/"
    return sorted(f.removeprefix(base) for f in _gcs().find(base) if f.startswith(base))
  out = []
  for root, _, names in os.walk(p):
    out += [os.path.relpath(os.path.join(root, n), p).replace(os.sep, "/") for n in names]
  return sorted(out)


def move(src: epath.PathLike, dst: epath.PathLike) -> None:
  """Moves the file or directory `src` to `dst` (both local, or both URLs).

  Local: one rename, atomic. URL: GCS has no rename: every object is copied (server side),
  then `src` removed; a failure midway leaves `src` complete and part of `dst`.
  """
  if not is_url(src) and not is_url(dst):
    os.rename(os.fspath(src), os.fspath(dst))
    return
  if not (is_url(src) and is_url(dst)):
    raise StorageError(f"cannot move {src} to {dst}: one is local, the other a URL")
  src, dst = absolute(src), absolute(dst)
  if exists(dst):
    raise FileExistsError(f"{dst}: exists; not moving {src} onto it")
  fs = _gcs()
  for rel in files(src):
    fs.cp_file(f"{src}/{rel}", f"{dst}/{rel}")
  if isfile(src):  # a single object
    fs.cp_file(src, dst)
  rmtree(src)


def check_writable(directory: epath.PathLike) -> None:
  """Creates the local `directory` if needed, then writes and removes a probe file in it.

  Raises OSError when it cannot (permission bits alone do not tell: root passes them on a
  read-only mount); for a URL, StorageError when the bucket cannot be reached
  (`check_reachable`) or the probe object cannot be written or removed.
  """
  probe = join(directory, f".write-probe-{secrets.token_hex(4)}")
  if not is_url(directory):
    os.makedirs(os.fspath(directory), exist_ok=True)
    with open(probe, "wb"):
      pass
    os.remove(probe)
    return
  check_reachable(directory)
  try:
    write_bytes(probe, b"")
    remove(probe)
  except Exception as e:  # pylint: disable=broad-except  # gcsfs's HTTP errors are no OSError
    raise StorageError(f"{absolute(directory)}: cannot write to it ({_first_line(e)})") from None


@contextlib.contextmanager
def output_dir(
  out: epath.PathLike, manifest: str, check_replaceable: Callable[[str], None]
) -> Iterator[str]:
  """A local directory to assemble the directory `out` in; put in place at `out` when the block
  ends without error, removed otherwise. A non-empty `out` is first passed to
  `check_replaceable` (which raises when it must stay, e.g. it is no output of the same tool).

  Local `out`: assembled in a sibling `OUT.tmp-*` and renamed into place (an old `out` set aside
  first, removed once the new one is in place): `out` holds the old content or the new, never
  part of either. URL: GCS cannot rename a directory. Assembled in a local temporary directory,
  every file uploaded, the file `manifest` last: a reader treats `out` without `manifest` as
  incomplete. An old `out` loses its `manifest` first, then its other objects.
  """
  out = absolute(out)
  if is_url(out):
    tmp = tempfile.mkdtemp(prefix="medvl-out-")
  else:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.tmp-{secrets.token_hex(4)}"
    os.mkdir(tmp)
  try:
    yield tmp
    if is_url(out):
      _upload_dir(tmp, out, manifest, check_replaceable)
    else:
      install_dir(tmp, out, check_replaceable)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)  # a local `tmp` is gone once installed


def install_dir(tmp: str, out: str, check_replaceable: Callable[[str], None]) -> None:
  """Renames the complete local directory `tmp` (a sibling of `out`) to `out`, as `output_dir`
  says; a missing or empty `out` is replaced at once, an old one put back if the rename fails."""
  if not (os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out))):
    os.replace(tmp, out)  # also replaces an empty directory at `out`, atomically
    return
  check_replaceable(out)
  old = f"{out}.old-{secrets.token_hex(4)}"
  os.rename(out, old)
  try:
    os.rename(tmp, out)
  except OSError:
    os.rename(old, out)
    raise
  shutil.rmtree(old, ignore_errors=True)


def _upload_dir(tmp: str, out: str, manifest: str, check_replaceable) -> None:
  """Uploads the files of the local directory `tmp` to the URL `out`, `manifest` last."""
  if exists(out):  # an object, or objects under `out/`
    check_replaceable(out)
    remove(join(out, manifest), missing_ok=True)  # from here on readers see `out` incomplete
    rmtree(out, missing_ok=True)
  names = files(tmp)
  for rel in sorted(names, key=lambda n: n == manifest):
    copy(os.path.join(tmp, *rel.split("/")), join(out, *rel.split("/")))


class Mirror:
  """A local directory whose files `sync()` copies to `target`, for writers that need a local
  file (TensorBoard event files, torch.save, matplotlib): they write under `local`.

  For a local `target`, `local` is `target` itself and `sync` does nothing. For a URL, each
  `sync` uploads the files whose size or modification time changed since the last one (an
  appended event file is uploaded whole: a GCS object cannot be appended to).
  """

  def __init__(self, target: epath.PathLike):
    self.target = os.fspath(target)
    self._staging = tempfile.mkdtemp(prefix="medvl-mirror-") if is_url(target) else None
    self.local = self._staging or self.target
    mkdir(self.local)
    self._synced: dict[str, tuple[int, int]] = {}

  def sync(self) -> list[str]:
    """Uploads what changed; the relative paths uploaded."""
    if self._staging is None:
      return []
    done = []
    for root, _, files in os.walk(self._staging):
      for name in sorted(files):
        local = os.path.join(root, name)
        rel = os.path.relpath(local, self._staging)
        st = os.stat(local)
        if self._synced.get(rel) != (st.st_size, st.st_mtime_ns):
          copy(local, join(self.target, *rel.split(os.sep)))
          self._synced[rel] = (st.st_size, st.st_mtime_ns)
          done.append(rel)
    return sorted(done)

  def close(self) -> None:
    """A last `sync`, then the staging directory is removed."""
    self.sync()
    if self._staging is not None:
      shutil.rmtree(self._staging, ignore_errors=True)


# Writes conditional on an object's generation, for a workdir lease: create-if-absent and
# replace- or delete-if-unchanged. A generation is an opaque string: GCS's object generation,
# or a local file's inode and modification time.


def generation(p: epath.PathLike) -> str | None:
  """The current generation of the file `p`; None when it does not exist."""
  if is_url(p):
    blob = _blob(p)
    blob = blob.bucket.get_blob(blob.name, retry=None)
    return None if blob is None else str(blob.generation)
  try:
    st = os.stat(os.fspath(p))
  except FileNotFoundError:
    return None
  return f"{st.st_ino}-{st.st_mtime_ns}"


def create_if_absent(p: epath.PathLike, data: bytes) -> str | None:
  """Writes `p` only if it does not exist: its new generation, or None if it existed."""
  return replace_if_generation(p, data, None)


def replace_if_generation(p: epath.PathLike, data: bytes, expected: str | None) -> str | None:
  """Writes `p` only if its generation is `expected` (None: only if `p` does not exist).

  The new generation, or None when `p` had another generation (someone else wrote it).
  """
  if is_url(p):
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

    blob = _blob(p)
    try:
      blob.upload_from_string(data, if_generation_match=int(expected or 0))
    except exceptions.PreconditionFailed:
      return None
    return str(blob.generation)
  with _dir_lock(os.path.dirname(os.path.abspath(os.fspath(p)))):
    if generation(p) != expected:
      return None
    write_bytes(p, data)
    return generation(p)


def delete_if_generation(p: epath.PathLike, expected: str) -> bool:
  """Removes `p` only if its generation is `expected`; whether it did."""
  if is_url(p):
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

    try:
      _blob(p).delete(if_generation_match=int(expected), retry=None)
    except (exceptions.PreconditionFailed, exceptions.NotFound):
      return False
    return True
  with _dir_lock(os.path.dirname(os.path.abspath(os.fspath(p)))):
    if generation(p) != expected:
      return False
    os.remove(os.fspath(p))
    return True


@contextlib.contextmanager
def _dir_lock(directory: str) -> Iterator[None]:
  """An exclusive flock on `directory`: local conditional writes in it are serialised."""
  fd = os.open(directory, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)


def _gcs():
  """The gcsfs file system epath uses for gs:// (fsspec caches one per process)."""
  import fsspec  # pylint: disable=g-import-not-at-top

  return fsspec.filesystem("gs")


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _client():
  from google.cloud import storage  # pylint: disable=g-import-not-at-top

  return storage.Client()


def _blob(p: epath.PathLike):
  bucket, _, name = os.fspath(path(p)).removeprefix("gs://").partition("/")
  return _client().bucket(bucket).blob(name)


def check_reachable(p: epath.PathLike, timeout: float = PROBE_TIMEOUT_S) -> None:
  """Fails in one line within about `timeout` seconds when the bucket of URL `p` cannot be
  used: endpoint unreachable or silent, no credentials, bucket missing. Local paths pass.

  One request without retries, so a bad endpoint is named at start-up rather than after the
  libraries' own retries (minutes) in the middle of a run.
  """
  if not is_url(p):
    return
  url = os.fspath(path(p))
  bucket = url.removeprefix("gs://").split("/", 1)[0]
  endpoint = os.environ.get(EMULATOR_ENV) or "https://storage.googleapis.com"
  try:
    found = _client().lookup_bucket(bucket, timeout=timeout, retry=None)
  except Exception as e:  # pylint: disable=broad-except
    cause = _first_line(e)
    raise StorageError(f"{url}: cannot reach bucket {bucket!r} at {endpoint} ({cause})") from None
  if found is None:
    raise StorageError(f"{url}: bucket {bucket!r} does not exist at {endpoint}")
