/*
 * bmi-init: the PD's pid 1, a small static program the spawn shim (csrc/spawn/spawn.c) runs from a sealed
 * memfd once the manager has mapped its uids and placed it in its cgroups.  It builds the PD's root (a tmpfs
 * with proc, dev, tmp and, for a root archive, the archive unpacked through the one cpio parser,
 * csrc/cpio/cpio.c, the same code that checked it at setup_pd), installs the seccomp filter, clones the
 * program as pid 2 (landlock, capabilities dropped), then forwards signals, reaps, and reports the exit.
 * Set-up errors travel back to the manager as one fixed-size record (struct rec) on a pipe.
 */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <linux/audit.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/openat2.h>
#include <linux/seccomp.h>

#include "spawn.h"

#include "cpio.h"
#include "handoff.h"

/* ---------------------------------------------------------------- helpers */


static void copy_str(char *dst, size_t cap, const char *src, size_t n)
{
    size_t i = 0;
    for (; src && i < n && i + 1 < cap && src[i]; i++)
        dst[i] = src[i];
    dst[i] = 0;
}

static __attribute__((noreturn)) void fail_n(int fd, int kind, int err, const char *stage,
                                             const char *detail, size_t dlen)
{
    struct rec r;
    memset(&r, 0, sizeof r);
    r.kind = kind;
    r.err = err;
    copy_str(r.stage, sizeof r.stage, stage, (size_t)-1);
    copy_str(r.detail, sizeof r.detail, detail, dlen);
    ssize_t n = write(fd, &r, sizeof r);
    (void)n;
    _exit(127);
}

static __attribute__((noreturn)) void fail(int fd, int kind, const char *stage, const char *detail)
{
    fail_n(fd, kind, errno, stage, detail, (size_t)-1);
}

/* errno of a failed write/create into the PD's root: out of space is the host's limit, not the image's fault */
static int fs_kind(int err)
{
    return (err == ENOSPC || err == ENOMEM || err == EDQUOT) ? BMI_SPAWN_ERESOURCE : BMI_SPAWN_EIMAGE;
}

static char *utoa(char *p, unsigned long long v)
{
    char tmp[24];
    int n = 0;
    do tmp[n++] = (char)('0' + v % 10); while ((v /= 10));
    while (n) *p++ = tmp[--n];
    *p = 0;
    return p;
}

/* Close every fd except those listed (-1 entries ignored). */
static void reset_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    for (int s = 1; s < NSIG; s++)
        sigaction(s, &sa, NULL); /* SIGKILL/SIGSTOP/reserved ones just fail */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}


/* ---------------------------------------------------------------- confinement */

/* Handle every fs access the ABI knows and allow all of it beneath "/" except
 * creating device nodes; from ABI 6 also scope abstract unix sockets and
 * signals to the PD's program (it cannot signal its init or the host). */
static int apply_landlock(void)
{
    int abi = landlock_abi_raw();
    if (abi <= 0) return 0;
    struct bmi_ll_ruleset_attr attr = {0, 0, 0};
    size_t size = 8;
    attr.handled_access_fs = LL_FS_ABI1;
    if (abi >= 2) attr.handled_access_fs |= LL_FS_REFER;
    if (abi >= 3) attr.handled_access_fs |= LL_FS_TRUNCATE;
    if (abi >= 4) size = 16;
    if (abi >= 5) attr.handled_access_fs |= LL_FS_IOCTL_DEV;
    if (abi >= 6) {
        attr.scoped = LL_SCOPE_ABSTRACT_UNIX | LL_SCOPE_SIGNAL;
        size = 24;
    }
    int rs = (int)syscall(SYS_landlock_create_ruleset_, &attr, size, 0);
    if (rs < 0) return -1;
    struct bmi_ll_path_beneath pb;
    pb.allowed_access = attr.handled_access_fs & ~(LL_FS_MAKE_CHAR | LL_FS_MAKE_BLOCK);
    pb.parent_fd = open("/", O_PATH | O_CLOEXEC);
    int rc = -1;
    if (pb.parent_fd >= 0 &&
        syscall(SYS_landlock_add_rule_, rs, LL_RULE_PATH_BENEATH, &pb, 0) == 0 &&
        prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 &&
        syscall(SYS_landlock_restrict_self_, rs, 0) == 0)
        rc = 0;
    int e = errno;
    if (pb.parent_fd >= 0) close(pb.parent_fd);
    close(rs);
    errno = e;
    return rc;
}

