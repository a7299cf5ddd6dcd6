/* Device nodes into and out of a running PD's /dev, from the manager's side.
 *
 * The PD's /dev is a directory on its own tmpfs root, in its own mount
 * namespace.  A mount can only be attached in the caller's mount namespace,
 * and setns(CLONE_NEWNS) is refused to a threaded process, so each call forks
 * a child (C only, no Python runs in it) that clones the host node's mount
 * (open_tree), enters the PD's mount namespace, and attaches it there
 * (move_mount).  The PD's own seccomp filter refuses mount, umount2,
 * open_tree and move_mount, so it cannot undo or copy what is done here.
 */
#define _GNU_SOURCE
#include "devices.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define SYS_open_tree_ 428
#define SYS_move_mount_ 429
#define OPEN_TREE_CLONE_ 1
#define MOVE_MOUNT_F_EMPTY_PATH_ 0x4

struct result { int err; char stage[96]; };

static int report(int fd, int e, const char *stage)
{
    struct result r = {e, {0}};
    snprintf(r.stage, sizeof r.stage, "%s", stage);
    (void)!write(fd, &r, sizeof r);
    return e;
}

/* In the child: enter the PD's mount namespace with its root as ours (so "/dev/<name>" is the PD's). */
static int enter(int pid, int owner, int out)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/ns/mnt", pid);
    int ns = open(path, O_RDONLY | O_CLOEXEC);
    if (ns < 0) return report(out, errno, "opening the PD's mount namespace");
    snprintf(path, sizeof path, "/proc/%d/root", pid);
    int root = open(path, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (root < 0) return report(out, errno, "opening the PD's root");
    if (setns(ns, CLONE_NEWNS)) return report(out, errno, "entering the PD's mount namespace");
    if (fchdir(root) || chroot(".") || chdir("/")) return report(out, errno, "entering the PD's root");
    setfsgid((gid_t)owner);
    setfsuid((uid_t)owner);
    return 0;
}

static int child_bind(int pid, int owner, const char *source, const char *name, int out)
{
    struct stat st;
    if (stat(source, &st)) return report(out, errno, "stat of the host node");
    if (!S_ISCHR(st.st_mode)) return report(out, ENODEV, "the host node is not a character device");
    int tree = (int)syscall(SYS_open_tree_, AT_FDCWD, source, OPEN_TREE_CLONE_ | O_CLOEXEC);
    if (tree < 0) return report(out, errno, "cloning the host node's mount (open_tree)");
    if (enter(pid, owner, out)) return -1;
    int dev = open("/dev", O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dev < 0) return report(out, errno, "opening the PD's /dev");
    if (strchr(name, '/')) {    /* e.g. net/tun: the directory, made by us (a PD cannot write its /dev) */
        char sub[256];
        snprintf(sub, sizeof sub, "%.*s", (int)(strrchr(name, '/') - name), name);
        if (mkdirat(dev, sub, 0755) && errno != EEXIST) return report(out, errno, "creating a directory in /dev");
    }
    int fd = openat(dev, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) return report(out, errno, "creating the mount point in the PD's /dev");
    close(fd);
    if (syscall(SYS_move_mount_, tree, "", dev, name, MOVE_MOUNT_F_EMPTY_PATH_)) {
        int e = errno;
        unlinkat(dev, name, 0);
        return report(out, e, "attaching the node in the PD (move_mount)");
    }
    return 0;
}

static int child_unbind(int pid, int owner, const char *unused, const char *name, int out)
{
    (void)unused;
    if (enter(pid, owner, out)) return -1;
    char path[256];
    snprintf(path, sizeof path, "/dev/%s", name);
    if (umount2(path, MNT_DETACH | UMOUNT_NOFOLLOW) && errno != EINVAL && errno != ENOENT)
        return report(out, errno, "detaching the node in the PD");
    if (unlink(path) && errno != ENOENT) return report(out, errno, "removing the mount point");
    return 0;
}

/* Run one of the above in a child; its result comes back over a pipe. */
static int in_child(int (*body)(int, int, const char *, const char *, int), int pid, int owner, const char *a, const char *b,
                    char *err, size_t errlen)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC)) {
        snprintf(err, errlen, "pipe: %s", strerror(errno));
        return errno;
    }
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid_t child = fork();
    if (child == 0) {
        close(p[0]);
        _exit(body(pid, owner, a, b, p[1]) ? 1 : 0);
    }
    int e = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    close(p[1]);
    if (child < 0) {
        close(p[0]);
        snprintf(err, errlen, "fork: %s", strerror(e));
        return e;
    }
    struct result r = {0, {0}};
    ssize_t n;
    do n = read(p[0], &r, sizeof r); while (n < 0 && errno == EINTR);
    close(p[0]);
    int st;
    while (waitpid(child, &st, 0) < 0 && errno == EINTR) {}
    if (n == (ssize_t)sizeof r && r.err) {
        r.stage[sizeof r.stage - 1] = 0;
        snprintf(err, errlen, "%s: %s", r.stage, strerror(r.err));
        return r.err;
    }
    if (!WIFEXITED(st) || WEXITSTATUS(st)) {
        snprintf(err, errlen, "the helper process failed");
        return EIO;
    }
    return 0;
}

int bmi_dev_bind(int pid, int owner, const char *source, const char *name, char *err, size_t errlen)
{
    return in_child(child_bind, pid, owner, source, name, err, errlen);
}

int bmi_dev_unbind(int pid, int owner, const char *name, char *err, size_t errlen)
{
    return in_child(child_unbind, pid, owner, "", name, err, errlen);
}
