/*
 * vnic-delayd: the vnic delay engine. One process per vNIC, one thread per
 * direction. Each thread reads whole frames from one interface (AF_PACKET,
 * with virtio-net headers so checksum-offloaded and GSO frames pass intact),
 * decides loss / duplication / corruption, holds each frame until its
 * release time and writes it to the other interface, whose qdisc (HTB)
 * then applies the rate.
 *
 * Why userspace: on kernels without sch_netem there is no in-kernel way to
 * hold a packet for a chosen time (tbf/htb only pace by rate, and
 * bpf_skb_set_tstamp needs fq/etf). Frames travel vh<id> <-> vx<id>; the
 * bridge only sees vy<id>, so nothing bypasses the engine.
 *
 * Usage:
 *   vnic-delayd --tag TAG --stats FILE DIRSPEC [DIRSPEC] [--control FILE]
 *   DIRSPEC = name=egress,from=IF,to=IF,delay=NS,jitter=NS,dist=uniform|normal|pareto|paretonormal,
 *             reorder=PPB,loss=PPB,burst=MILLI (mean loss burst length x1000; 0 = random),
 *             dup=PPB,corrupt=PPB,limit=BYTES,seed=N
 * Probabilities are parts per billion (PPB), times nanoseconds, sizes bytes.
 *
 * Live change: with --control FILE, SIGHUP makes the engine read FILE (a line
 * "generation=N", then one DIRSPEC per direction, in the order and with the
 * names and devices given at start) and swap the parameters into each
 * direction between two packets: held frames stay queued, counters keep
 * counting, and the random generators keep their state unless the seed
 * changes. The engine then stores N in the stats file's generation (or, when
 * it rejects the file, in rejected, with the reason on stderr).
 *
 * Counters live in FILE (mmap'd, see struct stats) so readers never block
 * the packet path. Prints "ready" on stdout once every socket is bound.
 * Exits 0 on SIGTERM/SIGINT, 3 when an interface disappears (the vNIC was
 * torn down), 2 on bad arguments, 1 on other errors.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/virtio_net.h>
#include <math.h>
#include <net/if.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAX_FRAME (65536 + 64)
#define PPB 1000000000ULL
/* A frame released more than this after its due time counts as late. */
#define LATE_NS 500000ULL
/* A sleeping thread wakes some tens of microseconds after its timer on a
 * busy or virtualised host. Each direction learns that lateness (a moving
 * average) and asks to wake that much earlier; frames due within EARLY_NS
 * of now go out with the batch being released. Spinning instead would be
 * exact but burns a core per direction, which the VMs need. */
#define EARLY_NS 20000ULL
#define MAX_WAKE_ADVANCE_NS 200000ULL
#define STATS_MAGIC 0x766e696364656c31ULL /* "vnicdel1" */

enum counter {
    C_RX_FRAMES, C_RX_BYTES, C_TX_FRAMES, C_TX_BYTES, C_HELD_FRAMES, C_HELD_BYTES,
    C_DROP_LOSS, C_DROP_OVERFLOW, C_DROP_SEND, C_DUPLICATED, C_CORRUPTED, C_REORDERED,
    C_LATE, C_MAX_LATE_NS, C_SOCKET_DROPS, C_COUNT
};

struct stats_file {
    uint64_t magic, version, pid, ndirs;
    _Atomic uint64_t dir[2][C_COUNT];
    /* The last control generation applied, and the last rejected. */
    _Atomic uint64_t generation, rejected;
};

enum dist { D_UNIFORM, D_NORMAL, D_PARETO, D_PARETONORMAL };

struct rng { uint64_t s[4]; };

struct packet {
    uint64_t due;      /* CLOCK_MONOTONIC ns */
    uint64_t seq;      /* arrival order, ties in the heap */
    uint32_t len;      /* bytes including the virtio-net header */
    unsigned char data[];
};

