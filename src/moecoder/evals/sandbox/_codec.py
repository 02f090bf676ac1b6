"""Tagged JSON for values that cross the sandbox boundary (stdlib only; also used inside the sandbox).

Only exact builtin types are encoded (`type(v) is int`, never isinstance), so subclasses with a rigged
`__eq__`, always-equal objects, or anything carrying code cannot cross. Scalars are plain JSON
(null/true/false/int/float/str); every container is a one-key object naming its type:
{"l": [...]} list, {"t": [...]} tuple, {"s": [...]} set, {"fs": [...]} frozenset, {"d": [[k, v], ...]} dict,
{"b": "hex"} bytes, {"c": [re, im]} complex, {"ix": "hex"} an int too big for JSON. Decoding accepts nothing else and never evaluates code.
"""

from __future__ import annotations

import collections
import hashlib
import json

MAX_DEPTH = 64
_BIG = 1 << 4000
_MAX_HEX = 1 << 20
# stdlib dict subclasses that compare equal to a dict with the same items (MBPP returns Counter)
_DICT_LIKE = (collections.Counter, collections.OrderedDict, collections.defaultdict)


class CodecError(ValueError):
    """A value that may not cross the boundary, or a malformed message."""


def to_tagged(v, depth: int = 0):
    if depth > MAX_DEPTH:
        raise CodecError("value nested too deeply")
    t = type(v)
    if t is int and not -_BIG < v < _BIG:
        return {"ix": format(v, "x")}  # JSON's decimal ints stop at 4300 digits; hex has no such limit
    if v is None or t is bool or t is int or t is float or t is str:
        return v
    d = depth + 1
    if t is list:
        return {"l": [to_tagged(x, d) for x in v]}
    if t is tuple:
        return {"t": [to_tagged(x, d) for x in v]}
    if t is set:
        return {"s": [to_tagged(x, d) for x in v]}
    if t is frozenset:
        return {"fs": [to_tagged(x, d) for x in v]}
    if t is dict or t in _DICT_LIKE:  # only the items cross: the receiver gets a plain dict (== holds)
        return {"d": [[to_tagged(k, d), to_tagged(x, d)] for k, x in dict.items(v)]}
    if t is bytes:
        return {"b": v.hex()}
    if t is complex:
        return {"c": [v.real, v.imag]}
    raise CodecError(f"type {t.__module__}.{t.__qualname__} cannot cross the sandbox boundary")


def from_tagged(x, depth: int = 0):
    if depth > MAX_DEPTH:
        raise CodecError("value nested too deeply")
    t = type(x)
    if x is None or t is bool or t is int or t is float or t is str:
        return x
    if t is not dict or len(x) != 1:
        raise CodecError(f"malformed value of JSON type {t.__name__}")
    (tag, body), = x.items()
    d = depth + 1
    if tag == "ix" and type(body) is str and len(body) <= _MAX_HEX:
        return int(body, 16)
    if tag == "b" and type(body) is str:
        return bytes.fromhex(body)
    if tag == "c" and type(body) is list and len(body) == 2 and all(type(p) in (int, float) for p in body):
        return complex(body[0], body[1])
    if type(body) is not list:
        raise CodecError(f"malformed container {tag!r}")
    try:
        if tag == "l":
            return [from_tagged(e, d) for e in body]
        if tag == "t":
            return tuple(from_tagged(e, d) for e in body)
        if tag == "s":
            return {from_tagged(e, d) for e in body}
        if tag == "fs":
            return frozenset(from_tagged(e, d) for e in body)
        if tag == "d":
            out = {}
            for pair in body:
                if type(pair) is not list or len(pair) != 2:
                    raise CodecError("malformed dict item")
                out[from_tagged(pair[0], d)] = from_tagged(pair[1], d)
            return out
    except TypeError as e:  # unhashable set element / dict key
        raise CodecError(f"malformed {tag!r}: {e}") from None
    raise CodecError(f"unknown tag {tag!r}")


def dumps(v) -> bytes:
    return json.dumps(to_tagged(v), separators=(",", ":")).encode()


def loads(data: bytes):
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise CodecError(f"malformed JSON: {str(e)[:100]}") from None
    return from_tagged(raw)


def canonical(v) -> bytes:
    """Order-independent encoding (sets and dicts sorted), so equal values give equal bytes."""
    def enc(x, depth: int):
        if depth > MAX_DEPTH:
            raise CodecError("value nested too deeply")
        t = type(x)
        d = depth + 1
        if t in (set, frozenset):
            return {"s" if t is set else "fs": sorted((enc(e, d) for e in x), key=_key)}
        if t is dict or t in _DICT_LIKE:
            return {"d": sorted(([enc(k, d), enc(e, d)] for k, e in x.items()), key=_key)}
        if t in (list, tuple):
            return {"l" if t is list else "t": [enc(e, d) for e in x]}
        return to_tagged(x, depth)

    return json.dumps(enc(v, 0), separators=(",", ":")).encode()


def _key(item) -> str:
    return json.dumps(item, separators=(",", ":"))


def digest(v) -> str:
    return hashlib.sha256(canonical(v)).hexdigest()
