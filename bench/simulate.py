"""`hymirec simulate`: prequential evaluation (test-then-train, DESIGN §3) of a frozen model against
the online loop, through the live system (its report: ``bench.simulate_report``).

One time-ordered log is replayed through two copies of the system side by side — each its own
topics, LanceDB directory and faust worker, on one broker — in lock-step:

1. **Bootstrap** (both arms alike). The first ``frozen_after`` share of the log is replayed and
   applied; one trainer cycle (``OnlineTrainer``, guardrail margin 1 so that it always publishes)
   trains v0001 on the online arm, and the same artefact is published to the frozen arm; both
   workers switch to it.
2. **The rest, chunk by chunk.** Before a chunk is produced, every event of it is *scored*: the
   live top-10 of its user — ``Recommender.many``, the code path of `hymirec topk` and GET
   /recommend, read once the worker has recomputed that user's interests after its last applied
   event — is checked for the event's item (hit@10, NDCG@10). Then the chunk is produced to both
   arms and the simulation waits until both workers have applied it. Events of users with no
   history yet are answered by the popular items and counted apart ("cold": that answer comes from
   the worker's popularity table, recounted on a timer, so it is the one number not in lock-step).
3. **Training.** The frozen arm never trains again. The online arm runs a trainer cycle (the
   service's, with its guardrail) whenever ``every_events`` events were applied since the last
   one, then waits for its worker to switch (or records the refusal) before the next chunk.

Nothing races the wall clock: both arms score exactly the same events against the same applied
prefix of the log. The one coarsening is the chunk: an event is scored against the state before its
chunk, so a user's second event within one chunk does not see the first (the same for both arms;
smaller ``chunk`` = finer, slower). A bursty log feels it most: a new user's first session falls
into one chunk and is scored cold.

**Baseline arms.** The simple streaming baselines of DESIGN §7a (``model.baselines``: pop, recent-pop,
rules) run in this process on the same log, with no worker: each learns the bootstrap part, then every
chunk is scored against its state before the chunk (the user's applied items left out, a user with no
applied event cold) by the same ``score_chunk``, and then applied.

**Oracle arms** (synthetic datasets only, ``bench.oracle``): every item ranked by the generator's own
probability of the user's next item, from its hidden parameters: the ceiling under this protocol; and
two half-oracles, each knowing one of its two factors (the user's topic mix, the items' odds within a
topic) and counting the other.

**Diagnostic arm.** The online arm's live version, loaded in this process after each switch, scores every
chunk straight from the users' exact histories (``bench.diagnostic``: no worker, no stored codes, no ANN,
no refresh lag), with the same warm users and seen items. Diagnostic against offline leave-one-out is
what the model lacks in this setting.

**Blend arms.** The serving blend computed in this process on the exact histories: without the model
(*signals-only*: online − signals-only is the model's own share) and with the diagnostic arm's version
(*exact-blend*: online − exact-blend is what the live system loses — stored codes, ANN pool, refresh
lag, the worker's counts — against the blend it would serve if it lost nothing).

Reported per arm: Recall@10 / NDCG@10 of the warm events overall, per third of the scored part and
split by item (*new*: no event in the bootstrap part), the cold events, the cycles and their
decisions, and the paired gaps of online to frozen, diagnostic, signals-only, exact-blend and the best
baseline, with their standard errors (over events: they do not include the run-to-run spread of training).
"""

from __future__ import annotations

import tempfile
import time
from contextlib import ExitStack
from datetime import datetime, timezone
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from bench import harness
from bench.arms import SimConfig, baseline_arms, blend_step, categories_of, diagnostic_step, read_log
from bench.in_process import run_in_process
from bench.diagnostic import Diagnostic, ExactBlend, SignalsOnly, events_of, exact_histories
from bench.oracle import HINDSIGHT, hindsight_arm, oracle_arms
from bench.prequential import K, metrics_of, score_chunk, warm
from bench.simulate_plot import LIVE
from bench.simulate_report import fmt, summarise, summary_markdown, write_outputs
from hymirec.errors import HymirecError
from hymirec.procs import ManagedProcess, faust_worker, wait_for, wait_serving
from hymirec.settings import Settings
from serving.reader import Recommender
from serving.blend import counted_at
from serving.hymirec import ServedHyMiRec
from store.logs import read_items, write_jsonl
from store.registry import ModelRegistry
from store.tables import Store
from stream import datasets
from stream.replay import replay
from trainer.online import OnlineTrainer, announce

# The workers' timers, shortened so a chunk is applied and its users' interests are fresh quickly.
WORKER_OVERRIDES = {"batch_within_s": 0.2, "serving_refresh_s": 0.2, "popularity_refresh_s": 0.5}


