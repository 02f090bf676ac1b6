"""Workflow 3: a real-time pipeline, Kafka -> 5-minute sliding-window aggregates -> PostgreSQL.

The review scored the model's answer 50% logically correct: no batching and no connection pooling.
Here the candidate's `run_pipeline` reads from a scripted `confluent_kafka` stand-in (late and
out-of-order events, two partitions, a partition-EOF error) and writes to a real, throwaway
PostgreSQL server reached through its Unix socket. Rows, statements and connections are read by
the trusted side from the database and from the server's own log.

Isolation note: the candidate must reach the server's socket directory, so this workflow's runs
pass that directory to the sandbox as a bind (when the sandbox supports binds); the database is a
fresh one per evaluation and is dropped afterwards.
"""

from __future__ import annotations

import json
import math
import random
import secrets
import threading
from typing import Any

from moecoder.evals.tasks.workflows.common import (
    data_dir,
    decide,
    make_prompts,
    read_tree,
    run_harness,
    single_file,
    syntax_verdict,
)
from moecoder.evals.tasks.workflows.pg import PostgresUnavailable, ThrowawayPostgres
from moecoder.evals.types import Prompt, Status, Verdict

MAIN_FILE = "pipeline.py"
TOPIC = "sensor-readings"
WINDOW_MS, SLIDE_MS, LATENESS_MS = 300_000, 60_000, 60_000
T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
SENSORS = {"s1": 0, "s2": 1, "s3": 0, "s4": 1}  # key -> partition
TRUSTED_APP = "moecoder-trusted"  # application_name of this side's own connections (not counted)
MAX_POOL = 4  # the prompt's connection-pool bound
INSERTS_PER_MESSAGES = 50  # batching: at most one INSERT round trip per this many messages
CONSUMER_CONFIG = {"bootstrap.servers": "kafka:9092", "group.id": "window-aggregator",
                   "auto.offset.reset": "earliest", "enable.auto.commit": False}
DDL = """
CREATE TABLE window_aggregates (
    sensor       text             NOT NULL,
    window_start timestamptz      NOT NULL,
    window_end   timestamptz      NOT NULL,
    event_count  bigint           NOT NULL,
    value_sum    double precision NOT NULL,
    value_min    double precision NOT NULL,
    value_max    double precision NOT NULL,
    PRIMARY KEY (sensor, window_start)
);
CREATE SCHEMA wf_harness;
CREATE TABLE wf_harness.commits (id serial PRIMARY KEY, partition int, position bigint, violations int,
                                 asynchronous boolean);
"""


def make_stream(seed: int, n: int, p_out_of_order: float, p_late: float) -> list[dict[str, Any]]:
    """Messages in delivery order: key, JSON value, event time (ms), partition and offset."""
    rng = random.Random(seed)
    offsets = {p: 0 for p in set(SENSORS.values())}
    t = T0_MS
    out: list[dict[str, Any]] = []
    for i in range(n):
        t += rng.randint(1_000, 7_000)
        ts = t
        u = rng.random()
        if u < p_late:
            ts = t - rng.randint(150_000, 280_000)  # beyond the allowed lateness: must be dropped
        elif u < p_late + p_out_of_order:
            ts = t - rng.randint(5_000, 50_000)  # out of order but within the lateness: must count
        key = rng.choice(sorted(SENSORS))
        p = SENSORS[key]
        value = json.dumps({"sensor": key, "value": round(rng.uniform(-10.0, 40.0), 2)})
        out.append({"partition": p, "offset": offsets[p], "key": key, "value": value, "ts": ts})
        offsets[p] += 1
        if i == n // 2:
            out.append({"partition": 1, "offset": offsets[1], "eof": True})  # an error message to skip
    return out


