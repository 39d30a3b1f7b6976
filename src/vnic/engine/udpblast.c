/*
 * vnic-udpblast: send UDP datagrams at a fixed packet rate, in batches
 * (sendmmsg), for a fixed time. A measurement tool: iperf3 sends one
 * datagram per system call and tops out near 60 kpps of small packets on
 * a 2-core machine, below what the delay engine must be shown to carry.
 *
 * Usage: vnic-udpblast ADDRESS PORT PPS PAYLOAD_BYTES SECONDS
 * Sends exactly round(PPS * SECONDS) datagrams: one that fell due while the
 * sender was descheduled is sent late, in the next batch, not skipped (a busy
 * machine used to lose the last few). It gives up 10 s after SECONDS if the
 * kernel keeps refusing them.
 * Prints one JSON line: {"sent": N, "seconds": S}.
 * Each datagram carries its sequence number (8 bytes, big endian) first.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 32

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: vnic-udpblast ADDRESS PORT PPS PAYLOAD_BYTES SECONDS\n");
        return 2;
    }
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &to.sin_addr) != 1) {
        fprintf(stderr, "vnic-udpblast: %s is not an IPv4 address\n", argv[1]);
        return 2;
    }
    double pps = atof(argv[3]), seconds = atof(argv[5]);
    size_t size = (size_t)atoi(argv[4]);
    if (pps <= 0 || seconds <= 0 || seconds > 600 || size < 8 || size > 65000) {
        fprintf(stderr, "vnic-udpblast: PPS > 0, 8 <= PAYLOAD_BYTES <= 65000, 0 < SECONDS <= 600\n");
        return 2;
    }
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) { perror("socket"); return 1; }
    int big = 8 << 20;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    if (connect(fd, (struct sockaddr *)&to, sizeof to) < 0) { perror("connect"); return 1; }
    unsigned char (*bufs)[65000] = calloc(BATCH, sizeof *bufs);
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    uint64_t sent = 0, total = (uint64_t)(pps * seconds + 0.5);
    double start = now_s(), give_up = start + seconds + 10;
    while (sent < total) {
        double t = now_s();
        if (t >= give_up) break;
        uint64_t due = (uint64_t)((t - start) * pps);
        if (due > total) due = total;
        if (due <= sent) {
            struct timespec nap = {0, 20000};
            nanosleep(&nap, NULL);
            continue;
        }
        int n = (int)((due - sent) < BATCH ? (due - sent) : BATCH);
        for (int i = 0; i < n; i++) {
            uint64_t seq = sent + (uint64_t)i;
            for (int b = 0; b < 8; b++) bufs[i][b] = (unsigned char)(seq >> (56 - 8 * b));
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = size;
            memset(&msgs[i], 0, sizeof msgs[i]);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int k = sendmmsg(fd, msgs, (unsigned)n, 0);
        if (k > 0) sent += (uint64_t)k;
    }
    printf("{\"sent\": %llu, \"seconds\": %.6f}\n", (unsigned long long)sent, now_s() - start);
    return 0;
}