static const int denied_syscalls[] = {
    SYS_ptrace, SYS_process_vm_readv, SYS_process_vm_writev, SYS_kexec_load,
    SYS_kexec_file_load, SYS_bpf, SYS_keyctl, SYS_add_key, SYS_request_key, SYS_mount,
    SYS_umount2, SYS_pivot_root, 428 /* open_tree */, 429 /* move_mount */,
    430 /* fsopen */, 431 /* fsconfig */, 432 /* fsmount */, 433 /* fspick */,
    442 /* mount_setattr */, SYS_open_by_handle_at, SYS_name_to_handle_at,
    SYS_init_module, SYS_finit_module, SYS_delete_module, SYS_perf_event_open,
    SYS_userfaultfd, SYS_setns, SYS_unshare, SYS_swapon, SYS_swapoff, SYS_reboot,
    SYS_acct, SYS_syslog, SYS_iopl, SYS_ioperm, SYS_quotactl, 443 /* quotactl_fd */,
    SYS_lookup_dcookie, SYS_chroot,
};

#define N_DENIED (sizeof denied_syscalls / sizeof denied_syscalls[0])
/* io_uring runs socket and file operations from kernel workers the filter never sees (Docker's default
 * profile blocks it too); denied unless the PD's /boot/allow lists io_uring (BMI_SPAWN_IO_URING) */
static const int io_uring_syscalls[] = {425 /* io_uring_setup */, 426 /* io_uring_enter */,
                                        427 /* io_uring_register */};
#define N_IO_URING (sizeof io_uring_syscalls / sizeof io_uring_syscalls[0])
#define SO_PASSRIGHTS_ 83   /* Linux 6.16: off on the connection ends bmi hands out, so no fd passes over them */
#define RET_ERRNO(e) BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (e))
#define LD_NR BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr))
#define LD_ARG(i) BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[i]))
#define LD_ARG0 LD_ARG(0)

static unsigned deny_each(struct sock_filter *f, unsigned n, const int *nrs, unsigned count)
{
    for (unsigned i = 0; i < count; i++) {
        f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)nrs[i], 0, 1);
        f[n++] = (struct sock_filter)RET_ERRNO(EPERM);
    }
    return n;
}

/* x86_64 only (anything else, including x32, is killed); EPERM for the
 * calls that reach kernel or host state, for io_uring unless allowed, and
 * for setsockopt(SOL_SOCKET, SO_PASSRIGHTS) (whatever the value: turning
 * fd passing back on is what it would be for); clone3 gets ENOSYS (its
 * flags are in memory, unreadable by BPF) so libc falls back to clone,
 * whose flags we can check; personality may only be queried or set to
 * PER_LINUX. */
static int apply_seccomp(int flags)
{
    struct sock_filter f[25 + 2 * (N_DENIED + N_IO_URING)];
    unsigned n = 0;
    f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch));
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS);
    f[n++] = (struct sock_filter)LD_NR;
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000u /* x32 */, 0, 1);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS);
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_setsockopt, 0, 5);
    f[n++] = (struct sock_filter)LD_ARG(1);
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SOL_SOCKET, 0, 3);
    f[n++] = (struct sock_filter)LD_ARG(2);
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SO_PASSRIGHTS_, 0, 1);
    f[n++] = (struct sock_filter)RET_ERRNO(EPERM);
    f[n++] = (struct sock_filter)LD_NR;
    n = deny_each(f, n, denied_syscalls, N_DENIED);
    if (!(flags & BMI_SPAWN_IO_URING))
        n = deny_each(f, n, io_uring_syscalls, N_IO_URING);
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_clone3_, 0, 1);
    f[n++] = (struct sock_filter)RET_ERRNO(ENOSYS);
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_clone, 0, 3);
    f[n++] = (struct sock_filter)LD_ARG0;
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, CLONE_NS_MASK, 0, 6);
    f[n++] = (struct sock_filter)RET_ERRNO(EPERM);
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_personality, 0, 4);
    f[n++] = (struct sock_filter)LD_ARG0;
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0, 2, 0);
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0xffffffffu, 1, 0);
    f[n++] = (struct sock_filter)RET_ERRNO(EPERM);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    struct sock_fprog prog = {(unsigned short)n, f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) return -1;
    return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog);
}

