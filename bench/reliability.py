"""Reliability figures for bench/RESULTS.md: the bad-input corpus, a killed-and-resumed training run,
and the real-time journal under concurrent posts, erasures, reloads and a killed server.

``--part inputs`` runs two parts of the test suite and records what they measured (the tests fail,
and so does this script, if a property breaks):

* ``tests/test_bad_inputs.py``: how many malformed files and bad requests were tried (hand-written
  cases and hypothesis-generated ones), all ending in a clear error or a counted drop;
* the slow test of ``tests/test_crash_safety.py``: ``train.py`` on small synthetic data, SIGKILLed
  mid-epoch, resumed with ``ckpt_path=last``, against an uninterrupted run of the same config.

``--part journal`` (section ``reliability_journal``): a ``serve.py`` over a small synthetic bundle
takes ``POST /events`` from concurrent clients (their own event ids, events without id or time,
the same content under new ids, and whole batches resent), while in one scenario users (known
and new) are erased with ``POST /erase`` and the bundle is reloaded with ``POST /reload``; then the
server is SIGKILLed and started again. Every event acknowledged for a user who was not erased must
be in the journal exactly once and replayed by the restart, and no event of an erased user may be
(:func:`journal_scenario`); the script fails otherwise.

Serving under load and hot-swap errors are ``bench/load.py``'s section.

    python bench/reliability.py                      # both parts: a few minutes on 2 cores
    python bench/reliability.py --part journal       # the journal scenarios only (~2 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import output  # noqa: E402
from common import ROOT, command, compose_train_cfg, machine, markdown_table, write_section

TOKEN = "reliability-journal-token"


def pytest(args: list[str], env: dict[str, str]) -> int:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          env={**os.environ, **env}, text=True)
    return proc.returncode


def inputs_part() -> int:
    with tempfile.TemporaryDirectory(prefix="dmp-reliability-") as tmp:
        bad, resume = Path(tmp) / "bad_inputs.json", Path(tmp) / "resume.json"
        bad_rc = pytest(["tests/test_bad_inputs.py"], {"DMP_BAD_INPUTS_REPORT": str(bad)})
        resume_rc = pytest(["-m", "slow", "tests/test_crash_safety.py", "-k", "quality"], {"DMP_RESUME_REPORT": str(resume)})
        counts = json.loads(bad.read_text()) if bad.exists() else {}
        figures = json.loads(resume.read_text()) if resume.exists() else {}
    rows = []
    for name in ("uninterrupted", "resumed"):
        ranking = figures.get(name, {})
        rows.append({"run": name, "two_tower recall@20": ranking.get("two_tower", {}).get("recall@20"),
                     "two_tower ndcg@20": ranking.get("two_tower", {}).get("ndcg@20"),
                     "popularity recall@20": ranking.get("popularity", {}).get("recall@20")})
    killed, end = figures.get("killed_at", {}), figures.get("end", {})
    body = (
        f"**Bad inputs tried: {counts.get('total', '?')}** — {counts.get('loader_cases', '?')} hand-written loader cases, "
        f"{counts.get('loader_generated', '?')} generated files/frames, {counts.get('http_cases', '?')} hand-written "
        f"HTTP requests, {counts.get('http_generated', '?')} generated requests; "
        f"{'all ended in a clear error or a counted drop (0 unhandled exceptions, 0 HTTP 5xx)' if bad_rc == 0 else 'FAILED: see the pytest output'}.\n\n"
        f"**Resume after SIGKILL** (`train.py`, 400 users × 150 items × 12k synthetic events, 6 epochs, batch 256, "
        f"`last.ckpt` every 6 steps): killed at global step {killed.get('global_step', '?')} "
        f"({killed.get('batches_into_epoch', '?')} batches into the first epoch), resumed with `ckpt_path=last` to "
        f"{end.get('epochs_completed', '?')} epochs / step {end.get('global_step', '?')} "
        f"({'passed' if resume_rc == 0 else 'FAILED'}: continued from the checkpoint's step, same step count, "
        f"test metrics within 0.05 of the uninterrupted run):\n\n"
        f"{markdown_table(rows, floatfmt='.4f')}"
    )
    write_section("reliability", "Reliability: bad inputs and resume after SIGKILL (bench/reliability.py)", body,
                  {"bad_inputs": counts, "resume": figures, "pytest_exit": {"bad_inputs": bad_rc, "resume": resume_rc},
                   "machine": machine(), "command": command()})
    return 0 if bad_rc == 0 and resume_rc == 0 else 1



# -- the real-time journal with erasures, reloads and a killed server -----------------------------
def train_bundle(work: Path) -> Path:
    """A small synthetic bundle (the default model, short training: what is measured is bookkeeping)."""
    from dmp_dl.pipeline.run import run

    cfg = compose_train_cfg(["data.source.n_users=600", "data.source.n_items=200", "data.source.n_events=15000",
                             "trainer.max_epochs=1", "++model.vae.max_epochs=2", "logger=none", "evaluation.report=null",
                             "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                             "propensity.enabled=false", f"privacy.erasure_list={work / 'erased.txt'}",
                             f"privacy.audit_log={work / 'audit.jsonl'}"], work / "run")
    return Path(run(cfg)["bundle_dir"])


def own_copy(bundle: Path, folder: Path) -> Path:
    """A copy of ``bundle`` in ``folder`` whose erasure list and audit log are ``folder``'s own."""
    from dmp_dl.store.bundle import MANIFEST, write_manifest

    art = Path(shutil.copytree(bundle, folder / "artifacts"))
    manifest = json.loads((art / MANIFEST).read_text())
    manifest["privacy"].update(erasure_list=str(folder / "erased.txt"), audit_log=str(folder / "audit.jsonl"))
    write_manifest(art, manifest)
    return art


