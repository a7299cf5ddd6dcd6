/* Device nodes into and out of a running PD's /dev, from the manager's side (csrc/devices.c). */
#include <stddef.h>

/* Bind the host node `source` (a character device) on /dev/<name> inside the PD whose init is `pid`;
 * the mount point is made as host uid/gid `owner` (the PD's root: its tmpfs refuses ids it cannot map).
 * 0 on success, else an errno; err gets what failed. */
int bmi_dev_bind(int pid, int owner, const char *source, const char *name, char *err, size_t errlen);

/* Detach /dev/<name> in that PD and remove its mount point; 0 (also when it was not there), else an errno. */
int bmi_dev_unbind(int pid, int owner, const char *name, char *err, size_t errlen);

/* The cgroup v2 device check (csrc/devcg.c): one rule allows `access` (BPF_DEVCG_ACC_MKNOD 1, READ 2,
 * WRITE 4) to nodes of `type` (BPF_DEVCG_DEV_BLOCK 1, CHAR 2) with that major and minor (BMI_DEVCG_ANY: any). */
struct bmi_devcg_rule { unsigned int type, major, minor, access; };
#define BMI_DEVCG_ANY 0xffffffff
#define BMI_DEVCG_MAX_RULES 256

/* Load the BPF_PROG_TYPE_CGROUP_DEVICE program that allows exactly `rules`: its fd, else -errno (err says why). */
int bmi_devcg_load(const struct bmi_devcg_rule *rules, int n, char *err, size_t errlen);

/* Attach the program `prog_fd` to the cgroup v2 directory `cgroup_fd`, then detach every other device
 * program attached there: 0, else an errno (the cgroup keeps what it had when the attach failed). */
int bmi_devcg_attach(int cgroup_fd, int prog_fd, char *err, size_t errlen);
