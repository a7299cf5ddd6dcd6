/* What the manager's spawn shim (csrc/spawn/spawn.c) and bmi-init (csrc/init/init.c) share: the
 * failure record, the set-up both sides read, raw syscall numbers and a few helpers. */
#ifndef BMI_HANDOFF_H
#define BMI_HANDOFF_H

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
#define HIGH_FD 10

/* One record, written with a single write() (< PIPE_BUF, so atomic): a failure, the hold (BMI_SPAWN_HELD), or
 * how many bytes of the root archive are unpacked (BMI_SPAWN_UNPACKED: done of total). */
struct rec {
    int kind, err;
    char stage[120];
    char detail[512];
    unsigned long long done, total;
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


static inline void close_except(int *keep, int n)
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

static inline int write_all(int fd, const char *p, size_t n)
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

static inline int landlock_abi_raw(void)
{
    long abi = syscall(SYS_landlock_create_ruleset_, NULL, 0, LL_CREATE_RULESET_VERSION);
    return abi < 0 ? 0 : (int)abi;
}

#endif
