/*
 * Linux PD spawn path: clone into fresh namespaces, build the PD's root,
 * and exec the measured image -- with no Python between clone and exec.
 *
 * Process shape:
 *   manager --clone(CLONE_VM|NEWUSER|NEWPID|NEWNET|NEWNS|NEWIPC|NEWUTS, PIDFD)--> pid 1
 *   pid 1: waits until the manager has written its uid/gid maps and cgroup.procs,
 *          becomes root of its user namespace, and execs bmi-init (this file built
 *          with -DBMI_PD_INIT_MAIN, run from a sealed memfd): the tiny init that
 *          builds the root, forwards signals, reaps, and reports the exit
 *   pid 1  --clone--> pid 2 = the PD's program (seccomp from pid 1, then landlock, capabilities dropped)
 * CLONE_VM as in posix_spawn: no copy of the manager's page tables (ms for a
 * big Python process) and none of its memory in the PD.  Until its exec the
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
#include <sys/syscall.h>
#include <sys/wait.h>
#include <linux/audit.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/openat2.h>
#include <linux/seccomp.h>

#include "spawn.h"

#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif
#ifndef P_PIDFD
#define P_PIDFD 3
#endif
#define SYS_clone3_ 435
#define SYS_pidfd_send_signal_ 424
#define SYS_openat2_ 437
#define SYS_landlock_create_ruleset_ 444
#define SYS_landlock_add_rule_ 445
#define SYS_landlock_restrict_self_ 446

/* our own declarations: the installed kernel headers (6.1) predate landlock ABI 4-7 */
struct bmi_clone_args {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls,
        set_tid, set_tid_size, cgroup;
};
struct bmi_ll_ruleset_attr {
    uint64_t handled_access_fs, handled_access_net, scoped;
};
struct bmi_ll_path_beneath {
    uint64_t allowed_access;
    int32_t parent_fd;
} __attribute__((packed));
#define LL_CREATE_RULESET_VERSION 1u
#define LL_RULE_PATH_BENEATH 1
#define LL_FS_MAKE_CHAR (1ull << 6)
#define LL_FS_MAKE_BLOCK (1ull << 11)
#define LL_FS_ABI1 ((1ull << 13) - 1) /* EXECUTE .. MAKE_SYM */
#define LL_FS_REFER (1ull << 13)      /* ABI 2 */
#define LL_FS_TRUNCATE (1ull << 14)   /* ABI 3 */
#define LL_FS_IOCTL_DEV (1ull << 15)  /* ABI 5 */
#define LL_SCOPE_ABSTRACT_UNIX (1ull << 0) /* ABI 6 */
#define LL_SCOPE_SIGNAL (1ull << 1)        /* ABI 6 */

#define PD_NAMESPACES (CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWNS | \
                       CLONE_NEWIPC | CLONE_NEWUTS)
#define CLONE_NS_MASK (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | \
                       CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET)
#define MAX_HARDLINKS 1024
#define HIGH_FD 10

/* One failure record, written with a single write() (< PIPE_BUF, so atomic). */
struct rec {
    int kind, err;
    char stage[120];
    char detail[128];
};

struct cfg {
    int exec_fd, archive, console_fd, status_fd, lifeline_fd, channel_fd, flags;
    char **argv, **envp;
    const char *hostname;
    unsigned long long tmpfs_bytes;
    int release_rd, err_wr;
    unsigned long long keep_caps; /* bit n: the program keeps capability n (in its own user namespace) */
    int outer_uid, outer_gid;     /* who the PD's root is on the host (manager side only) */
};

/* ---------------------------------------------------------------- child helpers */

#ifdef BMI_PD_INIT_MAIN   /* the child side: built into bmi-init only */
static void copy_str(char *dst, size_t cap, const char *src, size_t n)
{
    size_t i = 0;
    for (; src && i < n && i + 1 < cap && src[i]; i++)
        dst[i] = src[i];
    dst[i] = 0;
}

static __attribute__((noreturn)) void fail_n(int fd, int kind, int err, const char *stage,
                                             const char *detail, size_t dlen)
{
    struct rec r;
    memset(&r, 0, sizeof r);
    r.kind = kind;
    r.err = err;
    copy_str(r.stage, sizeof r.stage, stage, (size_t)-1);
    copy_str(r.detail, sizeof r.detail, detail, dlen);
    ssize_t n = write(fd, &r, sizeof r);
    (void)n;
    _exit(127);
}

static __attribute__((noreturn)) void fail(int fd, int kind, const char *stage, const char *detail)
{
    fail_n(fd, kind, errno, stage, detail, (size_t)-1);
}

/* errno of a failed write/create into the PD's root: out of space is the host's limit, not the image's fault */
static int fs_kind(int err)
{
    return (err == ENOSPC || err == ENOMEM || err == EDQUOT) ? BMI_SPAWN_ERESOURCE : BMI_SPAWN_EIMAGE;
}

static char *utoa(char *p, unsigned long long v)
{
    char tmp[24];
    int n = 0;
    do tmp[n++] = (char)('0' + v % 10); while ((v /= 10));
    while (n) *p++ = tmp[--n];
    *p = 0;
    return p;
}

