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

/* return codes: 0 = started; otherwise err holds "stage: reason" */
#define BMI_SPAWN_OK 0
#define BMI_SPAWN_EIMAGE 1
#define BMI_SPAWN_ERESOURCE 2
#define BMI_SPAWN_EINVAL 3
#define BMI_SPAWN_HELD 4        /* internal: the record saying the program waits (BMI_SPAWN_HOLD) */

int bmi_spawn(int exec_fd, int archive, char *argv[], char *envp[],
              int console_fd, int status_fd, int lifeline_fd, int channel_fd,
              char *cgroup_procs[], int outer_uid, int outer_gid,
              const char *hostname, unsigned long long tmpfs_bytes, int flags,
              unsigned long long keep_caps,
              int *pid_out, int *pidfd_out, char *err, size_t errlen);
int bmi_landlock_abi(void);
int bmi_seccomp_available(void);

/* The socket maker (csrc/sockmaker.c): a process in an empty network namespace making the socket pairs handed
 * to PDs.  Returns the manager's end (SOCK_SEQPACKET, close-on-exec) and the maker's pid and pidfd, or -1 and errno. */
int bmi_sockmaker_start(int *pid_out, int *pidfd_out);
