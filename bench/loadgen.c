/* Load generator for the egress-auditor benchmarks.
 *
 *   loadgen server PORT_BASE N_PORTS LIFETIME_S
 *       listens on 0.0.0.0:PORT_BASE .. PORT_BASE+N_PORTS-1, accepts and
 *       closes with epoll; exits on SIGTERM/SIGINT or after LIFETIME_S.
 *   loadgen udp-server PORT_BASE N_PORTS LIFETIME_S
 *       the same for UDP: binds the ports and reads every datagram.
 *   loadgen client N_ADDRS PORT_BASE N_PORTS WARMUP COUNT SECONDS [FLOWS_OUT]
 *       connects and closes (SO_LINGER 0: no TIME_WAIT) one connection at a
 *       time, round-robin over N_ADDRS x N_PORTS flows; WARMUP connects are
 *       made untimed first, then COUNT connects (0: no limit) for at most
 *       SECONDS seconds (0: no limit). Prints one JSON object; FLOWS_OUT gets
 *       one line per flow: "address port attempts failures".
 *   loadgen latency ...   (the client's arguments, with a COUNT)
 *       the client, also timing each timed connect() call: adds its p50, p99
 *       and maximum in microseconds to the JSON object.
 *   loadgen udp-sendto ... / loadgen udp-connect ...   (the client's arguments)
 *       one datagram per flow in turn instead of a connection: sendto() on
 *       one unconnected socket, or a new socket that connect()s, send()s and
 *       closes (how a resolver or a metrics client sends).
 *
 * Flow f goes to address bench_addr(ADDR_BASE + f / N_PORTS) and port PORT_BASE + f % N_PORTS;
 * every 127/8 address is local on a namespace's loopback. From the environment:
 *   LOADGEN_ADDR_BASE=A   the first address index (default 0): runs over other addresses
 *   LOADGEN_FORK_EVERY=N  (client, no warm-up) each N connects are made by a new child process,
 *                         which exits after them: many short-lived processes, as a build makes
 * Runs inside a network namespace made by the harness; it never changes any
 * network setting itself. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_PORTS 1024
#define MAX_ADDRS 50000
#define MAX_ERRNO 256

static volatile sig_atomic_t stopping;

static void on_signal(int sig)
{
    (void)sig;
    stopping = 1;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Address index a -> 127.100.(1 + a / 200).(1 + a % 200); never a .0 octet.
 * bench/loadgen.py mirrors this to read the rules back. */
static uint32_t bench_addr(uint32_t a)
{
    return (127u << 24) | (100u << 16) | ((1u + a / 200u) << 8) | (1u + a % 200u);
}

/* CPU time of this process (user + system): less sensitive to other load than a rate. */
static double cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           (double)ru.ru_stime.tv_usec / 1e6;
}

static long parse_long(const char *text, long lo, long hi, const char *what)
{
    char *end;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (errno || *end || v < lo || v > hi) {
        fprintf(stderr, "loadgen: bad %s %s (%ld..%ld)\n", what, text, lo, hi);
        exit(2);
    }
    return v;
}

static double parse_seconds(const char *text)
{
    char *end;
    errno = 0;
    double v = strtod(text, &end);
    if (errno || *end || v < 0 || v > 86400) {
        fprintf(stderr, "loadgen: bad duration %s (0..86400 seconds)\n", text);
        exit(2);
    }
    return v;
}

static int run_server(int argc, char **argv, int udp)
{
    if (argc != 5) {
        fprintf(stderr, "usage: loadgen server|udp-server PORT_BASE N_PORTS LIFETIME_S\n");
        return 2;
    }
    int base = (int)parse_long(argv[2], 1, 65535, "port base");
    int n = (int)parse_long(argv[3], 1, MAX_PORTS, "port count");
    double lifetime = (double)parse_long(argv[4], 1, 86400, "lifetime");
    if (base + n - 1 > 65535) {
        fprintf(stderr, "loadgen: ports beyond 65535\n");
        return 2;
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) {
        perror("epoll_create1");
        return 1;
    }
    for (int i = 0; i < n; i++) {
        int fd = socket(AF_INET, (udp ? SOCK_DGRAM : SOCK_STREAM) | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        int one = 1;
        struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)(base + i))};
        sin.sin_addr.s_addr = htonl(INADDR_ANY);
        if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ||
            bind(fd, (struct sockaddr *)&sin, sizeof(sin)) || (!udp && listen(fd, 65535))) {
            fprintf(stderr, "loadgen: listen on port %d: %s\n", base + i, strerror(errno));
            return 1;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev)) {
            perror("epoll_ctl");
            return 1;
        }
    }
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    /* The harness waits for this line before starting clients. */
    printf("listening %d ports from %d\n", n, base);
    fflush(stdout);

    unsigned long long accepted = 0;
    double deadline = now_s() + lifetime;
    struct epoll_event events[64];
    while (!stopping && now_s() < deadline) {
        int ready = epoll_wait(ep, events, 64, 200);
        for (int i = 0; i < ready; i++) {
            /* Drain the queue: each accepted socket is closed at once, each datagram read. */
            for (;;) {
                char byte;
                if (udp) {
                    if (recv(events[i].data.fd, &byte, 1, 0) < 0)
                        break;
                } else {
                    int c = accept4(events[i].data.fd, NULL, NULL, SOCK_CLOEXEC);
                    if (c < 0)
                        break;
                    close(c);
                }
                accepted++;
            }
        }
    }
    fprintf(stderr, "loadgen server: accepted %llu\n", accepted);
    return 0;
}

