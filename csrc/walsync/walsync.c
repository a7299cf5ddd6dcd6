/* walsync.c: the sync of bmid's state database (the SQLite WAL), off the GIL.
 *
 * bmid's client loop runs the calls of every client in one Python thread
 * and commits them in groups; the fdatasync that makes a group durable
 * takes 0.3-0.5 ms on these disks.  Done in that thread it stops the calls;
 * done in another Python thread it costs a GIL hand-over at each of its
 * system calls, and more than it saves (measured: 40% more CPU per change
 * with 8 clients).  Here the waiting, the sync and the answer need no GIL:
 * the loop writes `asked`, goes on with the next calls, and sees `done` in
 * its epoll.
 */
#define _GNU_SOURCE
#include "walsync.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <unistd.h>

static int sync_path(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? 0 : errno;
    int err = fdatasync(fd) < 0 ? errno : 0;
    close(fd);
    return err;
}

int bmi_walsync_serve(int asked, int done, const char *path, int *result)
{
    for (;;) {
        uint64_t n;
        if (read(asked, &n, sizeof n) != (ssize_t)sizeof n) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n >= BMI_WALSYNC_STOP)
            return 0;
        *result = sync_path(path);
        uint64_t one = 1;
        while (write(done, &one, sizeof one) != (ssize_t)sizeof one)
            if (errno != EINTR)
                return -errno;
    }
}
