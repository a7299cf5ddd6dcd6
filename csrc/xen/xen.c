/* Flat C API over libxl and libxenstore (see xen.h).
 *
 * Built against the latest libxl API (no LIBXL_API_VERSION): cffi's API
 * mode compiles this file, so libxl's version macros resolve here, in C.
 * Every libxl call is synchronous (ao_how NULL).  libxl owns SIGCHLD in
 * "selective reap" mode so it reaps only its own helpers (save helper)
 * and Python's subprocess keeps working.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libxl.h>
#include <libxl_utils.h>
#include <xenstore.h>
#include <xentoollog.h>

#include "xen.h"

#define MAX_PERMS 64

struct bmi_xen {
    xentoollog_logger logger;   /* first: libxl hands it back to our callbacks */
    libxl_ctx *ctx;
    struct xs_handle *xs;
    int verbose;
};

/* The text libxl logged at error level during the current call, per thread. */
static __thread const bmi_xen *err_owner;
static __thread char err_text[BMI_XEN_ERRLEN];

static void err_reset(const bmi_xen *x)
{
    err_owner = x;
    err_text[0] = 0;
}

static void err_append(const char *msg)
{
    size_t used = strlen(err_text);
    if (used + 3 >= sizeof err_text)
        return;
    snprintf(err_text + used, sizeof err_text - used, "%s%s", used ? "; " : "", msg);
}

static void log_vmessage(xentoollog_logger *lg, xentoollog_level level, int errnoval,
                         const char *context, const char *format, va_list al)
{
    const bmi_xen *x = (const bmi_xen *)lg;
    char msg[512];
    int n = vsnprintf(msg, sizeof msg, format, al);
    if (n > 0 && errnoval >= 0 && (size_t)n < sizeof msg)
        snprintf(msg + n, sizeof msg - n, ": %s", strerror(errnoval));
    if (x->verbose && level >= XTL_INFO)
        fprintf(stderr, "libxl[%s]: %s\n", context ? context : "", msg);
    if (level >= XTL_ERROR)
        err_append(msg);
}

static void log_progress(xentoollog_logger *lg, const char *context, const char *doing_what,
                         int percent, unsigned long done, unsigned long total)
{
    (void)lg; (void)context; (void)doing_what; (void)percent; (void)done; (void)total;
}

static void log_destroy(xentoollog_logger *lg)
{
    (void)lg;   /* the logger lives inside bmi_xen, freed by bmi_xen_close */
}

static const libxl_childproc_hooks child_hooks = {
    .chldowner = libxl_sigchld_owner_libxl_always_selective_reap,
};

int bmi_xen_open(bmi_xen **out)
{
    bmi_xen *x;
    int rc;

    err_reset(NULL);
    x = calloc(1, sizeof *x);
    if (!x)
        return ERROR_NOMEM;
    x->logger.vmessage = log_vmessage;
    x->logger.progress = log_progress;
    x->logger.destroy = log_destroy;
    x->verbose = getenv("BMI_XEN_LOG") != NULL;
    rc = libxl_ctx_alloc(&x->ctx, LIBXL_VERSION, 0, &x->logger);
    if (rc) {
        free(x);
        return rc;
    }
    libxl_childproc_setmode(x->ctx, &child_hooks, NULL);
    x->xs = xs_open(0);
    if (!x->xs) {
        char msg[128];
        snprintf(msg, sizeof msg, "xs_open: %s", strerror(errno));
        err_append(msg);
        libxl_ctx_free(x->ctx);
        free(x);
        return ERROR_FAIL;
    }
    *out = x;
    return 0;
}

void bmi_xen_close(bmi_xen *x)
{
    if (!x)
        return;
    xs_close(x->xs);
    libxl_ctx_free(x->ctx);
    free(x);
}

const char *bmi_xen_last_error(const bmi_xen *x)
{
    return (x == NULL || err_owner == x) ? err_text : "";
}

const char *bmi_xen_strerror(int rc)
{
    const char *s = libxl_error_to_string(rc);
    return s ? s : "unknown libxl error";
}

