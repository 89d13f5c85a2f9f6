/* A cgroup/bind4 program for tests/kernel/test_bind_hooks.py: it refuses
 * (EPERM) every bind() to port 7777 of the processes of its cgroup. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

SEC("cgroup/bind4")
int ps_test_deny_7777(struct bpf_sock_addr *ctx)
{
	return ctx->user_port == bpf_htons(7777) ? 0 : 1;
}

char LICENSE[] SEC("license") = "GPL";
