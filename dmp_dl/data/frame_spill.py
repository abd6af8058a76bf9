"""A pandas frame held on disk while a step that needs the memory more runs.

:func:`spill_frame` writes each column of a frame with a NumPy dtype, and the codes of each
categorical column, as a ``.npy`` file in a fresh temporary folder
(:class:`~dmp_dl.core.scratch.ScratchFolder`: one a killed run left is removed by the next); :meth:`SpilledFrame.load` reads
them back (``allow_pickle=False``) into a frame equal to the one spilled: same columns in the same
order, dtypes, categories, index and ``attrs``. What has no NumPy form (object or extension columns,
a categorical's categories, an index other than a ``RangeIndex``) stays in memory, held by the
:class:`SpilledFrame`. The clean events frame of a large log is almost all NumPy columns (at 50M
events: 1.8 GiB, of which the categories are about 30 MiB).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dmp_dl.core.scratch import ScratchFolder


@dataclass
class _Column:
    name: object
    file: str | None = None  # the .npy file of the values or, for a categorical, of its codes
    dtype: object = None  # the column's dtype (a categorical's CategoricalDtype holds its categories)
    kept: pd.Series | None = None  # a column without a NumPy form, kept in memory


@dataclass
class SpilledFrame:
    """A frame's columns on disk (:func:`spill_frame`); :meth:`load` rebuilds it, :meth:`remove` deletes
    the files (both may be called more than once)."""

    scratch: ScratchFolder
    n_rows: int
    columns: list[_Column]
    index: pd.Index
    column_index: pd.Index
    attrs: dict = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.scratch.path

    @property
    def nbytes(self) -> int:
        """Bytes on disk."""
        return sum((self.folder / c.file).stat().st_size for c in self.columns if c.file is not None)

    def load(self) -> pd.DataFrame:
        """The frame as it was spilled (its columns read back from disk)."""
        data = {}
        for position, c in enumerate(self.columns):
            if c.kept is not None:
                data[position] = c.kept.array
                continue
            values = np.load(self.folder / c.file, allow_pickle=False)
            if values.shape != (self.n_rows,):
                raise OSError(f"{self.folder / c.file}: {values.shape} values, expected ({self.n_rows},)")
            if isinstance(c.dtype, pd.CategoricalDtype):
                values = pd.Categorical.from_codes(values, dtype=c.dtype, validate=False)
            data[position] = values
        frame = pd.DataFrame(data, index=self.index, copy=False)
        frame.columns = self.column_index
        frame.attrs = dict(self.attrs)
        return frame

    def remove(self) -> None:
        self.scratch.remove()


def spill_frame(frame: pd.DataFrame, directory: str | Path | None = None) -> SpilledFrame:
    """Write ``frame``'s NumPy columns to a new temporary folder under ``directory`` (default: the
    system's temporary folder, ``TMPDIR``). The caller drops its own reference to free the memory.
    Raises OSError (the folder removed) when the disk refuses."""
    scratch = ScratchFolder("frame", directory)
    folder = scratch.path
    columns = []
    try:
        for position in range(frame.shape[1]):
            series = frame.iloc[:, position]
            dtype = series.dtype
            if isinstance(dtype, pd.CategoricalDtype):
                values = series.cat.codes.to_numpy()
            elif isinstance(dtype, np.dtype) and not dtype.hasobject:
                values = series.to_numpy(copy=False)
            else:
                columns.append(_Column(frame.columns[position], kept=series))
                continue
            name = f"{position}.npy"
            np.save(folder / name, values, allow_pickle=False)
            columns.append(_Column(frame.columns[position], file=name, dtype=dtype))
    except BaseException:
        scratch.remove()
        raise
    return SpilledFrame(scratch, len(frame), columns, frame.index, frame.columns, dict(frame.attrs))
