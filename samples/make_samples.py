"""Regenerate the sample arrays (seeded, so the files are always the same bytes): python samples/make_samples.py

input.npy    (2, 8, 8, 16) float32, channels-last (NHWC)
filters.npy  (3, 3, 8, 16) float32, spatial + [out_channels, in_channels]
batch.h5     /inputs/a (2, 8, 8, 16), /inputs/b (1, 8, 8, 16) and /filters/w (3, 3, 8, 16), float32
decoder.safetensors  as PyTorch and JAX users hold theirs, float32: x (2, 16, 8, 8), input.npy as NCHW;
             decoder.0.weight (16, 4, 4, 4), a ConvTranspose2d(16, 16, 4, groups=4) weight [in, out/groups, kh, kw];
             jax.kernel (3, 3, 16, 8), HWIO for lax.conv_transpose (transpose_kernel=False)
"""

import os

import h5py
import numpy as np
from safetensors.numpy import save_file

here = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(20261125)
x = rng.standard_normal((2, 8, 8, 16)).astype(np.float32)
w = (rng.standard_normal((3, 3, 8, 16)) / 12).astype(np.float32)
np.save(os.path.join(here, "input.npy"), x)
np.save(os.path.join(here, "filters.npy"), w)
with h5py.File(os.path.join(here, "batch.h5"), "w") as f:
    f["inputs/a"] = x
    f["inputs/b"] = rng.standard_normal((1, 8, 8, 16)).astype(np.float32)
    f["filters/w"] = w
save_file({"x": np.ascontiguousarray(x.transpose(0, 3, 1, 2)),
           "decoder.0.weight": (rng.standard_normal((16, 4, 4, 4)) / 8).astype(np.float32),
           "jax.kernel": (rng.standard_normal((3, 3, 16, 8)) / 12).astype(np.float32)},
          os.path.join(here, "decoder.safetensors"))
