"""Shared test set-up: persistent XLA compilation cache, sample-data location."""
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# A persistent compilation cache cuts compile time of repeated tiny models across tests and
# subprocesses; subprocess tests inherit it through the environment.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".pytest_cache" / "jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sample_dir() -> pathlib.Path:
  env = os.environ.get("MEDVL_SAMPLE_DIR")
  return pathlib.Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def sample_data_dir() -> pathlib.Path:
  d = sample_dir()
  if not (d / "covid_cxr_notes" / "pairs.csv").exists():
    pytest.fail(f"sample data not found at {d} (set MEDVL_SAMPLE_DIR)")
  return d