def expected_rows(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows the prompt's semantics define, plus each row's first contributing offset per partition."""
    watermark = None
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for m in messages:
        if m.get("eof"):
            continue
        ts = m["ts"]
        if watermark is not None and ts < watermark:
            continue  # late: dropped
        value = json.loads(m["value"])["value"]
        first_start = (ts - WINDOW_MS) // SLIDE_MS * SLIDE_MS + SLIDE_MS
        for start in range(first_start, ts + 1, SLIDE_MS):
            r = rows.setdefault((m["key"], start), {"sensor": m["key"], "start_ms": start, "end_ms": start + WINDOW_MS,
                                                   "count": 0, "sum": 0.0, "min": value, "max": value, "first": {}})
            r["count"] += 1
            r["sum"] += value
            r["min"], r["max"] = min(r["min"], value), max(r["max"], value)
            r["first"].setdefault(str(m["partition"]), m["offset"])
        watermark = max(watermark if watermark is not None else ts - LATENESS_MS, ts - LATENESS_MS)
    return sorted(rows.values(), key=lambda r: (r["sensor"], r["start_ms"]))


def row_values(r: dict[str, Any]) -> tuple:
    return (r["sensor"], int(r["start_ms"]), int(r["end_ms"]), int(r["count"]), float(r["sum"]), float(r["min"]),
            float(r["max"]))


def rows_match(got: list[tuple], expected: list[dict[str, Any]]) -> bool:
    """Same rows in the same (sorted) order; float columns to 1e-9, since summation order may differ."""
    want = [row_values(r) for r in expected]
    return len(got) == len(want) and all(
        g[:4] == w[:4] and all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9) for x, y in zip(g[4:], w[4:], strict=True))
        for g, w in zip(got, want, strict=True))


STREAM_MAIN = {"seed": 11, "n": 600, "p_out_of_order": 0.12, "p_late": 0.04}
# No late events in the crash stream: replaying from a committed offset then yields the same rows.
STREAM_CRASH = {"seed": 12, "n": 300, "p_out_of_order": 0.12, "p_late": 0.0}
CRASH_AFTER = 190

_shared_pg: ThrowawayPostgres | None = None
_shared_lock = threading.Lock()


def shared_postgres() -> ThrowawayPostgres:
    """One server per process, started on first use and stopped at exit."""
    global _shared_pg
    with _shared_lock:
        if _shared_pg is None:
            import atexit

            _shared_pg = ThrowawayPostgres().start()
            atexit.register(_shared_pg.stop)
        return _shared_pg


class PipelineTask:
    """Kafka -> 5-minute sliding-window aggregates -> PostgreSQL, with confluent_kafka and psycopg2."""

    task_id = "workflow/realtime-pipeline"
    suite = "workflow"
    kind = "Data engineering"
    CHECKS = ("aggregates_correct", "batched_inserts", "pooled_connections", "commit_after_durable",
              "replay_no_duplicates", "connections_released")

    def __init__(self, pg: ThrowawayPostgres | None = None) -> None:
        self.root = data_dir("pipeline")
        self._pg = pg

    def prompts(self) -> dict[str, Prompt]:
        return make_prompts(self.task_id, (self.root / "prompt.md").read_text())

    def evaluate(self, code: str | dict[str, str], sandbox: Any = None) -> Verdict:
        files = single_file(code, MAIN_FILE)
        early = syntax_verdict(files, len(self.CHECKS), [MAIN_FILE])
        if early is not None:
            return early
        n_py = sum(p.endswith(".py") for p in files)
        base = Verdict(Status.FAIL, 0, len(self.CHECKS), syntax_ok=True, files_compiled=n_py, files_total=n_py)
        try:
            pg = self._pg or shared_postgres()
        except PostgresUnavailable as e:
            base.status, base.detail = Status.INFRA, str(e)
            return base
        run_files = {**files, "_wf_harness.py": (self.root / "harness.py").read_text(),
                     "confluent_kafka/__init__.py":
                         (self.root / "fake_kafka" / "confluent_kafka" / "__init__.py").read_text()}
        import psycopg2

        dbs: list[str] = []
        try:
            return self._evaluate(pg, run_files, base, dbs, sandbox)
        except psycopg2.Error as e:  # our own connections failing means the server, not the candidate
            base.status, base.detail = Status.INFRA, f"PostgreSQL: {str(e).strip().splitlines()[0]}"
            return base
        finally:
            for db in dbs:
                try:
                    pg.drop_database(db)
                except psycopg2.Error:
                    pass  # the server is gone; its directory goes with stop()

    def _scenario(self, pg: ThrowawayPostgres, run_files: dict[str, str], dbs: list[str], sandbox: Any,
                  messages: list[dict[str, Any]], expected: list[dict[str, Any]], crash_after: int | None):
        db = pg.create_database()
        dbs.append(db)
        with pg.connect(db, TRUSTED_APP) as conn, conn.cursor() as cur:
            cur.execute(DDL)
        conn.close()
        app = f"wf_harness_{secrets.token_hex(4)}"
        config = {"messages": messages, "expected": expected, "topic": TOPIC, "consumer_config": CONSUMER_CONFIG,
                  "dsn": pg.dsn(db), "harness_dsn": pg.dsn(db, app), "harness_app": app, "idle_timeout_s": 0.3}
        binds = [pg.socket_dir]
        outs = []
        if crash_after is not None:
            # A quiet spell before the crash lets a time-based flush commit offsets mid-stream; the long
            # idle timeout keeps the quiet spell from ending the run.
            crash_cfg = {**config, "crash_after": crash_after, "lull_after": crash_after * 2 // 3, "lull_s": 1.3,
                         "idle_timeout_s": 5.0}
            outs.append(run_harness(sandbox, run_files, "_wf_harness.py", crash_cfg, wall_s=30.0, binds=binds))
            config["resume"] = True
        outs.append(run_harness(sandbox, run_files, "_wf_harness.py", config, wall_s=30.0, binds=binds))
        return db, app, outs

    def _evaluate(self, pg: ThrowawayPostgres, run_files: dict[str, str], base: Verdict, dbs: list[str],
                  sandbox: Any) -> Verdict:
        m = base.measurements
        main_msgs = make_stream(**STREAM_MAIN)
        main_expected = expected_rows(main_msgs)
        db, app, (main_out,) = self._scenario(pg, run_files, dbs, sandbox, main_msgs, main_expected, None)
        bad = main_out.failure_status()
        if bad is not None:  # the harness itself did not report: timeout, memory, or the process died
            base.status, base.detail = bad, main_out.error_line()
            return base
        report = main_out.report or {}
        m["main_run"] = {k: v for k, v in report.items() if k != "error"}
        if report.get("error"):
            m["main_error"] = report["error"].strip().splitlines()[-1][:300]
        n_messages = sum(1 for x in main_msgs if not x.get("eof"))
        rows = self._rows(pg, db)
        commits = self._commits(pg, db)
        ours = (app, TRUSTED_APP)
        entries = [e for e in pg.log_entries(db) if e.app not in ours]
        m["rows"], m["expected_rows"] = len(rows), len(main_expected)
        m["insert_round_trips"] = sum(1 for e in entries if e.text.startswith("LOG: statement:")
                                      and "insert" in e.text.lower())
        m["connections_opened"] = sum(1 for e in entries if "connection authorized" in e.text
                                      and not any(f"application_name={a}" in e.text for a in ours))
        m["commits"] = len(commits)
        m["commit_violations"] = sum(c[2] for c in commits)
        final = {p: pos for p, pos, _v, _a in commits}
        ends = {}
        for x in main_msgs:
            if not x.get("eof"):
                ends[x["partition"]] = x["offset"] + 1

        crash_msgs = make_stream(**STREAM_CRASH)
        crash_expected = expected_rows(crash_msgs)
        db2, _app2, (crash_out, resume_out) = self._scenario(pg, run_files, dbs, sandbox, crash_msgs, crash_expected,
                                                            CRASH_AFTER)
        m["crash_run_exit"] = crash_out.result.returncode
        m["resume_run"] = {k: v for k, v in (resume_out.report or {}).items() if k != "error"}
        crash_rows = self._rows(pg, db2)
        crash_commits = self._commits(pg, db2)
        m["crash_rows"], m["crash_expected_rows"] = len(crash_rows), len(crash_expected)

        return decide([
            ("aggregates_correct", lambda: report.get("returned") and rows_match(rows, main_expected)),
            ("batched_inserts", lambda: report.get("returned")
             and 0 < m["insert_round_trips"] <= max(2, n_messages // INSERTS_PER_MESSAGES)),
            ("pooled_connections", lambda: report.get("returned") and 0 < m["connections_opened"] <= MAX_POOL),
            ("commit_after_durable", lambda: report.get("returned") and m["commits"] > 0
             and m["commit_violations"] == 0 and final == ends
             and not any(c[3] for c in commits)),
            ("replay_no_duplicates", lambda: (resume_out.report or {}).get("returned")
             and rows_match(crash_rows, crash_expected)
             and sum(c[2] for c in crash_commits) == 0),
            ("connections_released", lambda: report.get("returned") and report["open_connections"] == 0
             and report["consumer_closed"]),
        ], base)

    @staticmethod
    def _rows(pg: ThrowawayPostgres, db: str) -> list[tuple]:
        with pg.connect(db, TRUSTED_APP) as conn, conn.cursor() as cur:
            cur.execute("SELECT sensor, (extract(epoch FROM window_start) * 1000)::bigint, "
                        "(extract(epoch FROM window_end) * 1000)::bigint, event_count, value_sum, value_min, "
                        "value_max FROM window_aggregates ORDER BY sensor, window_start")
            out = [row_values({"sensor": r[0], "start_ms": r[1], "end_ms": r[2], "count": r[3], "sum": r[4],
                               "min": r[5], "max": r[6]}) for r in cur.fetchall()]
        conn.close()
        return out

    @staticmethod
    def _commits(pg: ThrowawayPostgres, db: str) -> list[tuple]:
        with pg.connect(db, TRUSTED_APP) as conn, conn.cursor() as cur:
            cur.execute("SELECT partition, position, violations, asynchronous FROM wf_harness.commits ORDER BY id")
            out = cur.fetchall()
        conn.close()
        return out

    def reference(self) -> dict[str, str]:
        return read_tree(self.root / "reference")

    def flawed(self) -> dict[str, dict[str, str]]:
        return {d.name: read_tree(d) for d in sorted((self.root / "flawed").iterdir()) if d.is_dir()}
