"""What one diagnostic image costs each logger's own call (``deepplain.callbacks.outputs``), beside drawing it.

One 100-layer x 20-sample depth x time image (the size a 100-layer run draws), sent 20 times to each logger after
a warm-up call: TensorBoard, Weights & Biases (offline) and MLflow (a SQLite store), plus the PNG encoding every
logger shares and the copy written into the run folder. Needs the ``wandb`` and ``mlflow`` extras.

    python benchmarks/logger_image_cost.py
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import _util  # noqa: F401  (the repository on sys.path, warnings off)

CALLS = 20


def per_call(fn) -> list[float]:
    times = []
    for step in range(CALLS):
        start = time.perf_counter()
        fn(step)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    import numpy as np
    import wandb
    from deepplain.callbacks import figures, outputs
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    print(f"machine: {_util.machine()}")
    image = figures.depth_time(np.random.default_rng(0).random((100, 20)), [str(i) for i in range(100)],
                               list(range(0, 2000, 100)), "a 100-layer depth x time image")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        loggers = {"TensorBoard": TensorBoardLogger(str(out / "tb")),
                   "W&B (offline)": WandbLogger(save_dir=str(out / "wb"), project="cost", offline=True),
                   "MLflow (SQLite)": MLFlowLogger(experiment_name="cost", tracking_uri=f"sqlite:///{out / 'm.db'}",
                                                   artifact_location=(out / "art").as_uri())}
        png = outputs.png_bytes(image)
        medians = {}
        for name, logger in loggers.items():
            destination = next(d for d in outputs.DESTINATIONS if d.takes(logger))
            destination.image(logger, "warm/up", image, png, 0)  # the tracker's run starts here, not in the timing
            times = per_call(lambda step: destination.image(logger, "saturation/depth_time/max_abs", image, png, step))  # noqa: B023
            medians[name] = statistics.median(times)
            print(f"{name}: median {1000 * statistics.median(times):.1f} ms per image "
                  f"(min {1000 * min(times):.1f}, max {1000 * max(times):.1f}; {CALLS} calls)")
        encode = per_call(lambda step: outputs.png_bytes(image))
        write = per_call(lambda step: (out / f"figure{step}.png").write_bytes(png))
        print(f"shared by every logger: PNG encoding {1000 * statistics.median(encode):.1f} ms, the run folder's copy "
              f"{1000 * statistics.median(write):.2f} ms")
        wandb.finish()
    for name, seconds in medians.items():
        print(f"image_ms_{name.split()[0].lower().replace('&', '')}={1000 * seconds:.1f}")


if __name__ == "__main__":
    main()
