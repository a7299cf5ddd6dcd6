/*
 * Linux PD spawn path: clone into fresh namespaces, build the PD's root,
 * and exec the measured image -- with no Python between clone and exec.
 *
 * Process shape:
 *   manager --clone(CLONE_VM|NEWUSER|NEWPID|NEWNET|NEWNS|NEWIPC|NEWUTS, PIDFD)--> pid 1
 *   pid 1: waits until the manager has written its uid/gid maps and cgroup.procs,
 *          becomes root of its user namespace, and execs bmi-init (csrc/init/init.c,
 *          run from a sealed memfd): the tiny init that builds the root, forwards
 *          signals, reaps, and reports the exit
 *   pid 1  --clone--> pid 2 = the PD's program (seccomp from pid 1, then landlock, capabilities dropped)
 * CLONE_VM as in posix_spawn: no copy of the manager's page tables (ms for a
 * big Python process) and none of its memory in the PD.
 * Placement in the PD's cgroups costs no RCU grace period (a pid written to
 * cgroup.procs waits for one: the global cgroup_threadgroup_rwsem, ms on a busy
 * host): on cgroup v2 pid 1 is cloned into its group (clone3 CLONE_INTO_CGROUP);
 * in each v1 hierarchy pid 1 writes "0" into the group's `tasks` file itself,
 * a single thread moving itself, which the kernel does without that lock.  The
 * manager opens those files before the clone, so the write is checked against
 * its credentials.  Until its exec the
 * child shares the manager's memory, so it only makes raw syscalls on its own
 * stack.  Set-up errors travel back as one fixed-size record on a pipe; EOF on
 * that pipe means the program was exec'd.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <linux/audit.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/openat2.h>
#include <linux/seccomp.h>

#include "spawn.h"

#include "handoff.h"

/* The init program, csrc/init/init.c built statically at install time and
 * linked into the shim (see bmi/_build/spawn_build.py). */
extern const unsigned char bmi_init_image[], bmi_init_image_end[];

static pthread_once_t init_once = PTHREAD_ONCE_INIT;
static int init_fd = -1, init_errno;

/* A sealed memfd holding bmi-init, made once per process. */
static void make_init_fd(void)
{
    const unsigned char *p = bmi_init_image;
    size_t left = (size_t)(bmi_init_image_end - bmi_init_image);
    int fd = memfd_create("bmi-init", MFD_CLOEXEC | MFD_ALLOW_SEALING | 0x10 /* MFD_EXEC */);
    if (fd < 0 && errno == EINVAL) fd = memfd_create("bmi-init", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0) { init_errno = errno; return; }
    while (left) {
        ssize_t n = write(fd, p, left);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) { init_errno = n < 0 ? errno : EIO; close(fd); return; }
        p += n; left -= (size_t)n;
    }
    /* execute-only: the PD cannot read bmi-init, so its init is not dumpable (see drop_caps) */
    if (fchmod(fd, 0111) || fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)) {
        init_errno = errno; close(fd); return;
    }
    init_fd = fd;
}

#define MAX_CGROUPS 16
#define CGROUP_SUPER_MAGIC_ 0x27e0eb
#define CGROUP2_SUPER_MAGIC_ 0x63677270
#define CLONE_INTO_CGROUP_ 0x200000000ULL

/* Where pid 1 goes: the cgroup.procs files of bmi_spawn_args, sorted by how. */
struct placement {
    int tasks[MAX_CGROUPS];         /* v1 `tasks` files pid 1 writes "0" into (opened by the manager) */
    const char *tasks_name[MAX_CGROUPS];
    int ntasks;
    int v2_dir;                     /* the v2 group pid 1 is cloned into, or -1 */
    const char *v2_procs;
    const char *by_pid[MAX_CGROUPS]; /* the manager writes pid 1's pid into these (other filesystems; v2 on a
                                      * kernel without CLONE_INTO_CGROUP) */
    int nby_pid;
};