/* Close every fd except those listed (-1 entries ignored). */
static void reset_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    for (int s = 1; s < NSIG; s++)
        sigaction(s, &sa, NULL); /* SIGKILL/SIGSTOP/reserved ones just fail */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

#endif

static void close_except(int *keep, int n)
{
    for (int i = 1; i < n; i++)   /* insertion sort: n is tiny */
        for (int j = i; j > 0 && keep[j - 1] > keep[j]; j--) {
            int t = keep[j]; keep[j] = keep[j - 1]; keep[j - 1] = t;
        }
    unsigned int from = 0;
    for (int i = 0; i < n; i++) {
        if (keep[i] < 0) continue;
        if ((unsigned int)keep[i] > from) close_range(from, (unsigned int)keep[i] - 1, 0);
        from = (unsigned int)keep[i] + 1;
    }
    close_range(from, ~0u, 0);
}

static int write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* ---------------------------------------------------------------- confinement */

static int landlock_abi_raw(void)
{
    long abi = syscall(SYS_landlock_create_ruleset_, NULL, 0, LL_CREATE_RULESET_VERSION);
    return abi < 0 ? 0 : (int)abi;
}

/* Handle every fs access the ABI knows and allow all of it beneath "/" except
 * creating device nodes; from ABI 6 also scope abstract unix sockets and
 * signals to the PD's program (it cannot signal its init or the host). */
#ifdef BMI_PD_INIT_MAIN
static int apply_landlock(void)
{
    int abi = landlock_abi_raw();
    if (abi <= 0) return 0;
    struct bmi_ll_ruleset_attr attr = {0, 0, 0};
    size_t size = 8;
    attr.handled_access_fs = LL_FS_ABI1;
    if (abi >= 2) attr.handled_access_fs |= LL_FS_REFER;
    if (abi >= 3) attr.handled_access_fs |= LL_FS_TRUNCATE;
    if (abi >= 4) size = 16;
    if (abi >= 5) attr.handled_access_fs |= LL_FS_IOCTL_DEV;
    if (abi >= 6) {
        attr.scoped = LL_SCOPE_ABSTRACT_UNIX | LL_SCOPE_SIGNAL;
        size = 24;
    }
    int rs = (int)syscall(SYS_landlock_create_ruleset_, &attr, size, 0);
    if (rs < 0) return -1;
    struct bmi_ll_path_beneath pb;
    pb.allowed_access = attr.handled_access_fs & ~(LL_FS_MAKE_CHAR | LL_FS_MAKE_BLOCK);
    pb.parent_fd = open("/", O_PATH | O_CLOEXEC);
    int rc = -1;
    if (pb.parent_fd >= 0 &&
        syscall(SYS_landlock_add_rule_, rs, LL_RULE_PATH_BENEATH, &pb, 0) == 0 &&
        prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 &&
        syscall(SYS_landlock_restrict_self_, rs, 0) == 0)
        rc = 0;
    int e = errno;
    if (pb.parent_fd >= 0) close(pb.parent_fd);
    close(rs);
    errno = e;
    return rc;
}

static const int denied_syscalls[] = {
    SYS_ptrace, SYS_process_vm_readv, SYS_process_vm_writev, SYS_kexec_load,
    SYS_kexec_file_load, SYS_bpf, SYS_keyctl, SYS_add_key, SYS_request_key, SYS_mount,
    SYS_umount2, SYS_pivot_root, 428 /* open_tree */, 429 /* move_mount */,
    430 /* fsopen */, 431 /* fsconfig */, 432 /* fsmount */, 433 /* fspick */,
    442 /* mount_setattr */, SYS_open_by_handle_at, SYS_name_to_handle_at,
    SYS_init_module, SYS_finit_module, SYS_delete_module, SYS_perf_event_open,
    SYS_userfaultfd, SYS_setns, SYS_unshare, SYS_swapon, SYS_swapoff, SYS_reboot,
    SYS_acct, SYS_syslog, SYS_iopl, SYS_ioperm, SYS_quotactl, 443 /* quotactl_fd */,
    SYS_lookup_dcookie, SYS_chroot,
};

#define N_DENIED (sizeof denied_syscalls / sizeof denied_syscalls[0])
/* io_uring runs socket and file operations from kernel workers the filter never sees (Docker's default
 * profile blocks it too); denied unless the PD's /boot/allow lists io_uring (BMI_SPAWN_IO_URING) */
static const int io_uring_syscalls[] = {425 /* io_uring_setup */, 426 /* io_uring_enter */,
                                        427 /* io_uring_register */};
#define N_IO_URING (sizeof io_uring_syscalls / sizeof io_uring_syscalls[0])
#define SO_PASSRIGHTS_ 83   /* Linux 6.16: off on the connection ends bmi hands out, so no fd passes over them */
#define RET_ERRNO(e) BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (e))
#define LD_NR BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr))
#define LD_ARG(i) BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[i]))
#define LD_ARG0 LD_ARG(0)

static unsigned deny_each(struct sock_filter *f, unsigned n, const int *nrs, unsigned count)
{
    for (unsigned i = 0; i < count; i++) {
        f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)nrs[i], 0, 1);
        f[n++] = (struct sock_filter)RET_ERRNO(EPERM);
    }
    return n;
}