/* ---------------------------------------------------------------- unpacking a root archive */

struct link { uint32_t ino, maj, min; const char *name; };
static struct link g_links[BMI_CPIO_MAX_HARDLINKS];

/* BMI_SPAWN_PROGRESS: how far the unpacking is, told to the manager (it shows a progress bar) every `step`
 * bytes of the archive (1%, at least 1 MiB; big files in steps too) and at the end */
#define UNPACKED_STEP_MIN (1ull << 20)
static struct {
    int on, fd;
    const char *archive;
    unsigned long long size, step, reported;
} g_unpacked;

static void report_unpacked(unsigned long long done)
{
    g_unpacked.reported = done;
    struct rec r = {.kind = BMI_SPAWN_UNPACKED, .done = done, .total = g_unpacked.size};
    if (write_all(g_unpacked.fd, (const char *)&r, sizeof r)) _exit(127); /* the manager gave up; it kills us */
}

/* the archive is unpacked up to `upto` */
static void unpacked(const char *upto)
{
    unsigned long long done = (unsigned long long)(upto - g_unpacked.archive);
    if (g_unpacked.on && done >= g_unpacked.reported + g_unpacked.step) report_unpacked(done);
}

/* Open the directory containing `name` beneath root, refusing symlinks and
 * any escape; *base gets the last component. Returns root itself for top-level names. */
static int open_parent(int ef, int root, const char *name, const char **base)
{
    const char *slash = strrchr(name, '/');
    if (!slash) { *base = name; return root; }
    char dir[PATH_MAX];
    size_t len = (size_t)(slash - name);
    memcpy(dir, name, len);
    dir[len] = 0;
    *base = slash + 1;
    struct open_how how;
    memset(&how, 0, sizeof how);
    how.flags = O_PATH | O_DIRECTORY | O_CLOEXEC;
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV;
    int fd = (int)syscall(SYS_openat2_, root, dir, &how, sizeof how);
    if (fd < 0) fail(ef, BMI_SPAWN_EIMAGE, "archive entry's directory (missing, or reached through a symlink)", name);
    return fd;
}

/* Remove a non-directory that a later entry replaces; never a directory (proc, dev, tmp stay). */
static void make_room(int ef, int pfd, const char *base, const char *name)
{
    if (unlinkat(pfd, base, 0) == 0 || errno == ENOENT) return;
    if (errno == EISDIR) fail_n(ef, BMI_SPAWN_EIMAGE, EISDIR, "archive entry would replace a directory", name, 120);
    fail(ef, fs_kind(errno), "archive entry", name);
}

/* Is this file an ELF program rather than a shared library?  ET_EXEC, or ET_DYN with an interpreter
 * (PT_INTERP) or marked PIE (DF_1_PIE), and without a DT_SONAME: libc.so.6 has PT_INTERP but also a
 * soname; ld.so, plugins and Python extensions have neither PT_INTERP nor DF_1_PIE.  Bounds-checked: the
 * data is the PD's. */
