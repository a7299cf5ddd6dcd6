/* cpio.c: the one newc parser (see cpio.h).  Built into bmi-init (static) and into bmi._cpio (cffi). */
#include "cpio.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

static int say(char *err, size_t errlen, int code, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -code;
}

static int hex8(const uint8_t *p, uint32_t *out)
{
    uint32_t v = 0;
    for (int i = 0; i < 8; i++) {
        uint8_t c = p[i];
        int d = (c >= '0' && c <= '9') ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10
              : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : -1;
        if (d < 0) return -1;
        v = v << 4 | (uint32_t)d;
    }
    *out = v;
    return 0;
}

static size_t align4(size_t n)
{
    return (n + 3) & ~(size_t)3;
}

void bmi_cpio_start(struct bmi_cpio_reader *r, const uint8_t *buf, size_t len)
{
    r->buf = buf;
    r->len = len;
    r->off = 0;
}

/* a '..' component anywhere: the entry would land outside the root */
static int escapes(const char *name)
{
    for (const char *c = name;;) {
        const char *s = strchr(c, '/');
        size_t n = s ? (size_t)(s - c) : strlen(c);
        if (n == 2 && c[0] == '.' && c[1] == '.') return 1;
        if (!s) return 0;
        c = s + 1;
    }
}

int bmi_cpio_next(struct bmi_cpio_reader *r, struct bmi_cpio_entry *e, char *err, size_t errlen)
{
    size_t off = r->off, size = r->len;
    if (off > size || size - off < BMI_CPIO_HEADER)
        return say(err, errlen, BMI_CPIO_ETRUNCATED, "cpio archive truncated at offset %zu (no TRAILER!!!)", off);
    const uint8_t *h = r->buf + off;
    int crc = memcmp(h, "070702", 6) == 0;
    if (!crc && memcmp(h, "070701", 6))
        return say(err, errlen, BMI_CPIO_EMAGIC,
                   "bad cpio header magic at offset %zu: only newc ('070701', '070702') is supported", off);
    uint32_t f[13];
    for (int i = 0; i < 13; i++)
        if (hex8(h + 6 + 8 * i, &f[i]))
            return say(err, errlen, BMI_CPIO_EHEX, "cpio header at offset %zu has non-hex fields", off);
    uint32_t namesize = f[11];
    if (namesize == 0 || namesize > BMI_CPIO_NAME_MAX)
        return say(err, errlen, BMI_CPIO_ENAMESIZE, "cpio entry at offset %zu has a name of %u bytes (0, or over PATH_MAX, %d)",
                   off, namesize, BMI_CPIO_NAME_MAX);
    const char *name = (const char *)h + BMI_CPIO_HEADER;
    if (size - off - BMI_CPIO_HEADER < namesize || name[namesize - 1] != 0 || memchr(name, 0, namesize - 1))
        return say(err, errlen, BMI_CPIO_ENAME, "cpio entry name at offset %zu is truncated or not NUL-terminated",
                   off);
    size_t doff = align4(off + BMI_CPIO_HEADER + namesize);
    if (doff > size || size - doff < f[6])
        return say(err, errlen, BMI_CPIO_EDATA, "cpio archive truncated: entry '%.160s' claims %u bytes past its end",
                   name, f[6]);
    r->off = align4(doff + f[6]);
    if (strcmp(name, "TRAILER!!!") == 0) {
        r->off = size + 1;          /* nothing follows the trailer */
        return 0;
    }
    if (crc) {
        uint32_t sum = 0;
        for (size_t i = 0; i < f[6]; i++) sum += r->buf[doff + i];
        if (sum != f[12])
            return say(err, errlen, BMI_CPIO_ECHECKSUM, "cpio entry '%.160s' fails its 070702 checksum", name);
    }
    while (name[0] == '.' && name[1] == '/') name += 2;
    if (name[0] == '.' && name[1] == 0) name += 1;
    if (escapes(name))
        return say(err, errlen, BMI_CPIO_EESCAPE, "cpio entry '%.160s' has a '..' component: it would land outside the PD root", name);
    *e = (struct bmi_cpio_entry){name, strlen(name), f[0], f[1], f[4], f[7], f[8], off, doff, f[6]};
    return 1;
}