struct direction {
    char name[16], from[IFNAMSIZ], to[IFNAMSIZ];
    uint64_t delay, jitter, reorder, loss, burst_milli, dup, corrupt, limit, seed;
    enum dist dist;
    int rx_fd, tx_fd, tx_ifindex;
    _Atomic uint64_t *c;
    struct rng loss_rng, jitter_rng, misc_rng;
    int ge_bad;                 /* Gilbert-Elliott state */
    uint64_t last_due, seq;
    uint64_t wake_late_ns;      /* moving average of how late ppoll wakes */
    /* Pending frames: a FIFO when order is kept, else a min-heap on due. */
    struct packet **q;
    size_t qlen, qcap, qhead;
    int ordered;
    unsigned char (*bufs)[MAX_FRAME]; /* BATCH receive buffers */
    /* Live change: parameters waiting to be swapped in by this direction's
     * thread, the eventfd that wakes it, and the generation it applied last. */
    struct direction *_Atomic pending;
    int wake_fd;
    uint64_t generation;
    _Atomic uint64_t applied;
};

static volatile sig_atomic_t stop_flag;
static const char *tag = "";

static void on_signal(int sig) { (void)sig; stop_flag = 1; }

static void die(int code, const char *what) {
    fprintf(stderr, "vnic-delayd %s: %s: %s\n", tag, what, strerror(errno));
    exit(code);
}

/* ------------------------------------------------------------ randomness */

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void rng_seed(struct rng *r, uint64_t seed, uint64_t stream) {
    uint64_t x = seed ^ (stream * 0xd1b54a32d192ed03ULL);
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&x);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

/* xoshiro256** */
static uint64_t rng_next(struct rng *r) {
    uint64_t *s = r->s, result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]; s[2] ^= t; s[3] = rotl(s[3], 45);
    return result;
}

/* Uniform in (0, 1). */
static double rng_unit(struct rng *r) { return ((rng_next(r) >> 11) + 0.5) * 0x1.0p-53; }

/* True with probability ppb / 1e9. */
static int chance(struct rng *r, uint64_t ppb) {
    return ppb && (rng_next(r) % PPB) < ppb;
}

static double std_normal(struct rng *r) {
    return sqrt(-2.0 * log(rng_unit(r))) * cos(2.0 * M_PI * rng_unit(r));
}

/* Pareto with shape 3 and scale 1, truncated at PARETO_MAX (where netem's
 * table ends, about 4 of its units), standardised to mean 0 and sigma 1.
 * Untruncated, a shape-3 Pareto has no fourth moment: the spread of a
 * finite sample would never settle, and one draw in a million would add
 * a hundred sigmas of delay. */
#define PARETO_SHAPE 3.0
#define PARETO_MAX 4.5
static double pareto_mean, pareto_sigma;

static void pareto_init(void) {
    double a = PARETO_SHAPE, tail = pow(PARETO_MAX, -a), norm = a / (1.0 - tail);
    pareto_mean = norm * (1.0 - pow(PARETO_MAX, 1.0 - a)) / (a - 1.0);
    double second = norm * (1.0 - pow(PARETO_MAX, 2.0 - a)) / (a - 2.0);
    pareto_sigma = sqrt(second - pareto_mean * pareto_mean);
}

static double std_pareto(struct rng *r) {
    double tail = pow(PARETO_MAX, -PARETO_SHAPE);
    double x = pow(1.0 - rng_unit(r) * (1.0 - tail), -1.0 / PARETO_SHAPE);
    return (x - pareto_mean) / pareto_sigma;
}

/* Offset from the mean delay, ns. Uniform spans +-jitter (sigma jitter/sqrt 3,
 * as netem); the others have sigma = jitter. */
static double jitter_sample(struct direction *d) {
    double j = (double)d->jitter;
    switch (d->dist) {
    case D_UNIFORM: return (2.0 * rng_unit(&d->jitter_rng) - 1.0) * j;
    case D_NORMAL: return std_normal(&d->jitter_rng) * j;
    case D_PARETO: return std_pareto(&d->jitter_rng) * j;
    case D_PARETONORMAL:
        /* netem's mix: a quarter normal, three quarters pareto, rescaled to sigma 1. */
        return (0.25 * std_normal(&d->jitter_rng) + 0.75 * std_pareto(&d->jitter_rng))
               / sqrt(0.25 * 0.25 + 0.75 * 0.75) * j;
    }
    return 0;
}

/* ------------------------------------------------------------ loss model */

/* Random loss, or the Gilbert model given by mean loss m and mean burst b:
 * bad->good r = 1/b, good->bad p = m r / (1 - m); every frame in bad is lost. */
