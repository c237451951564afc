"""config.data.sources resolved, checked and prepared, on the real sample: the checks' one-line
errors, preparing the sample once, the sample directory, split sizes."""

import logging
import os

import pytest

from medvl_jax.data import sources, streams
from medvl_jax.errors import ConfigError, DataError
from tests.data.sample import N_TRAIN, N_VALIDATION, SOURCES, make_config, mix_config
from tests.data_pipelines.test_cxr_sample import _csv, _pick, _write_csv


def test_num_examples(data_dir):
  config = make_config(data_dir)
  counts = [sources.num_examples(config, s) for s in ("train", "validation", "test")]
  assert counts[:2] == [N_TRAIN, N_VALIDATION] and sum(counts) == 297
  with pytest.raises(ConfigError, match="'valid'"):
    sources.num_examples(config, "valid")


def test_prepare_builds_a_missing_sample_once(tmp_path, sample_data_dir, caplog):
  mini = tmp_path / "mini"
  (mini / "covid_cxr_notes" / "images").mkdir(parents=True)
  rows = _pick(_csv(sample_data_dir / "covid_cxr_notes" / "pairs.csv"), "patientid", bad=0)
  for row in rows:
    (mini / "covid_cxr_notes" / row["image_file"]).write_bytes(
      (sample_data_dir / "covid_cxr_notes" / row["image_file"]).read_bytes()
    )
  _write_csv(mini / "covid_cxr_notes" / "pairs.csv", list(rows[0]), rows)
  config = make_config(tmp_path / "tfds", **{"data.sample_dir": str(mini)})
  caplog.set_level(logging.INFO)
  assert sources.prepare(config).is_prepared()
  assert sum(1 for r in caplog.records if r.getMessage().startswith("Preparing cxr_sample")) == 1
  assert sources.num_examples(config, "train") == 1


def test_missing_sample_dir_names_both_places(tmp_path, monkeypatch):
  config = make_config(tmp_path / "tfds", **{"data.sample_dir": "/nonexistent/medvl"})
  with pytest.raises(DataError) as error:
    sources.prepare(config)
  assert "/nonexistent/medvl" in str(error.value)
  assert str(sources.DEFAULT_SAMPLE_DIR) in str(error.value)
  monkeypatch.setenv("MEDVL_SAMPLE_DIR", "/nonexistent/from_env")
  monkeypatch.setattr(sources, "DEFAULT_SAMPLE_DIR", tmp_path / "no_default")
  with pytest.raises(DataError) as error:
    sources.prepare(make_config(tmp_path / "tfds"))
  assert "/nonexistent/from_env" in str(error.value)
  assert str(tmp_path / "no_default") in str(error.value)


def test_config_errors_name_the_key(data_dir, tokenizer):
  with pytest.raises(ConfigError, match=r"config.data.name='mimic'.*cxr_sample"):
    streams.create_train_iterator(make_config(data_dir, **{"data.name": "mimic"}), tokenizer)
  with pytest.raises(ConfigError, match=r"builder_config='nope'.*paired, text_only"):
    sources.prepare(make_config(data_dir, **{"data.builder_config": "nope"}))
  with pytest.raises(ConfigError, match=r"kind 'paired' cannot be served by cxr_sample/text_only"):
    streams.create_train_iterator(
      make_config(data_dir, **{"data.builder_config": "text_only"}), tokenizer
    )


def test_source_checks_one_line_each(data_dir):
  def check(**entry):
    config = make_config(data_dir)
    config.data.sources = (dict(SOURCES[0], **entry),)
    sources.check_sources(config)

  with pytest.raises(ConfigError, match=r"sources\[0\].name='mimic' is not a known dataset"):
    check(name="mimic")
  with pytest.raises(ConfigError, match=r"sources\[0\].weight=0.0 must be > 0"):
    check(weight=0.0)
  with pytest.raises(
    ConfigError,
    match=r"sources\[0\]: kind 'text' cannot be served by "
    r"cxr_sample/image_only .* it serves: image",
  ):
    check(builder_config="image_only", kind="text")
  with pytest.raises(ConfigError, match=r"sources\[0\].kind='audio' is unknown"):
    check(kind="audio")
  with pytest.raises(ConfigError, match=r"sources\[0\]: split 'valid' not in"):
    check(split="valid")
  with pytest.raises(ConfigError, match=r"sources\[0\].augment='heavy' is unknown"):
    check(augment="heavy")
  with pytest.raises(ConfigError, match=r"each source needs >= 1 row per batch"):
    config = mix_config(data_dir)
    config.data.sources = (SOURCES[0], dict(SOURCES[2], weight=0.01))
    sources.check_sources(config)
  # An empty split (tfds writes no empty split; an empty slice of one is the same case).
  with pytest.raises(
    DataError,
    match=r"sources\[0\]: split 'train\[:0\]' of "
    r"cxr_sample/paired is empty",
  ):
    check(split="train[:0]")
  # A slice is read as such: 'train[:10]' is the first 10 records of train, in file order.
  config = make_config(data_dir)
  config.data.sources = (dict(SOURCES[0], split="train[5:15]"),)
  (reader,) = streams.open_readers(config, sources.sources(config))
  (whole,) = streams.open_readers(make_config(data_dir), sources.sources(make_config(data_dir)))
  assert len(reader.store) == 10 and reader.store.read([0, 9]) == whole.store.read([5, 14])


def test_several_hosts_never_prepare_the_sample(tmp_path, sample_data_dir):
  """On several hosts the bundled sample is not built on first use (each host would write it):
  one line with the prepare command, and nothing written."""
  data_dir = tmp_path / "tfds"
  config = make_config(data_dir, **{"data.sample_dir": str(sample_data_dir)})
  with pytest.raises(DataError) as error:
    sources.prepare(config, process_count=2)
  assert "\n" not in str(error.value)
  assert str(error.value).endswith(
    "dataset cxr_sample/paired (config.data) is not prepared; prepare it once, on one machine: "
    f"python -m data_pipelines.prepare cxr_sample --config=paired --manual_dir={sample_data_dir} "
    f"--data_dir={data_dir}"
  )
  assert not data_dir.exists()


def test_an_unprepared_corpus_is_refused_with_the_prepare_command(tmp_path):
  config = make_config(tmp_path, **{"data.name": "mimic_cxr", "data.builder_config": "paired_64"})
  command = (
    "python -m data_pipelines.prepare mimic_cxr --config=paired --image_size=64 "
    f"--manual_dir=DIR --data_dir={tmp_path}"
  )
  for check in (sources.check_sources, sources.prepare):
    with pytest.raises(DataError) as error:
      check(config)
    assert str(error.value) == (
      f"{tmp_path}/mimic_cxr/paired_64/1.0.0: dataset mimic_cxr/paired_64 (config.data) is not "
      f"prepared; prepare it once, on one machine: {command}"
    )
  assert os.listdir(tmp_path) == []
