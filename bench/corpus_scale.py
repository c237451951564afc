r"""A MIMIC-CXR-size corpus on one machine: prepare cost, disk, and one training host's input.

  python bench/corpus_scale.py --records=200000 --hosts=8 --workdir=/tmp/scale/200k \
      [--image_px=128] [--batches=50] [--epochs=20] [--num_workers=2] [--seed=0]

1. Corpus (`<workdir>/manual`): N synthetic images in the MIMIC-CXR-JPG 2.0 layout that
   `data_pipelines.mimic_cxr` reads (`tests/fixtures_layout.py` `mimic_cxr` is the reference):
   the metadata / split / CheXpert CSVs (.csv.gz), `files/pXX/pSUBJECT/sSTUDY/DICOM.jpg` and the
   report `files/pXX/pSUBJECT/sSTUDY.txt`. Images are real sample radiographs (covid_cxr_notes,
   nih14_sample) at a shorter side of `--image_px`, re-encoded as JPEG; reports recombine real
   IU report sections (indication, comparison, findings, impression of different reports).
   Studies per patient are geometric with MIMIC's mean, images per study drawn from
   {1, 2, 3, 4} with MIMIC's mean; the split is by patient with MIMIC's proportions.
2. Prepare: `python -m data_pipelines.prepare mimic_cxr --manual_dir=... --data_dir=...` in a
   subprocess: wall time, CPU time and peak RSS of the prepare process and of its process tree
   (sampled), bytes on disk (allocated blocks) of the prepared data dir (tfds's tfrecord shards
   and the random-access copy of every split, both written by prepare). Opening it as a
   training host does (`sources.prepare`) is timed too, and must write nothing.
3. One host of H (process_index 0), each in a fresh subprocess with the real
   `medvl_jax.data.streams.create_train_iterator` on configs/convirt.py pointed at the corpus
   (batch 32, 224 px crops of a 256 px resize, the ConVIRT chain, MiniLM tokenizer): time to
   the first batch resuming at step 10 and in the middle of the last of `--epochs` epochs, then
   records/s (per wall and per CPU second) and the process's peak RSS over `--batches` more
   batches; and, in a third process, the RSS of what grows with the split (`index_*`).

The workdir keeps the corpus and the prepared data: a rerun with the same --records,
--image_px and --seed measures step 3 only (prepare figures are those of the build, kept in
`<workdir>/corpus_scale.json`). `full_jpeg_ms` is `data_pipelines.imaging.load_png` on one
full-resolution JPEG (3056 x 2544 px, noise added to reach a real file's ~1.5 MB), for projecting
the decode cost that small images do not have. The last line is `key=value` pairs.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import re
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipelines.mimic_cxr.mimic_cxr_dataset_builder import study_dir  # noqa: E402
from tests import fixtures_layout as fl  # noqa: E402  # pylint: disable=g-import-not-at-top
from tests.conftest import sample_dir  # noqa: E402  # pylint: disable=g-import-not-at-top

# MIMIC-CXR-JPG 2.0.0: 377,110 images of 227,827 studies of 65,379 patients; split sizes
# (images) 368,960 train, 2,991 validate, 5,159 test.
IMAGES_PER_STUDY = ((1, 2, 3, 4), (0.43, 0.50, 0.06, 0.01))  # mean 1.65 (MIMIC: 1.655)
STUDIES_PER_PATIENT = 227_827 / 65_379  # geometric with this mean (MIMIC: 3.48)
SPLITS = (("train", 0.978), ("validate", 0.008), ("test", 0.014))
LABEL_CELLS = (("1.0", 0.10), ("0.0", 0.08), ("-1.0", 0.04), ("", 0.78))
NO_FINDINGS = 0.25  # Reports with an IMPRESSION but no FINDINGS section.
META_COLUMNS = (
  "dicom_id",
  "subject_id",
  "study_id",
  "PerformedProcedureStepDescription",
  "ViewPosition",
  "Rows",
  "Columns",
  "StudyDate",
  "StudyTime",
)
MIB = 2**20


def log(msg: str) -> None:
  print(msg, flush=True)


def cpu_seconds(who: int) -> float:
  usage = resource.getrusage(who)
  return usage.ru_utime + usage.ru_stime


def disk_bytes(root: pathlib.Path) -> int:
  """Allocated bytes of every file under root (what `du` counts)."""
  total = 0
  for dirpath, _, files in os.walk(root):
    for f in files:
      try:
        total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
      except OSError:
        pass  # Renamed or removed while walking (a prepare in progress).
  return total


# ----------------------------------------------------------------------------- corpus


@dataclasses.dataclass
class Layout:
  """The corpus's structure: studies (patient index, image count) and each patient's split."""

  study_patient: np.ndarray
  study_images: np.ndarray
  patient_split: np.ndarray


def draw_layout(n: int, rng: np.random.Generator) -> Layout:
  """Images per study and studies per patient drawn with MIMIC's means, exactly n images."""
  values, p = IMAGES_PER_STUDY
  per_study = rng.choice(values, size=n, p=p)
  cum = np.cumsum(per_study)
  studies = int(np.searchsorted(cum, n)) + 1
  per_study = per_study[:studies].copy()
  per_study[-1] -= int(cum[studies - 1]) - n  # The last study ends at image n.
  per_patient = rng.geometric(1 / STUDIES_PER_PATIENT, size=studies)
  patient_of = np.repeat(np.arange(studies), per_patient)[:studies]
  split_p = [q for _, q in SPLITS]
  return Layout(patient_of, per_study, rng.choice(len(SPLITS), size=patient_of[-1] + 1, p=split_p))


