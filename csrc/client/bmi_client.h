/* bmi_client: the PD side of the BMI channel in C (no dependencies beyond libc).
 *
 * A PD started by bmi inherits one AF_UNIX SOCK_SEQPACKET socket named by
 * $BMI_CHANNEL_FD (fd 3 on Linux).  Each call sends one JSON-RPC 2.0 request
 * and reads one reply; fds travel as SCM_RIGHTS.  docs/protocol.md is the
 * reference.  Not thread-safe: one call at a time per channel.
 *
 * Return values: 0 on success; a JSON-RPC error code (< -32000, e.g.
 * BMI_E_PERMISSION) when the layer refused, with its message in `out`;
 * BMI_E_IO when the channel itself failed (errno says why).
 */
#ifndef BMI_CLIENT_H
#define BMI_CLIENT_H

#include <stddef.h>

#define BMI_E_IO            (-1)
#define BMI_E_PARSE         (-32700)
#define BMI_E_REQUEST       (-32600)
#define BMI_E_METHOD        (-32601)
#define BMI_E_PARAMS        (-32602)
#define BMI_E_INTERNAL      (-32603)
#define BMI_E_BMI           (-32000)
#define BMI_E_INVALID       (-32001)
#define BMI_E_STATE         (-32002)
#define BMI_E_NO_DOMAIN     (-32003)
#define BMI_E_PERMISSION    (-32004)
#define BMI_E_NOT_SUPPORTED (-32005)
#define BMI_E_RESOURCE      (-32006)
#define BMI_E_IMAGE         (-32007)
#define BMI_E_INTEGRITY     (-32008)
#define BMI_E_DRIVER        (-32009)
#define BMI_E_BUSY          (-32011)

#define BMI_READ  1
#define BMI_WRITE 2
#define BMI_RW    3

/* The channel fd from $BMI_CHANNEL_FD, or -1 if this process is no PD. */
int bmi_channel_fd(void);

/* One request.  params: a JSON object text ("{}" for none).  fd_in: an fd to
 * pass (-1: none).  out/cap: the result's JSON text (or the error message).
 * *fd_out (may be NULL): an fd the layer passed back, else -1. */
int bmi_call(int chan, const char *method, const char *params, int fd_in,
             char *out, size_t cap, int *fd_out);

/* connect(tid, "IPC"|"STREAM"|"SHM"|"EVENT", mode, size for SHM else 0) -> *fd */
int bmi_connect(int chan, int tid, const char *type, int mode, unsigned long size, int *fd);

/* accept: timeout_ms < 0 waits forever.  Returns 0 with *fd set, 1 on timeout. */
int bmi_accept(int chan, long timeout_ms, int *peer, char *type, size_t type_cap, int *mode, int *fd);

/* This PD's id (get_controller with no id), or < 0 as above. */
int bmi_my_id(int chan);

/* get_config_param on this PD: the value, unescaped, in out. */
int bmi_pd_get_config_param(int chan, const char *name, char *out, size_t cap);

/* get_runtime_param on this PD. */
int bmi_pd_get_runtime_param(int chan, const char *name, char *out, size_t cap);

/* Helpers for result texts: the integer / string member `key` of a flat JSON object. */
int bmi_json_int(const char *json, const char *key, long *value);
int bmi_json_str(const char *json, const char *key, char *out, size_t cap);

#endif
