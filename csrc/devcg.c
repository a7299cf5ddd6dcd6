/* The cgroup v2 device check: a BPF_PROG_TYPE_CGROUP_DEVICE program on the PD's cgroup.
 *
 * cgroup v2 has no devices.allow file; the kernel instead runs the BPF
 * device programs attached to the opener's cgroup (and its ancestors) at
 * every open and mknod of a device node.  The program is assembled here
 * from the PD's rules, instruction by instruction (no libbpf, no clang):
 * it allows an access when one rule matches the node's type, major and
 * minor and holds every access bit asked for, and denies all else.
 *
 * A rule change attaches a new program first (BPF_F_ALLOW_MULTI: all
 * attached programs must allow) and then detaches every other device
 * program of that cgroup, so there is no moment without a check, and a
 * manager that restarted (and never held the old program's fd) replaces
 * what it finds.
 */
#define _GNU_SOURCE
#include "devices.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_INSNS (7 + 8 * BMI_DEVCG_MAX_RULES + 2)

static long sys_bpf(int cmd, union bpf_attr *attr)
{
    return syscall(SYS_bpf, cmd, attr, sizeof *attr);
}

static struct bpf_insn insn(uint8_t code, uint8_t dst, uint8_t src, int16_t off, int32_t imm)
{
    struct bpf_insn i = {.code = code, .dst_reg = dst, .src_reg = src, .off = off, .imm = imm};
    return i;
}

/* r<dst> = *(u32 *)(ctx + off) */
#define LOAD_CTX(dst, off) insn(BPF_LDX | BPF_MEM | BPF_W, dst, 1, off, 0)
/* if r<reg> != imm: skip `n` instructions */
#define SKIP_UNLESS(reg, imm, n) insn(BPF_JMP | BPF_JNE | BPF_K, reg, 0, n, imm)
#define RETURN(v) insn(BPF_ALU64 | BPF_MOV | BPF_K, 0, 0, 0, v), insn(BPF_JMP | BPF_EXIT, 0, 0, 0, 0)

/* The program for `n` rules; returns its length. */
static int assemble(const struct bmi_devcg_rule *rules, int n, struct bpf_insn *out)
{
    int len = 0;
    /* struct bpf_cgroup_dev_ctx: access_type = (access << 16) | type, then major, minor */
    out[len++] = LOAD_CTX(2, 0);
    out[len++] = insn(BPF_ALU | BPF_AND | BPF_K, 2, 0, 0, 0xffff);    /* r2: BPF_DEVCG_DEV_CHAR/BLOCK */
    out[len++] = LOAD_CTX(3, 0);
    out[len++] = insn(BPF_ALU | BPF_RSH | BPF_K, 3, 0, 0, 16);        /* r3: BPF_DEVCG_ACC_* asked for */
    out[len++] = LOAD_CTX(4, 4);                                      /* r4: major */
    out[len++] = LOAD_CTX(5, 8);                                      /* r5: minor */
    for (int r = 0; r < n; r++) {
        const struct bmi_devcg_rule *rule = &rules[r];
        int any_major = rule->major == BMI_DEVCG_ANY, any_minor = rule->minor == BMI_DEVCG_ANY;
        /* what follows each test up to the rule's end: 2 (access) + 2 (return) + the id tests left */
        int rest = 4 + !any_major + !any_minor;
        out[len++] = SKIP_UNLESS(2, (int32_t)rule->type, rest + 1);
        out[len++] = insn(BPF_ALU | BPF_MOV | BPF_X, 1, 3, 0, 0);
        out[len++] = insn(BPF_ALU | BPF_AND | BPF_K, 1, 0, 0, (int32_t)(~rule->access & 7u));
        out[len++] = SKIP_UNLESS(1, 0, rest - 2);      /* an access bit the rule does not give */
        rest -= 2;
        if (!any_major) out[len++] = SKIP_UNLESS(4, (int32_t)rule->major, --rest);
        if (!any_minor) out[len++] = SKIP_UNLESS(5, (int32_t)rule->minor, --rest);
        out[len++] = insn(BPF_ALU64 | BPF_MOV | BPF_K, 0, 0, 0, 1);
        out[len++] = insn(BPF_JMP | BPF_EXIT, 0, 0, 0, 0);
    }
    struct bpf_insn deny[] = {RETURN(0)};
    memcpy(out + len, deny, sizeof deny);
    return len + 2;
}

