"""The names of the dtypes convt computes in, in the order help and messages list them.

A plain tuple here, apart from the engine's (which imports NumPy), so that `convt --help` can offer them as
--dtype's choices without loading NumPy; a test holds it equal to the engine's list.
"""

DTYPES = ("float16", "bfloat16", "float32", "float64", "int32", "complex64", "complex128")
