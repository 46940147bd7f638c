"""What the linearity control costs: `affine_r2` (ridge by generalised cross-validation) beside plain least squares.

    OMP_NUM_THREADS=1 python benchmarks/bench_linearity.py                 # Fashion-MNIST and CIFAR-10 sizes
    python benchmarks/bench_linearity.py --sizes 2000x784x16 --device cuda

For each size ROWSxPIXELSxFEATURES: random pixels in [0, 1), features an exact affine map of them plus a little
noise, 1,000 test rows. Both fits run on the same data in turn, `--repeats` times; prints seconds (the median),
the ratio, both R^2 and the process's peak resident memory so far (CPU only).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from pcvit.controls import affine_r2

SIZES = ("2000x784x16", "50000x3072x48")  # Fashion-MNIST's 2,000-image runs; all of CIFAR-10, 48 top features


def plain_r2(train_x, test_x, train_y, test_y) -> float:
    """Least squares without a ridge (torch.linalg.lstsq), float64: what `affine_r2` replaced."""
    def ones(x):
        return torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64, device=x.device)], 1)

    solution = torch.linalg.lstsq(ones(train_x), train_y.double()).solution
    test = test_y.double()
    residual = (test - ones(test_x) @ solution).square().sum(dim=0)
    return (1 - residual / (test - test.mean(dim=0)).square().sum(dim=0)).mean().item()


def timed(fn, *args, repeats: int) -> tuple[float, float]:
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn(*args)
        if args[0].is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=",".join(SIZES), help="comma-separated ROWSxPIXELSxFEATURES")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    print(f"{'size':>16} {'gcv ridge s':>12} {'lstsq s':>9} {'ratio':>6} {'R^2 ridge':>10} {'R^2 lstsq':>10} "
          f"{'peak RSS GB':>12}")
    for size in args.sizes.split(","):
        rows, pixels, features = (int(n) for n in size.split("x"))
        x = torch.rand(rows + 1000, pixels, generator=generator)
        y = x @ torch.randn(pixels, features, generator=generator) + 0.01 * torch.randn(rows + 1000, features,
                                                                                         generator=generator)
        x, y = x.to(args.device), y.to(args.device)
        data = (x[:rows], x[rows:], y[:rows], y[rows:])
        ridge_s, ridge = timed(affine_r2, *data, repeats=args.repeats)
        plain_s, plain = timed(plain_r2, *data, repeats=args.repeats)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(f"{size:>16} {ridge_s:>12.3g} {plain_s:>9.3g} {ridge_s / plain_s:>6.2f} {ridge:>10.6f} {plain:>10.6f} "
              f"{peak:>12.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