static int lose(struct direction *d) {
    if (!d->loss) return 0;
    if (!d->burst_milli) return chance(&d->loss_rng, d->loss);
    double m = (double)d->loss / PPB, r = 1000.0 / (double)d->burst_milli;
    double p = m * r / (1.0 - m);
    double u = rng_unit(&d->loss_rng);
    if (d->ge_bad) { if (u < r) d->ge_bad = 0; }
    else if (u < p) d->ge_bad = 1;
    return d->ge_bad;
}

/* ------------------------------------------------------------ frames */

static uint16_t fold(uint32_t sum) {
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)sum;
}

/* Finish a checksum the sender left to offload (the field holds the
 * pseudo-header sum), so a corrupted frame is really seen as corrupted. */
static void finish_checksum(unsigned char *frame, size_t len, struct virtio_net_hdr *vh) {
    if (!(vh->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)) return;
    size_t start = vh->csum_start, field = start + vh->csum_offset;
    if (field + 2 > len) return;
    uint32_t sum = 0;
    for (size_t i = start; i + 1 < len; i += 2) sum += (uint32_t)(frame[i] << 8 | frame[i + 1]);
    if ((len - start) & 1) sum += (uint32_t)frame[len - 1] << 8;
    uint16_t c = (uint16_t)~fold(sum);
    frame[field] = (unsigned char)(c >> 8);
    frame[field + 1] = (unsigned char)c;
    vh->flags &= (uint8_t)~VIRTIO_NET_HDR_F_NEEDS_CSUM;
}

static void corrupt_frame(struct direction *d, struct packet *p) {
    struct virtio_net_hdr *vh = (struct virtio_net_hdr *)p->data;
    unsigned char *frame = p->data + sizeof *vh;
    size_t len = p->len - sizeof *vh;
    if (len <= ETH_HLEN) return;
    finish_checksum(frame, len, vh);
    /* One bit error after the Ethernet header, as netem does (netem picks the payload). */
    size_t at = ETH_HLEN + rng_next(&d->misc_rng) % (len - ETH_HLEN);
    frame[at] ^= (unsigned char)(1u << (rng_next(&d->misc_rng) % 8));
}

/* ------------------------------------------------------------ queue */

static int before(const struct packet *a, const struct packet *b) {
    return a->due < b->due || (a->due == b->due && a->seq < b->seq);
}

static void q_grow(struct direction *d) {
    if (d->qlen < d->qcap) return;
    size_t cap = d->qcap ? d->qcap * 2 : 4096;
    struct packet **n = malloc(cap * sizeof *n);
    if (!n) die(1, "out of memory");
    for (size_t i = 0; i < d->qlen; i++) n[i] = d->q[(d->qhead + i) % (d->qcap ? d->qcap : 1)];
    free(d->q);
    d->q = n; d->qcap = cap; d->qhead = 0;
}

static void q_push(struct direction *d, struct packet *p) {
    q_grow(d);
    if (d->ordered) { d->q[(d->qhead + d->qlen++) % d->qcap] = p; return; }
    size_t i = d->qlen++;
    while (i) {
        size_t up = (i - 1) / 2;
        if (!before(p, d->q[up])) break;
        d->q[i] = d->q[up]; i = up;
    }
    d->q[i] = p;
}

static struct packet *q_peek(struct direction *d) {
    if (!d->qlen) return NULL;
    return d->ordered ? d->q[d->qhead] : d->q[0];
}

static struct packet *q_pop(struct direction *d) {
    struct packet *top = q_peek(d);
    if (!top) return NULL;
    if (d->ordered) { d->qhead = (d->qhead + 1) % d->qcap; d->qlen--; return top; }
    struct packet *last = d->q[--d->qlen];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        const struct packet *best = last;
        if (l < d->qlen && before(d->q[l], best)) { m = l; best = d->q[l]; }
        if (r < d->qlen && before(d->q[r], best)) m = r;
        if (m == i) break;
        d->q[i] = d->q[m]; i = m;
    }
    if (d->qlen) d->q[i] = last;
    return top;
}

/* ------------------------------------------------------------ engine */

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void add(struct direction *d, enum counter c, uint64_t v) {
    atomic_fetch_add_explicit(&d->c[c], v, memory_order_relaxed);
}

static void sub(struct direction *d, enum counter c, uint64_t v) {
    atomic_fetch_sub_explicit(&d->c[c], v, memory_order_relaxed);
}

static uint64_t held_bytes(struct direction *d) {
    return atomic_load_explicit(&d->c[C_HELD_BYTES], memory_order_relaxed);
}

