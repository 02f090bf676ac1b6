"""A small seccomp-BPF deny list, assembled by hand (stdlib only; imported by the launcher).

Namespaces already isolate the sandbox; this filter removes the kernel surface an escape would need
(mount, ptrace, new namespaces, bpf, keyrings, io_uring, ...) and every socket family but AF_UNIX.
"""

from __future__ import annotations

import ctypes
import struct

from _linux import MACHINE, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, prctl  # type: ignore[import-not-found]

_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_DENY = {  # name -> (x86_64 nr, aarch64 nr)
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51),
    "unshare": (272, 97), "setns": (308, 268), "ptrace": (101, 117), "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271), "kexec_load": (246, 104), "kexec_file_load": (320, 294),
    "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106), "bpf": (321, 280),
    "perf_event_open": (298, 241), "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "userfaultfd": (323, 282), "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264),
    "reboot": (169, 142), "swapon": (167, 224), "swapoff": (168, 225), "syslog": (103, 116), "acct": (163, 89),
    "settimeofday": (164, 170), "clock_settime": (227, 112), "open_tree": (428, 428), "move_mount": (429, 429),
    "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
    "mount_setattr": (442, 442), "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
}
_SOCKET = {"x86_64": 41, "aarch64": 198}
_CLONE = {"x86_64": 56, "aarch64": 220}
_CLONE3 = 435
_CLONE_NEW_MASK = 0x7E020080  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|NEWTIME
_AF_UNIX, _AF_INET, _AF_INET6, _AF_NETLINK, _EPERM, _ENOSYS, _EAFNOSUPPORT = 1, 2, 10, 16, 1, 38, 97

_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_ALLOW, _RET_KILL_PROCESS, _RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_OFF_NR, _OFF_ARCH, _OFF_ARG0 = 0, 4, 16  # struct seccomp_data; arg0's low word on little-endian


def supported() -> bool:
    return MACHINE in _AUDIT_ARCH


def _ins(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def program(allow_inet: bool = False) -> bytes:
    """The filter as raw `struct sock_filter` bytes. `allow_inet` also admits AF_INET/AF_INET6/AF_NETLINK sockets (for a
    sample in its own network namespace, where only its private loopback exists)."""
    idx = 0 if MACHINE == "x86_64" else 1
    p = [_ins(_LD_W_ABS, _OFF_ARCH), _ins(_JEQ_K, _AUDIT_ARCH[MACHINE], 1, 0), _ins(_RET_K, _RET_KILL_PROCESS),
         _ins(_LD_W_ABS, _OFF_NR)]
    if MACHINE == "x86_64":  # the x32 ABI aliases every syscall at nr | 0x40000000
        p += [_ins(_JGE_K, 0x40000000, 0, 1), _ins(_RET_K, _RET_ERRNO | _EPERM)]
    for nrs in _DENY.values():
        p += [_ins(_JEQ_K, nrs[idx], 0, 1), _ins(_RET_K, _RET_ERRNO | _EPERM)]
    p += [_ins(_JEQ_K, _CLONE3, 0, 1), _ins(_RET_K, _RET_ERRNO | _ENOSYS)]  # libc falls back to clone()
    if allow_inet:
        # netlink too: getifaddrs() (gloo looks up the loopback interface) reads the private netns over it.
        p += [_ins(_JEQ_K, _SOCKET[MACHINE], 0, 7), _ins(_LD_W_ABS, _OFF_ARG0), _ins(_JEQ_K, _AF_UNIX, 3, 0),
              _ins(_JEQ_K, _AF_INET, 2, 0), _ins(_JEQ_K, _AF_INET6, 1, 0), _ins(_JEQ_K, _AF_NETLINK, 0, 1),
              _ins(_RET_K, _RET_ALLOW), _ins(_RET_K, _RET_ERRNO | _EAFNOSUPPORT)]
    else:
        p += [_ins(_JEQ_K, _SOCKET[MACHINE], 0, 4), _ins(_LD_W_ABS, _OFF_ARG0), _ins(_JEQ_K, _AF_UNIX, 0, 1),
              _ins(_RET_K, _RET_ALLOW), _ins(_RET_K, _RET_ERRNO | _EAFNOSUPPORT)]
    p += [_ins(_JEQ_K, _CLONE[MACHINE], 0, 3), _ins(_LD_W_ABS, _OFF_ARG0), _ins(_JSET_K, _CLONE_NEW_MASK, 0, 1),
          _ins(_RET_K, _RET_ERRNO | _EPERM)]
    p += [_ins(_RET_K, _RET_ALLOW)]
    return b"".join(p)


class _FProg(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(allow_inet: bool = False) -> None:
    """Install the filter on the calling thread (inherited by children, kept across exec)."""
    if not supported():
        raise OSError(38, f"seccomp filter: unsupported architecture {MACHINE}")
    code = program(allow_inet)
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _FProg(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    prctl(PR_SET_SECCOMP, 2, ctypes.addressof(prog))