struct flow_count {
    uint32_t attempts;
    uint32_t failures;
};

/* The client's counters, followed by its flows' counts, in memory its children share. */
struct shared_counts {
    long flow, made, failures, timed;
    unsigned long errors[MAX_ERRNO];
};

enum client_kind { TCP_CONNECT, TCP_LATENCY, UDP_SENDTO, UDP_CONNECT };

static int by_value(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* One connect, or one datagram, to sin; 0 or an errno. With took, the connect() call's seconds. */
static int one_flow(enum client_kind kind, int udp_fd, const struct sockaddr_in *sin, double *took)
{
    static const struct linger abort_close = {.l_onoff = 1, .l_linger = 0};
    static const char byte = 'x';
    int err = 0;
    if (kind == UDP_SENDTO)
        return sendto(udp_fd, &byte, 1, 0, (const struct sockaddr *)sin, sizeof(*sin)) == 1 ? 0 : errno;
    int tcp = kind == TCP_CONNECT || kind == TCP_LATENCY;
    int fd = socket(AF_INET, (tcp ? SOCK_STREAM : SOCK_DGRAM) | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        fprintf(stderr, "loadgen: socket: %s\n", strerror(errno));
        exit(1);
    }
    if (tcp)
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &abort_close, sizeof(abort_close));
    double began = took ? now_s() : 0;
    if (connect(fd, (const struct sockaddr *)sin, sizeof(*sin)) != 0)
        err = errno;
    if (took)
        *took = now_s() - began;
    else if (kind == UDP_CONNECT && send(fd, &byte, 1, 0) != 1)
        err = errno;
    close(fd);
    return err;
}