/* Relative, no empty or '.' component, none longer than NAME_MAX (bmi-init creates it component-wise). */
static int check_name(const char *name, char *err, size_t errlen)
{
    if (name[0] == '/')
        return say(err, errlen, BMI_CPIO_EABSOLUTE, "cpio entry '%.160s' has an absolute path; a PD root archive "
                   "holds relative names (run `find . | cpio -o -H newc` inside the root)", name);
    for (const char *c = name;;) {
        const char *s = strchr(c, '/');
        size_t n = s ? (size_t)(s - c) : strlen(c);
        if (n == 0 || (n == 1 && c[0] == '.'))
            return say(err, errlen, BMI_CPIO_ECOMPONENT, "cpio entry '%.160s' has an empty or '.' component", name);
        if (n > BMI_CPIO_COMPONENT_MAX)
            return say(err, errlen, BMI_CPIO_ECOMPONENT, "cpio entry '%.160s' has a component over %d bytes",
                       name, BMI_CPIO_COMPONENT_MAX);
        if (!s) return 0;
        c = s + 1;
    }
}

static const char *const mount_points[] = {"proc", "dev", "tmp"};
static const char *const bound_nodes[] = {"dev/null", "dev/zero", "dev/full", "dev/random", "dev/urandom"};

struct link_id { uint32_t ino, maj, min; };

int bmi_cpio_check(const uint8_t *buf, size_t len, char *err, size_t errlen)
{
    struct bmi_cpio_reader r;
    struct bmi_cpio_entry e;
    struct link_id links[BMI_CPIO_MAX_HARDLINKS];
    int nlinks = 0, init_type = -1, rc;
    bmi_cpio_start(&r, buf, len);
    while ((rc = bmi_cpio_next(&r, &e, err, errlen)) == 1) {
        if (e.name_len == 0) continue;      /* "." itself: the root is the layer's */
        if ((rc = check_name(e.name, err, errlen))) return rc;
        uint32_t type = e.mode & S_IFMT;
        if (type != S_IFREG && type != S_IFDIR && type != S_IFLNK)
            return say(err, errlen, BMI_CPIO_ESPECIAL, "cpio entry '%.160s' is a device node, fifo or socket; a PD "
                       "root holds only files, directories and symlinks (the layer provides /dev)", e.name);
        for (size_t i = 0; i < sizeof mount_points / sizeof mount_points[0]; i++)
            if (strcmp(e.name, mount_points[i]) == 0 && type != S_IFDIR)
                return say(err, errlen, BMI_CPIO_EMOUNTPOINT, "cpio entry '%s' is not a directory: it would "
                           "replace a directory %s the layer mounts (make it a directory, or leave it out)",
                           e.name, e.name);
        for (size_t i = 0; i < sizeof bound_nodes / sizeof bound_nodes[0]; i++)
            if (strcmp(e.name, bound_nodes[i]) == 0)
                return say(err, errlen, BMI_CPIO_EMOUNTPOINT, "the layer binds its own device nodes into /dev; "
                           "archives must not contain it: %s", e.name);
        if (type == S_IFLNK && (e.size == 0 || e.size >= BMI_CPIO_NAME_MAX || memchr(buf + e.data_offset, 0, e.size)))
            return say(err, errlen, BMI_CPIO_ESYMLINK, "cpio symlink '%.160s' has an empty, over-long or NUL-holding "
                       "target", e.name);
        if (type == S_IFREG && e.nlink > 1) {   /* bmi-init links later names of a hard-linked file */
            int i = 0;
            while (i < nlinks && !(links[i].ino == e.ino && links[i].maj == e.devmajor && links[i].min == e.devminor))
                i++;
            if (i == nlinks) {
                if (nlinks == BMI_CPIO_MAX_HARDLINKS)
                    return say(err, errlen, BMI_CPIO_EHARDLINKS, "cpio archive has more than %d hard-linked "
                               "files (at '%.160s')", BMI_CPIO_MAX_HARDLINKS, e.name);
                links[nlinks++] = (struct link_id){e.ino, e.devmajor, e.devminor};
            }
        }
        if (strcmp(e.name, "init") == 0) init_type = (int)type;
    }
    if (rc < 0) return rc;
    if (init_type < 0 || init_type == S_IFDIR)
        return say(err, errlen, BMI_CPIO_ENOINIT, "the archive has no usable /init program to run (an 'init' "
                   "that is not a directory; build one with `bmi bundle`)");
    return 0;
}
