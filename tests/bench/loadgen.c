/* loadgen: the benchmark suite's traffic generator (built at test time with
 * the system compiler). Python cannot drive these rates on 2 vCPUs.
 *
 *   loadgen server PORT                  TCP + UDP echo server (1 byte in, 1 byte out)
 *   loadgen sink PORT SECONDS            count UDP datagrams; prints "pps N"
 *   loadgen tcp_rr IP PORT SECONDS       one connection, 1-byte request/response; "tps N"
 *   loadgen udp_rr IP PORT SECONDS       1-byte UDP request/response; "tps N"
 *   loadgen tcp_crr IP PORT SECONDS      connect/request/response/close; "tps N"
 *   loadgen flood IP PORT SECONDS        64-byte UDP datagrams as fast as possible; "sent N"
 *   loadgen udp_wait IP PORT SECONDS [GAP_US]
 *                                        4-byte UDP requests (a sequence number), GAP_US (100)
 *                                        apart, until one is answered; "waited S at T sent K seq
 *                                        N" (CLOCK_MONOTONIC seconds: T of the answer, K when the
 *                                        send of the answered request N returned; exit 0) or
 *                                        exit 3 after SECONDS
 *
 * Every loop is bounded by SECONDS; a client that gets no answer within 1 s
 * reports the rate so far and exits 3 (a denied path, not a hang).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void set_timeout(int fd, double secs) {
    struct timeval tv = {(time_t)secs, (suseconds_t)((secs - (time_t)secs) * 1e6)};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static struct sockaddr_in addr_of(const char *ip, int port) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    if (inet_pton(AF_INET, ip, &a.sin_addr) != 1) {
        fprintf(stderr, "bad address %s\n", ip);
        exit(2);
    }
    return a;
}

static void *tcp_conn(void *arg) {
    int fd = (int)(long)arg;
    char b[64];
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    for (;;) {
        ssize_t n = recv(fd, b, sizeof b, 0);
        if (n <= 0) break;
        if (send(fd, b, n, MSG_NOSIGNAL) != n) break;
    }
    close(fd);
    return NULL;
}

static void *udp_echo(void *arg) {
    int fd = (int)(long)arg;
    char b[2048];
    struct sockaddr_in peer;
    for (;;) {
        socklen_t len = sizeof peer;
        ssize_t n = recvfrom(fd, b, sizeof b, 0, (struct sockaddr *)&peer, &len);
        if (n > 0) sendto(fd, b, n, 0, (struct sockaddr *)&peer, len);
    }
    return NULL;
}

static int server(int port) {
    int one = 1;
    int t = socket(AF_INET, SOCK_STREAM, 0), u = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = addr_of("0.0.0.0", port);
    setsockopt(t, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(t, (struct sockaddr *)&a, sizeof a) || listen(t, 1024) || bind(u, (struct sockaddr *)&a, sizeof a)) {
        perror("bind");
        return 1;
    }
    pthread_t th;
    pthread_create(&th, NULL, udp_echo, (void *)(long)u);
    for (;;) {
        int c = accept(t, NULL, NULL);
        if (c < 0) continue;
        if (pthread_create(&th, NULL, tcp_conn, (void *)(long)c) == 0) pthread_detach(th);
        else close(c);
    }
}

static int sink(int port, double secs) {
    int u = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = addr_of("0.0.0.0", port);
    int big = 8 << 20;
    setsockopt(u, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    if (bind(u, (struct sockaddr *)&a, sizeof a)) { perror("bind"); return 1; }
    set_timeout(u, 0.2);
    char b[2048];
    long count = 0;
    double start = 0, end = now() + secs + 5, last = 0;
    while (now() < end) {
        if (recv(u, b, sizeof b, 0) > 0) {
            if (!count) { start = now(); end = start + secs; }
            count++;
            last = now();
        }
    }
    printf("pps %.0f\n", count && last > start ? count / (last - start) : 0.0);
    return 0;
}

static int rr(const char *ip, int port, double secs, int type, int reconnect) {
    struct sockaddr_in a = addr_of(ip, port);
    long count = 0;
    double start = now(), end = start + secs;
    int fd = -1, rc = 0;
    char c = 'x';
    while (now() < end) {
        if (fd < 0) {
            fd = socket(AF_INET, type, 0);
            set_timeout(fd, 1.0);
            int one = 1;
            if (type == SOCK_STREAM) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            if (connect(fd, (struct sockaddr *)&a, sizeof a)) { rc = 3; break; }
        }
        if (send(fd, &c, 1, MSG_NOSIGNAL) != 1 || recv(fd, &c, 1, 0) != 1) { rc = 3; break; }
        count++;
        if (reconnect) {
            /* RST instead of TIME_WAIT so a 2-vCPU box doesn't run out of ports */
            struct linger lg = {1, 0};
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
            close(fd);
            fd = -1;
        }
    }
    if (fd >= 0) close(fd);
    double el = now() - start;
    printf("tps %.0f\n", el > 0 ? count / el : 0.0);
    return rc;
}

