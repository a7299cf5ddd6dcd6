/* Flat C API over libxl and libxenstore for bmi's Xen driver.
 *
 * Python never sees a libxl struct: domains are built from libxl's own
 * JSON (libxl_domain_config_from_json) and everything else is ints and
 * strings.  libxl calls return 0 or a negative libxl error code
 * (bmi_xen_strerror names it); bmi_xs_* calls return 0 (or a count) or
 * -errno.  The error text libxl logged during the failing call is kept
 * per context and per calling thread: bmi_xen_last_error.
 */
#include <stddef.h>
#include <stdint.h>

typedef struct bmi_xen bmi_xen;

/* Domain states reported by bmi_xen_info / bmi_xen_list. */
#define BMI_XEN_RUNNING 1
#define BMI_XEN_BLOCKED 2
#define BMI_XEN_PAUSED 3
#define BMI_XEN_SHUTDOWN 4
#define BMI_XEN_DYING 5

/* Shutdown reasons (libxl_shutdown_reason). */
#define BMI_XEN_POWEROFF 0
#define BMI_XEN_REBOOT 1
#define BMI_XEN_SUSPEND 2
#define BMI_XEN_CRASH 3
#define BMI_XEN_WATCHDOG 4
#define BMI_XEN_SOFT_RESET 5

#define BMI_XEN_CREDIT2 6
#define BMI_XEN_ERRLEN 1024

int bmi_xen_open(bmi_xen **out);
void bmi_xen_close(bmi_xen *x);
const char *bmi_xen_last_error(const bmi_xen *x);
const char *bmi_xen_strerror(int rc);
void bmi_xen_free(void *p);

int bmi_xen_physinfo(bmi_xen *x, int *nr_cpus, uint64_t *total_kb, uint64_t *free_kb, int *cap_pvh);
int bmi_xen_create(bmi_xen *x, const char *json, uint32_t *domid);
int bmi_xen_restore(bmi_xen *x, const char *json, int fd, uint32_t *domid);
int bmi_xen_suspend(bmi_xen *x, uint32_t domid, int fd);
int bmi_xen_pause(bmi_xen *x, uint32_t domid);
int bmi_xen_unpause(bmi_xen *x, uint32_t domid);
int bmi_xen_shutdown(bmi_xen *x, uint32_t domid);
int bmi_xen_reboot(bmi_xen *x, uint32_t domid);
int bmi_xen_destroy(bmi_xen *x, uint32_t domid);
int bmi_xen_set_memory(bmi_xen *x, uint32_t domid, uint64_t target_kb);
int bmi_xen_set_maxmem(bmi_xen *x, uint32_t domid, uint64_t max_kb);
int bmi_xen_memory_target(bmi_xen *x, uint32_t domid, uint64_t *target_kb);
int bmi_xen_set_vcpus(bmi_xen *x, uint32_t domid, int online, int max);
int bmi_xen_sched_get(bmi_xen *x, uint32_t domid, int *sched, int *weight, int *cap);
int bmi_xen_sched_set(bmi_xen *x, uint32_t domid, int weight, int cap);
int bmi_xen_info(bmi_xen *x, uint32_t domid, int *state, int *reason, uint64_t *current_kb,
                 uint64_t *max_kb, int *vcpus_online, uint64_t *cpu_ns);
int bmi_xen_list(bmi_xen *x, uint32_t *domids, int *states, int max);
int bmi_xen_uuid(bmi_xen *x, uint32_t domid, uint8_t *uuid16);
int bmi_xen_console_tty(bmi_xen *x, uint32_t domid, char *buf, size_t len);

char *bmi_xs_read(bmi_xen *x, const char *path, unsigned int *len, int *err);
int bmi_xs_write(bmi_xen *x, const char *path, const char *data, unsigned int len);
char *bmi_xs_directory(bmi_xen *x, const char *path, unsigned int *bytes, int *err);
int bmi_xs_mkdir(bmi_xen *x, const char *path);
int bmi_xs_rm(bmi_xen *x, const char *path);
int bmi_xs_set_perms(bmi_xen *x, const char *path, const unsigned int *domids, const int *perms,
                     unsigned int n);
int bmi_xs_get_perms(bmi_xen *x, const char *path, unsigned int *domids, int *perms, unsigned int max);
int bmi_xs_watch(bmi_xen *x, const char *path, const char *token);
int bmi_xs_unwatch(bmi_xen *x, const char *path, const char *token);
int bmi_xs_fileno(bmi_xen *x);
int bmi_xs_check_watch(bmi_xen *x, char *path, size_t plen, char *token, size_t tlen);
