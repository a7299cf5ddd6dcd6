/* Flat C API of the Linux PD spawn path (cffi cdef is this file minus #include lines). */
#include <stddef.h>

/* flags */
#define BMI_SPAWN_SECCOMP 1
#define BMI_SPAWN_LANDLOCK 2
#define BMI_SPAWN_IO_URING 4   /* the PD may use io_uring (its /boot/allow lists io_uring) */
/* the PD's user namespace is created with euid/egid = outer_uid/outer_gid, so it is theirs (root only) */
#define BMI_SPAWN_OWN_USERNS 0x100
/* outer_uid/outer_gid come from the caller's /etc/subuid, /etc/subgid: mapped through newuidmap/newgidmap */
#define BMI_SPAWN_MAP_HELPER 0x200
/* devices/networks hook: the program waits, fully set up, before its exec until its init gets SIGCONT (which it
 * forwards), so the manager can add device nodes and interfaces first; bmi_spawn returns once it waits.  An exec
 * that fails after the hold is seen only as the program's exit status 127. */
#define BMI_SPAWN_HOLD 0x400
/* internal (set when args->progress is given): bmi-init reports how much of a root archive it has unpacked */
#define BMI_SPAWN_PROGRESS 0x800

/* return codes: 0 = started; otherwise err holds "stage: reason" */
#define BMI_SPAWN_OK 0
#define BMI_SPAWN_EIMAGE 1
#define BMI_SPAWN_ERESOURCE 2
#define BMI_SPAWN_EINVAL 3
#define BMI_SPAWN_HELD 4        /* internal: the record saying the program waits (BMI_SPAWN_HOLD) */
#define BMI_SPAWN_UNPACKED 5    /* internal: the record saying how much of the root archive is unpacked */
#define BMI_SPAWN_STOPPED 6     /* the progress callback returned non-zero: the PD was killed */

/* What a PD is started with; -1 for an fd it has none of (lifeline, channel). */
struct bmi_spawn_args {
    int exec_fd;                    /* the sealed, measured image */
    int archive;                    /* 1: exec_fd is a root archive (its /init runs); 0: a static ELF */
    char **argv, **envp;            /* NULL-terminated */
    int console_fd, status_fd;      /* the program's stdout/stderr; where init reports its exit */
    int lifeline_fd;                /* EOF on it: the manager is gone, init kills the PD */
    int channel_fd;                 /* becomes fd 3 of the program */
    char **cgroup_procs;            /* NULL-terminated cgroup.procs files the PD is placed in, before its exec: cloned
                                     * into a v2 group, its own "0" into a v1 group's tasks (spawn.c, struct placement) */
    int outer_uid, outer_gid;       /* who the PD's root is on the host */
    const char *hostname;
    unsigned long long tmpfs_bytes; /* size of the root and /tmp tmpfs (0: the kernel's default) */
    int flags;                      /* BMI_SPAWN_* */
    unsigned long long keep_caps;   /* bit n: the program keeps capability n */
    unsigned long long *phases_ns;  /* NULL, or BMI_SPAWN_PHASES durations out: clone; uid maps and placement;
                                     * release to the program's exec (bmi-init's work) */
    /* NULL, or called in the caller's thread as a root archive is unpacked (done of total bytes, up to
     * done == total); non-zero from it stops the start */
    int (*progress)(void *ctx, unsigned long long done, unsigned long long total);
    void *progress_ctx;
};
#define BMI_SPAWN_PHASES 3

int bmi_spawn(const struct bmi_spawn_args *args, int *pid_out, int *pidfd_out, char *err, size_t errlen);
int bmi_landlock_abi(void);
int bmi_seccomp_available(void);

/* The socket maker (csrc/spawn/sockmaker.c): a process in an empty network namespace making the socket pairs handed
 * to PDs.  Returns the manager's end (SOCK_SEQPACKET, close-on-exec) and the maker's pid and pidfd, or -1 and errno. */
int bmi_sockmaker_start(int *pid_out, int *pidfd_out);