void bmi_xen_free(void *p)
{
    free(p);
}

int bmi_xen_physinfo(bmi_xen *x, int *nr_cpus, uint64_t *total_kb, uint64_t *free_kb, int *cap_pvh)
{
    libxl_physinfo p;
    int rc;

    err_reset(x);
    libxl_physinfo_init(&p);
    rc = libxl_get_physinfo(x->ctx, &p);
    if (!rc) {
        *nr_cpus = (int)p.nr_cpus;
        *total_kb = p.total_pages * 4;
        *free_kb = p.free_pages * 4;
        *cap_pvh = p.cap_hvm && p.cap_hap;
    }
    libxl_physinfo_dispose(&p);
    return rc;
}

/* libxl removes a half-built domain itself; this makes sure of it. */
static void drop_failed(bmi_xen *x, uint32_t domid)
{
    libxl_dominfo info;

    if (domid == (uint32_t)INVALID_DOMID || domid == 0)
        return;
    libxl_dominfo_init(&info);
    if (libxl_domain_info(x->ctx, &info, domid) == 0)
        libxl_domain_destroy(x->ctx, domid, NULL);
    libxl_dominfo_dispose(&info);
}

static int build(bmi_xen *x, const char *json, int restore_fd, uint32_t *domid)
{
    libxl_domain_config cfg;
    libxl_domain_restore_params params;
    int rc;

    err_reset(x);
    *domid = INVALID_DOMID;
    libxl_domain_config_init(&cfg);
    libxl_domain_restore_params_init(&params);
    rc = libxl_domain_config_from_json(x->ctx, &cfg, json);
    if (rc) {
        err_append("the domain configuration JSON was rejected by libxl");
    } else if (restore_fd < 0) {
        rc = libxl_domain_create_new(x->ctx, &cfg, domid, NULL, NULL);
    } else {
        params.stream_version = 2;      /* what libxl_domain_suspend writes */
        rc = libxl_domain_create_restore(x->ctx, &cfg, domid, restore_fd, -1, &params, NULL, NULL);
    }
    if (rc)
        drop_failed(x, *domid);
    libxl_domain_restore_params_dispose(&params);
    libxl_domain_config_dispose(&cfg);
    return rc;
}

int bmi_xen_create(bmi_xen *x, const char *json, uint32_t *domid)
{
    return build(x, json, -1, domid);
}

int bmi_xen_restore(bmi_xen *x, const char *json, int fd, uint32_t *domid)
{
    if (fd < 0)
        return ERROR_INVAL;
    return build(x, json, fd, domid);
}

int bmi_xen_suspend(bmi_xen *x, uint32_t domid, int fd)
{
    err_reset(x);
    return libxl_domain_suspend(x->ctx, domid, fd, 0, NULL);
}

#define DOMID_OP(NAME, CALL)                            \
    int bmi_xen_##NAME(bmi_xen *x, uint32_t domid)      \
    {                                                   \
        err_reset(x);                                   \
        return CALL(x->ctx, domid, NULL);               \
    }

DOMID_OP(pause, libxl_domain_pause)
DOMID_OP(unpause, libxl_domain_unpause)
DOMID_OP(shutdown, libxl_domain_shutdown)
DOMID_OP(reboot, libxl_domain_reboot)
DOMID_OP(destroy, libxl_domain_destroy)

int bmi_xen_set_memory(bmi_xen *x, uint32_t domid, uint64_t target_kb)
{
    err_reset(x);
    return libxl_set_memory_target(x->ctx, domid, (int64_t)target_kb, 0, 1);
}

int bmi_xen_set_maxmem(bmi_xen *x, uint32_t domid, uint64_t max_kb)
{
    err_reset(x);
    return libxl_domain_setmaxmem(x->ctx, domid, max_kb);
}

int bmi_xen_memory_target(bmi_xen *x, uint32_t domid, uint64_t *target_kb)
{
    err_reset(x);
    return libxl_get_memory_target(x->ctx, domid, target_kb);
}

