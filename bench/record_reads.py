r"""Records/s of the train reads, one at a time vs a host batch in one parallel read.

  python bench/record_reads.py [--batch=32] [--batches=200] [--latency_ms=0,20]

On the bundled sample's paired train copy (prepared into a temporary data dir), random host
batches of `--batch` indices are read
  serial:    one record at a time in the caller's thread (ArrayRecordDataSource[i], the reads
             before RecordStore.read took a batch);
  parallel:  RecordStore.read(batch): one ArrayRecord parallel read per host batch;
from a local file and from a bucket: fake-gcs-server (the test emulator) behind a loopback TCP
proxy that holds each client-to-server chunk for `latency_ms` (a stand-in for GCS's time to
first byte; the emulator itself answers in well under a millisecond). The proxy counts the HTTP
requests. Prints one JSON line per setting; rounds are interleaved, the best of 3 is kept.
"""

import argparse
import asyncio
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class LatencyProxy:
  """A loopback TCP proxy to `target_port` that delays each client chunk by `latency` seconds."""

  def __init__(self, target_port: int):
    self.target_port, self.latency, self.requests = target_port, 0.0, 0
    self.port = _free_port()
    self._loop = asyncio.new_event_loop()
    started = threading.Event()
    threading.Thread(target=self._run, args=(started,), daemon=True).start()
    started.wait()

  def _run(self, started):
    asyncio.set_event_loop(self._loop)
    server = self._loop.run_until_complete(
      asyncio.start_server(self._serve, "127.0.0.1", self.port)
    )
    started.set()
    self._loop.run_until_complete(server.serve_forever())

  async def _serve(self, client_reader, client_writer):
    server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

    async def pump(reader, writer, delay):
      try:
        while data := await reader.read(1 << 16):
          if delay:
            self.requests += data.count(b" HTTP/1.1\r\n")
            if self.latency:
              await asyncio.sleep(self.latency)
          writer.write(data)
          await writer.drain()
      except ConnectionError:
        pass
      finally:
        writer.close()

    await asyncio.gather(
      pump(client_reader, server_writer, True), pump(server_reader, client_writer, False)
    )


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_emulator() -> tuple[subprocess.Popen, str]:
  from tests import conftest_gcs  # pylint: disable=g-import-not-at-top

  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen(
    [str(conftest_gcs._binary()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"]  # pylint: disable=protected-access
    + ["-port", str(port), "-external-url", url, "-log-level", "error"],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  for _ in range(200):
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
      break
    except OSError:
      time.sleep(0.1)
  request = urllib.request.Request(
    f"{url}/storage/v1/b", data=json.dumps({"name": "bench-reads"}).encode(), method="POST"
  )
  request.add_header("Content-Type", "application/json")
  urllib.request.urlopen(request, timeout=5).read()
  return proc, url


def _rates(path: str, batches: list[list[int]], rounds: int = 3) -> dict[str, float]:
  from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top

  from medvl_jax.data import records  # pylint: disable=g-import-not-at-top

  source = array_record_data_source.ArrayRecordDataSource([path])
  store = records.RecordStore([path], len(source))
  reads = {
    "serial": lambda b: [source[i] for i in b],
    "parallel": store.read,
  }
  assert reads["serial"](batches[0]) == reads["parallel"](batches[0])
  best = dict.fromkeys(reads, 0.0)
  for _ in range(rounds):
    for name, read in reads.items():
      start = time.perf_counter()
      n = sum(len(read(b)) for b in batches)
      best[name] = max(best[name], n / (time.perf_counter() - start))
  return best


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--batches", type=int, default=200)
  parser.add_argument("--latency_ms", default="0,20", help="comma-separated, for the bucket")
  args = parser.parse_args()

  import ml_collections  # pylint: disable=g-import-not-at-top

  from medvl_jax import paths  # pylint: disable=g-import-not-at-top
  from medvl_jax.data import records, sources  # pylint: disable=g-import-not-at-top

  data_dir = tempfile.mkdtemp(prefix="record_reads_")
  config = ml_collections.ConfigDict(
    {"data": {"name": "cxr_sample", "builder_config": "paired", "data_dir": data_dir}}
  )
  config.data.sample_dir = ""  # The default: $MEDVL_SAMPLE_DIR, else ../shared/data.
  builder = sources.prepare(config)
  path = records.copy_path(builder, "train")
  n = builder.info.splits["train"].num_examples
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, n, args.batch).tolist() for _ in range(args.batches)]
  size = os.path.getsize(path)
  common = {"batch": args.batch, "records": n, "bytes_per_record": round(size / n)}
  print(json.dumps({"where": "local", **common, **_rates(path, batches)}), flush=True)

  proc, url = _start_emulator()
  try:
    os.environ[paths.EMULATOR_ENV] = url
    paths.configure()
    proxy = LatencyProxy(int(url.rsplit(":", 1)[1]))
    # ArrayRecord's client reads the bucket through the proxy; uploads go straight.
    os.environ["CLOUD_STORAGE_EMULATOR_ENDPOINT"] = f"http://127.0.0.1:{proxy.port}"
    remote = "gs://bench-reads/train.array_record"
    paths.copy(path, remote)
    for latency in (float(x) for x in args.latency_ms.split(",")):
      proxy.latency = latency / 1000
      few = batches[: max(2, args.batches // (1 + int(latency)))]  # Bounded time per setting.
      rates = _rates(remote, few, rounds=1 if latency else 3)
      store = records.RecordStore([remote], n)
      proxy.requests = 0
      for batch in few:
        store.read(batch)
      requests = proxy.requests / (len(few) * args.batch)
      print(
        json.dumps(
          {
            "where": "bucket",
            "latency_ms": latency,
            **common,
            "batches_read": len(few),
            **rates,
            "requests_per_record": round(requests, 2),
          }
        ),
        flush=True,
      )
  finally:
    proc.terminate()


if __name__ == "__main__":
  main()