# --- the live system ------------------------------------------------------------------------------
def processed(settings: Settings) -> int:
    """Interactions a worker has finished with (applied, or skipped as duplicates)."""
    c = harness.counts(settings)
    return int(c.get("events_applied", 0) + c.get("duplicates_skipped", 0))


@dataclass
class Arm:
    name: str
    settings: Settings
    proc: ManagedProcess
    live: str | None = None
    applied_at: datetime | None = None  # when the last chunk was seen applied
    records: list[dict] = field(default_factory=list)
    cycles: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.store = Store(self.settings)
        self.recommender = Recommender(self.store)
        self.base = processed(self.settings)

    def alive(self) -> bool:
        if not self.proc.alive:
            raise HymirecError(f"the {self.name} arm's worker exited; last lines of {self.proc.log_path}:\n{self.proc.tail()}")
        return True

    def wait_applied(self, events: int, timeout: float) -> None:
        wait_for(lambda: self.alive() and processed(self.settings) - self.base >= events, timeout=timeout,
                 interval=0.05, what=f"the {self.name} worker to apply {events:,} events")
        self.applied_at = datetime.now(timezone.utc)

    def wait_counted(self, timeout: float) -> None:
        """Until the worker's serving blend has counted its signals (and refitted) since the last apply."""
        wait_for(lambda: self.alive() and (at := counted_at(self.store)) is not None and at >= self.applied_at,
                 timeout=timeout, interval=0.05, what=f"the {self.name} worker to count the serving blend's signals")

    def wait_serving(self, version: str, timeout: float) -> None:
        wait_serving(self.settings, self.proc, version, timeout=timeout, interval=0.1)
        self.live = version

    def fresh_histories(self, users: list[str], timeout: float) -> dict[str, list[str]]:
        """{user: stored history} once every user that has one has interests of the live version
        computed from it (the worker refreshes them on a timer after applying events)."""
        def ready() -> tuple[dict[str, list[str]]] | None:
            self.alive()
            histories = self.store.get_histories(users)
            interests = self.store.get_interests(list(histories), columns=["model_version"])
            for user, row in histories.items():
                got = interests.get(user)
                if got is None or got["model_version"] != self.live or got["updated_at"] < row["updated_at"]:
                    return None
            return ({u: [str(i) for i in row["history_item_ids"] or []] for u, row in histories.items()},)

        return wait_for(ready, timeout=timeout, interval=0.05, what=f"the {self.name} worker's interests to catch up")[0]

    def score(self, events: pd.DataFrame, applied: int, bootstrap_items: set[str], timeout: float,
              phases: dict[str, float]) -> None:
        users = list(dict.fromkeys(events["user_id"].tolist()))
        t0 = time.perf_counter()
        histories = self.fresh_histories(users, timeout)
        if self.applied_at is not None:
            self.wait_counted(timeout)
        t1 = time.perf_counter()
        answers = {r.user_id: (r.model_version, [s.item_id for s in r.items]) for r in self.recommender.many(users, K)}
        phases["fresh"] += t1 - t0
        phases["topk"] += time.perf_counter() - t1
        self.records += score_chunk(events, answers, histories, applied, bootstrap_items)


def _write_chunk(path: Path, events: pd.DataFrame) -> Path:
    write_jsonl(path, events[["user_id", "item_id", "ts", "action", "event_id"]].to_dict("records"))
    return path


def _produce(arms: list[Arm], path: Path, items: Path | None) -> None:
    for arm in arms:
        if replay(arm.settings, path, items_path=items, progress=False).interrupted:
            raise KeyboardInterrupt  # replay turns the first Ctrl-C into a short summary; here it ends the run


def _copy_version(source: Settings, target: Settings, version: str) -> str:
    """Publish ``source``'s ``version`` artefact unchanged to ``target``'s registry and announce it."""
    manifest, files = ModelRegistry(source).load(version)
    kept = {k: v for k, v in manifest.items() if k not in ("version", "parent", "created_at", "files")}
    published = ModelRegistry(target).publish(files, kept, parent=None)
    announce(target, {"version": published.version, "parent": None, "metrics": manifest.get("metrics", {}),
                      "created_at": published.manifest["created_at"]})
    return published.version


def _cycle(arm: Arm, trainer, position: int, timeout: float) -> dict:
    started = time.perf_counter()
    result = trainer.cycle()
    train_s = time.perf_counter() - started
    if result.published:
        arm.wait_serving(result.published, timeout)
    record = {"position": position, "published": result.published, "parent": result.parent, "decision": result.decision,
              "live": result.live, "candidate": result.candidate, "train_s": round(train_s, 1),
              "switch_s": round(time.perf_counter() - started - train_s, 1)}
    arm.cycles.append(record)
    return record


