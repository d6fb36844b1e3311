"""Where the running kernel keeps a task's name and credentials, from its own BTF.

The connect programs key each flow by the process name and uid. The helpers
that read them (bpf_get_current_comm, bpf_get_current_uid_gid) cost about 70
ns per connect here, and two loads from the current task cost a few: the
programs read task->comm and task->cred->uid/gid straight through
bpf_get_current_task_btf() when the offsets below are known
(docs/decisions/task-fields-from-btf.md).
The offsets come from /sys/kernel/btf/vmlinux, which describes this very
kernel, never from the kernel headers BCC compiles with (they may be another
version's). libbpf, which BCC depends on, parses it in about 10 ms.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator
from typing import NamedTuple

TASK_COMM_LEN = 16  # the flow key's name: what bpf_get_current_comm copies
# BTF type kinds (include/uapi/linux/btf.h)
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_ENUM, KIND_FUNC = 1, 2, 3, 4, 6, 12
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG = 8, 9, 10, 11, 18
QUALIFIERS = (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG)


class TaskFields(NamedTuple):
    """Byte offsets: task_struct.comm and .cred, and uid and gid in struct cred."""

    comm: int
    cred: int
    uid: int
    gid: int

    def cflags(self) -> list[str]:
        return [
            f"-DEA_TASK_COMM={self.comm}",
            f"-DEA_TASK_CRED={self.cred}",
            f"-DEA_CRED_UID={self.uid}",
            f"-DEA_CRED_GID={self.gid}",
        ]


class _Type(NamedTuple):
    kind: int
    size_or_type: int  # a struct's size; what a pointer, typedef or qualifier refers to
    address: int  # of the struct btf_type, whose kind's data follows it
    vlen: int
    kind_flag: bool


class _Btf:
    """The kernel's BTF through libbpf's btf__* functions (a stable ABI since libbpf 0.5)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.handle = lib.btf__load_vmlinux_btf()
        if not self.handle:
            raise OSError("no kernel BTF")

    def find_struct(self, name: str) -> int:
        return int(self.lib.btf__find_by_name_kind(self.handle, name.encode(), KIND_STRUCT))

    def enum_names(self, name: str) -> set[str]:
        """The value names of an enum (none if the kernel has no such enum)."""
        enum_id = int(self.lib.btf__find_by_name_kind(self.handle, name.encode(), KIND_ENUM))
        if enum_id <= 0:
            return set()
        enum = self.type(enum_id)
        words = (ctypes.c_uint32 * (2 * enum.vlen)).from_address(enum.address + 12)  # (name_off, value) pairs
        names = (self.lib.btf__name_by_offset(self.handle, words[2 * i]) for i in range(enum.vlen))
        return {name.decode() for name in names if name}

    def type(self, type_id: int) -> _Type:
        address = self.lib.btf__type_by_id(self.handle, type_id)
        if not address:
            raise LookupError(f"no BTF type {type_id}")
        _name, info, size_or_type = (ctypes.c_uint32 * 3).from_address(address)
        return _Type((info >> 24) & 0x1F, size_or_type, address, info & 0xFFFF, bool(info >> 31))

    def resolved(self, type_id: int) -> _Type:
        """The type behind typedefs and qualifiers."""
        for _ in range(32):
            found = self.type(type_id)
            if found.kind not in QUALIFIERS:
                return found
            type_id = found.size_or_type
        raise LookupError("a typedef chain too long")

    def members(self, struct: _Type) -> dict[str, tuple[int, int]]:
        """name -> (type id, byte offset) of a struct's named, byte-aligned members (bitfields left out)."""
        words = (ctypes.c_uint32 * (3 * struct.vlen)).from_address(struct.address + 12)
        found = {}
        for i in range(struct.vlen):
            name_off, type_id, offset = words[3 * i : 3 * i + 3]
            bit_size, bit_offset = (offset >> 24, offset & 0xFFFFFF) if struct.kind_flag else (0, offset)
            if bit_size or bit_offset % 8:
                continue
            name = self.lib.btf__name_by_offset(self.handle, name_off)
            if name:
                found[name.decode()] = (type_id, bit_offset // 8)
        return found

    def close(self) -> None:
        self.lib.btf__free(self.handle)


def _libbpf() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL("libbpf.so.1")
    except OSError:  # find_library runs ldconfig: only when the usual name is not there
        from ctypes.util import find_library

        name = find_library("bpf")
        if name is None:
            return None
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            return None
    try:
        lib.btf__load_vmlinux_btf.restype = ctypes.c_void_p
        lib.btf__find_by_name_kind.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]
        lib.btf__find_by_name_kind.restype = ctypes.c_int32
        lib.btf__type_by_id.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        lib.btf__type_by_id.restype = ctypes.c_void_p
        lib.btf__name_by_offset.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        lib.btf__name_by_offset.restype = ctypes.c_char_p
        lib.btf__free.argtypes = [ctypes.c_void_p]
    except AttributeError:  # a libbpf before 0.5
        return None
    return lib


@contextlib.contextmanager
def _kernel_btf() -> Iterator[_Btf | None]:
    """The running kernel's BTF through libbpf, closed after use; None where either is missing."""
    lib = _libbpf()
    try:
        btf = _Btf(lib) if lib is not None else None
    except OSError:
        btf = None
    try:
        yield btf
    finally:
        if btf is not None:
            btf.close()


def function_btf_ids(names: tuple[str, ...]) -> list[int] | None:
    """The BTF type ids of kernel functions (0 or less: not found); None without kernel BTF."""
    with _kernel_btf() as btf:
        if btf is None:
            return None
        return [int(btf.lib.btf__find_by_name_kind(btf.handle, name.encode(), KIND_FUNC)) for name in names]


@functools.cache
def task_fields() -> TaskFields | None:
    """The offsets, checked to be what the programs read (a 16-byte char array at an 8-byte offset, a
    pointer to struct cred, two 4-byte ids); None where the kernel has no BTF, no
    bpf_get_current_task_btf helper (5.11+), or they are not so."""
    with _kernel_btf() as btf:
        if btf is None:
            return None
        try:
            return _task_fields(btf)
        except LookupError:
            return None


def _task_fields(btf: _Btf) -> TaskFields | None:
    if "BPF_FUNC_get_current_task_btf" not in btf.enum_names("bpf_func_id"):
        return None
    task_id, cred_id = btf.find_struct("task_struct"), btf.find_struct("cred")
    if task_id <= 0 or cred_id <= 0:
        return None
    cred_struct = btf.type(cred_id)
    task = btf.members(btf.type(task_id))
    cred = btf.members(cred_struct)
    if not {"comm", "cred"} <= task.keys() or not {"uid", "gid"} <= cred.keys():
        return None
    comm_type, comm = task["comm"]
    cred_type, cred_at = task["cred"]
    array = btf.resolved(comm_type)
    if array.kind != KIND_ARRAY or comm % 8:
        return None
    element, _index, length = (ctypes.c_uint32 * 3).from_address(array.address + 12)
    char = btf.resolved(element)
    if char.kind != KIND_INT or char.size_or_type != 1 or length != TASK_COMM_LEN:
        return None
    pointer = btf.resolved(cred_type)
    if pointer.kind != KIND_PTR or btf.resolved(pointer.size_or_type).address != cred_struct.address:
        return None
    ids = []
    for name in ("uid", "gid"):
        id_type, at = cred[name]
        if btf.resolved(id_type).size_or_type != 4 or at % 4:  # kuid_t / kgid_t: a struct of one u32
            return None
        ids.append(at)
    return TaskFields(comm=comm, cred=cred_at, uid=ids[0], gid=ids[1])
