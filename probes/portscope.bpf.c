// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * portscope.bpf.c: every probe portscope can load, in one CO-RE object.
 *
 * Three probe plans share this object and one event schema (portscope.h); the
 * collector chooses which programs to load (tracer/plans.py):
 *
 *   tracepoint  syscalls:sys_{enter,exit}_{bind,listen,connect} only; the
 *               socket is read from the fd with CO-RE.
 *   kprobe      the same, plus kprobe/kretprobe on inet_csk_get_port, which
 *               marks the calls where the port allocator itself said no, and
 *               catches refusals outside any system call (io_uring, kernel).
 *   fentry      fentry/fexit on __sys_{bind,listen,connect} instead of the
 *               syscall tracepoints, and fexit on inet_csk_get_port.
 *
 * Why fentry leaves the syscall tracepoints: attaching any of them marks
 * every task of the host for the slow system-call path (the tracepoints hang
 * off the syscall entry and exit work, for all syscalls), so every syscall
 * of every process pays, not only bind/listen/connect. A trampoline on the
 * three kernel functions costs only their callers. The kprobe plan keeps the
 * tracepoints: a kretprobe has a fixed pool of return instances (about two
 * per CPU), and blocking connect() calls that wait on the network would
 * exhaust it and lose their results.
 *
 * Hot-path rule: successful calls cost a map update and a delete; only calls
 * the user asked to see (by default the failures) reach the ring buffer.
 */
#include "compat.h"
#include "portscope.h"

#ifndef PS_BCC /* vmlinux.h has types only; kernel headers define these */
#define AF_UNSPEC 0
#define AF_INET 2
#define AF_INET6 10
#define S_IFMT 00170000
#define S_IFSOCK 0140000
#define EINPROGRESS 115
#define EADDRINUSE 98
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define TCP_FIN_WAIT1 4
#define TCP_CLOSE 7
#define TCP_LISTEN 10
#define TCP_TIME_WAIT 6
#define TCP_NEW_SYN_RECV 12

char LICENSE[] SEC("license") = "Dual BSD/GPL";

const volatile struct ps_config ps_config = {};

/* Anchors so that the BTF of this object describes the shared types; the
 * Python layout is generated from it (scripts/build-probes). */
struct ps_btf_anchor {
	struct ps_event event;
	struct ps_config config;
	enum ps_kind kind;
	enum ps_plan plan;
	enum ps_opt opt;
	enum ps_quality quality;
	enum ps_counter counter;
	struct ps_sockinfo sockinfo;
	struct ps_fileinfo fileinfo;
	struct ps_conn_key conn_key;
	struct ps_closer closer;
	struct ps_proc_args proc_args;
	enum ps_group_flag group_flag;
	struct ps_member_count member_count;
	struct ps_event_blocked event_blocked;
	struct ps_binder binder;
	enum ps_capture capture;
};
const struct ps_btf_anchor *ps_btf_anchor __attribute__((unused));
#endif /* !PS_BCC */

PS_RINGBUF(ps_events);
PS_PERCPU_ARRAY(ps_counters, __u64, PS_CNT_MAX);

/* What sys_enter_* saw, waiting for sys_exit_* of the same thread. */
struct inflight {
	__u64 uaddr;            /* user sockaddr of bind()/connect() */
	__u64 sk;               /* struct sock *, read again at exit */
	__u64 sock_inode;
	__u32 netns;
	__u32 sock_uid;
	__s32 bound_dev_if;
	__u16 pre_port;         /* listen(): the port bound before the call */
	__u8 kind;
	__u8 family;
	__u8 protocol;
	__u8 opts;
	__u8 quality;
	__u8 pad;
	__u8 pre_addr[PS_ADDR_LEN];
};

/* pid_tgid -> the call in flight. Resized by the collector before load
 * (bcc: -DPS_INFLIGHT_ENTRIES); a call that finds it full is counted. */
#ifndef PS_INFLIGHT_ENTRIES
#define PS_INFLIGHT_ENTRIES 16384
#endif
PS_HASH(ps_inflight, __u64, struct inflight, PS_INFLIGHT_ENTRIES);

/* Before 6.6 (commit 4bd0623f04ee, "inet: move inet->freebind to
 * inet->inet_flags", and its siblings) these options were bitfields. */
#ifndef PS_BCC /* bcc reads the real struct inet_sock of its headers */
struct inet_sock___pre66 {
	__u8 freebind : 1;
	__u8 transparent : 1;
	__u8 bind_address_no_port : 1;
} __attribute__((preserve_access_index));
#endif

static __always_inline void count(__u32 idx)
{
	__u64 *v = PS_LOOKUP(ps_counters, &idx);

	if (v)
		*v += 1;
}

/* The socket behind a file descriptor of the current task, or NULL when the
 * fd is not a socket. */
static __always_inline struct sock *fd_to_sock(int fd, __u64 *inode)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds;
	struct file *file = NULL;
	struct socket *sock;

	if (fd < 0 || !fdt || (unsigned int)fd >= BPF_CORE_READ(fdt, max_fds))
		return NULL;
	fds = BPF_CORE_READ(fdt, fd);
	if (bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]) || !file)
		return NULL;
	if ((BPF_CORE_READ(file, f_inode, i_mode) & S_IFMT) != S_IFSOCK)
		return NULL;
	*inode = BPF_CORE_READ(file, f_inode, i_ino);
	sock = BPF_CORE_READ(file, private_data);
	return sock ? BPF_CORE_READ(sock, sk) : NULL;
}

#ifdef PS_BCC
/* bcc has no CO-RE bitfield reads: a struct with bitfields is copied here
 * whole, and the compiler extracts the bits from the copy (PS_BITFIELDS_OF). */
struct ps_scratch_area {
	union {
		struct sock_common common;
		struct inet_sock inet;
	};
};
PS_PERCPU_ARRAY(ps_scratch, struct ps_scratch_area, 1);

static __always_inline void *ps_copy(const void *src, __u32 size)
{
	__u32 zero = 0;
	void *copy = PS_LOOKUP(ps_scratch, &zero);

	if (copy && bpf_probe_read_kernel(copy, size, src))
		return NULL;
	return copy;
}
#endif

/* The options kept in sock_common: valid for TIME_WAIT and request sockets too. */
static __always_inline __u8 read_common_opts(struct sock_common *skc)
{
	__u8 opts = 0;

	if (!PS_BITFIELDS_OF(skc))
		return 0;
	if (PS_BITFIELD(skc, skc_reuse))
		opts |= PS_OPT_REUSEADDR;
	if (PS_BITFIELD(skc, skc_reuseport))
		opts |= PS_OPT_REUSEPORT;
	if (PS_BITFIELD(skc, skc_ipv6only))
		opts |= PS_OPT_V6ONLY;
	return opts;
}

