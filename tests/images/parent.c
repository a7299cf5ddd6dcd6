/* parent: a PD that makes a child PD over its channel and hands it limits, images and requests.
 * `parent CMD ARGS [+ CMD ARGS ...]`; each command prints "CMD: result", where result is
 * "ok ..." or "error CODE MESSAGE" (or "io ERRNO" when the channel gave no reply).
 * In call parameters the word CHILD stands for the id of the child made by `child`.
 * Replies are awaited at most 5 s, so a wedged channel shows as "io EAGAIN". */
#define _GNU_SOURCE
#include "../../csrc/bmi_client.c"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static int g_chan = -1;
static long g_child = -1;
static char g_out[MAX_MESSAGE];

static void report(const char *cmd, int rc)
{
    if (rc == BMI_E_IO) printf("%s: io %s\n", cmd, strerrorname_np(errno));
    else if (rc) printf("%s: error %d %s\n", cmd, rc, g_out);
    else printf("%s: ok %.200s\n", cmd, g_out);
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

static int call(const char *method, const char *params, int fd)
{
    int got = -1, rc = bmi_call(g_chan, method, with_child(params), fd, g_out, sizeof g_out, &got);
    if (got >= 0) close(got);
    return rc;
}

static void ms_sleep(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Runs one command; returns how many arguments it used. */
static int run(char **a, int n)
{
    const char *cmd = a[0];
    char params[256];
    int rc;
    if (!strcmp(cmd, "child") && n > 1) {           /* child MEM: allocate_pd */
        snprintf(params, sizeof params, "{\"mem\":%s}", a[1]);
        rc = call("allocate_pd", params, -1);
        if (!rc) g_child = atol(g_out);
        report(cmd, rc);
        return 1;
    }
    if (!strcmp(cmd, "call") && n > 2) {            /* call METHOD PARAMS */
        report(cmd, call(a[1], a[2], -1));
        return 2;
    }
    if (!strcmp(cmd, "callfd") && n > 2) {          /* callfd METHOD PARAMS: with a small image fd */
        int fd = memfd_create("image", MFD_CLOEXEC);
        if (fd < 0 || write(fd, "\177ELF", 4) != 4) { printf("callfd: %s\n", strerrorname_np(errno)); return 2; }
        report("call", call(a[1], a[2], fd));
        close(fd);
        return 2;
    }
    if (!strcmp(cmd, "image") && n > 1) {           /* image SIZE: a memfd of SIZE bytes, almost all holes */
        int fd = memfd_create("image", MFD_CLOEXEC);
        if (fd < 0 || write(fd, "\177ELF", 4) != 4 || ftruncate(fd, atol(a[1])) < 0) {
            printf("image: %s\n", strerrorname_np(errno));
            return 1;
        }
        rc = call("setup_pd", "{\"pd\":CHILD}", fd);
        close(fd);
        report(cmd, rc);
        return 1;
    }
    if (!strcmp(cmd, "self")) {                     /* self: this program as the child's image */
        int fd = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
        if (fd < 0) { printf("self: %s\n", strerrorname_np(errno)); return 0; }
        rc = call("setup_pd", "{\"pd\":CHILD}", fd);
        close(fd);
        report(cmd, rc);
        return 0;
    }
    if (!strcmp(cmd, "spew") && n > 1) {            /* spew N: N bytes of console output */
        for (long left = atol(a[1]); left > 0; left -= 64)
            printf("%.*s\n", (int)(left < 64 ? left - 1 : 63),
                   "spew-spew-spew-spew-spew-spew-spew-spew-spew-spew-spew-spew-spew");
        return 1;
    }
    if (!strcmp(cmd, "wait") && n > 3) {            /* wait NAME VALUE MS: until config NAME is VALUE */
        for (long i = 0; i <= atol(a[3]) / 20; i++) {
            if (bmi_get_config_param(g_chan, a[1], g_out, sizeof g_out) == 0 && !strcmp(g_out, a[2])) {
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
    printf("%s: unknown command\n", cmd);
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    g_chan = bmi_channel_fd();
    if (g_chan < 0) { printf("channel: none\n"); return 2; }
    struct timeval patience = {5, 0};
    setsockopt(g_chan, SOL_SOCKET, SO_RCVTIMEO, &patience, sizeof patience);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "+")) continue;
        i += run(argv + i, argc - i);
    }
    return 0;
}