static int flood(const char *ip, int port, double secs) {
    struct sockaddr_in a = addr_of(ip, port);
    int u = socket(AF_INET, SOCK_DGRAM, 0);
    if (connect(u, (struct sockaddr *)&a, sizeof a)) { perror("connect"); return 1; }
    char b[64];
    memset(b, 'f', sizeof b);
    long sent = 0;
    double end = now() + secs;
    while (now() < end) {
        for (int i = 0; i < 256; i++)
            if (send(u, b, sizeof b, 0) == sizeof b) sent++;
    }
    printf("sent %ld\n", sent);
    return 0;
}

/* how long until a path opens (a policy change reaching the kernel). Each
 * request carries its sequence number, echoed back; the time a send returned is
 * kept per number (a ring: an answer comes long before it wraps). On a veth the
 * whole path, the tc programs' verdict included, runs inside the send (the
 * softirq of the sending CPU, at bh enable), so the send's return bounds when
 * the kernel let the first answered request through: "sent" below. */
#define WAIT_RING 65536
static double wait_sent[WAIT_RING];

static int udp_wait(const char *ip, int port, double secs, long gap_us) {
    struct sockaddr_in a = addr_of(ip, port);
    int u = socket(AF_INET, SOCK_DGRAM, 0);
    if (connect(u, (struct sockaddr *)&a, sizeof a)) { perror("connect"); return 1; }
    unsigned int seq = 0, got;
    double start = now(), end = start + secs;
    /* ppoll's timeout is an hrtimer: SO_RCVTIMEO would round up to a jiffy (1-4 ms) */
    struct pollfd pfd = {u, POLLIN, 0};
    struct timespec gap = {gap_us / 1000000, (gap_us % 1000000) * 1000};
    /* the default timer slack (50 us) would stretch every gap by up to half
     * again: the moment the kernel starts letting the probes through would be
     * seen up to 150 us late instead of 100 */
    prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
    while (now() < end) {
        send(u, &seq, sizeof seq, MSG_DONTWAIT);
        wait_sent[seq % WAIT_RING] = now();
        seq++;
        if (ppoll(&pfd, 1, &gap, NULL) == 1 && recv(u, &got, sizeof got, MSG_DONTWAIT) == sizeof got
                && got < seq) {
            double t = now();
            printf("waited %.6f at %.6f sent %.6f seq %u\n", t - start, t, wait_sent[got % WAIT_RING], got);
            return 0;
        }
    }
    printf("waited %.6f\n", now() - start);
    return 3;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    if (argc >= 3 && !strcmp(argv[1], "server")) return server(atoi(argv[2]));
    if (argc >= 4 && !strcmp(argv[1], "sink")) return sink(atoi(argv[2]), atof(argv[3]));
    if (argc >= 5 && !strcmp(argv[1], "tcp_rr")) return rr(argv[2], atoi(argv[3]), atof(argv[4]), SOCK_STREAM, 0);
    if (argc >= 5 && !strcmp(argv[1], "udp_rr")) return rr(argv[2], atoi(argv[3]), atof(argv[4]), SOCK_DGRAM, 0);
    if (argc >= 5 && !strcmp(argv[1], "tcp_crr")) return rr(argv[2], atoi(argv[3]), atof(argv[4]), SOCK_STREAM, 1);
    if (argc >= 5 && !strcmp(argv[1], "udp_wait"))
        return udp_wait(argv[2], atoi(argv[3]), atof(argv[4]), argc >= 6 ? atol(argv[5]) : 100);
    if (argc >= 5 && !strcmp(argv[1], "flood")) return flood(argv[2], atoi(argv[3]), atof(argv[4]));
    fprintf(stderr, "usage: see the comment at the top of loadgen.c\n");
    return 2;
}