/* All options of a full socket. */
static __always_inline __u8 read_opts(struct sock *sk)
{
	__u8 opts = read_common_opts(&sk->__sk_common);

#if PS_MAY_HAVE_INET_FLAGS
	if (PS_FIELD_EXISTS(struct inet_sock, inet_flags)) {
		/* Bit numbers of the INET_FLAGS_* enum (include/net/inet_sock.h);
		 * the enum is anonymous, so CO-RE cannot relocate them. */
		unsigned long flags = BPF_CORE_READ((struct inet_sock *)sk, inet_flags);

		if (flags & (1UL << 11))
			opts |= PS_OPT_FREEBIND;
		if (flags & (1UL << 15))
			opts |= PS_OPT_TRANSPARENT;
		if (flags & (1UL << 18))
			opts |= PS_OPT_BIND_ADDRESS_NO_PORT;
		return opts;
	}
#endif
#if PS_MAY_HAVE_INET_BITFIELDS
	{
		struct inet_sock___pre66 *old = (void *)sk;

		if (!PS_BITFIELDS_OF(old))
			return opts;
		if (PS_BITFIELD(old, freebind))
			opts |= PS_OPT_FREEBIND;
		if (PS_BITFIELD(old, transparent))
			opts |= PS_OPT_TRANSPARENT;
		if (PS_BITFIELD(old, bind_address_no_port))
			opts |= PS_OPT_BIND_ADDRESS_NO_PORT;
	}
#endif
	return opts;
}

/* The local address and port a socket holds right now. */
static __always_inline __u16 read_local(struct sock *sk, __u8 family, __u8 addr[PS_ADDR_LEN])
{
	/* addr is a pointer here, so BPF_CORE_READ_INTO (which copies
	 * sizeof(*dst)) would read one byte: give the length explicitly. */
	if (family == AF_INET6)
		bpf_core_read(addr, PS_ADDR_LEN, &sk->__sk_common.skc_v6_rcv_saddr);
	else
		BPF_CORE_READ_INTO((__u32 *)addr, sk, __sk_common.skc_rcv_saddr);
	return BPF_CORE_READ(sk, __sk_common.skc_num);
}

/* Copy the sockaddr of the call; returns false when it cannot be read. */
static __always_inline bool read_sockaddr(__u64 uaddr, struct ps_event *e)
{
	const void *u = (const void *)uaddr;
	__u16 family = 0;

	if (!u || bpf_probe_read_user(&family, sizeof(family), u))
		return false;
	e->req_family = family;
	if (family == AF_INET6) {
		struct sockaddr_in6 sa6;

		if (bpf_probe_read_user(&sa6, sizeof(sa6), u))
			return false;
		e->req_port = bpf_ntohs(sa6.sin6_port);
		__builtin_memcpy(e->req_addr, &sa6.sin6_addr, PS_ADDR_LEN);
	} else if (family == AF_INET || family == AF_UNSPEC) {
		/* bind() accepts AF_UNSPEC with INADDR_ANY on AF_INET sockets. */
		struct sockaddr_in sa;

		if (bpf_probe_read_user(&sa, sizeof(sa), u))
			return false;
		e->req_port = bpf_ntohs(sa.sin_port);
		__builtin_memcpy(e->req_addr, &sa.sin_addr, 4);
	}
	return true;
}

static __always_inline int on_enter(__u8 kind, int fd, __u64 uaddr)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct inflight in = {};
	struct sock *sk;

	if (PS_CFG(target_tgid) && (id >> 32) != PS_CFG(target_tgid))
		return 0;
	sk = fd_to_sock(fd, &in.sock_inode);
	if (!sk)
		return 0;
	in.family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (in.family != AF_INET && in.family != AF_INET6)
		return 0;

	in.kind = kind;
	in.uaddr = uaddr;
	in.sk = (__u64)sk;
	in.protocol = BPF_CORE_READ(sk, sk_protocol);
	in.netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	in.sock_uid = BPF_CORE_READ(sk, sk_uid.val);
	in.bound_dev_if = BPF_CORE_READ(sk, __sk_common.skc_bound_dev_if);
	in.opts = read_opts(sk);
	if (kind == PS_KIND_LISTEN)
		in.pre_port = read_local(sk, in.family, in.pre_addr);

	if (PS_UPDATE(ps_inflight, &id, &in))
		count(PS_CNT_INFLIGHT_FULL);
	return 0;
}

/* ---- the sockets on a refused port: every plan ----------------------------- */

/* Who bound each socket that a traced bind() or listen() gave a port, keyed
 * by the kernel's address of the socket: read back when that socket blocks
 * another bind, perhaps after its process is gone. */
#ifndef PS_BINDER_ENTRIES
#define PS_BINDER_ENTRIES 16384
#endif
PS_LRU_HASH(ps_binders, __u64, struct ps_binder, PS_BINDER_ENTRIES);
/* fentry and kprobe plans: the blockers read at the allocator's refusal,
 * waiting for the exit of the same thread's call (pid_tgid -> blockers). */
PS_HASH_LAZY(ps_refusals, __u64, struct ps_blockers, 1024);
/* Where a refusal's record is assembled: too big for the BPF stack, and
 * sent with only the sockets it kept (bpf_ringbuf_output), so that a storm of
 * refusals costs the ring buffer little more than plain events. Beside it,
 * the sockets the walk chose, as kernel addresses: the walk only picks them
 * (a few reads a step, so that the verifier has little to check and loading
 * stays fast), and the kept ones are read after it. These addresses never
 * leave the kernel. One slot per kind of call: the programs that use it (the
 * exits of bind and listen, the allocator's) each run once at a time per
 * CPU, but a BPF trampoline may be preempted, so two of them must not share
 * a slot. */
struct ps_walk {
	struct ps_event_blocked rec;
	__u64 sk[PS_MAX_BLOCKERS];
	/* Counters of the walk live here, not in registers: the verifier
	 * tracks a register's exact value across the loop's steps, and would
	 * check every combination of them. */
	__u32 in_bucket;        /* sockets taken from the current address's list */
	__u8 cut;               /* a list was left before its end */
};
PS_PERCPU_ARRAY(ps_capture_scratch, struct ps_walk, PS_KIND_GET_PORT + 1);

static __always_inline struct ps_walk *scratch_for(__u32 kind)
{
	struct ps_walk *w = PS_LOOKUP(ps_capture_scratch, &kind);

	if (w)
		__builtin_memset(w, 0, sizeof(*w));
	return w;
}

/* The record sent with just the sockets kept. */
static __always_inline void send_blocked(struct ps_event_blocked *b)
{
	__u32 kept = b->blockers.front + b->blockers.back, size;

	if (kept > PS_MAX_BLOCKERS)
		kept = PS_MAX_BLOCKERS;
	/* An addition of a product of bounded values: the verifiers of older
	 * kernels (6.1) lose the bounds of a product with a negative factor. */
	size = __builtin_offsetof(struct ps_event_blocked, blockers.sock) +
	       kept * sizeof(struct ps_blocker);
	if (PS_OUTPUT(ps_events, b, size))
		count(PS_CNT_LOST);
	else
		count(PS_CNT_EMITTED);
}

#ifndef PS_BCC
struct inet_bind_bucket___old {
	struct hlist_head owners;
} __attribute__((preserve_access_index));
#endif

static __always_inline void remember_binder(__u64 id, const struct inflight *in)
{
	struct ps_binder who = { .inode = in->sock_inode, .pid = id >> 32 };
	__u64 key = in->sk;

	bpf_get_current_comm(who.comm, sizeof(who.comm));
	PS_UPDATE(ps_binders, &key, &who);
}

/* One socket found on the port, as the iterators describe sockets, plus
 * its other end and who bound it. */