struct start {
    const struct cfg *c;
    const struct placement *place;
    char **argv;      /* bmi-init's arguments, "--", then the program's (see main) */
    char *stack;
    char num[11][24];
};

/* A syscall for the CLONE_VM child before its exec: the error comes back as -errno and errno is left
 * alone, because errno is the manager thread's (the child runs with that thread's TLS): reading it in the
 * child races with the manager's own calls, and writing it clobbers the manager's. */
static long child_syscall(long nr, long a, long b, long c, long d, long e)
{
#if defined(__x86_64__)
    long ret;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    __asm__ volatile("syscall" : "=a"(ret) : "0"(nr), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8)
                     : "rcx", "r11", "memory");
    return ret;
#else
    long ret = syscall(nr, a, b, c, d, e);      /* elsewhere glibc's errno, as before */
    return ret == -1 ? -errno : ret;
#endif
}

/* The CLONE_VM child's failure (errno err; where: stage, detail) as one record on the set-up pipe, through
 * child_syscall (glibc's write would read and set the manager thread's errno).  One write: a record is
 * smaller than PIPE_BUF, so it goes whole. */
static void child_report(const struct cfg *c, int err, const char *stage, const char *detail)
{
    struct rec r = {.kind = BMI_SPAWN_ERESOURCE, .err = err};
    memcpy(r.stage, stage, strlen(stage) + 1);
    size_t len = detail ? strlen(detail) : 0;
    if (len >= sizeof r.detail) len = sizeof r.detail - 1;
    if (len) memcpy(r.detail, detail, len);
    while (child_syscall(SYS_write, c->err_wr, (long)&r, sizeof r, 0, 0) == -EINTR) {}
}

/* Runs on its own stack in the manager's memory (CLONE_VM) until the exec:
 * syscalls only, nothing written but its own stack and its own fd table.
 * It waits for the manager to map its uids and place it in its cgroups:
 * exec'ing before the map would leave bmi-init without capabilities. */
static int init_child(void *arg)
{
    const struct start *s = arg;
    const struct cfg *c = s->c;
    /* our copy of the manager's fd table: keep only what bmi-init needs, so that the release
     * pipe's write end (and every socket of the manager) is the manager's alone */
    const struct placement *pl = s->place;
    int keep[8 + MAX_CGROUPS] = {c->exec_fd, c->console_fd, c->status_fd, c->lifeline_fd, c->channel_fd, c->err_wr,
                                 c->release_rd, init_fd};
    for (int i = 0; i < pl->ntasks; i++) keep[8 + i] = pl->tasks[i];
    close_except(keep, 8 + pl->ntasks);
    const char *stage = "placing the PD in";
    char b;
    for (int i = 0; i < pl->ntasks; i++) {
        long w = child_syscall(SYS_write, pl->tasks[i], (long)"0", 1, 0, 0);
        if (w != 1) {
            child_report(c, w < 0 ? (int)-w : EIO, stage, pl->tasks_name[i]);
            while (child_syscall(SYS_read, c->release_rd, (long)&b, 1, 0, 0) == -EINTR) {}  /* till it is read */
            _exit(127);
        }
        child_syscall(SYS_close, pl->tasks[i], 0, 0, 0, 0);
    }
    long n;
    do n = child_syscall(SYS_read, c->release_rd, (long)&b, 1, 0, 0); while (n == -EINTR);
    if (n != 1) _exit(127); /* the manager gave up; it kills and reaps us */
    /* root of the new user namespace before the exec, so bmi-init keeps its capabilities there
     * (raw syscalls: glibc's set*id would signal the manager's threads) */
    stage = "becoming root of the user namespace";
    long failed = child_syscall(SYS_setresgid, 0, 0, 0, 0, 0);
    if (!failed) failed = child_syscall(SYS_setresuid, 0, 0, 0, 0, 0);
    if (!failed) {
        int fds[] = {c->exec_fd, c->console_fd, c->status_fd, c->lifeline_fd, c->channel_fd, c->err_wr};
        for (unsigned i = 0; i < sizeof fds / sizeof fds[0]; i++)
            if (fds[i] >= 0) child_syscall(SYS_fcntl, fds[i], F_SETFD, 0, 0, 0);
        failed = child_syscall(SYS_execveat, init_fd, (long)"", (long)s->argv, (long)c->envp, AT_EMPTY_PATH);
        stage = "exec of bmi-init";
    }
    child_report(c, (int)-failed, stage, NULL);
    _exit(127);
}

