/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * portscope.h: the one definition of everything that crosses the line between
 * the BPF programs and the Python collector.
 *
 * Fixed-width types only, explicit padding, no pointers: the layout must be the
 * same for the BPF target and for the host. The Python side never restates
 * these structs: scripts/build-probes reads them back from the BTF of the
 * compiled object and generates tracer/layout.py.
 */
#ifndef PORTSCOPE_H
#define PORTSCOPE_H

#define PS_COMM_LEN 16
#define PS_ADDR_LEN 16 /* room for an IPv6 address; IPv4 uses the first 4 bytes */

/* Which system call an event reports. */
enum ps_kind {
	PS_KIND_BIND = 1,
	PS_KIND_LISTEN = 2,
	PS_KIND_CONNECT = 3,
	/* inet_csk_get_port() failed outside any traced system call
	 * (io_uring, kernel sockets): only the fentry/kprobe plans see these. */
	PS_KIND_GET_PORT = 4,
	/* A listening TCP socket closed (sock:inet_sock_set_state LISTEN ->
	 * CLOSE): who gave the port up, and when. Sent only when asked for. */
	PS_KIND_LISTEN_CLOSE = 5,
};

/* How the event was observed; set from ps_config.plan. */
enum ps_plan {
	PS_PLAN_TRACEPOINT = 1,
	PS_PLAN_KPROBE = 2,
	PS_PLAN_FENTRY = 3,
};

/* Socket options at the moment of the call (ps_event.opts). */
enum ps_opt {
	PS_OPT_REUSEADDR = 1 << 0,
	PS_OPT_REUSEPORT = 1 << 1,
	PS_OPT_V6ONLY = 1 << 2,
	PS_OPT_FREEBIND = 1 << 3,
	PS_OPT_TRANSPARENT = 1 << 4,
	PS_OPT_BIND_ADDRESS_NO_PORT = 1 << 5,
};

/* What the probe could and could not see (ps_event.quality). */
enum ps_quality {
	/* The sockaddr passed to bind()/connect() could not be read from user
	 * memory; req_family/req_addr/req_port are then zero. */
	PS_Q_ADDR_UNREADABLE = 1 << 0,
	/* inet_csk_get_port() ran inside this call (fentry/kprobe plans). */
	PS_Q_GET_PORT_SEEN = 1 << 1,
	/* ... and it refused the port. */
	PS_Q_GET_PORT_FAILED = 1 << 2,
};

/* Indexes of the per-CPU counters in the ps_counters map. */
enum ps_counter {
	PS_CNT_LOST = 0,        /* ring buffer full: event dropped */
	PS_CNT_INFLIGHT_FULL,   /* too many concurrent calls: call not traced */
	PS_CNT_EMITTED,         /* events submitted to the ring buffer */
	PS_CNT_GROUP_FULL,      /* reuseport delivery not counted: ps_group_counts full */
	PS_CNT_GROUP_NO_COOKIE, /* kprobe plan: delivery to a socket without a cookie yet */
	PS_CNT_MAX,
};

struct ps_event {
	__u64 ts_ns;            /* bpf_ktime_get_boot_ns() at the end of the call */
	__u64 cgroup_id;
	__u64 sock_inode;
	__u32 pid;              /* tgid */
	__u32 tid;
	__u32 uid;              /* real uid of the calling task */
	__u32 sock_uid;         /* sk_uid: what the SO_REUSEPORT uid check compares */
	__u32 netns;            /* network namespace inode of the socket */
	__s32 ret;              /* 0 or -errno */
	__s32 bound_dev_if;     /* SO_BINDTODEVICE ifindex, 0 when unbound */
	__u16 req_port;         /* requested port (host order), from the call's arguments */
	__u16 bound_port;       /* port the socket holds after the call (host order) */
	__u8 kind;              /* enum ps_kind */
	__u8 plan;              /* enum ps_plan */
	__u8 family;            /* the socket's family: AF_INET or AF_INET6 */
	__u8 req_family;        /* family of the address in the call (AF_UNSPEC allowed) */
	__u8 protocol;          /* IPPROTO_TCP, IPPROTO_UDP, ... */
	__u8 opts;              /* enum ps_opt bits */
	__u8 quality;           /* enum ps_quality bits */
	__u8 pad;
	__u8 req_addr[PS_ADDR_LEN];   /* requested address (network order) */
	__u8 bound_addr[PS_ADDR_LEN]; /* local address the socket holds after the call */
	char comm[PS_COMM_LEN];
};

/* One socket as the iter/tcp and iter/udp programs see it: the flags that
 * sock_diag does not report. Written with bpf_seq_write, read as a stream
 * of fixed-size records. */
struct ps_sockinfo {
	__u64 cookie;           /* socket cookie, 0 if the kernel never assigned one */
	__u64 inode;            /* 0 for TIME_WAIT, SYN_RECV and unaccepted sockets */
	__u64 group_key;        /* identifies the reuseport group (the kernel's
	                         * sock_reuseport address); 0 when in no group */
	__u32 netns;
	__u32 sock_uid;
	__s32 bound_dev_if;
	__u16 port;             /* local port, host order */
	__u16 group_size;       /* sockets in the reuseport group */
	__u8 family;
	__u8 protocol;
	__u8 state;             /* TCP_* state number */
	__u8 opts;              /* enum ps_opt bits */
	__u8 group_flags;       /* enum ps_group_flag bits */
	__u8 pad[3];
	__u8 addr[PS_ADDR_LEN]; /* local address (network order) */
};