int bmi_xen_set_vcpus(bmi_xen *x, uint32_t domid, int online, int max)
{
    libxl_bitmap map;
    int rc, i;

    err_reset(x);
    if (online < 1 || online > max)
        return ERROR_INVAL;
    libxl_bitmap_init(&map);
    rc = libxl_bitmap_alloc(x->ctx, &map, max);
    if (rc)
        return rc;
    for (i = 0; i < online; i++)
        libxl_bitmap_set(&map, i);
    rc = libxl_set_vcpuonline(x->ctx, domid, &map, NULL);
    libxl_bitmap_dispose(&map);
    return rc;
}

int bmi_xen_sched_get(bmi_xen *x, uint32_t domid, int *sched, int *weight, int *cap)
{
    libxl_domain_sched_params p;
    int rc;

    err_reset(x);
    libxl_domain_sched_params_init(&p);
    rc = libxl_domain_sched_params_get(x->ctx, domid, &p);
    if (!rc) {
        *sched = p.sched;
        *weight = p.weight;
        *cap = p.cap;
    }
    libxl_domain_sched_params_dispose(&p);
    return rc;
}

int bmi_xen_sched_set(bmi_xen *x, uint32_t domid, int weight, int cap)
{
    libxl_domain_sched_params p;
    int rc;

    err_reset(x);
    libxl_domain_sched_params_init(&p);     /* every field "unchanged" ... */
    if (weight >= 0)
        p.weight = weight;                  /* ... except what we set */
    if (cap >= 0)
        p.cap = cap;
    rc = libxl_domain_sched_params_set(x->ctx, domid, &p);
    libxl_domain_sched_params_dispose(&p);
    return rc;
}

static int state_of(const libxl_dominfo *i)
{
    if (i->dying)
        return BMI_XEN_DYING;
    if (i->shutdown)
        return BMI_XEN_SHUTDOWN;
    if (i->paused)
        return BMI_XEN_PAUSED;
    return i->running ? BMI_XEN_RUNNING : BMI_XEN_BLOCKED;
}

int bmi_xen_info(bmi_xen *x, uint32_t domid, int *state, int *reason, uint64_t *current_kb,
                 uint64_t *max_kb, int *vcpus_online, uint64_t *cpu_ns)
{
    libxl_dominfo info;
    int rc;

    err_reset(x);
    libxl_dominfo_init(&info);
    rc = libxl_domain_info(x->ctx, &info, domid);
    if (!rc) {
        *state = state_of(&info);
        *reason = info.shutdown ? (int)info.shutdown_reason : -1;
        *current_kb = info.current_memkb;
        *max_kb = info.max_memkb;
        *vcpus_online = (int)info.vcpu_online;
        *cpu_ns = info.cpu_time;
    }
    libxl_dominfo_dispose(&info);
    return rc;
}

/* The domain's UUID (16 bytes): with the domid it names one domain, never a recycled domid. */
int bmi_xen_uuid(bmi_xen *x, uint32_t domid, uint8_t *uuid16)
{
    libxl_dominfo info;
    int rc;

    err_reset(x);
    libxl_dominfo_init(&info);
    rc = libxl_domain_info(x->ctx, &info, domid);
    if (!rc)
        memcpy(uuid16, libxl_uuid_bytearray(&info.uuid), 16);
    libxl_dominfo_dispose(&info);
    return rc;
}

int bmi_xen_list(bmi_xen *x, uint32_t *domids, int *states, int max)
{
    libxl_dominfo *all;
    int n, i;

    err_reset(x);
    all = libxl_list_domain(x->ctx, &n);
    if (!all)
        return ERROR_FAIL;
    for (i = 0; i < n && i < max; i++) {
        domids[i] = all[i].domid;
        states[i] = state_of(&all[i]);
    }
    libxl_dominfo_list_free(all, n);
    return n;
}