/* x86_64 only (anything else, including x32, is killed); EPERM for the
 * calls that reach kernel or host state, for io_uring unless allowed, and
 * for setsockopt(SOL_SOCKET, SO_PASSRIGHTS) (whatever the value: turning
 * fd passing back on is what it would be for); clone3 gets ENOSYS (its
 * flags are in memory, unreadable by BPF) so libc falls back to clone,
 * whose flags we can check; personality may only be queried or set to
 * PER_LINUX. */
static int apply_seccomp(int flags)
{
    struct sock_filter f[25 + 2 * (N_DENIED + N_IO_URING)];
    unsigned n = 0;
    f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch));
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS);
    f[n++] = (struct sock_filter)LD_NR;
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000u /* x32 */, 0, 1);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS);
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_setsockopt, 0, 5);
    f[n++] = (struct sock_filter)LD_ARG(1);
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SOL_SOCKET, 0, 3);
    f[n++] = (struct sock_filter)LD_ARG(2);
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SO_PASSRIGHTS_, 0, 1);
    f[n++] = (struct sock_filter)RET_ERRNO(EPERM);
    f[n++] = (struct sock_filter)LD_NR;
    n = deny_each(f, n, denied_syscalls, N_DENIED);
    if (!(flags & BMI_SPAWN_IO_URING))
        n = deny_each(f, n, io_uring_syscalls, N_IO_URING);
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_clone3_, 0, 1);
    f[n++] = (struct sock_filter)RET_ERRNO(ENOSYS);
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_clone, 0, 3);
    f[n++] = (struct sock_filter)LD_ARG0;
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, CLONE_NS_MASK, 0, 6);
    f[n++] = (struct sock_filter)RET_ERRNO(EPERM);
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_personality, 0, 4);
    f[n++] = (struct sock_filter)LD_ARG0;
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0, 2, 0);
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0xffffffffu, 1, 0);
    f[n++] = (struct sock_filter)RET_ERRNO(EPERM);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    struct sock_fprog prog = {(unsigned short)n, f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) return -1;
    return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog);
}

/* ---------------------------------------------------------------- cpio extraction */

struct link { unsigned long ino, maj, min; const char *name; };
static struct link g_links[MAX_HARDLINKS]; /* child-only (copy-on-write) */

static int hex8(const char *p, unsigned long *out)
{
    unsigned long v = 0;
    for (int i = 0; i < 8; i++) {
        char c = p[i];
        int d = (c >= '0' && c <= '9') ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10
              : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : -1;
        if (d < 0) return -1;
        v = v << 4 | (unsigned long)d;
    }
    *out = v;
    return 0;
}

/* Validate a relative archive path; return it without leading "./", or NULL. */
static const char *clean_name(int ef, const char *name)
{
    while (name[0] == '.' && name[1] == '/') name += 2;
    if (name[0] == '/') fail_n(ef, BMI_SPAWN_EIMAGE, EINVAL, "archive entry has an absolute path", name, 120);
    if (name[0] == 0 || (name[0] == '.' && name[1] == 0)) return NULL;
    const char *c = name;
    for (;;) {
        const char *s = strchr(c, '/');
        size_t len = s ? (size_t)(s - c) : strlen(c);
        if (len == 0 || (len == 1 && c[0] == '.') || (len == 2 && c[0] == '.' && c[1] == '.'))
            fail_n(ef, BMI_SPAWN_EIMAGE, EINVAL, "archive entry has an empty, '.' or '..' component", name, 120);
        if (len > NAME_MAX) fail_n(ef, BMI_SPAWN_EIMAGE, ENAMETOOLONG, "archive entry", name, 120);
        if (!s) return name;
        c = s + 1;
    }
}

/* Open the directory containing `name` beneath root, refusing symlinks and
 * any escape; *base gets the last component. Returns root itself for top-level names. */
static int open_parent(int ef, int root, const char *name, const char **base)
{
    const char *slash = strrchr(name, '/');
    if (!slash) { *base = name; return root; }
    char dir[PATH_MAX];
    size_t len = (size_t)(slash - name);
    memcpy(dir, name, len);
    dir[len] = 0;
    *base = slash + 1;
    struct open_how how;
    memset(&how, 0, sizeof how);
    how.flags = O_PATH | O_DIRECTORY | O_CLOEXEC;
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV;
    int fd = (int)syscall(SYS_openat2_, root, dir, &how, sizeof how);
    if (fd < 0) fail(ef, BMI_SPAWN_EIMAGE, "archive entry's directory (missing, or reached through a symlink)", name);
    return fd;
}

/* Remove a non-directory that a later entry replaces; never a directory (proc, dev, tmp stay). */
static void make_room(int ef, int pfd, const char *base, const char *name)
{
    if (unlinkat(pfd, base, 0) == 0 || errno == ENOENT) return;
    if (errno == EISDIR) fail_n(ef, BMI_SPAWN_EIMAGE, EISDIR, "archive entry would replace a directory", name, 120);
    fail(ef, fs_kind(errno), "archive entry", name);
}

