"""`--compile_only --topology=...`: the train step compiled ahead of time for a TPU slice on this
CPU-only machine (libtpu's compile-only devices), with per-device memory, FLOPs and the HBM
verdict; and its one-line errors."""

import importlib.util
import os
import re

import pytest

from tests.conftest import run_main

needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason="libtpu (setup.py extra 'tpu', also in 'test') is not installed",
)
GIB = r"([0-9.]+) GiB"


def _report(proc) -> dict[str, float]:
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  out = proc.stdout
  m = re.search(
    rf"per device: arguments {GIB} \| outputs {GIB} \(aliased to donated arguments {GIB}\) "
    rf"\| temporaries {GIB} \| code {GIB}",
    out,
  )
  assert m, out
  flops = re.search(r"FLOPs per step: ([0-9.e+]+) \(([0-9.e+]+) per device\)", out)
  peak = re.search(rf"peak per device {GIB} of {GIB} HBM \((\w+), \d+%\): (fits|does not fit)", out)
  assert peak and flops, out
  return dict(
    arguments=float(m[1]),
    temporaries=float(m[4]),
    flops=float(flops[1]),
    flops_per_device=float(flops[2]),
    peak=float(peak[1]),
    hbm=float(peak[2]),
    chip=peak[3],
    verdict=peak[4],
  )


@pytest.mark.slow  # ~40 s of CPU for the TPU compile
@needs_libtpu
def test_tiny_convirt_compiles_for_a_v5e_slice():
  proc = run_main(
    "--config=configs/convirt.py:smoke",
    "--config.batch_size=64",
    "--compile_only",
    "--topology=v5e:2x2",
    timeout=600,  # ~40 s of CPU; minutes of wall time on a shared 2-core machine
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "compile-only: v5e:2x2: 4 x TPU v5 lite, mesh data=4 fsdp=1 model=1" in proc.stdout
  r = _report(proc)
  assert (r["chip"], r["hbm"], r["verdict"]) == ("v5e", 16.0, "fits")
  assert r["flops"] == pytest.approx(4 * r["flops_per_device"], rel=1e-3) and r["flops"] > 1e8
  assert "step 1/" not in proc.stderr  # nothing trained


@pytest.mark.slow  # a CLI process that compiles: ~17 s
def test_unknown_topology_is_one_line():
  proc = run_main("--config=configs/convirt.py:smoke", "--compile_only", "--topology=v9x:2x2")
  assert proc.returncode == 2
  lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "Traceback" not in proc.stderr
  if importlib.util.find_spec("libtpu") is None:
    assert "compiling for a TPU needs libtpu, which is not installed" in lines[0]
  else:
    assert lines[0].startswith("error: --topology='v9x:2x2' is not a TPU topology libtpu knows")
    assert "e.g. v4:2x2x2, v5e:4x4" in lines[0]
  proc = run_main("--config=configs/convirt.py:smoke", "--compile_only", "--topology=v5e")
  assert (
    proc.stderr.strip()
    .splitlines()[-1]
    .startswith("error: --topology='v5e': expected <chip>:<shape> or local")
  )


@pytest.mark.slow
@needs_libtpu
def test_oversized_batch_does_not_fit():
  proc = run_main(
    "--config=configs/convirt.py:smoke",
    "--config.batch_size=262144",
    "--compile_only",
    "--topology=v5e:2x2",
    timeout=900,
  )
  assert proc.returncode == 1, proc.stderr[-3000:]
  r = _report(proc)
  assert r["verdict"] == "does not fit" and r["peak"] > r["hbm"] == 16.0
  assert r["temporaries"] > 16.0
  print(proc.stdout)


@pytest.mark.slow
@needs_libtpu
@pytest.mark.skipif(
  not os.environ.get("MEDVL_FULL_AOT"),
  reason="full-size TPU compiles take 7-28 min on 2 cores (figures in bench/RESULTS.md); "
  "set MEDVL_FULL_AOT=1 to run them",
)
@pytest.mark.parametrize(
  "config, extra",
  [("configs/convirt.py", ("--config.batch_size=4096",)), ("configs/mixed.py", ())],
)
def test_full_size_on_v5e_4x4(config, extra):
  proc = run_main(
    f"--config={config}", *extra, "--compile_only", "--topology=v5e:4x4", timeout=1800
  )
  assert proc.returncode in (0, 1), proc.stderr[-3000:]
  assert "16 x TPU v5 lite" in proc.stdout
  r = _report(proc)
  assert r["arguments"] > 0.01 and r["flops"] > 1e12
  print(proc.stdout)  # the figures in bench/RESULTS.md
