/* A toolstack in C over libbmi: a measured PD, run, attested and verified.
 *     cc examples/toolstack.c $(pkg-config --cflags --libs bmi) -o toolstack && ./toolstack [IMAGE]
 * IMAGE: a static executable (default: busybox-static's /bin/busybox). */
#include <bmi.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/random.h>

static int die(const char *what)
{
    fprintf(stderr, "toolstack: %s: %s (%d)\n", what, bmi_last_error(), bmi_last_error_code());
    exit(1);
}

int main(int argc, char **argv)
{
    const char *image = argc > 1 ? argv[1] : "/bin/busybox";
    char digest[65], *console, *pem, *fingerprint, *report;
    unsigned char nonce[32];
    int exit_status;

    bmi_manager *mgr = bmi_open(NULL);                    /* $BMI_URI or linux:///session */
    if (!mgr)
        die("open");
    int64_t pd = bmi_allocate_pd(mgr, 32 << 20, 1, 100);
    if (pd < 0)
        die("allocate");
    if (bmi_setup_pd_file(mgr, pd, image, digest) < 0)   /* copied and measured in one pass */
        die("setup");
    printf("PD %lld measured sha256:%s\n", (long long)pd, digest);
    if (bmi_set_config_param(mgr, pd, "/boot/cmdline", "busybox echo hello from a PD") < 0 ||
        bmi_request_status_change(mgr, pd, BMI_STATUS_RUNNING) < 0)
        die("start");
    if (bmi_wait(mgr, pd, 30, &exit_status) < 0 || !(console = bmi_get_runtime_param(mgr, pd, "/console/log")))
        die("wait");
    printf("exit status %d, console: %s", exit_status, console);
    bmi_free(console);

    /* A verifier pins the attestation key beforehand, then checks a fresh report offline. */
    if (bmi_get_attestation_key(mgr, &pem, &fingerprint) < 0)
        die("attestation key");
    if (getrandom(nonce, sizeof nonce, 0) != sizeof nonce)
        return 1;
    if (bmi_get_integrity_link(mgr, pd, nonce, sizeof nonce, &report) < 0)
        die("integrity link");
    if (bmi_verify_report(report, nonce, sizeof nonce, digest, fingerprint) < 0)
        die("verify");
    printf("attested by %s: sha256:%s\n", fingerprint, digest);
    bmi_free(pem);
    bmi_free(fingerprint);
    bmi_free(report);

    if (bmi_destroy(mgr, pd) < 0)
        die("destroy");
    bmi_close(mgr);
    return 0;
}