static void write_file(int ef, int pfd, const char *base, const char *name, unsigned long mode,
                       const char *data, unsigned long size, int create)
{
    int fd = create ? openat(pfd, base, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, (mode_t)(mode & 01777))
                    : openat(pfd, base, O_WRONLY | O_TRUNC | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) fail(ef, fs_kind(errno), "creating archive file", name);
    if (write_all(fd, data, size)) fail(ef, fs_kind(errno), "writing archive file", name);
    close(fd);
}

static void extract_entry(int ef, int root, const char *name, unsigned long mode, unsigned long nlink,
                          unsigned long ino, unsigned long maj, unsigned long min,
                          const char *data, unsigned long size, int *nlinks)
{
    const char *base;
    int pfd = open_parent(ef, root, name, &base);
    unsigned long type = mode & S_IFMT;
    if (type == S_IFDIR) {
        if (mkdirat(pfd, base, (mode_t)(mode & 01777)) && errno != EEXIST)
            fail(ef, fs_kind(errno), "creating archive directory", name);
        struct stat st;
        if (fstatat(pfd, base, &st, AT_SYMLINK_NOFOLLOW) || !S_ISDIR(st.st_mode))
            fail_n(ef, BMI_SPAWN_EIMAGE, EEXIST, "archive directory clashes with a non-directory", name, 120);
    } else if (type == S_IFREG) {
        int i = 0;
        if (nlink > 1)
            for (; i < *nlinks; i++)
                if (g_links[i].ino == ino && g_links[i].maj == maj && g_links[i].min == min) break;
        make_room(ef, pfd, base, name);
        if (nlink > 1 && i < *nlinks) { /* newc: a later name of the same inode */
            const char *obase;
            int ofd = open_parent(ef, root, g_links[i].name, &obase);
            if (linkat(ofd, obase, pfd, base, 0)) fail(ef, fs_kind(errno), "hard link in archive", name);
            if (ofd != root) close(ofd);
            if (size) write_file(ef, pfd, base, name, mode, data, size, 0);
        } else {
            write_file(ef, pfd, base, name, mode, data, size, 1);
            if (nlink > 1) {
                if (*nlinks == MAX_HARDLINKS)
                    fail_n(ef, BMI_SPAWN_EIMAGE, E2BIG, "archive has too many hard-linked files", name, 120);
                g_links[(*nlinks)++] = (struct link){ino, maj, min, name};
            }
        }
    } else if (type == S_IFLNK) {
        char target[PATH_MAX];
        if (size == 0 || size >= sizeof target || memchr(data, 0, size))
            fail_n(ef, BMI_SPAWN_EIMAGE, EINVAL, "archive symlink target is empty, too long or has NUL", name, 120);
        memcpy(target, data, size);
        target[size] = 0;
        make_room(ef, pfd, base, name);
        if (symlinkat(target, pfd, base)) fail(ef, fs_kind(errno), "creating archive symlink", name);
    } else {
        fail_n(ef, BMI_SPAWN_EIMAGE, EPERM,
               "archive entry is a device node, fifo or socket (only files, directories and symlinks are allowed)",
               name, 120);
    }
    if (pfd != root) close(pfd);
}

/* Unpack a newc archive from the sealed memfd into root. */
static void extract(int ef, int root, int exec_fd)
{
    struct stat st;
    if (fstat(exec_fd, &st)) fail(ef, BMI_SPAWN_ERESOURCE, "fstat of the image", NULL);
    size_t size = (size_t)st.st_size;
    if (size == 0) fail_n(ef, BMI_SPAWN_EIMAGE, EINVAL, "archive is empty", NULL, 0);
    const char *a = mmap(NULL, size, PROT_READ, MAP_PRIVATE, exec_fd, 0);
    if (a == MAP_FAILED) fail(ef, BMI_SPAWN_ERESOURCE, "mapping the image", NULL);
    size_t off = 0;
    int nlinks = 0;
    for (;;) {
        if (off > size || size - off < 110)
            fail_n(ef, BMI_SPAWN_EIMAGE, EINVAL, "archive truncated (no TRAILER!!! entry)", NULL, 0);
        const char *h = a + off;
        int crc = memcmp(h, "070702", 6) == 0;
        if (!crc && memcmp(h, "070701", 6))
            fail_n(ef, BMI_SPAWN_EIMAGE, EINVAL, "not a newc cpio header (magic 070701/070702)", NULL, 0);
        unsigned long f[13];
        for (int i = 0; i < 13; i++)
            if (hex8(h + 6 + 8 * i, &f[i]))
                fail_n(ef, BMI_SPAWN_EIMAGE, EINVAL, "archive header has a non-hex field", NULL, 0);
        unsigned long ino = f[0], mode = f[1], nlink = f[4], fsize = f[6], maj = f[7], min = f[8],
                      namesize = f[11], check = f[12];
        if (namesize == 0 || namesize > PATH_MAX)
            fail_n(ef, BMI_SPAWN_EIMAGE, ENAMETOOLONG, "archive entry name size is 0 or over PATH_MAX", NULL, 0);
        if (size - off - 110 < namesize)
            fail_n(ef, BMI_SPAWN_EIMAGE, EINVAL, "archive truncated inside an entry name", NULL, 0);
        const char *name = h + 110;
        if (name[namesize - 1] != 0 || memchr(name, 0, namesize - 1))
            fail_n(ef, BMI_SPAWN_EIMAGE, EINVAL, "archive entry name is not NUL-terminated", NULL, 0);
        size_t doff = (off + 110 + namesize + 3) & ~(size_t)3;
        if (doff > size || size - doff < fsize)
            fail_n(ef, BMI_SPAWN_EIMAGE, EINVAL, "archive truncated inside entry data", name, 120);
        if (strcmp(name, "TRAILER!!!") == 0) break;
        if (crc) {
            unsigned long sum = 0;
            for (size_t i = 0; i < fsize; i++) sum += (unsigned char)a[doff + i];
            if ((sum & 0xffffffffu) != check)
                fail_n(ef, BMI_SPAWN_EIMAGE, EINVAL, "archive entry checksum mismatch", name, 120);
        }
        const char *clean = clean_name(ef, name);
        if (clean)
            extract_entry(ef, root, clean, mode, nlink, ino, maj, min, a + doff, fsize, &nlinks);
        off = (doff + fsize + 3) & ~(size_t)3;
    }
    /* /init may be a symlink (busybox); resolve it inside the new root only */
    struct open_how how;
    memset(&how, 0, sizeof how);
    how.flags = O_PATH | O_CLOEXEC;
    how.resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV;
    int fd = (int)syscall(SYS_openat2_, root, "init", &how, sizeof how);
    if (fd < 0) fail(ef, BMI_SPAWN_EIMAGE, "archive has no usable /init", NULL);
    close(fd);
    munmap((void *)a, size);
}