/* clone3 running fn(arg) on ca->stack in the child, as glibc's clone() does for clone (glibc 2.36 has no
 * clone3 wrapper); -1 and errno on failure.  The child ends with exit(fn's result). */
static long clone3_run(struct bmi_clone_args *ca, int (*fn)(void *), void *arg)
{
#if defined(__x86_64__)
    long ret;
    register void *r12 __asm__("r12") = arg;
    register int (*r13)(void *) __asm__("r13") = fn;
    __asm__ volatile("syscall\n\t"
                     "test %%rax, %%rax\n\t"
                     "jnz 1f\n\t"
                     "xor %%ebp, %%ebp\n\t"       /* the child: on its own stack, no frame to return to */
                     "mov %%r12, %%rdi\n\t"
                     "call *%%r13\n\t"
                     "mov %%eax, %%edi\n\t"
                     "mov $60, %%eax\n\t"         /* SYS_exit */
                     "syscall\n\t"
                     "hlt\n"
                     "1:\n\t"
                     : "=a"(ret)
                     : "0"((long)SYS_clone3_), "D"(ca), "S"(sizeof *ca), "r"(r12), "r"(r13)
                     : "rcx", "r11", "memory");
    if (ret < 0) { errno = (int)-ret; return -1; }
    return ret;
#else
    (void)ca; (void)fn; (void)arg;
    errno = ENOSYS;
    return -1;
#endif
}

/* Whether our child `pid` (not reaped) is dead or has a SIGKILL pending already.  A kernel bug (seen on
 * 6.18): once "1" was written to a v2 group's cgroup.kill, every process cloned into that group afterwards
 * (CLONE_INTO_CGROUP) is SIGKILLed in cgroup_post_fork, before clone3 returns; a migrated one is not.  A PD
 * whose group was killed (a forced shutdown, an adoption) would then never start again. */