def jpeg_pool(n: int, px: int, rng: np.random.Generator) -> list[bytes]:
  """Up to n real sample radiographs, shorter side px, as JPEG bytes (quality 95)."""
  import io  # pylint: disable=g-import-not-at-top

  from PIL import Image  # pylint: disable=g-import-not-at-top

  files = sorted((sample_dir() / "covid_cxr_notes" / "images").glob("*.png"))
  files += sorted((sample_dir() / "nih14_sample" / "images").glob("*.png"))
  pool = []
  for i in rng.permutation(len(files))[: min(n, len(files))]:
    with Image.open(files[i]) as img:
      img = img.convert("L")
      scale = px / min(img.size)
      img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.LANCZOS)
      out = io.BytesIO()
      img.save(out, format="JPEG", quality=95)
      pool.append(out.getvalue())
  return pool


def report(reports: list[dict[str, str]], rng: np.random.Generator) -> str:
  """A MIMIC-format report whose sections come from different real IU reports."""
  pick = [reports[i] for i in rng.integers(0, len(reports), size=4)]
  iu = {
    "indication": pick[0]["indication"],
    "comparison": pick[1]["comparison"],
    "findings": pick[2]["findings"],
    "impression": pick[3]["impression"],
  }
  return fl.mimic_report(iu, findings=rng.random() >= NO_FINDINGS)


