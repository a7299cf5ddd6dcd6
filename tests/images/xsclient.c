/* xsclient: a static xenstore client for the test guest, which has no
 * libraries and no loader (Debian's xenstore-read is dynamic).
 *     xsclient read PATH          prints the value
 *     xsclient write PATH VALUE   prints nothing
 * Relative paths are relative to the guest's home (/local/domain/<domid>).
 * It speaks the xenstore wire protocol over the kernel's xenbus device; a
 * failure prints xenstored's errno name (EACCES, ENOENT, ...) or what could
 * not be opened on stderr and exits 1. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <xen/io/xs_wire.h>

static const char *const DEVICES[] = {"/dev/xen/xenbus", "/proc/xen/xenbus"};

static int fail(const char *what, const char *why)
{
    fprintf(stderr, "%s: %s\n", what, why);
    return 1;
}

static int open_xenbus(void)
{
    for (size_t i = 0; i < sizeof DEVICES / sizeof *DEVICES; i++) {
        int fd = open(DEVICES[i], O_RDWR | O_CLOEXEC);
        if (fd >= 0 || errno != ENOENT)
            return fd;
    }
    return -1;
}

static int read_full(int fd, void *buf, size_t len)
{
    for (size_t done = 0; done < len;) {
        ssize_t n = read(fd, (char *)buf + done, len - done);
        if (n <= 0)
            return -1;
        done += n;
    }
    return 0;
}

/* One request, one reply; the reply's payload lands NUL-terminated in reply. */
static int transact(int fd, enum xsd_sockmsg_type type, const char *payload, size_t len,
                    struct xsd_sockmsg *head, char reply[XENSTORE_PAYLOAD_MAX + 1])
{
    char msg[sizeof *head + XENSTORE_PAYLOAD_MAX];
    struct xsd_sockmsg req = {.type = type, .req_id = 1, .tx_id = 0, .len = len};
    if (len > XENSTORE_PAYLOAD_MAX)
        return errno = E2BIG, -1;
    memcpy(msg, &req, sizeof req);
    memcpy(msg + sizeof req, payload, len);
    /* the xenbus device takes a request only whole, header and payload in one write */
    if (write(fd, msg, sizeof req + len) != (ssize_t)(sizeof req + len))
        return -1;
    if (read_full(fd, head, sizeof *head) < 0 || head->len > XENSTORE_PAYLOAD_MAX
        || read_full(fd, reply, head->len) < 0)
        return errno = EIO, -1;
    reply[head->len] = '\0';
    return 0;
}

int main(int argc, char **argv)
{
    char payload[XENSTORE_PAYLOAD_MAX], reply[XENSTORE_PAYLOAD_MAX + 1];
    struct xsd_sockmsg head;
    size_t len;
    int is_read = argc == 3 && strcmp(argv[1], "read") == 0;
    int is_write = argc == 4 && strcmp(argv[1], "write") == 0;
    if (!is_read && !is_write)
        return fail("usage", "xsclient read PATH | xsclient write PATH VALUE");
    /* XS_READ carries "PATH\0"; XS_WRITE carries "PATH\0VALUE" (no final NUL) */
    len = (size_t)snprintf(payload, sizeof payload, "%s%c%s", argv[2], '\0', is_write ? argv[3] : "");
    if (len >= sizeof payload)
        return fail("xsclient", "path and value longer than one xenstore message (4096 bytes)");
    len = is_write ? len : strlen(argv[2]) + 1;
    int fd = open_xenbus();
    if (fd < 0)
        return fail("no xenbus device (/dev/xen/xenbus, /proc/xen/xenbus)", strerrorname_np(errno));
    int rc = transact(fd, is_read ? XS_READ : XS_WRITE, payload, len, &head, reply);
    int saved = errno;
    close(fd);
    if (rc < 0)
        return fail(argv[2], strerrorname_np(saved));
    if (head.type == XS_ERROR)
        return fail(argv[2], reply);
    if (is_read)
        printf("%s\n", reply);
    return 0;
}