static int is_elf_program(const unsigned char *d, unsigned long size)
{
    if (size < sizeof(Elf64_Ehdr) || memcmp(d, ELFMAG, SELFMAG)) return 0;
    Elf64_Ehdr eh;
    memcpy(&eh, d, sizeof eh);
    if (eh.e_type == ET_EXEC) return 1;   /* same offset in ELFCLASS32 */
    if (eh.e_type != ET_DYN || d[EI_CLASS] != ELFCLASS64 || eh.e_phentsize != sizeof(Elf64_Phdr)
        || eh.e_phoff > size || eh.e_phnum > (size - eh.e_phoff) / sizeof(Elf64_Phdr)) return 0;
    int interp = 0, pie = 0, dynamic = 0;
    for (unsigned i = 0; i < eh.e_phnum; i++) {
        Elf64_Phdr ph;
        memcpy(&ph, d + eh.e_phoff + i * sizeof ph, sizeof ph);
        if (ph.p_type == PT_INTERP) interp = 1;
        if (ph.p_type != PT_DYNAMIC || dynamic++ || ph.p_offset > size || ph.p_filesz > size - ph.p_offset)
            continue;   /* the first PT_DYNAMIC only (as ld.so): one linear pass, however the headers lie */
        for (unsigned long o = 0; o + sizeof(Elf64_Dyn) <= ph.p_filesz; o += sizeof(Elf64_Dyn)) {
            Elf64_Dyn dyn;
            memcpy(&dyn, d + ph.p_offset + o, sizeof dyn);
            if (dyn.d_tag == DT_NULL) break;
            if (dyn.d_tag == DT_SONAME) return 0;
            if (dyn.d_tag == DT_FLAGS_1 && (dyn.d_un.d_val & DF_1_PIE)) pie = 1;
        }
    }
    return interp || pie;
}

/* An executable ELF program from the archive is made execute-only (its x bits, nothing else): the PD runs
 * as the file's owner without capabilities, so the file is unreadable to it, and the kernel makes every
 * process that execs it non-dumpable (would_dump).  No process of the PD can then open another's
 * /proc/<pid>/mem, environ or maps: the ptrace rule applied to /proc, which seccomp cannot do since it does
 * not see paths.  A #! script stays readable (its interpreter reads it); the kernel judges the interpreter
 * instead, so a script run by an execute-only shell is covered too.  Libraries stay readable, since ld.so
 * and dlopen read them.  The PD owns its root, so it may chmod a program back: that exposes only processes
 * exec'd afterwards, which a PD that writes its own root could subvert anyway. */
static void write_file(int ef, int pfd, const char *base, const char *name, unsigned long mode,
                       const char *data, unsigned long size, int create)
{
    int fd = create ? openat(pfd, base, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, (mode_t)(mode & 01777))
                    : openat(pfd, base, O_WRONLY | O_TRUNC | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) fail(ef, fs_kind(errno), "creating archive file", name);
    unsigned long chunk = g_unpacked.on ? (unsigned long)g_unpacked.step : size;
    for (unsigned long off = 0, n; off < size; off += n) {
        n = size - off < chunk ? size - off : chunk;
        if (write_all(fd, data + off, n)) fail(ef, fs_kind(errno), "writing archive file", name);
        unpacked(data + off + n);
    }
    if ((mode & 0111) && is_elf_program((const unsigned char *)data, size) && fchmod(fd, (mode_t)(mode & 0111)))
        fail(ef, fs_kind(errno), "making an archive program execute-only", name);
    close(fd);
}

static void extract_entry(int ef, int root, const struct bmi_cpio_entry *e, const char *data, int *nlinks)
{
    const char *name = e->name;
    unsigned long mode = e->mode, nlink = e->nlink, size = (unsigned long)e->size;
    uint32_t ino = e->ino, maj = e->devmajor, min = e->devminor;
    const char *base;
    int pfd = open_parent(ef, root, name, &base);
    unsigned long type = mode & S_IFMT;
    if (type == S_IFDIR) {
        if (mkdirat(pfd, base, (mode_t)(mode & 01777)) && errno != EEXIST)
            fail(ef, fs_kind(errno), "creating archive directory", name);
        struct stat st;
        if (fstatat(pfd, base, &st, AT_SYMLINK_NOFOLLOW) || !S_ISDIR(st.st_mode))
            fail_n(ef, BMI_SPAWN_EIMAGE, EEXIST, "archive directory clashes with a non-directory", name, 120);
    } else if (type == S_IFREG) {
        int i = 0;
        if (nlink > 1)
            for (; i < *nlinks; i++)
                if (g_links[i].ino == ino && g_links[i].maj == maj && g_links[i].min == min) break;
        make_room(ef, pfd, base, name);
        if (nlink > 1 && i < *nlinks) { /* newc: a later name of the same inode */
            const char *obase;
            int ofd = open_parent(ef, root, g_links[i].name, &obase);
            if (linkat(ofd, obase, pfd, base, 0)) fail(ef, fs_kind(errno), "hard link in archive", name);
            if (ofd != root) close(ofd);
            if (size) write_file(ef, pfd, base, name, mode, data, size, 0);
        } else {
            write_file(ef, pfd, base, name, mode, data, size, 1);
            if (nlink > 1) {
                if (*nlinks == BMI_CPIO_MAX_HARDLINKS)   /* bmi_cpio_check refused that already */
                    fail_n(ef, BMI_SPAWN_EIMAGE, E2BIG, "archive has too many hard-linked files", name, 120);
                g_links[(*nlinks)++] = (struct link){ino, maj, min, name};
            }
        }
    } else if (type == S_IFLNK) {
        char target[PATH_MAX];
        if (size == 0 || size >= sizeof target || memchr(data, 0, size))
            fail_n(ef, BMI_SPAWN_EIMAGE, EINVAL, "archive symlink target is empty, too long or has NUL", name, 120);
        memcpy(target, data, size);
        target[size] = 0;
        make_room(ef, pfd, base, name);
        if (symlinkat(target, pfd, base)) fail(ef, fs_kind(errno), "creating archive symlink", name);
    } else {
        fail_n(ef, BMI_SPAWN_EIMAGE, EPERM,
               "archive entry is a device node, fifo or socket (only files, directories and symlinks are allowed)",
               name, 120);
    }
    if (pfd != root) close(pfd);
}


