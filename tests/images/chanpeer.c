/* chanpeer: a PD that uses its BMI channel (through csrc/client/bmi_client.c).
 * `chanpeer CMD ARGS [+ CMD ARGS ...]`; each command prints "CMD: result".
 * The test drives it in steps through config params (`wait NAME VALUE`).
 * `child MEM` makes a child PD; in call parameters the word CHILD is its id. */
#define _GNU_SOURCE
#include "../../csrc/client/bmi_client.c"

#include <fcntl.h>
#include <linux/io_uring.h>
#include <poll.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static int g_chan = -1, g_conn = -1, g_side = -1;   /* g_side: a socket passed over (or made for) g_conn */
static long g_child = -1;
static char g_out[MAX_MESSAGE];

static void fail(const char *cmd, int rc)
{
    if (rc == BMI_E_IO) printf("%s: io %s\n", cmd, strerrorname_np(errno));
    else printf("%s: error %d %s\n", cmd, rc, g_out);
}

static void sys_result(const char *cmd, long rc)
{
    if (rc < 0) printf("%s: %s\n", cmd, strerrorname_np(errno));
    else printf("%s: ok\n", cmd);
}

static void ms_sleep(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* params with every CHILD replaced by the child's id */
static const char *with_child(const char *params)
{
    static char buf[MAX_MESSAGE];
    size_t n = 0;
    for (const char *p = params; *p && n < sizeof buf - 24;) {
        if (!strncmp(p, "CHILD", 5)) {
            n += (size_t)snprintf(buf + n, sizeof buf - n, "%ld", g_child);
            p += 5;
        } else buf[n++] = *p++;
    }
    buf[n] = 0;
    return buf;
}

/* One request (fd_in: -1 or an fd to pass), printed as "CMD: ok RESULT" or the error; returns its rc. */
static int call(const char *cmd, const char *method, const char *params, int fd_in)
{
    int fd, rc = bmi_call(g_chan, method, with_child(params), fd_in, g_out, sizeof g_out, &fd);
    if (fd >= 0) close(fd);
    if (rc) fail(cmd, rc); else printf("%s: ok %s\n", cmd, g_out);
    return rc;
}

/* An image of `size` bytes, all holes after its first 4 ("\177ELF"); -1 with errno set on failure. */
static int sparse_image(long size)
{
    int fd = memfd_create("image", MFD_CLOEXEC);
    if (fd >= 0 && (write(fd, "\177ELF", 4) != 4 || ftruncate(fd, size) < 0)) {
        int e = errno;
        close(fd);
        errno = e;
        fd = -1;
    }
    return fd;
}

static size_t conn_size(void)
{
    struct stat st;
    return fstat(g_conn, &st) == 0 ? (size_t)st.st_size : 0;
}

/* Bind fd to the abstract NAME ("-": autobind); print the name it got ("@..." as in /proc/net/unix). */
static void bind_abstract(int fd, const char *name)
{
    struct sockaddr_un u = {.sun_family = AF_UNIX};
    size_t len = strcmp(name, "-") ? strlen(name) : 0;
    if (len >= sizeof u.sun_path - 1) len = sizeof u.sun_path - 2;
    memcpy(u.sun_path + 1, name, len);
    socklen_t l = (socklen_t)(len ? offsetof(struct sockaddr_un, sun_path) + 1 + len : sizeof(sa_family_t));
    if (bind(fd, (struct sockaddr *)&u, l) < 0) { sys_result("bindabs", -1); return; }
    struct sockaddr_un got;
    socklen_t gl = sizeof got;
    memset(&got, 0, sizeof got);
    getsockname(fd, (struct sockaddr *)&got, &gl);
    printf("bindabs: ok @%.*s\n", (int)(gl - offsetof(struct sockaddr_un, sun_path) - 1), got.sun_path + 1);
}

/* Send one end of a new socketpair over g_conn (SCM_RIGHTS); keep the other as g_side. */
static void pass_fd(void)
{
    int sp[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sp)) { sys_result("passfd", -1); return; }
    union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } control;
    memset(&control, 0, sizeof control);
    struct iovec iov = {"f", 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                         .msg_controllen = sizeof control.buf};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &sp[1], sizeof(int));
    sys_result("passfd", sendmsg(g_conn, &msg, MSG_NOSIGNAL));
    close(sp[1]);
    if (g_side >= 0) close(g_side);
    g_side = sp[0];
}

