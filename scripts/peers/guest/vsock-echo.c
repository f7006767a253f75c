/* Guest-side vsock echo server for the real-peer tests (busybox has no AF_VSOCK tool).
 * Usage: vsock-echo PORT. Accepts connections one at a time and echoes every byte back;
 * prints one "SVQ-VSOCK conn" line per accepted connection on stdout (the console). */
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	struct sockaddr_vm a = {0};
	char buf[4096];
	int s;

	if (argc < 2) {
		fprintf(stderr, "usage: vsock-echo PORT\n");
		return 2;
	}
	s = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (s < 0) {
		perror("SVQ-FAIL vsock socket");
		return 1;
	}
	a.svm_family = AF_VSOCK;
	a.svm_cid = VMADDR_CID_ANY;
	a.svm_port = (unsigned)atoi(argv[1]);
	if (bind(s, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(s, 4) < 0) {
		perror("SVQ-FAIL vsock bind/listen");
		return 1;
	}
	for (;;) {
		int c = accept(s, NULL, NULL);
		ssize_t n;

		if (c < 0)
			continue;
		printf("SVQ-VSOCK conn\n");
		fflush(stdout);
		while ((n = read(c, buf, sizeof(buf))) > 0) {
			ssize_t off = 0;

			while (off < n) {
				ssize_t w = write(c, buf + off, (size_t)(n - off));

				if (w <= 0)
					break;
				off += w;
			}
		}
		close(c);
	}
}
