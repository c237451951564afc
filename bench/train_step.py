r"""JAX-only train-step throughput of the full-size ConVIRT model (kept for its commands).

  python bench/train_step.py                                   # ResNet-50 + MiniLM shape, fp32
  python bench/train_step.py --text=bert-base --batch=128 --dtype=bfloat16 --steps=20

`bench/step_time.py --model=convirt --impl=jax --steps=5` with the arguments given: the jitted,
donated `step.train_step` on synthetic batches already on the device, compile timed apart,
analytic model FLOPs and the fraction of the measured matmul peak (step_time.py's docstring).
Needs no PyTorch; for the PyTorch peer in the same run, call bench/step_time.py itself.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import step_time  # noqa: E402

if __name__ == "__main__":
  step_time.main(["--model=convirt", "--impl=jax", "--steps=5", *sys.argv[1:]])
