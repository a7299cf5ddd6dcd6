/* bmi_client: see bmi_client.h.  Deliberately small: it writes requests with
 * snprintf and reads the few reply shapes the protocol has (docs/protocol.md)
 * with a flat scanner, so a PD needs nothing but libc. */
#define _GNU_SOURCE
#include "bmi_client.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#define MAX_MESSAGE (64 * 1024)

static long g_next_id = 1;

int bmi_channel_fd(void)
{
    const char *s = getenv("BMI_CHANNEL_FD");
    if (!s || !*s) return -1;
    char *end;
    long v = strtol(s, &end, 10);
    return (*end || v < 0 || v > 1 << 20) ? -1 : (int)v;
}

/* Copy a JSON string literal starting at p (just after the opening quote). */
static const char *unescape(const char *p, char *out, size_t cap)
{
    size_t n = 0;
    while (*p && *p != '"') {
        char c = *p++;
        if (c == '\\') {
            c = *p++;
            switch (c) {
            case 'n': c = '\n'; break;
            case 't': c = '\t'; break;
            case 'r': c = '\r'; break;
            case 'b': c = '\b'; break;
            case 'f': c = '\f'; break;
            case 'u': {
                unsigned v = 0;
                for (int i = 0; i < 4 && *p; i++, p++)
                    v = v * 16 + (unsigned)(*p <= '9' ? *p - '0' : (*p | 32) - 'a' + 10);
                c = v < 128 ? (char)v : '?';
                break;
            }
            case 0: p--; c = '?'; break;
            default: break; /* \" \\ \/ */
            }
        }
        if (n + 1 < cap) out[n++] = c;
    }
    if (cap) out[n] = 0;
    return *p == '"' ? p + 1 : p;
}

static const char *member(const char *json, const char *key)
{
    char pat[80];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *p = strstr(json, pat);
    return p ? p + strlen(pat) : NULL;
}

int bmi_json_int(const char *json, const char *key, long *value)
{
    const char *p = member(json, key);
    if (!p) return -1;
    char *end;
    *value = strtol(p, &end, 10);
    return end == p ? -1 : 0;
}

int bmi_json_str(const char *json, const char *key, char *out, size_t cap)
{
    const char *p = member(json, key);
    if (!p || *p != '"') return -1;
    unescape(p + 1, out, cap);
    return 0;
}

/* JSON-escape s into out (for names and values in params). */
static void escape(const char *s, char *out, size_t cap)
{
    size_t n = 0;
    for (; *s && n + 7 < cap; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') { out[n++] = '\\'; out[n++] = (char)c; }
        else if (c < 0x20) n += (size_t)snprintf(out + n, cap - n, "\\u%04x", c);
        else out[n++] = (char)c;
    }
    out[n] = 0;
}

