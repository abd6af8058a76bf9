"""What one training step costs on the CPU, with and without two of the package's CPU rules.

* ``autoencoder step``: one step of the default model's autoencoder (encoder, reparameterised code,
  the full softmax over the catalogue, backward, SparseAdam + Adam) on ``--users-per-step`` users of
  ``--items`` items with ``--items-per-user`` items each (the 3M-event log's shape by default), in
  bf16-mixed where the CPU has bf16 units (as ``model.vae.cpu_bf16_above_pairs`` trains it there),
  inside and outside :func:`dmp_dl.core.memory.reuse_freed_blocks` (glibc keeps freed blocks of up
  to 256 MiB for reuse, the rule of every stage after the data stage).
* ``dropout``: forward and backward of torch's ``F.dropout`` against
  :func:`dmp_dl.models.dropout.dropout` on a (256, 20, 256) tensor (SASRec's feed-forward width at a
  batch of 256 sequences of 20), and attention over (256, 2, 20, 32) heads with dropout:
  ``F.scaled_dot_product_attention(dropout_p=0.2)`` against :func:`dmp_dl.models.dropout.attention`.
* ``ranking``: the top 51 of each row of a scoring batch ((838, ``--items``) float32, 27 items a
  row at -inf as seen items are: the evaluation's batch at 20,000 items, cut-offs up to 50) by
  ``torch.topk`` against faiss's heaps (:func:`dmp_dl.metrics.ranking._heap_top`, what the
  metrics use on the CPU); and the full-ranking MRR (:func:`dmp_dl.metrics.ranking._ranks_of_best`) of a
  50M-event log's test batch ((335, ``--scoring-items``) float32) whose scores are half exact zeros,
  as a sparse scorer's are, three held-out items a row, one of them at zero (ties broken by column).
* ``sparse scoring``: a batch of 335 users with 20 items each times pruned item-item weights of
  ``--scoring-items`` items with ``--weights-per-item`` weights a row (the 50M-event log's served
  EASE weights, scored on the CPU with SciPy's sparse product when their dense form does not fit):
  SciPy's product on one thread against :func:`dmp_dl.core.parallel.sparse_product_dense` on the
  process's threads.

Each setting runs in its own child process (the allocator rule is process-wide), the settings
alternating, ``--repeats`` times; the table gives the median of the repeats, each the mean over
``--steps`` steps after 3 warm-up steps::

    python bench/cpu_steps.py --write-results
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import output  # noqa: E402
from common import markdown_table, write_section  # noqa: E402

SETTINGS = ("step", "step+reuse", "dropout", "ranking", "scoring")


def _timed(fn, steps: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def autoencoder_step(args) -> dict:
    import numpy as np
    import scipy.sparse as sp
    import torch

    from dmp_dl.models.autoencoder import UserAutoencoder
    from dmp_dl.models.losses import row_softmax_nll
    from dmp_dl.training.cpu_precision import cpu_has_bf16

    torch.manual_seed(0)
    users, items, per = 4 * args.users_per_step, args.items, args.items_per_user
    rng = np.random.default_rng(0)
    share = 1.0 / np.arange(1, items + 1) ** 0.8
    cols = rng.choice(items, size=users * per, p=share / share.sum())
    rows = sp.csr_matrix((np.ones(len(cols), np.float32), (np.repeat(np.arange(users), per), cols)), shape=(users, items))
    rows.data[:] = 1.0
    net = UserAutoencoder(users, items).attach_rows(rows).train()
    named = dict(net.named_parameters())
    optimisers = [torch.optim.Adam(named.values(), lr=1e-3)]
    if net.encoder.sparse:  # as AutoencoderModule trains it above 10,000 items
        optimisers = [torch.optim.SparseAdam([named.pop("encoder.weight")], lr=1e-3), torch.optim.Adam(named.values(), lr=1e-3)]
    bf16 = cpu_has_bf16()
    batches = [torch.arange(i * args.users_per_step, (i + 1) * args.users_per_step) for i in range(4)]
    count = [0]

    def step() -> None:
        batch = batches[count[0] % 4]
        count[0] += 1
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            offsets, picked, values = net.gather_rows(batch)
            mean, logvar = net.encode(offsets, picked, values, 0.0)
            latent = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
            row = torch.bucketize(torch.arange(len(picked)), offsets, right=True) - 1
            nll = row_softmax_nll(latent, net.item_embedding.weight[:items], net.item_bias[:items], row, picked, values)
            loss = nll / len(batch) + 0.1 * 0.5 * (torch.exp(logvar) + mean.pow(2) - 1.0 - logvar).sum(1).mean()
        for opt in optimisers:
            opt.zero_grad()
        loss.backward()
        for opt in optimisers:
            opt.step()

    if args.child == "step+reuse":
        from dmp_dl.core.memory import reuse_freed_blocks

        with reuse_freed_blocks():
            seconds = _timed(step, args.steps)
    else:
        seconds = _timed(step, args.steps)
    return {"autoencoder step s": seconds, "precision": "bf16-mixed" if bf16 else "32-true"}


def dropout_costs(args) -> dict:
    import torch
    import torch.nn.functional as F

    from dmp_dl.models.dropout import attention, dropout

    x = torch.randn(256, 20, 256, requires_grad=True)
    q, k, v = (torch.randn(256, 2, 20, 32, requires_grad=True) for _ in range(3))
    allowed = torch.ones(20, 20, dtype=torch.bool).tril().expand(256, 1, 20, 20)
    steps = 10 * args.steps
    return {
        "F.dropout ms": 1e3 * _timed(lambda: F.dropout(x, 0.2, True).sum().backward(), steps),
        "byte dropout ms": 1e3 * _timed(lambda: dropout(x, 0.2).sum().backward(), steps),
        "sdpa with dropout ms": 1e3 * _timed(
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=0.2).sum().backward(), steps),
        "attention with byte dropout ms": 1e3 * _timed(lambda: attention(q, k, v, allowed, 0.2, True).sum().backward(), steps),
    }


def ranking_costs(args) -> dict:
    import torch

    from dmp_dl.metrics.ranking import _heap_top, _ranks_of_best

    torch.manual_seed(0)
    scores = torch.randn(838, args.items)
    scores.scatter_(1, torch.randint(0, args.items, (838, 27)), float("-inf"))
    probe = min(51, args.items)
    steps = 10 * args.steps
    sparse = torch.randn(335, args.scoring_items)
    sparse[torch.rand(sparse.shape) < 0.5] = 0.0
    rows = torch.arange(335).repeat_interleave(3)
    cols = torch.randint(0, args.scoring_items, (len(rows),))
    sparse[rows[::3], cols[::3]] = 0.0
    return {"torch.topk ms": 1e3 * _timed(lambda: torch.topk(scores, probe, dim=1, sorted=True), steps),
            "faiss heaps ms": 1e3 * _timed(lambda: _heap_top(scores, probe), steps),
            "mrr ms": 1e3 * _timed(lambda: _ranks_of_best(sparse, rows, cols), args.steps)}


def scoring_costs(args) -> dict:
    import numpy as np
    import scipy.sparse as sp

    from dmp_dl.core.parallel import default_threads, sparse_product_dense

    rng = np.random.default_rng(0)
    n, keep, users, per = args.scoring_items, min(args.weights_per_item, args.scoring_items), 335, 20
    weights = sp.csr_matrix((rng.standard_normal(n * keep).astype(np.float32), rng.integers(0, n, n * keep),
                             np.arange(0, n * keep + 1, keep)), shape=(n, n))
    batches = [sp.csr_matrix((np.ones(users * per, np.float32), rng.integers(0, n, users * per),
                              np.arange(0, users * per + 1, per)), shape=(users, n)) for _ in range(8)]
    count = [0]

    def batch():
        count[0] += 1
        return batches[count[0] % len(batches)]

    threads = default_threads()
    return {"scipy ms": 1e3 * _timed(lambda: (batch() @ weights).toarray(), args.steps),
            "threaded ms": 1e3 * _timed(lambda: sparse_product_dense(batch(), weights, threads), args.steps),
            "threads": threads}


def child(args) -> None:
    result = {"dropout": dropout_costs, "ranking": ranking_costs, "scoring": scoring_costs}.get(
        args.child, autoencoder_step)(args)
    print(json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users-per-step", type=int, default=1024)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--items-per-user", type=int, default=27)
    ap.add_argument("--scoring-items", type=int, default=50_000)
    ap.add_argument("--weights-per-item", type=int, default=671, help="the served EASE weights' width at 50,000 items")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a plumbing check")
    ap.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    output.add_arguments(ap)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    if args.quick:
        args.users_per_step, args.items, args.steps, args.repeats, args.scoring_items = 64, 500, 2, 1, 2_000
    output.use(args, quick=args.quick)
    sizes = ["--users-per-step", str(args.users_per_step), "--items", str(args.items), "--items-per-user",
             str(args.items_per_user), "--steps", str(args.steps), "--scoring-items", str(args.scoring_items),
             "--weights-per-item", str(args.weights_per_item)]
    runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    for _ in range(args.repeats):
        for setting in SETTINGS:
            out = subprocess.run([sys.executable, __file__, "--child", setting, *sizes], capture_output=True, text=True)
            if out.returncode:
                output.fail(f"the {setting} child failed: {out.stderr.strip().splitlines()[-1:]}")
            runs[setting].append(json.loads(out.stdout.strip().splitlines()[-1]))

    def median(setting: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[setting])

    step, reused = median("step", "autoencoder step s"), median("step+reuse", "autoencoder step s")
    table = [
        {"what": f"autoencoder step, {args.users_per_step} users x {args.items:,} items ({runs['step'][0]['precision']})",
         "torch / as it was": f"{step:.3f} s", "the package's rule": f"{reused:.3f} s", "ratio": f"{step / reused:.2f}x"},
    ]
    for what, plain, ours in (("dropout 0.2, (256, 20, 256), forward + backward", "F.dropout ms", "byte dropout ms"),
                              ("attention with dropout 0.2, (256, 2, 20, 32), forward + backward", "sdpa with dropout ms",
                               "attention with byte dropout ms")):
        a, b = median("dropout", plain), median("dropout", ours)
        table.append({"what": what, "torch / as it was": f"{a:.2f} ms", "the package's rule": f"{b:.2f} ms", "ratio": f"{a / b:.2f}x"})
    a, b = median("ranking", "torch.topk ms"), median("ranking", "faiss heaps ms")
    table.append({"what": f"top 51 of (838, {args.items:,}) scores", "torch / as it was": f"{a:.2f} ms",
                  "the package's rule": f"{b:.2f} ms", "ratio": f"{a / b:.2f}x"})
    table.append({"what": f"full-ranking MRR of (335, {args.scoring_items:,}) scores, half at exactly 0",
                  "torch / as it was": "", "the package's rule": f"{median('ranking', 'mrr ms'):.1f} ms", "ratio": ""})
    a, b = median("scoring", "scipy ms"), median("scoring", "threaded ms")
    table.append({"what": f"335 users x {args.scoring_items:,} items, sparse weights ({args.weights_per_item} a row)",
                  "torch / as it was": f"{a:.1f} ms (SciPy, 1 thread)",
                  "the package's rule": f"{b:.1f} ms ({runs['scoring'][0]['threads']} threads)", "ratio": f"{a / b:.2f}x"})
    body = (f"Medians of {args.repeats} alternating child processes, each the mean of {args.steps} steps "
            f"(the dropout rows: {10 * args.steps} calls) after 3 warm-up steps. \"The package's rule\": inside "
            "`reuse_freed_blocks` (autoencoder), `dmp_dl.models.dropout` (dropout, attention), faiss's heaps "
            "(top K) or SciPy's product over row blocks on threads (sparse scoring).\n\n"
            + markdown_table(table))
    write_section("cpu_steps", "Training steps on the CPU (bench/cpu_steps.py)", body, {"runs": runs, "table": table})
    print(body)


if __name__ == "__main__":
    main()