static int run_client(int argc, char **argv, enum client_kind kind)
{
    if (argc != 8 && argc != 9) {
        fprintf(stderr, "usage: loadgen client|latency|udp-sendto|udp-connect N_ADDRS PORT_BASE N_PORTS WARMUP COUNT SECONDS "
                        "[FLOWS_OUT]\n");
        return 2;
    }
    long n_addrs = parse_long(argv[2], 1, MAX_ADDRS, "address count");
    long base = parse_long(argv[3], 1, 65535, "port base");
    long n_ports = parse_long(argv[4], 1, MAX_PORTS, "port count");
    long warmup = parse_long(argv[5], 0, 1000000000L, "warm-up count");
    long count = parse_long(argv[6], 0, 2000000000L, "count");
    double seconds = parse_seconds(argv[7]);
    const char *flows_out = argc == 9 ? argv[8] : NULL;
    if (base + n_ports - 1 > 65535) {
        fprintf(stderr, "loadgen: ports beyond 65535\n");
        return 2;
    }
    if (count == 0 && seconds == 0) {
        fprintf(stderr, "loadgen: give a count or a duration: the client must stop by itself\n");
        return 2;
    }
    if (kind == TCP_LATENCY && count == 0) {
        fprintf(stderr, "loadgen: latency needs a count\n");
        return 2;
    }
    const char *addr_env = getenv("LOADGEN_ADDR_BASE"), *fork_env = getenv("LOADGEN_FORK_EVERY");
    long addr_base = addr_env ? parse_long(addr_env, 0, MAX_ADDRS - n_addrs, "LOADGEN_ADDR_BASE") : 0;
    long fork_every = fork_env ? parse_long(fork_env, 1, 1000000000L, "LOADGEN_FORK_EVERY") : 0;
    if (fork_every && (warmup || kind == TCP_LATENCY)) {
        fprintf(stderr, "loadgen: LOADGEN_FORK_EVERY needs the client without warm-up\n");
        return 2;
    }
    long n_flows = n_addrs * n_ports;
    /* Shared with the children of LOADGEN_FORK_EVERY: they count into the same flows. */
    size_t shared_size = sizeof(struct shared_counts) + (size_t)n_flows * sizeof(struct flow_count);
    struct shared_counts *sh = mmap(NULL, shared_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sh == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    struct flow_count *flows = (struct flow_count *)(sh + 1);
    double *latency = kind == TCP_LATENCY ? calloc((size_t)count, sizeof(double)) : NULL;
    if (kind == TCP_LATENCY && !latency) {
        perror("calloc");
        return 1;
    }
    unsigned long *errors = sh->errors;
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);

    int udp_fd = kind == UDP_SENDTO ? socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0) : -1;
    if (kind == UDP_SENDTO && udp_fd < 0) {
        perror("socket");
        return 1;
    }
    long child_left = 0; /* in a child of LOADGEN_FORK_EVERY: connects it still makes */
    long processes = 0;
    double started = 0, deadline = 0, cpu_started = 0;
    long total = warmup + count;
    int in_warmup = warmup > 0;
    if (!in_warmup) {
        started = now_s();
        cpu_started = cpu_s();
        deadline = started + seconds;
    }
    while (!stopping && (count == 0 || sh->made < total)) {
        if (fork_every && child_left == 0) {
            pid_t child = fork();
            if (child < 0) {
                perror("fork");
                return 1;
            }
            if (child == 0) {
                child_left = fork_every;
            } else {
                processes++;
                while (waitpid(child, NULL, 0) < 0 && errno == EINTR)
                    ;
                if (!in_warmup && seconds > 0 && now_s() >= deadline)
                    break;
                continue;
            }
        }
        if (in_warmup && sh->made == warmup) {
            in_warmup = 0;
            started = now_s();
            cpu_started = cpu_s();
            deadline = started + seconds;
        }
        /* Reading the clock every connect would cost more than it measures. */
        if (!in_warmup && seconds > 0 && (sh->made & 127) == 0 && now_s() >= deadline)
            break;
        struct sockaddr_in sin = {.sin_family = AF_INET};
        sin.sin_addr.s_addr = htonl(bench_addr((uint32_t)(addr_base + sh->flow / n_ports)));
        sin.sin_port = htons((uint16_t)(base + sh->flow % n_ports));
        flows[sh->flow].attempts++;
        int err = one_flow(kind, udp_fd, &sin, latency && !in_warmup ? &latency[sh->timed] : NULL);
        if (err) {
            flows[sh->flow].failures++;
            sh->failures++;
            errors[err < MAX_ERRNO ? err : 0]++;
        }
        sh->made++;
        if (!in_warmup)
            sh->timed++;
        if (++sh->flow == n_flows)
            sh->flow = 0;
        if (child_left && --child_left == 0)
            _exit(0);
    }
    if (child_left)
        _exit(0);
    double elapsed = now_s() - started;
    double cpu = cpu_s() - cpu_started;
    if (in_warmup)
        elapsed = cpu = 0;

    if (flows_out) {
        FILE *out = fopen(flows_out, "w");
        if (!out) {
            fprintf(stderr, "loadgen: %s: %s\n", flows_out, strerror(errno));
            return 1;
        }
        for (long f = 0; f < n_flows; f++) {
            struct in_addr a = {.s_addr = htonl(bench_addr((uint32_t)(addr_base + f / n_ports)))};
            fprintf(out, "%s %ld %u %u\n", inet_ntoa(a), base + f % n_ports, flows[f].attempts,
                    flows[f].failures);
        }
        fclose(out);
    }
    printf("{\"connects\": %ld, \"timed_connects\": %ld, \"seconds\": %.6f, \"rate\": %.1f, "
           "\"cpu_seconds\": %.6f, \"failures\": %ld, \"flows\": %ld, \"processes\": %ld, \"errors\": {",
           sh->made, sh->timed, elapsed, elapsed > 0 ? (double)sh->timed / elapsed : 0.0, cpu, sh->failures, n_flows, processes);
    int first = 1;
    for (int e = 0; e < MAX_ERRNO; e++) {
        if (errors[e]) {
            printf("%s\"%s\": %lu", first ? "" : ", ", strerrorname_np(e) ? strerrorname_np(e) : "?", errors[e]);
            first = 0;
        }
    }
    printf("}");
    if (latency) {
        qsort(latency, (size_t)sh->timed, sizeof(double), by_value);
        double p50 = sh->timed ? latency[sh->timed / 2] : 0, p99 = sh->timed ? latency[(sh->timed * 99) / 100] : 0;
        double top = sh->timed ? latency[sh->timed - 1] : 0;
        printf(", \"p50_us\": %.1f, \"p99_us\": %.1f, \"max_us\": %.1f", p50 * 1e6, p99 * 1e6, top * 1e6);
        free(latency);
    }
    printf("}\n");
    if (udp_fd >= 0)
        close(udp_fd);
    munmap(sh, shared_size);
    return 0;

}

int main(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "server") == 0)
        return run_server(argc, argv, 0);
    if (argc >= 2 && strcmp(argv[1], "udp-server") == 0)
        return run_server(argc, argv, 1);
    if (argc >= 2 && strcmp(argv[1], "client") == 0)
        return run_client(argc, argv, TCP_CONNECT);
    if (argc >= 2 && strcmp(argv[1], "latency") == 0)
        return run_client(argc, argv, TCP_LATENCY);
    if (argc >= 2 && strcmp(argv[1], "udp-sendto") == 0)
        return run_client(argc, argv, UDP_SENDTO);
    if (argc >= 2 && strcmp(argv[1], "udp-connect") == 0)
        return run_client(argc, argv, UDP_CONNECT);
    fprintf(stderr, "usage: loadgen server|udp-server|client|latency|udp-sendto|udp-connect ...\n");
    return 2;
}