/* ---------------------------------------------------------------- the PD's root */

static const char *const dev_nodes[] = {"null", "zero", "full", "random", "urandom"};

static void tmpfs_opts(char *out, const char *mode, unsigned long long bytes)
{
    char *p = stpcpy(stpcpy(out, "mode="), mode);
    if (bytes) utoa(stpcpy(p, ",size="), bytes);
}

/* tmpfs root with proc, dev (five host nodes bound in), tmp, and the archive; then pivot into it. */
static void build_root(struct cfg *c)
{
    int ef = c->err_wr;
    char opts[64];
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL)) fail(ef, BMI_SPAWN_ERESOURCE, "making mounts private", NULL);
    tmpfs_opts(opts, "0755", c->tmpfs_bytes);
    if (mount("bmi-pd", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, opts))
        fail(ef, BMI_SPAWN_ERESOURCE, "mounting the root tmpfs", NULL);
    if (chdir("/tmp")) fail(ef, BMI_SPAWN_ERESOURCE, "entering the new root", NULL);
    int root = open(".", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (root < 0) fail(ef, BMI_SPAWN_ERESOURCE, "opening the new root", NULL);
    if (mkdirat(root, "proc", 0555) || mkdirat(root, "dev", 0755) || mkdirat(root, "tmp", 01777))
        fail(ef, BMI_SPAWN_ERESOURCE, "creating proc, dev, tmp", NULL);
    if (c->archive) extract(ef, root, c->exec_fd);
    int dev = openat(root, "dev", O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dev < 0) fail(ef, BMI_SPAWN_ERESOURCE, "opening dev", NULL);
    for (unsigned i = 0; i < sizeof dev_nodes / sizeof dev_nodes[0]; i++) {
        char src[32], dst[32];
        stpcpy(stpcpy(src, "/dev/"), dev_nodes[i]);
        stpcpy(stpcpy(dst, "dev/"), dev_nodes[i]);
        int fd = openat(dev, dev_nodes[i], O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0666);
        if (fd < 0) fail(ef, errno == EEXIST ? BMI_SPAWN_EIMAGE : BMI_SPAWN_ERESOURCE,
                         "creating a device mount point (archives must not contain it)", dst);
        close(fd);
        if (mount(src, dst, NULL, MS_BIND, NULL)) fail(ef, BMI_SPAWN_ERESOURCE, "bind-mounting", src);
    }
    close(dev);
    if (mount("proc", "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL))
        fail(ef, BMI_SPAWN_ERESOURCE, "mounting proc", NULL);
    tmpfs_opts(opts, "1777", c->tmpfs_bytes);
    if (mount("tmpfs", "tmp", "tmpfs", MS_NOSUID | MS_NODEV, opts)) fail(ef, BMI_SPAWN_ERESOURCE, "mounting tmp", NULL);
    if (syscall(SYS_pivot_root, ".", ".")) fail(ef, BMI_SPAWN_ERESOURCE, "pivot_root", NULL);
    if (umount2(".", MNT_DETACH)) fail(ef, BMI_SPAWN_ERESOURCE, "detaching the host root", NULL);
    if (chdir("/")) fail(ef, BMI_SPAWN_ERESOURCE, "chdir /", NULL);
    close(root);
}

/* ---------------------------------------------------------------- pid 2: the program */

/* The program is uid 0 of its user namespace; without this it would hold
 * every capability there (CAP_NET_ADMIN over its netns opens netfilter and
 * the rest of the kernel's namespaced-admin code to it).  Like bwrap: drop
 * what is not kept from the bounding and inheritable sets and clear the
 * ambient set, so the exec below gives the program exactly `keep`. */
static int drop_caps(unsigned long long keep)
{
    for (int cap = 0; cap < 64; cap++) {
        if (keep >> cap & 1) continue;
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)) {
            if (errno == EINVAL) break; /* past the last capability this kernel has */
            return -1;
        }
    }
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)) return -1;
    struct __user_cap_header_struct head = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    if (syscall(SYS_capget, &head, data)) return -1;
    data[0].inheritable &= (uint32_t)keep;
    data[1].inheritable &= (uint32_t)(keep >> 32);
    /* no effective capability at the exec: an image the PD may only execute (mode 0111) is then
     * unreadable to it, and the kernel makes the program non-dumpable (would_dump), so no process of
     * the PD can open its /proc/<pid>/mem; root's exec gives back the bounding set anyway */
    data[0].effective = data[1].effective = 0;
    return (int)syscall(SYS_capset, &head, data);
}

