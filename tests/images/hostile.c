/* hostile: a PD that attacks.  `hostile ATTACK ARGS`; prints "ATTACK: result"
 * where result is "ok ..." when the attack got through, else the errno name
 * (or what it saw).  tests/security checks every one is blocked. */
#define _GNU_SOURCE
#include "../../csrc/client/bmi_client.c"

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <stdint.h>
#include <sys/inotify.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/shm.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void result(const char *name, long rc)
{
    if (rc < 0) printf("%s: %s\n", name, strerrorname_np(errno));
    else printf("%s: ok\n", name);
}

static int tcp(int family, const char *host, int port)
{
    int s = socket(family, SOCK_STREAM, 0);
    if (s < 0) return -1;
    int rc;
    if (family == AF_INET) {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
        inet_pton(AF_INET, host, &a.sin_addr);
        rc = connect(s, (struct sockaddr *)&a, sizeof a);
    } else {
        struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(port)};
        inet_pton(AF_INET6, host, &a.sin6_addr);
        rc = connect(s, (struct sockaddr *)&a, sizeof a);
    }
    int e = errno;
    close(s);
    errno = e;
    return rc;
}

static void netlink_links(void)
{
    int s = socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE);
    if (s < 0) { result("netlink", -1); return; }
    struct { struct nlmsghdr h; struct ifinfomsg i; } req = {
        .h = {.nlmsg_len = sizeof req, .nlmsg_type = RTM_GETLINK, .nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP},
        .i = {.ifi_family = AF_UNSPEC},
    };
    if (send(s, &req, sizeof req, 0) < 0) { result("netlink", -1); return; }
    printf("netlink:");
    static char buf[65536];
    for (;;) {
        ssize_t n = recv(s, buf, sizeof buf, 0);
        if (n <= 0) break;
        for (struct nlmsghdr *h = (void *)buf; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
            if (h->nlmsg_type == NLMSG_DONE) { printf("\n"); close(s); return; }
            struct ifinfomsg *ifi = NLMSG_DATA(h);
            char name[IF_NAMESIZE] = "?";
            if_indextoname((unsigned)ifi->ifi_index, name);
            int len = (int)(h->nlmsg_len - NLMSG_LENGTH(sizeof *ifi));
            for (struct rtattr *a = IFLA_RTA(ifi); RTA_OK(a, len); a = RTA_NEXT(a, len))
                if (a->rta_type == IFLA_IFNAME) snprintf(name, sizeof name, "%s", (char *)RTA_DATA(a));
            printf(" %s", name);
        }
    }
    printf("\n");
    close(s);
}

static void flood(int chan, int count)
{
    static const char req[] = "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"list_pd\",\"params\":{}}";
    int sent = 0, again = 0, broken = 0;
    for (int i = 0; i < count; i++) {
        if (send(chan, req, sizeof req - 1, MSG_DONTWAIT | MSG_NOSIGNAL) >= 0) sent++;
        else if (errno == EAGAIN) { again++; struct timespec t = {0, 100000}; nanosleep(&t, NULL); }
        else { broken++; break; }
    }
    printf("flood: sent=%d eagain=%d broken=%d\n", sent, again, broken);
}

static void fuzz(int chan, unsigned seed, int count)
{
    static char buf[8192];
    static const char *frags[] = {"{", "}", "[", "]", "\"jsonrpc\"", ":", "\"2.0\"", ",", "\"id\"", "1", "-1e999",
                                  "\"method\"", "\"connect\"", "\"params\"", "null", "true", "\"\\u0000\"",
                                  "\"setup_pd\"", "\"tid\"", "99999999999999999999999", "\"pd\"", "0", "\xff"};
    int replies = 0, errors = 0, closed = 0;
    srand(seed);
    for (int i = 0; i < count && !closed; i++) {
        size_t n = 0;
        if (rand() % 4 == 0) {
            n = (size_t)(rand() % 512);
            for (size_t k = 0; k < n; k++) buf[k] = (char)rand();
        } else {
            int parts = 1 + rand() % 40;
            for (int k = 0; k < parts; k++) {
                const char *f = frags[rand() % (sizeof frags / sizeof *frags)];
                size_t l = strlen(f);
                if (n + l >= sizeof buf) break;
                memcpy(buf + n, f, l);
                n += l;
            }
        }
        if (n == 0) buf[n++] = ' ';
        if (send(chan, buf, n, MSG_NOSIGNAL) < 0) { closed = 1; break; }
        struct pollfd p = {chan, POLLIN, 0};
        if (poll(&p, 1, 2000) <= 0) continue;
        ssize_t got = recv(chan, buf, sizeof buf, 0);
        if (got <= 0) closed = 1;
        else if (memmem(buf, (size_t)got, "\"error\"", 7)) errors++;
        else replies++;
    }
    printf("fuzz: results=%d errors=%d closed=%d\n", replies, errors, closed);
}

