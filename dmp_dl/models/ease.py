"""EASE (Steck, WWW 2019): the closed-form item-item model, as a model of its own and as the
shallow path beside a deep one; with ``dropout`` p > 0, its emphasised-denoising form EDLAE (Steck,
NeurIPS 2020, "Autoencoders that don't overfit towards the Identity").

``B = I - P / diag(P)`` with ``P = (X'X + L)^-1`` over the binary user-item matrix X; a user's
scores are ``x_u B`` (zero diagonal: an item never recommends itself). EASE: ``L = l2 I``. EDLAE:
``L = l2 I + p / (1 - p) diagMat(diag(X'X))``, the L2 penalty that dropping each input item with
probability p (the dropped items emphasised in the loss) induces: a popular item's weights are
shrunk in proportion to its frequency. p = 0 is EASE, computed by the same operations. Two exact
ways to get P:

* primal, ``(X'X + L)^-1``: one Cholesky of an (items x items) matrix — O(items^3);
* dual, through the Woodbury identity ``P = (I - X' (XX' + l2 I)^-1 X) / l2`` (EDLAE: the same on
  ``Y = X L^-1/2``, ``P = L^-1/2 (I - Y' (YY' + I)^-1 Y) L^-1/2``): one Cholesky of a (users x users)
  matrix plus a product — O(users^2 items + users^3), far cheaper when a catalogue is wider than its
  user base (few users, many items).

On the CPU the primal form's Cholesky and inverse are LAPACK's, in the Gram matrix's own memory
(:func:`regularised_inverse`); on a GPU, torch's.

B is dense (items x items), so the catalogue size is bounded by memory:
:func:`check_memory` refuses one line before anything is allocated. The served form is sparse:
each item keeps its ``keep_per_item`` largest weights (:func:`prune_rows`), which bounds the
bundle and makes scoring ``x_u B`` a sparse product.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy.linalg import lapack

from dmp_dl.core.errors import ConfigError
from dmp_dl.core.free_memory import host_available_bytes
from dmp_dl.core.parallel import sparse_product_dense

log = logging.getLogger(__name__)

BYTES_F32 = 4
MEMORY_SHARE = 0.8  # of the memory free when a fit starts (``max_memory_gb: auto``)
DEFAULT_BUNDLE_MB = 256.0  # ``model.ease.max_bundle_mb``: the served weights' size in a bundle


def model_device(accelerator: str | None = "auto") -> torch.device:
    """Where the model stage's heavy work runs: CUDA when present and the trainer may use it
    (``trainer.accelerator`` auto / gpu / cuda), else the CPU."""
    wanted = str(accelerator or "auto").lower()
    if wanted in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def available_bytes(device: str | torch.device = "cpu") -> int:
    """Memory free on ``device`` now: CUDA's free memory, or what the host and the memory limits of this
    process's control groups let it take (:func:`~dmp_dl.core.free_memory.host_available_bytes`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return host_available_bytes()


def memory_limit(max_memory_gb: float | str | None, device: str | torch.device = "cpu") -> tuple[int, str]:
    """The bytes an EASE fit may use and where that limit comes from: ``auto`` (or None) is
    :data:`MEMORY_SHARE` of what ``device`` has free now; a number is that many GiB."""
    device = torch.device(device)
    if max_memory_gb in (None, "auto"):
        free = available_bytes(device)
        return int(MEMORY_SHARE * free), (f"{MEMORY_SHARE:.0%} of the {free / 2**30:.1f} GiB free on {device.type} "
                                          "(model.ease.max_memory_gb=auto)")
    return int(float(max_memory_gb) * 2**30), f"model.ease.max_memory_gb={float(max_memory_gb):g}"


def uses_dual(n_users: int, n_items: int) -> bool:
    """Whether EASE is solved in the dual form (module docstring): a catalogue at least twice as wide
    as its user base, where an eigendecomposition of XX' beats a Cholesky of X'X."""
    return n_items >= 2 * n_users


def dense_bytes(n_users: int, n_items: int, device: str | torch.device = "cpu", keep_gram: bool = True) -> int:
    """Peak memory of a fit (float32). Primal form: the Gram matrix kept for an l2 grid
    (``keep_gram``) beside the matrix being inverted — in place on the CPU (one matrix), with its
    factor and the inverse elsewhere (three). Dual form: counted as three (items x items) and two (users x
    users) matrices, a conservative bound (its B is built and pruned in blocks of rows)."""
    if uses_dual(n_users, n_items):
        return BYTES_F32 * (3 * n_items * n_items + 2 * n_users * n_users)
    inverting = 1 if torch.device(device).type == "cpu" else 3  # elsewhere: the matrix, its factor, the inverse
    return BYTES_F32 * n_items * n_items * (inverting + int(keep_gram))