static int killed_at_birth(long pid)
{
    char path[48], buf[4096];
    snprintf(path, sizeof path, "/proc/%ld/status", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 1;
    buf[n] = 0;
    const char *state = strstr(buf, "\nState:\t"), *pending = strstr(buf, "\nShdPnd:\t");
    if (state && (state[8] == 'Z' || state[8] == 'X')) return 1;
    return pending && (strtoull(pending + 9, NULL, 16) >> (SIGKILL - 1)) & 1;
}

/* This thread's effective set gets CAP_DAC_OVERRIDE if it is permitted (raw syscalls: this thread only). */
static void effective_dac_override(void)
{
    struct __user_cap_header_struct head = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    if (syscall(SYS_capget, &head, data)) return;
    data[0].effective |= data[0].permitted & (1u << CAP_DAC_OVERRIDE);
    syscall(SYS_capset, &head, data);
}

#define INIT_FIXED_ARGS 13   /* "bmi-init", 11 values, "--" */
#define INIT_STACK (64 * 1024)

static void finish_init(struct start *s)
{
    munmap(s->stack, INIT_STACK);
    free(s->argv);
    free(s);
}

/* Clone pid 1 into the new namespaces the way posix_spawn does (CLONE_VM: no
 * copy of the manager's page tables, which costs ms for a big Python process,
 * and none of its memory in the PD); once released it execs bmi-init, which
 * builds the PD.  Returns the pid (pidfd in *pidfd) or -1 and errno; *out must
 * be given to finish_init once the child has exec'd or been reaped. */
static long start_init(const struct cfg *c, struct placement *pl, int *pidfd, struct start **out)
{
    pthread_once(&init_once, make_init_fd);
    if (init_fd < 0) { errno = init_errno; return -1; }
    size_t nprog = 0;
    while (c->argv[nprog]) nprog++;
    struct start *s = calloc(1, sizeof *s);
    char **argv = malloc((INIT_FIXED_ARGS + nprog + 1) * sizeof(char *));
    char *stack = mmap(NULL, INIT_STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (!s || !argv || stack == MAP_FAILED) {
        int e = errno ? errno : ENOMEM;
        free(s); free(argv);
        if (stack != MAP_FAILED) munmap(stack, INIT_STACK);
        errno = e;
        return -1;
    }
    s->c = c, s->place = pl, s->argv = argv, s->stack = stack;
    long long vals[] = {c->exec_fd, c->archive, c->console_fd, c->status_fd, c->lifeline_fd, c->channel_fd,
                        c->flags};
    int k = 0;
    argv[k++] = "bmi-init";
    for (unsigned i = 0; i < sizeof vals / sizeof vals[0]; i++) {
        snprintf(s->num[i], sizeof s->num[i], "%lld", vals[i]);
        argv[k++] = s->num[i];
    }
    argv[k++] = (char *)c->hostname;
    snprintf(s->num[7], sizeof s->num[7], "%llu", c->tmpfs_bytes);
    argv[k++] = s->num[7];
    snprintf(s->num[8], sizeof s->num[8], "%d", c->err_wr);
    argv[k++] = s->num[8];
    snprintf(s->num[9], sizeof s->num[9], "%llu", c->keep_caps);
    argv[k++] = s->num[9];
    argv[k++] = "--";
    memcpy(argv + k, c->argv, (nprog + 1) * sizeof(char *));
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);   /* no handler may run in the child, on shared memory */
    long pid = -1;
    uid_t euid = geteuid();
    gid_t egid = getegid();
    /* a user namespace belongs to the euid that creates it, and per-user limits inside it are charged to
     * that owner: this thread alone (raw syscalls, not glibc's all-threads set*id) becomes the PD's ids
     * for the clone; ruid and suid stay 0, so it gets its capabilities back right after */
    int own = (c->flags & BMI_SPAWN_OWN_USERNS) != 0;
    int dumpable = own ? prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) : 0;   /* an euid change clears it: restore it */
    if (!own || (syscall(SYS_setresgid, -1, c->outer_gid, -1) == 0 && syscall(SYS_setresuid, -1, c->outer_uid, -1) == 0)) {
        /* CLONE_INTO_CGROUP checks that we may write the group's (root-owned) cgroup.procs: with the PD's euid
         * this thread has no effective capability, so it takes back CAP_DAC_OVERRIDE (still permitted: ruid and
         * suid are 0) until its euid is 0 again; the child gets nothing from it, it is born in its own user
         * namespace */
        if (pl->v2_dir >= 0 && own) effective_dac_override();
        if (pl->v2_dir >= 0) {
            struct bmi_clone_args ca = {.flags = CLONE_VM | CLONE_PIDFD | PD_NAMESPACES | CLONE_INTO_CGROUP_,
                                        .pidfd = (uint64_t)(uintptr_t)pidfd, .exit_signal = SIGCHLD,
                                        .stack = (uint64_t)(uintptr_t)stack, .stack_size = INIT_STACK,
                                        .cgroup = (uint64_t)pl->v2_dir};
            pid = clone3_run(&ca, init_child, s);
            /* a kernel before 5.7, or a group the kernel kills every newcomer of: the manager writes the pid */
            int by_pid = pid < 0 ? errno == ENOSYS || errno == E2BIG || errno == EINVAL : killed_at_birth(pid);
            if (pid > 0 && by_pid) {
                siginfo_t si;   /* it never ran an instruction: reaped, its stack is ours for the clone below */
                while (waitid((idtype_t)P_PIDFD, (id_t)*pidfd, &si, WEXITED) < 0 && errno == EINTR) {}
                close(*pidfd);
                *pidfd = -1;
            }
            if (by_pid) {
                pl->by_pid[pl->nby_pid++] = pl->v2_procs;
                close(pl->v2_dir);
                pl->v2_dir = -1;
            }
        }
        if (pl->v2_dir < 0)
            pid = clone(init_child, stack + INIT_STACK, CLONE_VM | CLONE_PIDFD | PD_NAMESPACES | SIGCHLD, s, pidfd);
    }
    int e = errno;
    if (own && (syscall(SYS_setresuid, -1, euid, -1) || syscall(SYS_setresgid, -1, egid, -1)))
        abort();    /* a manager thread left with a PD's ids must not go on */
    if (own && dumpable > 0) prctl(PR_SET_DUMPABLE, dumpable, 0, 0, 0);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (pid < 0) {
        finish_init(s);
        errno = e;
        return -1;
    }
    *out = s;
    return pid;
}