static __always_inline void fill_blocker(struct ps_blocker *b, struct sock_common *skc,
					 __u8 protocol)
{
	struct sock *sk = (struct sock *)skc;
	struct ps_binder *who;
	__u64 key = (__u64)skc;
	__u8 family = BPF_CORE_READ(skc, skc_family);

	b->sock.family = family;
	b->sock.protocol = protocol;
	b->sock.state = BPF_CORE_READ(skc, skc_state);
	b->sock.netns = BPF_CORE_READ(skc, skc_net.net, ns.inum);
	b->sock.cookie = BPF_CORE_READ(skc, skc_cookie.counter);
	b->sock.bound_dev_if = BPF_CORE_READ(skc, skc_bound_dev_if);
	b->sock.port = read_local(sk, family, b->sock.addr);
	b->rport = bpf_ntohs(BPF_CORE_READ(skc, skc_dport));
	if (family == AF_INET6)
		bpf_core_read(b->raddr, PS_ADDR_LEN, &skc->skc_v6_daddr);
	else
		bpf_core_read(b->raddr, 4, &skc->skc_daddr);
	/* A TIME_WAIT socket is only its sock_common part. */
	if (protocol == IPPROTO_TCP && b->sock.state == TCP_TIME_WAIT) {
		b->sock.opts = read_common_opts(skc);
		b->tw_substate = BPF_CORE_READ((struct inet_timewait_sock *)skc, tw_substate);
		return;
	}
	b->sock.opts = read_opts(sk);
	b->sock.sock_uid = BPF_CORE_READ(sk, sk_uid.val);
	b->sock.inode = BPF_CORE_READ(sk, sk_socket, file, f_inode, i_ino);
	who = PS_LOOKUP(ps_binders, &key);
	if (who && who->inode == b->sock.inode) {
		b->binder_pid = who->pid;
		__builtin_memcpy(b->binder_comm, who->comm, PS_COMM_LEN);
	}
}

/* Pick a socket: listeners, bound sockets and UDP sockets fill the choice
 * from the front, connections and TIME_WAIT from the back, and a full
 * choice gives up a connection for a listener, so that a port with many
 * connections still shows what holds it for bind(). */
static __always_inline void keep(struct ps_walk *w, struct sock_common *skc, __u8 protocol)
{
	struct ps_blockers *out = &w->rec.blockers;
	__u8 state = BPF_CORE_READ(skc, skc_state);
	bool first = protocol != IPPROTO_TCP || state == TCP_LISTEN || state == TCP_CLOSE;
	__u32 idx;

	out->seen++;
	if (out->front + out->back >= PS_MAX_BLOCKERS) {
		if (!first || !out->back)
			return;
		out->back--; /* the innermost connection's slot is the next front one */
	}
	if (first)
		idx = out->front++;
	else
		idx = PS_MAX_BLOCKERS - 1 - out->back++;
	w->sk[idx & (PS_MAX_BLOCKERS - 1)] = (__u64)skc;
}

/* The sockets picked, read into the record in order: the front ones, then
 * the back ones. */
static __always_inline void read_kept(struct ps_walk *w, __u8 protocol)
{
	struct ps_blockers *out = &w->rec.blockers;
	__u32 front = out->front, back = out->back, kept = front + back;
	int i;

	/* Every step runs, the ones past the kept sockets doing nothing: with
	 * an early exit, a compiler computes the trip count (at most 8) and
	 * ends the loop on a pointer stepped along out->sock reaching that
	 * count's slot, a test the verifier cannot bound, so it walks on past
	 * the array (bcc's LLVM on 6.1: "R8 min value is outside of the
	 * allowed memory range"). */
	for (i = 0; i < PS_MAX_BLOCKERS; i++) {
		__u32 from = (__u32)i < front ? (__u32)i : PS_MAX_BLOCKERS - back + (i - front);
		__u64 sk;

		if ((__u32)i >= kept)
			continue;
		sk = w->sk[from & (PS_MAX_BLOCKERS - 1)];
		if (sk)
			fill_blocker(&out->sock[i & (PS_MAX_BLOCKERS - 1)], (struct sock_common *)sk,
				     protocol);
	}
}

/* TCP: the port's bucket in the bind hash (inet_bhashfn), then its sockets:
 * before 6.8 one list per port; since, one per address of the port (an
 * inet_bind2_bucket), of which the walk takes half its steps at most, so
 * that a crowded address (a wildcard listener's connections are on the
 * host's own address) does not hide the others. Each list has its newest
 * socket first: a listener comes after the connections it accepted. The
 * lists are read without the kernel's lock: a list that changes under the
 * walk can end it early (complete stays 0), never make it unsafe. */
#define PS_OWNERS_PER_ADDRESS (PS_WALK_STEPS / 2)
static __always_inline void capture_tcp(struct sock *self, __u16 port, struct ps_walk *w)
{
	struct net *net = BPF_CORE_READ(self, __sk_common.skc_net.net);
	struct inet_hashinfo *h = BPF_CORE_READ(self, __sk_common.skc_prot, h.hashinfo);
	struct hlist_node *tb_node, *tb2_node = NULL, *owner = NULL;
	struct inet_bind_bucket *tb;
	void *bucket;
	__u32 size, idx;
	bool flat = PS_TB_HAS_OWNERS();
	int i;

#if PS_MAY_HAVE_PERNET_HASHINFO
	if (!h && PS_FIELD_EXISTS(struct inet_timewait_death_row, hashinfo))
		h = BPF_CORE_READ(net, ipv4.tcp_death_row.hashinfo);
#endif
	if (!h)
		return;
	size = BPF_CORE_READ(h, bhash_size);
	idx = (port + BPF_CORE_READ(net, hash_mix)) & (size - 1);
	bucket = (void *)BPF_CORE_READ(h, bhash) + (__u64)idx * PS_TYPE_SIZE(struct inet_bind_hashbucket);
	tb_node = BPF_CORE_READ((struct inet_bind_hashbucket *)bucket, chain.first);

	for (i = 0; i < PS_WALK_STEPS; i++) {
		if (owner) {
			struct sock_common *skc =
				(void *)owner - PS_FIELD_OFFSET(struct sock_common, skc_bind_node);

			if ((void *)skc != (void *)self)
				keep(w, skc, IPPROTO_TCP);
			owner = BPF_CORE_READ(owner, next);
			if (owner && !flat && ++w->in_bucket >= PS_OWNERS_PER_ADDRESS) {
				owner = NULL;
				w->cut = 1;
			}
			continue;
		}
#if PS_MAY_HAVE_TB_BHASH2
		if (tb2_node) {
			struct inet_bind2_bucket *tb2 =
				(void *)tb2_node - PS_FIELD_OFFSET(struct inet_bind2_bucket, bhash_node);

			owner = BPF_CORE_READ(tb2, owners.first);
			w->in_bucket = 0;
			tb2_node = BPF_CORE_READ(tb2_node, next);
			continue;
		}
#endif
		if (!tb_node) {
			w->rec.blockers.complete = !w->cut;
			break;
		}
		tb = (void *)tb_node - PS_FIELD_OFFSET(struct inet_bind_bucket, node);
		if (BPF_CORE_READ(tb, port) == port && BPF_CORE_READ(tb, ib_net.net) == net) {
#if PS_MAY_HAVE_TB_OWNERS
			if (flat)
				owner = BPF_CORE_READ((struct inet_bind_bucket___old *)tb, owners.first);
#endif
#if PS_MAY_HAVE_TB_BHASH2
			if (!flat)
				tb2_node = BPF_CORE_READ(tb, bhash2.first);
#endif
		}
		tb_node = BPF_CORE_READ(tb_node, next);
	}
}

