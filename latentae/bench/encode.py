"""End-to-end dataset encoding throughput vs model-only encoding throughput, side by side.

  latentae bench encode                                   # tiny f8c4 VAE, 256 px
  latentae bench encode --config sd-f8c4 --num-images 48 --batch-size 4
  latentae bench encode --vae runs/demo --size 512

End-to-end = image files on disk -> shards on disk (tools/encode.py's pipeline: DataLoader workers
reading + decoding + resizing, the model encoding, fp16 .npy into tar shards), timed from the first
batch requested to the last shard renamed (the VAE load and input listing are reported apart).
Model-only = vae.encode on the same preprocessed images, already in memory as uint8, same batch
size, same thread setting (uint8 -> float conversion and the copy of the moments included).
Model-only runs are interleaved with the end-to-end runs (model, e2e, model, ..., model); the ratio
is median / median. The machine may be shared: the load average is printed with the numbers.
Like `latentae encode` (and every latentae command) it runs with OMP_WAIT_POLICY=PASSIVE (for both
measurements); run with OMP_WAIT_POLICY=ACTIVE to see OpenMP's spinning default.

Images: --images DIR, else /work/shared/data/photos if present, else scikit-image's sample photos;
copied (under new names) until there are --num-images files.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

# (`latentae bench` sets OMP_WAIT_POLICY=PASSIVE before importing this module and torch.)

import torch

from latentae.cli.common import Parser
from latentae.encode import EncodeConfig, encode_dataset, preprocess
from latentae.imageio import decode_image_and_size, list_images
from latentae.io import load_vae, save_vae_safetensors
from latentae.model import build_vae
from latentae.recipe import load_config

SHARED_PHOTOS = Path("/work/shared/data/photos")


def gather_images(src: Path | None, n: int, dst: Path) -> tuple[list[Path], str]:
    dst.mkdir(parents=True)
    if src is None and SHARED_PHOTOS.is_dir() and list_images(SHARED_PHOTOS):
        src = SHARED_PHOTOS
    if src is not None:
        files, where = list_images(src), str(src)
    else:
        import skimage.data
        from PIL import Image

        tmp = dst.parent / "skimage"
        tmp.mkdir()
        files = []
        for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"):
            p = tmp / f"{name}.jpg"
            Image.fromarray(getattr(skimage.data, name)()).save(p, quality=92)
            files.append(p)
        where = "scikit-image sample photos"
    out = []
    for i in range(n):
        f = files[i % len(files)]
        p = dst / f"{i:05d}{f.suffix.lower()}"
        shutil.copyfile(f, p)
        out.append(p)
    return out, where


def model_only(vae, batch: torch.Tensor, n_images: int) -> float:
    """images/s of vae.encode over n_images (in batches of the given one)."""
    reps = max(1, round(n_images / batch.shape[0]))
    with torch.inference_mode():
        vae.encode(batch.float().div(127.5).sub(1.0))  # warm-up (allocator, fast-path caches)
        t = time.perf_counter()
        for _ in range(reps):
            post = vae.encode(batch.float().div(127.5).sub(1.0))
            post.mean.cpu(), post.logvar.cpu()
        return reps * batch.shape[0] / (time.perf_counter() - t)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = Parser(prog=prog, description=__doc__)
    p.add_argument("--config", default="tiny-f8c4", help="model config for a random-weights VAE (path or packaged name)")
    p.add_argument("--vae", help="benchmark this VAE instead (anything latentae reads)")
    p.add_argument("--images", type=Path, help="folder of photos (default: shared photos or skimage)")
    p.add_argument("--num-images", type=int, default=960,
                   help="images per run (default 960: ~25 s on 2 cores for the tiny VAE, so that the "
                        "one-off worker start-up weighs as little as it does on a real dataset)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=1, help="decoding workers (default 1)")
    p.add_argument("--worker-priority", nargs="+", default=[EncodeConfig.worker_priority],
                   choices=["auto", "normal", "low", "idle"],
                   help="scheduling of the decoding workers (default: tools/encode.py's, auto = idle on CPU); "
                        "several values (e.g. idle normal) are run interleaved in each repeat, an A/B in one run")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the model (default: torch's)")
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="end-to-end runs (median reported)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    with tempfile.TemporaryDirectory(prefix="bench_encode_") as tmp:
        tmp = Path(tmp)
        if a.vae:
            vae_path, what = a.vae, a.vae
        else:
            cfg = load_config(a.config).model
            torch.manual_seed(0)
            vae_path = save_vae_safetensors(build_vae(cfg), tmp / "vae.safetensors")
            what = f"{a.config} (random weights)"
        files, where = gather_images(a.images, a.num_images, tmp / "images")
        vae = load_vae(vae_path)
        print(f"VAE {what}; {len(files)} images from {where}; {a.size}px resize+crop, batch {a.batch_size}, "
              f"{a.num_workers} decoding workers (priority {' / '.join(a.worker_priority)}), {torch.get_num_threads()} torch threads, "
              f"{os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f} at start, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")

        ecfg = EncodeConfig(vae=str(vae_path), data=str(tmp / "images"), out="", size=a.size,
                            batch_size=a.batch_size, num_workers=a.num_workers, shard_size=a.shard_size, threads=a.threads)
        tensors = []
        for f in files[: a.batch_size]:
            data = f.read_bytes()
            img, full = decode_image_and_size(data, str(f), min_side=a.size)
            t, _ = preprocess(img, full, ecfg, str(f))
            tensors.append(t)
        batch = torch.stack(tensors)

        # Interleaved (model, e2e, model, e2e, ..., model) so drifting machine load hits both alike;
        # with several --worker-priority values each repeat runs them all, in rotating order.
        models = [model_only(vae, batch, len(files))]
        prios = a.worker_priority
        e2e, pairs, total, first = ({q: [] for q in prios} for _ in range(4))
        for r in range(a.repeats):
            for j in range(len(prios)):
                q = prios[(r + j) % len(prios)]
                out = tmp / f"out{r}-{q}"
                res = encode_dataset(replace(ecfg, out=str(out), worker_priority=q), progress=False)
                assert res.num_encoded == len(files), res
                e2e[q].append(res.num_encoded / res.pipeline_seconds)
                total[q].append(res.num_encoded / res.seconds)
                first[q].append(res.first_batch_seconds)
            models.append(model_only(vae, batch, len(files)))
            for q in prios:  # each end-to-end run against the model-only runs just before and after it
                pairs[q].append(e2e[q][-1] / ((models[-2] + models[-1]) / 2))

    model = statistics.median(models)
    print(f"model-only   {model:8.2f} img/s  median of {', '.join(f'{v:.2f}' for v in models)}")
    for q in prios:
        pipe = statistics.median(e2e[q])
        print(f"end-to-end   {pipe:8.2f} img/s  median of {', '.join(f'{v:.2f}' for v in e2e[q])} "
              f"(workers: {q}); counting VAE load + listing: {statistics.median(total[q]):.2f} img/s; "
              f"first batch after {statistics.median(first[q]):.2f} s (included)")
        print(f"ratio end-to-end / model-only = {pipe / model:.3f} (medians); per run vs its neighbouring "
              f"model-only runs: median {statistics.median(pairs[q]):.3f}, min {min(pairs[q]):.3f} "
              f"[{', '.join(f'{v:.3f}' for v in pairs[q])}]  (target >= 0.9)  [workers: {q}]")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m latentae.bench.encode"))