/* ---------------------------------------------------------------- manager side */

static int write_proc(pid_t pid, const char *file, const char *text)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/%s", (int)pid, file);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = write_all(fd, text, strlen(text));
    int e = errno;
    close(fd);
    errno = e;
    return rc;
}

/* /usr/bin/newuidmap|newgidmap PID 0 ID 1: the setuid helpers that map a non-root caller's /etc/subuid ids */
static int run_map_helper(const char *helper, pid_t pid, int id)
{
    char spid[24], sid[24];
    snprintf(spid, sizeof spid, "%d", (int)pid);
    snprintf(sid, sizeof sid, "%d", id);
    char *argv[] = {(char *)helper, spid, "0", sid, "1", NULL};
    char *envp[] = {"PATH=/usr/bin:/bin", NULL};
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);   /* nothing of ours may run in the vfork child */
    pid_t child = vfork();
    if (child == 0) {
        execve(helper, argv, envp);
        _exit(127);
    }
    int e = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (child < 0) { errno = e; return -1; }
    int st;
    while (waitpid(child, &st, 0) < 0)
        if (errno != EINTR) return -1;
    if (WIFEXITED(st) && WEXITSTATUS(st) == 0) return 0;
    errno = EPERM;
    return -1;
}

static unsigned long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (unsigned long long)t.tv_sec * 1000000000ull + (unsigned long long)t.tv_nsec;
}

static int put_err(char *err, size_t errlen, int kind, int e, const char *stage, const char *detail)
{
    snprintf(err, errlen, "%s%s%s: %s", stage, detail && *detail ? " " : "", detail ? detail : "", strerror(e));
    return kind;
}

static void close_placement(struct placement *pl)
{
    for (int i = 0; i < pl->ntasks; i++) close(pl->tasks[i]);
    pl->ntasks = 0;
    if (pl->v2_dir >= 0) close(pl->v2_dir);
    pl->v2_dir = -1;
}

/* Sort the cgroup.procs files by how pid 1 gets there (see struct placement); 0 or a BMI_SPAWN_* error. */
static int plan_placement(char **procs, struct placement *pl, char *err, size_t errlen)
{
    memset(pl, 0, sizeof *pl);
    pl->v2_dir = -1;
    for (int i = 0; procs && procs[i]; i++) {
        const char *path = procs[i], *slash = strrchr(path, '/');
        if (i >= MAX_CGROUPS) {
            close_placement(pl);
            return put_err(err, errlen, BMI_SPAWN_EINVAL, E2BIG, "placing the PD in", "(more than 16 cgroups)");
        }
        char dir[PATH_MAX];
        size_t len = slash ? (size_t)(slash - path) : 0;
        struct statfs fs;
        int fd = -1;
        if (slash && len < sizeof dir && !strcmp(slash, "/cgroup.procs")) {
            memcpy(dir, path, len);
            dir[len] = 0;
            fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            if (fd < 0) {
                int e = errno;
                close_placement(pl);
                return put_err(err, errlen, BMI_SPAWN_ERESOURCE, e, "placing the PD in", path);
            }
        }
        long type = fd >= 0 && !fstatfs(fd, &fs) ? (long)fs.f_type : 0;
        if (type == CGROUP2_SUPER_MAGIC_ && pl->v2_dir < 0) {
            pl->v2_dir = fd, pl->v2_procs = path;
            continue;
        }
        if (type == CGROUP_SUPER_MAGIC_) {
            int t = openat(fd, "tasks", O_WRONLY | O_CLOEXEC);
            int e = errno;
            close(fd);
            if (t < 0) {
                close_placement(pl);
                return put_err(err, errlen, BMI_SPAWN_ERESOURCE, e, "placing the PD in", path);
            }
            pl->tasks_name[pl->ntasks] = path;
            pl->tasks[pl->ntasks++] = t;
            continue;
        }
        if (fd >= 0) close(fd);
        pl->by_pid[pl->nby_pid++] = path;
    }
    return 0;
}