def write_corpus(root: pathlib.Path, n: int, px: int, seed: int) -> dict[str, int]:
  """The MIMIC-CXR-JPG + reports tree of n images under root; returns its counts."""
  rng = np.random.default_rng(seed)
  layout = draw_layout(n, rng)
  pool = jpeg_pool(n, px, rng)
  usable = [
    r for r in fl.iu_reports(sample_dir()) if r["findings"].strip() and r["impression"].strip()
  ]
  dicoms = rng.integers(0, 2**32, size=(n, 5))
  pa, lateral = rng.random(n) < 0.4, rng.random(n) < 0.7  # PA else AP, LATERAL else LL.
  cells, cell_p = zip(*LABEL_CELLS)
  labels = rng.choice(len(cells), size=(len(layout.study_images), len(fl.CHEXPERT)), p=cell_p)
  meta, split, chexpert = [], [], []
  image, start, every = 0, time.perf_counter(), max(1, n // 10)
  for study, (patient, count) in enumerate(zip(layout.study_patient, layout.study_images)):
    # Unique 8-digit ids: 131 and 3 are coprime to the ranges they step through.
    subject = str(10_000_000 + (int(patient) * 131) % 90_000_000)
    study_id = str(50_000_000 + study * 3)
    folder = root / study_dir(subject, study_id)
    folder.mkdir(parents=True)
    (folder.parent / f"s{study_id}.txt").write_text(report(usable, rng), encoding="utf-8")
    chexpert.append(
      {"subject_id": subject, "study_id": study_id}
      | {c: cells[v] for c, v in zip(fl.CHEXPERT, labels[study])}
    )
    for k in range(int(count)):
      dicom = "-".join(f"{int(x):08x}" for x in dicoms[image])
      (folder / f"{dicom}.jpg").write_bytes(pool[int(rng.integers(len(pool)))])
      # The first image of a study frontal, the others lateral (as MIMIC's PA + LATERAL pairs).
      frontal = ("AP", "PA")[int(pa[image])]
      view = frontal if k == 0 else ("LL", "LATERAL")[int(lateral[image])]
      cols = (dicom, subject, study_id, "CHEST (PA AND LAT)", view, "3056", "2544", "21800506")
      meta.append(dict(zip(META_COLUMNS, cols + ("213014.531",))))
      split.append(
        {
          "dicom_id": dicom,
          "study_id": study_id,
          "subject_id": subject,
          "split": SPLITS[layout.patient_split[patient]][0],
        }
      )
      image += 1
      if image % every == 0 or image == n:
        rate = image / (time.perf_counter() - start)
        log(f"writing images: {image:,d}/{n:,d} ({rate:,.0f}/s)")
  fl.write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", META_COLUMNS, meta, gz=True)
  fl.write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", list(split[0]), split, gz=True)
  fl.write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", list(chexpert[0]), chexpert, gz=True)
  return {
    "images": n,
    "studies": len(layout.study_images),
    "patients": int(layout.study_patient[-1]) + 1,
  }


def full_jpeg_ms(workdir: pathlib.Path) -> tuple[float, float]:
  """(ms, KiB): load_png at 256 px of one full-resolution radiograph JPEG, best of 5."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from data_pipelines import imaging  # pylint: disable=g-import-not-at-top

  src = sorted((sample_dir() / "covid_cxr_notes" / "images").glob("*.png"))[0]
  with Image.open(src) as img:
    big = np.asarray(img.convert("L").resize((2544, 3056), Image.BICUBIC), np.float32)
  # Film grain: an upscaled image alone compresses to a fraction of a real file's size.
  noisy = big + np.random.default_rng(0).normal(0, 2, big.shape)
  path = workdir / "full_resolution.jpg"
  Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=95)
  times = []
  for _ in range(5):
    start = time.perf_counter()
    imaging.load_png(path, 256)
    times.append(time.perf_counter() - start)
  kib = path.stat().st_size / 1024
  path.unlink()
  return 1000 * min(times), kib


# ----------------------------------------------------------------------------- prepare


def progress_bar(log_path: pathlib.Path) -> str:
  """The latest tfds progress bar in a log ('' if none yet)."""
  with open(log_path, "rb") as f:
    f.seek(max(0, log_path.stat().st_size - 4096))
    tail = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", f.read().decode("utf-8", "replace"))
  bars = [b.strip() for b in re.split(r"[\r\n]", tail) if "...:" in b]  # tqdm: "desc...: n"
  return bars[-1][:100] if bars else ""


def run_watched(cmd: list[str], log_path: pathlib.Path, label: str, watch: pathlib.Path) -> dict:
  """Runs cmd (output to log_path), sampling the RSS and CPU time of it and its process tree
  every 0.2 s (a worker's CPU time is its last sample: the pool workers are not our children)."""
  import psutil  # pylint: disable=g-import-not-at-top

  peak = tree_peak = 0
  cpu: dict[int, float] = {}
  start = last = time.perf_counter()
  with open(log_path, "w") as out:
    proc = psutil.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    while proc.poll() is None:
      rss = tree = 0
      try:
        for p in [proc, *proc.children(recursive=True)]:
          with p.oneshot():
            mem, times = p.memory_info().rss, p.cpu_times()
          rss, tree = rss or mem, tree + mem
          cpu[p.pid] = times.user + times.system
      except psutil.Error:
        pass  # Exiting, or a worker that ended between listing and reading.
      peak, tree_peak = max(peak, rss), max(tree_peak, tree)
      if time.perf_counter() - last >= 30:
        last = time.perf_counter()
        log(
          f"{label}: {last - start:,.0f} s, rss {rss / MIB:,.0f} MiB (tree {tree / MIB:,.0f}), "
          f"data dir {disk_bytes(watch) / MIB:,.0f} MiB; {progress_bar(log_path)}"
        )
      time.sleep(0.2)
  wall = time.perf_counter() - start
  if proc.returncode:
    sys.exit(f"{label} failed (exit {proc.returncode}):\n{log_path.read_text()[-3000:]}")
  return {
    "s": wall,
    "cpu_s": sum(cpu.values()),
    "peak_mib": peak / MIB,
    "tree_peak_mib": tree_peak / MIB,
  }


def prepare(workdir: pathlib.Path, num_workers: int) -> dict:
  cmd = [sys.executable, "-m", "data_pipelines.prepare", "mimic_cxr"]
  cmd += [f"--manual_dir={workdir / 'manual'}", f"--data_dir={workdir / 'tfds'}"]
  cmd += [f"--num_workers={num_workers}"]
  log(f"preparing: {' '.join(cmd[1:])}")
  out = run_watched(cmd, workdir / "prepare.log", "preparing", workdir / "tfds")
  log(f"prepared in {out['s']:,.1f} s (log: {workdir / 'prepare.log'})")
  return out


# ----------------------------------------------------------------------------- one host


def host_config(data_dir: str, batch_size: int):
  """configs/convirt.py (full size) reading the prepared corpus; batch_size 0: the config's."""
  from configs import convirt  # pylint: disable=g-import-not-at-top

  config = convirt.get_config()
  config.data.name, config.data.builder_config = "mimic_cxr", "paired"
  config.data.data_dir = data_dir
  config.data.eval_split = ""  # the training input only (a small corpus may have no validation)
  config.batch_size = batch_size or config.batch_size
  return config


def child_open(args) -> dict:
  """Opens the corpus as a training host does (`sources.prepare`, which only reads): seconds,
  and the files it wrote (none: prepare wrote everything)."""
  from medvl_jax.data import sources  # pylint: disable=g-import-not-at-top

  config = host_config(args.data_dir, args.batch_size)
  before = set(pathlib.Path(args.data_dir).rglob("*"))
  start = time.perf_counter()
  builder = sources.prepare(config)
  seconds = time.perf_counter() - start
  wrote = set(pathlib.Path(args.data_dir).rglob("*")) - before
  splits = {name: info.num_examples for name, info in builder.info.splits.items()}
  return {"s": seconds, "wrote": len(wrote), "splits": splits}


def child_index(args) -> dict:
  """RSS of what grows with the split: a second record store of it (the first one loads the
  libraries) and a second epoch's permutation (the first one starts TensorFlow's kernels)."""
  import psutil  # pylint: disable=g-import-not-at-top

  from medvl_jax.data import mixing, sources, streams  # pylint: disable=g-import-not-at-top

  config = host_config(args.data_dir, args.batch_size)
  (source,) = sources.sources(config)
  rss = [psutil.Process().memory_info().rss]
  for _ in range(2):
    readers = streams.open_readers(config, [source])
    rss.append(psutil.Process().memory_info().rss)
  plan = mixing.Plan(config.seed, config.batch_size, (len(readers[0].store),), (1.0,))
  for epoch in range(2):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    permutation = plan.permutation(0, epoch)
    rss.append(psutil.Process().memory_info().rss)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak  # KiB, its temporaries.
  return {
    "store_mib": (rss[2] - rss[1]) / MIB,
    "permutation_mib": (rss[4] - rss[3]) / MIB,
    "permutation_peak_mib": peak / 1024,
    "permutation_bytes_per_record": permutation.itemsize,
  }


def child_stream(args) -> dict:
  """Time to the first batch from `start_step`, then records/s and peak RSS over K batches."""
  from medvl_jax.data import streams  # pylint: disable=g-import-not-at-top
  from medvl_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  config = host_config(args.data_dir, args.batch_size)
  tokenizer = tokenizer_lib.from_config(config)
  base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  start = time.perf_counter()
  batches = streams.create_train_iterator(
    config, tokenizer, start_step=args.start_step, process_index=0, process_count=args.hosts
  )
  first = next(batches)
  first_s = time.perf_counter() - start
  start, cpu = time.perf_counter(), cpu_seconds(resource.RUSAGE_SELF)
  for _ in range(args.batches):
    next(batches)
  seconds, cpu = time.perf_counter() - start, cpu_seconds(resource.RUSAGE_SELF) - cpu
  batches.close()
  rows = len(first["input_ids"])
  return {
    "first_batch_s": first_s,
    "records_per_s": args.batches * rows / seconds,
    "records_per_cpu_s": args.batches * rows / cpu,  # Less sensitive to a shared machine.
    "rows": rows,
    "rss_base_mib": base,
    "rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  }


def run_child(mode: str, args, **extra) -> dict:
  cmd = [sys.executable, __file__, f"--child={mode}", f"--hosts={args.hosts}"]
  cmd += [f"--data_dir={args.workdir / 'tfds'}", f"--batch_size={args.batch_size}"]
  cmd += [f"--batches={args.batches}"] + [f"--{k}={v}" for k, v in extra.items()]
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  if result.returncode:
    sys.exit(f"{mode} child failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main


def build(args, state_path: pathlib.Path, wanted: dict) -> dict:
  """The corpus and its prepared data: reused if the state file says they match `wanted`."""
  state = json.loads(state_path.read_text()) if state_path.exists() else {}
  if state.get("corpus") != wanted:
    state_path.unlink(missing_ok=True)
    for sub in ("manual", "tfds"):
      shutil.rmtree(args.workdir / sub, ignore_errors=True)
    start = time.perf_counter()
    counts = write_corpus(args.workdir / "manual", args.records, args.image_px, args.seed)
    state = {"corpus": wanted, "counts": counts, "generate_s": time.perf_counter() - start}
    state["manual_mib"] = disk_bytes(args.workdir / "manual") / MIB
    log(f"corpus: {counts} in {state['generate_s']:,.1f} s, {state['manual_mib']:,.0f} MiB")
    state_path.write_text(json.dumps(state, indent=1))
  else:
    log(f"reusing the corpus in {args.workdir / 'manual'} ({state['counts']})")
  if args.prepare_again or "open" not in state:
    shutil.rmtree(args.workdir / "tfds", ignore_errors=True)
    state["prepare"] = prepare(args.workdir, args.num_workers)
    log("opening for training (reads only)")
    state["open"] = run_child("open", args)
    if state["open"]["wrote"]:
      sys.exit(f"a training host wrote {state['open']['wrote']} files into the data dir")
    state["disk_mib"] = disk_bytes(args.workdir / "tfds") / MIB
    state_path.write_text(json.dumps(state, indent=1))
  else:
    log(f"reusing the prepared data in {args.workdir / 'tfds'}")
  return state


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--records", type=int, default=2000, help="images in the corpus")
  parser.add_argument("--hosts", type=int, default=1, help="H: measure process 0 of H")
  parser.add_argument("--workdir", type=pathlib.Path, default=None)
  parser.add_argument("--image_px", type=int, default=128, help="shorter side of the JPEGs")
  parser.add_argument("--batches", type=int, default=50, help="K: batches after the first")
  parser.add_argument("--epochs", type=int, default=20, help="the late resume: its last epoch")
  parser.add_argument("--batch_size", type=int, default=0, help="global; 0: configs/convirt.py")
  parser.add_argument("--num_workers", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--prepare_again", action="store_true", help="prepare a kept corpus again (code changed)"
  )
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  parser.add_argument("--data_dir", default="", help=argparse.SUPPRESS)
  parser.add_argument("--start_step", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    children = {"open": child_open, "index": child_index}
    child = (children | {"stream": child_stream})[args.child]
    print(json.dumps(child(args)))
    return
  if args.workdir is None or args.records < 1 or args.hosts < 1:
    parser.error("--workdir is required; --records and --hosts must be >= 1")
  args.workdir = args.workdir.resolve()
  args.workdir.mkdir(parents=True, exist_ok=True)
  wanted = {"records": args.records, "image_px": args.image_px, "seed": args.seed}
  state = build(args, args.workdir / "corpus_scale.json", wanted)
  ra = state["open"]
  args.batch_size = host_config(str(args.workdir / "tfds"), args.batch_size).batch_size
  steps_per_epoch = max(1, ra["splits"]["train"] // args.batch_size)
  late = int((args.epochs - 0.5) * steps_per_epoch)
  log(f"host 0 of {args.hosts}: resuming at step 10, then at step {late:,d}")
  early, late_run = (run_child("stream", args, start_step=s) for s in (10, late))
  index = run_child("index", args)
  jpeg_ms, jpeg_kib = full_jpeg_ms(args.workdir)
  prepared = state["prepare"]
  fields = {
    "records": args.records,
    "hosts": args.hosts,
    "image_px": args.image_px,
    "prepared": sum(ra["splits"].values()),
    "train_records": ra["splits"]["train"],
    "studies": state["counts"]["studies"],
    "patients": state["counts"]["patients"],
    "generate_s": state["generate_s"],
    "prepare_s": prepared["s"],
    "prepare_cpu_s": prepared["cpu_s"],
    "prepare_peak_mib": prepared["peak_mib"],
    "prepare_tree_peak_mib": prepared["tree_peak_mib"],
    "open_s": ra["s"],
    "manual_mib": state["manual_mib"],
    "disk_mib": state["disk_mib"],
    "rows_per_host": early["rows"],
    "host_base_mib": early["rss_base_mib"],
    "host_rss_mib": max(early["rss_peak_mib"], late_run["rss_peak_mib"]),
    "records_per_s": early["records_per_s"],
    "records_per_cpu_s": early["records_per_cpu_s"],
    "resume_early_s": early["first_batch_s"],
    "resume_late_step": late,
    "resume_late_s": late_run["first_batch_s"],
    "index_store_mib": index["store_mib"],
    "index_permutation_mib": index["permutation_mib"],
    "full_jpeg_ms": jpeg_ms,
    "full_jpeg_kib": jpeg_kib,
  }
  print(" ".join(f"{k}={round(v, 2) if isinstance(v, float) else v}" for k, v in fields.items()))


if __name__ == "__main__":
  main()