/* setsockopt(fd, SOL_SOCKET, opt, on) through io_uring (IORING_OP_URING_CMD, SOCKET_URING_OP_SETSOCKOPT,
 * Linux 6.7): a socket option set by a kernel worker, where the seccomp filter does not look.  Raw
 * syscalls (no liburing): one ring, one SQE, one CQE.  Returns the option call's result, -errno. */
static long uring_setsockopt(int fd, int opt, int on)
{
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    int ring = (int)syscall(425 /* io_uring_setup */, 1, &p);
    if (ring < 0) return -errno;
    size_t sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    char *sq = mmap(NULL, sq_len, PROT_READ | PROT_WRITE, MAP_SHARED, ring, IORING_OFF_SQ_RING);
    char *cq = mmap(NULL, cq_len, PROT_READ | PROT_WRITE, MAP_SHARED, ring, IORING_OFF_CQ_RING);
    struct io_uring_sqe *sqe = mmap(NULL, sizeof *sqe, PROT_READ | PROT_WRITE, MAP_SHARED, ring, IORING_OFF_SQES);
    long rc = -ENOMEM;
    if (sq != MAP_FAILED && cq != MAP_FAILED && sqe != MAP_FAILED) {
        unsigned char *raw = (unsigned char *)sqe;   /* the 6.7 layout, which this libc's header may predate */
        uint32_t cmd_op = 3 /* SOCKET_URING_OP_SETSOCKOPT */, level = SOL_SOCKET, name = (uint32_t)opt,
                 len = sizeof on;
        uint64_t optval = (uint64_t)(uintptr_t)&on;
        memset(raw, 0, 64);
        raw[0] = IORING_OP_URING_CMD;
        memcpy(raw + 4, &fd, 4);
        memcpy(raw + 8, &cmd_op, 4);
        memcpy(raw + 16, &level, 4);
        memcpy(raw + 20, &name, 4);
        memcpy(raw + 44, &len, 4);
        memcpy(raw + 48, &optval, 8);
        ((unsigned *)(sq + p.sq_off.array))[0] = 0;
        __atomic_store_n((unsigned *)(sq + p.sq_off.tail), 1, __ATOMIC_RELEASE);
        rc = syscall(426 /* io_uring_enter */, ring, 1, 1, IORING_ENTER_GETEVENTS, NULL, 0);
        if (rc >= 0) rc = ((struct io_uring_cqe *)(cq + p.cq_off.cqes))[0].res;
        else rc = -errno;
    }
    if (sqe != MAP_FAILED) munmap(sqe, sizeof *sqe);
    if (cq != MAP_FAILED) munmap(cq, cq_len);
    if (sq != MAP_FAILED) munmap(sq, sq_len);
    close(ring);
    return rc;
}

/* Wait up to ms for a message on g_conn; an fd that came with it becomes g_side. */
static void recv_fd(int ms)
{
    struct pollfd p = {g_conn, POLLIN, 0};
    if (poll(&p, 1, ms) == 0) { printf("recvfd: timeout\n"); return; }
    union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } control;
    char byte;
    struct iovec iov = {&byte, 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                         .msg_controllen = sizeof control.buf};
    ssize_t got = recvmsg(g_conn, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (got < 0) { sys_result("recvfd", -1); return; }
    if (got == 0) { printf("recvfd: EOF\n"); return; }
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    if (!c || c->cmsg_type != SCM_RIGHTS) { printf("recvfd: none\n"); return; }
    if (g_side >= 0) close(g_side);
    memcpy(&g_side, CMSG_DATA(c), sizeof(int));
    printf("recvfd: ok\n");
}

/* Wait up to ms for a message on fd and print it ("CMD: text", EOF, timeout, or the errno). */
static void recv_print(const char *cmd, int fd, int ms)
{
    struct pollfd p = {fd, POLLIN, 0};
    char buf[256];
    if (fd < 0 || poll(&p, 1, ms) == 0) { printf("%s: timeout\n", cmd); return; }
    ssize_t got = recv(fd, buf, sizeof buf - 1, MSG_DONTWAIT);
    if (got < 0) sys_result(cmd, -1);
    else if (got == 0) printf("%s: EOF\n", cmd);
    else { buf[got] = 0; printf("%s: %s\n", cmd, buf); }
}

