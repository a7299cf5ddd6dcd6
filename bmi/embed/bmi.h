/* libbmi: the OpenTC Basic Management Interface (BMI v0.1) as a C library.
 *
 * The spec's calls (section 7) with bmi_* names.  The implementation is
 * bmi's Python, embedded by cffi: the first call starts the interpreter
 * (see README "C library (libbmi)").  Build with
 *     cc tool.c $(pkg-config --cflags --libs bmi)
 *
 * Errors: a call returns 0 (or a valid value) on success and -1 (or NULL)
 * on failure; bmi_last_error_code() and bmi_last_error() then say which
 * error and why.  Both are per thread and are left alone by successful
 * calls.  The codes are the PD protocol's JSON-RPC error codes, so this
 * header and the PD client's (bmi_client.h) agree and can be included
 * together.
 *
 * Thread safety: any call from any thread; calls on one manager are
 * serialised where the layer needs it.  PDs of a linux:///session manager
 * die with the process, bmi_close or not.
 */
#ifndef BMI_H
#define BMI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Error codes (bmi.errors classes; the same values as bmi_client.h). */
#define BMI_E_OK                  0
#define BMI_E_BMI                 (-32000)  /* a bmi error of no more specific kind */
#define BMI_E_INVALID_ARGUMENT    (-32001)  /* an argument is out of range or malformed */
#define BMI_E_INVALID_STATE       (-32002)  /* the PD is not in a state where the call makes sense */
#define BMI_E_NO_SUCH_DOMAIN      (-32003)  /* no PD has that id (any more) */
#define BMI_E_PERMISSION_DENIED   (-32004)  /* the caller may not do this to that PD */
#define BMI_E_NOT_SUPPORTED       (-32005)  /* the driver cannot do this */
#define BMI_E_RESOURCE            (-32006)  /* no memory, CPUs or kernel object to be had */
#define BMI_E_IMAGE               (-32007)  /* the image misbehaved or is not a format the driver runs */
#define BMI_E_INTEGRITY           (-32008)  /* a measurement, quote or sealed blob failed a check */
#define BMI_E_DRIVER_UNAVAILABLE  (-32009)  /* the URI's driver cannot work on this machine */
#define BMI_E_INTERNAL            (-32603)  /* not a bmi error: a bug; the message names it */

/* PD states (bmi.PDStatus, spec 7.2.4). */
#define BMI_STATUS_ALLOCATED   1
#define BMI_STATUS_READY       2
#define BMI_STATUS_RUNNING     3
#define BMI_STATUS_PAUSED      4
#define BMI_STATUS_SUSPENDED   5
#define BMI_STATUS_SHUTDOWN    6
#define BMI_STATUS_CRASHED     7
#define BMI_STATUS_RESTARTING  8
#define BMI_STATUS_DESTROYED   9

/* Connection types (bmi.ConnectionType) and modes (the same as bmi_client.h). */
#define BMI_CONN_IPC     1
#define BMI_CONN_STREAM  2
#define BMI_CONN_SHM     3
#define BMI_CONN_EVENT   4
#define BMI_READ  1
#define BMI_WRITE 2
#define BMI_RW    3

/* A manager of PDs (spec 7.1): opaque; valid until bmi_close. */
typedef struct bmi_manager bmi_manager;

/* The code of this thread's last failed call (BMI_E_*), BMI_E_OK if none failed yet. */
int bmi_last_error_code(void);

/* The message of this thread's last failed call ("" if none): what was asked,
 * of which PD, and why.  Valid until this thread's next failing call. */
const char *bmi_last_error(void);

/* Frees a string or buffer a bmi_* call returned (NULL is fine). */
void bmi_free(void *p);

/* Opens a manager: uri as bmi.open takes it ("linux:///session",
 * "linux:///system", ...); NULL means $BMI_URI, else linux:///session.
 * NULL on failure (BMI_E_INVALID_ARGUMENT for an unknown URI). */
bmi_manager *bmi_open(const char *uri);

/* Closes the manager; in session mode this destroys its PDs.  NULL is fine. */
void bmi_close(bmi_manager *mgr);

/* The BMI version (0x00000001: major in the high 16 bits); 0 on failure. */
uint32_t bmi_get_version(bmi_manager *mgr);

/* Allocates a PD (spec 7.1.2): mem_bytes of memory, cpus CPUs, performance
 * the percent (1..100) of them it may use.  Its id (> 0), or -1. */
int64_t bmi_allocate_pd(bmi_manager *mgr, uint64_t mem_bytes, uint32_t cpus, uint32_t performance);

/* Fills ids[0..capacity) with the PD ids, 0 (the manager's own) first.
 * Returns how many there are, even when more than capacity; -1 on failure. */
