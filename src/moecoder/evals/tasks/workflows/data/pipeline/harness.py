"""Hidden checks' measuring side for the pipeline workflow. Runs next to the candidate's pipeline.py.

Installs a scripted feed into the fake `confluent_kafka` (which sits first on sys.path), then calls
`pipeline.run_pipeline`. At every offset commit it records, through its own PostgreSQL connection,
whether all rows the committed messages contribute to are already durable (a committed
transaction) with their final values. It can crash the process mid-stream (os._exit) to test replay,
and resumes from the committed positions when asked. Measurements only; the parent decides.
"""

import json
import math
import os
import sys
import time
import traceback

CFG = json.loads(sys.stdin.read())  # read before any candidate code is imported
MARKER = CFG["report_marker"]
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import confluent_kafka as ck
import psycopg2

CRASH_EXIT_CODE = 86


class Feed:
    def __init__(self, hconn, start):
        self.h = hconn
        self.topic = CFG["topic"]
        msgs = CFG["messages"]
        self.partitions = sorted({m["partition"] for m in msgs})
        self.queue = [m for m in msgs if m["offset"] >= start.get(m["partition"], 0)]
        self.i = 0
        self.delivered = 0
        self.consumed = {p: start.get(p, 0) for p in self.partitions}
        self.committed = dict(start)
        self.subscribed = []
        self.closed = False
        self.consumers = 0
        self.n_commits = 0
        self.lull_until = None
        self.expected = {(r["sensor"], r["start_ms"]): r for r in CFG["expected"]}

    def consumer_created(self, consumer):
        self.consumers += 1

    def consumer_closed(self, consumer):
        self.closed = True

    def subscribe(self, topics):
        self.subscribed = topics

    def next_message(self, consumer, timeout):
        if consumer.auto_commit and self.delivered:
            self.commit(self.consumed_positions(), True)  # what librdkafka's auto-commit would do
        if CFG.get("crash_after") is not None and self.delivered >= CFG["crash_after"]:
            sys.stdout.flush()
            os._exit(CRASH_EXIT_CODE)  # a real crash: no finally blocks, no flushes, in-memory state lost
        lull = CFG.get("lull_after")
        if lull is not None and self.delivered == lull and self.lull_until is None:
            self.lull_until = time.monotonic() + CFG["lull_s"]  # a quiet spell: time-based flushes happen here
        in_lull = self.lull_until is not None and time.monotonic() < self.lull_until
        if in_lull or self.topic not in self.subscribed or self.i >= len(self.queue):
            t = 0.05 if timeout is None or timeout < 0 else min(0.05, timeout)
            time.sleep(t)
            return None
        m = self.queue[self.i]
        self.i += 1
        if m.get("eof"):
            return ck.Message(self.topic, m["partition"], m["offset"], None, None, None,
                              ck.KafkaError(ck.KafkaError._PARTITION_EOF, "Broker: No more messages"))
        self.delivered += 1
        self.consumed[m["partition"]] = m["offset"] + 1
        return ck.Message(self.topic, m["partition"], m["offset"], m["key"].encode(), m["value"].encode(), m["ts"])

    def consumed_positions(self):
        return [ck.TopicPartition(self.topic, p, o) for p, o in self.consumed.items()]

    def consumed_position(self, partition):
        return self.consumed.get(partition, 0)

    def committed_position(self, partition):
        return self.committed.get(partition, ck.OFFSET_INVALID)

    def commit(self, tps, asynchronous):
        durable = self.durable_rows()
        with self.h.cursor() as cur:
            for tp in tps:
                if tp.topic != self.topic or tp.offset < 0:
                    continue
                violations = 0
                for key, row in self.expected.items():
                    first = row["first"].get(str(tp.partition))
                    if first is not None and first < tp.offset and not _same(durable.get(key), _values(row)):
                        violations += 1
                self.committed[tp.partition] = tp.offset
                self.n_commits += 1
                cur.execute("INSERT INTO wf_harness.commits (partition, position, violations, asynchronous) "
                            "VALUES (%s, %s, %s, %s)", (tp.partition, tp.offset, violations, bool(asynchronous)))

    def durable_rows(self):
        with self.h.cursor() as cur:
            cur.execute("SELECT sensor, (extract(epoch FROM window_start) * 1000)::bigint, event_count, value_sum, "
                        "value_min, value_max FROM window_aggregates")
            return {(r[0], r[1]): _values({"count": r[2], "sum": r[3], "min": r[4], "max": r[5]})
                    for r in cur.fetchall()}


def _values(row):
    return (int(row["count"]), float(row["sum"]), float(row["min"]), float(row["max"]))


def _same(got, want):
    # Float sums computed in another order differ in the last bits.
    return got is not None and got[0] == want[0] and all(
        math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9) for a, b in zip(got[1:], want[1:]))


def open_candidate_connections(hconn, app):
    """Backends of this database other than the harness's own, waiting briefly for closed ones to go."""
    n = -1
    for _ in range(50):
        with hconn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND application_name <> %s AND pid <> pg_backend_pid()", (app,))
            n = cur.fetchone()[0]
        if n == 0:
            break
        time.sleep(0.02)
    return n


def main():
    hconn = psycopg2.connect(CFG["harness_dsn"])
    hconn.autocommit = True
    start = {}
    if CFG.get("resume"):
        with hconn.cursor() as cur:
            cur.execute("SELECT partition, position FROM wf_harness.commits ORDER BY id")
            for p, pos in cur.fetchall():
                start[p] = pos  # the latest commit per partition wins, as in Kafka
    feed = Feed(hconn, start)
    ck._install(feed)
    report = {"resumed_from": {str(k): v for k, v in start.items()}}
    try:
        from pipeline import run_pipeline

        t0 = time.monotonic()
        run_pipeline(dict(CFG["consumer_config"]), CFG["topic"], CFG["dsn"], idle_timeout_s=CFG["idle_timeout_s"])
        report["returned"] = True
        report["run_s"] = time.monotonic() - t0
    except BaseException:  # noqa: BLE001 (candidate code may raise anything)
        report["returned"] = False
        report["error"] = traceback.format_exc(limit=3)[-500:]
    report.update(delivered=feed.delivered, n_commits=feed.n_commits, consumer_closed=feed.closed,
                  consumers=feed.consumers, open_connections=open_candidate_connections(hconn, CFG["harness_app"]))
    print(MARKER, json.dumps(report), flush=True)


main()