/* UDP: the port's slot in the primary hash (udp_hashfn), shared by the
 * ports equal modulo its size and by every namespace. */
static __always_inline void capture_udp(struct sock *self, __u16 port, struct ps_walk *w)
{
	struct net *net = BPF_CORE_READ(self, __sk_common.skc_net.net);
	struct udp_table *t = BPF_CORE_READ(self, __sk_common.skc_prot, h.udp_table);
	struct hlist_node *node;
	void *slot;
	__u32 idx;
	int i;

#if PS_MAY_HAVE_PERNET_UDP_TABLE
	if (!t && PS_FIELD_EXISTS(struct netns_ipv4, udp_table))
		t = BPF_CORE_READ(net, ipv4.udp_table);
#endif
	if (!t)
		return;
	idx = (port + BPF_CORE_READ(net, hash_mix)) & BPF_CORE_READ(t, mask);
	slot = (void *)BPF_CORE_READ(t, hash) + (__u64)idx * PS_TYPE_SIZE(struct udp_hslot);
	node = BPF_CORE_READ((struct udp_hslot *)slot, head.first);

	for (i = 0; i < PS_WALK_STEPS; i++) {
		struct sock_common *skc;

		if (!node) {
			w->rec.blockers.complete = 1;
			break;
		}
		skc = (void *)node - PS_FIELD_OFFSET(struct sock_common, skc_node);
		if ((void *)skc != (void *)self && BPF_CORE_READ(skc, skc_num) == port &&
		    BPF_CORE_READ(skc, skc_net.net) == net)
			keep(w, skc, IPPROTO_UDP);
		node = BPF_CORE_READ(node, next);
	}
}

static __always_inline void capture(struct sock *self, __u16 port, __u8 protocol, __u8 when,
				    struct ps_walk *w)
{
	w->rec.blockers.when = when;
	if (!port)
		return; /* a failed search for a free port: no one port to name */
	if (protocol == IPPROTO_TCP)
		capture_tcp(self, port, w);
	else if (protocol == IPPROTO_UDP)
		capture_udp(self, port, w);
	else
		return;
	read_kept(w, protocol); /* once for both walks: the verifier checks it once */
}

/* fentry and kprobe plans: the allocator refused inside a traced call. */
static __always_inline void save_refusal(__u64 id, struct sock *sk, __u16 port)
{
	struct ps_walk *w = scratch_for(PS_KIND_GET_PORT);

	if (!w)
		return;
	capture(sk, port, IPPROTO_TCP, PS_CAPTURE_REFUSAL, w);
	PS_UPDATE(ps_refusals, &id, &w->rec.blockers);
}

static __always_inline bool success_wanted(__u8 kind)
{
	return PS_CFG(success_kinds) & (1 << kind);
}

static __always_inline bool wanted(const struct inflight *in, long ret)
{
	/* A non-blocking connect() in progress is not a failure. */
	if (ret == 0 || (in->kind == PS_KIND_CONNECT && ret == -EINPROGRESS))
		return success_wanted(in->kind);
	return true;
}

static __always_inline void fill_task(struct ps_event *e, __u64 id)
{
	e->ts_ns = bpf_ktime_get_boot_ns();
	e->pid = id >> 32;
	e->tid = (__u32)id;
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->plan = PS_CFG(plan);
	bpf_get_current_comm(e->comm, sizeof(e->comm));
}

/* The --port filter, applied before any ring-buffer space is taken, so that
 * records nobody asked for neither wake the collector nor count as lost.
 * sin_port and sin6_port sit at the same offset, after the family. */
static __always_inline bool port_selected(const struct inflight *in)
{
	struct sock *sk = (struct sock *)in->sk;
	__u16 target = PS_CFG(target_port);
	__u16 head[2] = {};

	if (!target)
		return true;
	if (BPF_CORE_READ(sk, __sk_common.skc_num) == target)
		return true;
	if (in->kind == PS_KIND_LISTEN)
		return in->pre_port == target;
	if (in->uaddr && !bpf_probe_read_user(head, sizeof(head), (const void *)in->uaddr))
		return bpf_ntohs(head[1]) == target;
	return true; /* unreadable address: better shown than silently dropped */
}

/* The call's part of an event: who, what was asked, what the socket holds. */
static __always_inline void fill_call(struct ps_event *e, __u64 id, const struct inflight *in,
				      long ret)
{
	struct sock *sk = (struct sock *)in->sk;

	fill_task(e, id);
	e->ret = ret;
	e->kind = in->kind;
	e->family = in->family;
	e->protocol = in->protocol;
	e->opts = in->opts;
	e->quality = in->quality;
	e->netns = in->netns;
	e->sock_uid = in->sock_uid;
	e->sock_inode = in->sock_inode;
	e->bound_dev_if = in->bound_dev_if;

	if (in->kind == PS_KIND_LISTEN) {
		/* listen() names no address: what it asks for is what was bound. */
		e->req_family = in->family;
		e->req_port = in->pre_port;
		__builtin_memcpy(e->req_addr, in->pre_addr, PS_ADDR_LEN);
	} else if (!read_sockaddr(in->uaddr, e)) {
		e->quality |= PS_Q_ADDR_UNREADABLE;
	}
	e->bound_port = read_local(sk, in->family, e->bound_addr);
}

static __always_inline void emit_call(__u64 id, const struct inflight *in, long ret)
{
	struct ps_event *e = PS_RESERVE(ps_events, sizeof(*e));

	if (!e) {
		count(PS_CNT_LOST);
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
#ifdef PS_TEST_VERIFIER_REJECT
	/* Only in the object the error-path tests build: an unbounded index
	 * that the verifier must refuse, to prove how a rejection is reported. */
	e->comm[bpf_get_prandom_u32()] = 0;
#endif
	fill_call(e, id, in, ret);
	PS_SUBMIT(ps_events, e);
	count(PS_CNT_EMITTED);
}

/* A bind() or listen() refused with EADDRINUSE: the event and the sockets
 * that held the port, read at the allocator's refusal when a probe saw it,
 * else now. */
static __always_inline void emit_blocked(__u64 id, const struct inflight *in, long ret,
					 const __u8 kind)
{
	struct ps_walk *w = scratch_for(kind);
	/* listen() is TCP's only: its program needs no UDP walk. */
	__u8 protocol = kind == PS_KIND_LISTEN ? IPPROTO_TCP : in->protocol;
	struct ps_blockers *pending;

	if (!w) {
		count(PS_CNT_LOST);
		return;
	}
	fill_call(&w->rec.event, id, in, ret);
	/* Only a refusal seen inside this very call: an entry of the same
	 * thread left by an earlier call is not this call's. */
	pending = in->quality & PS_Q_GET_PORT_FAILED ? PS_LOOKUP(ps_refusals, &id) : NULL;
	if (pending)
		bpf_probe_read_kernel(&w->rec.blockers, sizeof(w->rec.blockers), pending);
	else
		capture((struct sock *)in->sk, w->rec.event.req_port, protocol, PS_CAPTURE_EXIT, w);
	send_blocked(&w->rec);
}

/* ``kind`` is each exit program's own constant, so that the compiler leaves
 * out what a call of that kind never needs (connect() has no blockers to
 * read): the verifier then has less to check, and loading is faster. */
static __always_inline int on_exit(long ret, const __u8 kind)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct inflight *in = PS_LOOKUP(ps_inflight, &id);
	bool refused;

	if (!in)
		return 0;
	if (in->kind != kind) { /* left by a call whose exit was not seen */
		PS_DELETE(ps_refusals, &id);
		PS_DELETE(ps_inflight, &id);
		return 0;
	}
	refused = in->quality & PS_Q_GET_PORT_FAILED;
	if (ret == 0 && kind != PS_KIND_CONNECT)
		remember_binder(id, in);
	if (wanted(in, ret) && port_selected(in)) {
		if (kind != PS_KIND_CONNECT && ret == -EADDRINUSE)
			emit_blocked(id, in, ret, kind);
		else
			emit_call(id, in, ret);
	}
	if (refused)
		PS_DELETE(ps_refusals, &id);
	PS_DELETE(ps_inflight, &id);
	return 0;
}

