"""Cost of distill-3d's 3D side against its 2D teacher, and the student's training throughput.

    python benchmarks/distill3d.py            # 10 views of a 100,000-point cloud at 512 x 512
    python benchmarks/distill3d.py --tiny     # seconds, for CI

Times rendering the views (splatting, z-buffer, hole filling, shading) plus back-projecting a
label map of every view onto the points, against one forward pass of the 2D teacher
(``efficientnet_lite0`` extract: preprocess + hypercolumns) over the same views, in the same run;
target: ratio <= 0.25. Then the student's training throughput (shapes/s, 2,048 points per shape)
and the process's peak RSS.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import self_peak_rss_mb, timed  # noqa: E402


def synthetic_cap(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A cap-like cloud with normals: a dome (60% of the points) and a flat visor (40%)."""
    rng = np.random.default_rng(seed)
    m = int(0.6 * n)
    d = rng.normal(size=(m, 3))
    d[:, 1] = np.abs(d[:, 1])
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    dome, dome_n = 0.7 * d, d
    r, a = np.sqrt(rng.random(n - m)) * 0.5, rng.random(n - m) * np.pi
    visor = np.column_stack([0.6 + r * np.sin(a), np.zeros(n - m), r * np.cos(a)])
    visor_n = np.tile([0.0, 1.0, 0.0], (n - m, 1))
    from partkit.pointcloud import normalize

    return normalize(np.vstack([dome, visor]))[0], np.vstack([dome_n, visor_n]).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small sizes, for CI")
    ap.add_argument("--points", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--student-points", type=int, default=2048)
    ap.add_argument("--student-steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    azimuths = (0.0, 72.0, 144.0, 216.0, 288.0)
    if args.tiny:
        args.points, args.size, args.repeats, args.student_points, args.student_steps = 5000, 128, 1, 512, 1
        azimuths = (0.0, 180.0)
    from partkit._log import set_verbosity
    from partkit.distill3d import PointLabels, PointStudent
    from partkit.extract import FeatureExtractor
    from partkit.models import create_backbone
    from partkit.render3d import render_points

    set_verbosity(quiet=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pts, nrm = synthetic_cap(args.points)
    elevations = (30.0, -20.0)
    views = len(elevations) * len(azimuths)
    fx = FeatureExtractor(create_backbone("efficientnet_lite0"), size=args.size, keep_aspect=False, device="cpu")
    num_classes = 8

    def render_and_backproject():
        r = render_points(pts, nrm, elevations=elevations, azimuths=azimuths, size=args.size)
        # a teacher-like label map: 8 vertical bands, confidence 1 (the back-projection cost does not
        # depend on the labels' values)
        band = torch.arange(args.size).div(args.size / num_classes, rounding_mode="floor").long()
        labels = torch.where(r.foreground, band.view(1, 1, -1).expand_as(r.index), torch.full_like(r.index, -1))
        pl = PointLabels.gather(r.index, labels, torch.ones(r.index.shape), len(pts), num_classes)
        return r, pl.targets()

    def teacher_forward(images: np.ndarray):
        with torch.inference_mode():
            x = torch.stack([fx.preprocess(im)[0] for im in images])
            return fx.forward(x)[0]

    render_and_backproject()  # warm-up (lazy allocations)
    r, _ = render_and_backproject()
    images = r.image.numpy()
    teacher_forward(images)
    ours, teacher = [], []
    for _ in range(args.repeats):  # interleaved, so a busy machine slows both alike
        ours.append(timed(render_and_backproject)[0])
        teacher.append(timed(teacher_forward, images)[0])
    t_ours, t_teacher = statistics.median(ours), statistics.median(teacher)
    seen = torch.unique(r.index[r.index >= 0]).numel()
    print(f"distill-3d benchmark: {args.points} points, {views} views at {args.size}x{args.size}, "
          f"splat radius {r.radius} px, {torch.get_num_threads()} threads", flush=True)
    print(f"  render + back-project {1000 * t_ours:7.1f} ms | teacher forward (efficientnet_lite0) "
          f"{1000 * t_teacher:7.1f} ms | ratio {t_ours / t_teacher:.3f} (target <= 0.25); "
          f"{100 * seen / len(pts):.1f}% of points visible", flush=True)

    # Student training throughput, as distill-3d trains it (batches of 8 shapes).
    student = PointStudent(6, num_classes, width=64, depth=3, k=16)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    x = torch.randn(8, args.student_points, 6)
    y = torch.randint(0, num_classes, (8, args.student_points))

    def step():
        loss = torch.nn.functional.cross_entropy(student(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    secs, _ = timed(lambda: [step() for _ in range(args.student_steps)])
    print(f"  student training: {8 * args.student_steps / secs:.1f} shapes/s at {args.student_points} points "
          f"(width 64, depth 3, k 16, batch 8)", flush=True)
    print(f"  peak RSS {self_peak_rss_mb():.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