class Clients:
    """``n`` client threads posting single-user batches to ``base``: their own event ids, events
    without id or time (a resend of the same content is a duplicate), the same content under new
    ids, and whole batches sent again. Counts what was acknowledged per user."""

    def __init__(self, base: str, users: list[str], items: list[str], t0: int, n: int, batches: int, seed: int = 0):
        self.base, self.users, self.items, self.t0 = base, users, items, t0
        self.plans = [self._plan(np.random.default_rng(seed + c), c, batches) for c in range(n)]
        self.lock = threading.Lock()
        self.accepted: Counter = Counter()
        self.rejected: Counter = Counter()
        self.sent = 0
        self.failures: list[str] = []

    def _plan(self, rng, client: int, batches: int) -> list[dict]:
        plan = []
        for b in range(batches):
            if plan and rng.random() < 0.2:  # a batch the client is unsure about, sent again
                plan.append(plan[int(rng.integers(len(plan)))])
                continue
            user = self.users[int(rng.integers(len(self.users)))]
            events = []
            for k in range(int(rng.choice([1, 4, 16, 80]))):
                item = self.items[int(rng.integers(len(self.items)))]
                kind = rng.integers(3)
                if kind == 0:
                    events.append({"user_id": user, "item_id": item, "event_type": "view", "event_id": f"c{client}-{b}-{k}",
                                   "timestamp": self.t0 + int(rng.integers(3600))})
                elif kind == 1:  # no id, no time: the content is the key
                    events.append({"user_id": user, "item_id": self.items[k % 7], "event_type": "click"})
                else:  # the same content under a new id: another event
                    events.append({"user_id": user, "item_id": self.items[0], "event_type": "view", "timestamp": self.t0,
                                   "event_id": f"c{client}-{b}-{k}"})
            plan.append({"user": user, "events": events})
        return plan

    def run(self) -> None:
        threads = [threading.Thread(target=self._post, args=(plan,)) for plan in self.plans]
        for th in threads:
            th.start()
        for th in threads:
            th.join()

    def _post(self, plan: list[dict]) -> None:
        import httpx

        with httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as client:
            for batch in plan:
                r = client.post("/events", json={"events": batch["events"]})
                with self.lock:
                    self.sent += len(batch["events"])
                    if r.status_code != 200:
                        self.failures.append(f"POST /events {r.status_code}: {r.text[:200]}")
                        continue
                    self.accepted[batch["user"]] += r.json()["accepted"]
                    self.rejected.update(r.json()["rejected"])


