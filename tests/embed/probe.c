/* A C toolstack for tests/embed: each subcommand drives libbmi through one scenario and prints
 * what it saw as "key=value" lines (the test asserts on them).  Exit 0 unless a call the
 * scenario expects to work failed: then "FAIL <call>: <code> <message>" and exit 1. */
#include <bmi.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char *call)
{
    printf("FAIL %s: %d %s\n", call, bmi_last_error_code(), bmi_last_error());
    exit(1);
}
#define CHECK(call) do { if ((call) < 0) fail(#call); } while (0)

/* One misuse: it must fail; print its code and message. */
static void misuse(const char *name, long rc)
{
    printf("%s rc=%ld code=%d message=%s\n", name, rc, bmi_last_error_code(), bmi_last_error());
}

static bmi_manager *open_or_fail(const char *uri)
{
    bmi_manager *m = bmi_open(uri);
    if (!m)
        fail("bmi_open");
    return m;
}

static int64_t ready_pd(bmi_manager *m, const char *image, const char *cmdline, char sha[65])
{
    int64_t pd = bmi_allocate_pd(m, 64 << 20, 1, 100);
    CHECK(pd);
    CHECK(bmi_setup_pd_file(m, pd, image, sha));
    CHECK(bmi_set_config_param(m, pd, "/boot/cmdline", cmdline));
    return pd;
}

/* run URI IMAGE CMDLINE: a PD run to completion. */
static int run(const char *uri, const char *image, const char *cmdline)
{
    char sha[65];
    bmi_manager *m = open_or_fail(uri);
    int64_t pd = ready_pd(m, image, cmdline, sha);
    CHECK(bmi_request_status_change(m, pd, BMI_STATUS_RUNNING));
    int exit_status = -2;
    int status = bmi_wait(m, pd, 30, &exit_status);
    CHECK(status);
    char *console = bmi_get_runtime_param(m, pd, "/console/log");
    if (!console)
        fail("bmi_get_runtime_param");
    char *cmd = bmi_get_config_param(m, pd, "/boot/cmdline");
    if (!cmd)
        fail("bmi_get_config_param");
    int64_t ids[1];
    int count = bmi_list_pd(m, ids, 1);
    printf("version=%u\nsha256=%s\nstatus=%d\nexit=%d\nlisted=%d first=%lld\ncmdline=%s\nconsole=%s\n",
           bmi_get_version(m), sha, status, exit_status, count, (long long)ids[0], cmd, console);
    bmi_free(console);
    bmi_free(cmd);
    CHECK(bmi_destroy(m, pd));
    int after = bmi_get_current_status(m, pd);
    printf("after_destroy=%d code=%d\n", after, bmi_last_error_code());
    bmi_close(m);
    return 0;
}

/* errors DYNAMIC_ELF: each error code reached by a real misuse. */
static int errors(const char *dynamic_elf)
{
    misuse("bad_uri", (long)(bmi_open("nosuch:///session") != NULL) - 1);
    bmi_manager *m = open_or_fail("linux:///session");
    int64_t pd = bmi_allocate_pd(m, 64 << 20, 1, 100);
    CHECK(pd);
    misuse("priority_11", bmi_set_priority(m, pd, 11));
    misuse("unknown_pd", bmi_get_current_status(m, 4242));
    misuse("run_before_setup", bmi_request_status_change(m, pd, BMI_STATUS_RUNNING));
    misuse("dynamic_elf", bmi_setup_pd_file(m, pd, dynamic_elf, NULL));
    misuse("tiny_pd", bmi_allocate_pd(m, 4096, 1, 100));
    misuse("null_manager", bmi_get_current_status(NULL, pd));
    CHECK(bmi_set_priority(m, pd, -3));
    int priority = 99;
    CHECK(bmi_get_priority(m, pd, &priority));
    printf("priority=%d\n", priority);
    bmi_close(m);
    misuse("closed_manager", bmi_get_current_status(m, pd));
    return 0;
}

static const char *g_image;
static uint64_t file_size(void *ctx) { FILE *f = ctx; fseek(f, 0, SEEK_END); return (uint64_t)ftell(f); }
static int64_t file_data(void *ctx, uint64_t offset, void *buf, size_t len)
{
    FILE *f = ctx;
    if (fseek(f, (long)offset, SEEK_SET))
        return -1;
    return (int64_t)fread(buf, 1, len, f);
}
static int64_t broken_data(void *ctx, uint64_t offset, void *buf, size_t len) { (void)ctx; (void)offset; (void)buf; (void)len; return -1; }

/* images IMAGE: the same image by file, buffer and callback; and a callback that fails. */
static int images(const char *image)
{
    char a[65], b[65], c[65];
    bmi_manager *m = open_or_fail(NULL);
    FILE *f = fopen(image, "rb");
    size_t size = (size_t)file_size(f);
    char *data = malloc(size);
    fseek(f, 0, SEEK_SET);
    if (fread(data, 1, size, f) != size)
        return 1;
    int64_t pd = bmi_allocate_pd(m, 64 << 20, 1, 100);
    CHECK(pd);
    CHECK(bmi_setup_pd_file(m, pd, image, a));
    CHECK(bmi_setup_pd_buffer(m, pd, data, size, b));
    CHECK(bmi_setup_pd_callback(m, pd, file_size, file_data, f, c));
    printf("file=%s\nbuffer=%s\ncallback=%s\n", a, b, c);
    misuse("broken_callback", bmi_setup_pd_callback(m, pd, file_size, broken_data, f, c));
    free(data);
    fclose(f);
    bmi_close(m);
    return 0;
}

