/* measure.h: copy an image into a PD's memfd and hash it in one pass.
 * Flat API for cffi; the handle is opaque and driven by one thread at a
 * time: new, then feed or file as often as needed, then finish or abort
 * (both join the threads and free the handle).  A fed buffer must stay
 * valid until BMI_MEAS_DEPTH later feeds have returned, or finish/abort.
 * Errors are negative errnos (-ENODATA: the file ended before the length
 * asked). */
#include <stddef.h>
#include <stdint.h>

#define BMI_BANK_SHA256 1
#define BMI_BANK_SHA384 2
#define BMI_BANK_SHA512 4
#define BMI_MEAS_DEPTH 4
#define BMI_MEAS_CHUNK 1048576
/* Where bmi_meas_finish puts each bank's digest (Python reads the layout with ffi.offsetof). */
struct bmi_meas_digests {
    unsigned char sha256[32], sha384[48], sha512[64];
};
#define BMI_MEAS_DIGESTS 144    /* sizeof(struct bmi_meas_digests) */

/* mode: who produces the chunks: the caller (bmi_meas_feed) or pread of a file */
#define BMI_MEAS_FEED 0
#define BMI_MEAS_FILE 1

/* flags */
#define BMI_MEAS_SERIAL_BANKS 1

typedef struct bmi_meas bmi_meas;

/* banks: BMI_BANK_* bits, sha256 among them; or 0 to copy without hashing */
int bmi_meas_new(int out_fd, unsigned banks, int mode, int flags, bmi_meas **out);
int bmi_meas_feed(bmi_meas *m, const unsigned char *buf, size_t len);
int bmi_meas_file(bmi_meas *m, int in_fd, uint64_t in_off, uint64_t len);
int bmi_meas_finish(bmi_meas *m, unsigned char *digests);
void bmi_meas_abort(bmi_meas *m);
int bmi_hash_fd(int fd, unsigned bank, uint64_t len, unsigned char *digest);