static __attribute__((noreturn)) void run_program(struct cfg *c, int pipe_fd)
{
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    /* lift every source fd above 0..3 first so the dup3s below cannot clobber one */
    int keep[4] = {
        fcntl(c->exec_fd, F_DUPFD_CLOEXEC, HIGH_FD), fcntl(pipe_fd, F_DUPFD_CLOEXEC, HIGH_FD),
        fcntl(c->console_fd, F_DUPFD_CLOEXEC, HIGH_FD),
        c->channel_fd >= 0 ? fcntl(c->channel_fd, F_DUPFD_CLOEXEC, HIGH_FD) : -1,
    };
    int exec_fd = keep[0], ef = keep[1], con = keep[2], chan = keep[3];
    if (exec_fd < 0 || ef < 0 || con < 0 || (c->channel_fd >= 0 && chan < 0))
        fail(pipe_fd, BMI_SPAWN_ERESOURCE, "duplicating fds", NULL);
    close_except(keep, 4);
    int null = open("/dev/null", O_RDWR); /* lowest free fd: 0 */
    if (null != 0 || dup3(con, 1, 0) != 1 || dup3(con, 2, 0) != 2 || (chan >= 0 && dup3(chan, 3, 0) != 3))
        fail(ef, BMI_SPAWN_ERESOURCE, "setting up fds 0-3", NULL);
    close(con);
    if (chan >= 0) close(chan);
    if ((c->flags & BMI_SPAWN_LANDLOCK) && apply_landlock())
        fail(ef, BMI_SPAWN_ERESOURCE, "applying landlock", NULL);
    if (drop_caps(c->keep_caps)) fail(ef, BMI_SPAWN_ERESOURCE, "dropping capabilities", NULL);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) fail(ef, BMI_SPAWN_ERESOURCE, "PR_SET_NO_NEW_PRIVS", NULL);
    /* the seccomp filter is init's, inherited by this clone (one filter to compile, not two) */
    if (c->flags & BMI_SPAWN_HOLD) { /* devices/networks hook: say so, wait for SIGCONT (blocked: none is lost) */
        sigset_t cont;
        sigemptyset(&cont);
        sigaddset(&cont, SIGCONT);
        sigprocmask(SIG_BLOCK, &cont, NULL);
        struct rec held = {.kind = BMI_SPAWN_HELD};
        if (write(ef, &held, sizeof held) != (ssize_t)sizeof held) _exit(127);
        while (sigwaitinfo(&cont, NULL) < 0) {}
        sigprocmask(SIG_UNBLOCK, &cont, NULL);
    }
    if (c->archive) {
        execve("/init", c->argv, c->envp);
        fail(ef, BMI_SPAWN_EIMAGE, "exec of /init", NULL);
    }
    syscall(SYS_execveat, exec_fd, "", c->argv, c->envp, AT_EMPTY_PATH);
    fail(ef, BMI_SPAWN_EIMAGE, "exec of the ELF image",
         errno == ENOENT ? "(dynamically linked, or a #! script? a PD has no loader, libraries or interpreter)" : NULL);
}

/* ---------------------------------------------------------------- pid 1: the PD's init */

static void put_status(int fd, int st)
{
    char line[32], *p;
    if (WIFSIGNALED(st)) p = utoa(stpcpy(line, "signal "), (unsigned)WTERMSIG(st));
    else p = utoa(stpcpy(line, "exit "), (unsigned)WEXITSTATUS(st));
    *p++ = '\n';
    write_all(fd, line, (size_t)(p - line));
}