/* ---- system call tracepoints: tracepoint and kprobe plans ---------------- */

SEC("tracepoint/syscalls/sys_enter_bind")
int ps_enter_bind(struct trace_event_raw_sys_enter *ctx)
{
	return on_enter(PS_KIND_BIND, (int)ctx->args[0], ctx->args[1]);
}

SEC("tracepoint/syscalls/sys_exit_bind")
int ps_exit_bind(struct trace_event_raw_sys_exit *ctx)
{
	return on_exit(ctx->ret, PS_KIND_BIND);
}

SEC("tracepoint/syscalls/sys_enter_listen")
int ps_enter_listen(struct trace_event_raw_sys_enter *ctx)
{
	return on_enter(PS_KIND_LISTEN, (int)ctx->args[0], 0);
}

SEC("tracepoint/syscalls/sys_exit_listen")
int ps_exit_listen(struct trace_event_raw_sys_exit *ctx)
{
	return on_exit(ctx->ret, PS_KIND_LISTEN);
}

SEC("tracepoint/syscalls/sys_enter_connect")
int ps_enter_connect(struct trace_event_raw_sys_enter *ctx)
{
	return on_enter(PS_KIND_CONNECT, (int)ctx->args[0], ctx->args[1]);
}

SEC("tracepoint/syscalls/sys_exit_connect")
int ps_exit_connect(struct trace_event_raw_sys_exit *ctx)
{
	return on_exit(ctx->ret, PS_KIND_CONNECT);
}

/* ---- 32-bit callers: kprobe plan ------------------------------------------
 * x86's system-call tracepoints do not fire for 32-bit (compat) system calls,
 * so the kprobe plan probes their entry points as well. Only 32-bit callers
 * reach these functions: 64-bit calls pay nothing for them. bind, listen and
 * connect have entries of their own; socketcall(2) multiplexes them for C
 * libraries that still use it. Each entry takes the caller's registers,
 * where ebx, ecx and edx hold the first three arguments. The fentry plan
 * needs none of this: __sys_bind and the others are reached from every
 * entry. (x86 only: another architecture's compat entries have other names,
 * and attaching these programs is optional, see tracer/plans.py.) */
#if defined(__TARGET_ARCH_x86) || defined(PS_BCC)
#define PS_SYS_BIND 2 /* socketcall numbers, include/uapi/linux/net.h */
#define PS_SYS_CONNECT 3
#define PS_SYS_LISTEN 4

static __always_inline __u32 compat_arg(struct pt_regs *ctx, int n)
{
	struct pt_regs *regs = (struct pt_regs *)PT_REGS_PARM1(ctx);

	return n == 0 ? (__u32)BPF_CORE_READ(regs, bx)
	     : n == 1 ? (__u32)BPF_CORE_READ(regs, cx) : (__u32)BPF_CORE_READ(regs, dx);
}

SEC("kprobe/__ia32_sys_bind")
int ps_kprobe_compat_bind(struct pt_regs *ctx)
{
	return on_enter(PS_KIND_BIND, (int)compat_arg(ctx, 0), compat_arg(ctx, 1));
}

SEC("kretprobe/__ia32_sys_bind")
int ps_kretprobe_compat_bind(struct pt_regs *ctx)
{
	return on_exit((int)PT_REGS_RC(ctx), PS_KIND_BIND);
}

SEC("kprobe/__ia32_sys_listen")
int ps_kprobe_compat_listen(struct pt_regs *ctx)
{
	return on_enter(PS_KIND_LISTEN, (int)compat_arg(ctx, 0), 0);
}

SEC("kretprobe/__ia32_sys_listen")
int ps_kretprobe_compat_listen(struct pt_regs *ctx)
{
	return on_exit((int)PT_REGS_RC(ctx), PS_KIND_LISTEN);
}

SEC("kprobe/__ia32_sys_connect")
int ps_kprobe_compat_connect(struct pt_regs *ctx)
{
	return on_enter(PS_KIND_CONNECT, (int)compat_arg(ctx, 0), compat_arg(ctx, 1));
}

SEC("kretprobe/__ia32_sys_connect")
int ps_kretprobe_compat_connect(struct pt_regs *ctx)
{
	return on_exit((int)PT_REGS_RC(ctx), PS_KIND_CONNECT);
}

/* socketcall(call, args): args points to the call's arguments, 32-bit words. */
SEC("kprobe/__ia32_compat_sys_socketcall")
int ps_kprobe_compat_socketcall(struct pt_regs *ctx)
{
	__u32 call = compat_arg(ctx, 0), args[2] = {};
	__u8 kind = call == PS_SYS_BIND ? PS_KIND_BIND
		  : call == PS_SYS_CONNECT ? PS_KIND_CONNECT
		  : call == PS_SYS_LISTEN ? PS_KIND_LISTEN : 0;

	if (!kind || bpf_probe_read_user(args, sizeof(args), (void *)(__u64)compat_arg(ctx, 1)))
		return 0;
	return on_enter(kind, (int)args[0], kind == PS_KIND_LISTEN ? 0 : args[1]);
}

SEC("kretprobe/__ia32_compat_sys_socketcall")
int ps_kretprobe_compat_socketcall(struct pt_regs *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct inflight *in = PS_LOOKUP(ps_inflight, &id);
	int ret = (int)PT_REGS_RC(ctx);

	if (!in) /* not one of the three calls, or not a socket portscope follows */
		return 0;
	if (in->kind == PS_KIND_BIND)
		return on_exit(ret, PS_KIND_BIND);
	if (in->kind == PS_KIND_LISTEN)
		return on_exit(ret, PS_KIND_LISTEN);
	return on_exit(ret, PS_KIND_CONNECT);
}
#endif /* x86 */

/* ---- the same three calls from BPF trampolines: fentry plan --------------- */

#ifndef PS_BCC /* fentry/fexit need BTF at load time: libbpf only */
/* __sys_bind, __sys_listen and __sys_connect are what the system calls (and
 * socketcall, and their 32-bit entries) run, with the same arguments. */
SEC("fentry/__sys_bind")
int BPF_PROG(ps_fentry_bind, int fd, struct sockaddr *uaddr, int addrlen)
{
	return on_enter(PS_KIND_BIND, fd, (__u64)uaddr);
}

SEC("fexit/__sys_bind")
int BPF_PROG(ps_fexit_bind, int fd, struct sockaddr *uaddr, int addrlen, int ret)
{
	return on_exit(ret, PS_KIND_BIND);
}

SEC("fentry/__sys_listen")
int BPF_PROG(ps_fentry_listen, int fd, int backlog)
{
	return on_enter(PS_KIND_LISTEN, fd, 0);
}

