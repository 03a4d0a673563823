"""How often `verify` catches, and boxes, one output value off by 1% of max|output|, at several output sizes.

    python benchmarks/verify_detection.py [--sizes 1M,10M] [--seeds 100] [--json results.json]

For each size, a float32 decoder layer (stride 2, 4x4 filters, 32 -> 32 channels, batch 1 unless the image
would be too wide) whose output holds about that many values; per seed: a fresh random position, the value
there moved by 1% of max|output|, and `verify` with that seed and the default 8 probes. Counts the seeds whose
check fails (caught), and those whose failing tiles are exactly the one tile holding the position (boxed);
also the correct output, which must pass in every seed. Sizes above 10M are checked from files, streamed under
`--max-memory 1G`, as the issue's bar asks.
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from convt_cli import conv_transpose  # noqa: E402
from convt_cli.stream import verify_files  # noqa: E402
from convt_cli.verify import verify_conv_transpose  # noqa: E402


def size_of(text: str) -> int:
    units = {"K": 10**3, "M": 10**6, "G": 10**9}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def layer(values: int, rng):
    """(x, w) whose stride-2 output holds about `values` float32 values: side^2 * 4 * 32 per batch element."""
    side = max(4, int(math.sqrt(values / (4 * 32 * 8))))  # 8 batch elements of side x side inputs
    x = rng.standard_normal((8, side, side, 32)).astype(np.float32)
    w = (rng.standard_normal((4, 4, 32, 32)) / 8).astype(np.float32)
    return x, w


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M,10M")
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    results = []
    for text in args.sizes.split(","):
        rng = np.random.default_rng(0)
        x, w = layer(size_of(text), rng)
        y = conv_transpose(x, w, strides=2)
        folder = tempfile.mkdtemp(prefix="convt-detect-")
        streamed = y.size > 10**7
        if streamed:
            np.save(os.path.join(folder, "x.npy"), x)
            np.save(os.path.join(folder, "w.npy"), w)
        caught = boxed = passed = 0
        start = time.perf_counter()
        for seed in range(args.seeds):
            where = tuple(int(rng.integers(n)) for n in y.shape)
            delta = 0.01 * float(np.abs(y).max())
            y[where] += delta
            if streamed:
                np.save(os.path.join(folder, "y.npy"), y)
                report = verify_files(*(os.path.join(folder, n) for n in ("x.npy", "w.npy", "y.npy")), strides=2,
                                      seed=seed, max_memory="1G")
            else:
                report = verify_conv_transpose(x, w, y, strides=2, seed=seed)
            y[where] -= delta
            caught += not report.passed
            tiles = report.failing_tiles
            boxed += len(tiles) == 1 and tiles[0].batch == where[0] and all(
                lo <= p < hi for p, (lo, hi) in zip(where[1:-1], tiles[0].box))
            if seed < 10:  # the correct output, in the first ten seeds
                passed += verify_conv_transpose(x, w, y, strides=2, seed=seed).passed
        row = {"values": int(y.size), "shape": list(y.shape), "seeds": args.seeds, "caught": caught, "boxed": boxed,
               "correct_passed_of_10": passed, "seconds": round(time.perf_counter() - start, 1)}
        results.append(row)
        print(json.dumps(row))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