static __attribute__((noreturn)) void pd_init(struct cfg *c)
{
    int ef = c->err_wr;
    reset_signals();
    umask(0);
    int keep[] = {c->exec_fd, c->console_fd, c->status_fd, c->lifeline_fd, c->channel_fd, ef};
    close_except(keep, (int)(sizeof keep / sizeof keep[0]));
    ssize_t n;
    if (sethostname(c->hostname, strlen(c->hostname))) fail(ef, BMI_SPAWN_ERESOURCE, "sethostname", NULL);
    if (unshare(CLONE_NEWCGROUP)) fail(ef, BMI_SPAWN_ERESOURCE, "unshare(CLONE_NEWCGROUP)", NULL);
    build_root(c);

    sigset_t set;
    sigemptyset(&set);
    static const int handled[] = {SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGCONT, SIGWINCH};
    for (unsigned i = 0; i < sizeof handled / sizeof handled[0]; i++) sigaddset(&set, handled[i]);
    sigprocmask(SIG_BLOCK, &set, NULL);
    int sfd = signalfd(-1, &set, SFD_CLOEXEC);
    int ep[2];
    if (sfd < 0 || pipe2(ep, O_CLOEXEC)) fail(ef, BMI_SPAWN_ERESOURCE, "init set-up", NULL);
    if ((c->flags & BMI_SPAWN_SECCOMP) && apply_seccomp(c->flags))
        fail(ef, BMI_SPAWN_ERESOURCE, "installing the seccomp filter", NULL);
    pid_t prog = (pid_t)syscall(SYS_clone, SIGCHLD, 0, NULL, NULL, 0);
    if (prog < 0) fail(ef, BMI_SPAWN_ERESOURCE, "forking the program", NULL);
    if (prog == 0) {
        close(ep[0]);
        close(sfd);
        run_program(c, ep[1]);
    }
    close(ep[1]);
    struct rec r;
    do n = read(ep[0], &r, sizeof r); while (n < 0 && errno == EINTR);
    if (n == (ssize_t)sizeof r) { /* the program never ran: pass the reason on, report no exit status */
        write_all(ef, (const char *)&r, sizeof r);
        if (r.kind != BMI_SPAWN_HELD) _exit(127);
    }   /* held: the manager has its answer; the SIGCONT it sends comes through the loop below */
    close(ep[0]);
    close(ef);
    close(c->exec_fd);
    close(c->console_fd);
    if (c->channel_fd >= 0) close(c->channel_fd);

    struct pollfd pf[2] = {{sfd, POLLIN, 0}, {c->lifeline_fd, POLLIN, 0}};
    for (;;) {
        if (poll(pf, c->lifeline_fd >= 0 ? 2 : 1, -1) < 0) continue;
        if (pf[1].revents) {
            char buf[64];
            n = read(c->lifeline_fd, buf, sizeof buf);
            if (n == 0 || (n < 0 && errno != EINTR && errno != EAGAIN)) { /* the manager is gone */
                kill(-1, SIGKILL);
                _exit(128 + SIGKILL);
            }
        }
        if (!(pf[0].revents & POLLIN)) continue;
        struct signalfd_siginfo si;
        if (read(sfd, &si, sizeof si) != (ssize_t)sizeof si) continue;
        if (si.ssi_signo != SIGCHLD) {
            kill(prog, (int)si.ssi_signo);
            continue;
        }
        int st;
        pid_t w;
        while ((w = waitpid(-1, &st, WNOHANG)) > 0)
            if (w == prog) { /* the kernel kills the rest of the namespace when we exit */
                put_status(c->status_fd, st);
                _exit(WIFSIGNALED(st) ? 128 + WTERMSIG(st) : WEXITSTATUS(st));
            }
    }
}

/* ---------------------------------------------------------------- bmi-init: the PD's pid 1 as a program
 * argv: bmi-init EXEC_FD ARCHIVE CONSOLE_FD STATUS_FD LIFELINE_FD CHANNEL_FD FLAGS HOSTNAME TMPFS_BYTES
 *       ERR_FD KEEP_CAPS -- PROGRAM ARGV...      (the environment is the program's; the manager has already
 *       mapped our uids and placed us in our cgroups before it let us exec) */
extern char **environ;

int main(int argc, char **argv)
{
    if (argc < 14 || strcmp(argv[12], "--")) return 127;
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    struct cfg c = {atoi(argv[1]), atoi(argv[2]), atoi(argv[3]), atoi(argv[4]), atoi(argv[5]), atoi(argv[6]),
                    atoi(argv[7]), &argv[13], environ, argv[8], strtoull(argv[9], NULL, 10), -1, atoi(argv[10]),
                    strtoull(argv[11], NULL, 10)};
    pd_init(&c);
}
#else
/* The init program, built from this file with -DBMI_PD_INIT_MAIN at install
 * time and linked into the shim (see bmi/_build/spawn_build.py). */
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