def run_simulation(settings: Settings, interactions: Path, items: Path, *, config: SimConfig, out: Path,
                   dataset: str, limit: int | None = None, progress: bool = True) -> dict:
    """Both live arms and the baseline arms through the whole log (see the module doc); writes ``out`` and
    returns the summary."""
    log, boot = read_log(interactions, limit, config)
    n = len(log)
    say = print if progress else (lambda *a, **k: None)
    say(f"simulate {dataset}: {n:,} events ({interactions}), bootstrap on the first {boot:,} "
        f"({config.frozen_after:.0%}, {config.bootstrap_epochs} epochs), {n - boot:,} scored in chunks of {config.chunk}; "
        f"online: a cycle every {config.every_events:,} events, {config.epochs} epoch(s) each, backbone {config.backbone}, "
        f"margin {config.margin}",
        flush=True)
    logs = out / "logs"
    started = time.monotonic()
    catalogue = read_items(items)
    categories = categories_of(catalogue)
    baselines = baseline_arms(log, boot, config, categories)
    baselines |= oracle_arms(log, boot, config, interactions.parent)
    baselines[HINDSIGHT] = hindsight_arm(log, boot, config)
    say("baselines (in this process, same chunks): " + ", ".join(
        f"{name} R@{K} {fmt(metrics_of(warm(recs))[f'recall@{K}'])}" for name, recs in baselines.items())
        + f" ({time.monotonic() - started:.0f} s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="hymirec-simulate-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        base, how = stack.enter_context(harness.broker(settings, work))
        say(how, flush=True)
        started_workers = []
        for name in LIVE:
            s = harness.fresh(base, work, f"sim-{name}", **WORKER_OVERRIDES)
            (logs / f"worker-{name}.log").unlink(missing_ok=True)
            started_workers.append((name, s, stack.enter_context(faust_worker(s, logs / f"worker-{name}.log"))))
        # Only now (each Arm opens its Store) LanceDB is opened in this process: forking a worker after it
        # warns of deadlocks.
        arms = [Arm(name, s, proc) for name, s, proc in started_workers]
        frozen, online = arms
        say(f"workers up ({time.monotonic() - started:.0f} s); logs in {logs}", flush=True)

        _produce(arms, _write_chunk(work / "bootstrap.jsonl", log.iloc[:boot]), items)
        for arm in arms:
            arm.wait_applied(boot, config.timeout)
        trainer = OnlineTrainer(online.settings, margin=1.0, epochs=config.epochs, backbone=config.backbone,
                                bootstrap_epochs=config.bootstrap_epochs)
        first = _cycle(online, trainer, boot, config.timeout)
        if not first["published"]:
            raise HymirecError(f"the bootstrap cycle published nothing: {first['decision']}")
        frozen.wait_serving(_copy_version(online.settings, frozen.settings, first["published"]), config.timeout)
        frozen.cycles.append({**first, "switch_s": None})
        trainer.margin, trainer.epochs = config.margin, config.epochs
        diagnostic = Diagnostic(ServedHyMiRec.load(online.settings, first["published"]), catalogue)
        exact, diagnosed, applied = exact_histories(log, boot), [], events_of(log.iloc[:boot])
        blends = [SignalsOnly(exact, online.settings.recent_len, applied, categories=categories),
                  ExactBlend(exact, online.settings.recent_len, applied, diagnostic, categories=categories)]
        blended = {arm.name: [] for arm in blends}
        say(f"bootstrap: {boot:,} events applied, {first['published']} trained in {first['train_s']:.0f} s and served "
            f"by both arms ({time.monotonic() - started:.0f} s)", flush=True)

        since, next_report = 0, boot
        phases = dict.fromkeys(("fresh", "topk", "produce", "apply"), 0.0)
        bootstrap_items = set(log["item_id"].iloc[:boot])
        for start in range(boot, n, config.chunk):
            chunk = log.iloc[start : start + config.chunk]
            for arm in arms:
                arm.score(chunk, start, bootstrap_items, config.timeout, phases)
            diagnosed += diagnostic_step(diagnostic, exact, chunk, start, bootstrap_items)
            for name, scored in blend_step(blends, exact, chunk, start, bootstrap_items).items():
                blended[name] += scored
            t0 = time.perf_counter()
            _produce(arms, _write_chunk(work / "chunk.jsonl", chunk), None)
            t1 = time.perf_counter()
            end = start + len(chunk)
            for arm in arms:
                arm.wait_applied(end, config.timeout)
            phases["produce"] += t1 - t0
            phases["apply"] += time.perf_counter() - t1
            since += len(chunk)
            if since >= config.every_events and end < n:
                c = _cycle(online, trainer, end, config.timeout)
                since = 0
                if c["published"]:
                    diagnostic = blends[1].model = Diagnostic(ServedHyMiRec.load(online.settings, c["published"]), catalogue)
                say(f"  online cycle at event {end:,}: {c['published'] or 'rejected'} ({c['train_s']:.0f} s train, "
                    f"{c['switch_s']:.0f} s switch) — {c['decision']}", flush=True)
            if end >= next_report or end == n:
                next_report = end + max(config.chunk, (n - boot) // 10)
                now = {a.name: metrics_of(warm(a.records))[f"recall@{K}"] for a in arms}
                now[Diagnostic.name] = metrics_of(warm(diagnosed))[f"recall@{K}"]
                now |= {name: metrics_of(warm(recs))[f"recall@{K}"] for name, recs in blended.items()}
                now |= {name: metrics_of(warm([r for r in recs if r["position"] < end]))[f"recall@{K}"]
                        for name, recs in baselines.items()}
                say(f"  {end:,}/{n:,} events ({time.monotonic() - started:.0f} s): running Recall@{K} "
                    + ", ".join(f"{k} {fmt(v)}" for k, v in now.items()) + "; seconds waiting for "
                    + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()), flush=True)

    records = {**{a.name: a.records for a in arms}, Diagnostic.name: diagnosed, **blended, **baselines}
    cycles = {a.name: a.cycles for a in arms}
    summary = summarise(records, cycles, dataset=dataset, log_events=n, bootstrap_events=boot, config=asdict(config))
    summary["wall_s"] = round(time.monotonic() - started, 1)
    summary["chunk_phases_s"] = {k: round(v, 1) for k, v in phases.items()}
    summary["outputs"] = {k: str(v) for k, v in write_outputs(out, summary, records, cycles, config.window).items()}
    return summary


# --- CLI ------------------------------------------------------------------------------------------
SYNTHETIC = dict(users=600, items=1500, interests=20, events_per_user=60, drift=0.5, fresh_items=0.3)


def _dataset_files(name: str, settings: Settings) -> tuple[Path, Path]:
    """Export ``name`` once into the data directory's dataset cache (the demo's); the synthetic set
    with both drifts: users' topics (``drift``) and the catalogue (``fresh_items``)."""
    tag = name if name == "ml-100k" else "-".join(["simulate-synthetic", *(f"{k}{v}" for k, v in SYNTHETIC.items()),
                                                   f"seed{settings.seed}"])
    folder = Path(settings.kafka_home).parent / "datasets" / tag
    if not (folder / "interactions.jsonl").exists():
        if name == "ml-100k":
            print(datasets.export_ml100k(folder, settings), flush=True)
        else:
            print(datasets.export_synthetic(folder, seed=settings.seed, **SYNTHETIC), flush=True)
    return folder / "interactions.jsonl", folder / "items.jsonl"


DATASET_LIMITS = {"ml-100k": 30_000, "synthetic": None}  # --dataset defaults that finish in ~10 min on 2 cores


def simulate_command(args, settings: Settings) -> int:
    if args.dataset is not None:
        interactions, items = _dataset_files(args.dataset, settings)
        name = args.dataset
        limit = args.limit if args.limit is not None else DATASET_LIMITS[args.dataset]
    elif args.items is None:
        raise HymirecError("--interactions needs --items (the catalogue is replayed first, as the service needs it)")
    else:
        interactions, items, name, limit = args.interactions, args.items, args.interactions.parent.name, args.limit
    config = SimConfig(**{k: v for k, v in dict(
        frozen_after=args.frozen_after, every_events=args.every_events, chunk=args.chunk,
        epochs=args.epochs or settings.trainer_epochs, bootstrap_epochs=args.bootstrap_epochs or settings.trainer_bootstrap_epochs,
        backbone=args.backbone, margin=settings.trainer_margin if args.margin is None else args.margin,
        window=args.window).items() if v is not None})
    if args.signals_only or args.in_process:
        summary = run_in_process(settings, interactions, items, config=config, dataset=name, limit=limit,
                                 model=args.in_process)
        print(summary_markdown(summary))
        return 0
    out = args.out or Path("results") / "simulate" / name
    summary = run_simulation(settings, interactions, items, config=config, out=out, dataset=name, limit=limit,
                             progress=True)
    print()
    print(summary_markdown(summary))
    print(f"wrote {out}: summary.md, summary.json, plot.png, per-arm events/windows/cycles ({summary['wall_s']:.0f} s)")
    return 0
