/* Device nodes into and out of a running PD's /dev, from the manager's side (csrc/devices.c). */
#include <stddef.h>

/* Bind the host node `source` (a character device) on /dev/<name> inside the PD whose init is `pid`;
 * the mount point is made as host uid/gid `owner` (the PD's root: its tmpfs refuses ids it cannot map).
 * 0 on success, else an errno; err gets what failed. */
int bmi_dev_bind(int pid, int owner, const char *source, const char *name, char *err, size_t errlen);

/* Detach /dev/<name> in that PD and remove its mount point; 0 (also when it was not there), else an errno. */
int bmi_dev_unbind(int pid, int owner, const char *name, char *err, size_t errlen);