struct start {
    const struct cfg *c;
    char **argv;      /* bmi-init's arguments, "--", then the program's (see main) */
    char *stack;
    char num[11][24];
};

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
    int keep[] = {c->exec_fd, c->console_fd, c->status_fd, c->lifeline_fd, c->channel_fd, c->err_wr,
                  c->release_rd, init_fd};
    close_except(keep, (int)(sizeof keep / sizeof keep[0]));
    char b;
    ssize_t n;
    do n = read(c->release_rd, &b, 1); while (n < 0 && errno == EINTR);
    if (n != 1) _exit(127); /* the manager gave up; it kills and reaps us */
    /* root of the new user namespace before the exec, so bmi-init keeps its capabilities there
     * (raw syscalls: glibc's set*id would signal the manager's threads) */
    const char *stage = "becoming root of the user namespace";
    if (syscall(SYS_setresgid, 0, 0, 0) == 0 && syscall(SYS_setresuid, 0, 0, 0) == 0) {
        int fds[] = {c->exec_fd, c->console_fd, c->status_fd, c->lifeline_fd, c->channel_fd, c->err_wr};
        for (unsigned i = 0; i < sizeof fds / sizeof fds[0]; i++)
            if (fds[i] >= 0) fcntl(fds[i], F_SETFD, 0);
        syscall(SYS_execveat, init_fd, "", s->argv, c->envp, AT_EMPTY_PATH);
        stage = "exec of bmi-init";
    }
    struct rec r = {.kind = BMI_SPAWN_ERESOURCE, .err = errno};
    memcpy(r.stage, stage, strlen(stage) + 1);
    write_all(c->err_wr, (const char *)&r, sizeof r);
    _exit(127);
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
static long start_init(const struct cfg *c, int *pidfd, struct start **out)
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
    s->c = c, s->argv = argv, s->stack = stack;
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
    if (!own || (syscall(SYS_setresgid, -1, c->outer_gid, -1) == 0 && syscall(SYS_setresuid, -1, c->outer_uid, -1) == 0))
        pid = clone(init_child, stack + INIT_STACK, CLONE_VM | CLONE_PIDFD | PD_NAMESPACES | SIGCHLD, s, pidfd);
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

static int put_err(char *err, size_t errlen, int kind, int e, const char *stage, const char *detail)
{
    snprintf(err, errlen, "%s%s%s: %s", stage, detail && *detail ? " " : "", detail ? detail : "", strerror(e));
    return kind;
}

int bmi_spawn(int exec_fd, int archive, char *argv[], char *envp[],
              int console_fd, int status_fd, int lifeline_fd, int channel_fd,
              char *cgroup_procs[], int outer_uid, int outer_gid,
              const char *hostname, unsigned long long tmpfs_bytes, int flags,
              unsigned long long keep_caps,
              int *pid_out, int *pidfd_out, char *err, size_t errlen)
{
    if (exec_fd < 0 || console_fd < 0 || status_fd < 0 || !argv || !argv[0] || !envp || !hostname)
        return put_err(err, errlen, BMI_SPAWN_EINVAL, EINVAL, "spawn arguments", "(fd, argv or hostname)");
    /* execute-only for the PD (it is owned by us, not by anyone mapped into the PD): the program is then
     * not dumpable and its memory not readable through /proc/<pid>/mem by other processes of the PD */
    if (!archive && fchmod(exec_fd, 0111))
        return put_err(err, errlen, BMI_SPAWN_ERESOURCE, errno, "making the image execute-only", NULL);
    int rel[2], ep[2];
    if (pipe2(rel, O_CLOEXEC)) return put_err(err, errlen, BMI_SPAWN_ERESOURCE, errno, "pipe", NULL);
    if (pipe2(ep, O_CLOEXEC)) {
        int e = errno;
        close(rel[0]); close(rel[1]);
        return put_err(err, errlen, BMI_SPAWN_ERESOURCE, e, "pipe", NULL);
    }
    struct cfg c = {exec_fd, archive, console_fd, status_fd, lifeline_fd, channel_fd, flags,
                    argv, envp, hostname, tmpfs_bytes, rel[0], ep[1], keep_caps, outer_uid, outer_gid};
    int pidfd = -1;
    struct start *started = NULL;
    long pid = start_init(&c, &pidfd, &started);
    int e = errno;
    close(rel[0]);
    close(ep[1]);
    int kind = BMI_SPAWN_OK;
    if (pid < 0) {
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
    for (int i = 0; !kind && cgroup_procs && cgroup_procs[i]; i++) {
        int fd = open(cgroup_procs[i], O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write_all(fd, pidtxt, strlen(pidtxt)))
            kind = put_err(err, errlen, BMI_SPAWN_ERESOURCE, errno, "placing the PD in", cgroup_procs[i]);
        if (fd >= 0) close(fd);
    }
    if (!kind && write_all(rel[1], "x", 1))
        kind = put_err(err, errlen, BMI_SPAWN_ERESOURCE, errno, "releasing the PD's init", NULL);
    close(rel[1]);
    if (!kind) {
        struct rec r;
        ssize_t n;
        do n = read(ep[0], &r, sizeof r); while (n < 0 && errno == EINTR);
        if (n == (ssize_t)sizeof r && r.kind == BMI_SPAWN_HELD) {
            /* the program waits for the caller's SIGCONT (BMI_SPAWN_HOLD) */
        } else if (n == (ssize_t)sizeof r) {
            r.stage[sizeof r.stage - 1] = r.detail[sizeof r.detail - 1] = 0;
            kind = put_err(err, errlen, r.kind, r.err, r.stage, r.detail);
        } else if (n != 0) {
            kind = put_err(err, errlen, BMI_SPAWN_ERESOURCE, n < 0 ? errno : EPROTO, "reading the set-up result", NULL);
        }
    }
    close(ep[0]);
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
#endif /* BMI_PD_INIT_MAIN */