int bmi_list_pd(bmi_manager *mgr, int64_t *ids, size_t capacity);

/* Loads and measures the PD's image (spec 7.2.7) from a host file.  On
 * success sha256_hex (may be NULL) holds the image's SHA-256 in hex. */
int bmi_setup_pd_file(bmi_manager *mgr, int64_t pd, const char *path, char sha256_hex[65]);

/* The same from len bytes at data (copied before the call returns). */
int bmi_setup_pd_buffer(bmi_manager *mgr, int64_t pd, const void *data, size_t len, char sha256_hex[65]);

/* The same pulling the image through the spec's PDImage: get_size(ctx)
 * gives its size, get_data(ctx, offset, buf, len) writes up to len bytes
 * at offset into buf and returns how many, or -1 (BMI_E_IMAGE then). */
int bmi_setup_pd_callback(bmi_manager *mgr, int64_t pd, uint64_t (*get_size)(void *ctx),
                          int64_t (*get_data)(void *ctx, uint64_t offset, void *buf, size_t len),
                          void *ctx, char sha256_hex[65]);

/* Sets a configuration parameter read at start (spec 7.2.8), e.g. "/boot/cmdline". */
int bmi_set_config_param(bmi_manager *mgr, int64_t pd, const char *name, const char *value);

/* A configuration parameter's value (bmi_free it), or NULL. */
char *bmi_get_config_param(bmi_manager *mgr, int64_t pd, const char *name);

/* Sets a runtime parameter (spec 7.2.9), e.g. "/system/memory/current". */
int bmi_set_runtime_param(bmi_manager *mgr, int64_t pd, const char *name, const char *value);

/* A runtime parameter's value (bmi_free it), or NULL; "/console/log" is the PD's console. */
char *bmi_get_runtime_param(bmi_manager *mgr, int64_t pd, const char *name);

/* Sets the PD's priority, -10..10 (spec 7.2.2; higher runs more). */
int bmi_set_priority(bmi_manager *mgr, int64_t pd, int priority);

/* Stores the PD's priority in *priority. */
int bmi_get_priority(bmi_manager *mgr, int64_t pd, int *priority);

/* Asks for a new state, a BMI_STATUS_* (spec 7.2.4): RUNNING starts a READY PD. */
int bmi_request_status_change(bmi_manager *mgr, int64_t pd, int status);

/* The PD's state, a BMI_STATUS_*, or -1. */
int bmi_get_current_status(bmi_manager *mgr, int64_t pd);

/* Waits until the PD's program ends or timeout_s seconds passed (< 0: no
 * limit).  Returns the PD's state then, or -1; *exit_status (may be NULL)
 * is the program's exit code, or -1 when it was killed or still runs. */
int bmi_wait(bmi_manager *mgr, int64_t pd, double timeout_s, int *exit_status);

/* Destroys the PD (spec 7.2.5) and everything it holds. */
int bmi_destroy(bmi_manager *mgr, int64_t pd);

/* Replaces the connections the PD may open towards peer (spec 7.2.6): n
 * pairs of a BMI_CONN_* type and a BMI_READ/WRITE/RW mode; n = 0 allows
 * none.  disable_existing != 0 also cuts live connections no longer allowed. */
int bmi_set_allowed_connections(bmi_manager *mgr, int64_t pd, int64_t peer, const int *types,
                                const int *modes, size_t n, int disable_existing);

/* The layer's TPM attestation key: *pem (PEM SubjectPublicKeyInfo) and
 * *fingerprint ("sha256:<hex>"), each bmi_free'd by the caller; either
 * pointer may be NULL.  Pin one of them for bmi_verify_report. */
int bmi_get_attestation_key(bmi_manager *mgr, char **pem, char **fingerprint);

/* A TPM-signed report binding the PD's measurement to the nonce (1..64
 * bytes; spec 7.4.1), as bmi's report JSON in *report_json (bmi_free it). */
int bmi_get_integrity_link(bmi_manager *mgr, int64_t pd, const void *nonce, size_t nonce_len,
                           char **report_json);

/* Checks a report offline: signed by the pinned key ak_pem_or_fingerprint
 * (PEM or "sha256:<hex>"), over this nonce, for a PD measured
 * pd_integrity_hex.  0 when all hold; -1 with BMI_E_INTEGRITY naming the
 * failed check (BMI_E_INVALID_ARGUMENT for malformed input). */
int bmi_verify_report(const char *report_json, const void *nonce, size_t nonce_len,
                      const char *pd_integrity_hex, const char *ak_pem_or_fingerprint);

#ifdef __cplusplus
}
#endif

#endif
