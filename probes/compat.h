/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * compat.h: what lets portscope.bpf.c be compiled by two compilers.
 *
 *   libbpf (default)  scripts/build-probes compiles a CO-RE object against
 *                     vmlinux.h; libbpf relocates field offsets at load time.
 *   bcc (PS_BCC)      tracer/bcc_engine.py compiles the same file at run time
 *                     against the running kernel's own headers, on hosts
 *                     where CO-RE cannot work (no kernel BTF) but the headers
 *                     are installed. Offsets come from the headers; the CO-RE
 *                     read macros still work (relocations are simply not
 *                     applied, and the compiler's own offsets are right).
 *
 * The program source uses only what both sides define here: the map
 * declaration macros, the map operations, PS_CFG() for the configuration,
 * and libbpf's SEC and BPF_CORE_READ spelling. Kprobes are written out
 * (ctx, PT_REGS_PARMn, PT_REGS_RC), which both sides understand: bcc's
 * rewriter cannot work on a function that a macro made. Programs
 * that need BTF at load time (fentry, tp_btf, iterators) are compiled for
 * libbpf only (#ifndef PS_BCC).
 */
#ifndef PORTSCOPE_COMPAT_H
#define PORTSCOPE_COMPAT_H

#ifndef PS_BCC /* ---------------------------------------------------------- */

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>

#define PS_MAP(kind, name, key_t, value_t, entries, flags)                  \
	struct {                                                             \
		__uint(type, kind);                                          \
		__uint(max_entries, entries);                                \
		__uint(map_flags, flags);                                    \
		__type(key, key_t);                                          \
		__type(value, value_t);                                      \
	} name SEC(".maps")
#define PS_HASH(name, k, v, n) PS_MAP(BPF_MAP_TYPE_HASH, name, k, v, n, 0)
#define PS_LRU_HASH(name, k, v, n) PS_MAP(BPF_MAP_TYPE_LRU_HASH, name, k, v, n, 0)
#define PS_PERCPU_HASH_LAZY(name, k, v, n) \
	PS_MAP(BPF_MAP_TYPE_PERCPU_HASH, name, k, v, n, BPF_F_NO_PREALLOC)
#define PS_HASH_LAZY(name, k, v, n) PS_MAP(BPF_MAP_TYPE_HASH, name, k, v, n, BPF_F_NO_PREALLOC)
#define PS_ARRAY(name, v, n) PS_MAP(BPF_MAP_TYPE_ARRAY, name, __u32, v, n, 0)
#define PS_PERCPU_ARRAY(name, v, n) PS_MAP(BPF_MAP_TYPE_PERCPU_ARRAY, name, __u32, v, n, 0)
/* Resized by the collector before load (tracer/engine.py). */
#define PS_RINGBUF(name)                                                     \
	struct {                                                             \
		__uint(type, BPF_MAP_TYPE_RINGBUF);                          \
		__uint(max_entries, 4 << 20);                                \
	} name SEC(".maps")

#define PS_LOOKUP(map, key) bpf_map_lookup_elem(&map, key)
#define PS_UPDATE(map, key, value) bpf_map_update_elem(&map, key, value, BPF_ANY)
#define PS_INSERT(map, key, value) bpf_map_update_elem(&map, key, value, BPF_NOEXIST)
#define PS_DELETE(map, key) bpf_map_delete_elem(&map, key)
#define PS_RESERVE(ring, size) bpf_ringbuf_reserve(&ring, size, 0)
#define PS_SUBMIT(ring, record) bpf_ringbuf_submit(record, 0)
#define PS_OUTPUT(ring, data, size) bpf_ringbuf_output(&ring, data, size, 0)

/* The configuration is read-only data, set by the collector before load. */
#define PS_CFG(field) (ps_config.field)

/* Field existence is decided at load time, from the kernel's BTF. */
#define PS_MAY_HAVE_INET_FLAGS 1
#define PS_MAY_HAVE_INET_BITFIELDS 1
#define PS_FIELD_EXISTS(type, field) bpf_core_field_exists(type, field)

/* The kernel's bind tables changed shape: before 6.8 a port's bucket lists
 * its sockets (inet_bind_bucket.owners); since then it lists one bucket per
 * address (inet_bind2_bucket, through .bhash2), and those list the sockets.
 * Since 6.1 (TCP) and 6.2 (UDP) a namespace may have its own tables. */
#define PS_MAY_HAVE_TB_OWNERS 1
#define PS_MAY_HAVE_TB_BHASH2 1
#define PS_MAY_HAVE_PERNET_HASHINFO 1
#define PS_MAY_HAVE_PERNET_UDP_TABLE 1
#define PS_TB_HAS_OWNERS() bpf_core_field_exists(struct inet_bind_bucket___old, owners)
/* Sizes and offsets of kernel types, relocated at load time. */
#define PS_TYPE_SIZE(type) bpf_core_type_size(type)
#define PS_FIELD_OFFSET(type, field) bpf_core_field_offset(type, field)

/* Bitfields: CO-RE reads them in place. */
#define PS_BITFIELDS_OF(ptr) 1
#define PS_BITFIELD(ptr, field) BPF_CORE_READ_BITFIELD_PROBED(ptr, field)

#else /* PS_BCC --------------------------------------------------------------- */

/* bcc has already included its helpers (bpf_probe_read_kernel, bpf_ntohs,
 * BPF_TABLE...) and the kernel's basic headers. */
#include <linux/version.h>
#include <linux/types.h>
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 2, 0)
/* bcc compiles with its own copy of the BPF UAPI header, which in Debian
 * 12's bcc 0.26 predates these structs (Linux 6.3 to 6.10); the kernel's
 * own headers take their sizes, and nothing compiles without them (bcc
 * issues 5444 and 5451 are the same with later ones). Their UAPI layouts,
 * for the kernels whose headers need them; none is used here. */
struct bpf_rb_root {
	__u64 __opaque[2];
} __attribute__((aligned(8)));
struct bpf_rb_node {
	__u64 __opaque[4];
} __attribute__((aligned(8)));
struct bpf_refcount {
	__u32 __opaque[1];
} __attribute__((aligned(4)));
struct bpf_wq {
	__u64 __opaque[2];
} __attribute__((aligned(8)));
#endif
#include <linux/fs.h>
#include <linux/fdtable.h>
#include <linux/net.h>
#include <net/sock.h>
#include <net/inet_sock.h>
#include <net/inet_hashtables.h>
#include <net/udp.h>
#include <linux/skbuff.h>
/* libbpf's read macros need nothing but bpf_probe_read_kernel. They come
 * from the system's libbpf headers (bcc is given -idirafter /usr/include).
 * Without CO-RE, their access-index marker must be a plain expression:
 * bcc's LLVM pipeline has no pass that lowers it. */
#define __builtin_preserve_access_index(x) (x)
#include <bpf/bpf_core_read.h>

#define SEC(name) /* bcc names and places each program itself */

#define PS_HASH(name, k, v, n) BPF_TABLE("hash", k, v, name, n)
#define PS_LRU_HASH(name, k, v, n) BPF_TABLE("lru_hash", k, v, name, n)
#define PS_PERCPU_HASH_LAZY(name, k, v, n) \
	BPF_F_TABLE("percpu_hash", k, v, name, n, BPF_F_NO_PREALLOC)
#define PS_HASH_LAZY(name, k, v, n) BPF_F_TABLE("hash", k, v, name, n, BPF_F_NO_PREALLOC)
#define PS_ARRAY(name, v, n) BPF_TABLE("array", __u32, v, name, n)
#define PS_PERCPU_ARRAY(name, v, n) BPF_TABLE("percpu_array", __u32, v, name, n)
/* Sizes are compile-time constants here: the engine passes them with -D. */
#define PS_RINGBUF(name) BPF_RINGBUF_OUTPUT(name, PS_RING_PAGES)

/* bcc's map operations are method calls on the map (ps_inflight.lookup(&k)),
 * which its rewriter must see in the source text, not inside a macro: the
 * engine spells each PS_LOOKUP/PS_UPDATE/PS_INSERT/PS_DELETE/PS_RESERVE/
 * PS_SUBMIT/PS_OUTPUT out that way before compiling (tracer/bcc_engine.py,
 * bcc_source), so these names are deliberately not defined here. */

/* No global data in bcc: the configuration is compiled in (-DPS_CFG_...). */
#define PS_CFG(field) (PS_CFG_##field)

/* The layout is the headers': only one of the two exists. */
#define PS_MAY_HAVE_INET_FLAGS (LINUX_VERSION_CODE >= KERNEL_VERSION(6, 6, 0))
#define PS_MAY_HAVE_INET_BITFIELDS (!PS_MAY_HAVE_INET_FLAGS)
#define inet_sock___pre66 inet_sock
#define PS_FIELD_EXISTS(type, field) 1 /* it compiled, so it exists */

/* The bind tables, as the headers' version has them (see the libbpf side). */
#define PS_MAY_HAVE_TB_OWNERS (LINUX_VERSION_CODE < KERNEL_VERSION(6, 8, 0))
#define PS_MAY_HAVE_TB_BHASH2 (!PS_MAY_HAVE_TB_OWNERS)
#define PS_MAY_HAVE_PERNET_HASHINFO (LINUX_VERSION_CODE >= KERNEL_VERSION(6, 1, 0))
#define PS_MAY_HAVE_PERNET_UDP_TABLE (LINUX_VERSION_CODE >= KERNEL_VERSION(6, 2, 0))
#define PS_TB_HAS_OWNERS() PS_MAY_HAVE_TB_OWNERS
#define inet_bind_bucket___old inet_bind_bucket
#define PS_TYPE_SIZE(type) sizeof(type)
#define PS_FIELD_OFFSET(type, field) offsetof(type, field)

/* Bitfields: the CO-RE builtins exist only for the BPF target, and bcc
 * parses for the host first. PS_BITFIELDS_OF points ptr at a copy of the
 * struct (ps_copy in portscope.bpf.c; 0 if it cannot be read), and the
 * compiler reads the bits from the copy. */
#define PS_BITFIELDS_OF(ptr) ((ptr) = ps_copy(ptr, sizeof(*(ptr))))
#define PS_BITFIELD(ptr, field) ((ptr)->field)

/* The tracepoint records, as the kernel's format files describe them (a
 * stable ABI). vmlinux.h has these types; kernel headers do not. */
struct trace_event_raw_sys_enter {
	__u64 common;
	long id;
	unsigned long args[6];
};

struct trace_event_raw_sys_exit {
	__u64 common;
	long id;
	long ret;
};

struct trace_event_raw_inet_sock_set_state {
	__u64 common;
	const void *skaddr;
	int oldstate;
	int newstate;
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u16 protocol;
	__u8 saddr[4];
	__u8 daddr[4];
	__u8 saddr_v6[16];
	__u8 daddr_v6[16];
};

#endif /* PS_BCC */

#endif /* PORTSCOPE_COMPAT_H */