SEC("fexit/__sys_listen")
int BPF_PROG(ps_fexit_listen, int fd, int backlog, int ret)
{
	return on_exit(ret, PS_KIND_LISTEN);
}

SEC("fentry/__sys_connect")
int BPF_PROG(ps_fentry_connect, int fd, struct sockaddr *uaddr, int addrlen)
{
	return on_enter(PS_KIND_CONNECT, fd, (__u64)uaddr);
}

SEC("fexit/__sys_connect")
int BPF_PROG(ps_fexit_connect, int fd, struct sockaddr *uaddr, int addrlen, int ret)
{
	return on_exit(ret, PS_KIND_CONNECT);
}
#endif /* !PS_BCC */

/* An event about a socket itself, outside a traced system call (a refusal
 * by the port allocator, a listener closing), filled from the socket; the
 * requested address is the one the socket holds. */
static __always_inline void fill_sock_event(struct ps_event *e, __u64 id, struct sock *sk,
					    __u8 kind)
{
	fill_task(e, id);
	e->kind = kind;
	e->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	e->protocol = BPF_CORE_READ(sk, sk_protocol);
	e->netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	e->sock_uid = BPF_CORE_READ(sk, sk_uid.val);
	e->bound_dev_if = BPF_CORE_READ(sk, __sk_common.skc_bound_dev_if);
	e->sock_inode = BPF_CORE_READ(sk, sk_socket, file, f_inode, i_ino);
	e->opts = read_opts(sk);
	e->req_family = e->family;
	e->req_port = read_local(sk, e->family, e->req_addr);
	e->bound_port = read_local(sk, e->family, e->bound_addr);
}

/* Reserved and filled; NULL (and counted as lost) when the ring is full. */
static __always_inline struct ps_event *reserve_sock_event(__u64 id, struct sock *sk, __u8 kind)
{
	struct ps_event *e = PS_RESERVE(ps_events, sizeof(*e));

	if (!e) {
		count(PS_CNT_LOST);
		return NULL;
	}
	__builtin_memset(e, 0, sizeof(*e));
	fill_sock_event(e, id, sk, kind);
	return e;
}

/* ---- inet_csk_get_port: fentry and kprobe plans --------------------------- */

static __always_inline void emit_get_port_ok(__u64 id, struct sock *sk, __u16 snum)
{
	struct ps_event *e = reserve_sock_event(id, sk, PS_KIND_GET_PORT);

	if (!e)
		return;
	e->quality = PS_Q_GET_PORT_SEEN;
	e->req_port = snum;
	PS_SUBMIT(ps_events, e);
	count(PS_CNT_EMITTED);
}

static __always_inline void emit_get_port_refusal(__u64 id, struct sock *sk, __u16 snum, int ret)
{
	struct ps_walk *w = scratch_for(PS_KIND_GET_PORT);
	struct ps_event_blocked *b;

	if (!w) {
		count(PS_CNT_LOST);
		return;
	}
	b = &w->rec;
	fill_sock_event(&b->event, id, sk, PS_KIND_GET_PORT);
	/* Older kernels return 1 for "in use"; report it as the EADDRINUSE the
	 * caller turns it into. */
	b->event.ret = ret > 0 ? -98 : ret;
	b->event.quality = PS_Q_GET_PORT_SEEN | PS_Q_GET_PORT_FAILED;
	b->event.req_port = snum;
	capture(sk, snum, IPPROTO_TCP, PS_CAPTURE_REFUSAL, w);
	send_blocked(b);
}

/* The port allocator's verdict. Inside a traced call it is folded into that
 * call's event (with the blockers read here, at the refusal); outside one
 * (io_uring, kernel sockets) it is an event of its own. */
static __always_inline int on_get_port(struct sock *sk, __u16 snum, int ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct inflight *in = PS_LOOKUP(ps_inflight, &id);

	if (in) {
		in->quality |= PS_Q_GET_PORT_SEEN;
		/* A second refusal in one call (listen() after an implicit
		 * bind) keeps the first one's blockers. */
		if (ret && !(in->quality & PS_Q_GET_PORT_FAILED)) {
			in->quality |= PS_Q_GET_PORT_FAILED;
			save_refusal(id, sk, snum);
		}
		return 0;
	}
	if (!ret && !success_wanted(PS_KIND_GET_PORT))
		return 0;
	if (PS_CFG(target_tgid) && (id >> 32) != PS_CFG(target_tgid))
		return 0;
	if (PS_CFG(target_port) && snum != PS_CFG(target_port))
		return 0;
	if (ret)
		emit_get_port_refusal(id, sk, snum, ret);
	else
		emit_get_port_ok(id, sk, snum);
	return 0;
}

#ifndef PS_BCC /* fentry/fexit and tp_btf need BTF at load time: libbpf only */
SEC("fexit/inet_csk_get_port")
int BPF_PROG(ps_fexit_get_port, struct sock *sk, unsigned short snum, int ret)
{
	return on_get_port(sk, snum, ret);
}
#endif

/* kretprobes do not see the arguments: the entry probe keeps them. */
struct get_port_args {
	__u64 sk;
	__u16 snum;
};

#ifndef PS_GET_PORT_ENTRIES
#define PS_GET_PORT_ENTRIES 16384 /* resized like ps_inflight (bcc: -DPS_GET_PORT_ENTRIES) */
#endif
PS_HASH(ps_get_port_args, __u64, struct get_port_args, PS_GET_PORT_ENTRIES);

SEC("kprobe/inet_csk_get_port")
int ps_kprobe_get_port(struct pt_regs *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct get_port_args args = {
		.sk = (__u64)PT_REGS_PARM1(ctx),
		.snum = (__u16)PT_REGS_PARM2(ctx),
	};

	PS_UPDATE(ps_get_port_args, &id, &args);
	return 0;
}

SEC("kretprobe/inet_csk_get_port")
int ps_kretprobe_get_port(struct pt_regs *ctx)
{
	int ret = (int)PT_REGS_RC(ctx);
	__u64 id = bpf_get_current_pid_tgid();
	struct get_port_args *args = PS_LOOKUP(ps_get_port_args, &id);

	if (!args)
		return 0;
	on_get_port((struct sock *)args->sk, args->snum, ret);
	PS_DELETE(ps_get_port_args, &id);
	return 0;
}

/* ---- reuseport groups: who gets each connection or datagram --------------- */

/* Deliveries to each member of a reuseport group, per CPU, keyed by socket
 * cookie. Nothing here goes through the ring buffer: the collector reads the
 * map in batches (tracer/groups.py) and deletes the keys of departed members. */
/* Not preallocated: a member costs memory (8 bytes per CPU) from its first
 * delivery on; a preallocated map would cost it all up front. */
PS_PERCPU_HASH_LAZY(ps_group_counts, __u64, struct ps_member_count, 65536);

#define MAX_ERRNO 4095

static __always_inline void count_delivery(__u64 cookie)
{
	struct ps_member_count *c, first = { .delivered = 1 };

	c = PS_LOOKUP(ps_group_counts, &cookie);
	if (c) {
		c->delivered++;
		return;
	}
	/* The member's first delivery on this CPU. Another CPU may insert the
	 * key at the same moment (EEXIST): then this CPU's slot is there. */
	if (!PS_INSERT(ps_group_counts, &cookie, &first))
		return;
	c = PS_LOOKUP(ps_group_counts, &cookie);
	if (c)
		c->delivered++;
	else
		count(PS_CNT_GROUP_FULL);
}

