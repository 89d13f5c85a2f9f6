/*
 * bindstorm: the syscall load for scripts/bench-trace, in C so that what is
 * timed is the kernel's cost (and the tracer's), not an interpreter's.
 *
 *   bindstorm storm N PORT     listen on 127.0.0.1:PORT, then N bind()s on fresh
 *                              sockets, alternating PORT (fails: EADDRINUSE)
 *                              and port 0 (succeeds); each socket closed after
 *   bindstorm getppid N        N getppid() system calls (an unrelated syscall)
 *   bindstorm tick PORT        bind a fresh socket to 127.0.0.1:PORT every 5 ms,
 *                              until killed
 *
 * storm and getppid print one line of key=value pairs on stdout, e.g.
 *   attempts=100000 failures=50000 other_errors=0 elapsed=0.412 netns=4026532281
 * Run storm and tick inside a private network namespace (unshare -n): they
 * bind real ports.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

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

/* The inode of this process's network namespace: what the tracer reports
 * as "netns", so that the bench counts only this storm's events. */
static unsigned long netns_inode(void)
{
	struct stat st;

	if (stat("/proc/self/ns/net", &st))
		die("stat /proc/self/ns/net");
	return (unsigned long)st.st_ino;
}

static struct sockaddr_in loopback(int port)
{
	struct sockaddr_in sa;

	memset(&sa, 0, sizeof(sa));
	sa.sin_family = AF_INET;
	sa.sin_port = htons(port);
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return sa;
}

/* One bind() on a fresh TCP socket, closed after; returns 0 or the errno. */
static int bind_once(int port)
{
	struct sockaddr_in sa = loopback(port);
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	int err = 0;

	if (fd < 0)
		die("socket");
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)))
		err = errno;
	close(fd);
	return err;
}

static int storm(long n, int port)
{
	struct sockaddr_in sa = loopback(port);
	long failures = 0, other = 0;
	int listener = socket(AF_INET, SOCK_STREAM, 0);
	double start;

	if (listener < 0)
		die("socket");
	if (bind(listener, (struct sockaddr *)&sa, sizeof(sa)) || listen(listener, 1))
		die("listener bind/listen");

	start = now();
	for (long i = 0; i < n; i++) {
		/* Even: the listener's port, which must fail; odd: port 0, which
		 * must succeed. Anything else is counted, never hidden. */
		int err = bind_once(i % 2 == 0 ? port : 0);

		if (err == EADDRINUSE)
			failures++;
		else if (err)
			other++;
	}
	double elapsed = now() - start;

	close(listener);
	printf("attempts=%ld failures=%ld other_errors=%ld elapsed=%.6f netns=%lu\n",
	       n, failures, other, elapsed, netns_inode());
	return 0;
}

static int getppid_loop(long n)
{
	double start = now();

	/* syscall() rather than getppid(): never served from a libc cache. */
	for (long i = 0; i < n; i++)
		syscall(SYS_getppid);
	printf("calls=%ld elapsed=%.6f\n", n, now() - start);
	return 0;
}

static void __attribute__((noreturn)) tick(int port)
{
	const struct timespec five_ms = { 0, 5 * 1000 * 1000 };

	for (;;) {
		bind_once(port);
		nanosleep(&five_ms, NULL);
	}
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 4 && !strcmp(argv[1], "storm"))
		return storm(atol(argv[2]), atoi(argv[3]));
	if (argc == 3 && !strcmp(argv[1], "getppid"))
		return getppid_loop(atol(argv[2]));
	if (argc == 3 && !strcmp(argv[1], "tick"))
		tick(atoi(argv[2]));
	fprintf(stderr, "usage: bindstorm storm N PORT | getppid N | tick PORT\n");
	return 2;
}
