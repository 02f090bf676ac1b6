"""Landlock (Linux >= 5.13) through raw syscalls: confine writes to a few trees, block TCP and signals out.

Stdlib only (imported by the launcher). Rights the running kernel does not know are left out, so one
ruleset works on every ABI version.
"""

from __future__ import annotations

import ctypes
import os

from _linux import PR_SET_NO_NEW_PRIVS, errno, prctl, syscall  # type: ignore[import-not-found]

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446  # same on x86_64 and aarch64
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2
SCOPE_ABSTRACT_UNIX, SCOPE_SIGNAL = 1, 2

_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
READ_RIGHTS = EXECUTE | READ_FILE | READ_DIR


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def abi_version() -> int:
    """Landlock ABI of the running kernel, 0 when unavailable."""
    v = syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(int(v), 0)


def restrict(read_paths: list[str], write_paths: list[str], write_files: list[str], block_tcp: bool = True) -> int:
    """Allow read+exec under `read_paths`, everything under `write_paths`, read/write on `write_files`;
    deny all other filesystem access, TCP bind/connect and signals to processes outside. Returns the ABI."""
    abi = abi_version()
    if abi < 1:
        raise OSError(38, "landlock unavailable")
    fs = _FS_BY_ABI.get(abi, _FS_BY_ABI[5])
    attr = _RulesetAttr(fs, 0, 0)
    size = 8
    if abi >= 4:
        attr.handled_access_net, size = (NET_BIND_TCP | NET_CONNECT_TCP) if block_tcp else 0, 16
    if abi >= 6:
        attr.scoped, size = SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL, 24
    rfd = syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if rfd < 0:
        raise OSError(errno(), "landlock_create_ruleset failed")
    try:
        for paths, rights in ((read_paths, READ_RIGHTS & fs), (write_paths, fs), (write_files, FILE_RIGHTS & fs)):
            for p in paths:
                if not os.path.exists(p):
                    continue
                fd = os.open(p, os.O_PATH | os.O_CLOEXEC)
                try:
                    allowed = rights if os.path.isdir(p) else rights & FILE_RIGHTS
                    rule = _PathBeneath(allowed, fd)
                    if syscall(_SYS_ADD_RULE, ctypes.c_int(rfd), ctypes.c_int(_RULE_PATH_BENEATH),
                               ctypes.byref(rule), ctypes.c_uint32(0)) < 0:
                        raise OSError(errno(), f"landlock_add_rule {p}")
                finally:
                    os.close(fd)
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        if syscall(_SYS_RESTRICT_SELF, ctypes.c_int(rfd), ctypes.c_uint32(0)) < 0:
            raise OSError(errno(), "landlock_restrict_self failed")
    finally:
        os.close(rfd)
    return abi
