/* A process with a hostile name, for tests/kernel/test_hostile.py.
 *
 *   hostile COMM PORT [ARG...]
 *
 * Sets its comm to COMM (prctl PR_SET_NAME: any byte but NUL), then, on
 * 127.0.0.1 of its network namespace: listens on TCP PORT, holds a
 * SO_REUSEPORT group of two listeners on PORT+1 and a UDP socket on PORT,
 * and every 100 ms: fails a bind() to PORT (EADDRINUSE: its own listener
 * holds it), and opens a connection to PORT that it closes first (so that
 * the TIME_WAIT socket it leaves is attributed to it). Its executable path
 * and ARGs (its command line) are whatever the test made them. It runs
 * until killed.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int tcp_socket(int reuseport)
{
	int one = 1, fd = socket(AF_INET, SOCK_STREAM, 0);

	if (fd < 0) {
		perror("socket");
		exit(1);
	}
	if (reuseport)
		setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
	return fd;
}

static struct sockaddr_in loopback(int port)
{
	struct sockaddr_in a;

	memset(&a, 0, sizeof(a));
	a.sin_family = AF_INET;
	a.sin_port = htons(port);
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return a;
}

static void listen_on(int fd, int port)
{
	struct sockaddr_in a = loopback(port);

	if (bind(fd, (struct sockaddr *)&a, sizeof(a)) || listen(fd, 64)) {
		perror("listen");
		exit(1);
	}
}

int main(int argc, char **argv)
{
	struct timespec pause = {0, 100 * 1000 * 1000};
	int port, listener, udp;
	struct sockaddr_in a;

	if (argc < 3) {
		fprintf(stderr, "usage: hostile COMM PORT [ARG...]\n");
		return 2;
	}
	prctl(PR_SET_NAME, argv[1], 0, 0, 0);
	port = atoi(argv[2]);
	listener = tcp_socket(0);
	listen_on(listener, port);
	listen_on(tcp_socket(1), port + 1);
	listen_on(tcp_socket(1), port + 1);
	udp = socket(AF_INET, SOCK_DGRAM, 0);
	a = loopback(port);
	if (bind(udp, (struct sockaddr *)&a, sizeof(a))) {
		perror("bind udp");
		return 1;
	}
	printf("ready\n");
	fflush(stdout);
	for (;;) {
		int clash = tcp_socket(0), client = tcp_socket(0), served;

		bind(clash, (struct sockaddr *)&a, sizeof(a)); /* EADDRINUSE */
		close(clash);
		if (connect(client, (struct sockaddr *)&a, sizeof(a)) == 0) {
			served = accept(listener, NULL, NULL);
			close(client); /* we close first: the TIME_WAIT is ours */
			if (served >= 0)
				close(served);
		} else {
			close(client);
		}
		nanosleep(&pause, NULL);
	}
}