/* Unpack a newc archive from the sealed memfd into root: bmi_cpio_check first, the very check setup_pd ran
 * (so a refusal here says the same as there), then every entry through the same parser (reporting how far it
 * is with BMI_SPAWN_PROGRESS). */
static void extract(int ef, int root, int exec_fd, int flags)
{
    struct stat st;
    if (fstat(exec_fd, &st)) fail(ef, BMI_SPAWN_ERESOURCE, "fstat of the image", NULL);
    size_t size = (size_t)st.st_size;
    if (size == 0) fail_n(ef, BMI_SPAWN_EIMAGE, EINVAL, "archive is empty", NULL, 0);
    const char *a = mmap(NULL, size, PROT_READ, MAP_PRIVATE, exec_fd, 0);
    if (a == MAP_FAILED) fail(ef, BMI_SPAWN_ERESOURCE, "mapping the image", NULL);
    char why[sizeof ((struct rec *)0)->detail];
    if (bmi_cpio_check((const uint8_t *)a, size, why, sizeof why))
        fail_n(ef, BMI_SPAWN_EIMAGE, EINVAL, "archive refused:", why, sizeof why);
    struct bmi_cpio_reader r;
    struct bmi_cpio_entry e;
    int nlinks = 0;
    g_unpacked.on = (flags & BMI_SPAWN_PROGRESS) != 0;
    g_unpacked.fd = ef;
    g_unpacked.archive = a;
    g_unpacked.size = size;
    g_unpacked.step = size / 100 > UNPACKED_STEP_MIN ? size / 100 : UNPACKED_STEP_MIN;
    bmi_cpio_start(&r, (const uint8_t *)a, size);
    while (bmi_cpio_next(&r, &e, NULL, 0) == 1)
        if (e.name_len) {
            extract_entry(ef, root, &e, a + e.data_offset, &nlinks);
            unpacked(a + e.data_offset + e.size);
        }
    /* /init may be a symlink (busybox); resolve it inside the new root only */
    struct open_how how;
    memset(&how, 0, sizeof how);
    how.flags = O_PATH | O_CLOEXEC;
    how.resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV;
    int fd = (int)syscall(SYS_openat2_, root, "init", &how, sizeof how);
    if (fd < 0) fail(ef, BMI_SPAWN_EIMAGE, "archive has no usable /init", NULL);
    close(fd);
    munmap((void *)a, size);
    if (g_unpacked.on) report_unpacked(size);
}

/* ---------------------------------------------------------------- the PD's root */

static const char *const dev_nodes[] = {"null", "zero", "full", "random", "urandom"};

static void tmpfs_opts(char *out, const char *mode, unsigned long long bytes)
{
    char *p = stpcpy(stpcpy(out, "mode="), mode);
    if (bytes) utoa(stpcpy(p, ",size="), bytes);
}