int bmi_devcg_load(const struct bmi_devcg_rule *rules, int n, char *err, size_t errlen)
{
    if (n < 0 || n > BMI_DEVCG_MAX_RULES) {
        snprintf(err, errlen, "%d device rules: at most %d fit one program", n, BMI_DEVCG_MAX_RULES);
        return -E2BIG;
    }
    struct bpf_insn prog[MAX_INSNS];
    int len = assemble(rules, n, prog);
    char log[4096];
    log[0] = 0;
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.prog_type = BPF_PROG_TYPE_CGROUP_DEVICE;
    attr.expected_attach_type = BPF_CGROUP_DEVICE;
    attr.insns = (uint64_t)(uintptr_t)prog;
    attr.insn_cnt = (uint32_t)len;
    attr.license = (uint64_t)(uintptr_t)"Apache-2.0";    /* calls no GPL-only helper */
    attr.log_buf = (uint64_t)(uintptr_t)log;
    attr.log_size = sizeof log;
    attr.log_level = 1;
    snprintf(attr.prog_name, sizeof attr.prog_name, "bmi_devices");
    int fd = (int)sys_bpf(BPF_PROG_LOAD, &attr);
    if (fd < 0) {
        int e = errno;
        snprintf(err, errlen, "loading the BPF device program (bpf BPF_PROG_LOAD): %s%s%.160s", strerror(e),
                 log[0] ? "; verifier: " : "", log);
        return -e;
    }
    return fd;
}

static uint32_t prog_id(int fd)
{
    struct bpf_prog_info info;
    memset(&info, 0, sizeof info);
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.info.bpf_fd = (uint32_t)fd;
    attr.info.info_len = sizeof info;
    attr.info.info = (uint64_t)(uintptr_t)&info;
    return sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &attr) ? 0 : info.id;
}

static int detach(int cgroup_fd, int prog_fd)
{
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.target_fd = (uint32_t)cgroup_fd;
    attr.attach_bpf_fd = (uint32_t)prog_fd;
    attr.attach_type = BPF_CGROUP_DEVICE;
    return (int)sys_bpf(BPF_PROG_DETACH, &attr);
}

int bmi_devcg_attach(int cgroup_fd, int prog_fd, char *err, size_t errlen)
{
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.target_fd = (uint32_t)cgroup_fd;
    attr.attach_bpf_fd = (uint32_t)prog_fd;
    attr.attach_type = BPF_CGROUP_DEVICE;
    attr.attach_flags = BPF_F_ALLOW_MULTI;
    if (sys_bpf(BPF_PROG_ATTACH, &attr)) {
        int e = errno;
        snprintf(err, errlen, "attaching the BPF device program to the cgroup (bpf BPF_PROG_ATTACH): %s",
                 strerror(e));
        return e;
    }
    uint32_t ours = prog_id(prog_fd), ids[64];
    memset(&attr, 0, sizeof attr);
    attr.query.target_fd = (uint32_t)cgroup_fd;
    attr.query.attach_type = BPF_CGROUP_DEVICE;
    attr.query.prog_ids = (uint64_t)(uintptr_t)ids;
    attr.query.prog_cnt = sizeof ids / sizeof ids[0];
    if (ours == 0 || sys_bpf(BPF_PROG_QUERY, &attr)) {
        int e = errno ? errno : EIO;
        detach(cgroup_fd, prog_fd);
        snprintf(err, errlen, "listing the cgroup's device programs (bpf BPF_PROG_QUERY): %s", strerror(e));
        return e;
    }
    for (uint32_t i = 0; i < attr.query.prog_cnt && i < sizeof ids / sizeof ids[0]; i++) {
        if (ids[i] == ours) continue;
        union bpf_attr get;
        memset(&get, 0, sizeof get);
        get.prog_id = ids[i];
        int old = (int)sys_bpf(BPF_PROG_GET_FD_BY_ID, &get);
        if (old < 0 && errno == ENOENT) continue;      /* detached meanwhile */
        int e = old < 0 || detach(cgroup_fd, old) ? errno : 0;
        if (old >= 0) close(old);
        if (e && e != ENOENT) {
            snprintf(err, errlen, "detaching the cgroup's previous device program %u: %s", ids[i], strerror(e));
            return e;
        }
    }
    return 0;
}
