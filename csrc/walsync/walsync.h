/* walsync.h: make a file durable off the GIL, each time a Python thread asks.
 * Flat API for cffi.  bmi_walsync_serve is the body of one Python thread and
 * runs (GIL released) until asked to stop: each time `asked` (an eventfd)
 * is written, it fdatasyncs `path` (opened afresh: a missing file has
 * nothing to sync), stores the errno of that sync in *result (0: done), and
 * writes 1 to `done` (an eventfd).  A value of BMI_WALSYNC_STOP or more read
 * from `asked` ends it.  Returns 0, or a negative errno when an eventfd
 * failed. */
#define BMI_WALSYNC_STOP 1099511627776   /* 1 << 40 */

int bmi_walsync_serve(int asked, int done, const char *path, int *result);