/* tmpfs root with proc, dev (five host nodes bound in), tmp, and the archive; then pivot into it. */
static void build_root(struct cfg *c)
{
    int ef = c->err_wr;
    char opts[64];
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL)) fail(ef, BMI_SPAWN_ERESOURCE, "making mounts private", NULL);
    tmpfs_opts(opts, "0755", c->tmpfs_bytes);
    if (mount("bmi-pd", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, opts))
        fail(ef, BMI_SPAWN_ERESOURCE, "mounting the root tmpfs", NULL);
    if (chdir("/tmp")) fail(ef, BMI_SPAWN_ERESOURCE, "entering the new root", NULL);
    int root = open(".", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (root < 0) fail(ef, BMI_SPAWN_ERESOURCE, "opening the new root", NULL);
    if (mkdirat(root, "proc", 0555) || mkdirat(root, "dev", 0755) || mkdirat(root, "tmp", 01777))
        fail(ef, BMI_SPAWN_ERESOURCE, "creating proc, dev, tmp", NULL);
    if (c->archive) extract(ef, root, c->exec_fd, c->flags);
    int dev = openat(root, "dev", O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dev < 0) fail(ef, BMI_SPAWN_ERESOURCE, "opening dev", NULL);
    for (unsigned i = 0; i < sizeof dev_nodes / sizeof dev_nodes[0]; i++) {
        char src[32], dst[32];
        stpcpy(stpcpy(src, "/dev/"), dev_nodes[i]);
        stpcpy(stpcpy(dst, "dev/"), dev_nodes[i]);
        int fd = openat(dev, dev_nodes[i], O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0666);
        if (fd < 0) fail(ef, errno == EEXIST ? BMI_SPAWN_EIMAGE : BMI_SPAWN_ERESOURCE,
                         "creating a device mount point (archives must not contain it)", dst);
        close(fd);
        if (mount(src, dst, NULL, MS_BIND, NULL)) fail(ef, BMI_SPAWN_ERESOURCE, "bind-mounting", src);
    }
    close(dev);
    if (mount("proc", "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL))
        fail(ef, BMI_SPAWN_ERESOURCE, "mounting proc", NULL);
    tmpfs_opts(opts, "1777", c->tmpfs_bytes);
    if (mount("tmpfs", "tmp", "tmpfs", MS_NOSUID | MS_NODEV, opts)) fail(ef, BMI_SPAWN_ERESOURCE, "mounting tmp", NULL);
    if (syscall(SYS_pivot_root, ".", ".")) fail(ef, BMI_SPAWN_ERESOURCE, "pivot_root", NULL);
    if (umount2(".", MNT_DETACH)) fail(ef, BMI_SPAWN_ERESOURCE, "detaching the host root", NULL);
    if (chdir("/")) fail(ef, BMI_SPAWN_ERESOURCE, "chdir /", NULL);
    close(root);
}

/* ---------------------------------------------------------------- pid 2: the program */

/* The program is uid 0 of its user namespace; without this it would hold
 * every capability there (CAP_NET_ADMIN over its netns opens netfilter and
 * the rest of the kernel's namespaced-admin code to it).  Like bwrap: drop
 * what is not kept from the bounding and inheritable sets and clear the
 * ambient set, so the exec below gives the program exactly `keep`. */
static int drop_caps(unsigned long long keep)
{
    for (int cap = 0; cap < 64; cap++) {
        if (keep >> cap & 1) continue;
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)) {
            if (errno == EINVAL) break; /* past the last capability this kernel has */
            return -1;
        }
    }
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)) return -1;
    struct __user_cap_header_struct head = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    if (syscall(SYS_capget, &head, data)) return -1;
    data[0].inheritable &= (uint32_t)keep;
    data[1].inheritable &= (uint32_t)(keep >> 32);
    /* no effective capability at the exec: an image the PD may only execute (mode 0111) is then
     * unreadable to it, and the kernel makes the program non-dumpable (would_dump), so no process of
     * the PD can open its /proc/<pid>/mem; root's exec gives back the bounding set anyway */
    data[0].effective = data[1].effective = 0;
    return (int)syscall(SYS_capset, &head, data);
}

