"""Run a command the way systemd's ``MemoryDenyWriteExecute=yes`` would.

``python memory_deny_write_execute.py PROGRAM ARGS...`` installs a seccomp
filter with the rule systemd installs for that option (``mmap`` of memory
both writable and executable, and ``mprotect``/``pkey_mprotect`` adding
execute permission, fail with ``EPERM``), sets ``no_new_privs`` (needed to
install a filter without ``CAP_SYS_ADMIN``; the proxy unit sets it anyway)
and then ``exec``\\ s ``PROGRAM``: the filter stays for the life of that
process and its children.

The tests use it to run the real proxy under the same restriction its unit
has, without systemd as PID 1. A hand-written BPF program rather than
``prctl(PR_SET_MDWE)``: the latter needs Linux 6.3, Debian 12 ships 6.1.
"""
import ctypes
import os
import platform
import struct
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
EPERM = 1
PROT_WRITE, PROT_EXEC = 0x2, 0x4

# (AUDIT_ARCH_*, mmap, mprotect, pkey_mprotect) per machine.
SYSCALLS = {
    "x86_64": (0xC000003E, 9, 10, 329),
    "aarch64": (0xC00000B7, 222, 226, 288),
}

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]
_NR, _ARCH, _ARG2_LOW = 0, 4, 16 + 2 * 8

_LD_W_ABS, _JEQ_K, _JSET_K, _AND_K, _RET_K = 0x20, 0x15, 0x45, 0x54, 0x06


def _insn(code: int, jt: int = 0, jf: int = 0, k: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def filter_program(machine: str) -> bytes:
    """The BPF program for ``machine`` (``platform.machine()``).

    Other architectures' system calls are allowed (only the native ABI is
    checked; the proxy unit adds ``SystemCallArchitectures=native``)."""
    arch, mmap, mprotect, pkey_mprotect = SYSCALLS[machine]
    return b"".join([
        _insn(_LD_W_ABS, k=_ARCH),                 # 0
        _insn(_JEQ_K, 0, 9, arch),                 # 1: else -> 11 allow
        _insn(_LD_W_ABS, k=_NR),                   # 2
        _insn(_JEQ_K, 2, 0, mmap),                 # 3: -> 6
        _insn(_JEQ_K, 4, 0, mprotect),             # 4: -> 9
        _insn(_JEQ_K, 3, 5, pkey_mprotect),        # 5: -> 9, else -> 11
        _insn(_LD_W_ABS, k=_ARG2_LOW),             # 6: mmap's prot
        _insn(_AND_K, k=PROT_WRITE | PROT_EXEC),   # 7
        _insn(_JEQ_K, 3, 2, PROT_WRITE | PROT_EXEC),  # 8: -> 12 deny, else -> 11
        _insn(_LD_W_ABS, k=_ARG2_LOW),             # 9: mprotect's prot
        _insn(_JSET_K, 1, 0, PROT_EXEC),           # 10: -> 12 deny
        _insn(_RET_K, k=SECCOMP_RET_ALLOW),        # 11
        _insn(_RET_K, k=SECCOMP_RET_ERRNO | EPERM),  # 12
    ])


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install() -> None:
    """Deny write+execute memory to this process from now on (and to what it
    ``exec``\\ s). Raises ``OSError`` if the kernel refuses the filter."""
    program = filter_program(platform.machine())
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


if __name__ == "__main__":
    install()
    os.execvp(sys.argv[1], sys.argv[1:])