int bmi_spawn(const struct bmi_spawn_args *a, int *pid_out, int *pidfd_out, char *err, size_t errlen)
{
    if (!a || a->exec_fd < 0 || a->console_fd < 0 || a->status_fd < 0 || !a->argv || !a->argv[0] || !a->envp ||
        !a->hostname)
        return put_err(err, errlen, BMI_SPAWN_EINVAL, EINVAL, "spawn arguments", "(fd, argv or hostname)");
    int flags = a->flags | (a->progress ? BMI_SPAWN_PROGRESS : 0), outer_uid = a->outer_uid, outer_gid = a->outer_gid;
    char **cgroup_procs = a->cgroup_procs;
    /* execute-only for the PD (it is owned by us, not by anyone mapped into the PD): the program is then
     * not dumpable and its memory not readable through /proc/<pid>/mem by other processes of the PD */
    if (!a->archive && fchmod(a->exec_fd, 0111))
        return put_err(err, errlen, BMI_SPAWN_ERESOURCE, errno, "making the image execute-only", NULL);
    struct placement pl;
    int kind = plan_placement(cgroup_procs, &pl, err, errlen);
    if (kind) return kind;
    int rel[2], ep[2];
    if (pipe2(rel, O_CLOEXEC)) {
        int e = errno;
        close_placement(&pl);
        return put_err(err, errlen, BMI_SPAWN_ERESOURCE, e, "pipe", NULL);
    }
    if (pipe2(ep, O_CLOEXEC)) {
        int e = errno;
        close(rel[0]); close(rel[1]);
        close_placement(&pl);
        return put_err(err, errlen, BMI_SPAWN_ERESOURCE, e, "pipe", NULL);
    }
    struct cfg c = {a->exec_fd, a->archive, a->console_fd, a->status_fd, a->lifeline_fd, a->channel_fd, flags,
                    a->argv, a->envp, a->hostname, a->tmpfs_bytes, rel[0], ep[1], a->keep_caps, outer_uid, outer_gid};
    int pidfd = -1;
    struct start *started = NULL;
    unsigned long long t0 = now_ns();
    long pid = start_init(&c, &pl, &pidfd, &started);
    unsigned long long t1 = now_ns(), t2 = t1;
    int e = errno;
    close(rel[0]);
    close(ep[1]);
    if (pid < 0) {
        close_placement(&pl);
        kind = put_err(err, errlen, BMI_SPAWN_ERESOURCE, e, "clone into new namespaces", NULL);
        close(rel[1]);
        close(ep[0]);
        return kind;
    }
    char map[64];
    snprintf(map, sizeof map, "0 %d 1\n", outer_uid);
    if (write_proc((pid_t)pid, "setgroups", "deny"))
        kind = put_err(err, errlen, BMI_SPAWN_ERESOURCE, errno, "writing setgroups", NULL);
    else if (flags & BMI_SPAWN_MAP_HELPER ? run_map_helper("/usr/bin/newuidmap", (pid_t)pid, outer_uid)
                                          : write_proc((pid_t)pid, "uid_map", map))
        kind = put_err(err, errlen, BMI_SPAWN_ERESOURCE, errno, "writing uid_map", map);
    snprintf(map, sizeof map, "0 %d 1\n", outer_gid);
    if (!kind && (flags & BMI_SPAWN_MAP_HELPER ? run_map_helper("/usr/bin/newgidmap", (pid_t)pid, outer_gid)
                                               : write_proc((pid_t)pid, "gid_map", map)))
        kind = put_err(err, errlen, BMI_SPAWN_ERESOURCE, errno, "writing gid_map", map);
    char pidtxt[24];
    snprintf(pidtxt, sizeof pidtxt, "%ld\n", pid);
    for (int i = 0; !kind && i < pl.nby_pid; i++) {
        int fd = open(pl.by_pid[i], O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write_all(fd, pidtxt, strlen(pidtxt)))
            kind = put_err(err, errlen, BMI_SPAWN_ERESOURCE, errno, "placing the PD in", pl.by_pid[i]);
        if (fd >= 0) close(fd);
    }
    t2 = now_ns();
    if (!kind && write_all(rel[1], "x", 1))
        kind = put_err(err, errlen, BMI_SPAWN_ERESOURCE, errno, "releasing the PD's init", NULL);
    close(rel[1]);
    if (!kind) {
        struct rec r;
        ssize_t n;
        for (;;) {  /* progress records (BMI_SPAWN_PROGRESS), then the result: EOF, a failure or the hold */
            do n = read(ep[0], &r, sizeof r); while (n < 0 && errno == EINTR);
            if (n != (ssize_t)sizeof r || r.kind != BMI_SPAWN_UNPACKED) break;
            if (a->progress && a->progress(a->progress_ctx, r.done, r.total)) break;
        }
        if (n == (ssize_t)sizeof r && r.kind == BMI_SPAWN_UNPACKED) {
            kind = put_err(err, errlen, BMI_SPAWN_STOPPED, ECANCELED, "unpacking the root archive",
                           "(stopped by the progress callback)");
        } else if (n == (ssize_t)sizeof r && r.kind == BMI_SPAWN_HELD) {
            /* the program waits for the caller's SIGCONT (BMI_SPAWN_HOLD) */
        } else if (n == (ssize_t)sizeof r) {
            r.stage[sizeof r.stage - 1] = r.detail[sizeof r.detail - 1] = 0;
            kind = put_err(err, errlen, r.kind, r.err, r.stage, r.detail);
        } else if (n != 0) {
            kind = put_err(err, errlen, BMI_SPAWN_ERESOURCE, n < 0 ? errno : EPROTO, "reading the set-up result", NULL);
        }
    }
    close(ep[0]);
    if (a->phases_ns) {
        unsigned long long t3 = now_ns();
        a->phases_ns[0] = t1 - t0, a->phases_ns[1] = t2 - t1, a->phases_ns[2] = t3 - t2;
    }
    close_placement(&pl);   /* only now: until its exec the child reads pl (it has its own copies of the fds) */
    if (kind) { /* nothing half-built: kill and reap pid 1 (the kernel takes the rest of its namespace) */
        siginfo_t si;
        syscall(SYS_pidfd_send_signal_, pidfd, SIGKILL, NULL, 0);
        while (waitid((idtype_t)P_PIDFD, (id_t)pidfd, &si, WEXITED) < 0 && errno == EINTR) {}
        close(pidfd);
        finish_init(started);   /* reaped: its stack and arguments are ours again */
        return kind;
    }
    finish_init(started);       /* the result came after its exec: it no longer runs on our memory */
    *pid_out = (int)pid;
    *pidfd_out = pidfd;
    return BMI_SPAWN_OK;
}

int bmi_landlock_abi(void)
{
    return landlock_abi_raw();
}

/* Filters work when the kernel knows the action we use. */
int bmi_seccomp_available(void)
{
    uint32_t action = SECCOMP_RET_ERRNO;
    return syscall(SYS_seccomp, SECCOMP_GET_ACTION_AVAIL, 0, &action) == 0;
}