static __attribute__((noreturn)) void run_program(struct cfg *c, int pipe_fd)
{
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    /* lift every source fd above 0..3 first so the dup3s below cannot clobber one */
    int keep[4] = {
        fcntl(c->exec_fd, F_DUPFD_CLOEXEC, HIGH_FD), fcntl(pipe_fd, F_DUPFD_CLOEXEC, HIGH_FD),
        fcntl(c->console_fd, F_DUPFD_CLOEXEC, HIGH_FD),
        c->channel_fd >= 0 ? fcntl(c->channel_fd, F_DUPFD_CLOEXEC, HIGH_FD) : -1,
    };
    int exec_fd = keep[0], ef = keep[1], con = keep[2], chan = keep[3];
    if (exec_fd < 0 || ef < 0 || con < 0 || (c->channel_fd >= 0 && chan < 0))
        fail(pipe_fd, BMI_SPAWN_ERESOURCE, "duplicating fds", NULL);
    close_except(keep, 4);
    int null = open("/dev/null", O_RDWR); /* lowest free fd: 0 */
    if (null != 0 || dup3(con, 1, 0) != 1 || dup3(con, 2, 0) != 2 || (chan >= 0 && dup3(chan, 3, 0) != 3))
        fail(ef, BMI_SPAWN_ERESOURCE, "setting up fds 0-3", NULL);
    close(con);
    if (chan >= 0) close(chan);
    if ((c->flags & BMI_SPAWN_LANDLOCK) && apply_landlock())
        fail(ef, BMI_SPAWN_ERESOURCE, "applying landlock", NULL);
    if (drop_caps(c->keep_caps)) fail(ef, BMI_SPAWN_ERESOURCE, "dropping capabilities", NULL);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) fail(ef, BMI_SPAWN_ERESOURCE, "PR_SET_NO_NEW_PRIVS", NULL);
    /* the seccomp filter is init's, inherited by this clone (one filter to compile, not two) */
    if (c->flags & BMI_SPAWN_HOLD) { /* devices/networks hook: say so, wait for SIGCONT (blocked: none is lost) */
        sigset_t cont;
        sigemptyset(&cont);
        sigaddset(&cont, SIGCONT);
        sigprocmask(SIG_BLOCK, &cont, NULL);
        struct rec held = {.kind = BMI_SPAWN_HELD};
        if (write(ef, &held, sizeof held) != (ssize_t)sizeof held) _exit(127);
        while (sigwaitinfo(&cont, NULL) < 0) {}
        sigprocmask(SIG_UNBLOCK, &cont, NULL);
    }
    if (c->archive) {
        execve("/init", c->argv, c->envp);
        fail(ef, BMI_SPAWN_EIMAGE, "exec of /init", NULL);
    }
    syscall(SYS_execveat, exec_fd, "", c->argv, c->envp, AT_EMPTY_PATH);
    fail(ef, BMI_SPAWN_EIMAGE, "exec of the ELF image",
         errno == ENOENT ? "(dynamically linked, or a #! script? a PD has no loader, libraries or interpreter)" : NULL);
}

/* ---------------------------------------------------------------- pid 1: the PD's init */

static void put_status(int fd, int st)
{
    char line[32], *p;
    if (WIFSIGNALED(st)) p = utoa(stpcpy(line, "signal "), (unsigned)WTERMSIG(st));
    else p = utoa(stpcpy(line, "exit "), (unsigned)WEXITSTATUS(st));
    *p++ = '\n';
    write_all(fd, line, (size_t)(p - line));
}