static void schedule(struct direction *d, struct packet *p, uint64_t arrival) {
    if (held_bytes(d) + p->len > d->limit) {
        add(d, C_DROP_OVERFLOW, 1);
        free(p);
        return;
    }
    double offset = (double)d->delay;
    int jump = d->reorder && chance(&d->misc_rng, d->reorder);
    if (jump) {
        offset = 0; /* sent at once, ahead of what is held (netem's reorder) */
        add(d, C_REORDERED, 1);
    } else if (d->jitter) {
        offset += jitter_sample(d);
    }
    if (offset < 0) offset = 0;
    uint64_t due = arrival + (uint64_t)offset;
    /* Order is kept unless reordering was asked for: a frame never leaves
     * before the one that arrived ahead of it. */
    if (d->ordered && due < d->last_due) due = d->last_due;
    d->last_due = due;
    p->due = due;
    p->seq = d->seq++;
    q_push(d, p);
    add(d, C_HELD_FRAMES, 1);
    add(d, C_HELD_BYTES, p->len);
}

static struct packet *clone_packet(const struct packet *p) {
    struct packet *c = malloc(sizeof *c + p->len);
    if (c) memcpy(c, p, sizeof *c + p->len);
    return c;
}

static void receive(struct direction *d) {
    unsigned char (*bufs)[MAX_FRAME] = d->bufs;
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    char control[BATCH][CMSG_SPACE(sizeof(struct timespec))];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = MAX_FRAME;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_control = control[i];
        msgs[i].msg_hdr.msg_controllen = sizeof control[i];
    }
    int n = recvmmsg(d->rx_fd, msgs, BATCH, MSG_DONTWAIT, NULL);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) return;
        if (errno == ENETDOWN || errno == ENXIO || errno == ENODEV) exit(3);
        die(1, "recvmmsg");
    }
    uint64_t mono = now_ns();
    struct timespec rt;
    clock_gettime(CLOCK_REALTIME, &rt);
    int64_t real_minus_mono = (int64_t)((uint64_t)rt.tv_sec * 1000000000ULL + (uint64_t)rt.tv_nsec) - (int64_t)mono;
    for (int i = 0; i < n; i++) {
        uint32_t len = msgs[i].msg_len;
        /* The delay counts from when the kernel received the frame, not from
         * when this thread got round to reading it. */
        uint64_t arrival = mono;
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msgs[i].msg_hdr); cm; cm = CMSG_NXTHDR(&msgs[i].msg_hdr, cm)) {
            if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SO_TIMESTAMPNS) {
                struct timespec ts;
                memcpy(&ts, CMSG_DATA(cm), sizeof ts);
                int64_t t = (int64_t)((uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec) - real_minus_mono;
                if (t > 0 && (uint64_t)t <= mono) arrival = (uint64_t)t;
            }
        }
        add(d, C_RX_FRAMES, 1);
        add(d, C_RX_BYTES, len > sizeof(struct virtio_net_hdr) ? len - sizeof(struct virtio_net_hdr) : 0);
        if (lose(d)) { add(d, C_DROP_LOSS, 1); continue; }
        struct packet *p = malloc(sizeof *p + len);
        if (!p) { add(d, C_DROP_OVERFLOW, 1); continue; }
        p->len = len;
        memcpy(p->data, bufs[i], len);
        struct packet *copy = chance(&d->misc_rng, d->dup) ? clone_packet(p) : NULL;
        if (chance(&d->misc_rng, d->corrupt)) { corrupt_frame(d, p); add(d, C_CORRUPTED, 1); }
        schedule(d, p, arrival);
        if (copy) { add(d, C_DUPLICATED, 1); schedule(d, copy, arrival); }
    }
}

