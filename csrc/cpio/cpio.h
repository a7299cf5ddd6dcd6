/* The one newc cpio parser: bmi-init unpacks a PD's root with it, and bmi checks an image with it (cffi,
 * bmi._cpio), so what is checked is what is unpacked.  Flat C API; the cffi cdef is this file minus its
 * #include lines.  Nothing here allocates or touches a file: it reads the caller's buffer only.
 *
 * Errors are negative BMI_CPIO_E* codes, and err (when errlen > 0) holds a sentence saying what is wrong
 * with the archive and, where there is one, what to do instead. */
#include <stddef.h>
#include <stdint.h>

#define BMI_CPIO_HEADER 110
#define BMI_CPIO_NAME_MAX 4096          /* an entry name's size with its NUL (PATH_MAX) */
#define BMI_CPIO_COMPONENT_MAX 255      /* one path component (NAME_MAX) */
#define BMI_CPIO_MAX_HARDLINKS 1024     /* hard-linked files bmi-init remembers */

/* format errors (bmi_cpio_next) */
#define BMI_CPIO_ETRUNCATED 1
#define BMI_CPIO_EMAGIC 2
#define BMI_CPIO_EHEX 3
#define BMI_CPIO_ENAMESIZE 4
#define BMI_CPIO_ENAME 5
#define BMI_CPIO_EDATA 6
#define BMI_CPIO_ECHECKSUM 7
#define BMI_CPIO_EESCAPE 8
/* PD root errors (bmi_cpio_check) */
#define BMI_CPIO_EABSOLUTE 9
#define BMI_CPIO_ECOMPONENT 10
#define BMI_CPIO_ESPECIAL 11
#define BMI_CPIO_EMOUNTPOINT 12
#define BMI_CPIO_ESYMLINK 13
#define BMI_CPIO_ENOINIT 14
#define BMI_CPIO_EHARDLINKS 15

struct bmi_cpio_entry {
    const char *name;       /* inside the buffer, NUL-terminated; leading "./" removed ("" for ".") */
    size_t name_len;
    uint32_t ino, mode, nlink, devmajor, devminor;
    uint64_t offset;        /* of the entry's header */
    uint64_t data_offset;   /* of its data: a file's bytes, a symlink's target */
    uint64_t size;
};

struct bmi_cpio_reader {
    const uint8_t *buf;
    size_t len, off;
};

void bmi_cpio_start(struct bmi_cpio_reader *r, const uint8_t *buf, size_t len);
/* 1: *e is the next entry; 0: TRAILER!!! reached; -code: malformed (no entry '..' escapes, checksums of
 * 070702 entries hold, every size stays inside the buffer). */
int bmi_cpio_next(struct bmi_cpio_reader *r, struct bmi_cpio_entry *e, char *err, size_t errlen);
/* 0 when buf is an archive bmi-init unpacks as a PD's root: well formed, relative names of sane components,
 * only files, directories and symlinks, proc/dev/tmp directories (if present) with none of the device nodes
 * the layer binds in, and an /init that is not a directory.  Else -code. */
int bmi_cpio_check(const uint8_t *buf, size_t len, char *err, size_t errlen);
