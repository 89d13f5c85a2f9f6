/* A 32-bit program (gcc -m32) that makes bind(), listen() and connect() fail
 * through both ways a 32-bit x86 program reaches them: the system calls of
 * their own (bind 361, connect 362, listen 363) and socketcall(2), which
 * older C libraries use. tests/kernel/test_compat32.py runs it in a private
 * network namespace and checks what each probe plan traced.
 *
 *   compat32 PORT
 *
 * One line per call it makes, the ground truth the test compares with:
 *   CALL ROUTE INODE ERRNO PORT
 * (ERRNO 0: it succeeded). Then it waits for stdin to close. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/net.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#if !defined(__i386__)
#error "build with gcc -m32: this program is about 32-bit callers"
#endif

enum route { DIRECT, SOCKETCALL };
static const char *route_name[] = { "direct", "socketcall" };

static long call3(enum route route, int sys_nr, int call, long a, long b, long c)
{
	unsigned long args[3] = { a, b, c };

	if (route == DIRECT)
		return syscall(sys_nr, a, b, c);
	return syscall(SYS_socketcall, call, args);
}

static struct sockaddr_in loopback(int port)
{
	struct sockaddr_in a;

	memset(&a, 0, sizeof a);
	a.sin_family = AF_INET;
	a.sin_port = htons(port);
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return a;
}

static unsigned long inode_of(int fd)
{
	struct stat st;

	if (fstat(fd, &st)) {
		perror("fstat");
		exit(1);
	}
	return (unsigned long)st.st_ino;
}

static int tcp_socket(int reuseaddr)
{
	int one = 1, fd = socket(AF_INET, SOCK_STREAM, 0);

	if (fd < 0 || (reuseaddr && setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one))) {
		perror("socket");
		exit(1);
	}
	return fd;
}

static void report(const char *what, enum route route, int fd, long ret, int port)
{
	printf("%s %s %lu %d %d\n", what, route_name[route], inode_of(fd), ret < 0 ? errno : 0, port);
}

static void do_bind(enum route route, int fd, int port)
{
	struct sockaddr_in a = loopback(port);

	report("bind", route, fd, call3(route, SYS_bind, SYS_BIND, fd, (long)&a, sizeof a), port);
}

static void do_listen(enum route route, int fd, int port)
{
	report("listen", route, fd, call3(route, SYS_listen, SYS_LISTEN, fd, 16, 0), port);
}

static void do_connect(enum route route, int fd, int port)
{
	struct sockaddr_in a = loopback(port);

	report("connect", route, fd, call3(route, SYS_connect, SYS_CONNECT, fd, (long)&a, sizeof a),
	       port);
}

int main(int argc, char **argv)
{
	int port = argc > 1 ? atoi(argv[1]) : 0;
	int holder = tcp_socket(0);
	char buf[64];

	if (port <= 0 || port > 65535 - 3) {
		fprintf(stderr, "usage: compat32 PORT\n");
		return 2;
	}
	do_bind(DIRECT, holder, port); /* succeeds: it holds the port */
	do_listen(DIRECT, holder, port);
	for (enum route r = DIRECT; r <= SOCKETCALL; r++) {
		int again = tcp_socket(0), first = tcp_socket(1), second = tcp_socket(1);
		int shared = port + 1 + r; /* two SO_REUSEADDR sockets may bind it, one may listen */

		do_bind(r, again, port); /* EADDRINUSE: the holder listens there */
		do_bind(r, first, shared);
		do_bind(r, second, shared);
		do_listen(r, first, shared);
		do_listen(r, second, shared); /* EADDRINUSE */
		do_connect(r, tcp_socket(0), port + 3); /* ECONNREFUSED: nobody listens */
	}
	fflush(stdout);
	while (read(0, buf, sizeof buf) > 0)
		;
	return 0;
}