static void release(struct direction *d) {
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    struct packet *sent[BATCH];
    for (;;) {
        uint64_t now = now_ns();
        int n = 0;
        struct packet *p;
        while (n < BATCH && (p = q_peek(d)) && p->due <= now + EARLY_NS) {
            q_pop(d);
            uint64_t late = now > p->due ? now - p->due : 0;
            if (late > LATE_NS) add(d, C_LATE, 1);
            if (late > atomic_load_explicit(&d->c[C_MAX_LATE_NS], memory_order_relaxed))
                atomic_store_explicit(&d->c[C_MAX_LATE_NS], late, memory_order_relaxed);
            iov[n].iov_base = p->data;
            iov[n].iov_len = p->len;
            memset(&msgs[n], 0, sizeof msgs[n]);
            msgs[n].msg_hdr.msg_iov = &iov[n];
            msgs[n].msg_hdr.msg_iovlen = 1;
            sent[n++] = p;
        }
        if (!n) return;
        int done = 0;
        while (done < n) {
            int k = sendmmsg(d->tx_fd, msgs + done, (unsigned)(n - done), MSG_DONTWAIT);
            if (k < 0) {
                if (errno == EINTR) continue;
                if (errno == ENETDOWN || errno == ENXIO || errno == ENODEV) exit(3);
                /* The shaper's queue (or the socket buffer) is full: this
                 * frame is dropped there, as the kernel would. */
                add(d, C_DROP_SEND, 1);
                done++;
                continue;
            }
            for (int i = done; i < done + k; i++) {
                add(d, C_TX_FRAMES, 1);
                add(d, C_TX_BYTES, sent[i]->len - sizeof(struct virtio_net_hdr));
            }
            done += k;
        }
        for (int i = 0; i < n; i++) {
            sub(d, C_HELD_FRAMES, 1);
            sub(d, C_HELD_BYTES, sent[i]->len);
            free(sent[i]);
        }
    }
}

static void socket_drops(struct direction *d) {
    struct tpacket_stats st;
    socklen_t l = sizeof st;
    if (getsockopt(d->rx_fd, SOL_PACKET, PACKET_STATISTICS, &st, &l) == 0 && st.tp_drops)
        add(d, C_SOCKET_DROPS, st.tp_drops);
}

static void apply_pending(struct direction *d);

static void *run_direction(void *arg) {
    struct direction *d = arg;
    struct pollfd pfds[2] = {{.fd = d->rx_fd, .events = POLLIN}, {.fd = d->wake_fd, .events = POLLIN}};
    struct pollfd *pfd = &pfds[0];
    uint64_t last_stats = now_ns();
    while (!stop_flag) {
        apply_pending(d);
        release(d);
        struct packet *head = q_peek(d);
        struct timespec ts = {.tv_sec = 0, .tv_nsec = 200000000};
        uint64_t wake_at = 0;
        if (head) {
            uint64_t now = now_ns();
            uint64_t advance = d->wake_late_ns < MAX_WAKE_ADVANCE_NS ? d->wake_late_ns : MAX_WAKE_ADVANCE_NS;
            wake_at = head->due > advance ? head->due - advance : 0;
            uint64_t wait = wake_at > now ? wake_at - now : 0;
            if (wait < 200000000ULL) { ts.tv_sec = 0; ts.tv_nsec = (long)wait; }
            else wake_at = 0;
        }
        int r = ppoll(pfds, 2, &ts, NULL);
        if (r > 0 && (pfds[1].revents & POLLIN)) {
            uint64_t count;
            if (read(d->wake_fd, &count, sizeof count) < 0 && errno != EAGAIN) die(1, "eventfd read");
            apply_pending(d);
        }
        if (r < 0 && errno != EINTR) die(1, "ppoll");
        if (r == 0 && wake_at) {
            /* Timed out: learn how late the wake-up was (EWMA, 1/8 weight). */
            uint64_t woke = now_ns();
            int64_t late = (int64_t)woke - (int64_t)wake_at;
            if (late < 0) late = 0;
            d->wake_late_ns = (d->wake_late_ns * 7 + (uint64_t)late) / 8;
        }
        if (r > 0 && (pfd->revents & (POLLERR | POLLHUP | POLLNVAL))) {
            int err = 0;
            socklen_t l = sizeof err;
            getsockopt(d->rx_fd, SOL_SOCKET, SO_ERROR, &err, &l);
            if (err == ENETDOWN || err == ENXIO || err == ENODEV || (pfd->revents & POLLNVAL)) exit(3);
        }
        if (r > 0 && (pfd->revents & POLLIN)) receive(d);
        uint64_t now = now_ns();
        if (now - last_stats > 100000000ULL) { socket_drops(d); last_stats = now; }
    }
    return NULL;
}

/* ------------------------------------------------------------ setup */

