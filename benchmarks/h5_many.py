"""Many tiny HDF5 datasets through one `convt run`: the output file's size against h5py writing the same.

    python benchmarks/h5_many.py [--count 3000] [--folder DIR] [--json results.json]

Writes DIR/in.h5 with COUNT datasets /in/dNNNN of shape (1, 4, 4, 2) float32 and w.npy (3, 3, 2, 2), runs
`convt run in.h5:/in/ w.npy --strides 2 -o out.h5:/out/` (one subprocess), then writes the same datasets with
the same attributes into plain.h5 with h5py in one go, and reports both sizes and their ratio (the aim: close to
1; it was 4.3 before convt kept HDF5's string heap and metadata blocks from one item to the next), with the
convt run's wall time per item. DIR defaults to a temporary folder, removed afterwards.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import convt_cmd  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--folder")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    folder = args.folder or tempfile.mkdtemp(prefix="convt-h5many-")
    try:
        rng = np.random.default_rng(0)
        with h5py.File(os.path.join(folder, "in.h5"), "w") as f:
            for i in range(args.count):
                f[f"in/d{i:04d}"] = rng.standard_normal((1, 4, 4, 2)).astype(np.float32)
        np.save(os.path.join(folder, "w.npy"), rng.standard_normal((3, 3, 2, 2)).astype(np.float32))
        import subprocess

        start = time.perf_counter()
        subprocess.run(convt_cmd() + ["run", "in.h5:/in/", "w.npy", "--strides", "2", "-q", "-o", "out.h5:/out/"],
                       cwd=folder, check=True)
        seconds = time.perf_counter() - start
        out, plain = os.path.join(folder, "out.h5"), os.path.join(folder, "plain.h5")
        with h5py.File(out) as src, h5py.File(plain, "w") as dst:
            def copy(name, obj):
                if isinstance(obj, h5py.Dataset):
                    d = dst.create_dataset(name, data=obj[()])
                    for key, value in obj.attrs.items():
                        d.attrs[key] = value

            src.visititems(copy)
        result = {"count": args.count, "convt_bytes": os.path.getsize(out), "h5py_bytes": os.path.getsize(plain),
                  "size_ratio": round(os.path.getsize(out) / os.path.getsize(plain), 3),
                  "convt_seconds": round(seconds, 2), "ms_per_item": round(1000 * seconds / args.count, 2)}
        print(f"{args.count} datasets: convt {result['convt_bytes']:,} bytes, h5py {result['h5py_bytes']:,} bytes, "
              f"ratio {result['size_ratio']}; convt run {seconds:.1f} s ({result['ms_per_item']} ms per item)")
        if args.json_path:
            with open(args.json_path, "w") as f:
                json.dump(result, f, indent=1)
    finally:
        if not args.folder:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
