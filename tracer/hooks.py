"""BPF programs attached to cgroups that act on bind(): ``cgroup/bind4`` and
``cgroup/bind6`` run before the kernel's own checks and may refuse the bind
(EPERM) or rewrite its address and port; ``cgroup/post_bind4`` and
``post_bind6`` run once the port is taken and may refuse it (EPERM, the port
given back). Programs attached to a cgroup apply to its descendants too.

portscope cannot run them (sock_addr programs have no test run), so it names
them: which program, at which hook, attached where on the caller's cgroup
path, as the possible cause of an EPERM and a caveat to any other answer.
Found with BPF_PROG_QUERY on each cgroup from the caller's up to the root.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import libbpf
from .cgroups import cgroup2_root

# enum bpf_attach_type (include/uapi/linux/bpf.h)
HOOKS = {"bind4": 8, "bind6": 9, "post_bind4": 12, "post_bind6": 13}
FAMILY_HOOKS = {"ipv4": ("bind4", "post_bind4"), "ipv6": ("bind6", "post_bind6", "bind4",
                                                          "post_bind4")}


@dataclass(frozen=True)
class Hook:
    hook: str  # bind4 | bind6 | post_bind4 | post_bind6
    program_id: int
    name: str
    cgroup: str  # where it is attached, relative to the cgroup2 root ("/" for the root)

    def to_json(self) -> dict[str, object]:
        return {"hook": self.hook, "program_id": self.program_id, "name": self.name,
                "cgroup": self.cgroup}


def on_path(cgroup: str | None, hooks: tuple[str, ...] = tuple(HOOKS)) -> list[Hook]:
    """The bind programs that apply to a process in ``cgroup`` (a cgroup2
    path such as /system.slice/nginx.service; None: portscope's own)."""
    root = cgroup2_root()
    if root is None:
        return []
    path = cgroup if cgroup is not None else _own_cgroup()
    found: list[Hook] = []
    parts = [p for p in (path or "/").split("/") if p]
    for depth in range(len(parts), -1, -1):
        where = "/" + "/".join(parts[:depth])
        found += attached(root, where, hooks)
    return found


def attached(root: str, where: str, hooks: tuple[str, ...] = tuple(HOOKS)) -> list[Hook]:
    """The bind programs attached to the cgroup ``where`` itself."""
    try:
        fd = os.open(os.path.join(root, where.lstrip("/")), os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return []
    out = []
    try:
        for hook in hooks:
            try:
                ids = libbpf.attached_programs(fd, HOOKS[hook])
            except OSError:
                continue  # a kernel without this hook, or no permission
            out += [Hook(hook, pid, libbpf.program_name(pid), where) for pid in ids]
    finally:
        os.close(fd)
    return out


def everywhere() -> list[Hook]:
    """Every bind program attached anywhere in the cgroup2 hierarchy (doctor)."""
    root = cgroup2_root()
    if root is None:
        return []
    out = []
    for dirpath, _dirs, _files in os.walk(root):
        where = "/" if dirpath == root else "/" + os.path.relpath(dirpath, root)
        out += attached(root, where)
    return out


def _own_cgroup() -> str | None:
    from .cgroups import cgroup_of

    return cgroup_of(os.getpid())