def journal_scenario(bundle: Path, folder: Path, erase: bool, clients: int, batches: int) -> dict:
    """One run: clients post while (``erase``) users are erased and the bundle reloaded; SIGKILL;
    restart. Returns the counts, and the mismatches (which must be 0)."""
    import httpx
    from load import Server

    from dmp_dl.data.journal import read_journal

    folder.mkdir(parents=True)
    art = own_copy(bundle, folder)
    journal = folder / "journal"
    known = json.loads((art / "users.json").read_text())["ids"]
    items = json.loads((art / "items.json").read_text())["ids"][:60]
    t0 = int(json.loads((art / "manifest.json").read_text())["realtime"]["data_end"]) + 60
    users = known[:12] + [f"walk-in-{i}" for i in range(12)]
    to_erase = (known[:3] + ["walk-in-0", "walk-in-1", "walk-in-2"]) if erase else []
    posting = Clients("", users, items, t0, clients, batches)
    erased, removed, erase_failures, reloads = [], 0, [], 0
    started = time.perf_counter()
    with Server(art, TOKEN, f"journal={journal}", "realtime.lookalike_refresh_seconds=1") as server:
        posting.base = server.base
        auth = {"Authorization": f"Bearer {TOKEN}"}

        def eraser() -> None:
            nonlocal removed, reloads
            for user in to_erase:
                time.sleep(0.7)
                r = httpx.post(f"{server.base}/erase", json={"user_ids": [user]}, headers=auth, timeout=300)
                if r.status_code != 200:
                    erase_failures.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                erased.append(user)
                removed += r.json()["journal_rows_removed"]
                reloads += httpx.post(f"{server.base}/reload", headers=auth, timeout=300).status_code == 200

        side = threading.Thread(target=eraser)
        side.start()
        posting.run()
        side.join()
        served_before = {u: httpx.get(f"{server.base}/recommend", params={"user_id": u}, headers=auth).status_code
                         for u in users}
        server.proc.kill()  # SIGKILL: no shutdown code runs
        server.proc.wait()
    with Server(art, TOKEN, f"journal={journal}") as restarted:
        health = httpx.get(f"{restarted.base}/health").json()
        served_after = {u: httpx.get(f"{restarted.base}/recommend", params={"user_id": u},
                                     headers={"Authorization": f"Bearer {TOKEN}"}).status_code for u in users}
    seconds = time.perf_counter() - started
    rows = read_journal(journal)[0]
    on_disk = Counter(rows["user_id"].tolist())
    expected = {u: (0 if u in erased else posting.accepted[u]) for u in users}
    acknowledged = sum(posting.accepted.values())
    acknowledged_kept = sum(expected.values())
    wrong_users = [u for u in users if on_disk.get(u, 0) != expected[u]]
    wrongly_served = [u for u in users if (served_after[u] == 200) == (u in erased)
                      or (served_before[u] == 200) == (u in erased)]
    realtime = health.get("realtime", {})
    return {
        "scenario": ("posts + /erase + /reload" if erase else "posts") + ", SIGKILL, restart",
        "clients": clients, "batches": clients * batches, "events_sent": posting.sent,
        "acknowledged": acknowledged, "duplicates_refused": posting.rejected.get("duplicate", 0),
        "erased_user_refused": posting.rejected.get("erased_user", 0), "users_erased": len(erased),
        "acknowledged_of_erased": acknowledged - acknowledged_kept, "journal_rows_removed": removed,
        "reloads": reloads, "acknowledged_kept": acknowledged_kept, "journal_rows": int(len(rows)),
        "replayed_after_restart": int(realtime.get("events_replayed", -1)),
        "replay_dropped": realtime.get("replay_dropped"), "users_with_wrong_rows": len(wrong_users),
        "users_wrongly_served": len(wrongly_served),
        "failed_requests": len(posting.failures) + len(erase_failures), "failures": (posting.failures + erase_failures)[:5],
        "seconds": round(seconds, 1),
    }


def scenario_ok(r: dict) -> bool:
    return (r["replayed_after_restart"] == r["acknowledged_kept"] == r["journal_rows"] and not r["users_with_wrong_rows"]
            and not r["users_wrongly_served"] and not r["failed_requests"] and not r["replay_dropped"]
            and r["journal_rows_removed"] == r["acknowledged_of_erased"])


def journal_part(clients: int, batches: int, artifacts: str | None) -> int:
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="dmp-journal-") as tmp:
        work = Path(tmp)
        bundle = Path(artifacts) if artifacts else train_bundle(work)
        results = [journal_scenario(bundle, work / name, erase, clients, batches)
                   for name, erase in (("posts", False), ("erase", True))]
    ok = all(scenario_ok(r) for r in results)
    columns = ["scenario", "events_sent", "acknowledged", "duplicates_refused", "erased_user_refused", "users_erased",
               "acknowledged_of_erased", "journal_rows_removed", "reloads", "acknowledged_kept", "journal_rows",
               "replayed_after_restart", "users_with_wrong_rows", "users_wrongly_served", "failed_requests", "seconds"]
    verdict = "every acknowledged event replayed exactly once, no erased user back" if ok else "FAILED"
    body = (
        f"**Journal and erasure under concurrency: {verdict}.** "
        f"`serve.py` over a small synthetic bundle (600 users × 200 items, the default model); {clients} client threads "
        f"post {batches} single-user batches each (1–80 events: their own event ids, events without id or time, the same "
        "content under new ids, and one batch in five sent again); in the second scenario 3 known and 3 new users are "
        "erased with `POST /erase` (each followed by `POST /reload`) while the clients post. Then the server is "
        "SIGKILLed and started again. *acknowledged_kept* (accepted events of users not erased) must equal the journal's "
        "rows and the events the restart replays; every user's journal rows must equal what was acknowledged for them "
        "(0 for erased users), and erased users must answer 404 before and after the restart.\n\n"
        f"{markdown_table(results, columns, floatfmt='.1f')}"
    )
    info = machine()
    info["load_average"] = load_before
    write_section("reliability_journal", "Reliability: real-time journal with erasures, reloads and SIGKILL "
                  "(bench/reliability.py --part journal)", body, {"scenarios": results, "machine": info, "command": command()})
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "inputs", "journal"), default="all")
    parser.add_argument("--clients", type=int, default=4, help="journal part: concurrent client threads")
    parser.add_argument("--batches", type=int, default=40, help="journal part: batches per client")
    parser.add_argument("--artifacts", help="journal part: a bundle to use instead of training a small one")
    output.add_arguments(parser)
    args = parser.parse_args()
    output.require({"httpx": "the HTTP clients"}, "bench/reliability.py")
    output.use(args)
    status = 0
    if args.part in ("all", "inputs"):
        status |= inputs_part()
    if args.part in ("all", "journal"):
        status |= journal_part(args.clients, args.batches, args.artifacts)
    return status


if __name__ == "__main__":
    sys.exit(main())