/* attest IMAGE FOREIGN_PEM: report, verify with the pinned key; then a wrong nonce and a foreign key. */
static int attest(const char *image, const char *foreign_pem)
{
    char sha[65], *pem = NULL, *fingerprint = NULL, *report = NULL;
    const char nonce[] = "fresh-nonce-1234";
    bmi_manager *m = open_or_fail("linux:///session");
    int64_t pd = ready_pd(m, image, "busybox true", sha);
    CHECK(bmi_get_attestation_key(m, &pem, &fingerprint));
    CHECK(bmi_get_integrity_link(m, pd, nonce, sizeof nonce - 1, &report));
    printf("fingerprint=%s\n", fingerprint);
    printf("by_fingerprint=%d\n", bmi_verify_report(report, nonce, sizeof nonce - 1, sha, fingerprint));
    printf("by_pem=%d\n", bmi_verify_report(report, nonce, sizeof nonce - 1, sha, pem));
    misuse("wrong_nonce", bmi_verify_report(report, "other", 5, sha, fingerprint));
    misuse("foreign_key", bmi_verify_report(report, nonce, sizeof nonce - 1, sha, foreign_pem));
    misuse("other_digest", bmi_verify_report(report, nonce, sizeof nonce - 1,
                                             "00000000000000000000000000000000000000000000000000000000000000ff", pem));
    bmi_free(pem);
    bmi_free(fingerprint);
    bmi_free(report);
    bmi_close(m);
    return 0;
}

/* threads: 4 threads on one manager at once, each with its own last error. */
static bmi_manager *g_mgr;
static void *worker(void *arg)
{
    long n = (long)arg, bad = 1000 + n;
    char sha[65], expect[64];
    for (int round = 0; round < 5; round++) {
        int64_t pd = bmi_allocate_pd(g_mgr, 16 << 20, 1, 100);
        if (pd < 0 || bmi_setup_pd_file(g_mgr, pd, g_image, sha) < 0)
            return "setup failed";
        if (bmi_get_current_status(g_mgr, bad) != -1 || bmi_last_error_code() != BMI_E_NO_SUCH_DOMAIN)
            return "no error for an unknown PD";
        snprintf(expect, sizeof expect, "PD %ld does not exist", bad);
        if (bmi_get_current_status(g_mgr, pd) != BMI_STATUS_READY)   /* a success leaves the error alone */
            return "not READY";
        if (!strstr(bmi_last_error(), expect))
            return "another thread's error";
        if (bmi_destroy(g_mgr, pd) < 0)
            return "destroy failed";
    }
    return NULL;
}
static int threads(const char *image)
{
    pthread_t t[4];
    g_image = image;
    g_mgr = open_or_fail(NULL);
    for (long i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, worker, (void *)i);
    for (int i = 0; i < 4; i++) {
        void *why;
        pthread_join(t[i], &why);
        printf("thread%d=%s\n", i, why ? (char *)why : "ok");
    }
    int64_t ids[8];
    printf("left=%d\n", bmi_list_pd(g_mgr, ids, 8));
    printf("main_thread_code=%d\n", bmi_last_error_code());
    bmi_close(g_mgr);
    return 0;
}

/* connections: allow PD 1 towards PD 2, then two malformed policies. */
static int connections(void)
{
    bmi_manager *m = open_or_fail(NULL);
    int64_t a = bmi_allocate_pd(m, 16 << 20, 1, 100), b = bmi_allocate_pd(m, 16 << 20, 1, 100);
    int types[] = {BMI_CONN_IPC, BMI_CONN_SHM}, modes[] = {BMI_RW, BMI_READ}, bad_type[] = {9}, bad_mode[] = {7};
    CHECK(a);
    CHECK(b);
    printf("allowed=%d\n", bmi_set_allowed_connections(m, a, b, types, modes, 2, 0));
    printf("none=%d\n", bmi_set_allowed_connections(m, a, b, NULL, NULL, 0, 1));
    misuse("bad_type", bmi_set_allowed_connections(m, a, b, bad_type, modes, 1, 0));
    misuse("bad_mode", bmi_set_allowed_connections(m, a, b, types, bad_mode, 1, 0));
    misuse("to_itself", bmi_set_allowed_connections(m, a, a, types, modes, 1, 0));
    bmi_close(m);
    return 0;
}

/* keep URI IMAGE CMDLINE: start a PD and exit without bmi_destroy or bmi_close. */
static int keep(const char *uri, const char *image, const char *cmdline)
{
    char sha[65];
    bmi_manager *m = open_or_fail(uri);
    int64_t pd = ready_pd(m, image, cmdline, sha);
    CHECK(bmi_request_status_change(m, pd, BMI_STATUS_RUNNING));
    printf("pd=%lld\nsha256=%s\n", (long long)pd, sha);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv)
{
    const char *cmd = argc > 1 ? argv[1] : "";
    if (!strcmp(cmd, "run") && argc == 5)
        return run(argv[2], argv[3], argv[4]);
    if (!strcmp(cmd, "errors") && argc == 3)
        return errors(argv[2]);
    if (!strcmp(cmd, "images") && argc == 3)
        return images(argv[2]);
    if (!strcmp(cmd, "attest") && argc == 4)
        return attest(argv[2], argv[3]);
    if (!strcmp(cmd, "threads") && argc == 3)
        return threads(argv[2]);
    if (!strcmp(cmd, "connections") && argc == 2)
        return connections();
    if (!strcmp(cmd, "keep") && argc == 5)
        return keep(argv[2], argv[3], argv[4]);
    fprintf(stderr, "usage: probe run|errors|images|attest|threads|connections|keep ...\n");
    return 2;
}
