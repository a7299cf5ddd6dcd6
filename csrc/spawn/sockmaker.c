/*
 * The socket maker: a process in a new, empty network namespace that makes
 * every socket pair bmi hands to a PD (channels and connections).
 *
 * A socket belongs to the network namespace it was made in, whoever holds
 * it later: an abstract name (or an autobind name) that a PD binds on a
 * socket made by the manager would be bound in the host's namespace, where
 * it could squat a name a host service uses (X11, D-Bus).  Made here, such a
 * name lands in a namespace no process ever joins.
 *
 * Protocol on the SOCK_SEQPACKET pair: the manager sends the socket type as
 * one int, optionally followed by a count (1..MAX_COUNT; one int alone asks
 * for one); for each pair asked the maker answers one int (0 or an errno),
 * with the two ends of a new AF_UNIX socketpair attached (SCM_RIGHTS) when it
 * is 0.  A batch asked in one message wakes the maker once, not once per pair
 * on the CPU the manager needs.  EOF: the manager is gone (or closed the
 * maker), and the maker exits.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/syscall.h>

#include "spawn.h"

#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif
#define MAKER_STACK (64 * 1024)
#define MAX_COUNT 64         /* pairs asked in one message */

static void answer(int fd, int err, const int pair[2])
{
    union {
        char buf[CMSG_SPACE(2 * sizeof(int))];
        struct cmsghdr align;
    } control;
    struct iovec iov = {&err, sizeof err};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (!err) {
        memset(&control, 0, sizeof control);
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof control.buf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(2 * sizeof(int));
        memcpy(CMSG_DATA(c), pair, 2 * sizeof(int));
    }
    while (sendmsg(fd, &msg, MSG_NOSIGNAL) < 0 && errno == EINTR) {}
}

/* The maker: a copy of the manager (no CLONE_VM) that only makes syscalls. */
static int maker(void *arg)
{
    int fd = *(const int *)arg;
    if (fd > 0) syscall(SYS_close_range, 0u, (unsigned)fd - 1, 0u);
    syscall(SYS_close_range, (unsigned)fd + 1, ~0u, 0u);
    setsid();                   /* the terminal's Ctrl-C is the manager's to handle, not ours */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    for (int s = 1; s < NSIG; s++)
        sigaction(s, &sa, NULL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    for (;;) {
        int ask[2] = {0, 1}, pair[2];     /* type, count */
        ssize_t n = recv(fd, ask, sizeof ask, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) _exit(0);
        if ((n != (ssize_t)sizeof ask[0] && n != (ssize_t)sizeof ask) || ask[1] < 1 || ask[1] > MAX_COUNT ||
            (ask[0] != SOCK_STREAM && ask[0] != SOCK_SEQPACKET)) {
            answer(fd, EINVAL, NULL);
            continue;
        }
        for (int i = 0; i < ask[1]; i++) {
            if (socketpair(AF_UNIX, ask[0] | SOCK_CLOEXEC, 0, pair)) {
                answer(fd, errno, NULL);
                continue;
            }
            answer(fd, 0, pair);
            close(pair[0]);
            close(pair[1]);
        }
    }
}

int bmi_sockmaker_start(int *pid_out, int *pidfd_out)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv)) return -1;
    char *stack = malloc(MAKER_STACK);
    if (!stack) {
        close(sv[0]);
        close(sv[1]);
        errno = ENOMEM;
        return -1;
    }
    int child_end = sv[1], pidfd = -1;
    /* all signals blocked across the clone: no handler of the manager's may run in the copy */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    long pid = clone(maker, stack + MAKER_STACK, CLONE_NEWUSER | CLONE_NEWNET | CLONE_PIDFD | SIGCHLD,
                     &child_end, &pidfd);
    int e = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    free(stack);                /* the child runs on its own copy */
    close(sv[1]);
    if (pid < 0) {
        close(sv[0]);
        errno = e;
        return -1;
    }
    *pid_out = (int)pid;
    *pidfd_out = pidfd;
    return sv[0];
}