static void sleep_ms(long ms)
{
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

/* Read (or write) a secret in a forked child's memory through /proc/<child>/mem; "consent": the child
 * first makes itself dumpable again (PR_SET_DUMPABLE 1), "self": our own /proc/self/mem. */
static void procmem(const char *how)
{
    static volatile char secret[16] = "child-secret";
    char got[16] = {0};
    pid_t child = 0;
    int p[2];
    if (strcmp(how, "self")) {
        if (pipe(p)) { result("procmem", -1); return; }
        child = fork();
        if (child == 0) {
            if (!strcmp(how, "consent")) prctl(PR_SET_DUMPABLE, 1, 0, 0, 0);
            if (write(p[1], "x", 1) != 1) _exit(1);
            pause();
            _exit(0);
        }
        char b;
        if (child < 0 || read(p[0], &b, 1) != 1) { result("procmem", -1); return; }
    }
    char path[64];
    snprintf(path, sizeof path, child ? "/proc/%d/mem" : "/proc/self/mem", (int)child);
    int fd = open(path, !strcmp(how, "write") ? O_RDWR : O_RDONLY);
    long rc = fd;
    if (fd >= 0 && !strcmp(how, "write")) rc = pwrite(fd, "owned", 5, (off_t)(uintptr_t)secret);
    else if (fd >= 0) rc = pread(fd, got, sizeof got, (off_t)(uintptr_t)secret);
    if (rc >= 0 && !strcmp(how, "write")) printf("procmem: ok wrote\n");
    else if (rc >= 0) printf("procmem: ok %s\n", got);
    else result("procmem", -1);
    if (child > 0) { kill(child, SIGKILL); waitpid(child, NULL, 0); }
}

/* Create inotify instances until the kernel refuses; hold them for ms milliseconds. */
static void inotify_exhaust(long ms)
{
    int n = 0;
    while (n < 100000 && inotify_init1(IN_CLOEXEC) >= 0) n++;
    printf("inotify: %d %s\n", n, strerrorname_np(errno));
    sleep_ms(ms);
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) return 2;
    const char *a = argv[1];
    const char *x = argc > 2 ? argv[2] : "", *y = argc > 3 ? argv[3] : "";
    int chan = bmi_channel_fd();
    char out[4096];
    if (!strcmp(a, "inet")) result(a, tcp(AF_INET, x, atoi(y)));
    else if (!strcmp(a, "inet6")) result(a, tcp(AF_INET6, x, atoi(y)));
    else if (!strcmp(a, "abstract")) {
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        struct sockaddr_un u = {.sun_family = AF_UNIX};
        size_t l = strlen(x);
        memcpy(u.sun_path + 1, x, l);
        result(a, connect(s, (struct sockaddr *)&u, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + l)));
    } else if (!strcmp(a, "netlink")) netlink_links();
    else if (!strcmp(a, "read")) result(a, open(x, O_RDONLY));
    else if (!strcmp(a, "write")) result(a, open(x, O_WRONLY | O_CREAT, 0644));
    else if (!strcmp(a, "procs")) {
        DIR *d = opendir("/proc");
        printf("procs:");
        for (struct dirent *e; d && (e = readdir(d));)
            if (e->d_name[0] >= '0' && e->d_name[0] <= '9') printf(" %s", e->d_name);
        printf("\n");
    } else if (!strcmp(a, "kill")) result(a, kill(atoi(x), SIGKILL));
    else if (!strcmp(a, "ptrace")) result(a, ptrace(PTRACE_ATTACH, atoi(x), 0, 0));
    else if (!strcmp(a, "procmem")) procmem(x);
    else if (!strcmp(a, "procmem-of"))   /* other processes of the PD, by pid: "procmem-of: PID ok|ERRNO" */
        for (int i = 2; i < argc; i++) {
            char path[64], label[64];
            snprintf(path, sizeof path, "/proc/%s/mem", argv[i]);
            snprintf(label, sizeof label, "procmem-of: %s", argv[i]);
            int fd = open(path, O_RDONLY);
            result(label, fd);
            if (fd >= 0) close(fd);
        }
    else if (!strcmp(a, "inotify")) inotify_exhaust(atol(x));
    else if (!strcmp(a, "sysv")) result(a, shmget((key_t)strtol(x, NULL, 0), 0, 0));
    else if (!strcmp(a, "posixshm")) {
        char path[256];
        snprintf(path, sizeof path, "/dev/shm/%s", x);
        result(a, open(path, O_RDWR));
    } else if (!strcmp(a, "escape")) {
        result("mount", mount("proc", "/tmp", "proc", 0, NULL));
        result("unshare", unshare(CLONE_NEWUSER));
        result("setns", open("/proc/1/ns/net", O_RDONLY) >= 0 ? 0 : -1);
        result("chroot", chroot("/tmp"));
        result("tpm", open("/dev/tpmrm0", O_RDWR));
        result("kmsg", open("/dev/kmsg", O_RDONLY));
        result("mknod", mknod("/tmp/mem", S_IFCHR | 0600, makedev(1, 1)));
    } else if (!strcmp(a, "privileged")) { /* what root of the PD's own namespaces could do with capabilities */
        result("raw", socket(AF_INET, SOCK_RAW, IPPROTO_ICMP));
        struct ifreq ifr = {0};
        strcpy(ifr.ifr_name, "lo");
        int s = socket(AF_INET, SOCK_DGRAM, 0);
        ifr.ifr_flags = IFF_UP | IFF_LOOPBACK | IFF_RUNNING;
        result("ifflags", ioctl(s, SIOCSIFFLAGS, &ifr));
        struct sockaddr_in low = {.sin_family = AF_INET, .sin_port = htons(80)};
        result("bind80", bind(s, (struct sockaddr *)&low, sizeof low));
        result("hostname", sethostname("owned", 5));
        close(open("/tmp/locked", O_WRONLY | O_CREAT, 0));
        result("dac", open("/tmp/locked", O_RDONLY));
    } else if (!strcmp(a, "iouring")) { /* io_uring_setup(8, params): kernel surface refused by default */
        unsigned char params[120] = {0};  /* struct io_uring_params */
        long fd = syscall(425, 8, params);
        result(a, fd);
        if (fd >= 0) close((int)fd);
    } else if (!strcmp(a, "forkbomb")) {
        int ok = 0, again = 0;
        time_t end = time(NULL) + atoi(x);
        while (time(NULL) < end) {
            pid_t p = fork();
            if (p == 0) { pause(); _exit(0); }
            if (p > 0) ok++; else { again++; sleep_ms(1); }
        }
        printf("forkbomb: forks=%d failed=%d\n", ok, again);
        kill(-1, SIGKILL);
    } else if (!strcmp(a, "membomb")) {
        for (size_t total = 0;; total += 1 << 20) {
            char *p = malloc(1 << 20);
            if (!p) { printf("membomb: malloc failed at %zu\n", total); return 0; }
            memset(p, 1, 1 << 20);
        }
    } else if (!strcmp(a, "flood")) {
        flood(chan, atoi(x));
        sleep_ms(atol(y));
        int rc = bmi_call(chan, "get_version", "{}", -1, out, sizeof out, NULL);
        printf("after: %d\n", rc);
    } else if (!strcmp(a, "fuzz")) fuzz(chan, (unsigned)atoi(x), atoi(y));
    else if (!strcmp(a, "call")) {
        int fd, rc = bmi_call(chan, x, y, -1, out, sizeof out, &fd);
        printf("call: %d %s\n", rc, out);
    } else if (!strcmp(a, "raw")) {
        char buf[4096];
        send(chan, x, strlen(x), MSG_NOSIGNAL);
        ssize_t n = recv(chan, buf, sizeof buf - 1, 0);
        buf[n > 0 ? n : 0] = 0;
        printf("raw: %s\n", buf);
    } else printf("%s: unknown attack\n", a);
    return 0;
}
