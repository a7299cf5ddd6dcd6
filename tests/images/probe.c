/* probe: looks at a PD from inside.  `probe CMD ARGS [+ CMD ARGS ...]`;
 * each command prints one line "CMD: result" (errno names for failures). */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>

extern char **environ;

static void result(const char *cmd, long rc)
{
    if (rc < 0) printf("%s: %s\n", cmd, strerrorname_np(errno));
    else printf("%s: ok\n", cmd);
}

static void list_dir(const char *cmd, const char *path, int numeric_only)
{
    DIR *d = opendir(path);
    if (!d) { result(cmd, -1); return; }
    printf("%s:", cmd);
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        if (numeric_only && (e->d_name[0] < '0' || e->d_name[0] > '9')) continue;
        if (strcmp(cmd, "fds") == 0 && atoi(e->d_name) == dirfd(d)) continue;
        printf(" %s", e->d_name);
    }
    printf("\n");
    closedir(d);
}

static void cat(const char *cmd, const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f) { result(cmd, -1); return; }
    char buf[4096];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = 0;
    while (n && buf[n - 1] == '\n') buf[--n] = 0;
    for (char *p = buf; *p; p++) if (*p == '\n') *p = '|';
    printf("%s: %s\n", cmd, buf);
    fclose(f);
}

static void ifaces(void)
{
    FILE *f = fopen("/proc/net/dev", "r");
    if (!f) { result("ifaces", -1); return; }
    char line[512];
    printf("ifaces:");
    for (int i = 0; fgets(line, sizeof line, f); i++) {
        char *colon = strchr(line, ':');
        if (i < 2 || !colon) continue;
        *colon = 0;
        char *name = line;
        while (*name == ' ') name++;
        printf(" %s", name);
    }
    printf("\n");
    fclose(f);
}

/* run one command (argv[0]) with its arguments; return exit-worthy code or -1 to continue */
static int run(int argc, char **argv)
{
    const char *c = argv[0];
    const char *a1 = argc > 1 ? argv[1] : "";
    if (!strcmp(c, "echo")) {
        for (int i = 1; i < argc; i++) printf(i > 1 ? " %s" : "%s", argv[i]);
        printf("\n");
    } else if (!strcmp(c, "exit")) {
        fflush(stdout);
        exit(atoi(a1));
    } else if (!strcmp(c, "signal")) {
        fflush(stdout);
        raise(atoi(a1));
    } else if (!strcmp(c, "env")) {
        printf("env:");
        for (char **e = environ; *e; e++) printf(" %s", *e);
        printf("\n");
    } else if (!strcmp(c, "uid")) {
        printf("uid: %d %d\n", (int)getuid(), (int)getgid());
    } else if (!strcmp(c, "ifaces")) {
        ifaces();
    } else if (!strcmp(c, "ps")) {
        list_dir("ps", "/proc", 1);
    } else if (!strcmp(c, "fds")) {
        list_dir("fds", "/proc/self/fd", 0);
    } else if (!strcmp(c, "ls")) {
        list_dir("ls", a1, 0);
    } else if (!strcmp(c, "cat")) {
        cat("cat", a1);
    } else if (!strcmp(c, "hostname")) {
        char h[128] = "";
        gethostname(h, sizeof h);
        printf("hostname: %s\n", h);
    } else if (!strcmp(c, "ptrace")) {
        result(c, ptrace(PTRACE_TRACEME, 0, NULL, NULL));
    } else if (!strcmp(c, "mount")) {
        result(c, mount("none", "/tmp", "tmpfs", 0, NULL));
    } else if (!strcmp(c, "unshare")) {
        result(c, unshare(CLONE_NEWUSER));
    } else if (!strcmp(c, "keyctl")) {
        result(c, syscall(SYS_keyctl, 0 /* GET_KEYRING_ID */, -3 /* session */, 0));
    } else if (!strcmp(c, "bpf")) {
        result(c, syscall(SYS_bpf, 0 /* MAP_CREATE */, NULL, 0));
    } else if (!strcmp(c, "clonens")) {
        result(c, syscall(SYS_clone, CLONE_NEWNET | SIGCHLD, NULL, NULL, NULL, 0));
    } else if (!strcmp(c, "fork")) {
        pid_t p = fork();
        if (p == 0) _exit(7);
        int st = 0;
        if (p < 0 || waitpid(p, &st, 0) < 0) result(c, -1);
        else printf("fork: child exit %d\n", WEXITSTATUS(st));
    } else if (!strcmp(c, "kill1")) {
        result(c, kill(1, 0));
    } else if (!strcmp(c, "mknod")) {
        result(c, mknod("/tmp/probe-node", S_IFCHR | 0600, makedev(1, 3)));
    } else if (!strcmp(c, "write")) { /* write N bytes of zeros to a file */
        int fd = open(a1, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        long n = argc > 2 ? atol(argv[2]) : 0, rc = fd < 0 ? -1 : 0;
        static char zero[65536];
        while (rc >= 0 && n > 0) { rc = write(fd, zero, n > 65536 ? 65536 : (size_t)n); n -= rc; }
        result(c, rc);
    } else if (!strcmp(c, "say")) { /* write argv[2] to fd argv[1] */
        const char *text = argc > 2 ? argv[2] : "";
        result(c, write(atoi(a1), text, strlen(text)));
    } else if (!strcmp(c, "sleep")) {
        fflush(stdout);
        sleep((unsigned)atoi(a1));
    } else if (!strcmp(c, "spin")) {
        for (;;) {}
    } else {
        printf("%s: unknown command\n", c);
        return 2;
    }
    fflush(stdout);
    return -1;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc > 1 && !strcmp(argv[1], "argv")) { /* print our whole argv */
        printf("argv:");
        for (int i = 0; i < argc; i++) printf(" %s", argv[i]);
        printf("\n");
        return 0;
    }
    int start = 1;
    for (int i = 1; i <= argc; i++) {
        if (i < argc && strcmp(argv[i], "+")) continue;
        if (i > start) {
            int rc = run(i - start, argv + start);
            if (rc >= 0) return rc;
        }
        start = i + 1;
    }
    return 0;
}