static int packet_socket(const char *ifname, int rx, int *ifindex) {
    int fd = socket(AF_PACKET, SOCK_RAW, rx ? htons(ETH_P_ALL) : 0);
    if (fd < 0) die(1, "socket(AF_PACKET)");
    int one = 1, big = 64 << 20;
    if (setsockopt(fd, SOL_PACKET, PACKET_VNET_HDR, &one, sizeof one) < 0) die(1, "PACKET_VNET_HDR");
    int idx = (int)if_nametoindex(ifname);
    if (!idx) { fprintf(stderr, "vnic-delayd %s: no interface %s\n", tag, ifname); exit(3); }
    if (rx) {
        /* Frames we send out of this interface must not come back to us. */
        if (setsockopt(fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof one) < 0)
            die(1, "PACKET_IGNORE_OUTGOING");
        if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big) < 0) die(1, "SO_RCVBUFFORCE");
        if (setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one) < 0) die(1, "SO_TIMESTAMPNS");
    } else {
        /* Frames wait in the shaper's queue charged to this socket; a small
         * send buffer would stall the engine instead of letting the queue drop. */
        if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof big) < 0) die(1, "SO_SNDBUFFORCE");
    }
    struct sockaddr_ll sll = {.sll_family = AF_PACKET, .sll_ifindex = idx,
                              .sll_protocol = rx ? htons(ETH_P_ALL) : 0};
    if (bind(fd, (struct sockaddr *)&sll, sizeof sll) < 0) die(1, "bind");
    if (ifindex) *ifindex = idx;
    return fd;
}

/* Parse one DIRSPEC into d (zeroed first); on error return -1 with the reason in err. */
static int parse_spec(struct direction *d, char *spec, char *err, size_t errlen) {
    memset(d, 0, sizeof *d);
    d->limit = 64ULL << 20;
    for (char *save, *kv = strtok_r(spec, ",", &save); kv; kv = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(kv, '=');
        if (!eq) { snprintf(err, errlen, "%s is not key=value", kv); return -1; }
        *eq = 0;
        const char *k = kv, *v = eq + 1;
        uint64_t *num = NULL;
        if (!strcmp(k, "name")) snprintf(d->name, sizeof d->name, "%s", v);
        else if (!strcmp(k, "from")) snprintf(d->from, sizeof d->from, "%s", v);
        else if (!strcmp(k, "to")) snprintf(d->to, sizeof d->to, "%s", v);
        else if (!strcmp(k, "delay")) num = &d->delay;
        else if (!strcmp(k, "jitter")) num = &d->jitter;
        else if (!strcmp(k, "reorder")) num = &d->reorder;
        else if (!strcmp(k, "loss")) num = &d->loss;
        else if (!strcmp(k, "burst")) num = &d->burst_milli;
        else if (!strcmp(k, "dup")) num = &d->dup;
        else if (!strcmp(k, "corrupt")) num = &d->corrupt;
        else if (!strcmp(k, "limit")) num = &d->limit;
        else if (!strcmp(k, "seed")) num = &d->seed;
        else if (!strcmp(k, "dist")) {
            if (!strcmp(v, "uniform")) d->dist = D_UNIFORM;
            else if (!strcmp(v, "normal")) d->dist = D_NORMAL;
            else if (!strcmp(v, "pareto")) d->dist = D_PARETO;
            else if (!strcmp(v, "paretonormal")) d->dist = D_PARETONORMAL;
            else { snprintf(err, errlen, "unknown dist %s", v); return -1; }
        } else { snprintf(err, errlen, "unknown key %s", k); return -1; }
        if (num) {
            char *end;
            errno = 0;
            unsigned long long x = strtoull(v, &end, 10);
            if (errno || *end || !*v) { snprintf(err, errlen, "%s=%s is not a number", k, v); return -1; }
            *num = x;
        }
    }
    if (!d->from[0] || !d->to[0]) { snprintf(err, errlen, "a direction needs from= and to="); return -1; }
    if (d->loss >= PPB || d->reorder > PPB || d->dup > PPB || d->corrupt > PPB) {
        snprintf(err, errlen, "probabilities are 0..1e9 parts per billion"); return -1;
    }
    if (d->burst_milli && d->burst_milli < 1000) { snprintf(err, errlen, "burst is >= 1000"); return -1; }
    d->ordered = d->reorder == 0;
    return 0;
}

/* Independent streams, so the loss decisions for a packet sequence
 * depend only on the seed, not on jitter or duplication settings. */
