"""Kafka -> 5-minute sliding-window aggregates -> PostgreSQL."""

import json
import time
from datetime import UTC, datetime

import psycopg2
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

WINDOW_MS, SLIDE_MS, LATENESS_MS = 300_000, 60_000, 60_000
FLUSH_ROWS, FLUSH_EVERY_S = 500, 1.0
INSERT = """INSERT INTO window_aggregates
    (sensor, window_start, window_end, event_count, value_sum, value_min, value_max)
    VALUES (%s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (sensor, window_start) DO NOTHING"""


def _ts(ms):
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


class WindowState:
    """Open windows keyed by (sensor, start), each with its aggregates and first offset per partition."""

    def __init__(self):
        self.open = {}
        self.watermark = None

    def add(self, sensor, ts, value, partition, offset):
        if self.watermark is not None and ts < self.watermark:
            return False  # late: dropped
        first = (ts - WINDOW_MS) // SLIDE_MS * SLIDE_MS + SLIDE_MS
        for start in range(first, ts + 1, SLIDE_MS):
            w = self.open.get((sensor, start))
            if w is None:
                w = self.open[(sensor, start)] = {"count": 0, "sum": 0.0, "min": value, "max": value, "first": {}}
            w["count"] += 1
            w["sum"] += value
            w["min"], w["max"] = min(w["min"], value), max(w["max"], value)
            w["first"].setdefault(partition, offset)
        low = ts - LATENESS_MS
        self.watermark = low if self.watermark is None else max(self.watermark, low)
        return True

    def pop_complete(self, everything=False):
        done = [k for k in self.open if everything or (self.watermark is not None and self.watermark >= k[1] + WINDOW_MS)]
        return [(k, self.open.pop(k)) for k in sorted(done, key=lambda k: (k[1], k[0]))]

    def first_open_offset(self, partition):
        offsets = [w["first"][partition] for w in self.open.values() if partition in w["first"]]
        return min(offsets) if offsets else None


def run_pipeline(consumer_config, topic, dsn, *, idle_timeout_s=5.0):
    consumer = Consumer({**consumer_config, "enable.auto.commit": False})
    state = WindowState()
    pending = []  # complete windows not yet written
    consumed = {}  # partition -> next offset to read
    committed = {}
    last_flush = time.monotonic()

    def write(rows):
        if not rows:
            return
        for (sensor, start), w in rows:
            conn = psycopg2.connect(dsn)
            try:
                with conn, conn.cursor() as cur:
                    cur.execute(INSERT, (sensor, _ts(start), _ts(start + WINDOW_MS), w["count"], w["sum"],
                                         w["min"], w["max"]))
            finally:
                conn.close()

    def commit_safe_offsets():
        offsets = []
        for partition, position in consumed.items():
            first_open = state.first_open_offset(partition)
            safe = position if first_open is None else first_open
            if safe > committed.get(partition, -1):
                offsets.append(TopicPartition(topic, partition, safe))
                committed[partition] = safe
        if offsets:
            consumer.commit(offsets=offsets, asynchronous=False)

    def flush():
        nonlocal pending, last_flush
        write(pending)
        pending = []
        last_flush = time.monotonic()
        commit_safe_offsets()

    try:
        consumer.subscribe([topic])
        idle_since = time.monotonic()
        while True:
            msg = consumer.poll(min(0.1, idle_timeout_s))
            now = time.monotonic()
            if msg is None:
                if now - idle_since >= idle_timeout_s:
                    break
            elif msg.error() is not None:
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    raise KafkaException(msg.error())
            else:
                idle_since = now
                value = json.loads(msg.value())["value"]
                state.add(msg.key().decode("utf-8"), msg.timestamp()[1], float(value), msg.partition(), msg.offset())
                consumed[msg.partition()] = msg.offset() + 1
                pending.extend(state.pop_complete())
            if len(pending) >= FLUSH_ROWS or (pending and now - last_flush >= FLUSH_EVERY_S):
                flush()
        pending.extend(state.pop_complete(everything=True))
        flush()
    finally:
        consumer.close()