def check_memory(n_users: int, n_items: int, max_memory_gb: float | str | None = "auto",
                 device: str | torch.device = "cpu", keep_gram: bool = True) -> str | None:
    """None when an EASE fit fits in memory (:func:`memory_limit`), else the one-line reason it does
    not; ``keep_gram``: whether the Gram matrix is kept for more than one l2 (:class:`EASESolver`)."""
    need = dense_bytes(n_users, n_items, device, keep_gram)
    limit, source = memory_limit(max_memory_gb, device)
    if need > limit:
        return (f"EASE needs a dense {n_items:,} x {n_items:,} matrix ({need / 2**30:.1f} GiB) "
                f"> {limit / 2**30:.1f} GiB ({source}); raise model.ease.max_memory_gb or use a model without "
                "the item-item path")
    return None


def binary(x: sp.spmatrix) -> sp.csr_matrix:
    """``x``'s nonzero pattern as a float32 CSR of ones: ``x`` itself when it already is one (a run's
    training pairs, :attr:`~dmp_dl.data.datamodule.InteractionDataModule.train_seen`: at 50M events a
    copy would take 0.3 GiB beside EASE's dense matrix), else a new matrix. Not for writing into."""
    if (isinstance(x, sp.csr_matrix) and x.dtype == np.float32 and x.has_canonical_format
            and bool(np.all(x.data == 1.0))):
        return x
    out = sp.csr_matrix(x, dtype=np.float32, copy=True)
    out.data[:] = 1.0
    out.eliminate_zeros()
    return out