int bmi_call(int chan, const char *method, const char *params, int fd_in,
             char *out, size_t cap, int *fd_out)
{
    static char buf[MAX_MESSAGE + 1];
    if (fd_out) *fd_out = -1;
    long id = g_next_id++;
    int len = snprintf(buf, sizeof buf, "{\"jsonrpc\":\"2.0\",\"id\":%ld,\"method\":\"%s\",\"params\":%s}",
                       id, method, params && *params ? params : "{}");
    if (len < 0 || len >= (int)sizeof buf) { errno = EMSGSIZE; return BMI_E_IO; }

    union { char raw[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } ctl;
    struct iovec iov = {buf, (size_t)len};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (fd_in >= 0) {
        memset(&ctl, 0, sizeof ctl);
        msg.msg_control = ctl.raw;
        msg.msg_controllen = sizeof ctl.raw;
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd_in, sizeof(int));
    }
    if (sendmsg(chan, &msg, MSG_NOSIGNAL) < 0) return BMI_E_IO;

    memset(&msg, 0, sizeof msg);
    iov.iov_base = buf;
    iov.iov_len = MAX_MESSAGE;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctl.raw;
    msg.msg_controllen = sizeof ctl.raw;
    ssize_t got;
    do got = recvmsg(chan, &msg, MSG_CMSG_CLOEXEC); while (got < 0 && errno == EINTR);
    if (got < 0) return BMI_E_IO;
    if (got == 0) { errno = ECONNRESET; return BMI_E_IO; }
    buf[got] = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS && fd_out)
            memcpy(fd_out, CMSG_DATA(c), sizeof(int));

    /* replies are {"jsonrpc":"2.0","id":N,"result":...} or {...,"id":N,"error":{...}} */
    const char *after = member(buf, "id");
    after = after ? strchr(after, ',') : NULL;
    if (!after) { errno = EPROTO; return BMI_E_IO; }
    after++;
    const char *err = strncmp(after, "\"error\":", 8) == 0 ? after + 8 : NULL;
    if (err) {
        long code = BMI_E_INTERNAL;
        bmi_json_int(err, "code", &code);
        if (cap && bmi_json_str(err, "message", out, cap)) out[0] = 0;
        return (int)code;
    }
    const char *res = strncmp(after, "\"result\":", 9) == 0 ? after + 9 : NULL;
    if (!res) { errno = EPROTO; return BMI_E_IO; }
    size_t n = strlen(res);
    if (n && res[n - 1] == '}') n--;            /* the reply object's closing brace */
    if (cap) {
        if (n >= cap) n = cap - 1;
        memcpy(out, res, n);
        out[n] = 0;
    }
    return 0;
}

int bmi_connect(int chan, int tid, const char *type, int mode, unsigned long size, int *fd)
{
    char params[160], out[512];
    if (size)
        snprintf(params, sizeof params, "{\"tid\":%d,\"con_type\":\"%s\",\"mode\":%d,\"size\":%lu}",
                 tid, type, mode, size);
    else
        snprintf(params, sizeof params, "{\"tid\":%d,\"con_type\":\"%s\",\"mode\":%d}", tid, type, mode);
    int rc = bmi_call(chan, "connect", params, -1, out, sizeof out, fd);
    if (rc == 0 && *fd < 0) { errno = EPROTO; return BMI_E_IO; }
    return rc;
}

int bmi_accept(int chan, long timeout_ms, int *peer, char *type, size_t type_cap, int *mode, int *fd)
{
    char params[64], out[512];
    if (timeout_ms < 0) snprintf(params, sizeof params, "{\"timeout\":null}");
    else snprintf(params, sizeof params, "{\"timeout\":%ld.%03ld}", timeout_ms / 1000, timeout_ms % 1000);
    int rc = bmi_call(chan, "accept", params, -1, out, sizeof out, fd);
    if (rc) return rc;
    if (strcmp(out, "null") == 0) return 1;
    long source = -1, m = 0;
    bmi_json_int(out, "source", &source);
    bmi_json_int(out, "mode", &m);
    if (peer) *peer = (int)source;
    if (mode) *mode = (int)m;
    if (type && bmi_json_str(out, "con_type", type, type_cap)) type[0] = 0;
    return 0;
}

int bmi_my_id(int chan)
{
    char out[64];
    int rc = bmi_call(chan, "get_controller", "{}", -1, out, sizeof out, NULL);
    return rc ? rc : atoi(out);
}

static int get_param(int chan, const char *method, const char *name, char *out, size_t cap)
{
    char esc[1024], params[1100], res[MAX_MESSAGE];
    escape(name, esc, sizeof esc);
    snprintf(params, sizeof params, "{\"name\":\"%s\"}", esc);
    int rc = bmi_call(chan, method, params, -1, res, sizeof res, NULL);
    if (rc) {
        snprintf(out, cap, "%s", res);
        return rc;
    }
    if (res[0] == '"') unescape(res + 1, out, cap);
    else snprintf(out, cap, "%s", res);
    return 0;
}

int bmi_pd_get_config_param(int chan, const char *name, char *out, size_t cap)
{
    return get_param(chan, "get_config_param", name, out, cap);
}

int bmi_pd_get_runtime_param(int chan, const char *name, char *out, size_t cap)
{
    return get_param(chan, "get_runtime_param", name, out, cap);
}
