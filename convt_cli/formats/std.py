"""stdin and stdout (the reference `-`): a .npy stream, read whole (a pipe cannot seek), written through a spool."""

from __future__ import annotations

import io
import sys
import tempfile

from ..interrupts import Interrupted
from .base import Format, WriteOptions, fix_dtype, is_terminal
from .npy import NPY_MAGIC, NpyStreamWriter, np_load, npy_header, write_npy_header


def read_stdin(ref) -> bytes:
    # a pipe cannot seek: buffer it whole before np.load
    if is_terminal(sys.stdin):  # reading would wait, silently, for a .npy typed in by hand
        ref.fail("stdin is a terminal: redirect a .npy file into it (< x.npy) or pipe one (... | convt ...)")
    data = sys.stdin.buffer.read()
    if not data:
        ref.fail("stdin is empty: expected a .npy stream")
    if not data.startswith(NPY_MAGIC):
        ref.fail(f"stdin is not a .npy stream (it starts with {data[:8]!r})")
    return data


class Std(Format):
    """Not in the sniffing table: io picks it for `-`, whatever the bytes. Its name is the format it carries."""

    name, title = "npy", "stdin/stdout"

    def sniff(self, head):
        return False

    def header(self, ref):
        raise TypeError("stdin has no header to read apart from its data: load it")

    def load(self, ref):
        data = read_stdin(ref)
        npy_header(ref, io.BytesIO(data), len(data))
        return fix_dtype(np_load(ref, io.BytesIO(data)))

    def listing(self, ref):
        a = self.load(ref)
        return [dict(name=None, shape=list(a.shape), dtype=a.dtype.name)]

    def direct_writer(self, ref, shape, dtype, provenance, force, options=WriteOptions()):
        return SpoolWriter(shape, dtype)


class SpoolWriter(NpyStreamWriter):
    """Spooled to an unnamed temporary file and copied to stdout on finish(): a failure half-way must put
    nothing on stdout."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, dtype
        super().__init__()

    def _open(self):
        self._file = tempfile.TemporaryFile(prefix=".convt-")
        write_npy_header(self._file, self.shape, self.dtype)
        self._data_at = self._file.tell()

    def finish(self):
        self._file.seek(0)
        out, started = sys.stdout.buffer, False
        try:
            while block := self._file.read(1 << 20):
                started = True
                out.write(block)
            out.flush()
        except KeyboardInterrupt:
            if started:  # what the reader has is not nothing: say what it is
                raise Interrupted("stdout got the start of the output, a truncated .npy stream") from None
            raise
        self._file.close()
        self._file = None

    def abort(self):
        if self._file is not None:
            self._file.close()  # the spool vanishes; stdout saw nothing
            self._file = None