def sparse_rows(x: sp.csr_matrix, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A scipy CSR matrix as a torch sparse CSR tensor on ``device``."""
    x = sp.csr_matrix(x)
    with warnings.catch_warnings():  # said once per process, of a layout torch has shipped for years
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(torch.from_numpy(x.indptr.astype(np.int64)),
                                       torch.from_numpy(x.indices.astype(np.int64)),
                                       torch.from_numpy(x.data.astype(np.float32)), size=x.shape, dtype=dtype,
                                       device=device, check_invariants=False)


def rows_times(x: sp.csr_matrix, dense: torch.Tensor) -> torch.Tensor:
    """(B, n) sparse rows ``x`` (scipy CSR, read with their values) times the (n, m) float32
    ``dense`` on its device -> (B, m) float32 there.

    On the CPU each row is a weighted sum of the rows of ``dense`` it names: ``embedding_bag``,
    whose kernel is multi-threaded and vectorised (about 3x ``torch.sparse.mm`` on a CSR tensor at
    20,000 columns); elsewhere the sparse product of the device's library.
    """
    x = sp.csr_matrix(x, dtype=np.float32)
    if dense.device.type != "cpu":
        return torch.sparse.mm(sparse_rows(x, dense.device), dense)
    if x.nnz == 0:
        return torch.zeros(x.shape[0], dense.shape[1], dtype=dense.dtype)
    return F.embedding_bag(torch.from_numpy(x.indices.astype(np.int64)), dense,
                           torch.from_numpy(x.indptr[:-1].astype(np.int64)), mode="sum",
                           per_sample_weights=torch.from_numpy(x.data).to(dense.dtype))


def csr_to_dense(m: sp.csr_matrix, block: int = 1 << 21, out: torch.Tensor | None = None) -> torch.Tensor:
    """(r, c) CSR -> (r, c) float32 dense torch tensor on the CPU: its entries scattered ``block`` at
    a time into a zeroed matrix (or added into ``out``, a contiguous (r, c) float32 CPU tensor) by
    torch's multi-threaded ``index_put_``, repeated entries summed as ``toarray`` sums them. scipy's
    ``toarray`` runs on one thread: 2.5 s against 0.6 s for a 20,000 x 20,000 Gram matrix with 52M
    entries on 2 cores."""
    rows, cols = m.shape
    dense = torch.zeros(rows * cols, dtype=torch.float32) if out is None else out.view(-1)
    indptr = m.indptr.astype(np.int64)
    counts = torch.from_numpy(np.diff(indptr))
    start_row = 0
    while start_row < rows:
        # the rows whose entries start within this block (at least one row, however long)
        end_row = max(int(np.searchsorted(indptr, indptr[start_row] + block, side="right")) - 1, start_row + 1)
        lo, hi = int(indptr[start_row]), int(indptr[end_row])
        if hi > lo:
            flat = torch.repeat_interleave(torch.arange(start_row, end_row, dtype=torch.int64), counts[start_row:end_row],
                                           output_size=hi - lo)
            flat.mul_(cols).add_(torch.from_numpy(m.indices[lo:hi].astype(np.int64)))
            dense.index_put_((flat,), torch.from_numpy(np.asarray(m.data[lo:hi], dtype=np.float32)), accumulate=True)
        start_row = end_row
    return dense.view(rows, cols)


GRAM_PRODUCT_ENTRIES = 1 << 27  # on the CPU, users whose squared lengths sum to more are summed in chunks


def gram_matrix(x: sp.csr_matrix, device: str | torch.device = "cpu", chunk_users: int = 8192,
                product_entries: int = GRAM_PRODUCT_ENTRIES) -> torch.Tensor:
    """X'X, (n_items, n_items) float32 on ``device``, of the (n_users, n_items) matrix ``x``.

    On CUDA a sum over chunks of users (sparse chunk' @ dense chunk); on the CPU sparse products,
    whose cost follows the sum of squared user lengths, not users x items^2, written into the dense
    matrix by :func:`csr_to_dense`: one product per range of users whose squared lengths sum to at
    most ``product_entries`` (a bound on that product's entries: 2^27, about 1 GiB of sparse product
    beside the dense matrix, where one product over 50M events would hold X'X's billions of entries
    at once; a log of a few million events is one range).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return gram_by_user_chunks(x, device, chunk_users)
    x = sp.csr_matrix(x)
    lengths = np.diff(x.indptr).astype(np.int64)
    work = np.cumsum(lengths * lengths)
    gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32)
    start = 0
    while start < x.shape[0]:
        done = work[start - 1] if start else 0
        end = max(int(np.searchsorted(work, done + product_entries, side="right")), start + 1)
        part = x[start:end]
        csr_to_dense(sp.csr_matrix(part.T) @ part, out=gram)  # part' as CSR: the product comes out CSR
        start = end
    return gram


def gram_by_user_chunks(x: sp.csr_matrix, device: torch.device, chunk_users: int = 8192) -> torch.Tensor:
    """X'X as a sum over chunks of ``chunk_users`` users of (sparse chunk' @ dense chunk) on ``device``:
    the CUDA path of :func:`gram_matrix` ((n_items, n_items) float32; exact for 0/1 rows)."""
    n_items = x.shape[1]
    gram = torch.zeros(n_items, n_items, dtype=torch.float32, device=device)
    for start in range(0, x.shape[0], chunk_users):
        part = x[start : start + chunk_users]
        dense = sparse_rows(part, device).to_dense()
        gram.add_(torch.sparse.mm(sparse_rows(part.T.tocsr(), device), dense))  # exact: 0/1 products, float32 sums
        del dense
    return gram


def check_dropout(dropout: float) -> float:
    """``dropout`` as a float when it is a probability in [0, 1), else a ConfigError naming the key."""
    value = float(dropout)
    if not (0.0 <= value < 1.0):
        raise ConfigError(f"model.ease.dropout must be a number in [0, 1) (0: EASE), got {dropout}")
    return value


def penalty(item_counts: torch.Tensor, l2: float, dropout: float = 0.0) -> float | torch.Tensor:
    """The diagonal of L (module docstring): ``l2`` itself for EASE (``dropout`` 0), else the float64
    vector ``l2 + p / (1 - p) * item_counts`` (item_counts: (n_items,), the diagonal of X'X)."""
    if not math.isfinite(l2) or l2 <= 0:
        raise ConfigError(f"model.ease.l2 must be a finite number > 0, got {l2}")
    dropout = check_dropout(dropout)
    if dropout == 0.0:
        return l2
    return l2 + (dropout / (1.0 - dropout)) * item_counts.double()


def item_counts(x: sp.csr_matrix, device: str | torch.device = "cpu") -> torch.Tensor:
    """(n_items,) float64: each item's users in the binary matrix ``x``, the diagonal of X'X."""
    counts = np.bincount(sp.csr_matrix(x).indices, minlength=x.shape[1]).astype(np.float64)
    return torch.as_tensor(counts, device=torch.device(device))


def cholesky_inverse(factor: torch.Tensor) -> torch.Tensor:
    """The inverse of ``factor @ factor.T`` (``factor``: a lower Cholesky factor), in row-major order.

    LAPACK writes the inverse in column-major order; it is exactly symmetric, so its transpose is the
    same matrix laid out by rows. Every product that gathers rows of B (``embedding_bag`` in
    :func:`rows_times`) reads those many times faster than the columns of a column-major matrix
    (512 users of a 2,999-user x 3,615-item log on 2 cores: 0.086 s against 1.91 s)."""
    inverse = torch.cholesky_inverse(factor)
    return inverse if inverse.is_contiguous() else inverse.mT


def mirror_triangle(m: torch.Tensor, upper: bool, block: int = 2048) -> torch.Tensor:
    """Make the square ``m`` symmetric in place from its upper (``upper=True``) or lower triangle,
    ``block`` rows at a time (transposed copies no larger than ``block`` x n). Returns ``m``."""
    n = m.shape[0]
    for r0 in range(0, n, block):
        r1 = min(r0 + block, n)
        if upper:  # rows r0:r1 left of the diagonal block come from columns r0:r1 above it
            m[r0:r1, :r0].copy_(m[:r0, r0:r1].mT)
        else:
            m[:r0, r0:r1].copy_(m[r0:r1, :r0].mT)
        d = m[r0:r1, r0:r1]
        half = d.triu(1) if upper else d.tril(-1)
        d.copy_((d.triu() if upper else d.tril()) + half.mT)
    return m


LAPACK_MAX_ROW_BYTES = 80 * 1024  # above, the inverse is the blocked sweep: see :func:`_inverse_in_place`
SWEEP_BLOCK, SWEEP_ROWS = 512, 1024  # :func:`_sweep_inverse`'s pivot block and row range


def _inverse_in_place(m: torch.Tensor) -> bool:
    """Overwrite the upper triangle and diagonal of the CPU matrix ``m`` ((n, n) float32 or float64,
    C-contiguous, symmetric positive definite; its upper triangle and diagonal read) with its
    inverse's, the strictly lower triangle left as it was; False when the inverse fails or its
    diagonal is not finite and positive. LAPACK (:func:`_lapack_inverse`) while a row takes at most
    ``LAPACK_MAX_ROW_BYTES`` (20,480 float32 or 10,240 float64 columns), the blocked sweep
    (:func:`_sweep_inverse`) above: SciPy's OpenBLAS ``potrf`` with more than one thread crashes
    the process outright from about 26,400 float32 or 15,000 float64 columns (OpenBLAS 0.3.30, a
    2-core AMD EPYC), and how far below that other CPUs' kernels stay is not known."""
    if m.shape[0] * m.element_size() <= LAPACK_MAX_ROW_BYTES:
        return _lapack_inverse(m)
    return _sweep_inverse(m)


def _lapack_inverse(m: torch.Tensor) -> bool:
    """:func:`_inverse_in_place` through LAPACK's Cholesky (``potrf``) and inverse from the factor
    (``potri``) in place.

    One matrix of memory where :func:`torch.linalg.cholesky` and :func:`torch.cholesky_inverse`
    hold three, and SciPy's OpenBLAS: 1.4-1.5x faster than torch's LAPACK at 20,000 items on a
    2-core AMD EPYC."""
    a = m.numpy().T  # the same memory as an (n, n) Fortran-order array: its lower triangle is m's upper
    potrf, potri = (lapack.spotrf, lapack.spotri) if a.dtype == np.float32 else (lapack.dpotrf, lapack.dpotri)
    factor, info = potrf(a, lower=1, clean=0, overwrite_a=1)
    if info != 0 or not np.shares_memory(factor, a):
        return False
    inverse, info = potri(factor, lower=1, overwrite_c=1)
    if info != 0 or not np.shares_memory(inverse, a):
        return False
    diagonal = m.diagonal()
    return bool(torch.isfinite(diagonal).all()) and bool((diagonal > 0).all())


def _sweep_inverse(m: torch.Tensor, block: int | None = None, rows: int | None = None) -> bool:
    """:func:`_inverse_in_place` by the symmetric sweep operator, ``block`` pivots at a time: sweeping
    pivot block K (D = m[K, K], C = m[:, K]) sets m[K, K] = -D^-1, m[K, j] = D^-1 m[K, j] and
    m[i, j] -= C_i D^-1 m[K, j]; after every block m holds -m^-1. The upper triangle is read and
    updated ``rows`` rows at a time (C from the rows above K and the columns right of it), as
    matrix products of torch's BLAS, so the cost is that of a Cholesky and its inverse (n^3
    multiply-adds) and the memory one matrix, two (n, block) panels and an (n, rows) copy of the
    lower halves of the diagonal squares the products also write. Each pivot block is factored and
    inverted in float64, and D^-1 m[K, :] solved with its factor; False when one is not positive
    definite (then the upper triangle is no inverse)."""
    n = m.shape[0]
    block = block or SWEEP_BLOCK
    rows = max((rows or SWEEP_ROWS) // block, 1) * block  # row ranges never split a pivot block
    starts = range(0, n, rows)
    # the row ranges' diagonal squares are updated whole: their strictly lower parts are put back at the end
    lower = [m[r0:r0 + rows, r0:r0 + rows].tril(-1) for r0 in starts]
    swept = True
    for k0 in range(0, n, block):
        k1 = min(k0 + block, n)
        pivot = m[k0:k1, k0:k1]
        factor, info = torch.linalg.cholesky_ex((pivot.triu() + pivot.triu(1).mT).double())
        if int(info) != 0:
            swept = False
            break
        d_inv = torch.cholesky_inverse(factor).to(m.dtype)
        column = torch.empty(n, k1 - k0, dtype=m.dtype)  # C = m[:, K], by symmetry from the upper triangle
        column[:k1] = m[:k1, k0:k1]
        column[k1:] = m[k0:k1, k1:].mT
        # (block, n): D^-1 m[K, :] by solves with the factor, not a product with D^-1: a pivot block can be
        # far worse conditioned than the matrix (a low-rank X'X plus a small l2), and the product then loses it
        row = torch.cholesky_solve(column.mT, factor.to(m.dtype))
        for r0 in starts:
            m[r0:r0 + rows, r0:].addmm_(column[r0:r0 + rows], row[:, r0:], alpha=-1.0)
        m[:k0, k0:k1] = row[:, :k0].mT
        m[k0:k1, k1:] = row[:, k1:]
        pivot.copy_(-d_inv)
        del column, row
    diagonal = m.diagonal()
    swept = swept and bool(torch.isfinite(diagonal).all()) and bool((diagonal < 0).all())
    for r0, part in zip(starts, lower):
        if swept:  # -(-m^-1)
            m[r0:r0 + rows, r0:].neg_()
        square = m[r0:r0 + rows, r0:r0 + rows]
        square.copy_(square.triu() + part)
    return swept


def regularised_inverse(gram: torch.Tensor, l2: float | torch.Tensor, what: str = "X'X + L") -> torch.Tensor:
    """``(gram + diagMat(l2))^-1`` of the symmetric positive semi-definite float32 ``gram`` (modified
    in place, then no longer needed); ``l2`` is a number (``l2 I``: EASE) or an (n_items,) tensor
    (:func:`penalty`). In float64 when float32 is not accurate enough (a factorisation that fails,
    or an inverse that is not finite and positive on its diagonal). Returns float32.

    On the CPU, the inverse in ``gram``'s own memory (:func:`_inverse_in_place`):
    the result is ``gram``, and the peak is that one matrix (three in the float64 fallback). On other
    devices, torch's Cholesky and inverse on the device: the matrix, its factor and the inverse
    (three float32 matrices at the peak; five in the fallback)."""
    diagonal = gram.diagonal().double()  # float32 may round l2 away next to large counts: the fallback adds it again
    gram.diagonal().add_(l2)
    if gram.device.type == "cpu":
        return _cpu_inverse(gram, diagonal, l2, what)
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0 and bool(torch.isfinite(factor.diagonal()).all()):
        inverse = cholesky_inverse(factor)
        del factor
        inverse_diagonal = inverse.diagonal()
        if bool(torch.isfinite(inverse_diagonal).all()) and bool((inverse_diagonal > 0).all()):
            return inverse
        del inverse
    else:
        del factor
    _warn_float64(what, l2)
    precise = gram.double()
    precise.diagonal().copy_(diagonal + l2)
    factor = torch.linalg.cholesky(precise)
    del precise
    return cholesky_inverse(factor).float()


def _penalty_text(l2: float | torch.Tensor) -> str:
    return f"{l2:g}" if not torch.is_tensor(l2) else f"{float(l2.min()):g}..{float(l2.max()):g}"


def _warn_float64(what: str, l2: float | torch.Tensor) -> None:
    log.warning("EASE: %s is too ill-conditioned for float32 (l2=%s); solving it in float64", what, _penalty_text(l2))


def _cpu_inverse(gram: torch.Tensor, diagonal: torch.Tensor, l2: float | torch.Tensor, what: str) -> torch.Tensor:
    """:func:`regularised_inverse` on the CPU, ``gram`` already holding ``diagonal + l2`` on its diagonal."""
    gram = gram if gram.is_contiguous() else gram.contiguous()
    if _inverse_in_place(gram):
        return mirror_triangle(gram, upper=True)
    need, free = 8 * gram.numel(), available_bytes("cpu")
    if need > free:  # a float64 copy that does not fit would get the process killed, not this message
        raise ConfigError(f"EASE: {what} is too ill-conditioned for float32 (l2={_penalty_text(l2)}), and its float64 "
                          f"solve needs {need / 2**30:.1f} GiB more than the {free / 2**30:.1f} GiB free; raise "
                          "model.ease.l2")
    _warn_float64(what, l2)
    # only the upper triangle (and the diagonal) was written: the lower one is still X'X
    precise = mirror_triangle(gram.double(), upper=False)
    precise.diagonal().copy_(diagonal + l2)
    if not _inverse_in_place(precise):
        raise ConfigError(f"EASE: {what} is not positive definite even in float64; raise model.ease.l2")
    return gram.copy_(mirror_triangle(precise, upper=True))


def emphasised_dual(x: sp.csr_matrix, l2: torch.Tensor, device: str | torch.device = "cpu"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dual form's parts for a per-item penalty ``l2`` ((n_items,) float64, :func:`penalty`) on
    the binary ``x`` (n_users, n_items): ``Y = X L^-1/2`` and ``K^-1 Y`` with ``K = YY' + I`` (both
    (n_users, n_items) float32), ``scale = L^-1/2`` (n_items,) and ``diag(P)`` (n_items,), so that
    ``P = diagMat(scale) (I - Y' K^-1 Y) diagMat(scale)`` and a training user u's ``x_u P`` is
    ``(K^-1 Y)_u * scale``. One Cholesky of the (users x users) K, in float64 (K's eigenvalues are
    >= 1; diag(P) is a difference of nearly equal numbers on rare items)."""
    device = torch.device(device)
    scale = l2.to(device=device, dtype=torch.float64).rsqrt()
    y = torch.as_tensor(binary(x).toarray(), dtype=torch.float64, device=device).mul_(scale)
    kernel = y @ y.T
    kernel.diagonal().add_(1.0)
    solved = torch.cholesky_solve(y, torch.linalg.cholesky(kernel))
    del kernel
    diag = (1.0 - (y * solved).sum(0)).mul_(scale.pow(2)).clamp_(min=1e-30)
    return y.float(), solved.float(), scale.float(), diag.float()


def ease_weights(x: sp.csr_matrix, l2: float, device: str | torch.device = "cpu", dropout: float = 0.0) -> torch.Tensor:
    """The dense (n_items, n_items) float32 EASE weights of the binary matrix ``x`` (n_users, n_items),
    on ``device``; EDLAE's with ``dropout`` p > 0 (module docstring).

    Uses the primal or the dual form, whichever is cheaper (module docstring; :func:`uses_dual`, as
    :class:`EASESolver` decides); both are exact.
    """
    x = binary(x)
    n_users, n_items = x.shape
    device = torch.device(device)
    lam = penalty(item_counts(x, device), l2, dropout)
    if not uses_dual(n_users, n_items):
        p = regularised_inverse(gram_matrix(x, device), lam)
    elif torch.is_tensor(lam):
        y, solved, scale, _ = emphasised_dual(x, lam, device)
        p = y.T @ solved  # Y' K^-1 Y
        del y, solved
        p.neg_().diagonal().add_(1.0)
        p.mul_(scale[:, None]).mul_(scale[None, :])
    else:
        dense = torch.as_tensor(x.toarray(), dtype=torch.float32, device=device)  # (n_users, n_items)
        kernel = dense @ dense.T
        kernel.diagonal().add_(l2)
        solved = torch.cholesky_solve(dense, torch.linalg.cholesky(kernel))  # K^-1 X, (n_users, n_items)
        del kernel
        p = dense.T @ solved  # X' K^-1 X
        del dense, solved
        p.neg_().diagonal().add_(1.0)
        p.div_(l2)
    b = p.div_(-p.diagonal())  # in place: B = -P / diag(P), then the zero diagonal
    b.diagonal().zero_()
    return b


PRUNE_BLOCK_BYTES = 128 * 2**20  # rows of B pruned at a time: at 50,000 items 4,096 rows took 0.8 GiB a copy


def prune_rows(b: torch.Tensor, keep_per_item: int) -> sp.csr_matrix:
    """Each row of dense ``b`` (rows, n_cols) reduced to its ``keep_per_item`` largest-magnitude
    weights, as a CSR matrix of the same shape."""
    n_rows, n = b.shape
    keep = min(int(keep_per_item), n)
    if keep >= n:
        out = sp.csr_matrix(b.cpu().numpy())
        out.eliminate_zeros()
        return out
    # every row keeps exactly `keep` distinct columns: the CSR pieces directly (3x faster than from COO at
    # 20,000 items), each block's written into arrays of the final size (lists of int64 pieces and their
    # concatenation took 3x the pruned matrix)
    total = n_rows * keep
    index = np.int32 if max(total, n) < 2**31 else np.int64
    values = np.empty(total, dtype=torch.empty(0, dtype=b.dtype).numpy().dtype)
    columns = np.empty(total, dtype=index)
    step = max(1, min(4096, PRUNE_BLOCK_BYTES // (4 * n)))  # |block| and topk's buffers: a fixed size, not 4,096 rows
    for s in range(0, n_rows, step):
        block = b[s : s + step]
        idx = torch.topk(block.abs(), keep, dim=1, sorted=False).indices  # a set: unsorted is about 2x faster
        at = slice(s * keep, (s + len(block)) * keep)
        columns[at] = idx.cpu().numpy().ravel()
        values[at] = torch.gather(block, 1, idx).cpu().numpy().ravel()
    indptr = np.arange(n_rows + 1, dtype=index) * keep
    out = sp.csr_matrix((values, columns, indptr), shape=(n_rows, n))
    out.sort_indices()
    out.eliminate_zeros()
    return out


def keep_per_item_for(n_items: int, max_bundle_mb: float) -> int:
    """Weights kept per item so the sparse B (8 bytes a weight: value + column) fits ``max_bundle_mb``."""
    return max(1, min(n_items, int(max_bundle_mb * 2**20 / (8 * max(n_items, 1)))))


class ItemItemScorer:
    """Scores ``x_u B`` of users given by their rows (0/1 or weighted), with a sparse B (served form of EASE).

    weights: (n_items, n_items) CSR. ``__call__(rows)`` takes a (B, n_items) sparse matrix of the
    users' items and returns (B, n_items) float32 scores as a torch tensor (on the CPU, or on the
    device given to :meth:`to`).
    """

    def __init__(self, weights: sp.csr_matrix):
        self.weights = sp.csr_matrix(weights, dtype=np.float32)
        self.n_items = self.weights.shape[0]
        self.device = torch.device("cpu")
        self._on_device: torch.Tensor | None = None

    def to(self, device: str | torch.device, form: str | None = None) -> "ItemItemScorer":
        """Score on ``device`` from now on: B as a dense float32 matrix there (a batch of users is
        then one sparse x dense product, multi-threaded on the CPU) when it takes at most a quarter
        of the memory free there; else, on a GPU, as a torch sparse matrix, and on the CPU as it is
        (SciPy's sparse x sparse product over row blocks on every torch thread,
        :func:`dmp_dl.core.parallel.sparse_product_dense`: torch's on the CPU was 2x slower than one
        thread of it at 50,000 items and kept about 30 MiB more memory with every batch).
        ``form``: ``dense``, ``sparse`` (torch's) or ``host`` (SciPy's) to force one. Returns self."""
        device = torch.device(device)
        if form is None:
            fits = BYTES_F32 * self.n_items * self.n_items <= available_bytes(device) // 4
            form = "dense" if fits else ("host" if device.type == "cpu" else "sparse")
        if form == "dense":
            self._on_device = torch.as_tensor(self.weights.toarray(), device=device)
        elif form == "sparse":
            self._on_device = sparse_rows(self.weights, device)
        elif form == "host":
            self._on_device = None
        else:
            raise ValueError(f"form must be dense, sparse, host or None, got {form!r}")
        self.device = device
        return self

    def release(self) -> None:
        """Drop the device copy (scoring goes back to the sparse product on the CPU)."""
        self._on_device, self.device = None, torch.device("cpu")

    def __call__(self, rows: sp.spmatrix, weighted: bool = False) -> torch.Tensor:
        """(B, n_items) scores of the users whose items are ``rows`` ((B, n_items) sparse), read as
        0/1 (which items a user has) or, when ``weighted``, with their values (each item's strength
        in the user's row, :mod:`dmp_dl.data.recency`)."""
        x = sp.csr_matrix(rows, dtype=np.float32) if weighted else binary(rows)
        if self._on_device is None:  # SciPy's product, one block of rows per torch thread
            return torch.from_numpy(sparse_product_dense(x, self.weights, torch.get_num_threads())).to(self.device)
        if self._on_device.layout == torch.strided:
            return rows_times(x, self._on_device)
        out = torch.sparse.mm(sparse_rows(x, self.device), self._on_device)
        return out.to_dense() if out.layout != torch.strided else out


class EASESolver:
    """EASE on one binary matrix for several l2 values (and EDLAE's ``dropout`` values): validation
    scores per value, then the served weights.

    Dual form (more items than users): one eigendecomposition of XX' = V diag(s) V' serves every
    l2: with Z = V'X, ``diag(P) = (1 - sum_k Z_kj^2 / (s_k + l2)) / l2`` and a user's scores on the
    items they do not have are ``-(V_u diag(1 / (s + l2)) Z)_j / diag(P)_j`` (Woodbury), so trying
    an l2 costs a product for the validation users, not a new solve; a dropout > 0 makes the
    penalty differ per item, and each (l2, dropout) then costs one Cholesky of a (users x users)
    matrix (:func:`emphasised_dual`, the last one kept). Primal form: the Gram matrix X'X once,
    then one Cholesky per (l2, dropout) (the last dense B is kept); with ``keep_gram=False`` (one
    value to solve) the Gram matrix is not kept beside its inverse, which then takes its memory.
    Everything runs on ``device``.
    """

    def __init__(self, x: sp.csr_matrix, device: str | torch.device = "cpu", gram=None, keep_gram: bool = True):
        self.x = binary(x)
        self.device = torch.device(device)
        self.gram = gram or gram_matrix  # (x, device) -> X'X; under trainer=ray a sum of the workers' parts
        self.keep_gram = keep_gram  # False: one (l2, dropout) is solved, in the Gram matrix's own memory
        self.n_users, self.n_items = self.x.shape
        self.dual = uses_dual(self.n_users, self.n_items)
        self.counts = item_counts(self.x, self.device)
        self._dense: tuple[tuple[float, float], torch.Tensor] | None = None
        self._emphasised: tuple[tuple[float, float], tuple] | None = None
        self._gram: torch.Tensor | None = None
        if self.dual:
            dense = torch.as_tensor(self.x.toarray(), dtype=torch.float64, device=self.device)
            evals, self.v = torch.linalg.eigh(dense @ dense.T)
            self.evals = evals.clamp(min=0.0)
            self.z = (self.v.T @ dense).float()  # (n_users, n_items)
            self.v = self.v.float()

    def _dual_parts(self, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
        inv = (1.0 / (self.evals + l2)).float()
        diag = (1.0 - (self.z.pow(2) * inv[:, None]).sum(0)) / l2
        return inv, diag.clamp(min=1e-12)

    def _emphasised_parts(self, l2: float, dropout: float) -> tuple:
        """:func:`emphasised_dual` for (l2, dropout), the last one kept."""
        if self._emphasised is None or self._emphasised[0] != (l2, dropout):
            self._emphasised = None
            self._emphasised = ((l2, dropout), emphasised_dual(self.x, penalty(self.counts, l2, dropout), self.device))
        return self._emphasised[1]

    def scores(self, users: np.ndarray, l2: float, dropout: float = 0.0) -> torch.Tensor:
        """(B, n_items) scores of training users ``users`` (their own rows of x) under (l2, dropout), on the device."""
        if not self.dual:
            return rows_times(self.x[users], self.dense(l2, dropout))
        rows = sparse_rows(self.x[users], self.device)
        if check_dropout(dropout) > 0.0:
            _, solved, scale, diag = self._emphasised_parts(l2, dropout)
            return rows.to_dense() - solved[torch.as_tensor(users, device=self.device)] * (scale / diag)
        inv, diag = self._dual_parts(l2)
        solved = (self.v[torch.as_tensor(users, device=self.device)] * inv) @ self.z  # rows of K^-1 X
        return rows.to_dense() - solved / diag

    def dense(self, l2: float, dropout: float = 0.0) -> torch.Tensor:
        """The dense (n_items, n_items) B for (l2, dropout) on the device (primal form; the last one is cached)."""
        if self._dense is None or self._dense[0] != (l2, dropout):
            lam = penalty(self.counts, l2, dropout)
            self._dense = None
            gram = self._gram if self._gram is not None else self.gram(self.x, self.device)
            self._gram = gram if self.keep_gram else None  # not kept: a second value computes it again
            p = regularised_inverse(gram.clone() if self.keep_gram else gram, lam)
            del gram
            b = p.div_(-p.diagonal())
            b.diagonal().zero_()
            self._dense = ((l2, dropout), b)
        return self._dense[1]

    def release(self) -> None:
        """Free the Gram matrix, the cached B and dual parts (what a solver holds on its device)."""
        self._gram = self._dense = self._emphasised = None

    def served(self, l2: float, keep_per_item: int, dropout: float = 0.0, chunk: int = 2048) -> "ItemItemScorer":
        """The pruned weights for (l2, dropout) (:func:`prune_rows`); the dual form builds B ``chunk`` rows at a time."""
        if not self.dual:
            return ItemItemScorer(prune_rows(self.dense(l2, dropout), keep_per_item))
        emphasised = check_dropout(dropout) > 0.0
        if emphasised:
            y, solved, scale, diag = self._emphasised_parts(l2, dropout)
        else:
            inv, diag = self._dual_parts(l2)
            scaled = self.z * inv[:, None]
        blocks = []
        for s in range(0, self.n_items, chunk):
            cols = slice(s, min(s + chunk, self.n_items))
            if emphasised:  # P rows: scale_i (I - Y' K^-1 Y)_ij scale_j, the identity part added below
                p = -(y[:, cols].T @ solved) * scale[cols, None] * scale[None, :]
            else:
                p = -(self.z[:, cols].T @ scaled) / l2  # P rows (identity part added below)
            rows = torch.arange(p.shape[0], device=p.device)
            p[rows, rows + s] += scale[cols].pow(2) if emphasised else 1.0 / l2
            b = p / -diag[None, :]
            b[rows, rows + s] = 0.0
            blocks.append(prune_rows(b, keep_per_item))
        return ItemItemScorer(sp.vstack(blocks).tocsr())


def l2_grid(x: sp.csr_matrix, scales: list[float]) -> list[float]:
    """Candidate l2 values relative to the mean item frequency (the diagonal of X'X), so one grid
    fits logs of any size: the best l2 on MovieLens-sized logs sits near 5 x that mean."""
    base = max(float(binary(x).nnz) / max(x.shape[1], 1), 1.0)
    return sorted({float(round(base * s, 3)) for s in scales})