static void seed_rngs(struct direction *d) {
    rng_seed(&d->loss_rng, d->seed, 1);
    rng_seed(&d->jitter_rng, d->seed, 2);
    rng_seed(&d->misc_rng, d->seed, 3);
    d->ge_bad = 0;
}

static void parse_dir(struct direction *d, char *spec) {
    char err[256];
    if (parse_spec(d, spec, err, sizeof err)) { fprintf(stderr, "vnic-delayd: %s\n", err); exit(2); }
    seed_rngs(d);
}

/* ------------------------------------------------------------ live change */

static int by_due(const void *a, const void *b) {
    const struct packet *x = *(struct packet *const *)a, *y = *(struct packet *const *)b;
    return before(x, y) ? -1 : before(y, x) ? 1 : 0;
}

/* Switch the held frames between FIFO (order kept) and heap (reordering):
 * sorted by due time, the frames are both a valid FIFO and a valid heap. */
static void q_reshape(struct direction *d, int ordered) {
    if (d->qlen) {
        struct packet **n = malloc(d->qcap * sizeof *n);
        if (!n) die(1, "out of memory");
        for (size_t i = 0; i < d->qlen; i++)
            n[i] = d->ordered ? d->q[(d->qhead + i) % d->qcap] : d->q[i];
        qsort(n, d->qlen, sizeof *n, by_due);
        free(d->q);
        d->q = n;
        d->last_due = n[d->qlen - 1]->due > d->last_due ? n[d->qlen - 1]->due : d->last_due;
    }
    d->qhead = 0;
    d->ordered = ordered;
}

/* In the direction's own thread, between packets: take the parameters the
 * main thread left, keeping queue, counters and (same seed) random state. */
static void apply_pending(struct direction *d) {
    if (!atomic_load_explicit(&d->pending, memory_order_acquire)) return;
    struct direction *n = atomic_exchange_explicit(&d->pending, NULL, memory_order_acq_rel);
    if (!n) return;
    int reseed = n->seed != d->seed;
    d->delay = n->delay; d->jitter = n->jitter; d->dist = n->dist; d->reorder = n->reorder;
    d->loss = n->loss; d->burst_milli = n->burst_milli; d->dup = n->dup; d->corrupt = n->corrupt;
    d->limit = n->limit; d->seed = n->seed;
    if (!d->loss || !d->burst_milli) d->ge_bad = 0;
    if (reseed) seed_rngs(d);
    if (n->ordered != d->ordered) q_reshape(d, n->ordered);
    atomic_store_explicit(&d->applied, n->generation, memory_order_release);
    free(n);
}

static void wake(struct direction *d) {
    uint64_t one = 1;
    if (write(d->wake_fd, &one, sizeof one) < 0 && errno != EAGAIN) die(1, "eventfd write");
}

/* In the main thread, on SIGHUP: read the control file, hand each direction
 * its new parameters, and acknowledge once every direction has taken them. */
static void reload(struct direction *dirs, int ndirs, const char *path, struct stats_file *st) {
    char err[1024] = "", line[2048];
    struct direction *next[2] = {NULL, NULL};
    uint64_t gen = 0;
    int n = 0;
    FILE *f = fopen(path, "r");
    if (!f) { snprintf(err, sizeof err, "cannot open %s: %s", path, strerror(errno)); goto reject; }
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = 0;
        if (!line[0]) continue;
        if (!strncmp(line, "generation=", 11)) { gen = strtoull(line + 11, NULL, 10); continue; }
        if (n == ndirs) { snprintf(err, sizeof err, "more than %d directions", ndirs); break; }
        next[n] = malloc(sizeof *next[n]);
        if (!next[n]) die(1, "out of memory");
        if (parse_spec(next[n++], line, err, sizeof err)) break;
    }
    fclose(f);
    if (!err[0] && !gen) snprintf(err, sizeof err, "no generation= line");
    if (!err[0] && n != ndirs) snprintf(err, sizeof err, "%d directions, expected %d", n, ndirs);
    for (int i = 0; !err[0] && i < n; i++)
        if (strcmp(next[i]->name, dirs[i].name) || strcmp(next[i]->from, dirs[i].from)
            || strcmp(next[i]->to, dirs[i].to))
            snprintf(err, sizeof err, "direction %d is %s %s->%s, expected %s %s->%s", i,
                     next[i]->name, next[i]->from, next[i]->to, dirs[i].name, dirs[i].from, dirs[i].to);
    if (err[0]) goto reject;
    for (int i = 0; i < ndirs; i++) {
        next[i]->generation = gen;
        struct direction *old = atomic_exchange_explicit(&dirs[i].pending, next[i], memory_order_acq_rel);
        free(old); /* an earlier change not taken yet is superseded */
        next[i] = NULL;
        wake(&dirs[i]);
    }
    for (int spins = 0; spins < 5000; spins++) {
        int done = 1;
        for (int i = 0; i < ndirs; i++)
            done &= atomic_load_explicit(&dirs[i].applied, memory_order_acquire) == gen;
        if (done) {
            atomic_store_explicit(&st->generation, gen, memory_order_release);
            return;
        }
        struct timespec ms = {.tv_sec = 0, .tv_nsec = 1000000};
        nanosleep(&ms, NULL);
    }
    snprintf(err, sizeof err, "a direction did not take generation %llu in 5 s", (unsigned long long)gen);
