/* Programs that decide where traffic goes, for tests/kernel/test_netprogs.py
 * (loaded and attached by tests/kernel/steering.py; other test modules use
 * them through that module).
 *
 * ps_steer (sk_lookup): a new connection or datagram of protocol
 * steer_cfg.protocol (IPPROTO_TCP 6 / IPPROTO_UDP 17) to local port
 * steer_cfg.port goes to the socket in steer_target[0] (bpf_sk_assign with
 * BPF_SK_LOOKUP_F_REPLACE, so that among several programs of a namespace the
 * last one that selects wins, as portscope's combine() assumes); with
 * steer_cfg.drop set it is dropped instead (SK_DROP). Everything else: SK_PASS
 * with no selection (the kernel's own lookup).
 *
 * ps_rewrite (cgroup/connect4): connect() to port rewrite_cfg.from_port is
 * turned into a connect() to rewrite_cfg.to_port (same address).
 *
 * Each load of the object has maps of its own, so one object loaded twice is
 * two independent programs (same name and tag, different ids).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct steer_config {
	__u32 port;     /* host byte order */
	__u32 protocol; /* IPPROTO_TCP or IPPROTO_UDP */
	__u32 drop;     /* 1: SK_DROP instead of steering */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct steer_config);
} steer_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} steer_target SEC(".maps");

SEC("sk_lookup")
int ps_steer(struct bpf_sk_lookup *ctx)
{
	__u32 zero = 0;
	struct steer_config *cfg = bpf_map_lookup_elem(&steer_cfg, &zero);
	struct bpf_sock *sk;
	long err;

	if (!cfg || !cfg->port || ctx->local_port != cfg->port || ctx->protocol != cfg->protocol)
		return SK_PASS;
	if (cfg->drop)
		return SK_DROP;
	sk = bpf_map_lookup_elem(&steer_target, &zero);
	if (!sk)
		return SK_PASS;
	err = bpf_sk_assign(ctx, sk, BPF_SK_LOOKUP_F_REPLACE);
	bpf_sk_release(sk);
	return err ? SK_DROP : SK_PASS;
}

struct rewrite_config {
	__u32 from_port; /* host byte order */
	__u32 to_port;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rewrite_config);
} rewrite_cfg SEC(".maps");

SEC("cgroup/connect4")
int ps_rewrite(struct bpf_sock_addr *ctx)
{
	__u32 zero = 0;
	struct rewrite_config *cfg = bpf_map_lookup_elem(&rewrite_cfg, &zero);

	if (cfg && cfg->from_port && ctx->user_port == bpf_htons(cfg->from_port))
		ctx->user_port = bpf_htons(cfg->to_port);
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