#ifndef PS_BCC /* tp_btf and fexit: libbpf only */
/* tracepoint plan (kernel 6.6+): sk_data_ready fires on a listener once per
 * connection put in its accept queue, and on a UDP socket once per datagram
 * queued to it. It fires for every readable socket on the host, so the
 * common case (no reuseport group) returns after one load. */
SEC("tp_btf/sk_data_ready")
int BPF_PROG(ps_group_data_ready, const struct sock *sk)
{
	__u16 protocol;

	if (!sk->sk_reuseport_cb)
		return 0;
	protocol = sk->sk_protocol;
	if (protocol == IPPROTO_TCP) {
		/* Accepted sockets leave the group (sk_clone_lock), but be sure:
		 * data on a connection is not a delivery. */
		if (sk->__sk_common.skc_state != TCP_LISTEN)
			return 0;
	} else if (protocol != IPPROTO_UDP) {
		return 0;
	}
	if (PS_CFG(target_port) && sk->__sk_common.skc_num != PS_CFG(target_port))
		return 0;
	count_delivery(bpf_get_socket_cookie((void *)sk));
	return 0;
}
#endif /* !PS_BCC */

/* fentry and kprobe plans: the kernel's choice among the group's members,
 * at the exit of reuseport_select_sock. Every packet that reaches a listener
 * lookup makes a choice, so for TCP only a SYN counts (a stray ACK, FIN or
 * RST, or a syncookie's ACK, would count twice); a UDP datagram always does.
 * Lookups without a packet (bpf_sk_lookup_*, ICMP errors) do not count. The
 * result may be NULL (no group) or, when a reuseport BPF program drops, an
 * error pointer. */
#define TCPHDR_FLAGS 13         /* offset of the flags byte in struct tcphdr */
#define TCPHDR_SYN 0x02
#define TCPHDR_RST 0x04
#define TCPHDR_ACK 0x10

static __always_inline bool is_selection(struct sock *chosen, struct sk_buff *skb)
{
	unsigned char *data;
	__u8 flags = 0;

	if (!skb)
		return false;
	if (BPF_CORE_READ(chosen, sk_protocol) != IPPROTO_TCP)
		return true;
	/* At the lookup, skb->data is the transport header. */
	data = BPF_CORE_READ(skb, data);
	if (bpf_probe_read_kernel(&flags, sizeof(flags), data + TCPHDR_FLAGS))
		return false;
	return (flags & (TCPHDR_SYN | TCPHDR_ACK | TCPHDR_RST)) == TCPHDR_SYN;
}

static __always_inline bool chosen_ok(struct sock *chosen)
{
	__u64 p = (__u64)chosen;

	if (!p || p >= (__u64)-MAX_ERRNO)
		return false;
	return !PS_CFG(target_port) ||
	       BPF_CORE_READ(chosen, __sk_common.skc_num) == PS_CFG(target_port);
}

#ifndef PS_BCC
SEC("fexit/reuseport_select_sock")
int BPF_PROG(ps_fexit_reuseport_select, struct sock *sk, __u32 hash, struct sk_buff *skb,
	     int hdr_len, struct sock *ret)
{
	if (chosen_ok(ret) && is_selection(ret, skb))
		count_delivery(bpf_get_socket_cookie(ret));
	return 0;
}
#endif /* !PS_BCC */

/* kprobe plan: a kretprobe sees only the result, so the entry probe keeps
 * the packet, in a per-CPU slot: lookups run in softirq (or with bottom
 * halves off) and never nest on one CPU. A kprobe cannot assign a cookie
 * (the collector's sock_diag dumps do), so a member's deliveries before its
 * first inventory are counted apart. */
PS_PERCPU_ARRAY(ps_select_skb, __u64, 1);

SEC("kprobe/reuseport_select_sock")
int ps_kprobe_reuseport_select(struct pt_regs *ctx)
{
	__u32 zero = 0;
	__u64 *slot = PS_LOOKUP(ps_select_skb, &zero);

	if (slot) /* reuseport_select_sock(sk, hash, skb, hdr_len) */
		*slot = (__u64)PT_REGS_PARM3(ctx);
	return 0;
}

SEC("kretprobe/reuseport_select_sock")
int ps_kretprobe_reuseport_select(struct pt_regs *ctx)
{
	struct sock *ret = (struct sock *)PT_REGS_RC(ctx);
	__u32 zero = 0;
	__u64 *slot = PS_LOOKUP(ps_select_skb, &zero);
	struct sk_buff *skb;
	__u64 cookie;

	if (!slot)
		return 0;
	skb = (struct sk_buff *)*slot;
	*slot = 0;
	if (!chosen_ok(ret) || !is_selection(ret, skb))
		return 0;
	cookie = BPF_CORE_READ(ret, __sk_common.skc_cookie.counter);
	if (!cookie) {
		count(PS_CNT_GROUP_NO_COOKIE);
		return 0;
	}
	count_delivery(cookie);
	return 0;
}

/* ---- socket iterators: every plan ----------------------------------------- */

#ifndef PS_BCC /* iterators need BTF at load time: libbpf only */

/* The local port the socket iterators report (0: every port). A map, not
 * read-only data: the collector changes it between runs of the iterator. */
PS_ARRAY(ps_iter_port, __u16, 1);

static __always_inline bool iter_port_wanted(struct sock_common *skc)
{
	__u32 zero = 0;
	__u16 *port = PS_LOOKUP(ps_iter_port, &zero);

	return !port || !*port || BPF_CORE_READ(skc, skc_num) == *port;
}

/* Fill *info from a socket; false when it is not an IPv4/IPv6 socket. */
static __always_inline bool fill_sockinfo(struct ps_sockinfo *info, struct sock_common *skc,
					  __u8 protocol, uid_t uid)
{
	struct sock *sk = (struct sock *)skc;
	struct sock_reuseport *reuse;

	info->family = BPF_CORE_READ(skc, skc_family);
	if (info->family != AF_INET && info->family != AF_INET6)
		return false;
	info->protocol = protocol;
	info->state = BPF_CORE_READ(skc, skc_state);
	info->sock_uid = uid;
	info->netns = BPF_CORE_READ(skc, skc_net.net, ns.inum);
	info->cookie = BPF_CORE_READ(skc, skc_cookie.counter);
	info->bound_dev_if = BPF_CORE_READ(skc, skc_bound_dev_if);
	info->port = read_local(sk, info->family, info->addr);

	/* TIME_WAIT and request sockets are not full sockets: only the
	 * sock_common part may be read. */
	if (protocol == IPPROTO_TCP &&
	    (info->state == TCP_TIME_WAIT || info->state == TCP_NEW_SYN_RECV)) {
		info->opts = read_common_opts(skc);
		return true;
	}
	info->opts = read_opts(sk);
	info->inode = BPF_CORE_READ(sk, sk_socket, file, f_inode, i_ino);
	reuse = BPF_CORE_READ(sk, sk_reuseport_cb);
	if (reuse) {
		info->group_key = (__u64)reuse;
		info->group_size = BPF_CORE_READ(reuse, num_socks);
		if (BPF_CORE_READ(reuse, prog))
			info->group_flags |= PS_GROUP_BPF_PROG;
		if (PS_BITFIELD(reuse, has_conns))
			info->group_flags |= PS_GROUP_HAS_CONNS;
	}
	return true;
}