reject:
    for (int i = 0; i < 2; i++) free(next[i]);
    fprintf(stderr, "vnic-delayd %s: control file rejected: %s\n", tag, err);
    fflush(stderr);
    atomic_store_explicit(&st->rejected, gen ? gen : UINT64_MAX, memory_order_release);
}

int main(int argc, char **argv) {
    const char *stats_path = NULL, *control_path = NULL;
    struct direction dirs[2];
    int ndirs = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--tag") && i + 1 < argc) tag = argv[++i];
        else if (!strcmp(argv[i], "--stats") && i + 1 < argc) stats_path = argv[++i];
        else if (!strcmp(argv[i], "--control") && i + 1 < argc) control_path = argv[++i];
        else if (ndirs < 2 && strchr(argv[i], '=')) parse_dir(&dirs[ndirs++], argv[i]);
        else { fprintf(stderr, "vnic-delayd: unexpected argument %s\n", argv[i]); return 2; }
    }
    if (!stats_path || !ndirs) {
        fprintf(stderr, "usage: vnic-delayd --tag TAG --stats FILE DIRSPEC [DIRSPEC] [--control FILE]\n");
        return 2;
    }
    /* Wake-ups as precise as the kernel allows: the default 50 us slack
     * would show up directly as added delay. */
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    pareto_init();
    int sfd = open(stats_path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (sfd < 0) die(1, "open stats");
    if (ftruncate(sfd, sizeof(struct stats_file)) < 0) die(1, "ftruncate stats");
    struct stats_file *st = mmap(NULL, sizeof *st, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
    if (st == MAP_FAILED) die(1, "mmap stats");
    st->version = 2; st->pid = (uint64_t)getpid(); st->ndirs = (uint64_t)ndirs;
    for (int i = 0; i < ndirs; i++) {
        dirs[i].c = st->dir[i];
        dirs[i].bufs = malloc(BATCH * sizeof *dirs[i].bufs);
        if (!dirs[i].bufs) die(1, "out of memory");
        dirs[i].rx_fd = packet_socket(dirs[i].from, 1, NULL);
        dirs[i].tx_fd = packet_socket(dirs[i].to, 0, &dirs[i].tx_ifindex);
        dirs[i].wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (dirs[i].wake_fd < 0) die(1, "eventfd");
    }
    st->magic = STATS_MAGIC;
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    /* Signals go to the main thread only (the threads inherit the mask), which
     * takes them with sigwait: a packet thread is never interrupted. */
    sigset_t wanted;
    sigemptyset(&wanted);
    sigaddset(&wanted, SIGTERM);
    sigaddset(&wanted, SIGINT);
    sigaddset(&wanted, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &wanted, NULL);
    printf("ready\n");
    fflush(stdout);
    pthread_t th[2];
    for (int i = 0; i < ndirs; i++)
        if (pthread_create(&th[i], NULL, run_direction, &dirs[i])) die(1, "pthread_create");
    for (;;) {
        int sig = 0;
        if (sigwait(&wanted, &sig)) continue;
        if (sig == SIGHUP) {
            if (control_path) reload(dirs, ndirs, control_path, st);
            else fprintf(stderr, "vnic-delayd %s: SIGHUP ignored: no --control file\n", tag);
            continue;
        }
        stop_flag = 1;
        for (int i = 0; i < ndirs; i++) wake(&dirs[i]);
        break;
    }
    for (int i = 0; i < ndirs; i++) pthread_join(th[i], NULL);
    return 0;
}