/* Runs one command; returns how many arguments it used. */
static int run(char **a, int n)
{
    const char *cmd = a[0];
    int rc, fd;
    if (!strcmp(cmd, "id")) {
        rc = bmi_my_id(g_chan);
        if (rc < 0) fail(cmd, rc); else printf("id: %d\n", rc);
        return 0;
    }
    if (!strcmp(cmd, "config") && n > 1) {
        rc = bmi_pd_get_config_param(g_chan, a[1], g_out, sizeof g_out);
        if (rc) fail(cmd, rc); else printf("config: %s\n", g_out);
        return 1;
    }
    if (!strcmp(cmd, "param") && n > 1) {
        rc = bmi_pd_get_runtime_param(g_chan, a[1], g_out, sizeof g_out);
        for (char *p = g_out; *p; p++) if (*p == '\n') *p = '|';
        if (rc) fail(cmd, rc); else printf("param: %s\n", g_out);
        return 1;
    }
    if (!strcmp(cmd, "call") && n > 2) {
        call(cmd, a[1], a[2], -1);
        return 2;
    }
    if (!strcmp(cmd, "callfd") && n > 2) {      /* callfd METHOD PARAMS: passing a 4-byte image */
        fd = sparse_image(4);
        if (fd < 0) sys_result(cmd, -1); else { call("call", a[1], a[2], fd); close(fd); }
        return 2;
    }
    if (!strcmp(cmd, "child") && n > 1) {       /* child MEM: allocate_pd of MEM bytes (JSON may follow) */
        char params[256];
        snprintf(params, sizeof params, "{\"mem\":%s}", a[1]);
        if (call(cmd, "allocate_pd", params, -1) == 0) g_child = atol(g_out);
        return 1;
    }
    if (!strcmp(cmd, "image") && n > 1) {       /* image SIZE: setup_pd of the child from a sparse memfd */
        fd = sparse_image(atol(a[1]));
        if (fd < 0) sys_result(cmd, -1); else { call(cmd, "setup_pd", "{\"pd\":CHILD}", fd); close(fd); }
        return 1;
    }
    if (!strcmp(cmd, "self")) {                 /* self: setup_pd of the child with this program, or, since
                                                 * a PD's programs are execute-only, its readable copy
                                                 * /self.image when the test put one there */
        fd = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
        if (fd < 0 && errno == EACCES) fd = open("/self.image", O_RDONLY | O_CLOEXEC);
        if (fd < 0) sys_result(cmd, -1); else { call(cmd, "setup_pd", "{\"pd\":CHILD}", fd); close(fd); }
        return 0;
    }
    if (!strcmp(cmd, "spew") && n > 1) {        /* spew N: N bytes of console output */
        for (long left = atol(a[1]); left > 0; left -= 64)
            printf("%.*s\n", (int)(left < 64 ? left - 1 : 63),
                   "spew-spew-spew-spew-spew-spew-spew-spew-spew-spew-spew-spew-spew");
        return 1;
    }
    if (!strcmp(cmd, "patience") && n > 1) {    /* patience MS: a reply not there by then is "io EAGAIN" */
        struct timeval t = {atol(a[1]) / 1000, atol(a[1]) % 1000 * 1000};
        sys_result(cmd, setsockopt(g_chan, SOL_SOCKET, SO_RCVTIMEO, &t, sizeof t));
        return 1;
    }
    if (!strcmp(cmd, "connect") && n > 4) {
        if (g_conn >= 0) close(g_conn);
        rc = bmi_connect(g_chan, atoi(a[1]), a[2], atoi(a[3]), strtoul(a[4], NULL, 10), &g_conn);
        if (rc) { g_conn = -1; fail(cmd, rc); } else printf("connect: ok\n");
        return 4;
    }
    if (!strcmp(cmd, "accept") && n > 1) {
        int peer, mode;
        char type[16];
        if (g_conn >= 0) close(g_conn);
        g_conn = -1;
        rc = bmi_accept(g_chan, atol(a[1]), &peer, type, sizeof type, &mode, &g_conn);
        if (rc == 1) printf("accept: timeout\n");
        else if (rc) fail(cmd, rc);
        else printf("accept: ok peer=%d type=%s mode=%d\n", peer, type, mode);
        return 1;
    }
    if (!strcmp(cmd, "recv") && n > 1) {
        recv_print(cmd, g_conn, atoi(a[1]));
        return 1;
    }
    if (!strcmp(cmd, "shmw") && n > 1) {
        char *m = mmap(NULL, conn_size(), PROT_READ | PROT_WRITE, MAP_SHARED, g_conn, 0);
        if (m == MAP_FAILED) { sys_result(cmd, -1); return 1; }
        strcpy(m, a[1]);
        munmap(m, conn_size());
        printf("shmw: ok\n");
        return 1;
    }
    if (!strcmp(cmd, "shmr")) {
        char *m = mmap(NULL, conn_size(), PROT_READ, MAP_SHARED, g_conn, 0);
        if (m == MAP_FAILED) { sys_result(cmd, -1); return 0; }
        printf("shmr: %.64s\n", m);
        int prot = mprotect(m, conn_size(), PROT_READ | PROT_WRITE);
        sys_result("mprotect", prot);
        munmap(m, conn_size());
        return 0;
    }
    if (!strcmp(cmd, "reopen")) {
        char path[64];
        snprintf(path, sizeof path, "/proc/self/fd/%d", g_conn);
        fd = open(path, O_RDWR);
        sys_result(cmd, fd);
        if (fd >= 0) close(fd);
        return 0;
    }
    if (!strcmp(cmd, "bindabs") && n > 2) {
        bind_abstract(strcmp(a[1], "chan") ? g_conn : g_chan, a[2]);
        return 2;
    }
    if (!strcmp(cmd, "passfd")) {
        pass_fd();
        return 0;
    }
    if (!strcmp(cmd, "recvfd") && n > 1) {
        recv_fd(atoi(a[1]));
        return 1;
    }
    if ((!strcmp(cmd, "send") || !strcmp(cmd, "sidesend")) && n > 1) {
        sys_result(cmd, send(strcmp(cmd, "sidesend") ? g_conn : g_side, a[1], strlen(a[1]), MSG_NOSIGNAL));
        return 1;
    }
    if (!strcmp(cmd, "siderecv") && n > 1) {
        recv_print(cmd, g_side, atoi(a[1]));
        return 1;
    }
    if (!strcmp(cmd, "passrights") && n > 2) {   /* passrights chan|conn 0|1: setsockopt SO_PASSRIGHTS */
        int on = atoi(a[2]);
        sys_result(cmd, setsockopt(strcmp(a[1], "chan") ? g_conn : g_chan, SOL_SOCKET, 83, &on, sizeof on));
        return 2;
    }
    if (!strcmp(cmd, "uringpassrights") && n > 2) {   /* the same, through io_uring */
        long rc = uring_setsockopt(strcmp(a[1], "chan") ? g_conn : g_chan, 83, atoi(a[2]));
        if (rc < 0) errno = (int)-rc;
        sys_result(cmd, rc < 0 ? -1 : 0);
        return 2;
    }
    if (!strcmp(cmd, "wait") && n > 3) {
        long deadline = atol(a[3]) / 20;
        for (long i = 0; i <= deadline; i++) {
            if (bmi_pd_get_config_param(g_chan, a[1], g_out, sizeof g_out) == 0 && !strcmp(g_out, a[2])) {
                printf("wait: ok\n");
                return 3;
            }
            ms_sleep(20);
        }
        printf("wait: timeout\n");
        return 3;
    }
    if (!strcmp(cmd, "sleep") && n > 1) {
        ms_sleep(atol(a[1]));
        return 1;
    }
    if (!strcmp(cmd, "print") && n > 1) {
        printf("print: %s\n", a[1]);
        return 1;
    }
    printf("%s: unknown command\n", cmd);
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    g_chan = bmi_channel_fd();
    if (g_chan < 0) { printf("channel: none\n"); return 2; }
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "+")) continue;
        i += run(argv + i, argc - i);
    }
    return 0;
}