/* The sockets that held a port when a bind() or listen() was refused on it
 * (EADDRINUSE), read in the kernel from the port's bind bucket (TCP) or hash
 * slot (UDP) at the moment of the refusal: a blocker that lived for a
 * millisecond is still named. Sent after the event that it explains, in one
 * longer ring-buffer record (struct ps_event_blocked, cut after the sockets
 * kept). */
#define PS_MAX_BLOCKERS 8       /* a power of two: indexes are masked */
#define PS_WALK_STEPS 64        /* list nodes visited at most, per refusal */

/* Where the blockers were read (ps_blockers.when). */
enum ps_capture {
	PS_CAPTURE_NONE = 0,
	/* At the return of inet_csk_get_port() that refused (fentry and kprobe
	 * plans): the kernel's own moment. */
	PS_CAPTURE_REFUSAL = 1,
	/* At the exit of the system call (every plan; UDP, whose allocator is
	 * not probed; or when the refusal was not seen). */
	PS_CAPTURE_EXIT = 2,
};

/* One socket found on the port. The part the iterators also report, plus
 * what only an explanation needs: the other end, and the process that bound
 * the socket (kept by the probes at every successful bind() and listen()). */
struct ps_blocker {
	struct ps_sockinfo sock;        /* group_key/group_size are left 0 */
	__u8 raddr[PS_ADDR_LEN];        /* remote address (network order) */
	__u16 rport;                    /* remote port, host order */
	/* A TIME_WAIT minisocket (sock.state TCP_TIME_WAIT) keeps the state it
	 * closed from: TIME_WAIT, or FIN_WAIT2 for an orphan on the timewait
	 * timer, which is what sock_diag reports as its state. 0 otherwise. */
	__u8 tw_substate;
	__u8 pad;
	__u32 binder_pid;               /* 0: not bound by a traced call */
	char binder_comm[PS_COMM_LEN];
};

/* As sent, the kept sockets are sock[0..front+back): first the listeners,
 * bound and UDP sockets, then the others (connections, TIME_WAIT); the
 * record ends after the last one kept. */
struct ps_blockers {
	__u16 seen;             /* sockets of this netns on the port, in the walk */
	__u8 front;             /* kept listeners, bound and UDP sockets */
	__u8 back;              /* kept others */
	__u8 when;              /* enum ps_capture */
	__u8 complete;          /* 1: the walk reached the end of every list */
	__u8 pad[2];
	struct ps_blocker sock[PS_MAX_BLOCKERS];
};

/* The ring-buffer record of a refused bind() or listen(): the event, then
 * the blockers, cut after the last socket kept. Every other record is a
 * plain struct ps_event; the reader tells them apart by their size. */
struct ps_event_blocked {
	struct ps_event event;
	struct ps_blockers blockers;
};

/* Who bound a socket (the ps_binders map, keyed by the kernel's socket
 * address): the inode tells a later socket at the same address apart. */
struct ps_binder {
	__u64 inode;
	__u32 pid;
	__u32 pad;
	char comm[PS_COMM_LEN];
};

/* A socket held by a process, as iter/task_file sees it: who holds which
 * socket, including the bound-only TCP sockets that iter/tcp never walks. */
struct ps_fileinfo {
	__u32 pid;              /* tgid of the holder */
	__u32 fd;
	char comm[PS_COMM_LEN];
	struct ps_sockinfo sock;
};

enum ps_group_flag {
	PS_GROUP_BPF_PROG = 1 << 0,     /* a reuseport BPF program steers the group */
	PS_GROUP_HAS_CONNS = 1 << 1,    /* a connected UDP socket is in the group */
};

/* A TCP connection, as the kernel's inet_sock_set_state tracepoint and
 * sock_diag both describe it: the key of the closers map. */
struct ps_conn_key {
	__u32 netns;
	__u16 sport;            /* host order */
	__u16 dport;            /* host order */
	__u8 family;
	__u8 pad[3];
	__u8 saddr[PS_ADDR_LEN];
	__u8 daddr[PS_ADDR_LEN];
};

/* Who closed a connection first (the side that goes to TIME_WAIT), kept
 * in the kernel so that it outlives the process. */
struct ps_closer {
	__u64 ts_ns;            /* bpf_ktime_get_boot_ns() at the close */
	__u64 cgroup_id;
	__u32 pid;
	__u32 uid;
	__u8 from_state;        /* TCP state before the close */
	__u8 pad[7];
	char comm[PS_COMM_LEN];
};

/* The command line of a process that closed a connection, read from its
 * memory at its first close (the ps_closer_args map, keyed by the pid): the
 * process may be long gone when its TIME_WAIT sockets are explained. The
 * arguments are NUL-separated, cut at PS_ARGS_LEN bytes. */
#define PS_ARGS_LEN 128         /* a power of two: the verifier bounds a masked length */
struct ps_proc_args {
	__u32 len;              /* bytes of args read, 0 if they could not be */
	__u32 pad;
	char args[PS_ARGS_LEN];
};

/* What the ps_group_counts map holds per member of a reuseport group, per
 * CPU, keyed by the socket cookie (__u64). One schema for every plan: the
 * tracepoint plan counts at sk_data_ready on the receiving listener or UDP
 * socket, the fentry and kprobe plans at the exit of reuseport_select_sock. */
struct ps_member_count {
	__u64 delivered;        /* TCP: connections queued for accept(); UDP: datagrams */
};

/* Read-only configuration, set by the collector between open and load. */
struct ps_config {
	__u32 target_tgid;      /* 0: every process */
	__u16 target_port;      /* 0: every port; else requested or bound port */
	__u8 success_kinds;     /* bit (1 << enum ps_kind): successes of that kind
	                         * are sent too; failures always are */
	__u8 plan;              /* enum ps_plan, copied into every event */
};

#endif /* PORTSCOPE_H */
