/*
 * connstorm: the connection load for scripts/bench-groups, in C so that what
 * is measured is the kernel's cost (and the tracer's), not an interpreter's.
 *
 *   connstorm serve PORT N
 *       N processes, each with its own SO_REUSEPORT listener on
 *       127.0.0.1:PORT, accepting and closing connections as fast as they
 *       come. Prints "ready PID..." once all listen, then answers each line
 *       read on stdin with "counts C..." (connections each has accepted so
 *       far, in the order of the PIDs). Stops, with its servers, at EOF.
 *   connstorm client PORT CLIENTS SECONDS
 *       CLIENTS processes connecting to 127.0.0.1:PORT in a loop for SECONDS,
 *       each connection closed at once with a reset (SO_LINGER 0), so that no
 *       TIME_WAIT socket ties up an ephemeral port. Prints
 *       "connections=N errors=E elapsed=S".
 *
 * Run both inside a private network namespace: they use real ports.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_PROCS 64

struct slot {
	volatile unsigned long count;
	volatile unsigned long errors;
	volatile int ready;
	int pid;
} __attribute__((aligned(64))); /* one cache line each: no false sharing */

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static struct slot *shared_slots(int n)
{
	void *p = mmap(NULL, sizeof(struct slot) * n, PROT_READ | PROT_WRITE,
		       MAP_SHARED | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		die("mmap");
	return p;
}

static struct sockaddr_in loopback(int port)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) };

	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return sa;
}

static void server(struct slot *slot, int port)
{
	struct sockaddr_in sa = loopback(port);
	int one = 1, fd;

	prctl(PR_SET_PDEATHSIG, SIGKILL);
	fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) ||
	    bind(fd, (struct sockaddr *)&sa, sizeof(sa)) || listen(fd, 4096))
		die("server socket");
	slot->ready = 1;
	for (;;) {
		int c = accept4(fd, NULL, NULL, SOCK_CLOEXEC);

		if (c < 0) {
			slot->errors++;
			continue;
		}
		close(c);
		slot->count++;
	}
}

static int serve(int port, int n)
{
	struct slot *slots = shared_slots(n);
	char line[64];

	for (int i = 0; i < n; i++) {
		pid_t pid = fork();

		if (pid < 0)
			die("fork");
		if (pid == 0)
			server(&slots[i], port);
		slots[i].pid = pid;
	}
	for (int i = 0; i < n; i++)
		while (!slots[i].ready)
			usleep(1000);
	printf("ready");
	for (int i = 0; i < n; i++)
		printf(" %d", slots[i].pid);
	printf("\n");
	fflush(stdout);
	while (fgets(line, sizeof(line), stdin)) {
		printf("counts");
		for (int i = 0; i < n; i++)
			printf(" %lu", slots[i].count);
		printf("\n");
		fflush(stdout);
	}
	for (int i = 0; i < n; i++)
		kill(slots[i].pid, SIGKILL);
	while (wait(NULL) > 0)
		;
	return 0;
}

static void client(struct slot *slot, int port, double deadline)
{
	struct sockaddr_in sa = loopback(port);
	struct linger reset = { .l_onoff = 1, .l_linger = 0 };

	prctl(PR_SET_PDEATHSIG, SIGKILL);
	while (now() < deadline) {
		int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

		if (fd < 0)
			die("client socket");
		setsockopt(fd, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset));
		if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)))
			slot->errors++;
		else
			slot->count++;
		close(fd);
	}
	exit(0);
}

static int clients(int port, int n, double seconds)
{
	struct slot *slots = shared_slots(n);
	unsigned long total = 0, errors = 0;
	double start = now(), end;

	for (int i = 0; i < n; i++) {
		pid_t pid = fork();

		if (pid < 0)
			die("fork");
		if (pid == 0)
			client(&slots[i], port, start + seconds);
	}
	while (wait(NULL) > 0)
		;
	end = now();
	for (int i = 0; i < n; i++) {
		total += slots[i].count;
		errors += slots[i].errors;
	}
	printf("connections=%lu errors=%lu elapsed=%.4f\n", total, errors, end - start);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 4 && !strcmp(argv[1], "serve")) {
		int n = atoi(argv[3]);

		if (n < 1 || n > MAX_PROCS)
			return 2;
		return serve(atoi(argv[2]), n);
	}
	if (argc == 5 && !strcmp(argv[1], "client")) {
		int n = atoi(argv[3]);

		if (n < 1 || n > MAX_PROCS)
			return 2;
		return clients(atoi(argv[2]), n, atof(argv[4]));
	}
	fprintf(stderr, "usage: connstorm serve PORT N | client PORT CLIENTS SECONDS\n");
	return 2;
}