static __attribute__((noreturn)) void pd_init(struct cfg *c)
{
    int ef = c->err_wr;
    reset_signals();
    umask(0);
    int keep[] = {c->exec_fd, c->console_fd, c->status_fd, c->lifeline_fd, c->channel_fd, ef};
    close_except(keep, (int)(sizeof keep / sizeof keep[0]));
    ssize_t n;
    if (sethostname(c->hostname, strlen(c->hostname))) fail(ef, BMI_SPAWN_ERESOURCE, "sethostname", NULL);
    if (unshare(CLONE_NEWCGROUP)) fail(ef, BMI_SPAWN_ERESOURCE, "unshare(CLONE_NEWCGROUP)", NULL);
    build_root(c);

    sigset_t set;
    sigemptyset(&set);
    static const int handled[] = {SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGCONT, SIGWINCH};
    for (unsigned i = 0; i < sizeof handled / sizeof handled[0]; i++) sigaddset(&set, handled[i]);
    sigprocmask(SIG_BLOCK, &set, NULL);
    int sfd = signalfd(-1, &set, SFD_CLOEXEC);
    int ep[2];
    if (sfd < 0 || pipe2(ep, O_CLOEXEC)) fail(ef, BMI_SPAWN_ERESOURCE, "init set-up", NULL);
    if ((c->flags & BMI_SPAWN_SECCOMP) && apply_seccomp(c->flags))
        fail(ef, BMI_SPAWN_ERESOURCE, "installing the seccomp filter", NULL);
    pid_t prog = (pid_t)syscall(SYS_clone, SIGCHLD, 0, NULL, NULL, 0);
    if (prog < 0) fail(ef, BMI_SPAWN_ERESOURCE, "forking the program", NULL);
    if (prog == 0) {
        close(ep[0]);
        close(sfd);
        run_program(c, ep[1]);
    }
    close(ep[1]);
    struct rec r;
    do n = read(ep[0], &r, sizeof r); while (n < 0 && errno == EINTR);
    if (n == (ssize_t)sizeof r) { /* the program never ran: pass the reason on, report no exit status */
        write_all(ef, (const char *)&r, sizeof r);
        if (r.kind != BMI_SPAWN_HELD) _exit(127);
    }   /* held: the manager has its answer; the SIGCONT it sends comes through the loop below */
    close(ep[0]);
    close(ef);
    close(c->exec_fd);
    close(c->console_fd);
    if (c->channel_fd >= 0) close(c->channel_fd);

    struct pollfd pf[2] = {{sfd, POLLIN, 0}, {c->lifeline_fd, POLLIN, 0}};
    for (;;) {
        if (poll(pf, c->lifeline_fd >= 0 ? 2 : 1, -1) < 0) continue;
        if (pf[1].revents) {
            char buf[64];
            n = read(c->lifeline_fd, buf, sizeof buf);
            if (n == 0 || (n < 0 && errno != EINTR && errno != EAGAIN)) { /* the manager is gone */
                kill(-1, SIGKILL);
                _exit(128 + SIGKILL);
            }
        }
        if (!(pf[0].revents & POLLIN)) continue;
        struct signalfd_siginfo si;
        if (read(sfd, &si, sizeof si) != (ssize_t)sizeof si) continue;
        if (si.ssi_signo != SIGCHLD) {
            kill(prog, (int)si.ssi_signo);
            continue;
        }
        int st;
        pid_t w;
        while ((w = waitpid(-1, &st, WNOHANG)) > 0)
            if (w == prog) { /* the kernel kills the rest of the namespace when we exit */
                put_status(c->status_fd, st);
                _exit(WIFSIGNALED(st) ? 128 + WTERMSIG(st) : WEXITSTATUS(st));
            }
    }
}

/* ---------------------------------------------------------------- bmi-init: the PD's pid 1 as a program
 * argv: bmi-init EXEC_FD ARCHIVE CONSOLE_FD STATUS_FD LIFELINE_FD CHANNEL_FD FLAGS HOSTNAME TMPFS_BYTES
 *       ERR_FD KEEP_CAPS -- PROGRAM ARGV...      (the environment is the program's; the manager has already
 *       mapped our uids and placed us in our cgroups before it let us exec) */
extern char **environ;

int main(int argc, char **argv)
{
    if (argc < 14 || strcmp(argv[12], "--")) return 127;
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    struct cfg c = {atoi(argv[1]), atoi(argv[2]), atoi(argv[3]), atoi(argv[4]), atoi(argv[5]), atoi(argv[6]),
                    atoi(argv[7]), &argv[13], environ, argv[8], strtoull(argv[9], NULL, 10), -1, atoi(argv[10]),
                    strtoull(argv[11], NULL, 10), 0, 0};
    pd_init(&c);
}
