/* The short-lived process of bench/lineage.py: one connect, then exit.
 *
 *   lineage_client PORT TOKEN LOG
 *
 * Connects to 127.0.0.1:PORT (a closed port on the namespace's loopback: the
 * kernel answers RST at once), then appends "TOKEN PID PPID UID" to LOG in
 * one write (O_APPEND: lines from many clients never mix) and exits. That
 * line is the ground truth both attribution methods are checked against. */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: lineage_client PORT TOKEN LOG\n");
        return 2;
    }
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[1]))};
    to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return 1;
    (void)connect(fd, (struct sockaddr *)&to, sizeof(to)); /* refused: only the attempt matters */
    close(fd);
    char line[256];
    int len = snprintf(line, sizeof(line), "%s %d %d %d\n", argv[2], (int)getpid(), (int)getppid(), (int)getuid());
    int log = open(argv[3], O_WRONLY | O_APPEND | O_CREAT, 0666);
    if (log < 0 || write(log, line, (size_t)len) != len)
        return 1;
    close(log);
    return 0;
}