int bmi_xen_console_tty(bmi_xen *x, uint32_t domid, char *buf, size_t len)
{
    char *path = NULL;
    int rc;

    err_reset(x);
    rc = libxl_console_get_tty(x->ctx, domid, 0, LIBXL_CONSOLE_TYPE_PV, &path);
    if (!rc) {
        if (strlen(path) >= len)
            rc = ERROR_BUFFERFULL;
        else
            strcpy(buf, path);
    }
    free(path);
    return rc;
}

/* -- xenstore ------------------------------------------------------------------------- */

char *bmi_xs_read(bmi_xen *x, const char *path, unsigned int *len, int *err)
{
    char *v = xs_read(x->xs, XBT_NULL, path, len);
    *err = v ? 0 : -errno;
    return v;
}

int bmi_xs_write(bmi_xen *x, const char *path, const char *data, unsigned int len)
{
    return xs_write(x->xs, XBT_NULL, path, data, len) ? 0 : -errno;
}

char *bmi_xs_directory(bmi_xen *x, const char *path, unsigned int *bytes, int *err)
{
    unsigned int n, i;
    size_t total = 0;
    char **names = xs_directory(x->xs, XBT_NULL, path, &n);
    char *blob, *p;

    if (!names) {
        *err = -errno;
        return NULL;
    }
    for (i = 0; i < n; i++)
        total += strlen(names[i]) + 1;
    blob = malloc(total + 1);
    if (!blob) {
        free(names);
        *err = -ENOMEM;
        return NULL;
    }
    for (p = blob, i = 0; i < n; i++)
        p = stpcpy(p, names[i]) + 1;
    free(names);
    *bytes = (unsigned int)total;
    *err = 0;
    return blob;
}

int bmi_xs_mkdir(bmi_xen *x, const char *path)
{
    return xs_mkdir(x->xs, XBT_NULL, path) ? 0 : -errno;
}

int bmi_xs_rm(bmi_xen *x, const char *path)
{
    return xs_rm(x->xs, XBT_NULL, path) ? 0 : -errno;
}

int bmi_xs_set_perms(bmi_xen *x, const char *path, const unsigned int *domids, const int *perms,
                     unsigned int n)
{
    struct xs_permissions p[MAX_PERMS];
    unsigned int i;

    if (n == 0 || n > MAX_PERMS)
        return -EINVAL;
    for (i = 0; i < n; i++) {
        p[i].id = domids[i];
        p[i].perms = (unsigned int)(perms[i] & (XS_PERM_READ | XS_PERM_WRITE));
    }
    return xs_set_permissions(x->xs, XBT_NULL, path, p, n) ? 0 : -errno;
}

int bmi_xs_get_perms(bmi_xen *x, const char *path, unsigned int *domids, int *perms, unsigned int max)
{
    unsigned int n, i;
    struct xs_permissions *p = xs_get_permissions(x->xs, XBT_NULL, path, &n);

    if (!p)
        return -errno;
    for (i = 0; i < n && i < max; i++) {
        domids[i] = p[i].id;
        perms[i] = (int)(p[i].perms & (XS_PERM_READ | XS_PERM_WRITE));
    }
    free(p);
    return (int)n;
}

int bmi_xs_watch(bmi_xen *x, const char *path, const char *token)
{
    return xs_watch(x->xs, path, token) ? 0 : -errno;
}

int bmi_xs_unwatch(bmi_xen *x, const char *path, const char *token)
{
    return xs_unwatch(x->xs, path, token) ? 0 : -errno;
}

int bmi_xs_fileno(bmi_xen *x)
{
    return xs_fileno(x->xs);
}

/* 1 and the event when one is queued, 0 when none is, -errno on failure. */
int bmi_xs_check_watch(bmi_xen *x, char *path, size_t plen, char *token, size_t tlen)
{
    char **ev = xs_check_watch(x->xs);

    if (!ev)
        return errno == EAGAIN ? 0 : -errno;
    snprintf(path, plen, "%s", ev[XS_WATCH_PATH]);
    snprintf(token, tlen, "%s", ev[XS_WATCH_TOKEN]);
    free(ev);
    return 1;
}