static __always_inline void emit_sockinfo(struct seq_file *seq, struct sock_common *skc,
					  __u8 protocol, uid_t uid)
{
	struct ps_sockinfo info = {};

	if (iter_port_wanted(skc) && fill_sockinfo(&info, skc, protocol, uid))
		bpf_seq_write(seq, &info, sizeof(info));
}

/* The context pointers are read once into locals: the verifier tracks the
 * NULL check on the register that was checked, not on a second load. */
SEC("iter/tcp")
int ps_iter_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;

	if (skc)
		emit_sockinfo(ctx->meta->seq, skc, IPPROTO_TCP, ctx->uid);
	return 0;
}

SEC("iter/udp")
int ps_iter_udp(struct bpf_iter__udp *ctx)
{
	struct udp_sock *udp = ctx->udp_sk;

	if (udp)
		emit_sockinfo(ctx->meta->seq, (struct sock_common *)udp, IPPROTO_UDP, ctx->uid);
	return 0;
}

/* Every socket every process holds: owners, and flags for the sockets the
 * socket iterators cannot see (bound-only TCP). Threads that share their
 * leader's file table are skipped by the kernel. */
SEC("iter/task_file")
int ps_iter_task_file(struct bpf_iter__task_file *ctx)
{
	struct file *file = ctx->file;
	struct task_struct *task = ctx->task;
	struct ps_fileinfo out = {};
	struct socket *sock;
	struct sock *sk;

	if (!file || !task)
		return 0;
	if ((BPF_CORE_READ(file, f_inode, i_mode) & S_IFMT) != S_IFSOCK)
		return 0;
	sock = BPF_CORE_READ(file, private_data);
	sk = sock ? BPF_CORE_READ(sock, sk) : NULL;
	if (!sk || !iter_port_wanted(&sk->__sk_common))
		return 0;
	out.pid = BPF_CORE_READ(task, tgid);
	out.fd = ctx->fd;
	BPF_CORE_READ_STR_INTO(&out.comm, task, comm);
	if (!fill_sockinfo(&out.sock, &sk->__sk_common, BPF_CORE_READ(sk, sk_protocol),
			   BPF_CORE_READ(sk, sk_uid.val)))
		return 0;
	bpf_seq_write(ctx->meta->seq, &out, sizeof(out));
	return 0;
}

#endif /* !PS_BCC */

/* ---- who closed first: every plan ------------------------------------------ */

/* Resized by the collector before load (bcc: -DPS_CLOSER_ENTRIES). */
#ifndef PS_CLOSER_ENTRIES
#define PS_CLOSER_ENTRIES 131072
#endif
PS_LRU_HASH(ps_closers, struct ps_conn_key, struct ps_closer, PS_CLOSER_ENTRIES);
/* One entry per closing process, not per connection: a few processes close
 * most connections. Resized by the collector like ps_closers. */
#ifndef PS_CLOSER_ARGS_ENTRIES
#define PS_CLOSER_ARGS_ENTRIES 8192
#endif
PS_LRU_HASH(ps_closer_args, __u32, struct ps_proc_args, PS_CLOSER_ARGS_ENTRIES);

/* The closing task's command line, once per process (its first close). */
static __always_inline void remember_args(__u32 tgid)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct ps_proc_args args = {};
	unsigned long start, end, len;
	int i;

	if (PS_LOOKUP(ps_closer_args, &tgid))
		return;
	start = BPF_CORE_READ(task, mm, arg_start);
	end = BPF_CORE_READ(task, mm, arg_end);
	len = end > start ? end - start : 0;
	if (len > PS_ARGS_LEN - 1)
		len = PS_ARGS_LEN - 1;
	/* A read of constant size, which every verifier accepts (a length
	 * computed here is not bounded to some of them, such as 6.1's under
	 * bcc): what follows the arguments (the environment) is then cleared,
	 * never kept. */
	if (len && !bpf_probe_read_user(args.args, PS_ARGS_LEN - 1, (void *)start)) {
		args.len = len;
		for (i = 0; i < PS_ARGS_LEN; i++)
			if ((unsigned long)i >= len)
				args.args[i] = 0;
	}
	PS_UPDATE(ps_closer_args, &tgid, &args);
}

/* A listener closes: a rare event, sent when the collector asks for it (the
 * journal: who gave a port up, just before someone else took it). The port
 * is the tracepoint's sport: by the time the state is stored, a port the
 * kernel chose (bind to port 0, or listen() without bind) has already been
 * given back and skc_num reads 0 (tcp_set_state -> inet_put_port, then
 * inet_sk_state_store fires the tracepoint); inet_sport keeps it. */
static __always_inline int on_listen_close(struct sock *sk, __u16 sport)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct ps_event *e;

	if (!success_wanted(PS_KIND_LISTEN_CLOSE))
		return 0;
	if (PS_CFG(target_tgid) && (id >> 32) != PS_CFG(target_tgid))
		return 0;
	if (PS_CFG(target_port) && sport != PS_CFG(target_port))
		return 0;
	e = reserve_sock_event(id, sk, PS_KIND_LISTEN_CLOSE);
	if (!e)
		return 0;
	e->req_port = sport;
	e->bound_port = sport;
	PS_SUBMIT(ps_events, e);
	count(PS_CNT_EMITTED);
	return 0;
}

/* An active close (the side that will hold the TIME_WAIT) starts with the
 * move to FIN_WAIT1, in the context of the task that closed: remember it.
 * Every TCP state change passes here, so anything else returns at once. */
SEC("tracepoint/sock/inet_sock_set_state")
int ps_state_change(struct trace_event_raw_inet_sock_set_state *ctx)
{
	struct ps_conn_key key = {};
	struct ps_closer who = {};
	__u64 id;

	if (ctx->protocol != IPPROTO_TCP)
		return 0;
	if (ctx->oldstate == TCP_LISTEN && ctx->newstate == TCP_CLOSE)
		return on_listen_close((struct sock *)ctx->skaddr, ctx->sport);
	if (ctx->newstate != TCP_FIN_WAIT1)
		return 0;
	key.netns = BPF_CORE_READ((struct sock *)ctx->skaddr, __sk_common.skc_net.net, ns.inum);
	key.sport = ctx->sport;
	key.dport = ctx->dport;
	key.family = ctx->family;
	/* Copied with a helper: the verifier allows only fixed-offset loads
	 * from a tracepoint context, not a memcpy through a moved pointer. */
	if (ctx->family == AF_INET6) {
		bpf_probe_read_kernel(key.saddr, PS_ADDR_LEN, ctx->saddr_v6);
		bpf_probe_read_kernel(key.daddr, PS_ADDR_LEN, ctx->daddr_v6);
	} else {
		bpf_probe_read_kernel(key.saddr, 4, ctx->saddr);
		bpf_probe_read_kernel(key.daddr, 4, ctx->daddr);
	}
	id = bpf_get_current_pid_tgid();
	who.ts_ns = bpf_ktime_get_boot_ns();
	who.cgroup_id = bpf_get_current_cgroup_id();
	who.pid = id >> 32;
	who.uid = (__u32)bpf_get_current_uid_gid();
	who.from_state = ctx->oldstate;
	bpf_get_current_comm(who.comm, sizeof(who.comm));
	PS_UPDATE(ps_closers, &key, &who);
	remember_args(who.pid);
	return 0;
}
