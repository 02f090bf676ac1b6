"""A scripted stand-in for `confluent_kafka`, placed first on sys.path by the pipeline harness.

Implements the parts of the Consumer interface a pipeline uses (subscribe/assign, poll, consume,
commit, committed, close) over a fixed list of messages. The harness installs a feed with
`_install(feed)`; the feed decides message order, crash points and what happens at commit time.
"""

TIMESTAMP_NOT_AVAILABLE, TIMESTAMP_CREATE_TIME, TIMESTAMP_LOG_APPEND_TIME = 0, 1, 2
OFFSET_BEGINNING, OFFSET_END, OFFSET_STORED, OFFSET_INVALID = -2, -1, -1000, -1001
_FEED = None


def _install(feed):
    global _FEED
    _FEED = feed


class KafkaError:
    _PARTITION_EOF = -191
    _TIMED_OUT = -185
    _ALL_BROKERS_DOWN = -187
    UNKNOWN_TOPIC_OR_PART = 3

    def __init__(self, code, reason="", fatal=False):
        self._code, self._reason, self._fatal = code, reason, fatal

    def code(self):
        return self._code

    def name(self):
        return {-191: "_PARTITION_EOF", -185: "_TIMED_OUT"}.get(self._code, str(self._code))

    def str(self):
        return self._reason or self.name()

    def fatal(self):
        return self._fatal

    def retriable(self):
        return False

    def __str__(self):
        return f"KafkaError{{code={self.name()},val={self._code},str=\"{self.str()}\"}}"

    def __eq__(self, other):
        return self._code == (other.code() if isinstance(other, KafkaError) else other)

    def __hash__(self):
        return hash(self._code)


class KafkaException(Exception):
    pass


class TopicPartition:
    def __init__(self, topic, partition=-1, offset=OFFSET_INVALID, metadata=None, leader_epoch=None):
        self.topic, self.partition, self.offset = topic, partition, offset
        self.metadata, self.leader_epoch, self.error = metadata, leader_epoch, None

    def __repr__(self):
        return f"TopicPartition{{topic={self.topic},partition={self.partition},offset={self.offset}}}"

    def __eq__(self, other):
        return (self.topic, self.partition, self.offset) == (other.topic, other.partition, other.offset)

    def __hash__(self):
        return hash((self.topic, self.partition))


class Message:
    def __init__(self, topic, partition, offset, key, value, timestamp_ms, error=None):
        self._topic, self._partition, self._offset = topic, partition, offset
        self._key, self._value, self._ts, self._error = key, value, timestamp_ms, error

    def topic(self):
        return self._topic

    def partition(self):
        return self._partition

    def offset(self):
        return self._offset

    def key(self):
        return self._key

    def value(self):
        return self._value

    def timestamp(self):
        if self._ts is None:
            return (TIMESTAMP_NOT_AVAILABLE, -1)
        return (TIMESTAMP_CREATE_TIME, self._ts)

    def error(self):
        return self._error

    def headers(self):
        return None

    def __len__(self):
        return len(self._value or b"")


class Consumer:
    def __init__(self, config, **kwargs):
        if not isinstance(config, dict):
            raise TypeError("expected configuration dict")
        for required in ("bootstrap.servers", "group.id"):
            if required not in config:
                raise KafkaException(KafkaError(-186, f"missing required configuration property {required}"))
        if _FEED is None:
            raise KafkaException(KafkaError(-187, "no brokers reachable"))
        self._feed = _FEED
        self._config = dict(config)
        self._closed = False
        self._feed.consumer_created(self)

    @property
    def auto_commit(self):
        return str(self._config.get("enable.auto.commit", True)).lower() in ("true", "1")

    def _check_open(self):
        if self._closed:
            raise RuntimeError("Consumer closed")

    def subscribe(self, topics, on_assign=None, on_revoke=None, on_lost=None):
        self._check_open()
        self._feed.subscribe(list(topics))
        if on_assign is not None:
            on_assign(self, [TopicPartition(t, p) for t in topics for p in self._feed.partitions])

    def assign(self, partitions):
        self._check_open()
        self._feed.subscribe(sorted({tp.topic for tp in partitions}))

    def unsubscribe(self):
        pass

    def poll(self, timeout=None):
        self._check_open()
        return self._feed.next_message(self, timeout)

    def consume(self, num_messages=1, timeout=-1):
        self._check_open()
        out = []
        while len(out) < num_messages:
            m = self._feed.next_message(self, timeout if not out else 0)
            if m is None:
                break
            out.append(m)
        return out

    def commit(self, message=None, offsets=None, asynchronous=True):
        self._check_open()
        if message is not None:
            tps = [TopicPartition(message.topic(), message.partition(), message.offset() + 1)]
        elif offsets is not None:
            tps = list(offsets)
        else:
            tps = self._feed.consumed_positions()
        self._feed.commit(tps, asynchronous)
        return None if asynchronous else tps

    def store_offsets(self, message=None, offsets=None):
        pass

    def committed(self, partitions, timeout=None):
        return [TopicPartition(tp.topic, tp.partition, self._feed.committed_position(tp.partition))
                for tp in partitions]

    def position(self, partitions):
        return [TopicPartition(tp.topic, tp.partition, self._feed.consumed_position(tp.partition))
                for tp in partitions]

    def close(self):
        self._closed = True
        self._feed.consumer_closed(self)
