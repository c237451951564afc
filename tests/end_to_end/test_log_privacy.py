"""No report text and no patient id of the sample in a smoke run's logs or TensorBoard files
(issue 14, acceptance). The leak rules are those of tests/privacy.py: normalised sentences of at
least 20 characters, patient ids in an identifying context or quoted. The DEBUG-level logs of
the killed and resumed runs are checked by tests/end_to_end/test_faults.py (marker `slow`)."""

import pathlib

from tests import privacy


def test_smoke_run_logs_and_tensorboard_hold_no_report_text_or_patient_id(
  smoke_run, sample_data_dir
):
  workdir, proc = smoke_run
  logs = {"stdout": proc.stdout, "stderr": proc.stderr}
  leaks = privacy.check_run(workdir, logs, sample_data_dir)
  assert not leaks, "\n".join(leaks[:20])
  # Not vacuous: the logs and the TensorBoard files were read (the hparams text is there).
  assert "step 30/30" in proc.stderr
  tb = privacy.tensorboard_texts(workdir / "tensorboard")
  assert any("temperature" in t for t in tb) and any(t == "train_loss" for t in tb)


def _write_text_event(logdir: pathlib.Path, tag: str, text: str) -> None:
  from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2
  from tensorboard.summary.writer.event_file_writer import EventFileWriter

  tensor = tensor_pb2.TensorProto(dtype=7, string_val=[text.encode()])  # DT_STRING
  meta = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text")
  )
  value = summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=meta)
  writer = EventFileWriter(str(logdir))
  writer.add_event(event_pb2.Event(step=1, summary=summary_pb2.Summary(value=[value])))
  writer.close()


def test_the_check_finds_planted_text_and_ids(sample_data_dir, tmp_path):
  sentences, ids = privacy.sample_secrets(sample_data_dir)
  assert len(sentences) > 100 and len(ids) > 100 and min(map(len, sentences)) >= 20
  sentence = sorted(sentences, key=len)[len(sentences) // 2]
  # A sentence survives escaping and re-wrapping; an id is found in a logged record.
  line = "W1201 builder.py:1] bad row " + repr({"text": sentence.upper().replace(" ", "\n  ")})
  assert privacy.find_leaks(line, sentences, ids)
  assert privacy.find_leaks("I1201 x.py:9] {'patient_id': '361a', 'view': 'PA'}", [], ids)
  assert privacy.find_leaks("skipping row of patient id 97", [], ids)
  # Step counts and timings are not ids; a 19-character fragment is no sentence.
  clean = "step 97/120 | loss 2.0 | 361 ms | patient count 97 | " + sentence[:19]
  assert not privacy.find_leaks(clean, sentences, ids)
  # The TensorBoard reader sees a text summary's payload.
  (tmp_path / "tensorboard").mkdir()
  _write_text_event(tmp_path / "tensorboard", "notes", f"example: {sentence}")
  assert privacy.check_run(tmp_path, {}, sample_data_dir)
